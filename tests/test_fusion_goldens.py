"""``repnp.fusion``: hand-typed goldens a human can check, bad input, no mutation, dtypes.

The property tests (fused == unfused on random cases) are in ``test_fusion.py``.
"""

import numpy as np
import pytest

from repnp import fusion, ops
from repnp.errors import ShapeError
from repnp.testing import relative_error

# ----------------------------------------------------------------------------
# hand-typed goldens
# ----------------------------------------------------------------------------


def test_fuse_bn_golden_round_numbers():
    # conv: w = 2, b = 1.  BN: mean 3, var 3, eps 1 -> sqrt(var + eps) = 2;
    #                      gamma 4 -> t = 4 / 2 = 2; beta 0.5.
    # W' = t * w = 4;  b' = beta + (b - mean) * t = 0.5 + (1 - 3) * 2 = -3.5.
    kernel, bias = fusion.fuse_bn([[[[2.0]]]], [1.0], [3.0], [3.0], [4.0], [0.5], eps=1.0)
    np.testing.assert_array_equal(kernel, [[[[4.0]]]])
    np.testing.assert_array_equal(bias, [-3.5])
    # Check on x = 5: conv gives 2*5 + 1 = 11, BN gives 2*(11 - 3) + 0.5 = 16.5; fused 4*5 - 3.5 = 16.5.
    x = np.full((1, 1, 1, 1), 5.0)
    conv = ops.conv2d(x, [[[[2.0]]]], [1.0])
    assert conv[0, 0, 0, 0] == 11
    assert ops.batch_norm(conv, [3.0], [3.0], [4.0], [0.5], eps=1.0)[0, 0, 0, 0] == 16.5
    assert ops.conv2d(x, kernel, bias)[0, 0, 0, 0] == 16.5


def test_fuse_bn_eps_is_used_not_hard_coded():
    # var = 0 with eps = 0.25: t = gamma / 0.5 = 2 * gamma. With a hidden 1e-5 this would be ~632 * gamma.
    kernel, bias = fusion.fuse_bn(np.ones((1, 1, 1, 1)), None, [1.0], [0.0], [3.0], [0.0], eps=0.25)
    np.testing.assert_array_equal(kernel, [[[[6.0]]]])
    np.testing.assert_array_equal(bias, [-6.0])  # 0 + (0 - 1) * 6


def test_bn_scale_shift_golden_and_value_at_zero():
    # mean 1, var 3, eps 1, gamma 4, beta 0.5: t = 4 / 2 = 2, s = 0.5 - 1 * 2 = -1.5.
    t, s = fusion.bn_scale_shift([1.0, 0.0], [3.0, 0.0], [4.0, 1.0], [0.5, 2.0], eps=1.0)
    np.testing.assert_array_equal(t, [2.0, 1.0])
    np.testing.assert_array_equal(s, [-1.5, 2.0])
    # s is what the BN outputs at zero input: DBB's pad value.
    zero = np.zeros((1, 2, 1, 1))
    np.testing.assert_array_equal(
        ops.batch_norm(zero, [1.0, 0.0], [3.0, 0.0], [4.0, 1.0], [0.5, 2.0], eps=1.0)[0, :, 0, 0], s)


def test_identity_kernel_golden_4_channels_2_groups():
    z = [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
    c = [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    # Shape (4, 2, 3, 3). Output channel i reads local input i % 2 of its group at the centre tap:
    expected = [
        [c, z],  # out 0: group 0, local input 0 (= channel 0)
        [z, c],  # out 1: group 0, local input 1 (= channel 1)
        [c, z],  # out 2: group 1, local input 0 (= channel 2)
        [z, c],  # out 3: group 1, local input 1 (= channel 3)
    ]
    got = fusion.identity_kernel(4, groups=2, kernel_size=3)
    assert got.shape == (4, 2, 3, 3) and got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


def test_identity_kernel_golden_non_square():
    got = fusion.identity_kernel(2, kernel_size=(1, 3), dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[[[0, 1, 0]], [[0, 0, 0]]],
                                        [[[0, 0, 0]], [[0, 1, 0]]]])


def test_avgpool_kernel_golden_2_channels_3x3():
    n = [[1 / 9] * 3] * 3
    z = [[0.0] * 3] * 3
    got = fusion.avgpool_kernel(2, 3)
    assert got.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(got, [[n, z], [z, n]])  # channel i averages input i only
    np.testing.assert_array_equal(fusion.avgpool_kernel(2, 3, groups=2), [[n], [n]])  # depthwise form
    np.testing.assert_array_equal(fusion.avgpool_kernel(1, (1, 2)), [[[[0.5, 0.5]]]])


def test_pad_kernel_golden_1x3():
    k = np.array([[[[1.0, 2.0, 3.0]]]])                       # shape (1, 1, 1, 3)
    np.testing.assert_array_equal(fusion.pad_kernel(k, 3), [[[[0, 0, 0],
                                                               [1, 2, 3],
                                                               [0, 0, 0]]]])
    np.testing.assert_array_equal(fusion.pad_kernel(k, 3, offset=(0, 0)), [[[[1, 2, 3],
                                                                              [0, 0, 0],
                                                                              [0, 0, 0]]]])
    np.testing.assert_array_equal(fusion.pad_kernel(k, (3, 5), offset=(2, 1)), [[[[0, 0, 0, 0, 0],
                                                                                  [0, 0, 0, 0, 0],
                                                                                  [0, 1, 2, 3, 0]]]])
    np.testing.assert_array_equal(fusion.pad_kernel(k, (1, 5)), [[[[0, 1, 2, 3, 0]]]])


def test_kernel_offset_goldens():
    # RepVGG: 1x1 with padding 0 inside 3x3 with padding 1 -> the centre.
    assert fusion.kernel_offset(1, 0, kernel_size=3, padding=1) == (1, 1)
    # ACNet: 1x3 with padding (0, 1) and 3x1 with (1, 0) inside 3x3 with padding 1.
    assert fusion.kernel_offset((1, 3), (0, 1), kernel_size=3, padding=1) == (1, 0)
    assert fusion.kernel_offset((3, 1), (1, 0), kernel_size=3, padding=1) == (0, 1)
    # ACNet with padding 0: the 1x3 branch crops one row top and bottom (padding -1).
    assert fusion.kernel_offset((1, 3), (-1, 0), kernel_size=3, padding=0) == (1, 0)
    # Dilation 2: 1x1 with padding 0 inside a 3x3 with padding 2.
    assert fusion.kernel_offset(1, 0, kernel_size=3, padding=2, dilation=2) == (1, 1)
    # An even kernel: 2x2 with padding (top 1, left 1, bottom 0, right 0) sits top-left of a 3x3 pad 1.
    assert fusion.kernel_offset(2, (1, 1, 0, 0), kernel_size=3, padding=1) == (0, 0)
    assert fusion.kernel_offset(2, (0, 0, 1, 1), kernel_size=3, padding=1) == (1, 1)


def test_add_branches_golden_repvgg_1x1_plus_identity():
    # 3x3 of ones, a 1x1 of 2 and an identity (1x1 of 1), one channel: centre = 1 + 2 + 1 = 4.
    kernel, bias = fusion.add_branches((np.ones((1, 1, 3, 3)), [0.5]), ([[[[2.0]]]], [0.25]),
                                       (fusion.identity_kernel(1), None))
    np.testing.assert_array_equal(kernel, [[[[1, 1, 1], [1, 4, 1], [1, 1, 1]]]])
    np.testing.assert_array_equal(bias, [0.75])
    kernel, _ = fusion.add_branches(([[[[2.0]]]], None), kernel_size=(3, 5))
    np.testing.assert_array_equal(kernel, [[[[0, 0, 0, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 0, 0]]]])


def test_scale_channels_golden():
    # Two output channels of a 1x1 conv: w = [2, 3], b = [1, -1]; then y = t * conv + s with
    # t = [3, 0], s = [-0.5, 4]:  W' = [6, 0], b' = [3*1 - 0.5, 0*(-1) + 4] = [2.5, 4].
    kernel, bias = fusion.scale_channels(([[[[2.0]]], [[[3.0]]]], [1.0, -1.0]), [3.0, 0.0], [-0.5, 4.0])
    np.testing.assert_array_equal(kernel, [[[[6.0]]], [[[0.0]]]])
    np.testing.assert_array_equal(bias, [2.5, 4.0])
    # Check on x = 5: conv gives [11, 14], the affine map [3*11 - 0.5, 4] = [32.5, 4]; fused the same.
    x = np.full((1, 1, 1, 1), 5.0)
    np.testing.assert_array_equal(ops.conv2d(x, kernel, bias)[0, :, 0, 0], [32.5, 4.0])
    # A scalar factor (a difference of branches: -1) and no shift, no bias.
    kernel, bias = fusion.scale_channels((np.ones((2, 1, 1, 2), np.float32), None), -1.0)
    assert kernel.dtype == bias.dtype == np.float32
    np.testing.assert_array_equal(kernel, -np.ones((2, 1, 1, 2)))
    np.testing.assert_array_equal(bias, [0.0, 0.0])


def test_add_branches_golden_offsets():
    # A 3x3 of ones (padding 1), a 2x2 of twos with padding (1, 1, 0, 0) -> offset (0, 0),
    # a 1x1 of four with padding (-1, -1, 1, 1) -> offset (2, 2) (kernel_offset says so):
    #   [[1+2, 1+2, 1],
    #    [1+2, 1+2, 1],
    #    [1,   1,   1+4]]
    k3, k2, k1 = np.ones((1, 1, 3, 3)), np.full((1, 1, 2, 2), 2.0), np.full((1, 1, 1, 1), 4.0)
    offsets = [fusion.kernel_offset(k, p, kernel_size=3, padding=1)
               for k, p in ((3, 1), (2, (1, 1, 0, 0)), (1, (-1, -1, 1, 1)))]
    assert offsets == [(0, 0), (0, 0), (2, 2)]
    kernel, bias = fusion.add_branches((k3, [1.0]), (k2, [0.5]), (k1, None), offsets=offsets)
    np.testing.assert_array_equal(kernel, [[[[3, 3, 1], [3, 3, 1], [1, 1, 5]]]])
    np.testing.assert_array_equal(bias, [1.5])
    # Default size with offsets: the smallest that holds every placed kernel (here 4x3: a 1x1 at row 3).
    kernel, _ = fusion.add_branches((k3, None), (k1, None), offsets=[(0, 0), (3, 1)])
    np.testing.assert_array_equal(kernel, [[[[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 4, 0]]]])
    # None in the list centres that branch.
    kernel, _ = fusion.add_branches((k3, None), (k1, None), offsets=[None, None])
    np.testing.assert_array_equal(kernel, [[[[1, 1, 1], [1, 5, 1], [1, 1, 1]]]])


def test_add_branches_golden_scales():
    # Pending factors multiply the kernels only: 3 * ones(3x3) + (-1) * [[2]] centred; biases as given.
    kernel, bias = fusion.add_branches((np.ones((1, 1, 3, 3)), [1.0]), ([[[[2.0]]]], [0.25]),
                                       scales=[[3.0], [-1.0]])
    np.testing.assert_array_equal(kernel, [[[[3, 3, 3], [3, 1, 3], [3, 3, 3]]]])
    np.testing.assert_array_equal(bias, [1.25])
    # float32 kernels, float64 result on request
    kernel, bias = fusion.add_branches((np.ones((1, 1, 1, 1), np.float32), None), scales=[[0.1]],
                                       dtype=np.float64)
    assert kernel.dtype == bias.dtype == np.float64 and kernel[0, 0, 0, 0] == 0.1

def test_merge_sequential_golden():
    # 1x1: y1 = 2 x + 1 (one channel). 3x3 of ones + 0.5: y = sum of 9 taps of y1 + 0.5.
    # Merged: W = 2 * ones, b = 0.5 + 9 * 1 = 9.5.
    kernel, bias = fusion.merge_sequential(([[[[2.0]]]], [1.0]), (np.ones((1, 1, 3, 3)), [0.5]))
    np.testing.assert_array_equal(kernel, 2 * np.ones((1, 1, 3, 3)))
    np.testing.assert_array_equal(bias, [9.5])


def test_merge_pointwise_golden():
    # 3x3 kernel K (one channel) + bias 1, then 1x1 mapping 1 -> 2 channels with weights (3, -1), bias (0, 2).
    k = np.arange(9.0).reshape(1, 1, 3, 3)
    kernel, bias = fusion.merge_pointwise((k, [1.0]), ([[[[3.0]]], [[[-1.0]]]], [0.0, 2.0]))
    np.testing.assert_array_equal(kernel, np.stack([3 * k[0], -k[0]]))
    np.testing.assert_array_equal(bias, [3.0, 1.0])  # (3*1 + 0, -1*1 + 2)


def test_merge_pointwise_grouped_golden():
    # First conv: 2 groups of one 1x1 channel, weights (2, 3), biases (1, -1). Second: 1x1 with 2 groups,
    # output o reads channel o only, weights (4, 5), biases (0.5, 0.25). gcd(2, 2) = 2 groups survive.
    first = (np.array([2.0, 3.0]).reshape(2, 1, 1, 1), [1.0, -1.0])
    second = (np.array([4.0, 5.0]).reshape(2, 1, 1, 1), [0.5, 0.25])
    kernel, bias = fusion.merge_pointwise(first, second, groups=2, second_groups=2)
    np.testing.assert_array_equal(kernel, np.array([8.0, 15.0]).reshape(2, 1, 1, 1))  # (4*2, 5*3)
    np.testing.assert_array_equal(bias, [4.5, -4.75])  # (4*1 + 0.5, 5*(-1) + 0.25)
    # The same pair with a dense 1x1 (weights 4, 5 on both channels) becomes one dense 1x1 conv.
    kernel, bias = fusion.merge_pointwise(first, (np.array([4.0, 5.0]).reshape(1, 2, 1, 1), [0.5]), groups=2)
    np.testing.assert_array_equal(kernel, np.array([8.0, 15.0]).reshape(1, 2, 1, 1))
    np.testing.assert_array_equal(bias, [-0.5])  # 4*1 + 5*(-1) + 0.5


def test_conv_to_fc_golden_1x1():
    # A 1x1 conv of weight 3 and bias 1 on a (1, 1, 2) input is the matrix 3 * I_2 and bias (1, 1).
    matrix, bias = fusion.conv_to_fc([[[[3.0]]]], [1.0], input_shape=(1, 1, 2))
    np.testing.assert_array_equal(matrix, [[3, 0], [0, 3]])
    np.testing.assert_array_equal(bias, [1, 1])
    # A 1x2 kernel (a, b) on a 1x3 row, no padding: rows [a b 0], [0 a b].
    matrix, _ = fusion.conv_to_fc([[[[5.0, 7.0]]]], None, input_shape=(1, 1, 3))
    np.testing.assert_array_equal(matrix, [[5, 7, 0], [0, 5, 7]])


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------

def test_fuse_bn_mismatched_channels_names_shapes():
    with pytest.raises(ShapeError, match=r"\(3,\).*\(4, 2, 3, 3\)"):
        fusion.fuse_bn(np.ones((4, 2, 3, 3)), None, np.zeros(3), np.ones(3), np.ones(3), np.zeros(3))
    with pytest.raises(ShapeError, match=r"'var': \(5,\)"):
        fusion.fuse_bn(np.ones((4, 2, 3, 3)), None, np.zeros(4), np.ones(5), np.ones(4), np.zeros(4))
    with pytest.raises(ShapeError, match=r"bias must have shape \(4,\), got \(3,\)"):
        fusion.fuse_bn(np.ones((4, 2, 3, 3)), np.zeros(3), np.zeros(4), np.ones(4), np.ones(4), np.zeros(4))
    with pytest.raises(ShapeError, match=r"OIHW.*\(4, 3, 3\)"):
        fusion.fuse_bn(np.ones((4, 3, 3)), None, np.zeros(4), np.ones(4), np.ones(4), np.zeros(4))


@pytest.mark.parametrize("var, eps", [(-1e-5, 1e-5), (0.0, 0.0), (-1.0, 1e-3), (np.nan, 1e-5)])
def test_fuse_bn_rejects_non_positive_variance(var, eps):
    with pytest.raises(ValueError, match="var \\+ eps must be positive"):
        fusion.fuse_bn(np.ones((2, 1, 1, 1)), None, np.zeros(2), [1.0, var], np.ones(2), np.zeros(2), eps=eps)


def test_add_and_concat_mismatched_shapes():
    with pytest.raises(ShapeError, match=r"\(5, 2, 1, 1\).*\(4, 2, 3, 3\)"):
        fusion.add_branches((np.ones((4, 2, 3, 3)), None), (np.ones((5, 2, 1, 1)), None))
    with pytest.raises(ShapeError, match=r"\(4, 3, 1, 1\).*I = 2"):
        fusion.concat_branches((np.ones((4, 2, 3, 3)), None), (np.ones((4, 3, 1, 1)), None))
    with pytest.raises(ShapeError, match=r"branches\[1\].bias must have shape \(4,\), got \(2,\)"):
        fusion.add_branches((np.ones((4, 2, 3, 3)), None), (np.ones((4, 2, 1, 1)), np.zeros(2)))
    with pytest.raises(ShapeError, match=r"kernel_size \(3, 3\) is smaller"):
        fusion.add_branches((np.ones((4, 2, 5, 5)), None), kernel_size=3)
    with pytest.raises(ShapeError, match="KernelBias or a"):
        fusion.add_branches(np.ones((4, 2, 3, 3)))
    with pytest.raises(ValueError, match="at least one"):
        fusion.concat_branches()


def test_add_branches_bad_offsets_and_scales_name_shapes():
    k3, k2 = (np.ones((4, 2, 3, 3)), None), (np.ones((4, 2, 2, 2)), None)
    with pytest.raises(ShapeError, match=r"offset \(2, 0\) puts the 2x2 kernel \(shape \(4, 2, 2, 2\)\) "
                                         r"outside the 3x3 one"):
        fusion.add_branches(k3, k2, offsets=[(0, 0), (2, 0)], kernel_size=3)
    # without kernel_size the result grows to hold it (4x3), as documented
    assert fusion.add_branches(k3, k2, offsets=[(0, 0), (2, 0)]).kernel.shape == (4, 2, 4, 3)
    with pytest.raises(ShapeError, match=r"offset \(-1, 0\) puts the 2x2 kernel .* outside the 3x3"):
        fusion.add_branches(k3, k2, offsets=[(0, 0), (-1, 0)], kernel_size=3)
    with pytest.raises(ShapeError, match=r"offset \(0, 1\) puts the 3x3 kernel \(shape \(4, 2, 3, 3\)\) "
                                         r"outside the 3x3"):
        fusion.add_branches(k3, k2, offsets=[(0, 1), (0, 0)], kernel_size=3)
    with pytest.raises(ShapeError, match=r"offsets must have one entry per branch: 2 branches, got 1"):
        fusion.add_branches(k3, k2, offsets=[(0, 0)])
    with pytest.raises(ShapeError, match=r"offsets\[1\] must be a \(top, left\) pair"):
        fusion.add_branches(k3, k2, offsets=[(0, 0), "x"])
    with pytest.raises(ShapeError, match=r"cannot centre a 2x2 kernel"):
        fusion.add_branches(k3, k2, offsets=[(0, 0), None])
    with pytest.raises(ShapeError, match=r"scales\[1\] must be a scalar or have shape \(4,\) for the kernel "
                                         r"\(4, 2, 2, 2\), got \(3,\)"):
        fusion.add_branches(k3, k2, scales=[None, np.ones(3)], offsets=[(0, 0), (1, 1)])
    with pytest.raises(ShapeError, match=r"scales must have one entry per branch: 2 branches, got 3"):
        fusion.add_branches(k3, k2, scales=[None, None, None], offsets=[(0, 0), (1, 1)])


def test_scale_channels_bad_input_names_shapes():
    k = (np.ones((4, 2, 3, 3)), None)
    with pytest.raises(ShapeError, match=r"scale must be a scalar or have shape \(4,\) for the kernel "
                                         r"\(4, 2, 3, 3\), got \(2,\)"):
        fusion.scale_channels(k, np.ones(2))
    with pytest.raises(ShapeError, match=r"shift must be a scalar or have shape \(4,\) .* got \(4, 1\)"):
        fusion.scale_channels(k, np.ones(4), np.ones((4, 1)))
    with pytest.raises(ShapeError, match=r"branch.bias must have shape \(4,\), got \(3,\)"):
        fusion.scale_channels((np.ones((4, 2, 3, 3)), np.ones(3)), 2.0)
    with pytest.raises(ShapeError, match=r"branch.kernel must be OIHW \(4-D\), got shape \(4, 3\)"):
        fusion.scale_channels((np.ones((4, 3)), None), 2.0)

def test_impossible_centre_alignment_is_explained():
    with pytest.raises(ShapeError) as info:
        fusion.pad_kernel(np.ones((1, 1, 2, 2)), 3)
    message = str(info.value)
    assert "cannot centre a 2x2 kernel" in message and "3x3" in message
    assert "half a pixel" in message and "offset=(top, left)" in message
    with pytest.raises(ShapeError, match="cannot centre a 1x3 kernel"):
        fusion.add_branches((np.ones((1, 1, 4, 4)), None), (np.ones((1, 1, 1, 3)), None))
    with pytest.raises(ShapeError, match="outside"):
        fusion.pad_kernel(np.ones((1, 1, 2, 2)), 3, offset=(2, 0))
    with pytest.raises(ShapeError, match="smaller than the kernel"):
        fusion.pad_kernel(np.ones((1, 1, 5, 5)), 3)
    with pytest.raises(ShapeError, match="centre tap"):
        fusion.identity_kernel(4, kernel_size=(3, 2))


def test_kernel_offset_impossible_cases():
    with pytest.raises(ShapeError, match="not a multiple of the dilation"):
        fusion.kernel_offset(1, 0, kernel_size=3, padding=1, dilation=2)
    with pytest.raises(ShapeError, match="outside"):
        fusion.kernel_offset(1, 2, kernel_size=3, padding=1)
    with pytest.raises(ShapeError, match="different output size"):
        fusion.kernel_offset(1, (0, 0, 1, 0), kernel_size=3, padding=1)
    with pytest.raises(ShapeError, match="larger than the big one"):
        fusion.kernel_offset(5, 2, kernel_size=3, padding=1)


def test_grouping_errors_name_shapes():
    with pytest.raises(ShapeError, match="groups=3 must divide channels=4"):
        fusion.identity_kernel(4, groups=3)
    with pytest.raises(ShapeError, match="groups=3 must divide channels=4"):
        fusion.avgpool_kernel(4, 3, groups=3)
    with pytest.raises(ShapeError, match=r"groups=3 must divide the kernel's O = 4 "
                                         r"\(kernel shape \(4, 1, 3, 3\)\)"):
        fusion.ungroup_kernel(np.ones((4, 1, 3, 3)), groups=3)


def test_merge_errors_name_shapes():
    w1 = np.ones((4, 3, 1, 1))
    with pytest.raises(ShapeError, match=r"first must be a 1x1 kernel, got first.kernel shape "
                                         r"\(4, 3, 3, 3\)"):
        fusion.merge_sequential((np.ones((4, 3, 3, 3)), None), (np.ones((2, 4, 3, 3)), None))
    with pytest.raises(ShapeError, match=r"\(2, 3, 3, 3\) reads 3 channels per group.*\(4, 3, 1, 1\)"):
        fusion.merge_sequential((w1, None), (np.ones((2, 3, 3, 3)), None))
    with pytest.raises(ShapeError, match=r"groups=3 must divide first's M = 4"):
        fusion.merge_sequential((w1, None), (np.ones((3, 1, 3, 3)), None), groups=3)
    with pytest.raises(ShapeError, match=r"second must be a 1x1 kernel, got second.kernel shape "
                                         r"\(2, 4, 3, 3\)"):
        fusion.merge_pointwise((np.ones((4, 3, 3, 3)), None), (np.ones((2, 4, 3, 3)), None))
    with pytest.raises(ShapeError, match=r"\(2, 5, 1, 1\) must read all M = 4 .*\(4, 3, 3, 3\)"):
        fusion.merge_pointwise((np.ones((4, 3, 3, 3)), None), (np.ones((2, 5, 1, 1)), None))
    with pytest.raises(ShapeError, match=r"\(6, 4, 1, 1\) must read all M = 4 .*second_groups=2"):
        fusion.merge_pointwise((np.ones((4, 3, 3, 3)), None), (np.ones((6, 4, 1, 1)), None), second_groups=2)
    with pytest.raises(ShapeError, match=r"second_groups=2 dividing M and O = 3"):
        fusion.merge_pointwise((np.ones((4, 3, 3, 3)), None), (np.ones((3, 2, 1, 1)), None), second_groups=2)
    with pytest.raises(ShapeError, match=r"groups=3 must divide first's M = 4"):
        fusion.merge_pointwise((np.ones((4, 3, 3, 3)), None), (np.ones((2, 4, 1, 1)), None), groups=3)


def test_conv_to_fc_errors_name_shapes():
    with pytest.raises(ShapeError, match=r"input_shape \(3, 4, 4\) has C = 3.*\(2, 2, 3, 3\)"):
        fusion.conv_to_fc(np.ones((2, 2, 3, 3)), None, input_shape=(3, 4, 4))
    with pytest.raises(ShapeError, match=r"input_shape must be \(C, H, W\)"):
        fusion.conv_to_fc(np.ones((2, 2, 3, 3)), None, input_shape=(2, 4))
    with pytest.raises(ShapeError, match="empty output"):
        fusion.conv_to_fc(np.ones((2, 2, 3, 3)), None, input_shape=(2, 2, 2))


def test_bad_kernel_size_arguments():
    with pytest.raises(ShapeError, match="kernel_size must be an int or a"):
        fusion.avgpool_kernel(2, (3, 3, 3))
    with pytest.raises(ShapeError, match="kernel_size must be >= 1"):
        fusion.avgpool_kernel(2, 0)


# ----------------------------------------------------------------------------
# inputs never mutated, dtype kept
# ----------------------------------------------------------------------------

def _frozen(rng, *shape, dtype=np.float64):
    a = rng.standard_normal(shape).astype(dtype)
    a.flags.writeable = False  # any in-place write raises
    return a


def _calls(rng, dtype):
    """One call of every public function on read-only inputs; returns (name, inputs, result)."""
    k33 = _frozen(rng, 4, 2, 3, 3, dtype=dtype)
    k11 = _frozen(rng, 4, 2, 1, 1, dtype=dtype)
    b = _frozen(rng, 4, dtype=dtype)
    bn = [_frozen(rng, 4, dtype=dtype), np.abs(_frozen(rng, 4, dtype=dtype)) + 0.5,
          _frozen(rng, 4, dtype=dtype), _frozen(rng, 4, dtype=dtype)]
    for a in bn:
        a.flags.writeable = False
    first = (_frozen(rng, 4, 3, 1, 1, dtype=dtype), b)
    second = (_frozen(rng, 6, 2, 3, 3, dtype=dtype), _frozen(rng, 6, dtype=dtype))
    q = _frozen(rng, 5, 4, 1, 1, dtype=dtype)
    return [
        ("fuse_bn", [k33, b, *bn], lambda: fusion.fuse_bn(k33, b, *bn)),
        ("scale_channels", [k33, b, *bn[:2]], lambda: fusion.scale_channels((k33, b), bn[0], bn[1])),
        ("scale_channels (scalar)", [k11, b], lambda: fusion.scale_channels((k11, b), 1.0)),
        ("pad_kernel", [k11], lambda: fusion.pad_kernel(k11, 3)),
        ("add_branches", [k33, k11, b], lambda: fusion.add_branches((k33, b), (k11, b))),
        ("add_branches (offsets, scales)", [k33, k11, b, *bn[:2]],
         lambda: fusion.add_branches((k33, b), (k11, b), offsets=[None, (0, 2)], scales=[bn[0], bn[1]])),
        ("add_branches (ones)", [k33, b], lambda: fusion.add_branches((k33, b), scales=[np.ones(4)])),
        ("concat_branches", [k33, k11, b], lambda: fusion.concat_branches((k33, b), (k11, None))),
        ("ungroup_kernel", [k33], lambda: fusion.ungroup_kernel(k33, groups=2)),
        ("merge_sequential", [*first, *second], lambda: fusion.merge_sequential(first, second, groups=2)),
        ("merge_pointwise", [k33, b, q], lambda: fusion.merge_pointwise((k33, b), (q, None), groups=2)),
        ("conv_to_fc", [k33, b], lambda: fusion.conv_to_fc(k33, b, input_shape=(4, 3, 3), padding=1,
                                                           groups=2)),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_never_mutated_and_dtype_kept(dtype):
    rng = np.random.default_rng(0)
    for name, inputs, call in _calls(rng, dtype):
        copies = [a.copy() for a in inputs]
        result = call()
        for before, after in zip(copies, inputs):
            np.testing.assert_array_equal(before, after, err_msg=f"{name} changed an input")
        parts = result if isinstance(result, tuple) else (result,)
        for part in parts:
            assert part.dtype == dtype, f"{name} returned {part.dtype} for {np.dtype(dtype)} input"
            assert all(part is not a for a in inputs), f"{name} returned one of its inputs"
            assert not any(np.shares_memory(part, a) for a in inputs), f"{name} returned a view of an input"


def test_generated_kernels_take_the_dtype_asked():
    assert fusion.identity_kernel(3, kernel_size=3, dtype=np.float32).dtype == np.float32
    assert fusion.avgpool_kernel(3, 3, dtype=np.float32).dtype == np.float32
    # Integer kernels are promoted to float64 (a fused kernel is not integer in general).
    kernel, bias = fusion.fuse_bn(np.ones((1, 1, 1, 1), dtype=np.int64), None, [0.0], [1.0], [1.0], [0.0])
    assert kernel.dtype == np.float64 and bias.dtype == np.float64


def test_add_branches_accumulates_like_padding_each_kernel():
    # add_branches adds each kernel into its centred slice of one float64 accumulator; the
    # result must be exactly the sum of the centred, padded kernels (hand-checkable: ones).
    k3 = np.ones((2, 1, 3, 3), np.float32)
    k1 = np.full((2, 1, 1, 1), 2.0, np.float32)
    k13 = np.full((2, 1, 1, 3), 4.0, np.float32)
    kernel, bias = fusion.add_branches((k3, [1.0, 2.0]), (k1, None), (k13, [0.5, 0.5]), kernel_size=5)
    assert kernel.dtype == bias.dtype == np.float32 and kernel.shape == (2, 1, 5, 5)
    expected = sum(fusion.pad_kernel(k.astype(np.float64), 5) for k in (k3, k1, k13))
    np.testing.assert_array_equal(kernel, expected)
    assert kernel[0, 0, 2].tolist() == [0, 5, 7, 5, 0] and kernel[0, 0, 1].tolist() == [0, 1, 1, 1, 0]
    np.testing.assert_array_equal(bias, [1.5, 2.5])
    # an integer first kernel gives a float64 result (a fused kernel is not integer in general)
    assert fusion.add_branches((np.ones((1, 1, 1, 1), np.int64), None)).kernel.dtype == np.float64


# ----------------------------------------------------------------------------
# no needless copies (memory, not time: traced allocations are deterministic)
# ----------------------------------------------------------------------------

def _peak_bytes(call):
    """Peak bytes allocated (NumPy reports its buffers to tracemalloc) while ``call`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, result


def test_fuse_bn_makes_no_float64_copy_of_a_float32_kernel():
    # The product is taken in float64 chunk by chunk and rounded into the float32 result: the peak
    # is the result (1x the kernel's bytes) plus small buffers. A float64 copy of the kernel and a
    # float64 product (what astype(float64) * t then astype(float32) does) would be 4x more.
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((256, 64, 3, 3)).astype(np.float32)
    bn = [rng.standard_normal(256), rng.uniform(0.5, 2, 256), rng.standard_normal(256), rng.standard_normal(256)]
    peak, (fused, _) = _peak_bytes(lambda: fusion.fuse_bn(kernel, None, *bn))
    # (the ufunc's casting buffers add a fixed ~0.2 MB: measured 1.34x here)
    assert fused.dtype == np.float32 and peak < 1.5 * kernel.nbytes, peak / kernel.nbytes
    t, _ = fusion.bn_scale_shift(*bn)
    np.testing.assert_array_equal(fused, (kernel.astype(np.float64) * t[:, None, None, None]).astype(np.float32))


def test_add_branches_with_scales_makes_one_accumulator():
    # A big float32 3x3 with a pending BN factor plus a scaled 1x1, summed in float64 (the ONNX
    # converter's case): the peak is the float64 accumulator (2x the 3x3's float32 bytes) plus
    # the 1x1 product; scaling each kernel first and then copying it into an accumulator would
    # hold two float64 kernels (4x).
    rng = np.random.default_rng(1)
    k3 = rng.standard_normal((256, 64, 3, 3)).astype(np.float32)
    k1 = rng.standard_normal((256, 64, 1, 1)).astype(np.float32)
    t3, t1 = rng.uniform(0.5, 2, 256), rng.uniform(0.5, 2, 256)
    peak, (kernel, _) = _peak_bytes(lambda: fusion.add_branches((k3, None), (k1, None), scales=[t3, t1],
                                                                dtype=np.float64))
    assert kernel.dtype == np.float64 and peak < 2.5 * k3.nbytes, peak / k3.nbytes
    ref = k3 * t3[:, None, None, None]
    ref[:, :, 1:2, 1:2] += k1 * t1[:, None, None, None]
    assert relative_error(kernel, ref) <= 1e-12
