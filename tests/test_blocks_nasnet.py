"""NASNet-A normal cell (repnp.blocks.nasnet)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import cost, ops
from repnp.blocks.nasnet import NASNetNormalCell, SeparableConv
from repnp.errors import ShapeError
from repnp.testing import random_input, relative_error
from repnp.trace import Trace


def _trace(cell, prev_shape, shape):
    t = Trace()
    cell.trace(t, t.input(prev_shape, "x_prev"), t.input(shape, "x"))
    return t


# ----------------------------------------------------------------------------
# train == deploy
# ----------------------------------------------------------------------------

@given(c_prev=st.integers(1, 5), c=st.integers(1, 5), f=st.integers(1, 4), h=st.integers(3, 6),
       w=st.integers(3, 6), pad=st.booleans(), merge=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_train_equals_deploy_float64(c_prev, c, f, h, w, pad, merge, seed):
    cell = NASNetNormalCell.random(seed, c_prev, c, f, count_include_pad=pad)
    xp, x = random_input((2, c_prev, h, w), seed=seed), random_input((2, c, h, w), seed=seed + 1)
    y = cell.forward(xp, x)
    assert y.shape == (2, 6 * f, h, w)
    assert relative_error(cell.reparameterize(merge_pointwise=merge).forward(xp, x), y) <= 1e-12


@given(f=st.integers(1, 4), merge=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_train_equals_deploy_float32(f, merge, seed):
    cell = NASNetNormalCell.random(seed, 3, 4, f, dtype=np.float32)
    xp = random_input((2, 3, 5, 6), dtype=np.float32, seed=seed)
    x = random_input((2, 4, 5, 6), dtype=np.float32, seed=seed + 1)
    y = cell.forward(xp, x)
    d = cell.reparameterize(merge_pointwise=merge).forward(xp, x)
    assert y.dtype == d.dtype == np.float32
    assert relative_error(d, y) <= 1e-5


def test_separable_conv_is_relu_dw_pw_bn():
    rng = np.random.default_rng(0)
    sep = SeparableConv.random(rng, 3, 3, 5)
    x = random_input((2, 3, 6, 6), seed=0)
    dw, pw = sep.depthwise, sep.pointwise
    manual = pw.bn.forward(ops.conv2d(ops.conv2d(np.maximum(x, 0), dw.weight, padding=2, groups=3),
                                      pw.conv.weight))
    np.testing.assert_array_equal(sep.forward(x), manual)
    assert dw.bias is None and pw.conv.bias is None and pw.bn.eps == 1e-3  # TF release: no biases, eps 1e-3
    merged = sep.reparameterize(merge_pointwise=True)
    assert merged.depthwise is None and merged.pointwise.weight.shape == (3, 3, 5, 5)  # dense 5x5


# ----------------------------------------------------------------------------
# the published wiring
# ----------------------------------------------------------------------------

def test_concat_order_and_the_identity_and_pool_branches():
    f = 4
    cell = NASNetNormalCell.random(0, f, 6, f)          # h_(i-1) already has F channels: passed through
    assert cell.conv_prev_1x1 is None
    xp, x = random_input((2, f, 5, 6), seed=0), random_input((2, 6, 5, 6), seed=1)
    y = cell.forward(xp, x)
    h = cell.conv_1x1.forward(x)
    pool = lambda a: ops.avg_pool2d(a, 3, stride=1, padding=1, count_include_pad=False)  # noqa: E731
    np.testing.assert_array_equal(y[:, :f], xp)                                          # h_prev
    np.testing.assert_array_equal(y[:, f:2 * f],
                                  cell.comb_iter_0_left.forward(h) + cell.comb_iter_0_right.forward(xp))
    np.testing.assert_array_equal(y[:, 2 * f:3 * f],
                                  cell.comb_iter_1_left.forward(xp) + cell.comb_iter_1_right.forward(xp))
    np.testing.assert_array_equal(y[:, 3 * f:4 * f], pool(h) + xp)                       # comb 2
    np.testing.assert_allclose(y[:, 4 * f:5 * f], 2 * pool(xp), rtol=1e-15)              # comb 3
    np.testing.assert_array_equal(y[:, 5 * f:], cell.comb_iter_4_left.forward(h) + h)    # comb 4
    names = ["comb_iter_0_left", "comb_iter_0_right", "comb_iter_1_left", "comb_iter_1_right", "comb_iter_4_left"]
    kernels = [getattr(cell, n).first.depthwise.weight.shape[-1] for n in names]
    assert kernels == [5, 3, 5, 3, 3]   # TF: separable_5x5_2, separable_3x3_2, 5x5, 3x3, ..., separable_3x3_2


@pytest.mark.parametrize("pad, corner, edge", [(False, 2.0, 2.0), (True, 2 * 4 / 9, 2 * 6 / 9)])
def test_pool_border_by_hand(pad, corner, edge):
    # comb 3 = pool(h_prev) + pool(h_prev); on a map of ones TF's SAME pooling (count_include_pad=False)
    # gives 1 everywhere, while counting the padding gives 4/9 in a corner and 6/9 on an edge.
    f = 2
    cell = NASNetNormalCell.random(0, f, 3, f, count_include_pad=pad)
    y = cell.forward(np.ones((1, f, 4, 4)), np.ones((1, 3, 4, 4)))
    comb3 = y[0, 4 * f:5 * f]
    assert comb3[0, 0, 0] == pytest.approx(corner, abs=1e-15)
    assert comb3[1, 0, 2] == pytest.approx(edge, abs=1e-15)
    assert comb3[0, 1, 1] == pytest.approx(2.0, abs=1e-15)


def test_prev_projection_when_channels_differ():
    cell = NASNetNormalCell.random(0, 7, 6, 4)
    assert cell.conv_prev_1x1 is not None and cell.in_channels_prev == 7
    xp, x = random_input((2, 7, 4, 4), seed=0), random_input((2, 6, 4, 4), seed=1)
    hp = cell.conv_prev_1x1.conv.forward(np.maximum(xp, 0))          # ReLU -> 1x1 conv -> BN
    np.testing.assert_array_equal(cell.forward(xp, x)[:, :4], hp)


# ----------------------------------------------------------------------------
# parameter and MAC counts: closed forms
# ----------------------------------------------------------------------------

def _sep_params(f, k, *, folded):
    return f * k * k + f * f + (f if folded else 2 * f)   # dw + pw + (bias | gamma, beta)


@pytest.mark.parametrize("c_prev, c, f", [(4, 6, 4), (10, 12, 8)])
def test_parameter_count_closed_form(c_prev, c, f):
    cell = NASNetNormalCell.random(0, c_prev, c, f)
    proj = lambda cin, folded: cin * f + (f if folded else 2 * f)  # noqa: E731
    for folded, module in ((False, cell), (True, cell.reparameterize())):
        expected = (proj(c, folded) + (proj(c_prev, folded) if c_prev != f else 0)
                    + 2 * 2 * _sep_params(f, 5, folded=folded) + 3 * 2 * _sep_params(f, 3, folded=folded))
        assert cost.count_params(module) == expected


@pytest.mark.parametrize("c_prev, c, f, h, w", [(4, 6, 4, 5, 7), (10, 12, 8, 6, 6)])
def test_mac_count_closed_form(c_prev, c, f, h, w):
    cell = NASNetNormalCell.random(0, c_prev, c, f)
    hw = h * w
    expected = (hw * c * f + (hw * c_prev * f if c_prev != f else 0)
                + 2 * 2 * hw * (25 * f + f * f) + 3 * 2 * hw * (9 * f + f * f)   # separable: dw + pw, twice
                + 3 * hw * f * 9)                                               # three 3x3 pools
    for module in (cell, cell.reparameterize()):
        t = _trace(module, (1, c_prev, h, w), (1, c, h, w))
        assert sum(op.macs for op in t.ops) == expected
    merged = _trace(cell.reparameterize(merge_pointwise=True), (1, c_prev, h, w), (1, c, h, w))
    expected_merged = (hw * c * f + (hw * c_prev * f if c_prev != f else 0)
                       + 2 * 2 * hw * 25 * f * f + 3 * 2 * hw * 9 * f * f + 3 * hw * f * 9)
    assert sum(op.macs for op in merged.ops) == expected_merged


def test_trace_ops():
    cell = NASNetNormalCell.random(0, 8, 8, 8).reparameterize()
    t = _trace(cell, (1, 8, 5, 5), (1, 8, 5, 5))
    types = [op.op_type for op in t.ops]
    # 1 projection (Relu, Conv); 10 separable layers (Relu, Conv, Conv); 3 pools; 5 adds; 1 concat
    assert types.count("Conv") == 1 + 20 and types.count("Relu") == 1 + 10
    assert types.count("AveragePool") == 3 and types.count("Add") == 5 and types[-1] == "Concat"
    assert t.ops[-1].output_shape == (1, 48, 5, 5) and "BatchNormalization" not in types
    # one tensor for both inputs when x is omitted
    t1 = Trace()
    out = cell.trace(t1, t1.input((1, 8, 5, 5)))
    assert out.shape == (1, 48, 5, 5) and len(t1.ops) == len(t.ops)


def test_bad_inputs_raise():
    cell = NASNetNormalCell.random(0, 4, 6, 4)
    with pytest.raises(ShapeError, match="share N, H, W"):
        cell.forward(np.zeros((1, 4, 6, 6)), np.zeros((1, 6, 3, 3)))
    with pytest.raises(ShapeError, match=r"x must be NCHW with C = 6"):
        cell.forward(np.zeros((1, 4, 6, 6)), np.zeros((1, 5, 6, 6)))
    with pytest.raises(ShapeError, match=r"x_prev must be NCHW with C = 4"):
        cell.forward(np.zeros((1, 5, 6, 6)), np.zeros((1, 6, 6, 6)))
