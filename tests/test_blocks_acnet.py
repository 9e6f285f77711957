"""ACNet's ACBlock: dxd + 1xd + dx1 conv-BN -> one dxd conv."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repnp import ops
from repnp.blocks.acnet import ACBlock, asymmetric_geometry
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.errors import ShapeError
from repnp.testing import assert_reparam_equivalent, assert_reparam_keeps_block, random_input, relative_error
from repnp.trace import Trace

OFFICIAL = Path(__file__).parent / "data" / "state"  # official PyTorch cases, shared with test_io_npz*


def unit_bn(channels, dtype=np.float64):
    """A BN that is the identity (eps 0, var 1): kernels pass through unchanged."""
    one, zero = np.ones(channels, dtype), np.zeros(channels, dtype)
    return BatchNorm(zero, one, one, zero, eps=0.0)


def test_hand_typed_skeleton_kernel():
    # 1 -> 1 channel, K = 3, padding 1: the Kx1 column goes on the centre column, the 1xK row on
    # the centre row, and the centre tap gets both: [[0, 1, 0], [4, 2+5, 6], [0, 3, 0]].
    square = ConvBN(Conv2d(np.zeros((1, 1, 3, 3)), padding=1), unit_bn(1))
    ver = ConvBN(Conv2d(np.array([1.0, 2, 3]).reshape(1, 1, 3, 1), padding=(1, 0)), unit_bn(1))
    hor = ConvBN(Conv2d(np.array([4.0, 5, 6]).reshape(1, 1, 1, 3), padding=(0, 1)), unit_bn(1))
    deploy = ACBlock(square, ver, hor).reparameterize()
    np.testing.assert_array_equal(deploy.weight[0, 0], [[0, 1, 0], [4, 7, 6], [0, 3, 0]])
    np.testing.assert_array_equal(deploy.bias, [0.0])
    assert ops.normalize_padding(deploy.padding) == (1, 1, 1, 1)


def test_geometry_hand_checked():
    # K=3, P=1: the usual layout (official: hor padding [P - K//2, P], ver [P, P - K//2]).
    g = asymmetric_geometry(3, 1, 1)
    assert g["ver_padding"] == (1, 0) and g["hor_padding"] == (0, 1)
    assert g["ver_crop"] == g["hor_crop"] == 0
    assert g["ver_offset"] == (0, 1) and g["hor_offset"] == (1, 0)
    # K=5, P=1: 1 - 2 < 0, so the asymmetric branches crop 1 pixel instead (official CropLayer).
    g = asymmetric_geometry(5, 1, 1)
    assert g["ver_padding"] == (1, 0) and g["ver_crop"] == 1 and g["hor_crop"] == 1
    assert g["ver_offset"] == (0, 2) and g["hor_offset"] == (2, 0)
    # Dilation 2, K=3, P=2: the centre tap is d*(K//2) = 2 away, so the 1xK branch needs H
    # padding 0 (the official code's P - K//2 = 1 would misalign it and change the output size).
    g = asymmetric_geometry(3, 2, 2)
    assert g["hor_padding"] == (0, 2) and g["ver_padding"] == (2, 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("k, padding, stride, dilation, groups", [
    (3, 1, 1, 1, 1), (3, 0, 2, 1, 2), (5, 1, 1, 1, 1), (5, 3, 2, 2, 2), (3, (0, 2), 1, 1, 1),
    (7, None, 3, 1, 1), (1, 0, 1, 1, 1),
])
def test_train_equals_deploy(k, padding, stride, dilation, groups, dtype):
    block = ACBlock.random(3, 4, 6, kernel_size=k, padding=padding, stride=stride, dilation=dilation,
                           groups=groups, dtype=dtype)
    x = random_input((2, 4, 11, 13), dtype=dtype, seed=0)
    err = assert_reparam_equivalent(block, x)
    assert err <= (1e-12 if dtype == np.float64 else 1e-5)
    assert block.reparameterize().weight.dtype == dtype


@given(
    k=st.sampled_from([1, 3, 5]),
    extra_pad=st.integers(-2, 2),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    cin=st.integers(1, 2),
    cout=st.integers(1, 2),
    hw=st.tuples(st.integers(9, 12), st.integers(9, 12)),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float64, np.float32]),
)
def test_train_equals_deploy_property(k, extra_pad, stride, dilation, groups, cin, cout, hw, seed, dtype):
    padding = max(dilation * (k // 2) + extra_pad, 0)      # below, at and above "same", crops included
    block = ACBlock.random(seed, cin * groups, cout * groups, kernel_size=k, padding=padding, stride=stride,
                           dilation=dilation, groups=groups, dtype=dtype)
    x = random_input((2, cin * groups) + hw, dtype=dtype, seed=seed)
    assert_reparam_equivalent(block, x)


def test_random_bn_statistics_are_not_trivial():
    block = ACBlock.random(0, 3, 5)
    for branch in (block.square, block.ver, block.hor):
        bn = branch.bn
        assert np.all(bn.mean != 0) and np.all(bn.var != 1) and np.all(bn.gamma != 1) and np.all(bn.beta != 0)


def test_eps_is_used():
    block = ACBlock.random(1, 3, 4, eps=1e-3)
    x = random_input((1, 3, 7, 7), seed=1)
    assert_reparam_equivalent(block, x)
    assert block.square.bn.eps == 1e-3


def test_reparameterize_returns_new_object_and_keeps_block():
    block = ACBlock.random(2, 2, 2)
    deploy = assert_reparam_keeps_block(block)
    assert isinstance(deploy, Conv2d) and deploy is not block.square.conv


def test_params_names():
    names = set(ACBlock.random(0, 2, 2).params())
    for branch in ("square", "ver", "hor"):
        assert {f"{branch}.conv.weight", f"{branch}.bn.mean", f"{branch}.bn.var", f"{branch}.bn.gamma",
                f"{branch}.bn.beta"} <= names
    assert len(names) == 15


def test_trace_ops_and_macs():
    block = ACBlock.random(0, 4, 6, kernel_size=3, padding=1)
    t = Trace()
    y = block.trace(t, t.input((1, 4, 8, 8)))
    assert [op.op_type for op in t.ops] == ["Conv", "BatchNormalization", "Conv", "BatchNormalization",
                                           "Add", "Conv", "BatchNormalization", "Add"]
    assert y.shape == (1, 6, 8, 8)
    assert [op.macs for op in t.ops if op.op_type == "Conv"] == [6 * 64 * 4 * 9, 6 * 64 * 4 * 3, 6 * 64 * 4 * 3]
    td = Trace()
    yd = block.reparameterize().trace(td, td.input((1, 4, 8, 8)))
    assert [op.op_type for op in td.ops] == ["Conv"] and yd.shape == y.shape
    assert td.ops[0].macs == 6 * 64 * 4 * 9


def test_trace_crop_records_slice():
    block = ACBlock.random(0, 2, 2, kernel_size=5, padding=1)
    t = Trace()
    block.trace(t, t.input((1, 2, 9, 9)))
    slices = [op for op in t.ops if op.op_type == "Slice"]
    assert [op.output_shape for op in slices] == [(1, 2, 9, 7), (1, 2, 7, 9)]


@pytest.mark.parametrize("kwargs, error", [
    ({"kernel_size": 4}, ValueError),
    ({"kernel_size": 3, "groups": 3}, ShapeError),
    ({"kernel_size": 3, "padding": -1}, ShapeError),
])
def test_bad_configs(kwargs, error):
    with pytest.raises(error):
        ACBlock.random(0, 4, 6, **kwargs)


def test_misaligned_branch_padding_is_refused():
    block = ACBlock.random(0, 2, 2)
    bad_hor = ConvBN(Conv2d(block.hor.conv.weight, padding=(1, 1)), block.hor.bn)
    with pytest.raises(ValueError, match="does not align"):
        ACBlock(block.square, block.ver, bad_hor)


def test_wrong_input_channels():
    with pytest.raises(ShapeError, match="x must be"):
        ACBlock.random(0, 2, 2).forward(np.zeros((1, 3, 5, 5)))


def _official_bn(state, name, eps):
    return BatchNorm(state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                     state[f"{name}.bias"], eps=eps)


def test_official_acblock_state_dict():
    """The official ACBlock (k=5, s=2, p=2) loaded by name: same output as PyTorch, same deploy conv."""
    case = OFFICIAL / "off_acb_k5_s2_c6to12"
    meta = json.loads((case / "meta.json").read_text())
    kw = meta["constructor_kwargs"]
    with np.load(case / "train_state.npz", allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    with np.load(case / "deploy_state.npz", allow_pickle=False) as f:
        deploy_state = {k: f[k] for k in f.files}
    k, p, s = kw["kernel_size"], kw["padding"], kw["stride"]
    geo = asymmetric_geometry(k, p, 1)
    eps = meta["batchnorm_eps"]

    def branch(name, bn_name, padding):
        return ConvBN(Conv2d(state[f"{name}.weight"], stride=s, padding=padding),
                      _official_bn(state, bn_name, eps[bn_name]))

    block = ACBlock(branch("square_conv", "square_bn", p), branch("ver_conv", "ver_bn", geo["ver_padding"]),
                    branch("hor_conv", "hor_bn", geo["hor_padding"]))
    x, ref = np.load(case / "input.npy"), np.load(case / "output.npy")
    assert relative_error(block.forward(x), ref) <= 1e-5
    deploy = block.reparameterize()
    assert relative_error(deploy.weight, deploy_state["fused_conv.weight"]) <= 1e-5
    assert relative_error(deploy.bias, deploy_state["fused_conv.bias"]) <= 1e-5
    assert relative_error(deploy.forward(x), ref) <= 1e-5
