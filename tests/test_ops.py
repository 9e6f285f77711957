"""Unit tests of ``repnp.ops`` with hand-computed values.

Every expected array below was worked out by hand (the working is in the comments) so that a
reader can check it without running anything. Conformance against independent engines
(ONNX backend cases, onnxruntime, scipy) lives in ``test_ops_conformance.py``.
"""

import re

import numpy as np
import pytest

from repnp import ops
from repnp.errors import ShapeError

F32, F64 = np.float32, np.float64


def err(a, b):
    """The project's one metric: max|a - b| / max|b| (b the reference)."""
    a, b = np.asarray(a, dtype=F64), np.asarray(b, dtype=F64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


# ----------------------------------------------------------------------------
# conv2d, hand-computed
# ----------------------------------------------------------------------------

def test_conv2d_stride2_padding1_box_filter():
    # x = 0..15 on a 4x4 grid; 3x3 box filter, stride 2, padding 1 -> 2x2 output.
    # y[0,0]: rows -1..1, cols -1..1 -> x[0:2, 0:2] = 0+1+4+5 = 10
    # y[0,1]: rows -1..1, cols 1..3  -> 1+2+3+5+6+7 = 24
    # y[1,0]: rows 1..3, cols -1..1  -> 4+5+8+9+12+13 = 51
    # y[1,1]: rows 1..3, cols 1..3   -> 5+6+7+9+10+11+13+14+15 = 90
    x = np.arange(16, dtype=F64).reshape(1, 1, 4, 4)
    y = ops.conv2d(x, np.ones((1, 1, 3, 3)), stride=2, padding=1)
    np.testing.assert_array_equal(y, [[[[10, 24], [51, 90]]]])


def test_conv2d_dilation2():
    # x[r, c] = 5r + c on 5x5; kernel [[1, 2], [3, 4]] with dilation 2 reads
    # x[i, j], x[i, j+2], x[i+2, j], x[i+2, j+2]:
    # y = 1(5i+j) + 2(5i+j+2) + 3(5i+j+10) + 4(5i+j+12) = 10(5i+j) + 82.
    x = np.arange(25, dtype=F64).reshape(1, 1, 5, 5)
    w = np.array([[[[1, 2], [3, 4]]]], dtype=F64)
    y = ops.conv2d(x, w, dilation=2)
    np.testing.assert_array_equal(y, [[[[82, 92, 102], [132, 142, 152], [182, 192, 202]]]])


def test_conv2d_anisotropic_stride_dilation_and_kernel():
    # x[r, c] = 10r + c on 3x6; kernel 1x2 = [[1, -1]], stride (1, 2), dilation (1, 3):
    # y[i, j] = x[i, 2j] - x[i, 2j + 3] = -3 everywhere; W_out = (6 - 3 - 1) // 2 + 1 = 2.
    x = (10 * np.arange(3)[:, None] + np.arange(6)[None, :]).astype(F64)[None, None]
    y = ops.conv2d(x, np.array([[[[1.0, -1.0]]]]), stride=(1, 2), dilation=(1, 3))
    np.testing.assert_array_equal(y, np.full((1, 1, 3, 2), -3.0))


def test_conv2d_groups_and_bias():
    # 4 channels valued 1, 2, 3, 4 (1x1 spatial), 2 groups of 1x1 kernels:
    # out0 = 1*1 + 10*2 = 21 (+0.5), out1 = 100*3 + 1000*4 = 4300 (-1).
    x = np.array([1, 2, 3, 4], dtype=F64).reshape(1, 4, 1, 1)
    w = np.array([[1, 10], [100, 1000]], dtype=F64).reshape(2, 2, 1, 1)
    y = ops.conv2d(x, w, np.array([0.5, -1.0]), groups=2)
    np.testing.assert_array_equal(y.ravel(), [21.5, 4299.0])


def test_conv2d_depthwise_nonsquare_kernel():
    # channel 0 [[1, 2, 3]] with [[1, -1]] -> [-1, -1]; channel 1 [[10, 20, 30]] with [[2, 1]]
    # -> [2*10 + 20, 2*20 + 30] = [40, 70].
    x = np.array([[[1, 2, 3]], [[10, 20, 30]]], dtype=F64)[None]
    w = np.array([[[[1, -1]]], [[[2, 1]]]], dtype=F64)
    y = ops.conv2d(x, w, groups=2)
    np.testing.assert_array_equal(y, [[[[-1, -1]], [[40, 70]]]])


def test_conv2d_depthwise_channel_multiplier():
    # groups = C_in = 2, C_out = 4: outputs 0, 1 read channel 0 and outputs 2, 3 read channel 1.
    x = np.array([3.0, 5.0]).reshape(1, 2, 1, 1)
    w = np.array([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1, 1)
    np.testing.assert_array_equal(ops.conv2d(x, w, groups=2).ravel(), [3, 6, 15, 20])


def test_conv2d_asymmetric_onnx_padding():
    # padding (top, left, bottom, right) = (1, 0, 0, 2) around [[1, 2], [3, 4]] with a unit 1x1 kernel.
    x = np.array([[1.0, 2.0], [3.0, 4.0]])[None, None]
    y = ops.conv2d(x, np.ones((1, 1, 1, 1)), padding=(1, 0, 0, 2))
    np.testing.assert_array_equal(y[0, 0], [[0, 0, 0, 0], [1, 2, 0, 0], [3, 4, 0, 0]])


def test_conv2d_pair_padding_is_symmetric_per_axis():
    x = np.arange(1.0, 7.0).reshape(1, 1, 2, 3)
    y = ops.conv2d(x, np.ones((1, 1, 1, 1)), padding=(1, 0))       # pad H only
    np.testing.assert_array_equal(y[0, 0], [[0, 0, 0], [1, 2, 3], [4, 5, 6], [0, 0, 0]])


def test_conv2d_batch_is_independent():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 6, 5))
    w = rng.standard_normal((6, 2, 3, 2)) / np.sqrt(12)
    b = rng.standard_normal(6)
    y = ops.conv2d(x, w, b, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2), groups=2)
    for n in range(3):
        yn = ops.conv2d(x[n:n + 1], w, b, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2), groups=2)
        np.testing.assert_array_equal(y[n:n + 1], yn)


def test_conv2d_matches_explicit_sum():
    # The docstring's formula, evaluated with plain loops on a small random case (float64).
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 7, 6))
    wt = rng.standard_normal((4, 3, 3, 2))
    b = rng.standard_normal(4)
    stride, pads, dil = (2, 1), (1, 2, 0, 1), (1, 2)
    y = ops.conv2d(x, wt, b, stride=stride, padding=pads, dilation=dil, groups=2)
    ref = _loop_conv(x, wt, b, stride, pads, dil, 2)
    assert y.shape == ref.shape == (2, 4, 3, 7)   # H: (7+1-2-1)//2+1, W: (6+3-2-1)+1
    assert err(y, ref) <= 1e-12


@pytest.mark.parametrize("wide_limit", [0, 10**9])
def test_conv2d_column_fill_paths_agree(monkeypatch, wide_limit):
    # conv2d fills its column matrix three ways (strided taps when stride_h > 1, two-stage
    # shifted copies when stride_h == 1, padded-width runs when stride is 1 and the GEMM waste
    # is small); ``_WIDE_LIMIT`` picks between the last two. Force each and compare with the
    # pointwise-loop definition of the convolution on cases that exercise every border branch.
    monkeypatch.setattr(ops, "_WIDE_LIMIT", wide_limit)
    rng = np.random.default_rng(3)
    for stride, pads, dil, k in [((1, 1), (1, 1, 1, 1), (1, 1), (3, 3)),
                                 ((1, 2), (0, 3, 2, 0), (2, 1), (2, 3)),
                                 ((1, 1), (3, 0, 0, 3), (1, 3), (3, 2)),
                                 ((2, 1), (2, 2, 0, 1), (1, 2), (3, 3)),
                                 ((1, 1), (0, 0, 0, 0), (1, 1), (1, 1)),
                                 ((1, 1), (2, 0, 1, 2), (1, 1), (1, 1))]:
        x = rng.standard_normal((2, 4, 5, 6))
        w = rng.standard_normal((6, 2) + k)
        b = rng.standard_normal(6)
        y = ops.conv2d(x, w, b, stride=stride, padding=pads, dilation=dil, groups=2)
        ref = _loop_conv(x, w, b, stride, pads, dil, 2)
        assert y.shape == ref.shape and y.flags.c_contiguous
        assert err(y, ref) <= 1e-12, (stride, pads, dil, k)


def _loop_conv(x, wt, b, stride, pads, dil, groups):
    """The docstring's formula with plain loops (slow; tiny shapes only)."""
    n, c, h, w_ = x.shape
    o, cg, kh, kw = wt.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = stride, dil, pads
    xp = np.zeros((n, c, h + pt + pb, w_ + pl + pr))
    xp[:, :, pt:pt + h, pl:pl + w_] = x
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w_ + pl + pr - dw * (kw - 1) - 1) // sw + 1
    ref = np.zeros((n, o, ho, wo))
    og = o // groups
    for b_ in range(n):
        for oc in range(o):
            g = oc // og
            for i in range(ho):
                for j in range(wo):
                    s = b[oc]
                    for ci in range(cg):
                        for u in range(kh):
                            for v in range(kw):
                                s += wt[oc, ci, u, v] * xp[b_, g * cg + ci, sh * i + dh * u, sw * j + dw * v]
                    ref[b_, oc, i, j] = s
    return ref


# ----------------------------------------------------------------------------
# avg_pool2d
# ----------------------------------------------------------------------------

# x = 1..9 on 3x3, kernel 2, stride 1, padding 1 -> 4x4 windows of the zero-padded 5x5 map.
# Window sums:  [[1, 3, 5, 3], [5, 12, 16, 9], [11, 24, 28, 15], [7, 15, 17, 9]]
# Real pixels:  [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]]
POOL_X = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
POOL_INCLUDE = [[0.25, 0.75, 1.25, 0.75], [1.25, 3.0, 4.0, 2.25],
                [2.75, 6.0, 7.0, 3.75], [1.75, 3.75, 4.25, 2.25]]
POOL_EXCLUDE = [[1.0, 1.5, 2.5, 3.0], [2.5, 3.0, 4.0, 4.5],
                [5.5, 6.0, 7.0, 7.5], [7.0, 7.5, 8.5, 9.0]]


def test_avg_pool_count_include_pad_true_divides_by_window_area():
    y = ops.avg_pool2d(POOL_X, 2, stride=1, padding=1, count_include_pad=True)
    np.testing.assert_array_equal(y[0, 0], POOL_INCLUDE)


def test_avg_pool_count_include_pad_false_divides_by_real_pixels():
    y = ops.avg_pool2d(POOL_X, 2, stride=1, padding=1, count_include_pad=False)
    np.testing.assert_array_equal(y[0, 0], POOL_EXCLUDE)


def test_avg_pool_default_stride_is_kernel():
    # 0..15 on 4x4, 2x2 windows without overlap: means of {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}.
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(ops.avg_pool2d(x, 2)[0, 0], [[2.5, 4.5], [10.5, 12.5]])


def test_avg_pool_nonsquare_asymmetric():
    # x = 1..6 on 2x3, kernel (1, 2), stride (1, 1), padding (top, left, bottom, right) = (0, 1, 0, 0):
    # row [1, 2, 3] -> windows [0, 1], [1, 2], [2, 3]; excluding pads: [1, 1.5, 2.5].
    x = np.arange(1.0, 7.0).reshape(1, 1, 2, 3)
    y = ops.avg_pool2d(x, (1, 2), stride=1, padding=(0, 1, 0, 0), count_include_pad=False)
    np.testing.assert_array_equal(y[0, 0], [[1.0, 1.5, 2.5], [4.0, 4.5, 5.5]])
    y = ops.avg_pool2d(x, (1, 2), stride=1, padding=(0, 1, 0, 0), count_include_pad=True)
    np.testing.assert_array_equal(y[0, 0], [[0.5, 1.5, 2.5], [2.0, 4.5, 5.5]])


# ----------------------------------------------------------------------------
# batch_norm
# ----------------------------------------------------------------------------

# mean [1, 2], var [3, 8], eps 1 -> sqrt(var + eps) = [2, 3]; gamma [2, 3], beta [0.5, -1]:
# channel 0: y = 2 (x - 1) / 2 + 0.5 = x - 0.5;  channel 1: y = 3 (x - 2) / 3 - 1 = x - 3.
BN = dict(mean=np.array([1.0, 2.0]), var=np.array([3.0, 8.0]),
          gamma=np.array([2.0, 3.0]), beta=np.array([0.5, -1.0]))


def test_batch_norm_nc():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    y = ops.batch_norm(x, BN["mean"], BN["var"], BN["gamma"], BN["beta"], eps=1.0)
    np.testing.assert_array_equal(y, [[0.5, -1.0], [2.5, 1.0]])


def test_batch_norm_nchw():
    x = np.array([[[[1.0, 3.0]], [[2.0, 4.0]]]])               # (1, 2, 1, 2)
    y = ops.batch_norm(x, BN["mean"], BN["var"], BN["gamma"], BN["beta"], eps=1.0)
    np.testing.assert_array_equal(y, [[[[0.5, 2.5]], [[-1.0, 1.0]]]])


def test_batch_norm_eps_is_used():
    # With var = 0 the result is gamma (x - mean) / sqrt(eps) + beta: eps must not be hard-coded.
    x = np.array([[3.0]])
    for eps, expected in [(1e-2, 20.0), (4.0, 1.0), (1e-4, 200.0)]:
        y = ops.batch_norm(x, np.array([1.0]), np.array([0.0]), np.array([1.0]), np.array([0.0]), eps=eps)
        np.testing.assert_allclose(y, [[expected]], rtol=1e-12)


def test_batch_norm_rejects_nonpositive_variance():
    with pytest.raises(ValueError, match="var"):
        ops.batch_norm(np.ones((1, 1)), np.zeros(1), np.array([-1.0]), np.ones(1), np.zeros(1), eps=1e-5)


# ----------------------------------------------------------------------------
# linear and activations
# ----------------------------------------------------------------------------

def test_linear_hand_values():
    # x = [1, 2]; rows of W: [1, 0] -> 1, [0, 1] -> 2, [1, 1] -> 3; plus b = [0, 1, -1].
    y = ops.linear(np.array([[1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
                   np.array([0.0, 1.0, -1.0]))
    np.testing.assert_array_equal(y, [[1.0, 3.0, 2.0]])
    np.testing.assert_array_equal(ops.linear(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]])), [[11.0]])


def test_relu():
    np.testing.assert_array_equal(ops.relu(np.array([-1.0, 0.0, 2.0])), [0.0, 0.0, 2.0])


def test_relu6_clips_both_sides():
    np.testing.assert_array_equal(ops.relu6(np.array([-1.0, 0.0, 3.0, 6.0, 7.5, 1e9])), [0, 0, 3, 6, 6, 6])


def test_identity():
    x = np.array([-2.0, 0.5])
    np.testing.assert_array_equal(ops.identity(x), x)


def test_gelu_known_points():
    # GELU(x) = x Phi(x); Phi(1) = 0.8413447460685429, Phi(-1) = 1 - Phi(1), Phi(2) = 0.9772498680518208.
    y = ops.gelu(np.array([0.0, 1.0, -1.0, 2.0]))
    np.testing.assert_allclose(y, [0.0, 0.8413447460685429, -0.15865525393145707, 2 * 0.9772498680518208],
                               rtol=1e-14, atol=0)


def test_sigmoid_silu_hardswish_known_points():
    # sigmoid(ln 3) = 3/4; silu(ln 3) = 0.75 ln 3; hardswish(x) = x relu6(x + 3) / 6:
    # -4 -> 0, -3 -> 0, 0 -> 0, 1 -> 4/6, 3 -> 3, 4 -> 4.
    ln3 = np.log(3.0)
    np.testing.assert_allclose(ops.sigmoid(np.array([0.0, ln3])), [0.5, 0.75], rtol=1e-15)
    np.testing.assert_allclose(ops.silu(np.array([0.0, ln3])), [0.0, 0.75 * ln3], rtol=1e-15)
    np.testing.assert_allclose(ops.hardswish(np.array([-4.0, -3.0, 0.0, 1.0, 3.0, 4.0])),
                               [0, 0, 0, 4 / 6, 3, 4], rtol=1e-15)


def test_activation_registry_is_complete():
    assert set(ops.ACTIVATIONS) == {"identity", "relu", "relu6", "sigmoid", "gelu", "hardswish", "silu"}
    for name, fn in ops.ACTIVATIONS.items():
        assert fn is getattr(ops, name)


# ----------------------------------------------------------------------------
# dtype kept, inputs untouched
# ----------------------------------------------------------------------------

def _all_ops(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 5, 5)).astype(dtype)
    w = rng.standard_normal((4, 2, 3, 3))               # float64 parameters: cast to x's dtype
    b = rng.standard_normal(4)
    c = rng.standard_normal(4)
    yield "conv2d", lambda: ops.conv2d(x, w, b, stride=2, padding=1, groups=2), (x, w, b)
    yield "conv2d 1x1", lambda: ops.conv2d(x, w[:, :, :1, :1], b, groups=2), (x, w, b)
    yield "batch_norm", lambda: ops.batch_norm(x, c, np.abs(c), b, c, eps=1e-3), (x, c, b)
    yield "batch_norm NC", lambda: ops.batch_norm(x[:, :, 0, 0], c, np.abs(c), b, c), (x, c, b)
    yield "avg_pool2d", lambda: ops.avg_pool2d(x, 3, stride=2, padding=1), (x,)
    yield "avg_pool2d excl", lambda: ops.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False), (x,)
    yield "linear", lambda: ops.linear(x[:, :, 0, 0], w.reshape(4, -1)[:, :4], b), (x, w, b)
    yield "pad2d", lambda: ops.pad2d(x, (1, 2, 0, 1)), (x,)
    yield "pad2d per-channel", lambda: ops.pad2d(x, 1, value=b), (x, b)
    for name in ops.ACTIVATIONS:
        yield name, (lambda f=ops.ACTIVATIONS[name]: f(x)), (x,)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_dtype_kept_and_inputs_not_mutated(dtype):
    for name, call, inputs in _all_ops(dtype):
        before = [a.copy() for a in inputs]
        y = call()
        assert y.dtype == dtype, (name, y.dtype)
        for a, a0 in zip(inputs, before):
            np.testing.assert_array_equal(a, a0, err_msg=name)


def test_integer_input_computes_in_float64():
    x = np.arange(9).reshape(1, 1, 3, 3)
    y = ops.conv2d(x, np.ones((1, 1, 1, 1), dtype=F32))
    assert y.dtype == F64
    np.testing.assert_array_equal(y, x)


def test_pad2d_per_channel_value():
    x = np.zeros((1, 2, 1, 1))
    y = ops.pad2d(x, (1, 0, 0, 1), value=np.array([7.0, -1.0]))
    np.testing.assert_array_equal(y[0, 0], [[7, 7], [0, 7]])
    np.testing.assert_array_equal(y[0, 1], [[-1, -1], [0, -1]])


def test_conv_output_size_formula():
    # floor((7 + 1 + 2 - 2*(3 - 1) - 1) / 2) + 1 = floor(5 / 2) + 1 = 3
    assert ops.conv_output_size(7, 3, stride=2, pad_begin=1, pad_end=2, dilation=2) == 3


def test_normalize_padding_forms():
    assert ops.normalize_padding(2) == (2, 2, 2, 2)
    assert ops.normalize_padding((1, 3)) == (1, 3, 1, 3)
    assert ops.normalize_padding((1, 2, 3, 4)) == (1, 2, 3, 4)


# ----------------------------------------------------------------------------
# ShapeError: every bad-input case names the argument and shows the shapes
# ----------------------------------------------------------------------------

X = np.zeros((1, 4, 5, 5))


def _raises(call, *fragments):
    """``call`` raises ShapeError whose message contains every fragment (literally)."""
    with pytest.raises(ShapeError) as info:
        call()
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert isinstance(info.value, ValueError)
    return msg


def test_error_channels_not_divisible_by_groups():
    _raises(lambda: ops.conv2d(np.zeros((1, 3, 5, 5)), np.zeros((4, 1, 3, 3)), groups=2),
            "x", "(1, 3, 5, 5)", "groups=2")


def test_error_out_channels_not_divisible_by_groups():
    _raises(lambda: ops.conv2d(X, np.zeros((3, 2, 3, 3)), groups=2), "weight", "(3, 2, 3, 3)", "groups=2")


def test_error_weight_in_channels():
    _raises(lambda: ops.conv2d(X, np.zeros((4, 3, 3, 3)), groups=2),
            "weight in-channels", "(4, 3, 3, 3)", "(1, 4, 5, 5)", "groups")
    _raises(lambda: ops.conv2d(X, np.zeros((4, 4, 3, 3)), groups=4), "weight", "(4, 4, 3, 3)", "(1, 4, 5, 5)")


def test_error_bias_length():
    _raises(lambda: ops.conv2d(X, np.zeros((6, 4, 3, 3)), np.zeros(5)), "bias", "(6,)", "(5,)", "(6, 4, 3, 3)")
    _raises(lambda: ops.conv2d(X, np.zeros((6, 4, 3, 3)), np.zeros((6, 1))), "bias", "(6, 1)")
    _raises(lambda: ops.linear(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros(3)), "bias", "(4,)", "(3,)", "(4, 3)")


def test_error_empty_output():
    _raises(lambda: ops.conv2d(X, np.zeros((2, 4, 7, 3))), "empty output", "(5, 5)", "(2, 4, 7, 3)")
    _raises(lambda: ops.conv2d(X, np.zeros((2, 4, 3, 3)), dilation=3), "empty output", "dilation", "(7, 7)")
    _raises(lambda: ops.avg_pool2d(X, (6, 2)), "empty output", "(5, 5)", "kernel_size", "(6, 2)")


@pytest.mark.parametrize("bad", [0, -1, (1, 0), (0, 2)])
def test_error_nonpositive_stride_dilation(bad):
    w = np.zeros((2, 4, 3, 3))
    _raises(lambda: ops.conv2d(X, w, stride=bad), "stride", repr(bad))
    _raises(lambda: ops.conv2d(X, w, dilation=bad), "dilation", repr(bad))
    _raises(lambda: ops.avg_pool2d(X, 2, stride=bad), "stride", repr(bad))
    _raises(lambda: ops.avg_pool2d(X, bad), "kernel_size", repr(bad))


@pytest.mark.parametrize("bad", [-1, (0, -1), (1, 0, -2, 0)])
def test_error_negative_padding(bad):
    _raises(lambda: ops.conv2d(X, np.zeros((2, 4, 3, 3)), padding=bad), "padding", repr(bad))
    _raises(lambda: ops.avg_pool2d(X, 2, padding=bad), "padding", repr(bad))
    _raises(lambda: ops.pad2d(X, bad), "padding", repr(bad))


def test_error_malformed_tuples():
    _raises(lambda: ops.conv2d(X, np.zeros((2, 4, 3, 3)), padding=(1, 1, 1)), "padding", "(1, 1, 1)")
    _raises(lambda: ops.conv2d(X, np.zeros((2, 4, 3, 3)), stride=(1, 1, 1)), "stride", "(1, 1, 1)")
    _raises(lambda: ops.conv2d(X, np.zeros((2, 4, 3, 3)), dilation="2"), "dilation")


def test_error_groups_nonpositive():
    _raises(lambda: ops.conv2d(X, np.zeros((2, 4, 3, 3)), groups=0), "groups", "0")


def test_error_wrong_ranks():
    _raises(lambda: ops.conv2d(np.zeros((4, 5, 5)), np.zeros((2, 4, 3, 3))), "x", "(4, 5, 5)")
    _raises(lambda: ops.conv2d(X, np.zeros((2, 4, 3))), "weight", "(2, 4, 3)")
    _raises(lambda: ops.avg_pool2d(np.zeros((5, 5)), 2), "x", "(5, 5)")
    _raises(lambda: ops.pad2d(np.zeros((1, 5, 5)), 1), "x", "(1, 5, 5)")
    _raises(lambda: ops.batch_norm(np.zeros(4), *[np.zeros(4)] * 4), "x", "(4,)")
    _raises(lambda: ops.linear(np.zeros(3), np.zeros((2, 3))), "x", "(3,)")
    _raises(lambda: ops.linear(np.zeros((1, 3)), np.zeros(3)), "weight", "(3,)", "(1, 3)")


def test_error_linear_in_features():
    _raises(lambda: ops.linear(np.zeros((2, 3)), np.zeros((4, 5))), "weight", "(4, 5)", "(2, 3)")


@pytest.mark.parametrize("name", ["mean", "var", "gamma", "beta"])
def test_error_batch_norm_parameter_shapes(name):
    params = dict(mean=np.zeros(4), var=np.ones(4), gamma=np.ones(4), beta=np.zeros(4))
    params[name] = np.zeros(3)
    msg = _raises(lambda: ops.batch_norm(X, **params), name, "(4,)", "(3,)", "(1, 4, 5, 5)")
    assert re.match(rf"^{name}\b", msg)


def test_error_pad2d_value_shape():
    _raises(lambda: ops.pad2d(X, 1, value=np.zeros(3)), "value", "(4,)", "(3,)")
