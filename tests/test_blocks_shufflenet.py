"""ShuffleNetV1 unit and channel shuffle (repnp.blocks.shufflenet)."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import fusion, ops
from repnp.blocks.base import BatchNorm, ConvBN
from repnp.blocks.shufflenet import ShuffleNetUnit, channel_shuffle, shuffle_permutation
from repnp.errors import ShapeError
from repnp.testing import assert_reparam_equivalent, random_input, relative_error
from repnp.trace import Trace


def _op_types(block, shape):
    t = Trace()
    block.trace(t, t.input(shape))
    return [op.op_type for op in t.ops]


# ----------------------------------------------------------------------------
# channel shuffle
# ----------------------------------------------------------------------------

def test_channel_shuffle_by_hand():
    # 6 channels in 3 groups [0 1 | 2 3 | 4 5]: the shuffle takes the first of each group, then the second.
    x = np.arange(6, dtype=np.float64).reshape(1, 6, 1, 1)
    np.testing.assert_array_equal(channel_shuffle(x, 3).ravel(), [0, 2, 4, 1, 3, 5])
    # 2 groups [0 1 2 | 3 4 5]
    np.testing.assert_array_equal(channel_shuffle(x, 2).ravel(), [0, 3, 1, 4, 2, 5])
    np.testing.assert_array_equal(shuffle_permutation(6, 3), [0, 2, 4, 1, 3, 5])


@given(per=st.integers(1, 4), groups=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_channel_shuffle_is_a_1x1_conv_with_a_permutation_kernel(per, groups, h, w, seed):
    c = per * groups
    x = random_input((2, c, h, w), seed=seed)
    kernel = np.zeros((c, c, 1, 1))
    for j in range(c):  # out j = a*g + b reads in b*per + a (reshape (g, per), transpose, flatten)
        a, b = divmod(j, groups)
        kernel[j, b * per + a, 0, 0] = 1.0
    np.testing.assert_array_equal(channel_shuffle(x, groups), ops.conv2d(x, kernel))
    # shuffling with (g) then with (C/g) transposes back: the inverse permutation
    np.testing.assert_array_equal(channel_shuffle(channel_shuffle(x, groups), per), x)


def test_channel_shuffle_keeps_dtype_and_rejects_bad_groups():
    x = np.ones((1, 6, 2, 2), dtype=np.float32)
    assert channel_shuffle(x, 2).dtype == np.float32
    with pytest.raises(ShapeError, match="groups=4.*6 channels"):
        channel_shuffle(x, 4)
    with pytest.raises(ShapeError, match="NCHW"):
        channel_shuffle(np.ones((6, 2, 2)), 2)


@pytest.mark.parametrize("groups, per", [(2, 3), (3, 3), (4, 3), (3, 1)])
def test_shuffle_folded_into_a_group_conv_is_no_longer_grouped(groups, per):
    # The docstring's claim: in P @ blockdiag(W) every block row reads min(C/g, g) blocks: not grouped
    # as soon as C/g > 1.
    c = per * groups
    w = np.random.default_rng(groups).standard_normal((c, per, 1, 1)) + 5.0   # no zero entries
    dense = fusion.ungroup_kernel(w, groups=groups)[:, :, 0, 0]               # (C, C) block diagonal
    folded = dense[shuffle_permutation(c, groups)]                           # shuffle after the conv
    blocks = folded.reshape(groups, per, groups, per)
    for i in range(groups):
        assert sum(bool(np.any(blocks[i, :, j])) for j in range(groups)) == min(per, groups)
    # while the unshuffled kernel is zero off the diagonal blocks
    plain = dense.reshape(groups, per, groups, per)
    assert all(not np.any(plain[i, :, j]) for i in range(groups) for j in range(groups) if i != j)


# ----------------------------------------------------------------------------
# the unit: train == deploy
# ----------------------------------------------------------------------------

@st.composite
def unit_configs(draw):
    groups = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    m = groups * draw(st.integers(1, 2))
    first_groups = draw(st.sampled_from([1, groups]))
    c_in = first_groups * draw(st.integers(1, 3))
    main = groups * draw(st.integers(1, 2))
    c_out = c_in if stride == 1 else c_in + main
    if stride == 1:  # the add needs conv2 to give c_in channels: c_in divisible by groups
        c_in = c_out = groups * first_groups * draw(st.integers(1, 2))
    k = draw(st.sampled_from([3, 5]))
    return dict(in_channels=c_in, out_channels=c_out, groups=groups, stride=stride, first_groups=first_groups,
                bottleneck_channels=m, kernel_size=k)


@given(cfg=unit_configs(), h=st.integers(3, 7), w=st.integers(3, 7), seed=st.integers(0, 2**16),
       merge=st.booleans())
def test_train_equals_deploy_float64(cfg, h, w, seed, merge):
    u = ShuffleNetUnit.random(seed, cfg.pop("in_channels"), cfg.pop("out_channels"), **cfg)
    x = random_input((2, u.in_channels, h, w), seed=seed)
    d = u.reparameterize(merge_pointwise=merge)
    assert relative_error(d.forward(x), u.forward(x)) <= 1e-12
    assert_reparam_equivalent(u, x)


@given(cfg=unit_configs(), seed=st.integers(0, 2**16), merge=st.booleans())
@settings(max_examples=15)
def test_train_equals_deploy_float32(cfg, seed, merge):
    u = ShuffleNetUnit.random(seed, cfg.pop("in_channels"), cfg.pop("out_channels"), dtype=np.float32, **cfg)
    x = random_input((2, u.in_channels, 6, 5), dtype=np.float32, seed=seed)
    y = u.forward(x)
    d = u.reparameterize(merge_pointwise=merge).forward(x)
    assert y.dtype == d.dtype == np.float32
    assert relative_error(d, y) <= 1e-5


def test_merged_form_is_a_grouped_kxk_conv():
    u = ShuffleNetUnit.random(0, 24, 48, groups=3, stride=2)   # main branch 24, bottleneck 12
    m = u.reparameterize(merge_pointwise=True)
    assert m.depthwise is None
    assert m.conv2.weight.shape == (24, 12 // 3, 3, 3) and m.conv2.groups == 3
    assert m.stride == 2 and m.out_channels == 48


# ----------------------------------------------------------------------------
# structure: residual, pool-concat, shapes
# ----------------------------------------------------------------------------

def _silence_conv2(u):
    """The unit with conv2's BN set to output zeros (gamma = beta = 0)."""
    bn = u.conv2.bn
    zero = BatchNorm(bn.mean, bn.var, np.zeros_like(bn.gamma), np.zeros_like(bn.beta), bn.eps)
    return dataclasses.replace(u, conv2=ConvBN(u.conv2.conv, zero))


def test_stride1_adds_the_input():
    u = _silence_conv2(ShuffleNetUnit.random(0, 12, 12, groups=3))
    x = random_input((2, 12, 5, 5), seed=0)
    np.testing.assert_array_equal(u.forward(x), np.maximum(x, 0))


def test_stride2_concatenates_the_pooled_input_first():
    u = ShuffleNetUnit.random(1, 12, 36, groups=3, stride=2)
    x = random_input((2, 12, 7, 6), seed=1)
    y = u.forward(x)
    assert y.shape == (2, 36, 4, 3)
    pooled = ops.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=True)
    np.testing.assert_array_equal(y[:, :12], np.maximum(pooled, 0))
    # by hand at the top-left output: window rows -1..1, cols -1..1 -> 4 real pixels / 9
    assert y[0, 0, 0, 0] == pytest.approx(max(x[0, 0, :2, :2].sum() / 9, 0), abs=1e-15)
    main = _silence_conv2(u).forward(x)[:, 12:]
    np.testing.assert_array_equal(main, 0)


def test_op_lists():
    s1 = ShuffleNetUnit.random(0, 12, 12, groups=3)
    assert _op_types(s1, (1, 12, 6, 6)) == [
        "Conv", "BatchNormalization", "Relu", "Reshape", "Transpose", "Reshape", "Conv", "BatchNormalization",
        "Conv", "BatchNormalization", "Add", "Relu"]
    s2 = ShuffleNetUnit.random(0, 12, 36, groups=3, stride=2).reparameterize()
    assert _op_types(s2, (1, 12, 6, 6)) == [
        "Conv", "Relu", "Reshape", "Transpose", "Reshape", "Conv", "Conv", "AveragePool", "Concat", "Relu"]
    # one group: no shuffle operators
    g1 = ShuffleNetUnit.random(0, 8, 8, groups=1).reparameterize()
    assert "Transpose" not in _op_types(g1, (1, 8, 4, 4))


def test_properties_and_params():
    u = ShuffleNetUnit.random(0, 24, 240, groups=3, stride=2, first_groups=1)
    assert (u.in_channels, u.bottleneck_channels, u.out_channels, u.stride) == (24, 60, 240, 2)
    assert u.conv1.conv.groups == 1 and u.conv2.conv.groups == 3
    assert u.conv2.conv.weight.shape == (216, 20, 1, 1)
    assert {k.split(".")[0] for k in u.params()} == {"conv1", "depthwise", "conv2"}


def test_bad_configs_raise():
    with pytest.raises(ShapeError, match="in_channels=12 must equal out_channels=24"):
        ShuffleNetUnit.random(0, 12, 24, groups=3, stride=1)
    with pytest.raises(ShapeError, match="divisible"):
        ShuffleNetUnit.random(0, 12, 12, groups=2, bottleneck_channels=3)
    with pytest.raises(ValueError, match="stride"):
        ShuffleNetUnit.random(0, 12, 12, groups=3, stride=3)
    u = ShuffleNetUnit.random(0, 12, 12, groups=3)
    with pytest.raises(ShapeError, match=r"C = 12"):
        u.forward(np.zeros((1, 6, 4, 4)))
