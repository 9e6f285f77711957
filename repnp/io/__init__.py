"""Converters: trained weights in, deploy form out, with numerical proof.

* :func:`convert_state` — a state dict (``.npz``, the naming of the framework
  that trained it) to the deploy-form state dict with that framework's own
  deploy names, each block built and fused by :mod:`repnp.blocks` (``repnp.io.npz``);
* :func:`check_state` — an independent block-by-block check of a converted state dict
  (the train-form branches run with :mod:`repnp.ops` against the fused conv);
* :func:`convert_onnx` — an ONNX model to one where every re-parameterizable
  subgraph is one Conv (:mod:`repnp.io.onnx`); :func:`load_onnx` and
  :func:`save_onnx` read and atomically write ONNX models;
* :func:`export_onnx` — a repnp block or network as ONNX (``repnp.io.onnx.export``).

The submodules are imported on first use, so ``import repnp.io`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "convert_state": "repnp.io.npz.convert",
    "load_state": "repnp.io.npz.archive",
    "save_state": "repnp.io.npz.archive",
    "detect_scheme": "repnp.io.npz.convert",
    "find_blocks": "repnp.io.npz.convert",
    "check_state": "repnp.io.npz.convert",
    "scheme_names": "repnp.io.npz.schemes",
    "convert_onnx": "repnp.io.onnx.convert",
    "load_onnx": "repnp.io.onnx.load",
    "save_onnx": "repnp.io.onnx.write",
    "export_onnx": "repnp.io.onnx.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repnp.io' has no attribute {name!r}")
