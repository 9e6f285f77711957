"""The fusion algebra: one pure function per re-parameterization rule.

Every rule turns a composition of linear operators (convolutions, inference
BatchNorm, identity, average pooling, concatenation) into one convolution, or
one fully connected layer, that computes the same thing up to floating-point
rounding. Blocks (``repnp.blocks``) and the ONNX converter (``repnp.io``) both
do their math here: one algebra, two front doors.

Conventions: kernels are OIHW with ``I = C_in / groups``; a conv is described
by a :class:`KernelBias`; geometry (stride, padding, dilation, groups) is not
part of it and stays the caller's business, except where a rule needs it.
The functions compute in float64 and return the dtype of the kernel they were
given; they never modify their inputs.

Sources: seed 001 and 003 (RepVGG: BN fusion eq. (3), 1x1 and identity as 3x3
kernels, branch addition), seed 000 (MobileOne), seed 004 (ACNet, DBB's six
transforms, ResRep's compactor, RepMLP's conv-to-FC), all in ``shared/seeds``;
the papers: RepVGG (Ding et al., CVPR 2021), DBB (Ding et al., CVPR 2021),
ACNet (Ding et al., ICCV 2019), ResRep (Ding et al., ICCV 2021), RepMLP (Ding
et al., 2021), MobileOne (Vasu et al., CVPR 2023).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from repnp import ops
from repnp.errors import ShapeError

__all__ = [
    "KernelBias",
    "bn_scale_shift",
    "fuse_bn",
    "identity_kernel",
    "pad_kernel",
    "add_branches",
    "concat_branches",
    "ungroup_kernel",
    "merge_sequential",
    "merge_pointwise",
    "avgpool_kernel",
    "conv_to_fc",
]


class KernelBias(NamedTuple):
    """A convolution's parameters: ``kernel`` (O, I, kh, kw) and ``bias`` (O,)."""

    kernel: np.ndarray
    bias: np.ndarray


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------

def _as_kernel(kernel, name: str = "kernel") -> np.ndarray:
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
        raise ShapeError(f"{name} must be OIHW (4-D), got shape {kernel.shape}")
    return kernel


def _out_dtype(array: np.ndarray) -> np.dtype:
    return array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float64)


def _bias64(bias, out_channels: int, name: str = "bias") -> np.ndarray:
    """``bias`` as float64 of shape (O,); ``None`` means zeros."""
    if bias is None:
        return np.zeros(out_channels)
    bias = np.asarray(bias, dtype=np.float64)
    if bias.shape != (out_channels,):
        raise ShapeError(f"{name} must have shape ({out_channels},), got {bias.shape}")
    return bias


def _kb(branch, name: str) -> KernelBias:
    """Accept a KernelBias or a (kernel, bias) pair; bias may be None."""
    try:
        kernel, bias = branch
    except (TypeError, ValueError):
        raise ShapeError(f"{name} must be a KernelBias or a (kernel, bias) pair") from None
    kernel = _as_kernel(kernel, f"{name}.kernel")
    return KernelBias(kernel, _bias64(bias, kernel.shape[0], f"{name}.bias"))


def _kernel_size(kernel_size) -> tuple[int, int]:
    if isinstance(kernel_size, (int, np.integer)):
        return int(kernel_size), int(kernel_size)
    kh, kw = (int(k) for k in kernel_size)
    return kh, kw


# ----------------------------------------------------------------------------
# rule 1: conv + BN
# ----------------------------------------------------------------------------

def bn_scale_shift(mean, var, gamma, beta, *, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Inference BN as the per-channel affine map ``y = t * x + s``.

    Returns
    -------
    t, s : ndarray (float64), shape (C,)
        ``t = gamma / sqrt(var + eps)``, ``s = beta - mean * t``. ``s`` is also
        the BN's output at zero input: the value DBB pads with.

    Raises
    ------
    ShapeError
        If the four vectors do not have one shape (C,).
    ValueError
        If ``var + eps <= 0`` anywhere.
    """
    mean, var, gamma, beta = (np.asarray(v, dtype=np.float64) for v in (mean, var, gamma, beta))
    shapes = {"mean": mean.shape, "var": var.shape, "gamma": gamma.shape, "beta": beta.shape}
    if len(set(shapes.values())) != 1 or mean.ndim != 1:
        raise ShapeError(f"BN parameters must all have one shape (C,), got {shapes}")
    denom = var + eps
    if np.any(denom <= 0):
        raise ValueError(f"var + eps must be positive, got min(var + eps) = {denom.min()} (eps={eps})")
    t = gamma / np.sqrt(denom)
    return t, beta - mean * t


def fuse_bn(kernel, bias, mean, var, gamma, beta, *, eps: float = 1e-5) -> KernelBias:
    """Fold an inference BatchNorm into the convolution before it.

    Parameters
    ----------
    kernel : ndarray, shape (O, I, kh, kw)
    bias : ndarray, shape (O,), or None
        The conv's own bias (``None``: a conv without bias, as in most rep blocks).
    mean, var, gamma, beta : ndarray, shape (O,)
        BN running statistics and affine parameters.
    eps : float, keyword-only
        The BN's epsilon. PyTorch defaults to 1e-5, YOLOv6 trains with 1e-3:
        pass the one the model was trained with.

    Returns
    -------
    KernelBias
        In the dtype of ``kernel``.

    Notes
    -----
    RepVGG eq. (3) (seed 001/003): BN(W*x + b) = t (W*x + b - mean) + beta with
    ``t = gamma / sqrt(var + eps)``, so

    .. math:: W' = W \\cdot t_o, \\qquad b' = \\beta + (b - \\mu)\\, t

    per output channel ``o``. A BN-only (identity) branch is this rule applied
    to :func:`identity_kernel`.
    """
    kernel = _as_kernel(kernel)
    o = kernel.shape[0]
    t, _ = bn_scale_shift(mean, var, gamma, beta, eps=eps)
    if t.shape != (o,):
        raise ShapeError(f"BN parameters have shape {t.shape}, kernel {kernel.shape} needs ({o},)")
    b = _bias64(bias, o)
    dtype = _out_dtype(kernel)
    fused_kernel = kernel.astype(np.float64) * t[:, None, None, None]
    fused_bias = np.asarray(beta, dtype=np.float64) + (b - np.asarray(mean, dtype=np.float64)) * t
    return KernelBias(fused_kernel.astype(dtype), fused_bias.astype(dtype))


# ----------------------------------------------------------------------------
# rule 4: identity as a kernel
# ----------------------------------------------------------------------------

def identity_kernel(channels: int, *, groups: int = 1, kernel_size=1, dtype=np.float64) -> np.ndarray:
    """The kernel of a conv that returns its input unchanged.

    Parameters
    ----------
    channels : int
        C (input channels == output channels).
    groups : int, keyword-only
        The conv's groups; must divide ``channels``.
    kernel_size : int or (kh, kw), keyword-only
        Odd sizes, so that there is a centre tap.

    Returns
    -------
    ndarray, shape (C, C/groups, kh, kw)
        One at ``[i, i % (C/groups), kh//2, kw//2]``, zero elsewhere.

    Notes
    -----
    Seed 001's worked example: with padding ``kh//2`` the centre tap reads
    exactly the pixel under it, so ``conv(x, I) == x``. Output channel ``i``
    lives in group ``i // (C/groups)``, whose inputs are channels
    ``g*C/groups ...``; input ``i`` is local index ``i % (C/groups)`` there.
    Writing ``[:, :, k//2, k//2] = 1`` (as some ports do) sums all channels of
    the group: right only when depthwise (C/groups == 1).
    """
    channels, groups = int(channels), int(groups)
    kh, kw = _kernel_size(kernel_size)
    if channels < 1 or groups < 1 or channels % groups:
        raise ShapeError(f"groups={groups} must divide channels={channels} (both >= 1)")
    if kh % 2 == 0 or kw % 2 == 0 or kh < 1 or kw < 1:
        raise ValueError(f"identity kernel needs odd kernel sizes to have a centre tap, got {(kh, kw)}")
    per_group = channels // groups
    kernel = np.zeros((channels, per_group, kh, kw), dtype=dtype)
    idx = np.arange(channels)
    kernel[idx, idx % per_group, kh // 2, kw // 2] = 1
    return kernel


# ----------------------------------------------------------------------------
# rule 3: kernel padding / alignment
# ----------------------------------------------------------------------------

def pad_kernel(kernel, kernel_size, *, offset=None) -> np.ndarray:
    """Embed a smaller kernel in a larger one (zeros around it).

    Parameters
    ----------
    kernel : ndarray, shape (O, I, kh, kw)
    kernel_size : int or (KH, KW)
        The target size, ``KH >= kh`` and ``KW >= kw``.
    offset : (top, left), keyword-only, optional
        Where the small kernel's top-left tap goes. Default: centred, which
        needs ``KH - kh`` and ``KW - kw`` even.

    Returns
    -------
    ndarray, shape (O, I, KH, KW), dtype of ``kernel``.

    Notes
    -----
    Seed 001 / RepVGG: a 1x1 conv with padding ``p - K//2`` equals a KxK conv
    with padding ``p`` whose kernel is zero except at the centre; ACNet's 1xK
    and Kx1 kernels embed the same way along one axis. In general a kernel
    placed at ``offset`` reads input pixel ``s*i - P + d*(offset + u)``: the
    small conv is equivalent when its own padding is ``P - d*offset`` on the
    leading side (top / left). A crop (``Slice``) of the input before the small
    conv counts as negative padding, which is why an explicit offset is needed
    when the branches' paddings differ asymmetrically.
    """
    kernel = _as_kernel(kernel)
    big_h, big_w = _kernel_size(kernel_size)
    o, i, kh, kw = kernel.shape
    if big_h < kh or big_w < kw:
        raise ShapeError(f"kernel_size {(big_h, big_w)} is smaller than the kernel {kernel.shape}")
    if offset is None:
        if (big_h - kh) % 2 or (big_w - kw) % 2:
            raise ValueError(
                f"cannot centre a {kh}x{kw} kernel in a {big_h}x{big_w} one: the size differences "
                f"({big_h - kh}, {big_w - kw}) must be even for the centres to coincide "
                f"(odd inside even or even inside odd has no common centre); pass offset=(top, left) "
                f"to place it explicitly"
            )
        top, left = (big_h - kh) // 2, (big_w - kw) // 2
    else:
        top, left = (int(v) for v in offset)
        if top < 0 or left < 0 or top + kh > big_h or left + kw > big_w:
            raise ShapeError(
                f"offset {(top, left)} puts the {kh}x{kw} kernel outside the {big_h}x{big_w} one"
            )
    out = np.zeros((o, i, big_h, big_w), dtype=kernel.dtype)
    out[:, :, top:top + kh, left:left + kw] = kernel
    return out


# ----------------------------------------------------------------------------
# rule 2 and 7: branch addition and concatenation
# ----------------------------------------------------------------------------

def add_branches(*branches) -> KernelBias:
    """Sum parallel convolutions on one input into one convolution.

    Parameters
    ----------
    *branches : KernelBias or (kernel, bias)
        Kernels (O, I, kh_b, kw_b) with one O and I; biases may be None. Each
        kernel is centred in the largest (KH, KW) with :func:`pad_kernel`
        (place a kernel yourself with ``pad_kernel(..., offset=...)`` first
        when centring is not what its padding means).

    Returns
    -------
    KernelBias
        Kernel (O, I, KH, KW) and bias (O,), dtype of the first kernel.

    Notes
    -----
    Convolution is linear in the kernel: ``sum_b conv(x, W_b) + b_b =
    conv(x, sum_b W_b) + sum_b b_b`` when all branches share input, stride,
    dilation and groups and produce the same output size. With the kernels
    centred, that holds when a branch of size ``k`` uses padding
    ``p - d*(K - k)/2`` where the largest (size ``K``) uses ``p``: e.g. RepVGG's
    3x3 with padding 1 and 1x1 with padding 0 (seed 001, "step 2").
    """
    if not branches:
        raise ValueError("add_branches needs at least one branch")
    parts = [_kb(b, f"branches[{n}]") for n, b in enumerate(branches)]
    o, i = parts[0].kernel.shape[:2]
    for n, part in enumerate(parts):
        if part.kernel.shape[:2] != (o, i):
            raise ShapeError(
                f"branches[{n}].kernel has shape {part.kernel.shape}; all branches need "
                f"(O, I) = {(o, i)} like branches[0] {parts[0].kernel.shape}"
            )
    big = (max(p.kernel.shape[2] for p in parts), max(p.kernel.shape[3] for p in parts))
    kernel = sum(pad_kernel(p.kernel.astype(np.float64), big) for p in parts)
    bias = sum(p.bias for p in parts)
    dtype = _out_dtype(parts[0].kernel)
    return KernelBias(kernel.astype(dtype), bias.astype(dtype))


def concat_branches(*branches) -> KernelBias:
    """Concatenate convolutions on one input along the output-channel axis.

    Parameters
    ----------
    *branches : KernelBias or (kernel, bias)
        Kernels (O_b, I, kh_b, kw_b) sharing I; smaller kernels are centred in
        the largest size (same padding condition as :func:`add_branches`).

    Returns
    -------
    KernelBias
        Kernel (sum O_b, I, KH, KW), bias (sum O_b,).

    Notes
    -----
    DBB transform IV / Inception-style depth concatenation (seed 004):
    ``concat_b(conv(x, W_b) + b_b) = conv(x, concat_b W_b) + concat_b b_b``.
    Exact for dense convs (groups = 1). Concatenating grouped convs is not a
    grouped conv in general (the output channels of one group would have to
    read the same input group): make them dense with :func:`ungroup_kernel`
    first.
    """
    if not branches:
        raise ValueError("concat_branches needs at least one branch")
    parts = [_kb(b, f"branches[{n}]") for n, b in enumerate(branches)]
    i = parts[0].kernel.shape[1]
    for n, part in enumerate(parts):
        if part.kernel.shape[1] != i:
            raise ShapeError(
                f"branches[{n}].kernel has shape {part.kernel.shape}; all branches need I = {i} "
                f"like branches[0] {parts[0].kernel.shape}"
            )
    big = (max(p.kernel.shape[2] for p in parts), max(p.kernel.shape[3] for p in parts))
    kernel = np.concatenate([pad_kernel(p.kernel.astype(np.float64), big) for p in parts], axis=0)
    bias = np.concatenate([p.bias for p in parts])
    dtype = _out_dtype(parts[0].kernel)
    return KernelBias(kernel.astype(dtype), bias.astype(dtype))


def ungroup_kernel(kernel, *, groups: int) -> np.ndarray:
    """The dense (groups = 1) kernel of a grouped convolution.

    Parameters
    ----------
    kernel : ndarray, shape (O, C/groups, kh, kw)
    groups : int, keyword-only

    Returns
    -------
    ndarray, shape (O, C, kh, kw)
        Block diagonal: output channel ``o`` of group ``g`` keeps its taps on
        input channels ``g*C/groups ... (g+1)*C/groups - 1``, zeros elsewhere.
    """
    kernel = _as_kernel(kernel)
    groups = int(groups)
    o, cg, kh, kw = kernel.shape
    if groups < 1 or o % groups:
        raise ShapeError(f"groups={groups} must divide the kernel's O = {o} (kernel shape {kernel.shape})")
    og = o // groups
    dense = np.zeros((o, cg * groups, kh, kw), dtype=kernel.dtype)
    for g in range(groups):  # one block per group; groups is small next to the block sizes
        dense[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = kernel[g * og:(g + 1) * og]
    return dense


# ----------------------------------------------------------------------------
# rule 5: sequential convolutions
# ----------------------------------------------------------------------------

def merge_sequential(first, second, *, groups: int = 1) -> KernelBias:
    """Merge a 1x1 conv followed by a KxK conv into one KxK conv (DBB transform III).

    Parameters
    ----------
    first : KernelBias or (kernel, bias)
        The 1x1 conv, kernel (M, C/groups, 1, 1), stride 1, no padding.
    second : KernelBias or (kernel, bias)
        The KxK conv, kernel (O, M/groups, kh, kw), with its own stride,
        padding and dilation (kept by the merged conv).
    groups : int, keyword-only
        The groups of both convs (DBB uses one value for both).

    Returns
    -------
    KernelBias
        Kernel (O, C/groups, kh, kw), bias (O,).

    Notes
    -----
    Seed 004 / DBB transform III. Per group, with ``W1`` the 1x1 kernel as an
    (M_g, C_g) matrix:

    .. math::

        W[o, c, u, v] = \\sum_m W_2[o, m, u, v]\\, W_1[m, c], \\qquad
        b[o] = b_2[o] + \\sum_{m,u,v} W_2[o, m, u, v]\\, b_1[m]

    The bias term assumes the KxK conv sees ``b1`` at every tap. That is true
    in the interior; in the border the second conv reads its padding instead.
    So the merge is

    * exact everywhere when the intermediate map is padded with ``b1`` per
      channel instead of zeros (DBB's ``BNAndPadLayer``; see
      :func:`repnp.ops.pad2d` with a vector ``value``), the second conv then
      running with padding 0 on the padded map;
    * exact only in the interior when the intermediate map is zero-padded,
      unless ``b1 == 0``.
    """
    first = _kb(first, "first")
    second = _kb(second, "second")
    groups = int(groups)
    w1, w2 = first.kernel, second.kernel
    m, cg = w1.shape[:2]
    o, mg, kh, kw = w2.shape
    if w1.shape[2:] != (1, 1):
        raise ShapeError(f"first must be a 1x1 kernel, got shape {w1.shape}")
    if groups < 1 or m % groups or o % groups:
        raise ShapeError(f"groups={groups} must divide first's M = {m} and second's O = {o}")
    if mg * groups != m:
        raise ShapeError(
            f"second.kernel {w2.shape} reads {mg} channels per group, but first.kernel {w1.shape} "
            f"gives M/groups = {m}/{groups} = {m // groups}"
        )
    a = w1.astype(np.float64)[:, :, 0, 0].reshape(groups, mg, cg)           # (g, M_g, C_g)
    b = w2.astype(np.float64).reshape(groups, o // groups, mg, kh, kw)      # (g, O_g, M_g, kh, kw)
    kernel = np.einsum("gomhw,gmc->gochw", b, a).reshape(o, cg, kh, kw)
    # b1 of the group each output channel reads, as (O, M_g):
    b1_per_out = first.bias.reshape(groups, mg)[np.repeat(np.arange(groups), o // groups)]
    bias = second.bias + np.einsum("omhw,om->o", b.reshape(o, mg, kh, kw), b1_per_out)
    dtype = _out_dtype(first.kernel)
    return KernelBias(kernel.astype(dtype), bias.astype(dtype))


def merge_pointwise(first, second, *, groups: int = 1) -> KernelBias:
    """Merge a KxK conv followed by a 1x1 conv into one KxK conv.

    Parameters
    ----------
    first : KernelBias or (kernel, bias)
        The KxK conv, kernel (M, C/groups, kh, kw), any stride, padding,
        dilation (kept by the merged conv).
    second : KernelBias or (kernel, bias)
        The 1x1 conv, kernel (O, M, 1, 1), dense, stride 1, no padding.
    groups : int, keyword-only
        The groups of ``first``.

    Returns
    -------
    KernelBias
        Kernel (O, C/groups, kh, kw) when ``groups == 1``; when ``first`` is
        grouped the result is **dense**, (O, C, kh, kw): a 1x1 that mixes all M
        channels makes every output read every group. For a depthwise conv
        followed by a pointwise one (MobileNet, ShuffleNet with no
        nonlinearity between) that turns ``C*K*K + O*C`` weights into
        ``O*C*K*K``: exact, but a bad trade.

    Notes
    -----
    Seed 004 (ResRep's compactor merge; DBB transform III with the roles
    swapped). The 1x1 is a matrix ``Q`` (O, M) applied to every pixel, so

    .. math::

        W[o, c, u, v] = \\sum_m Q[o, m]\\, W_1[m, c, u, v], \\qquad
        b = Q b_1 + b_2

    exact everywhere: the 1x1 conv has no padding, so no border effect.
    """
    first = _kb(first, "first")
    second = _kb(second, "second")
    w1, w2 = first.kernel, second.kernel
    if w2.shape[2:] != (1, 1):
        raise ShapeError(f"second must be a 1x1 kernel, got shape {w2.shape}")
    m = w1.shape[0]
    if w2.shape[1] != m:
        raise ShapeError(
            f"second.kernel {w2.shape} must read all M = {m} output channels of first.kernel {w1.shape}"
        )
    dense = ungroup_kernel(w1.astype(np.float64), groups=groups) if groups != 1 else w1.astype(np.float64)
    q = w2.astype(np.float64)[:, :, 0, 0]
    kernel = np.einsum("om,mchw->ochw", q, dense)
    bias = q @ first.bias + second.bias
    dtype = _out_dtype(first.kernel)
    return KernelBias(kernel.astype(dtype), bias.astype(dtype))


# ----------------------------------------------------------------------------
# rule 6: average pooling as a conv
# ----------------------------------------------------------------------------

def avgpool_kernel(channels: int, kernel_size, *, groups: int = 1, dtype=np.float64) -> np.ndarray:
    """The kernel of a conv that computes KxK average pooling (DBB transform V).

    Parameters
    ----------
    channels : int
    kernel_size : int or (kh, kw)
    groups : int, keyword-only
        The groups of the conv that will carry the kernel; must divide channels.

    Returns
    -------
    ndarray, shape (C, C/groups, kh, kw)
        ``1/(kh*kw)`` at ``[i, i % (C/groups), :, :]``, zero elsewhere.

    Notes
    -----
    Seed 004 / DBB transform V: pooling channel ``i`` is a conv whose output
    ``i`` reads only input ``i`` with uniform weights. Exact with
    ``count_include_pad=True`` (PyTorch's default), where every window divides
    by ``kh*kw``, padded zeros included. ONNX ``AveragePool`` defaults to
    ``count_include_pad=0``, dividing border windows by fewer pixels: that is
    not a convolution at the borders and cannot be fused this way.
    """
    kh, kw = _kernel_size(kernel_size)
    channels, groups = int(channels), int(groups)
    if channels < 1 or groups < 1 or channels % groups:
        raise ShapeError(f"groups={groups} must divide channels={channels} (both >= 1)")
    if kh < 1 or kw < 1:
        raise ShapeError(f"kernel_size must be positive, got {(kh, kw)}")
    per_group = channels // groups
    kernel = np.zeros((channels, per_group, kh, kw), dtype=dtype)
    idx = np.arange(channels)
    kernel[idx, idx % per_group] = 1.0 / (kh * kw)
    return kernel


# ----------------------------------------------------------------------------
# rule 8: conv into FC
# ----------------------------------------------------------------------------

def conv_to_fc(kernel, bias, *, input_shape, stride=1, padding=0, dilation=1, groups: int = 1) -> KernelBias:
    """The fully connected layer that equals a conv on a fixed-size input (RepMLP).

    Parameters
    ----------
    kernel : ndarray, shape (O, C/groups, kh, kw)
    bias : ndarray, shape (O,), or None
    input_shape : (C, H, W), keyword-only
        The fixed input size (without the batch axis).
    stride, padding, dilation, groups : keyword-only
        The conv's geometry, as for :func:`repnp.ops.conv2d`.

    Returns
    -------
    KernelBias
        ``kernel`` is the matrix (O*H_out*W_out, C*H*W) and ``bias`` the vector
        (O*H_out*W_out,), both in NCHW flattening order (channel first), so that
        ``linear(x.reshape(N, -1), *fc).reshape(N, O, H_out, W_out) ==
        conv2d(x, kernel, bias, ...)``.

    Notes
    -----
    Seed 004 / RepMLP: a conv on a fixed-size map is linear, so it is a matrix
    ``M`` with ``vec(conv(x)) = M vec(x) + b``. Feeding the identity basis
    (``C*H*W`` one-hot images) through the conv, without bias, gives the
    columns of ``M`` one by one; ``b`` is the conv bias repeated over the
    ``H_out*W_out`` positions of each channel.
    """
    kernel = _as_kernel(kernel)
    try:
        c, h, w = (int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise ShapeError(f"input_shape must be (C, H, W), got {input_shape!r}") from None
    dtype = _out_dtype(kernel)
    basis = np.eye(c * h * w, dtype=np.float64).reshape(c * h * w, c, h, w)
    response = ops.conv2d(basis, kernel.astype(np.float64), None, stride=stride, padding=padding,
                          dilation=dilation, groups=groups)
    o, ho, wo = response.shape[1:]
    matrix = response.reshape(c * h * w, o * ho * wo).T
    fc_bias = np.repeat(_bias64(bias, o), ho * wo)
    return KernelBias(matrix.astype(dtype), fc_bias.astype(dtype))
