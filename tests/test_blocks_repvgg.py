"""RepVGG block: train form == deploy form, against hand values, and against PyTorch's numbers."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import ops
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.common import Activation, ConvAct
from repnp.blocks.repvgg import RepVGGBlock
from repnp.errors import ShapeError
from repnp.testing import assert_reparam_keeps_block, random_input
from repnp.testing import relative_error as _err  # max|a - b| / max|b|, b the reference
from repnp.trace import Trace

DATA = Path(__file__).parent / "data" / "state"  # official PyTorch cases, shared with test_io_npz*


# -- train == deploy ---------------------------------------------------------------------------


def _branch_sum(x, branches):
    """The unfused pre-activation: every branch run on its own, outputs summed."""
    return sum(branch.forward(x) for branch in branches)


@st.composite

def repvgg_configs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    same = draw(st.booleans())
    c_out = c_in if same else groups * draw(st.integers(1, 3))
    return dict(
        in_channels=c_in, out_channels=c_out, groups=groups,
        kernel_size=draw(st.sampled_from([1, 3, 5])),
        stride=draw(st.sampled_from([1, 2])),
        dilation=draw(st.sampled_from([1, 2])),
        extra_padding=draw(st.integers(0, 1)),
        activation=draw(st.sampled_from(["relu", "identity", "relu6"])),
        hw=(draw(st.integers(5, 9)), draw(st.integers(5, 9))),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=20)
@given(cfg=repvgg_configs(), dtype=st.sampled_from([np.float64, np.float32]))
def test_reparameterize_is_exact(cfg, dtype):
    k, d = cfg["kernel_size"], cfg["dilation"]
    block = RepVGGBlock.random(cfg["seed"], cfg["in_channels"], cfg["out_channels"], kernel_size=k,
                               stride=cfg["stride"], dilation=d, groups=cfg["groups"],
                               padding=d * (k // 2) + cfg["extra_padding"],
                               activation=cfg["activation"], dtype=dtype)
    x = random_input((2, cfg["in_channels"]) + cfg["hw"], dtype=dtype, seed=cfg["seed"] + 1)
    deploy = block.reparameterize()
    y_train, y_deploy = block.forward(x), deploy.forward(x)
    assert y_train.dtype == y_deploy.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    # The linear part (before the activation) by the metric; the activated outputs against the
    # same scale (a ReLU may zero a whole small output, and activations are 1-Lipschitz).
    pre = _branch_sum(x, block.branches)
    assert _err(deploy.conv.forward(x), pre) <= tol
    assert np.max(np.abs(y_deploy - y_train)) <= tol * np.max(np.abs(pre))
    # the deploy form is one conv of the KxK size with the block's geometry
    assert isinstance(deploy, ConvAct)
    assert deploy.conv.weight.shape == (cfg["out_channels"], cfg["in_channels"] // cfg["groups"], k, k)
    assert (deploy.conv.stride, deploy.conv.dilation, deploy.conv.groups) == (cfg["stride"], d, cfg["groups"])
    # identity exactly when possible: stride 1, C_in == C_out and 'same' padding
    possible = cfg["stride"] == 1 and cfg["in_channels"] == cfg["out_channels"] and not cfg["extra_padding"]
    assert (block.identity is not None) == possible


def test_random_bn_statistics_are_not_trivial():
    block = RepVGGBlock.random(0, 4, 4)
    for bn in (block.conv_kxk.bn, block.conv_1x1.bn, block.identity):
        assert np.all(bn.mean != 0) and np.all(bn.var != 1)
        assert np.all(bn.gamma != 1) and np.all(bn.beta != 0)


def test_random_weights_are_scaled_by_fan_in():
    # N(0, 1/fan_in): fan_in = 32 * 3 * 3 = 288, so the std is 1/sqrt(288) ~ 0.059
    block = RepVGGBlock.random(3, 32, 64)
    std = block.conv_kxk.conv.weight.std()
    assert abs(std * np.sqrt(288) - 1) < 0.05


def test_same_seed_same_block_and_generator_accepted():
    a, b = RepVGGBlock.random(7, 4, 6), RepVGGBlock.random(np.random.default_rng(7), 4, 6)
    for key, value in a.params().items():
        np.testing.assert_array_equal(value, b.params()[key])


def test_dilation_is_applied_in_the_train_form():
    """The train form must dilate its KxK branch (a known bug of ports drops it)."""
    block = RepVGGBlock.random(0, 3, 3, dilation=2)
    x = random_input((1, 3, 9, 9), seed=1)
    assert block.conv_kxk.conv.dilation == 2 and block.conv_kxk.conv.padding == 2
    kxk, one, ident = block.conv_kxk, block.conv_1x1, block.identity
    # The block's forward written out with the ops, dilation 2 and paddings 2 / 0:
    ref = ops.relu(
        kxk.bn.forward(ops.conv2d(x, kxk.conv.weight, padding=2, dilation=2))
        + one.bn.forward(ops.conv2d(x, one.conv.weight, padding=0))
        + ident.forward(x))
    assert _err(block.forward(x), ref) <= 1e-12
    # ... and dropping the dilation changes the answer a lot:
    undilated = ops.relu(
        kxk.bn.forward(ops.conv2d(x, kxk.conv.weight, padding=1))
        + one.bn.forward(ops.conv2d(x, one.conv.weight, padding=0)) + ident.forward(x))
    assert _err(undilated, ref) > 0.1


def test_eps_is_used_not_hard_coded():
    """BN eps 1e-3 (YOLOv6): fusing as if it were 1e-5 would be wrong by far more than 1e-12."""
    block = RepVGGBlock.random(5, 4, 4, eps=1e-3)
    assert block.conv_kxk.bn.eps == 1e-3
    x = random_input((1, 4, 6, 6), seed=1)
    assert _err(block.reparameterize().forward(x), block.forward(x)) <= 1e-12


# -- hand-computed deploy kernel ----------------------------------------------------------------

def _bn(mean, var, gamma, beta):
    def arr(v):
        return np.array([v], dtype=np.float64)
    return BatchNorm(arr(mean), arr(var), arr(gamma), arr(beta), eps=0.0)


def test_hand_computed_fusion_single_channel():
    """One channel, eps = 0 so that every t = gamma / sqrt(var) is a round number.

    3x3 branch: W = 1 everywhere; BN(mean 1, var 4, gamma 2, beta 0.5): t = 2/2 = 1,
        kernel stays 1, bias = 0.5 - 1 * 1 = -0.5.
    1x1 branch: W = 3; BN(mean 0, var 1, gamma 1, beta 1): t = 1, centre += 3, bias += 1.
    identity: BN(mean 2, var 0.25, gamma 1, beta 0): t = 1/0.5 = 2, centre += 2,
        bias += 0 - 2 * 2 = -4.
    Fused: all ones except the centre 1 + 3 + 2 = 6; bias -0.5 + 1 - 4 = -3.5.
    """
    kxk = ConvBN(Conv2d(np.ones((1, 1, 3, 3)), padding=1), _bn(1, 4, 2, 0.5))
    one = ConvBN(Conv2d(np.full((1, 1, 1, 1), 3.0), padding=0), _bn(0, 1, 1, 1))
    block = RepVGGBlock(kxk, one, _bn(2, 0.25, 1, 0), Activation("identity"))
    deploy = block.reparameterize()
    expected = np.ones((1, 1, 3, 3))
    expected[0, 0, 1, 1] = 6.0
    np.testing.assert_allclose(deploy.conv.weight, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(deploy.conv.bias, [-3.5], rtol=0, atol=1e-15)
    # On the 3x3 image of our worked identity example (1..9) the centre output is
    # sum(X) + 5*5 - 3.5 = 45 + 25 - 3.5 = 66.5
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    assert deploy.forward(x)[0, 0, 1, 1] == pytest.approx(66.5, abs=1e-12)
    assert block.forward(x)[0, 0, 1, 1] == pytest.approx(66.5, abs=1e-12)


# -- trace and params ---------------------------------------------------------------------------

def test_trace_matches_the_onnx_export_op_counts():
    """The official block with identity exports (BN kept) as BN 3, Add 2, Conv 2, Relu 1;
    deployed as Conv 1, Relu 1 (the PyTorch export of the official DingXiaoH/RepVGG block,
    tests/data/onnx/off_repvgg_ident_c10)."""
    block = RepVGGBlock.random(0, 10, 10)
    for form, expected in ((block, {"Conv": 2, "BatchNormalization": 3, "Add": 2, "Relu": 1}),
                           (block.reparameterize(), {"Conv": 1, "Relu": 1})):
        t = Trace()
        out = form.trace(t, t.input((2, 10, 10, 14)))
        counts = {}
        for op in t.ops:
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        assert counts == expected
        assert out.shape == (2, 10, 10, 14)
    t = Trace()
    out = RepVGGBlock.random(0, 6, 10, stride=2).trace(t, t.input((2, 6, 11, 13)))
    assert out.shape == (2, 10, 6, 7)
    conv = t.ops[0]
    assert conv.macs == 2 * 10 * 6 * 7 * 6 * 9 and conv.weight_bytes == 10 * 6 * 9 * 4


def test_params_names():
    block = RepVGGBlock.random(0, 4, 4)
    assert set(block.params()) == {
        f"{b}.{p}" for b in ("conv_kxk", "conv_1x1") for p in
        ("conv.weight", "bn.mean", "bn.var", "bn.gamma", "bn.beta")
    } | {"identity.mean", "identity.var", "identity.gamma", "identity.beta"}
    assert set(block.reparameterize().params("stage1.0.")) == {"stage1.0.conv.weight", "stage1.0.conv.bias"}


def test_reparameterize_returns_a_new_object_and_keeps_the_block():
    assert_reparam_keeps_block(RepVGGBlock.random(0, 4, 4))


# -- bad configurations -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, words", [
    (dict(in_channels=4, out_channels=4, kernel_size=4), ValueError, "odd"),
    (dict(in_channels=4, out_channels=4, kernel_size=0), ValueError, "odd"),
    (dict(in_channels=4, out_channels=6, groups=4), ShapeError, "groups=4"),
    (dict(in_channels=5, out_channels=6, groups=2), ShapeError, "in_channels=5"),
    (dict(in_channels=4, out_channels=4, stride=2, use_identity=True), ValueError, "stride=2"),
    (dict(in_channels=4, out_channels=6, use_identity=True), ValueError, "out_channels=6"),
    (dict(in_channels=4, out_channels=4, padding=0), ValueError, "padding=0"),
    (dict(in_channels=4, out_channels=4, padding=2, use_identity=True), ValueError, "padding=2"),
    (dict(in_channels=4, out_channels=4, activation="tanh"), ValueError, "tanh"),
])
def test_bad_configs_raise_clear_errors(kwargs, error, words):
    c_in, c_out = kwargs.pop("in_channels"), kwargs.pop("out_channels")
    with pytest.raises(error, match=words):
        RepVGGBlock.random(0, c_in, c_out, **kwargs)


def test_misaligned_1x1_branch_is_refused():
    good = RepVGGBlock.random(0, 4, 4)
    one = good.conv_1x1
    shifted = ConvBN(Conv2d(one.conv.weight, padding=1), one.bn)  # 1x1 with padding 1: misaligned
    with pytest.raises(ValueError, match="padding"):
        RepVGGBlock(good.conv_kxk, shifted, good.identity)
    with pytest.raises(ValueError, match="stride 1"):
        RepVGGBlock(RepVGGBlock.random(0, 4, 4, stride=2).conv_kxk,
                    RepVGGBlock.random(0, 4, 4, stride=2).conv_1x1, good.identity)


# -- against the official PyTorch block ---------------------------------------------------------

def _torch_bn(state, prefix, eps):
    return BatchNorm(state[f"{prefix}running_mean"], state[f"{prefix}running_var"],
                     state[f"{prefix}weight"], state[f"{prefix}bias"], eps=eps)


def _load_official_repvgg(case):
    folder = DATA / case
    state = dict(np.load(folder / "train_state.npz", allow_pickle=False))
    meta = json.loads((folder / "meta.json").read_text())
    kw = meta["constructor_kwargs"]
    eps = meta["batchnorm_eps"]
    geo = dict(stride=kw.get("stride", 1), groups=kw.get("groups", 1))
    kxk = ConvBN(Conv2d(state["rbr_dense.conv.weight"], padding=kw["padding"], **geo),
                 _torch_bn(state, "rbr_dense.bn.", eps["rbr_dense.bn"]))
    one = ConvBN(Conv2d(state["rbr_1x1.conv.weight"], padding=kw["padding"] - 1, **geo),
                 _torch_bn(state, "rbr_1x1.bn.", eps["rbr_1x1.bn"]))
    ident = (_torch_bn(state, "rbr_identity.", eps["rbr_identity"])
             if "rbr_identity.weight" in state else None)
    block = RepVGGBlock(kxk, one, ident)
    deploy_state = dict(np.load(folder / "deploy_state.npz", allow_pickle=False))
    return (block, np.load(folder / "input.npy", allow_pickle=False),
            np.load(folder / "output.npy", allow_pickle=False), deploy_state)


@pytest.mark.parametrize("case", ["off_repvgg_ident_c10", "off_repvgg_g2_s2_c12to20"])
def test_matches_official_pytorch_block(case):
    block, x, y_torch, deploy_state = _load_official_repvgg(case)
    assert x.dtype == np.float32
    assert _err(block.forward(x), y_torch) <= 1e-5
    deploy = block.reparameterize()
    assert _err(deploy.forward(x), y_torch) <= 1e-5
    # our fused kernel equals the official converter's, within float32 rounding
    assert _err(deploy.conv.weight, deploy_state["rbr_reparam.weight"]) <= 1e-5
    assert _err(deploy.conv.bias, deploy_state["rbr_reparam.bias"]) <= 1e-5
    # and in float64 the two forms agree to 1e-12
    block64 = RepVGGBlock(*(_cast(getattr(block, f)) for f in ("conv_kxk", "conv_1x1", "identity")))
    x64 = x.astype(np.float64)
    assert _err(block64.reparameterize().forward(x64), block64.forward(x64)) <= 1e-12


def _cast(part):
    if part is None:
        return None
    if isinstance(part, BatchNorm):
        return BatchNorm(*(v.astype(np.float64) for v in (part.mean, part.var, part.gamma, part.beta)),
                         eps=part.eps)
    c = part.conv
    return ConvBN(Conv2d(c.weight.astype(np.float64), None, stride=c.stride, padding=c.padding,
                         dilation=c.dilation, groups=c.groups), _cast(part.bn))
