"""ONNX in and out: load a model, fuse its re-parameterizable subgraphs, check, save.

One module per job:

* :mod:`~repnp.io.onnx.load` — safe loading (:func:`load_onnx`);
* :mod:`~repnp.io.onnx.graph` — structure checks,
  topological order, static shapes, attributes, operator and parameter counts;
* :mod:`~repnp.io.onnx.fold` — constant folding of shape-only subgraphs;
* :mod:`~repnp.io.onnx.regions` — the affine-region algebra (on :mod:`repnp.fusion`);
* :mod:`~repnp.io.onnx.walk` and :mod:`~repnp.io.onnx.views` — the walk that grows
  regions node by node (RepMLP's reshaped views in the second);
* :mod:`~repnp.io.onnx.rewrite` — emission of the new graph, one Conv per region;
* :mod:`~repnp.io.onnx.check` — numeric comparison of two models;
* :mod:`~repnp.io.onnx.convert` — the entry point, :func:`convert_onnx`;
* :mod:`~repnp.io.onnx.ops` — a graph as op records for :mod:`repnp.cost`;
* :mod:`~repnp.io.onnx.write` — atomic save (:func:`save_onnx`);
* :mod:`~repnp.io.onnx.export` — a repnp block or network written as ONNX
  (:func:`export_onnx`), the third interpreter of a block's dataflow.

The public functions are re-exported by :mod:`repnp.io`; they are imported here on first
use, so that importing one submodule does not import the others.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load_onnx": "repnp.io.onnx.load",
    "count_params": "repnp.io.onnx.graph",
    "save_onnx": "repnp.io.onnx.write",
    "convert_onnx": "repnp.io.onnx.convert",
    "compare_models": "repnp.io.onnx.check",
    "graph_ops": "repnp.io.onnx.ops",
    "export_onnx": "repnp.io.onnx.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'repnp.io.onnx' has no attribute {name!r}")
