"""The lineage blocks (a)-(c) of MobileNetV2's Fig. 2 (Sandler et al., CVPR 2018) and the
depthwise -> pointwise merge (repnp.blocks.separable)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import ops
from repnp.blocks.base import Conv2d
from repnp.blocks.separable import (
    DepthwiseSeparableBlock,
    LinearBottleneckBlock,
    RegularConvBlock,
    merge_depthwise_pointwise,
)
from repnp.errors import ShapeError
from repnp.testing import assert_reparam_equivalent, assert_reparam_keeps_block, random_input, relative_error
from repnp.trace import Trace

BLOCKS = (RegularConvBlock, DepthwiseSeparableBlock, LinearBottleneckBlock)


def _op_types(block, shape):
    t = Trace()
    block.trace(t, t.input(shape))
    return [op.op_type for op in t.ops]


# ----------------------------------------------------------------------------
# merge_depthwise_pointwise: hand-typed golden values, then the property
# ----------------------------------------------------------------------------

def test_merge_depthwise_pointwise_dense_by_hand():
    # dw: 2 channels, 1x1 kernels 2 and 3, biases 1 and -1; pw: one output, weights 4 and 5, bias 0.5.
    dw = (np.array([2.0, 3.0]).reshape(2, 1, 1, 1), np.array([1.0, -1.0]))
    pw = (np.array([4.0, 5.0]).reshape(1, 2, 1, 1), np.array([0.5]))
    kernel, bias = merge_depthwise_pointwise(dw, pw)
    # W = [4*2, 5*3]; b = 4*1 + 5*(-1) + 0.5
    np.testing.assert_array_equal(kernel, np.array([8.0, 15.0]).reshape(1, 2, 1, 1))
    np.testing.assert_array_equal(bias, [-0.5])


def test_merge_depthwise_pointwise_grouped_by_hand():
    # Same dw; pw with 2 groups: output 0 reads dw channel 0 (weight 4), output 1 reads channel 1 (weight 5).
    dw = (np.array([2.0, 3.0]).reshape(2, 1, 1, 1), np.array([1.0, -1.0]))
    pw = (np.array([4.0, 5.0]).reshape(2, 1, 1, 1), np.array([0.5, 0.25]))
    kernel, bias = merge_depthwise_pointwise(dw, pw, groups=2)
    np.testing.assert_array_equal(kernel, np.array([8.0, 15.0]).reshape(2, 1, 1, 1))
    np.testing.assert_array_equal(bias, [4.5, -4.75])


@given(m_per=st.integers(1, 3), groups=st.integers(1, 3), o_per=st.integers(1, 3), k=st.sampled_from([1, 3, 5]),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), size=st.integers(5, 8), seed=st.integers(0, 2**16))
@settings(max_examples=20)
def test_merge_depthwise_pointwise_equals_the_two_convs(m_per, groups, o_per, k, stride, dilation, size, seed):
    rng = np.random.default_rng(seed)
    m, o = m_per * groups, o_per * groups
    dk, db = rng.standard_normal((m, 1, k, k)) / k, rng.standard_normal(m)
    qk, qb = rng.standard_normal((o, m_per, 1, 1)) / np.sqrt(m_per), rng.standard_normal(o)
    x = rng.standard_normal((2, m, size, size))
    pad = dilation * (k // 2)
    ref = ops.conv2d(ops.conv2d(x, dk, db, stride=stride, padding=pad, dilation=dilation, groups=m),
                     qk, qb, groups=groups)
    kernel, bias = merge_depthwise_pointwise((dk, db), (qk, qb), groups=groups)
    assert kernel.shape == (o, m_per, k, k)  # grouped like the pointwise, not dense
    got = ops.conv2d(x, kernel, bias, stride=stride, padding=pad, dilation=dilation, groups=groups)
    assert relative_error(got, ref) <= 1e-12


def test_merge_depthwise_pointwise_keeps_float32():
    rng = np.random.default_rng(0)
    dk = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    qk = rng.standard_normal((6, 2, 1, 1)).astype(np.float32)
    kernel, bias = merge_depthwise_pointwise((dk, None), (qk, None), groups=2)
    assert kernel.dtype == np.float32 and bias.dtype == np.float32


@pytest.mark.parametrize("dw_shape, pw_shape, groups", [
    ((4, 2, 3, 3), (6, 4, 1, 1), 1),    # first conv not depthwise
    ((4, 1, 3, 3), (6, 4, 3, 3), 1),    # second conv not 1x1
    ((4, 1, 3, 3), (6, 4, 1, 1), 2),    # pointwise reads M/groups = 2 per group, kernel says 4
    ((4, 1, 3, 3), (5, 2, 1, 1), 2),    # groups does not divide O
])
def test_merge_depthwise_pointwise_rejects_bad_shapes(dw_shape, pw_shape, groups):
    with pytest.raises(ShapeError, match="kernel"):
        merge_depthwise_pointwise((np.zeros(dw_shape), None), (np.zeros(pw_shape), None), groups=groups)


# ----------------------------------------------------------------------------
# blocks: train == deploy, float64 and float32
# ----------------------------------------------------------------------------

@given(block=st.sampled_from(BLOCKS), c_in=st.integers(1, 6), c_out=st.integers(1, 6),
       k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2), h=st.integers(3, 7), w=st.integers(3, 7),
       act=st.sampled_from(["relu", "relu6", "hardswish"]), seed=st.integers(0, 2**16))
def test_train_equals_deploy_float64(block, c_in, c_out, k, stride, h, w, act, seed):
    b = block.random(seed, c_in, c_out, kernel_size=k, stride=stride, activation=act)
    assert_reparam_equivalent(b, random_input((2, c_in, h, w), seed=seed))


@given(block=st.sampled_from(BLOCKS), c_in=st.integers(1, 6), c_out=st.integers(1, 6),
       stride=st.integers(1, 2), seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_train_equals_deploy_float32(block, c_in, c_out, stride, seed):
    b = block.random(seed, c_in, c_out, stride=stride, dtype=np.float32)
    x = random_input((2, c_in, 6, 5), dtype=np.float32, seed=seed)
    assert b.forward(x).dtype == np.float32
    assert_reparam_equivalent(b, x)


@given(c_in=st.integers(1, 6), c_out=st.integers(1, 6), m=st.integers(1, 4), k=st.sampled_from([1, 3, 5]),
       stride=st.integers(1, 2), seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float64, np.float32]))
@settings(max_examples=20)
def test_linear_bottleneck_merged_equals_train(c_in, c_out, m, k, stride, seed, dtype):
    b = LinearBottleneckBlock.random(seed, c_in, c_out, bottleneck_channels=m, kernel_size=k, stride=stride,
                                     dtype=dtype)
    x = random_input((2, c_in, 7, 6), dtype=dtype, seed=seed)
    merged = b.reparameterize(merge_pointwise=True)
    assert merged.depthwise is None
    assert merged.expand.weight.shape == (c_out, m, k, k) and merged.expand.groups == 1  # dense KxK
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert relative_error(merged.forward(x), b.forward(x)) <= tol
    # idempotent: a deploy form re-parameterizes to itself
    again = merged.reparameterize(merge_pointwise=True)
    assert relative_error(again.forward(x), b.forward(x)) <= tol


def test_fusion_uses_bn_eps():
    # eps is the BN's, not a constant: with eps = 1e-3 the folded block still matches the train form.
    b = DepthwiseSeparableBlock.random(3, 4, 5, eps=1e-3)
    assert b.depthwise.bn.eps == 1e-3
    assert_reparam_equivalent(b, random_input((2, 4, 5, 5), seed=3))


# ----------------------------------------------------------------------------
# structure: where the nonlinearities are
# ----------------------------------------------------------------------------

def test_op_lists_show_the_nonlinearities():
    shape = (1, 8, 6, 6)
    assert _op_types(RegularConvBlock.random(0, 8, 8), shape) == ["Conv", "BatchNormalization", "Relu"]
    assert _op_types(DepthwiseSeparableBlock.random(0, 8, 8), shape) == [
        "Conv", "BatchNormalization", "Relu", "Conv", "BatchNormalization", "Relu"]
    # (c): one activation (ReLU6 = Clip), after the reduce; the depthwise and the expand are linear.
    assert _op_types(LinearBottleneckBlock.random(0, 8, 8), shape) == [
        "Conv", "BatchNormalization", "Clip", "Conv", "BatchNormalization", "Conv", "BatchNormalization"]
    assert _op_types(LinearBottleneckBlock.random(0, 8, 8).reparameterize(merge_pointwise=True), shape) == [
        "Conv", "Clip", "Conv"]


def test_linear_bottleneck_output_is_linear_and_reduce_is_clipped():
    b = LinearBottleneckBlock.random(1, 8, 8)
    x = 3 * random_input((2, 8, 6, 6), seed=1)
    y = b.forward(x)
    assert y.min() < 0  # no activation after the expand
    h = b.reduce.forward(x)
    assert h.max() > 6 or h.min() < 0  # so the ReLU6 after the reduce does clip something here
    manual = b.expand.forward(b.depthwise.forward(np.clip(h, 0, 6)))
    np.testing.assert_array_equal(y, manual)


def test_mobilenetv1_output_is_rectified():
    y = DepthwiseSeparableBlock.random(2, 4, 6).forward(random_input((2, 4, 6, 6), seed=2))
    assert y.min() == 0 and y.max() > 0


def test_shapes_and_properties():
    b = LinearBottleneckBlock.random(0, 12, 16, stride=2)
    assert (b.in_channels, b.bottleneck_channels, b.out_channels, b.stride) == (12, 4, 16, 2)
    assert b.forward(random_input((2, 12, 7, 7), seed=0)).shape == (2, 16, 4, 4)
    d = DepthwiseSeparableBlock.random(0, 3, 5)
    assert (d.in_channels, d.out_channels) == (3, 5)
    assert sorted(d.params()) == sorted(
        [f"{p}.{q}" for p in ("depthwise.conv", "pointwise.conv") for q in ("weight",)]
        + [f"{p}.bn.{q}" for p in ("depthwise", "pointwise") for q in ("mean", "var", "gamma", "beta")])
    dep = d.reparameterize()
    assert isinstance(dep.depthwise, Conv2d) and dep.depthwise.bias is not None
    assert sorted(dep.params()) == ["depthwise.bias", "depthwise.weight", "pointwise.bias", "pointwise.weight"]


@pytest.mark.parametrize("block", BLOCKS)
def test_reparameterize_does_not_mutate(block):
    assert_reparam_keeps_block(block.random(0, 3, 4))


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    b = DepthwiseSeparableBlock.random(0, 4, 4)
    with pytest.raises(ShapeError, match=r"C = 4.*\(2, 3, 5, 5\)"):
        b.forward(np.zeros((2, 3, 5, 5)))
    with pytest.raises(ValueError, match="kernel_size"):
        RegularConvBlock.random(0, 3, 3, kernel_size=4)
    with pytest.raises(ValueError, match="activation"):
        RegularConvBlock.random(0, 3, 3, activation="tanh")
    with pytest.raises(ShapeError, match="depthwise"):
        DepthwiseSeparableBlock(RegularConvBlock.random(0, 4, 4).conv, b.pointwise)
    with pytest.raises(ShapeError, match="expand"):
        c = LinearBottleneckBlock.random(0, 8, 8)
        LinearBottleneckBlock(c.reduce, c.depthwise, RegularConvBlock.random(0, 3, 8, kernel_size=1).conv)
