"""Golden files of the YOLO-family and RepViT blocks (data/golden):
QARepVGG v1 / v2, yolov7 RepConv, official RepViT's
RepVGGDW and distillation head. The formulas data/README.md gives porters, recomputed from the files
with plain ops; the deploy parameters reproduce the output; both dtypes describe one block."""

from pathlib import Path

import numpy as np
import pytest

from repnp import golden, ops
from repnp.testing import golden_config, golden_params, load_golden, relative_error

DATA = Path(__file__).resolve().parents[1] / "data" / "golden"

FAMILIES_C = ["qarepvgg", "qarepvggv2", "yolov7_repconv", "repvit_repvggdw", "repvit_classifier"]


def _bn(p, prefix, y):
    shape = (1, -1) + (1,) * (y.ndim - 2)
    t = p[prefix + "gamma"] / np.sqrt(p[prefix + "var"] + 1e-5)
    return (y - p[prefix + "mean"].reshape(shape)) * t.reshape(shape) + p[prefix + "beta"].reshape(shape)


def _readme_forward(family, x, p):
    conv = ops.conv2d
    if family in ("qarepvgg", "qarepvggv2"):
        y = (_bn(p, "conv_kxk.bn.", conv(x, p["conv_kxk.conv.weight"], padding=1, groups=2))
             + conv(x, p["conv_1x1.weight"], groups=2) + x)
        if family == "qarepvggv2":
            y = y + ops.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
        return ops.relu(_bn(p, "bn.", y))
    if family == "yolov7_repconv":
        y = (_bn(p, "conv_kxk.bn.", conv(x, p["conv_kxk.conv.weight"], padding=1, groups=3))
             + _bn(p, "conv_1x1.bn.", conv(x, p["conv_1x1.conv.weight"], groups=3)) + _bn(p, "identity.", x))
        return y / (1 + np.exp(-y))
    if family == "repvit_repvggdw":
        y = (_bn(p, "conv.bn.", conv(x, p["conv.conv.weight"], padding=1, groups=6))
             + conv(x, p["conv1.weight"], p["conv1.bias"], groups=6) + x)
        return _bn(p, "bn.", y)
    if family == "repvit_classifier":
        heads = [_bn(p, f"{h}.bn.", x) @ p[f"{h}.l.weight"].T + p[f"{h}.l.bias"] for h in ("head", "head_dist")]
        return (heads[0] + heads[1]) / 2
    raise AssertionError(family)


def _deploy_forward(family, x, p):
    if family == "repvit_classifier":
        return x @ p["weight"].T + p["bias"]
    if family == "repvit_repvggdw":
        return ops.conv2d(x, p["weight"], p["bias"], padding=1, groups=6)
    groups = 3 if family == "yolov7_repconv" else 2
    y = ops.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1, groups=groups)
    return y / (1 + np.exp(-y)) if family == "yolov7_repconv" else ops.relu(y)


@pytest.mark.parametrize("family", FAMILIES_C)
def test_readme_formulas_reproduce_the_files(family):
    for dt, tol in (("float64", 1e-12), ("float32", 1e-5)):
        g = load_golden(DATA / f"{family}_{dt}.npz")
        assert golden_config(g)["family"] == family and golden_config(g)["tolerance"] == tol
        x = g["x"].astype(np.float64)
        y = _readme_forward(family, x, {k: v.astype(np.float64) for k, v in golden_params(g, "train").items()})
        assert relative_error(y, g["y"]) <= tol
        yd = _deploy_forward(family, x, {k: v.astype(np.float64) for k, v in golden_params(g, "deploy").items()})
        assert relative_error(yd, g["y"]) <= tol
        assert (DATA / f"{family}_{dt}.npz").stat().st_size < 100_000


@pytest.mark.parametrize("family", FAMILIES_C)
def test_registered_and_both_dtypes_describe_one_block(family):
    assert family in golden.BLOCK_SPECS
    g64, g32 = load_golden(DATA / f"{family}_float64.npz"), load_golden(DATA / f"{family}_float32.npz")
    np.testing.assert_array_equal(g32["x"], g64["x"].astype(np.float32))
    assert relative_error(g32["y"], g64["y"]) <= 1e-5
