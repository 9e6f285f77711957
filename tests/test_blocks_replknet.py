"""RepLKNet (Ding et al., CVPR 2022): ReparamLargeKernelConv, the official ``replknet.py`` names.

repnp's :class:`~repnp.blocks.ReparamLargeKernelConv` (also timm FastViT's) is the same
algebra: the ``replknet`` scheme maps the official ``lkb_origin`` / ``small_conv`` onto it and
writes ``lkb_reparam``. The real cases of ``tests/data/large_kernels`` (official code, PyTorch;
a depthwise 13x13 + 5x5, and a grouped, strided 7x7 + 3x3 with 6 -> 12 channels) convert to
exactly the official deploy state dict, reproduce PyTorch's output, and their ONNX exports
(both styles) convert to the official deploy graph's single Conv.
"""

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from official_cases import load_case

from repnp import ops
from repnp.blocks import ReparamLargeKernelConv
from repnp.io import convert_onnx, convert_state, scheme_names
from repnp.io.npz.convert import detect_scheme, find_blocks
from repnp.io.onnx.check import run_model
from repnp.testing import load_golden, relative_error

LK = Path(__file__).parent / "data" / "large_kernels"
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
CASES = ["off_replknet_dw13_s5_c8", "off_replknet_g2_s2_k7_c6to12"]


def _case(name):
    return load_case(LK / "state" / name)


@pytest.mark.parametrize("case", CASES)
def test_official_state_converts_to_exactly_the_official_deploy_state(case):
    train, deploy, meta, x, y = _case(case)
    assert "replknet" in scheme_names() and detect_scheme(train) == meta["scheme"] == "replknet"
    out, report = convert_state(train)
    assert report.passed and report.max_error <= 1e-5
    assert list(out) == list(deploy) == ["lkb_reparam.weight", "lkb_reparam.bias"]
    for key, ref in deploy.items():
        assert out[key].dtype == ref.dtype == np.float32 and out[key].shape == ref.shape
        assert relative_error(out[key], ref) <= 1e-5, key
    fwd = meta["forward"]
    got = ops.conv2d(x, out["lkb_reparam.weight"], out["lkb_reparam.bias"], stride=fwd["stride"],
                     padding=fwd["padding"], groups=fwd["groups"])
    assert relative_error(got, y) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_official_train_form_reproduces_torch(case):
    train, _, meta, x, y = _case(case)
    (found,) = find_blocks(train)
    kw = meta["constructor_kwargs"]
    block = ReparamLargeKernelConv.from_params(found.params, stride=kw["stride"], groups=kw["groups"])
    assert relative_error(block.forward(x), y) <= 1e-5
    assert relative_error(block.reparameterize().forward(x), y) <= 1e-5


@pytest.mark.parametrize("style", ["train.onnx", "train_keepbn.onnx"])
@pytest.mark.parametrize("case", CASES)
def test_official_export_converts_to_one_conv(case, style):
    d = LK / "onnx" / case
    model, report = convert_onnx(str(d / style))
    assert report.check["passed"]
    deploy = collections.Counter(n.op_type for n in onnx.load(str(d / "deploy.onnx")).graph.node)
    assert collections.Counter(n.op_type for n in model.graph.node) == deploy == {"Conv": 1}
    y = run_model(model, {"input": np.load(d / "input.npy")})[0][0]
    assert relative_error(y, np.load(d / "output.npy")) <= 1e-4


def test_golden_reproduces_with_plain_ops():
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        g = load_golden(GOLDEN / f"replknet_{dtype}.npz")
        p = {k[len("train."):]: v for k, v in g.items() if k.startswith("train.")}
        x = g["x"].astype(np.float64)
        y = 0
        for prefix, pad in (("large_conv.", 3), ("small_conv.", 1)):
            conv = ops.conv2d(x, p[prefix + "conv.weight"].astype(np.float64), padding=pad, groups=4)
            y = y + ops.batch_norm(conv, *(p[prefix + "bn." + n].astype(np.float64)
                                           for n in ("mean", "var", "gamma", "beta")), eps=1e-5)
        assert relative_error(y, g["y"]) <= tol
        fused = ops.conv2d(x, g["deploy.conv.weight"].astype(np.float64), g["deploy.conv.bias"].astype(np.float64),
                           padding=3, groups=4)
        assert relative_error(fused, y) <= tol
