"""The pieces every block is built from: pair, Conv2d, BatchNorm (scale/shift, fold), ConvBN."""

import numpy as np
import pytest

from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, pair, random_bn, random_conv_weight
from repnp.errors import ShapeError
from repnp.testing import relative_error


def _bn(dtype=np.float64):
    """Hand-picked so that sqrt(var + eps) is 2 and 1: t = gamma / sqrt(var + eps) = (2, 0.5)."""
    return BatchNorm(mean=np.array([1.0, -2.0], dtype), var=np.array([3.0, 0.0], dtype),
                     gamma=np.array([4.0, 0.5], dtype), beta=np.array([1.0, -1.0], dtype), eps=1.0)


def test_pair_accepts_ints_and_pairs_and_names_the_argument():
    assert pair(3) == (3, 3) and pair(np.int64(2)) == (2, 2) and pair((1, 2)) == (1, 2)
    assert all(type(v) is int for v in pair(np.array([4, 5])))
    with pytest.raises(ShapeError, match="stride must be an int or an"):
        pair("ab", name="stride")
    with pytest.raises(ShapeError, match="dilation"):
        pair((1, 2, 3), name="dilation")


def test_scale_shift_by_hand():
    """t = (4/2, 0.5/1) = (2, 0.5); c = beta - mean * t = (1 - 2, -1 + 1) = (-1, 0)."""
    t, c = _bn().scale_shift()
    np.testing.assert_array_equal(t, [2.0, 0.5])
    np.testing.assert_array_equal(c, [-1.0, 0.0])


def test_fold_by_hand_and_against_the_unfused_computation():
    """W' = W * t = (1*2, 3*0.5) = (2, 1.5); b' = beta + (b - mean) * t = (1 + 0, -1 + 4 * 0.5) = (1, 1)."""
    bn = _bn()
    kernel, bias = bn.fold(np.array([1.0, 3.0]).reshape(2, 1, 1, 1), np.array([1.0, 2.0]))
    np.testing.assert_array_equal(kernel.ravel(), [2.0, 1.5])
    np.testing.assert_array_equal(bias, [1.0, 1.0])
    # Without a bias the conv's bias is 0: b' = c.
    np.testing.assert_array_equal(bn.fold(np.ones((2, 1, 1, 1)))[1], bn.scale_shift()[1])
    # A random conv-BN: fold == BN after the conv, float64 and float32.
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        layer = ConvBN.random(np.random.default_rng(0), 4, 6, 3, stride=2, padding=1, dilation=2, groups=2,
                              eps=1e-3, dtype=dtype)
        x = np.random.default_rng(1).standard_normal((2, 4, 9, 8)).astype(dtype)
        deploy = layer.reparameterize()
        assert deploy.weight.dtype == dtype and deploy.forward(x).dtype == dtype
        assert relative_error(deploy.forward(x), layer.forward(x)) <= tol


def test_as_identity_conv_is_the_bn_on_x():
    bn = _bn()
    kernel, bias = bn.as_identity_conv(kernel_size=3)
    assert kernel.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(kernel[:, :, 1, 1], np.diag([2.0, 0.5]))
    x = np.random.default_rng(2).standard_normal((1, 2, 5, 5))
    y = Conv2d(kernel, bias, padding=1).forward(x)
    assert relative_error(y, bn.forward(x)) <= 1e-12


def test_conv_output_shape_by_hand():
    """H = 9, k = 3, d = 2 (span 5), padding 1 + 1, stride 2: (9 + 2 - 5) // 2 + 1 = 4;
    W = 8, padding (0 left, 2 right): (8 + 2 - 5) // 2 + 1 = 3."""
    conv = Conv2d(np.zeros((6, 2, 3, 3)), stride=2, padding=(1, 0, 1, 2), dilation=2, groups=2)
    assert conv.output_shape((5, 4, 9, 8)) == (5, 6, 4, 3)
    assert conv.forward(np.zeros((5, 4, 9, 8))).shape == (5, 6, 4, 3)


def test_random_pieces_are_scaled_and_not_trivial():
    rng = np.random.default_rng(3)
    w = random_conv_weight(rng, 64, 8, 3)
    assert w.shape == (64, 8, 3, 3) and abs(w.std() * np.sqrt(8 * 9) - 1) < 0.1
    bn = random_bn(rng, 256, eps=1e-3, dtype=np.float32)
    assert bn.mean.dtype == np.float32 and bn.eps == 1e-3
    assert np.all(bn.mean != 0) and np.all(bn.var != 1) and np.all(bn.gamma != 1) and np.all(bn.beta != 0)


def test_convbn_rejects_mismatched_channels_and_groups():
    rng = np.random.default_rng(4)
    with pytest.raises(ShapeError, match=r"bn has 3 channels but conv.weight \(4, 2, 3, 3\)"):
        ConvBN(Conv2d(np.zeros((4, 2, 3, 3))), random_bn(rng, 3))
    with pytest.raises(ShapeError, match="groups=3 must divide in_channels=4"):
        ConvBN.random(rng, 4, 6, 3, groups=3)
