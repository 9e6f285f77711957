"""Golden tensors for porters: deterministic, seeded, documented in ``data/README.md``.

Each ``make_*`` function returns a ``{key: array}`` dict; :func:`write_golden`
stores one as ``.npz`` (atomically: temp file, then rename). Regenerating a
file gives the same values bit for bit (a test checks this), so a porter can
trust that the file says what the code says.

Block families (:data:`BLOCK_SPECS`): one small block per family, in float64
and float32, with keys

* ``x`` — the input (NCHW), ``y`` — the train form's output on it;
* ``train.<name>`` — the train form's parameters, named by its ``params()``;
* ``deploy.<name>`` — the parameters of ``reparameterize()``'s result;
* ``config`` — a JSON string (0-d unicode array: no pickle) with the family,
  the classes, the seed and constructor arguments, shapes and the tolerance;
* ``eps`` — the BN epsilon of every BN in the block (0-d float64).

Regenerate every file with ``python -m repnp.golden data/golden``.

What is bit-identical across machines: everything drawn from the seeded RNG
(``x``, ``train.*``, ``config``, ``eps``; NumPy's ``default_rng`` streams are
platform independent) and the identity example (exact arithmetic). What may
differ in the last bits on another CPU or BLAS build: the values computed
through matrix products (``y`` and ``deploy.*``), since BLAS kernels sum in
different orders. :func:`main` rewrites a file only when some value changed.
"""

from __future__ import annotations

import importlib
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np

from repnp import fusion, ops
from repnp.io.atomic import write_atomically
from repnp.tolerance import default_tolerance

__all__ = ["make_identity_example", "make_block_golden", "build_golden_block", "BLOCK_SPECS",
           "write_golden", "same_golden", "GENERATORS", "main"]


def make_identity_example() -> dict[str, np.ndarray]:
    """Our worked identity-kernel example, single- and multi-channel.

    It illustrates RepVGG's identity branch as a 3x3 kernel (Ding et al., CVPR
    2021, Sec. 3.3; official ``RepVGGBlock._fuse_bn_tensor``); the numbers are
    repnp's own, not taken from the paper.

    Keys
    ----
    x : (1, 1, 3, 3) float64, ``[[1, 2, 3], [4, 5, 6], [7, 8, 9]]``
    kernel : (1, 1, 3, 3), a single 1 in the centre
    y : (1, 1, 3, 3), ``conv2d(x, kernel, padding=1)`` (equals ``x``)
    corner_window : (3, 3), the zero-padded neighbourhood of ``y[0, 0, 0, 0]``
    x_multi : (2, 3, 5, 5), seeded N(0, 1)
    kernel_multi : (3, 3, 3, 3), unit centre where c_in == c_out
    y_multi : (2, 3, 5, 5), ``conv2d(x_multi, kernel_multi, padding=1)`` (equals ``x_multi``)
    """
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    kernel = fusion.identity_kernel(1, kernel_size=3)
    padded = ops.pad2d(x, 1)
    rng = np.random.default_rng(1)
    x_multi = rng.standard_normal((2, 3, 5, 5))
    kernel_multi = fusion.identity_kernel(3, kernel_size=3)
    return {
        "x": x,
        "kernel": kernel,
        "y": ops.conv2d(x, kernel, padding=1),
        "corner_window": padded[0, 0, 0:3, 0:3],
        "x_multi": x_multi,
        "kernel_multi": kernel_multi,
        "y_multi": ops.conv2d(x_multi, kernel_multi, padding=1),
    }


#: One small block per family: (module, class, positional args after the seed, keyword args,
#: seed, input shape). Small on purpose (files of a few KB) but with the features a port
#: gets wrong: groups, an identity branch, BN-and-pad, a crop-free asymmetric layout...
BLOCK_SPECS = {
    "repvgg": ("repnp.blocks.repvgg", "RepVGGBlock", (4, 4),
               {"kernel_size": 3, "stride": 1, "groups": 2}, 501, (2, 4, 6, 7)),
    "mobileone": ("repnp.blocks.mobileone", "MobileOneBlock", (4, 4),
                  {"kernel_size": 3, "stride": 1, "groups": 4, "num_branches": 2}, 502, (2, 4, 6, 7)),
    "acnet": ("repnp.blocks.acnet", "ACBlock", (4, 6),
              {"kernel_size": 3, "stride": 1, "padding": 1, "groups": 2}, 503, (2, 4, 6, 7)),
    "dbb": ("repnp.blocks.dbb", "DiverseBranchBlock", (4, 4),
            {"kernel_size": 3, "stride": 1, "groups": 1}, 504, (2, 4, 6, 7)),
    "resrep": ("repnp.blocks.resrep", "ResRepNet", (3, 6, 4),
               {"head": "conv", "kernel_size": 3, "stride": 1, "next_kernel_size": 3}, 505, (2, 3, 6, 7)),
    "repmlp": ("repnp.blocks.repmlp", "RepMLPBlock", (4, 4, 5),
               {"kernels": [1, 3], "share_sets": 2}, 506, (2, 4, 4, 5)),
    "mobilenetv2": ("repnp.blocks.mobilenetv2", "InvertedResidual", (4, 4),
                    {"stride": 1, "expand_ratio": 2}, 507, (2, 4, 6, 7)),
    "mobilenetv1": ("repnp.blocks.separable", "DepthwiseSeparableBlock", (4, 6),
                    {"kernel_size": 3, "stride": 1}, 508, (2, 4, 6, 7)),
    "linear_bottleneck": ("repnp.blocks.separable", "LinearBottleneckBlock", (8, 8),
                          {"bottleneck_channels": 4, "stride": 1}, 509, (2, 8, 6, 7)),
    "shufflenet": ("repnp.blocks.shufflenet", "ShuffleNetUnit", (6, 6),
                   {"groups": 3, "stride": 1, "bottleneck_channels": 6}, 510, (2, 6, 6, 7)),
    # QARepVGG v1 / v2 (YOLOv6; grouped, identity and, v2, the pooling branch), yolov7's
    # RepConv (a grouped RepVGG block with SiLU: its own fuse_repvgg_block drops channels' identity),
    # official RepViT's RepVGGDW and distillation head (two BN-Linear heads averaged)
    "qarepvgg": ("repnp.blocks.qarepvgg", "QARepVGGBlock", (6, 6), {"groups": 2, "version": 1}, 511, (2, 6, 6, 7)),
    "qarepvggv2": ("repnp.blocks.qarepvgg", "QARepVGGBlock", (6, 6), {"groups": 2, "version": 2}, 512,
                   (2, 6, 6, 7)),
    "yolov7_repconv": ("repnp.blocks.repvgg", "RepVGGBlock", (6, 6), {"groups": 3, "activation": "silu"}, 513,
                       (2, 6, 6, 7)),
    "repvit_repvggdw": ("repnp.blocks.repvit", "RepVggDw", (6,), {"kernel_size": 3}, 514, (2, 6, 6, 7)),
    "repvit_classifier": ("repnp.blocks.repvit", "RepVitClassifier", (8, 5), {"distillation": True}, 515, (3, 8)),
    # large kernels: RepLKNet (its ReparamLargeKernelConv: a depthwise 7x7 + 3x3), UniRepLKNet's
    # Dilated Reparam Block (K = 7: 5x5 r1, 3x3 r2, 3x3 r3) and whole block (BN, SE, GRN, layer scale)
    "replknet": ("repnp.blocks.fastvit", "ReparamLargeKernelConv", (4, 4),
                 {"kernel_size": 7, "small_kernel": 3, "groups": 4}, 531, (2, 4, 9, 8)),
    "unireplknet_drb": ("repnp.blocks.unireplknet", "DilatedReparamBlock", (4,),
                        {"kernel_size": 7}, 532, (2, 4, 9, 8)),
    "unireplknet_block": ("repnp.blocks.unireplknet", "UniRepLKNetBlock", (4,),
                          {"kernel_size": 7}, 533, (2, 4, 9, 8)),
    # OREPA (Hu et al., CVPR 2022): groups 2 (dwsc2full's interleaved pointwise rows) and stride 2
    "orepa": ("repnp.blocks.orepa", "OREPA", (4, 4), {"kernel_size": 3, "stride": 2, "groups": 2}, 541,
              (2, 4, 7, 6)),
}

#: Families without a BN, golden files made like :data:`BLOCK_SPECS`'s (same layout; ``eps`` is
#: stored but unused). Kept apart because ``tests/test_testing.py`` checks that every
#: :data:`BLOCK_SPECS` family folds a BN. ECB (Zhang et al., ACM MM 2021): identity branch on,
#: the border of the bias-padded 1x1 -> 3x3 / edge branches visible at 6x7.
BN_FREE_BLOCK_SPECS = {
    "ecb": ("repnp.blocks.ecb", "ECB", (4, 4), {"depth_multiplier": 2.0, "with_idt": True}, 542, (2, 4, 6, 7)),
}
_ALL_SPECS = {**BLOCK_SPECS, **BN_FREE_BLOCK_SPECS}

#: The compactor rows removed in the ResRep golden file (exactly zero there, as after
#: ResRep's training and the threshold; the other rows are the identity plus noise).
RESREP_PRUNED_ROWS = (1, 4)

#: BN epsilon of every golden block (PyTorch's default).
GOLDEN_EPS = 1e-5


def build_golden_block(family: str, dtype=np.float64):
    """The train-form block of a golden file, rebuilt from :data:`BLOCK_SPECS`."""
    module, cls_name, args, kwargs, seed, _ = _ALL_SPECS[family]
    cls = getattr(importlib.import_module(module), cls_name)
    block = cls.random(seed, *args, **kwargs, eps=GOLDEN_EPS, dtype=dtype)
    if family == "resrep":
        # A compactor as training leaves it: kept rows moved away from the identity,
        # removed rows at exactly zero (so that the deploy form is exact).
        rng = np.random.default_rng(seed + 2)
        q = np.eye(block.layer.out_channels) + 0.2 * rng.standard_normal(block.layer.q.shape)
        q[list(RESREP_PRUNED_ROWS)] = 0.0
        block = block.with_compactor(q.astype(dtype))
    return block


def make_block_golden(family: str, dtype=np.float64) -> dict[str, np.ndarray]:
    """Input, train and deploy parameters, config, eps and output of one family's block.

    Deterministic: the block comes from ``cls.random(seed, ...)`` and the input
    from ``numpy.random.default_rng(seed + 1)``, N(0, 1), cast to ``dtype``.
    """
    dtype = np.dtype(dtype)
    module, cls_name, args, kwargs, seed, x_shape = _ALL_SPECS[family]
    block = build_golden_block(family, dtype)
    deploy = block.reparameterize()
    x = np.random.default_rng(seed + 1).standard_normal(x_shape).astype(dtype)
    y = block.forward(x)
    config = {
        "family": family,
        "class": f"{module}.{cls_name}",
        "deploy_class": f"{type(deploy).__module__}.{type(deploy).__name__}",
        "seed": seed,
        "args": list(args),
        "kwargs": kwargs,
        "dtype": dtype.name,
        "input_shape": list(x.shape),
        "output_shape": list(y.shape),
        "eps": GOLDEN_EPS,
        "tolerance": default_tolerance(dtype),
    }
    if family == "resrep":
        config["pruned_rows"] = list(RESREP_PRUNED_ROWS)
        config["threshold"] = 1e-5
    out = {"x": x, "y": y, "config": np.array(json.dumps(config, sort_keys=True)),
           "eps": np.array(GOLDEN_EPS, dtype=np.float64)}
    out.update({f"train.{k}": np.asarray(v) for k, v in block.params().items()})
    out.update({f"deploy.{k}": np.asarray(v) for k, v in deploy.params().items()})
    return out


def write_golden(path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz``, via a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda handle: np.savez(handle, **arrays))


#: File name -> generator, for every golden file shipped in ``data/golden``.
GENERATORS = {
    "identity_kernel.npz": make_identity_example,
    **{f"{family}_{dt}.npz": partial(make_block_golden, family, np.dtype(dt))
       for family in _ALL_SPECS for dt in ("float64", "float32")},
}


def same_golden(path, arrays: dict[str, np.ndarray]) -> bool:
    """Whether the file at ``path`` holds exactly ``arrays`` (keys, dtypes, shapes, values)."""
    path = Path(path)
    if not path.exists():
        return False
    with np.load(path, allow_pickle=False) as f:
        if set(f.files) != set(arrays):
            return False
        for key, value in arrays.items():
            stored = f[key]
            value = np.asarray(value)
            if stored.dtype != value.dtype or stored.shape != value.shape or not np.array_equal(stored, value):
                return False
    return True


def main(argv=None) -> int:
    """Write every golden file; a file that already holds the same values is left untouched."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "data/golden")
    for name, make in GENERATORS.items():
        arrays = make()
        if same_golden(out / name, arrays):
            print(f"{out / name} (unchanged)")
        else:
            print(write_golden(out / name, arrays))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
