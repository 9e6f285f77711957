"""MobileOne block and unit, squeeze-excite: train == deploy, hand values, PyTorch's numbers."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import cost
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.common import Activation, ConvAct, Sequential
from repnp.blocks.mobileone import MobileOneBlock, MobileOneUnit
from repnp.blocks.se import SqueezeExcite
from repnp.errors import ShapeError
from repnp.testing import random_input
from repnp.testing import relative_error as _err  # max|a - b| / max|b|, b the reference

DATA = Path(__file__).parent / "data" / "state"  # official PyTorch cases, shared with test_io_npz*




def _branch_sum(x, branches):
    """The unfused pre-activation: every branch run on its own, outputs summed."""
    return sum(branch.forward(x) for branch in branches)


def _op_counts(module, shape):
    """Operator counts by type and the output shape of ``module`` on an input of ``shape``."""
    p = cost.profile(module, shape)
    return p.op_types(), p.ops[-1].op.output_shape


# -- train == deploy ---------------------------------------------------------------------------

@st.composite
def mobileone_configs(draw):
    variant = draw(st.sampled_from(["dense", "depthwise", "pointwise"]))
    c_in = draw(st.integers(1, 5))
    if variant == "depthwise":
        c_out, groups, k = c_in, c_in, draw(st.sampled_from([3, 5]))
    elif variant == "pointwise":
        c_out, groups, k = draw(st.sampled_from([c_in, c_in + 2])), 1, 1
    else:
        c_out, groups, k = draw(st.integers(1, 5)), 1, draw(st.sampled_from([1, 3, 5]))
    return dict(in_channels=c_in, out_channels=c_out, groups=groups, kernel_size=k,
                stride=draw(st.sampled_from([1, 2])), dilation=draw(st.sampled_from([1, 2])),
                num_branches=draw(st.integers(1, 4)), use_scale=draw(st.sampled_from([None, False])),
                hw=(draw(st.integers(4, 8)), draw(st.integers(4, 8))), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=20)
@given(cfg=mobileone_configs(), dtype=st.sampled_from([np.float64, np.float32]))
def test_reparameterize_is_exact(cfg, dtype):
    hw, seed = cfg.pop("hw"), cfg.pop("seed")
    c_in, c_out = cfg.pop("in_channels"), cfg.pop("out_channels")
    block = MobileOneBlock.random(seed, c_in, c_out, dtype=dtype, **cfg)
    x = random_input((2, c_in) + hw, dtype=dtype, seed=seed + 1)
    deploy = block.reparameterize()
    tol = 1e-12 if dtype == np.float64 else 1e-5
    pre = _branch_sum(x, block.branches)
    assert pre.dtype == dtype and deploy.forward(x).dtype == dtype
    assert _err(deploy.conv.forward(x), pre) <= tol
    assert np.max(np.abs(deploy.forward(x) - block.forward(x))) <= tol * np.max(np.abs(pre))
    k = cfg["kernel_size"]
    assert deploy.conv.weight.shape == (c_out, c_in // cfg["groups"], k, k)
    assert len(block.conv_kxk) == cfg["num_branches"]
    assert (block.conv_scale is not None) == (k > 1 and cfg["use_scale"] is None)
    assert (block.skip is not None) == (cfg["stride"] == 1 and c_in == c_out)


@settings(max_examples=10)
@given(c_in=st.sampled_from([16, 32]), c_out=st.sampled_from([16, 24]), stride=st.sampled_from([1, 2]),
       branches=st.integers(1, 3), use_se=st.booleans(), seed=st.integers(0, 2**16))
def test_unit_reparameterize_is_exact(c_in, c_out, stride, branches, use_se, seed):
    unit = MobileOneUnit.random(seed, c_in, c_out, stride=stride, num_branches=branches, use_se=use_se)
    x = random_input((1, c_in, 6, 5), seed=seed)
    deploy = unit.reparameterize()
    assert isinstance(deploy, Sequential) and len(deploy) == 2
    assert deploy[0].conv.groups == c_in and deploy[1].conv.weight.shape == (c_out, c_in, 1, 1)
    assert _err(deploy.forward(x), unit.forward(x)) <= 1e-12


def test_s0_style_block_with_four_branches_float32():
    block = MobileOneBlock.random(11, 48, 48, groups=48, num_branches=4, dtype=np.float32)
    x = random_input((1, 48, 14, 14), dtype=np.float32, seed=1)
    assert _err(block.reparameterize().forward(x), block.forward(x)) <= 1e-5


def test_random_bn_statistics_are_not_trivial():
    block = MobileOneBlock.random(0, 4, 4, num_branches=2)
    for bn in [b.bn for b in block.conv_kxk] + [block.conv_scale.bn, block.skip]:
        assert np.all(bn.mean != 0) and np.all(bn.var != 1)
        assert np.all(bn.gamma != 1) and np.all(bn.beta != 0)


# -- hand-computed fusion -----------------------------------------------------------------------

def _bn(mean, var, gamma, beta):
    def arr(v):
        return np.array([v], dtype=np.float64)
    return BatchNorm(arr(mean), arr(var), arr(gamma), arr(beta), eps=0.0)


def test_hand_computed_fusion_two_branches_scale_and_skip():
    """One channel, eps = 0.

    branch 0: W = 1 (3x3), BN(mean 0, var 1, gamma 1, beta 0): kernel 1, bias 0.
    branch 1: W = 2 (3x3), BN(mean 1, var 4, gamma 1, beta 1): t = 0.5, kernel 1, bias 1 - 0.5 = 0.5.
    scale:    W = 4 (1x1), BN(mean 0, var 16, gamma 1, beta 0): t = 0.25, centre += 1.
    skip:     BN(mean 3, var 1, gamma 2, beta -1): t = 2, centre += 2, bias += -1 - 6 = -7.
    Fused: all 2 except the centre 2 + 1 + 2 = 5; bias 0 + 0.5 + 0 - 7 = -6.5.
    """
    b0 = ConvBN(Conv2d(np.ones((1, 1, 3, 3)), padding=1), _bn(0, 1, 1, 0))
    b1 = ConvBN(Conv2d(np.full((1, 1, 3, 3), 2.0), padding=1), _bn(1, 4, 1, 1))
    scale = ConvBN(Conv2d(np.full((1, 1, 1, 1), 4.0)), _bn(0, 16, 1, 0))
    block = MobileOneBlock((b0, b1), scale, _bn(3, 1, 2, -1), activation=Activation("identity"))
    deploy = block.reparameterize()
    expected = np.full((1, 1, 3, 3), 2.0)
    expected[0, 0, 1, 1] = 5.0
    np.testing.assert_allclose(deploy.conv.weight, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(deploy.conv.bias, [-6.5], rtol=0, atol=1e-15)
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    # centre: 2 * 45 + 3 * 5 - 6.5 = 98.5
    assert block.forward(x)[0, 0, 1, 1] == pytest.approx(98.5, abs=1e-12)


# -- squeeze-excite -----------------------------------------------------------------------------

def test_squeeze_excite_hand_values():
    """C = 2, R = 1: reduce w = [1, 1], b = 0; expand w = [0, 0], b = [0, ln 3].

    The gate is sigmoid(expand(relu(...))) = sigmoid([0, ln 3]) = [1/2, 3/4], whatever x is.
    """
    reduce = Conv2d(np.ones((1, 2, 1, 1)), np.zeros(1))
    expand = Conv2d(np.zeros((2, 1, 1, 1)), np.array([0.0, np.log(3.0)]))
    se = SqueezeExcite(reduce, expand)
    x = random_input((1, 2, 3, 3), seed=1)
    y = se.forward(x)
    np.testing.assert_allclose(y[0, 0], 0.5 * x[0, 0], rtol=1e-15)
    np.testing.assert_allclose(y[0, 1], 0.75 * x[0, 1], rtol=1e-15)


def test_squeeze_excite_uses_the_global_mean():
    se = SqueezeExcite.random(0, 16)
    assert se.reduce.weight.shape == (1, 16, 1, 1)  # int(16 * 0.0625) = 1, as MobileOne
    x = random_input((2, 16, 5, 4), seed=1)
    s = x.mean(axis=(2, 3))
    h = np.maximum(s @ se.reduce.weight[:, :, 0, 0].T + se.reduce.bias, 0)
    gate = 1 / (1 + np.exp(-(h @ se.expand.weight[:, :, 0, 0].T + se.expand.bias)))
    assert _err(se.forward(x), x * gate[:, :, None, None]) <= 1e-14


def test_block_with_se_keeps_it_after_the_fused_conv():
    block = MobileOneBlock.random(3, 32, 32, num_branches=2, use_se=True)
    deploy = block.reparameterize()
    assert isinstance(deploy, ConvAct) and deploy.se is block.se
    x = random_input((1, 32, 5, 5), seed=1)
    assert _err(deploy.forward(x), block.forward(x)) <= 1e-12
    counts, _ = _op_counts(deploy, (1, 32, 5, 5))
    assert counts == {"Conv": 3, "GlobalAveragePool": 1, "Relu": 2, "Sigmoid": 1, "Mul": 1}


# -- trace, params ------------------------------------------------------------------------------

def test_trace_matches_the_onnx_export_op_counts():
    """The official depthwise block with 3 branches exports (BN kept) as BN 5, Add 4, Conv 4,
    Relu 1, deployed as Conv 1, Relu 1 (the PyTorch export of the official apple/ml-mobileone
    block, tests/data/onnx/off_mobileone_dw_b3_c12)."""
    block = MobileOneBlock.random(0, 12, 12, groups=12, num_branches=3)
    counts, out = _op_counts(block, (2, 12, 10, 14))
    assert counts == {"Conv": 4, "BatchNormalization": 5, "Add": 4, "Relu": 1}
    assert out == (2, 12, 10, 14)
    counts, _ = _op_counts(block.reparameterize(), (2, 12, 10, 14))
    assert counts == {"Conv": 1, "Relu": 1}


def test_params_names():
    block = MobileOneBlock.random(0, 4, 4, num_branches=2)
    names = set(block.params())
    assert {"conv_kxk.0.conv.weight", "conv_kxk.1.bn.var", "conv_scale.conv.weight", "skip.gamma"} <= names
    unit = MobileOneUnit.random(0, 16, 32, use_se=True)
    assert {"dw.conv_kxk.0.conv.weight", "pw.conv_kxk.0.bn.beta", "dw.se.reduce.weight"} <= set(unit.params())
    assert set(unit.reparameterize().params()) == {
        "dw.conv.weight", "dw.conv.bias", "pw.conv.weight", "pw.conv.bias",
        "dw.se.reduce.weight", "dw.se.reduce.bias", "dw.se.expand.weight", "dw.se.expand.bias",
        "pw.se.reduce.weight", "pw.se.reduce.bias", "pw.se.expand.weight", "pw.se.expand.bias"}


# -- bad configurations -------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, error, words", [
    ((4, 4), dict(kernel_size=2), ValueError, "odd"),
    ((4, 6), dict(groups=4), ShapeError, "groups=4"),
    ((4, 4), dict(stride=2, use_skip=True), ValueError, "stride=2"),
    ((4, 6), dict(use_skip=True), ValueError, "out_channels=6"),
    ((4, 4), dict(num_branches=0), ValueError, "num_branches"),
    ((8, 8), dict(use_se=True), ValueError, "reduced channel"),
])
def test_bad_configs_raise_clear_errors(args, kwargs, error, words):
    with pytest.raises(error, match=words):
        MobileOneBlock.random(0, *args, **kwargs)


def test_bad_unit_and_mismatched_branches():
    dw = MobileOneBlock.random(0, 4, 4, groups=4)
    with pytest.raises(ShapeError, match="1x1"):
        MobileOneUnit(dw, MobileOneBlock.random(0, 4, 4, kernel_size=3))
    with pytest.raises(ShapeError, match="depthwise"):
        MobileOneUnit(MobileOneBlock.random(0, 4, 4), MobileOneBlock.random(0, 4, 4, kernel_size=1))
    other = MobileOneBlock.random(0, 4, 4, kernel_size=5).conv_kxk[0]
    with pytest.raises(ShapeError, match="conv_kxk\\[1\\]"):
        MobileOneBlock((MobileOneBlock.random(0, 4, 4).conv_kxk[0], other))


# -- against the official PyTorch block ---------------------------------------------------------

def _torch_bn(state, prefix, eps):
    return BatchNorm(state[f"{prefix}running_mean"], state[f"{prefix}running_var"],
                     state[f"{prefix}weight"], state[f"{prefix}bias"], eps=eps)


@pytest.mark.parametrize("case", ["off_mobileone_dw_b3_c12", "off_mobileone_pw_b2_c10"])
def test_matches_official_pytorch_block(case):
    folder = DATA / case
    state = dict(np.load(folder / "train_state.npz", allow_pickle=False))
    meta = json.loads((folder / "meta.json").read_text())
    kw, eps = meta["constructor_kwargs"], meta["batchnorm_eps"]
    geo = dict(stride=kw.get("stride", 1), groups=kw.get("groups", 1))
    convs = tuple(ConvBN(Conv2d(state[f"rbr_conv.{i}.conv.weight"], padding=kw["padding"], **geo),
                         _torch_bn(state, f"rbr_conv.{i}.bn.", eps[f"rbr_conv.{i}.bn"]))
                  for i in range(kw["num_conv_branches"]))
    scale = (ConvBN(Conv2d(state["rbr_scale.conv.weight"], padding=0, **geo),
                    _torch_bn(state, "rbr_scale.bn.", eps["rbr_scale.bn"]))
             if "rbr_scale.conv.weight" in state else None)
    skip = _torch_bn(state, "rbr_skip.", eps["rbr_skip"]) if "rbr_skip.weight" in state else None
    block = MobileOneBlock(convs, scale, skip)
    x = np.load(folder / "input.npy", allow_pickle=False)
    y_torch = np.load(folder / "output.npy", allow_pickle=False)
    assert _err(block.forward(x), y_torch) <= 1e-5
    deploy = block.reparameterize()
    assert _err(deploy.forward(x), y_torch) <= 1e-5
    deploy_state = np.load(folder / "deploy_state.npz", allow_pickle=False)
    assert _err(deploy.conv.weight, deploy_state["reparam_conv.weight"]) <= 1e-5
    assert _err(deploy.conv.bias, deploy_state["reparam_conv.bias"]) <= 1e-5
