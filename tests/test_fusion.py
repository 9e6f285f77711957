"""Property tests of ``repnp.fusion``: every fused conv equals the unfused composition.

The reference is always the *unfused* computation done with ``repnp.ops`` in
float64 on the same numbers (parameters drawn in the tested dtype, then cast
up), so a float32 case measures the rounding of the fused float32 path only.
Error metric of the project (``repnp.tolerance``): ``max|fused - ref| / max|ref|``, float64
<= 1e-12, float32 <= 1e-5. Weights are N(0, 1/fan_in); every conv is followed
by a BN with mean != 0, var != 1, gamma != 1, beta != 0 (``random_bn``).

Hand-typed goldens and bad-input checks are in ``test_fusion_goldens.py``, the
onnxruntime cross-checks in ``test_fusion_onnx.py``.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import fusion, ops
from repnp.blocks.base import random_bn, random_conv_weight
from repnp.testing import TOLERANCES, relative_error

SQUARE = [(1, 1), (3, 3), (5, 5), (7, 7)]
ASYMMETRIC = [(1, 3), (3, 1), (1, 5), (5, 1)]
KERNELS = SQUARE + ASYMMETRIC
DTYPES = [np.float64, np.float32]
BATCH = 2


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def assert_close(got, ref, dtype, what=""):
    """The tolerance rule: max|got - ref| / max|ref| within the dtype's bound."""
    assert np.shape(got) == ref.shape, f"{what}: shape {np.shape(got)} != reference {ref.shape}"
    assert np.max(np.abs(ref)) > 0, f"{what}: the reference is all zeros, the test proves nothing"
    err, tol = relative_error(got, ref), TOLERANCES[np.dtype(dtype)]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:g}"


def as64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


def conv_bn_ref(x, w, b, bn, **geometry):
    """Unfused conv then BN, in float64; negative paddings crop (see conv_signed)."""
    x, w, b = as64(x, w, b)
    mean, var, gamma, beta = as64(bn.mean, bn.var, bn.gamma, bn.beta)
    return ops.batch_norm(conv_signed(x, w, b, **geometry), mean, var, gamma, beta, eps=bn.eps)


def conv_signed(x, w, b=None, *, padding=0, stride=1, dilation=1, groups=1):
    """``ops.conv2d`` with ONNX-order padding that may be negative: a negative pad crops.

    Written out here (crop, then pad) so that the reference does not depend on
    the alignment rule it checks.
    """
    if isinstance(padding, int):
        padding = (padding,) * 4
    elif len(padding) == 2:
        padding = (padding[0], padding[1], padding[0], padding[1])
    top, left, bottom, right = padding
    h, w_ = x.shape[2:]
    x = x[:, :, max(0, -top):h - max(0, -bottom), max(0, -left):w_ - max(0, -right)]
    return ops.conv2d(x, w, b, padding=tuple(max(0, p) for p in padding), stride=stride,
                      dilation=dilation, groups=groups)


def effective(k, d):
    """Extent of a dilated kernel along one axis."""
    return d * (k - 1) + 1


@st.composite
def channel_groups(draw, *, out_free=True):
    """(C_in, C_out, groups) for a dense, an in-between grouped or a depthwise conv."""
    mode = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if mode == "dense":
        groups, per_group = 1, draw(st.integers(1, 3))
    elif mode == "grouped":
        groups, per_group = draw(st.integers(2, 3)), 2
    else:
        groups, per_group = draw(st.integers(2, 4)), 1
    c_in = groups * per_group
    c_out = groups * draw(st.integers(1, 2)) if out_free else c_in
    return c_in, c_out, groups


def reads_input(size, kernel, dilation, stride, lead, trail):
    """Whether some output pixel of a conv along one axis has a tap on a real input pixel.

    Output pixel ``i`` reads padded positions ``stride*i + dilation*j``
    (``j < kernel``); the input occupies ``[lead, lead + size)`` of the padded
    axis. Without such a tap, every output equals the bias: with no bias the
    reference is all zeros and the tolerance rule (which divides by max|ref|)
    proves nothing.
    """
    extent = effective(kernel, dilation)
    out = (lead + size + trail - extent) // stride + 1
    taps = stride * np.arange(max(out, 0))[:, None] + dilation * np.arange(kernel)[None, :]
    return bool(np.any((taps >= lead) & (taps < lead + size)))


def spatial_size(draw, kernel, dilation, lead, trail, *, stride=1, extra=4):
    """An input length giving at least one output pixel that reads the input (and not too many).

    The drawn length is raised to the next one where some output pixel has a
    tap on the input (``reads_input``): a 1-pixel input under a stride-2 conv
    with only padding in front, say, is otherwise all padding.
    """
    low = max(1, effective(kernel, dilation) - lead - trail)
    size = draw(st.integers(low, low + extra))
    while not reads_input(size, kernel, dilation, stride, lead, trail):
        size += 1
    return size


def input_tensor(rng, c, h, w, dtype):
    return rng.standard_normal((BATCH, c, h, w)).astype(dtype)


def one_conv(rng, data, dtype, ks, cg, dilation, pads, with_bias, *, stride):
    """An input of a size that gives at least one output pixel, a conv weight and maybe a bias."""
    c_in, c_out, groups = cg
    h = spatial_size(data.draw, ks[0], dilation[0], pads[0], pads[2], stride=stride[0])
    w = spatial_size(data.draw, ks[1], dilation[1], pads[1], pads[3], stride=stride[1])
    weight = random_conv_weight(rng, c_out, c_in // groups, ks, dtype=dtype)
    bias = (0.5 * rng.standard_normal(c_out)).astype(dtype) if with_bias else None
    return input_tensor(rng, c_in, h, w, dtype), weight, bias


def test_reads_input_on_the_audited_case():
    """The case that made the affine test flaky: 1-pixel input, stride 2, pad 1 in front only."""
    assert not reads_input(1, 1, 1, 2, 1, 0)   # the only output pixel reads the top pad
    assert reads_input(2, 1, 1, 2, 1, 0)       # one more row: pixel 1 reads input row 1
    assert reads_input(1, 3, 1, 1, 1, 1)       # a "same" 3x3 sees its one pixel
    assert not reads_input(1, 2, 3, 1, 1, 1)   # taps at 0 and 3 straddle the pixel at 1


@given(kernel=st.integers(1, 7), dilation=st.integers(1, 3), stride=st.integers(1, 3), lead=st.integers(0, 4),
       trail=st.integers(0, 4), data=st.data())
def test_spatial_size_always_reads_the_input(kernel, dilation, stride, lead, trail, data):
    size = spatial_size(data.draw, kernel, dilation, lead, trail, stride=stride)
    # Brute force on a padded axis: some output window has a tap on a real pixel.
    padded = np.zeros(lead + size + trail)
    padded[lead:lead + size] = 1.0
    x = padded[None, None, :, None]
    y = ops.conv2d(x, np.ones((1, 1, kernel, 1)), stride=(stride, 1), dilation=(dilation, 1))
    assert y.shape[2] >= 1 and y.max() > 0


seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from(DTYPES)
pairs12 = st.tuples(st.integers(1, 2), st.integers(1, 2))


# ----------------------------------------------------------------------------
# rule 1: conv + BN
# ----------------------------------------------------------------------------

@given(seed=seeds, dtype=dtypes, ks=st.sampled_from(KERNELS), cg=channel_groups(), stride=pairs12,
       dilation=pairs12, pads=st.tuples(*[st.integers(0, 3)] * 4), with_bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), data=st.data())
def test_fuse_bn_equals_conv_then_bn(seed, dtype, ks, cg, stride, dilation, pads, with_bias, eps, data):
    rng = np.random.default_rng(seed)
    c_in, c_out, groups = cg
    x, weight, bias = one_conv(rng, data, dtype, ks, cg, dilation, pads, with_bias, stride=stride)
    bn = random_bn(rng, c_out, eps=eps, dtype=dtype)
    geometry = dict(stride=stride, padding=pads, dilation=dilation, groups=groups)

    kernel, fused_bias = fusion.fuse_bn(weight, bias, bn.mean, bn.var, bn.gamma, bn.beta, eps=eps)
    assert kernel.dtype == dtype and fused_bias.dtype == dtype
    assert kernel.shape == weight.shape and fused_bias.shape == (c_out,)
    got = ops.conv2d(x, kernel, fused_bias, **geometry)
    assert_close(got, conv_bn_ref(x, weight, bias, bn, **geometry), dtype, "fuse_bn")


# ----------------------------------------------------------------------------
# rule 4: identity as a kernel
# ----------------------------------------------------------------------------

@given(seed=seeds, dtype=dtypes, ks=st.sampled_from([(1, 1), (3, 3), (5, 5), (7, 7), (1, 3), (3, 1),
                                                    (1, 5), (5, 1), (3, 5), (5, 3)]),
       cg=channel_groups(out_free=False), dilation=pairs12, data=st.data())
def test_identity_kernel_is_identity(seed, dtype, ks, cg, dilation, data):
    rng = np.random.default_rng(seed)
    c, _, groups = cg
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    x = input_tensor(rng, c, h, w, dtype)
    kernel = fusion.identity_kernel(c, groups=groups, kernel_size=ks, dtype=dtype)
    assert kernel.shape == (c, c // groups) + ks and kernel.dtype == dtype
    padding = (dilation[0] * (ks[0] // 2), dilation[1] * (ks[1] // 2))
    y = ops.conv2d(x, kernel, padding=padding, dilation=dilation, groups=groups)
    # One tap of 1, the others 0: the sum is exact, so equality is exact too.
    np.testing.assert_array_equal(y, x)

    # A BN-only skip branch is rule 1 applied to this kernel.
    bn = random_bn(rng, c, dtype=dtype)
    fused = fusion.fuse_bn(kernel, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
    ref = ops.batch_norm(x.astype(np.float64), *as64(bn.mean, bn.var, bn.gamma, bn.beta), eps=bn.eps)
    got = ops.conv2d(x, *fused, padding=padding, dilation=dilation, groups=groups)
    assert_close(got, ref, dtype, "BN skip as a conv")


def test_identity_kernel_differs_from_the_buggy_port_form():
    """``[:, :, k//2, k//2] = 1`` sums the channels of a group: wrong unless depthwise."""
    x = np.arange(2 * 4 * 3 * 3, dtype=np.float64).reshape(2, 4, 3, 3)
    buggy = np.zeros((4, 2, 3, 3))
    buggy[:, :, 1, 1] = 1
    assert not np.array_equal(ops.conv2d(x, buggy, padding=1, groups=2), x)
    np.testing.assert_array_equal(
        ops.conv2d(x, fusion.identity_kernel(4, groups=2, kernel_size=3), padding=1, groups=2), x)
    # Depthwise, the two forms coincide (the one case the shortcut is right).
    depthwise = np.zeros((4, 1, 3, 3))
    depthwise[:, :, 1, 1] = 1
    np.testing.assert_array_equal(fusion.identity_kernel(4, groups=4, kernel_size=3), depthwise)


# ----------------------------------------------------------------------------
# rules 2 and 3: centred branches
# ----------------------------------------------------------------------------

def smaller_sizes(size):
    """Kernel sizes that centre inside ``size`` (same parity, not larger)."""
    return [k for k in (1, 3, 5, 7) if k <= size]


@st.composite
def branch_sets(draw):
    """A big kernel (odd, maybe non-square), 1-3 smaller centred ones, all with one geometry."""
    big = draw(st.sampled_from([(3, 3), (5, 5), (7, 7), (3, 5), (5, 3), (1, 5), (5, 1), (1, 3), (3, 1)]))
    smalls = draw(st.lists(st.tuples(st.sampled_from(smaller_sizes(big[0])),
                                     st.sampled_from(smaller_sizes(big[1]))), min_size=1, max_size=3))
    return [big] + smalls


@given(seed=seeds, dtype=dtypes, sizes=branch_sets(), cg=channel_groups(), stride=pairs12,
       dilation=pairs12, extra=st.tuples(*[st.integers(-1, 1)] * 2), data=st.data())
def test_add_branches_equals_sum_of_conv_bn(seed, dtype, sizes, cg, stride, dilation, extra, data):
    """Each branch of size k uses padding p - d*(K - k)/2 where the big one uses p.

    ``p`` ranges around "same" padding, so that a small branch's padding is
    sometimes negative: it then crops its input (ACNet's ``CropLayer``).
    """
    rng = np.random.default_rng(seed)
    c_in, c_out, groups = cg
    (kh, kw), (dh, dw) = sizes[0], dilation
    big_pad = (max(0, dh * (kh // 2) + extra[0]), max(0, dw * (kw // 2) + extra[1]))
    h = spatial_size(data.draw, kh, dh, big_pad[0], big_pad[0], stride=stride[0])
    w = spatial_size(data.draw, kw, dw, big_pad[1], big_pad[1], stride=stride[1])
    x = input_tensor(rng, c_in, h, w, dtype)

    branches, ref = [], 0
    for size in sizes:
        weight = random_conv_weight(rng, c_out, c_in // groups, size, dtype=dtype)
        bn = random_bn(rng, c_out, dtype=dtype)
        pad = (big_pad[0] - dh * (kh - size[0]) // 2, big_pad[1] - dw * (kw - size[1]) // 2)
        ref = ref + conv_bn_ref(x, weight, None, bn, padding=pad, stride=stride, dilation=dilation,
                                groups=groups)
        branches.append(fusion.fuse_bn(weight, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps))
    kernel, bias = fusion.add_branches(*branches)
    assert kernel.shape == (c_out, c_in // groups, kh, kw) and kernel.dtype == dtype
    got = ops.conv2d(x, kernel, bias, padding=big_pad, stride=stride, dilation=dilation, groups=groups)
    assert_close(got, ref, dtype, "add_branches")


@given(seed=seeds, dtype=dtypes, cg=channel_groups(out_free=False), k=st.sampled_from([3, 5, 7]),
       stride=pairs12, dilation=pairs12, data=st.data())
def test_repvgg_mobileone_branches_with_identity(seed, dtype, cg, k, stride, dilation, data):
    """KxK-BN + 1x1-BN + BN skip (RepVGG / MobileOne); the skip exists only at stride 1."""
    rng = np.random.default_rng(seed)
    c, _, groups = cg
    stride = (1, 1) if data.draw(st.booleans()) else stride
    pad = (dilation[0] * (k // 2), dilation[1] * (k // 2))
    h, w = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))
    x = input_tensor(rng, c, h, w, dtype)
    geometry = dict(stride=stride, dilation=dilation, groups=groups)
    w3, w1 = (random_conv_weight(rng, c, c // groups, s, dtype=dtype) for s in (k, 1))
    bn3, bn1, bn0 = (random_bn(rng, c, dtype=dtype) for _ in range(3))
    ref = conv_bn_ref(x, w3, None, bn3, padding=pad, **geometry) + conv_bn_ref(x, w1, None, bn1, **geometry)
    parts = [fusion.fuse_bn(w3, None, bn3.mean, bn3.var, bn3.gamma, bn3.beta, eps=bn3.eps),
             fusion.fuse_bn(w1, None, bn1.mean, bn1.var, bn1.gamma, bn1.beta, eps=bn1.eps)]
    if stride == (1, 1):
        ref = ref + ops.batch_norm(x.astype(np.float64), *as64(bn0.mean, bn0.var, bn0.gamma, bn0.beta),
                                   eps=bn0.eps)
        ident = fusion.identity_kernel(c, groups=groups, kernel_size=1, dtype=dtype)
        parts.append(fusion.fuse_bn(ident, None, bn0.mean, bn0.var, bn0.gamma, bn0.beta, eps=bn0.eps))
    got = ops.conv2d(x, *fusion.add_branches(*parts), padding=pad, **geometry)
    assert_close(got, ref, dtype, "RepVGG branches")


# ----------------------------------------------------------------------------
# rule 3 with an explicit offset: asymmetric paddings, crops, even kernels
# ----------------------------------------------------------------------------

@given(seed=seeds, dtype=dtypes, big=st.sampled_from([(3, 3), (5, 5), (3, 5), (4, 4), (2, 3)]),
       cg=channel_groups(), stride=pairs12, dilation=pairs12,
       big_pads=st.tuples(*[st.integers(0, 3)] * 4), data=st.data())
def test_pad_kernel_offset_equals_shifted_conv(seed, dtype, big, cg, stride, dilation, big_pads, data):
    """A small kernel of any size at any offset, its conv with the paddings that offset implies.

    Along one axis the small conv needs ``p = P - d*offset`` in front and
    ``P_end - d*(K - k - offset)`` behind (negative: a crop). ``kernel_offset``
    must find the offset back from the two paddings.
    """
    rng = np.random.default_rng(seed)
    c_in, c_out, groups = cg
    small = (data.draw(st.integers(1, big[0])), data.draw(st.integers(1, big[1])))
    offset = (data.draw(st.integers(0, big[0] - small[0])), data.draw(st.integers(0, big[1] - small[1])))
    (dh, dw) = dilation
    top, left, bottom, right = big_pads
    small_pads = (top - dh * offset[0], left - dw * offset[1],
                  bottom - dh * (big[0] - small[0] - offset[0]), right - dw * (big[1] - small[1] - offset[1]))
    # Keep at least one row and column after the small conv's crops (the reference crops, then pads).
    crop_h = -min(0, small_pads[0]) - min(0, small_pads[2])
    crop_w = -min(0, small_pads[1]) - min(0, small_pads[3])
    h = max(crop_h + 1, spatial_size(data.draw, big[0], dh, top, bottom, stride=stride[0]))
    w = max(crop_w + 1, spatial_size(data.draw, big[1], dw, left, right, stride=stride[1]))
    x = input_tensor(rng, c_in, h, w, dtype)
    weight = random_conv_weight(rng, c_out, c_in // groups, small, dtype=dtype)
    bn = random_bn(rng, c_out, dtype=dtype)
    geometry = dict(stride=stride, dilation=dilation, groups=groups)

    assert fusion.kernel_offset(small, small_pads, kernel_size=big, padding=big_pads,
                                dilation=dilation) == offset
    placed = fusion.pad_kernel(weight, big, offset=offset)
    kernel, bias = fusion.fuse_bn(placed, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
    got = ops.conv2d(x, kernel, bias, padding=big_pads, **geometry)
    assert_close(got, conv_bn_ref(x, weight, None, bn, padding=small_pads, **geometry), dtype,
                 "pad_kernel with offset")


@pytest.mark.parametrize("dtype", DTYPES)
def test_acnet_with_crop_and_asymmetric_offsets(dtype):
    """ACNet with padding 0 < K//2: the 1xK and Kx1 branches crop their input (explicit slices).

    Square 3x3 with padding 0; the 1x3 branch sees ``x[:, :, 1:-1, :]``, the
    3x1 branch ``x[:, :, :, 1:-1]``; a fourth branch is a 2x2 conv with
    padding (top, left, bottom, right) = (0, 0, -1, -1) i.e. a crop of the
    last row and column, which sits at offset (0, 0) of the 3x3.
    """
    rng = np.random.default_rng(7)
    c_in, c_out = 3, 4
    x = input_tensor(rng, c_in, 7, 8, dtype)
    sizes = [(3, 3), (1, 3), (3, 1), (2, 2)]
    weights = [random_conv_weight(rng, c_out, c_in, s, dtype=dtype) for s in sizes]
    bns = [random_bn(rng, c_out, dtype=dtype) for _ in sizes]
    inputs = [x, x[:, :, 1:-1, :], x[:, :, :, 1:-1], x[:, :, :-1, :-1]]
    ref = sum(conv_bn_ref(xi, wi, None, bn, stride=2) for xi, wi, bn in zip(inputs, weights, bns))

    offsets = [fusion.kernel_offset(s, pads, kernel_size=3, padding=0)
               for s, pads in zip(sizes, [0, (-1, 0), (0, -1), (0, 0, -1, -1)])]
    assert offsets == [(0, 0), (1, 0), (0, 1), (0, 0)]
    placed = [fusion.fuse_bn(fusion.pad_kernel(wi, 3, offset=off), None, bn.mean, bn.var, bn.gamma,
                             bn.beta, eps=bn.eps) for wi, off, bn in zip(weights, offsets, bns)]
    got = ops.conv2d(x, *fusion.add_branches(*placed), stride=2)
    assert_close(got, ref, dtype, "ACNet with crops")
    # Centring the 2x2 is impossible, and centring is what add_branches does by default.
    with pytest.raises(ValueError, match="centre"):
        fusion.add_branches(*[(wi, None) for wi in weights])


# ----------------------------------------------------------------------------
# rule 1 in general: any per-channel affine map after a conv
# ----------------------------------------------------------------------------

def channel_factors(rng, c, dtype):
    """Per-channel factors of both signs, one of them zero when there are several channels."""
    t = (rng.uniform(0.3, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    if c > 1:
        t[rng.integers(c)] = 0.0
    return t


@given(seed=seeds, dtype=dtypes, ks=st.sampled_from(KERNELS), cg=channel_groups(), stride=pairs12,
       dilation=pairs12, pads=st.tuples(*[st.integers(0, 2)] * 4), with_bias=st.booleans(),
       with_shift=st.booleans(), scalar=st.booleans(), data=st.data())
def test_scale_channels_equals_conv_then_affine(seed, dtype, ks, cg, stride, dilation, pads, with_bias,
                                                with_shift, scalar, data):
    """``t * conv(x; W, b) + s`` per output channel (a layer scale, a Mul/Add, a BN) is one conv."""
    rng = np.random.default_rng(seed)
    c_in, c_out, groups = cg
    x, weight, bias = one_conv(rng, data, dtype, ks, cg, dilation, pads, with_bias, stride=stride)
    t = np.asarray(-1.5, dtype) if scalar else channel_factors(rng, c_out, dtype)
    s = (0.5 + rng.standard_normal(c_out)).astype(dtype) if with_shift else None
    geometry = dict(stride=stride, padding=pads, dilation=dilation, groups=groups)

    kernel, fused_bias = fusion.scale_channels((weight, bias), t, s)
    assert kernel.dtype == dtype and fused_bias.dtype == dtype
    assert kernel.shape == weight.shape and fused_bias.shape == (c_out,)
    t64 = np.broadcast_to(np.asarray(t, np.float64), (c_out,))
    ref = conv_signed(*as64(x, weight, bias), **geometry) * t64[None, :, None, None]
    if s is not None:
        ref = ref + as64(s)[0][None, :, None, None]
    assert_close(ops.conv2d(x, kernel, fused_bias, **geometry), ref, dtype, "scale_channels")
    # float64 result from a float32 kernel on request (to go on composing without rounding)
    k64, b64 = fusion.scale_channels((weight, bias), t, s, dtype=np.float64)
    assert k64.dtype == b64.dtype == np.float64
    np.testing.assert_array_equal(k64.astype(dtype), kernel)


@given(seed=seeds, dtype=dtypes, ks=st.sampled_from(KERNELS), cg=channel_groups(), with_bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3]))
def test_fuse_bn_is_bn_scale_shift_then_scale_channels(seed, dtype, ks, cg, with_bias, eps):
    """Rule 1 for a BN: ``fuse_bn == scale_channels(branch, *bn_scale_shift(bn))``, and both compose."""
    rng = np.random.default_rng(seed)
    c_in, c_out, groups = cg
    weight = random_conv_weight(rng, c_out, c_in // groups, ks, dtype=dtype)
    bias = (0.5 * rng.standard_normal(c_out)).astype(dtype) if with_bias else None
    bn = random_bn(rng, c_out, eps=eps, dtype=dtype)
    t, s = fusion.bn_scale_shift(bn.mean, bn.var, bn.gamma, bn.beta, eps=eps)
    fused = fusion.fuse_bn(weight, bias, bn.mean, bn.var, bn.gamma, bn.beta, eps=eps)
    via = fusion.scale_channels((weight, bias), t, s)
    np.testing.assert_array_equal(fused.kernel, via.kernel)
    np.testing.assert_array_equal(fused.bias, via.bias)
    # Two maps in a row compose: (t2 t1, t2 s1 + s2).
    t2, s2 = channel_factors(rng, c_out, np.float64), rng.standard_normal(c_out)
    twice = fusion.scale_channels(fusion.scale_channels((weight, bias), t, s, dtype=np.float64), t2, s2)
    once = fusion.scale_channels((weight, bias), t2 * t, t2 * s + s2, dtype=np.float64)
    assert twice.kernel.dtype == np.float64
    x = input_tensor(rng, c_in, 5, 4, np.float64)
    pad = (ks[0] // 2, ks[1] // 2)
    assert_close(ops.conv2d(x, *twice, padding=pad, groups=groups),
                 ops.conv2d(x, *once, padding=pad, groups=groups), np.float64, "composed")


# ----------------------------------------------------------------------------
# rules 2 and 3 with offsets and pending scales: the converter's sums
# ----------------------------------------------------------------------------

@given(seed=seeds, dtype=dtypes, big=st.sampled_from([(3, 3), (5, 5), (3, 5), (4, 4), (2, 3)]),
       cg=channel_groups(), stride=pairs12, dilation=pairs12, big_pads=st.tuples(*[st.integers(0, 3)] * 4),
       count=st.integers(1, 3), scaled=st.lists(st.booleans(), min_size=4, max_size=4),
       explicit_size=st.booleans(), data=st.data())
def test_add_branches_offsets_equals_sum_of_shifted_convs(seed, dtype, big, cg, stride, dilation, big_pads,
                                                          count, scaled, explicit_size, data):
    """Branches of any size at any offset (asymmetric paddings, crops, even kernels), each ending in
    a BN, some with their BN factor left pending (``scales``): one conv with the big paddings.

    Branch ``b`` at ``offset`` runs with ``p = P - d*offset`` in front and ``P_end - d*(K - k -
    offset)`` behind (negative: a crop), as in ``test_pad_kernel_offset_equals_shifted_conv``.
    """
    rng = np.random.default_rng(seed)
    c_in, c_out, groups = cg
    (dh, dw), (top, left, bottom, right) = dilation, big_pads
    geometry = dict(stride=stride, dilation=dilation, groups=groups)
    sizes = [big] + [(data.draw(st.integers(1, big[0])), data.draw(st.integers(1, big[1])))
                     for _ in range(count)]
    offsets = [(data.draw(st.integers(0, big[0] - k[0])), data.draw(st.integers(0, big[1] - k[1])))
               for k in sizes]
    pads = [(top - dh * o[0], left - dw * o[1], bottom - dh * (big[0] - k[0] - o[0]),
             right - dw * (big[1] - k[1] - o[1])) for k, o in zip(sizes, offsets)]
    crop_h = max(-min(0, p[0]) - min(0, p[2]) for p in pads)
    crop_w = max(-min(0, p[1]) - min(0, p[3]) for p in pads)
    h = max(crop_h + 1, spatial_size(data.draw, big[0], dh, top, bottom, stride=stride[0]))
    w = max(crop_w + 1, spatial_size(data.draw, big[1], dw, left, right, stride=stride[1]))
    x = input_tensor(rng, c_in, h, w, dtype)

    branches, scales, ref = [], [], 0
    for n, (k, p) in enumerate(zip(sizes, pads)):
        weight = random_conv_weight(rng, c_out, c_in // groups, k, dtype=dtype)
        bn = random_bn(rng, c_out, dtype=dtype)
        ref = ref + conv_bn_ref(x, weight, None, bn, padding=p, **geometry)
        t, s = fusion.bn_scale_shift(bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
        if scaled[n]:   # the BN's factor pending: the kernel as read, the bias already final
            branches.append((weight, s))
            scales.append(t)
        else:
            branches.append(fusion.fuse_bn(weight, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps))
            scales.append(None)
    before = [b[0].copy() for b in branches]
    kernel, bias = fusion.add_branches(*branches, offsets=offsets, scales=scales,
                                       kernel_size=big if explicit_size else None)
    assert kernel.shape == (c_out, c_in // groups) + big and kernel.dtype == bias.dtype == dtype
    assert all(np.array_equal(a, b[0]) for a, b in zip(before, branches))      # inputs untouched
    assert_close(ops.conv2d(x, kernel, bias, padding=big_pads, **geometry), ref, dtype, "offsets")
    # The same sum with every kernel placed and scaled beforehand (the learners' spelling); a
    # pending factor multiplies the kernel only, the bias given with it is final.
    placed = [(fusion.scale_channels((fusion.pad_kernel(b[0], big, offset=o), None),
                                     1.0 if t is None else t).kernel, b[1])
              for b, o, t in zip(branches, offsets, scales)]
    plain = fusion.add_branches(*placed)
    assert relative_error(kernel, plain.kernel) <= TOLERANCES[np.dtype(dtype)]
    assert relative_error(bias, plain.bias) <= TOLERANCES[np.dtype(dtype)]


@given(seed=seeds, sizes=branch_sets(), scaled=st.lists(st.booleans(), min_size=4, max_size=4),
       f32=st.booleans())
def test_add_branches_scales_multiply_kernels_only(seed, sizes, scaled, f32):
    """Centred branches with pending factors, float64 result: the sum of the scaled kernels, and the
    biases as given (they are final). The accumulator is new, never one of the inputs."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if f32 else np.float64
    kernels = [rng.standard_normal((4, 3) + s).astype(dtype) for s in sizes]
    biases = [rng.standard_normal(4) for _ in sizes]
    scales = [channel_factors(rng, 4, np.float64) if sc else None for sc, _ in zip(scaled, sizes)]
    got = fusion.add_branches(*zip(kernels, biases), scales=scales, dtype=np.float64)
    ref = fusion.add_branches(*[(k.astype(np.float64) * (1.0 if t is None else t[:, None, None, None]), b)
                                for k, b, t in zip(kernels, biases, scales)])
    assert got.kernel.dtype == got.bias.dtype == np.float64 and got.kernel.shape == ref.kernel.shape
    assert relative_error(got.kernel, ref.kernel) <= 1e-12
    np.testing.assert_allclose(got.bias, sum(biases), rtol=1e-12, atol=0)
    assert not any(np.shares_memory(got.kernel, k) for k in kernels)


# ----------------------------------------------------------------------------
# rule 7: concatenation
# ----------------------------------------------------------------------------

@given(seed=seeds, dtype=dtypes, sizes=branch_sets(), c_in=st.integers(1, 3), stride=pairs12,
       dilation=pairs12, data=st.data())
def test_concat_branches_equals_concatenated_outputs(seed, dtype, sizes, c_in, stride, dilation, data):
    rng = np.random.default_rng(seed)
    (kh, kw), (dh, dw) = sizes[0], dilation
    big_pad = (dh * (kh // 2), dw * (kw // 2))
    x = input_tensor(rng, c_in, data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)), dtype)
    branches, refs = [], []
    for size in sizes:
        c_out = data.draw(st.integers(1, 3))
        weight = random_conv_weight(rng, c_out, c_in, size, dtype=dtype)
        bn = random_bn(rng, c_out, dtype=dtype)
        pad = (big_pad[0] - dh * (kh - size[0]) // 2, big_pad[1] - dw * (kw - size[1]) // 2)
        refs.append(conv_bn_ref(x, weight, None, bn, padding=pad, stride=stride, dilation=dilation))
        branches.append(fusion.fuse_bn(weight, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps))
    kernel, bias = fusion.concat_branches(*branches)
    assert kernel.shape == (sum(b.kernel.shape[0] for b in branches), c_in, kh, kw)
    got = ops.conv2d(x, kernel, bias, padding=big_pad, stride=stride, dilation=dilation)
    assert_close(got, np.concatenate(refs, axis=1), dtype, "concat_branches")


@given(seed=seeds, dtype=dtypes, groups=st.lists(st.sampled_from([1, 2, 4]), min_size=2, max_size=3),
       k=st.sampled_from([1, 3]))
def test_concat_grouped_branches_through_ungroup_kernel(seed, dtype, groups, k):
    """Branches with different groups: make each dense first, then concatenate."""
    rng = np.random.default_rng(seed)
    c_in = 4
    x = input_tensor(rng, c_in, 5, 4, dtype)
    dense, refs = [], []
    for g in groups:
        weight = random_conv_weight(rng, 2 * g, c_in // g, k, dtype=dtype)
        bn = random_bn(rng, 2 * g, dtype=dtype)
        refs.append(conv_bn_ref(x, weight, None, bn, padding=k // 2, groups=g))
        kernel, bias = fusion.fuse_bn(weight, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
        ungrouped = fusion.ungroup_kernel(kernel, groups=g)
        assert ungrouped.shape == (2 * g, c_in, k, k) and ungrouped.dtype == dtype
        dense.append((ungrouped, bias))
    got = ops.conv2d(x, *fusion.concat_branches(*dense), padding=k // 2)
    assert_close(got, np.concatenate(refs, axis=1), dtype, "concat of grouped branches")


# ----------------------------------------------------------------------------
# rule 5: 1x1 then KxK (DBB transform III) -- borders
# ----------------------------------------------------------------------------

@st.composite
def sequential_cases(draw, *, top_pad_min=0, kernels=KERNELS, dilated=True):
    seed, dtype = draw(seeds), draw(dtypes)
    c_in, c_out, groups = draw(channel_groups())
    mid = groups * draw(st.integers(1, 2))
    ks, stride = draw(st.sampled_from(kernels)), draw(pairs12)
    dilation = draw(pairs12) if dilated else (1, 1)
    pads = (draw(st.integers(top_pad_min, 3)),) + draw(st.tuples(*[st.integers(0, 3)] * 3))
    h = spatial_size(draw, ks[0], dilation[0], pads[0], pads[2], stride=stride[0])
    w = spatial_size(draw, ks[1], dilation[1], pads[1], pads[3], stride=stride[1])
    rng = np.random.default_rng(seed)
    case = dict(
        dtype=dtype, groups=groups, ks=ks, pads=pads, h=h, w=w,
        geometry=dict(stride=stride, dilation=dilation, groups=groups),
        x=input_tensor(rng, c_in, h, w, dtype),
        w1=random_conv_weight(rng, mid, c_in // groups, 1, dtype=dtype),
        b1=(0.5 * rng.standard_normal(mid)).astype(dtype),
        bn1=random_bn(rng, mid, dtype=dtype),
        w2=random_conv_weight(rng, c_out, mid // groups, ks, dtype=dtype),
        bn2=random_bn(rng, c_out, dtype=dtype),
    )
    return case


def fused_sequential(case, second_kernel=None):
    bn1, bn2 = case["bn1"], case["bn2"]
    first = fusion.fuse_bn(case["w1"], case["b1"], bn1.mean, bn1.var, bn1.gamma, bn1.beta, eps=bn1.eps)
    w2 = case["w2"] if second_kernel is None else second_kernel
    second = fusion.fuse_bn(w2, None, bn2.mean, bn2.var, bn2.gamma, bn2.beta, eps=bn2.eps)
    return fusion.merge_sequential(first, second, groups=case["groups"])


def first_stage(case):
    """The 1x1 conv-BN on x (float64) and its output at zero input (the DBB pad value)."""
    x = case["x"]
    y1 = conv_bn_ref(x, case["w1"], case["b1"], case["bn1"], groups=case["groups"])
    # The BN-and-pad value, computed from the unfused layers: what they output when x is 0.
    zero = np.zeros((1, x.shape[1], 1, 1))
    at_zero = conv_bn_ref(zero, case["w1"], case["b1"], case["bn1"], groups=case["groups"])[0, :, 0, 0]
    return y1, at_zero


def interior_mask(size, k, *, stride, lead, dilation, out):
    """Output positions whose (dilated) window lies inside the unpadded input, one axis."""
    i = np.arange(out)
    start = stride * i - lead
    return (start >= 0) & (start + dilation * (k - 1) <= size - 1)


@given(case=sequential_cases())
def test_merge_sequential_exact_everywhere_with_bias_padding(case):
    """Intermediate map padded per channel with the 1x1-BN output at zero input (DBB's BNAndPad)."""
    dtype, geometry = case["dtype"], case["geometry"]
    y1, at_zero = first_stage(case)
    padded = ops.pad2d(y1, case["pads"], value=at_zero)
    ref = conv_bn_ref(padded, case["w2"], None, case["bn2"], **geometry)
    kernel, bias = fused_sequential(case)
    assert kernel.shape == (case["w2"].shape[0], case["w1"].shape[1]) + case["ks"] and kernel.dtype == dtype
    got = ops.conv2d(case["x"], kernel, bias, padding=case["pads"], **geometry)
    assert_close(got, ref, dtype, "merge_sequential, bias padding")


@given(case=sequential_cases(top_pad_min=1))
def test_merge_sequential_zero_padding_exact_in_interior_only(case):
    dtype, geometry, pads = case["dtype"], case["geometry"], case["pads"]
    y1, at_zero = first_stage(case)
    ref = conv_bn_ref(y1, case["w2"], None, case["bn2"], padding=pads, **geometry)
    got = ops.conv2d(case["x"], *fused_sequential(case), padding=pads, **geometry)
    (sh, sw), (dh, dw) = geometry["stride"], geometry["dilation"]
    rows = interior_mask(case["h"], case["ks"][0], stride=sh, lead=pads[0], dilation=dh, out=ref.shape[2])
    cols = interior_mask(case["w"], case["ks"][1], stride=sw, lead=pads[1], dilation=dw, out=ref.shape[3])
    inside = rows[:, None] & cols[None, :]
    assert not inside.all()  # padding on top: row 0 reads padding
    if inside.any():
        assert_close(got[:, :, inside], ref[:, :, inside], dtype, "merge_sequential interior")
    # At the border the zero-padded form reads 0 where the merged conv assumes b1: they differ.
    assert np.max(np.abs(at_zero)) > 0
    border_gap = np.max(np.abs(got[:, :, ~inside] - ref[:, :, ~inside])) / np.max(np.abs(ref))
    assert border_gap > 1e-4, f"border unexpectedly equal (gap {border_gap:.2e})"


@given(case=sequential_cases(kernels=[(2, 2), (3, 3), (1, 3), (3, 2), (5, 5)], dilated=False))
def test_merge_sequential_with_avgpool_is_dbb_branch(case):
    """DBB's 1x1-BN -> AvgPool -> BN branch: the pool is ``avgpool_kernel`` as the second conv."""
    dtype, groups, k = case["dtype"], case["groups"], case["ks"]
    stride = case["geometry"]["stride"]
    mid = case["w1"].shape[0]
    y1, at_zero = first_stage(case)
    padded = ops.pad2d(y1, case["pads"], value=at_zero)
    bn2 = random_bn(np.random.default_rng(1), mid, dtype=dtype)
    case = dict(case, bn2=bn2)
    pooled = ops.avg_pool2d(padded, k, stride=stride, count_include_pad=True)
    ref = ops.batch_norm(pooled, *as64(bn2.mean, bn2.var, bn2.gamma, bn2.beta), eps=bn2.eps)
    pool = fusion.avgpool_kernel(mid, k, groups=groups, dtype=dtype)
    got = ops.conv2d(case["x"], *fused_sequential(case, pool), padding=case["pads"], stride=stride,
                     groups=groups)
    assert_close(got, ref, dtype, "1x1 -> avgpool")


# ----------------------------------------------------------------------------
# rule 5 reversed: KxK then 1x1 (ResRep compactor, depthwise -> pointwise)
# ----------------------------------------------------------------------------

@given(seed=seeds, dtype=dtypes, ks=st.sampled_from(KERNELS), cg=channel_groups(), c_out=st.integers(1, 4),
       stride=pairs12, dilation=pairs12, pads=st.tuples(*[st.integers(0, 3)] * 4), data=st.data())
def test_merge_pointwise_equals_conv_then_1x1(seed, dtype, ks, cg, c_out, stride, dilation, pads, data):
    rng = np.random.default_rng(seed)
    c_in, mid, groups = cg
    h = spatial_size(data.draw, ks[0], dilation[0], pads[0], pads[2], stride=stride[0])
    w = spatial_size(data.draw, ks[1], dilation[1], pads[1], pads[3], stride=stride[1])
    x = input_tensor(rng, c_in, h, w, dtype)
    w1 = random_conv_weight(rng, mid, c_in // groups, ks, dtype=dtype)
    w2 = random_conv_weight(rng, c_out, mid, 1, dtype=dtype)
    b2 = (0.5 * rng.standard_normal(c_out)).astype(dtype)
    bn1, bn2 = random_bn(rng, mid, dtype=dtype), random_bn(rng, c_out, dtype=dtype)
    geometry = dict(stride=stride, padding=pads, dilation=dilation)
    y1 = conv_bn_ref(x, w1, None, bn1, groups=groups, **geometry)
    ref = conv_bn_ref(y1, w2, b2, bn2)

    first = fusion.fuse_bn(w1, None, bn1.mean, bn1.var, bn1.gamma, bn1.beta, eps=bn1.eps)
    second = fusion.fuse_bn(w2, b2, bn2.mean, bn2.var, bn2.gamma, bn2.beta, eps=bn2.eps)
    kernel, bias = fusion.merge_pointwise(first, second, groups=groups)
    # Dense whatever the first conv's groups: the 1x1 mixes every channel.
    assert kernel.shape == (c_out, c_in) + ks and kernel.dtype == dtype
    assert_close(ops.conv2d(x, kernel, bias, **geometry), ref, dtype, "merge_pointwise")


@given(seed=seeds, dtype=dtypes, ks=st.sampled_from(KERNELS), common=st.integers(1, 2),
       first_mult=st.integers(1, 3), second_mult=st.integers(1, 3), c_per=st.integers(1, 2),
       o_per=st.integers(1, 2), stride=pairs12, dilation=pairs12, pads=st.tuples(*[st.integers(0, 2)] * 4),
       data=st.data())
@settings(max_examples=20)
def test_merge_pointwise_grouped_1x1_keeps_gcd_groups(seed, dtype, ks, common, first_mult, second_mult, c_per,
                                                      o_per, stride, dilation, pads, data):
    """A grouped KxK then a grouped 1x1 (ShuffleNet's GConv) is one conv with gcd(groups) groups."""
    rng = np.random.default_rng(seed)
    groups, second_groups = common * first_mult, common * second_mult
    g = math.gcd(groups, second_groups)
    mid = math.lcm(groups, second_groups)   # both groups divide M
    c_in, c_out = groups * c_per, second_groups * o_per
    h = spatial_size(data.draw, ks[0], dilation[0], pads[0], pads[2], stride=stride[0])
    w = spatial_size(data.draw, ks[1], dilation[1], pads[1], pads[3], stride=stride[1])
    x = input_tensor(rng, c_in, h, w, dtype)
    w1 = random_conv_weight(rng, mid, c_in // groups, ks, dtype=dtype)
    w2 = random_conv_weight(rng, c_out, mid // second_groups, 1, dtype=dtype)
    bn1, bn2 = random_bn(rng, mid, dtype=dtype), random_bn(rng, c_out, dtype=dtype)
    geometry = dict(stride=stride, padding=pads, dilation=dilation)
    y1 = conv_bn_ref(x, w1, None, bn1, groups=groups, **geometry)
    ref = conv_bn_ref(y1, w2, None, bn2, groups=second_groups)

    first = fusion.fuse_bn(w1, None, bn1.mean, bn1.var, bn1.gamma, bn1.beta, eps=bn1.eps)
    second = fusion.fuse_bn(w2, None, bn2.mean, bn2.var, bn2.gamma, bn2.beta, eps=bn2.eps)
    kernel, bias = fusion.merge_pointwise(first, second, groups=groups, second_groups=second_groups)
    assert kernel.shape == (c_out, c_in // g) + ks and kernel.dtype == dtype and bias.dtype == dtype
    assert_close(ops.conv2d(x, kernel, bias, groups=g, **geometry), ref, dtype, "grouped merge_pointwise")


@pytest.mark.parametrize("dtype", DTYPES)
def test_depthwise_then_grouped_pointwise_keeps_its_groups(dtype):
    """ShuffleNet's depthwise 3x3 -> 1x1 GConv (3 groups): one 3x3 conv with 3 groups, not dense."""
    rng = np.random.default_rng(4)
    c, o, g = 6, 9, 3
    x = input_tensor(rng, c, 7, 6, dtype)
    dw = random_conv_weight(rng, c, 1, 3, dtype=dtype)
    pw = random_conv_weight(rng, o, c // g, 1, dtype=dtype)
    bn1, bn2 = random_bn(rng, c, dtype=dtype), random_bn(rng, o, dtype=dtype)
    ref = conv_bn_ref(conv_bn_ref(x, dw, None, bn1, padding=1, stride=2, groups=c), pw, None, bn2, groups=g)
    first = fusion.fuse_bn(dw, None, bn1.mean, bn1.var, bn1.gamma, bn1.beta, eps=bn1.eps)
    second = fusion.fuse_bn(pw, None, bn2.mean, bn2.var, bn2.gamma, bn2.beta, eps=bn2.eps)
    kernel, bias = fusion.merge_pointwise(first, second, groups=c, second_groups=g)
    assert kernel.shape == (o, c // g, 3, 3)  # O*(C/g)*9 = 162 weights, a third of the dense 486
    assert_close(ops.conv2d(x, kernel, bias, padding=1, stride=2, groups=g), ref, dtype, "dw -> gconv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_depthwise_then_pointwise_becomes_dense(dtype):
    """MobileNet's depthwise 3x3 -> pointwise 1x1 with no nonlinearity between: one dense 3x3."""
    rng = np.random.default_rng(3)
    c, o = 6, 5
    x = input_tensor(rng, c, 6, 7, dtype)
    dw = random_conv_weight(rng, c, 1, 3, dtype=dtype)
    pw = random_conv_weight(rng, o, c, 1, dtype=dtype)
    bn1, bn2 = random_bn(rng, c, dtype=dtype), random_bn(rng, o, dtype=dtype)
    ref = conv_bn_ref(conv_bn_ref(x, dw, None, bn1, padding=1, stride=2, groups=c), pw, None, bn2)
    first = fusion.fuse_bn(dw, None, bn1.mean, bn1.var, bn1.gamma, bn1.beta, eps=bn1.eps)
    second = fusion.fuse_bn(pw, None, bn2.mean, bn2.var, bn2.gamma, bn2.beta, eps=bn2.eps)
    kernel, bias = fusion.merge_pointwise(first, second, groups=c)
    assert kernel.shape == (o, c, 3, 3)  # dense: O*C*9 = 270 weights instead of C*9 + O*C = 84
    assert_close(ops.conv2d(x, kernel, bias, padding=1, stride=2), ref, dtype, "depthwise -> pointwise")


# ----------------------------------------------------------------------------
# rule 6: average pooling
# ----------------------------------------------------------------------------

@given(seed=seeds, dtype=dtypes, ks=st.sampled_from(KERNELS + [(2, 2), (2, 3)]),
       cg=channel_groups(out_free=False), stride=pairs12, data=st.data())
def test_avgpool_kernel_equals_avg_pool(seed, dtype, ks, cg, stride, data):
    rng = np.random.default_rng(seed)
    c, _, groups = cg
    # At most half the window on each side (PyTorch's limit): every window holds a real pixel.
    pads = tuple(data.draw(st.integers(0, ks[i % 2] // 2)) for i in range(4))
    h = spatial_size(data.draw, ks[0], 1, pads[0], pads[2], stride=stride[0])
    w = spatial_size(data.draw, ks[1], 1, pads[1], pads[3], stride=stride[1])
    x = input_tensor(rng, c, h, w, dtype)
    kernel = fusion.avgpool_kernel(c, ks, groups=groups, dtype=dtype)
    assert kernel.shape == (c, c // groups) + ks and kernel.dtype == dtype
    ref = ops.avg_pool2d(x.astype(np.float64), ks, stride=stride, padding=pads, count_include_pad=True)
    got = ops.conv2d(x, kernel, stride=stride, padding=pads, groups=groups)
    assert_close(got, ref, dtype, "avgpool_kernel")


def test_avgpool_kernel_is_not_count_exclude_pad_at_the_border():
    """ONNX's default count_include_pad=0 divides border windows by fewer pixels: not a conv there."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 6))
    conv = ops.conv2d(x, fusion.avgpool_kernel(3, 3, groups=3), padding=1, groups=3)
    exclude = ops.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert_close(conv[inner], exclude[inner], np.float64, "interior")
    border = np.ones((6, 6), bool)
    border[1:-1, 1:-1] = False
    gap = np.abs(conv[:, :, border] - exclude[:, :, border])
    assert np.all(gap > 0) and np.max(gap) > 1e-2
    # Corner windows hold 4 real pixels of 9: the conv is exactly 4/9 of the exclude-pad mean.
    np.testing.assert_allclose(conv[:, :, 0, 0], exclude[:, :, 0, 0] * 4 / 9, rtol=1e-12)


# ----------------------------------------------------------------------------
# rule 8: conv into FC
# ----------------------------------------------------------------------------

@given(seed=seeds, dtype=dtypes, ks=st.sampled_from(KERNELS), cg=channel_groups(), stride=pairs12,
       dilation=pairs12, pads=st.tuples(*[st.integers(0, 2)] * 4), data=st.data())
def test_conv_to_fc_equals_conv(seed, dtype, ks, cg, stride, dilation, pads, data):
    rng = np.random.default_rng(seed)
    c_in, c_out, groups = cg
    h = spatial_size(data.draw, ks[0], dilation[0], pads[0], pads[2], stride=stride[0], extra=2)
    w = spatial_size(data.draw, ks[1], dilation[1], pads[1], pads[3], stride=stride[1], extra=2)
    x = input_tensor(rng, c_in, h, w, dtype)
    weight = random_conv_weight(rng, c_out, c_in // groups, ks, dtype=dtype)
    bn = random_bn(rng, c_out, dtype=dtype)
    geometry = dict(stride=stride, padding=pads, dilation=dilation, groups=groups)
    ref = conv_bn_ref(x, weight, None, bn, **geometry)

    kernel, bias = fusion.fuse_bn(weight, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
    matrix, fc_bias = fusion.conv_to_fc(kernel, bias, input_shape=(c_in, h, w), **geometry)
    n, o, ho, wo = ref.shape
    assert matrix.shape == (o * ho * wo, c_in * h * w) and matrix.dtype == dtype
    assert fc_bias.shape == (o * ho * wo,) and fc_bias.dtype == dtype
    got = ops.linear(x.reshape(n, -1), matrix, fc_bias).reshape(n, o, ho, wo)
    assert_close(got, ref, dtype, "conv_to_fc")


def test_conv_to_fc_flattens_channel_first():
    """Column j of the matrix is the conv's response to the one-hot image at unravel(j, (C, H, W))."""
    rng = np.random.default_rng(11)
    c, h, w = 2, 3, 4
    weight = random_conv_weight(rng, 3, c, 3)
    matrix, _ = fusion.conv_to_fc(weight, None, input_shape=(c, h, w), padding=1)
    j = 17
    onehot = np.zeros((1, c, h, w))
    onehot[(0,) + np.unravel_index(j, (c, h, w))] = 1  # j = 17 -> channel 1, row 1, column 1
    assert np.unravel_index(j, (c, h, w)) == (1, 1, 1)
    np.testing.assert_array_equal(matrix[:, j], ops.conv2d(onehot, weight, padding=1).reshape(-1))
    # Channel-last flattening (NHWC) of the same input gives a different, wrong, answer.
    x = rng.standard_normal((1, c, h, w))
    ref = ops.conv2d(x, weight, padding=1).reshape(1, -1)
    assert_close(ops.linear(x.reshape(1, -1), matrix), ref, np.float64, "NCHW flatten")
    wrong = ops.linear(x.transpose(0, 2, 3, 1).reshape(1, -1), matrix)
    assert np.max(np.abs(wrong - ref)) > 0.1
