"""The kernel algebra of summed branches: rules 1, 2, 3, 4 and 7.

Everything a RepVGG- or MobileOne-style block needs to become one conv is here:
fold a BN into the conv before it (rule 1), write the identity as a kernel
(rule 4), place a small kernel inside a larger one (rule 3), add branches
(rule 2); and concatenation along channels (rule 7).
"""

from __future__ import annotations

import numpy as np

from repnp.errors import ShapeError
from repnp.fusion._common import (
    KernelBias,
    _as_kernel,
    _channel_vector,
    _kb,
    _kernel_size,
    _out_dtype,
    _signed_pads,
    _target_size,
)

# rule 1: conv + BN ------------------------------------------------------------------------------

def bn_scale_shift(mean, var, gamma, beta, *, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Inference BN as the per-channel affine map ``y = t * x + s``.

    Parameters
    ----------
    mean, var, gamma, beta : array_like, shape (C,)
        Running statistics and affine parameters of the BN.
    eps : float, keyword-only
        The BN's epsilon (never a hidden constant: frameworks differ).

    Returns
    -------
    t, s : ndarray (float64), shape (C,)
        ``t = gamma / sqrt(var + eps)``, ``s = beta - mean * t``. ``s`` is also
        the BN's output at zero input: the value DBB pads with (see
        :func:`merge_sequential`).

    Raises
    ------
    ShapeError
        If the four vectors do not have one shape (C,).
    ValueError
        If ``var + eps <= 0`` (or NaN) anywhere: the BN is undefined there.

    Notes
    -----
    Inference BatchNorm (Ioffe & Szegedy, ICML 2015; written as eq. (2) of
    RepVGG, Ding et al., CVPR 2021, Sec. 3.3):
    ``bn(M)_i = (M_i - mu_i) gamma_i / sigma_i + beta_i`` with
    ``sigma_i = sqrt(var_i + eps)``, i.e.

    .. math:: t = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}, \\qquad s = \\beta - \\mu\\, t
    """
    mean, var, gamma, beta = (np.asarray(v, dtype=np.float64) for v in (mean, var, gamma, beta))
    shapes = {"mean": mean.shape, "var": var.shape, "gamma": gamma.shape, "beta": beta.shape}
    if len(set(shapes.values())) != 1 or mean.ndim != 1:
        raise ShapeError(f"BN parameters must all have one shape (C,), got {shapes}")
    denom = var + eps
    if not np.all(denom > 0):  # written this way so that NaN fails too
        bad = int(np.flatnonzero(~(denom > 0))[0])
        raise ValueError(
            f"var + eps must be positive, got var[{bad}] + eps = {var[bad]} + {eps} = {denom[bad]}"
        )
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
        In the dtype of ``kernel``. The conv keeps its stride, padding,
        dilation and groups.

    Raises
    ------
    ShapeError
        If ``kernel`` is not 4-D, or ``bias`` / the BN vectors are not (O,).
    ValueError
        If ``var + eps <= 0`` anywhere.

    Notes
    -----
    RepVGG (Ding et al., CVPR 2021), Sec. 3.3, eq. (3); DBB (Ding et al.,
    CVPR 2021) transform I (official ``transI_fusebn``):
    ``BN(W*x + b) = t (W*x + b - mean) + beta`` with ``t = gamma / sqrt(var + eps)``,
    so per output channel ``o``

    .. math:: W'_o = t_o W_o, \\qquad b'_o = \\beta_o + (b_o - \\mu_o)\\, t_o

    The formula is exact at every pixel, borders included: BN acts per pixel
    after the conv. A BN-only (identity) branch is this rule applied to
    :func:`identity_kernel`. Since ``beta + (b - mean) t = b t + s`` with
    ``(t, s)`` from :func:`bn_scale_shift`, this is :func:`scale_channels` with
    the BN's ``(t, s)``: the kernel is multiplied in float64 and rounded once
    into the kernel's dtype, with no float64 copy of it.
    """
    kernel = _as_kernel(kernel)
    o = kernel.shape[0]
    t, s = bn_scale_shift(mean, var, gamma, beta, eps=eps)
    if t.shape != (o,):
        raise ShapeError(f"BN parameters have shape {t.shape}, kernel {kernel.shape} needs ({o},)")
    # beta + (b - mean) t == b t + (beta - mean t) == b t + s: the BN is the affine map (t, s)
    return scale_channels((kernel, bias), t, s)


def scale_channels(branch, scale, shift=None, *, dtype=None) -> KernelBias:
    """Fold a per-output-channel affine map ``y = scale * conv(x) + shift`` into the conv.

    Parameters
    ----------
    branch : KernelBias or (kernel, bias)
        The conv: kernel (O, I, kh, kw), bias (O,) or None (zeros).
    scale : float or array_like, shape (O,)
        ``t``, the factor of each output channel: a BN's ``gamma / sqrt(var +
        eps)`` (:func:`bn_scale_shift`), a layer scale, a ``Mul`` by a
        per-channel constant, -1 for a difference of branches.
    shift : float or array_like, shape (O,), optional
        ``s``, added after the product (default 0): a BN's ``beta - mean t``, an
        ``Add`` of a per-channel constant.
    dtype : keyword-only, optional
        The dtype of the result; default the kernel's (float64 for an integer
        kernel). The products are taken in float64 and rounded once, without a
        float64 copy of the kernel when ``dtype`` is narrower.

    Returns
    -------
    KernelBias
        ``(W', b')``, a new kernel of ``branch.kernel``'s shape and a new bias
        (O,). The conv keeps its stride, padding, dilation and groups.

    Raises
    ------
    ShapeError
        If the kernel is not 4-D, or ``bias``, ``scale`` or ``shift`` is neither
        a scalar nor of shape (O,).

    Notes
    -----
    Rule 1 in general (RepVGG, Ding et al., CVPR 2021, eq. (3) is the BN
    case; DBB transform I; FastViT's layer scale, Vasu et al., ICCV 2023, is
    another): the map acts per pixel after the conv, so for output channel ``o``

    .. math:: t_o (W_o * x + b_o) + s_o = (t_o W_o) * x + (t_o b_o + s_o),
              \\qquad W'_o = t_o W_o, \\qquad b'_o = t_o b_o + s_o

    exact at every pixel, borders included. :func:`fuse_bn` is this with
    ``(t, s) = bn_scale_shift(...)``; timm's FastViT ``RepMixer``,
    ``x + gamma * (mixer(x) - norm(x))``, is ``add_branches`` of the identity
    and the two branches scaled by ``gamma`` and ``-gamma``. Two maps in a row
    compose to one: ``(t_2 t_1, t_2 s_1 + s_2)``.
    """
    branch = _kb(branch, "branch")
    kernel = branch.kernel
    o = kernel.shape[0]
    t = _channel_vector(scale, o, "scale", kernel.shape)
    s = np.zeros(o) if shift is None else _channel_vector(shift, o, "shift", kernel.shape)
    dtype = _out_dtype(kernel) if dtype is None else np.dtype(dtype)
    # One pass over the kernel: the ufunc casts it to float64 chunk by chunk (the
    # ``dtype=`` loop) and rounds each product once into ``out`` ("same_kind" allows
    # float64 -> float32), so a float32 kernel gets no float64 copy.
    fused_kernel = np.empty(kernel.shape, dtype=dtype)
    np.multiply(kernel, t[:, None, None, None], out=fused_kernel, dtype=np.float64, casting="same_kind")
    fused_bias = branch.bias * t + s
    return KernelBias(fused_kernel, fused_bias.astype(dtype, copy=False))


# rules 4, 3, 2, 7 -----------------------------------------------------------------------------

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
    dtype : keyword-only
        The dtype of the result.

    Returns
    -------
    ndarray, shape (C, C/groups, kh, kw)
        One at ``[i, i % (C/groups), kh//2, kw//2]``, zero elsewhere.

    Raises
    ------
    ShapeError
        If ``groups`` does not divide ``channels``, or a kernel size is even
        (no centre tap).

    Notes
    -----
    RepVGG (Ding et al., CVPR 2021), Sec. 3.3: the identity branch is a conv
    whose kernel is 1 at the centre tap of its own channel (official
    ``RepVGGBlock._fuse_bn_tensor``; ``repnp.golden`` holds our own worked
    3x3 example). With stride 1 and padding
    ``(d*(kh//2), d*(kw//2))`` at dilation ``d`` the centre tap reads exactly
    the pixel under it, so ``conv(x, I) == x``:

    .. math:: I[i, c, u, v] = [c = i \\bmod C_g]\\,
              [u = \\lfloor k_h/2 \\rfloor]\\,[v = \\lfloor k_w/2 \\rfloor],
              \\qquad C_g = C / \\mathrm{groups}

    Output channel ``i`` lives in group ``i // C_g``, whose inputs are channels
    ``(i // C_g) * C_g ...``; input ``i`` is local index ``i % C_g`` there.
    Writing ``[:, :, k//2, k//2] = 1`` (as some ports do) sums all channels of
    the group: right only when depthwise (``C_g == 1``). Only valid with stride
    1 and ``C_in == C_out``, as for RepVGG's and MobileOne's BN skip.
    """
    channels, groups = int(channels), int(groups)
    kh, kw = _kernel_size(kernel_size)
    if channels < 1 or groups < 1 or channels % groups:
        raise ShapeError(f"groups={groups} must divide channels={channels} (both >= 1)")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ShapeError(
            f"identity kernel needs odd kernel sizes to have a centre tap, got kernel_size {(kh, kw)}: "
            f"an even kernel has no pixel at its centre, so no single tap reads the pixel under it "
            f"with symmetric padding"
        )
    per_group = channels // groups
    kernel = np.zeros((channels, per_group, kh, kw), dtype=dtype)
    idx = np.arange(channels)
    kernel[idx, idx % per_group, kh // 2, kw // 2] = 1
    return kernel


def pad_kernel(kernel, kernel_size, *, offset=None) -> np.ndarray:
    """Embed a smaller kernel in a larger one (zeros around it).

    Parameters
    ----------
    kernel : ndarray, shape (O, I, kh, kw)
    kernel_size : int or (KH, KW)
        The target size, ``KH >= kh`` and ``KW >= kw``.
    offset : (top, left), keyword-only, optional
        Where the small kernel's top-left tap goes. Default: centred, which
        needs ``KH - kh`` and ``KW - kw`` even. :func:`kernel_offset` computes
        it from the two convs' paddings.

    Returns
    -------
    ndarray, shape (O, I, KH, KW), dtype of ``kernel``.

    Raises
    ------
    ShapeError
        If the target is smaller than the kernel, if the kernel cannot be
        centred (odd size inside even or even inside odd: the centres fall half
        a pixel apart), or if ``offset`` puts it outside.

    Notes
    -----
    RepVGG (Ding et al., CVPR 2021), Sec. 3.3 (official
    ``_pad_1x1_to_3x3_tensor``), DBB transform VI (``transVI_multiscale``): a
    1x1 conv with padding ``p - K//2`` equals a KxK conv with padding ``p``
    whose kernel is zero except at the centre; ACNet's 1xK and Kx1 kernels
    (Ding et al., ICCV 2019; official ``ACBlock._add_to_square_kernel``) embed
    the same way along one axis.
    In general, along one axis, a conv with kernel ``w`` (size ``k``) and
    leading padding ``p`` computes
    ``y[i] = sum_u w[u] x[s*i - p + d*u]``; placed at ``offset`` inside a size
    ``K`` kernel ``W`` used with padding ``P``:

    .. math:: W[\\mathrm{offset} + u] = w[u], \\qquad p = P - d\\cdot\\mathrm{offset},
              \\qquad p_{end} = P_{end} - d\\,(K - k - \\mathrm{offset})

    (the trailing condition makes the output sizes agree). Centred, ``offset =
    (K - k)/2`` and both sides give ``p = P - d (K - k)/2``. A crop (``Slice``)
    of the input before the small conv counts as negative padding; branches
    whose paddings differ asymmetrically need an explicit offset.
    """
    kernel = _as_kernel(kernel)
    big_h, big_w = _kernel_size(kernel_size)
    o, i, kh, kw = kernel.shape
    top, left = _placement(kernel.shape, (big_h, big_w), offset)
    out = np.zeros((o, i, big_h, big_w), dtype=kernel.dtype)
    out[:, :, top:top + kh, left:left + kw] = kernel
    return out


def _placement(shape, size, offset) -> tuple[int, int]:
    """``(top, left)`` of a kernel of ``shape`` (OIHW) inside one of ``size`` (KH, KW):
    ``offset`` checked, or centred (see :func:`pad_kernel`)."""
    big_h, big_w = size
    kh, kw = shape[2:]
    if big_h < kh or big_w < kw:
        raise ShapeError(f"kernel_size {(big_h, big_w)} is smaller than the kernel {tuple(shape)}")
    if offset is None:
        if (big_h - kh) % 2 or (big_w - kw) % 2:
            raise ShapeError(
                f"cannot centre a {kh}x{kw} kernel (shape {tuple(shape)}) in a {big_h}x{big_w} one: "
                f"the size differences ({big_h - kh}, {big_w - kw}) must be even for the centres to "
                f"coincide (odd inside even or even inside odd leaves the centres half a pixel apart); "
                f"pass offset=(top, left) to place it explicitly (see kernel_offset)"
            )
        return (big_h - kh) // 2, (big_w - kw) // 2
    try:
        top, left = (int(v) for v in offset)
    except (TypeError, ValueError):
        raise ShapeError(f"offset must be a (top, left) pair, got {offset!r}") from None
    if top < 0 or left < 0 or top + kh > big_h or left + kw > big_w:
        raise ShapeError(
            f"offset {(top, left)} puts the {kh}x{kw} kernel (shape {tuple(shape)}) outside "
            f"the {big_h}x{big_w} one"
        )
    return top, left


def kernel_offset(small_kernel_size, small_padding, *, kernel_size, padding, dilation=1) -> tuple[int, int]:
    """Where a small conv's kernel sits inside a big conv's kernel, from their paddings.

    Parameters
    ----------
    small_kernel_size : int or (kh, kw)
    small_padding : int, (ph, pw) or (top, left, bottom, right)
        The small conv's padding, ONNX order; negative values mean its input
        was cropped (ACNet's ``CropLayer``, an ONNX ``Slice``).
    kernel_size : int or (KH, KW), keyword-only
    padding : int, (ph, pw) or (top, left, bottom, right), keyword-only
        The big conv's padding.
    dilation : int or (dh, dw), keyword-only
        Shared by both convs (as are stride and groups).

    Returns
    -------
    (top, left) : tuple of int
        The ``offset`` for :func:`pad_kernel`: the big conv with the placed
        kernel and ``padding`` equals the small conv with ``small_padding``.

    Raises
    ------
    ShapeError
        If no offset works: the leading paddings differ by a non-multiple of
        the dilation (the small taps fall between the big ones), the small
        kernel would stick out of the big one, or the trailing paddings give
        a different output size.

    Notes
    -----
    Rule 3 (kernel alignment), per axis, generalized from the centred case of
    RepVGG, ACNet and DBB transform VI to any paddings (see :func:`pad_kernel`
    and ``docs/sources.md``):

    .. math:: \\mathrm{offset} = (P - p) / d, \\qquad
              0 \\le \\mathrm{offset} \\le K - k, \\qquad
              P_{end} - p_{end} = d\\,(K - k - \\mathrm{offset})

    RepVGG's 3x3 with padding 1 and 1x1 with padding 0 give offset (1, 1);
    ACNet's 1x3 with padding (0, 1) next to a 3x3 with padding 1 gives (1, 0).
    """
    small = _kernel_size(small_kernel_size, "small_kernel_size")
    big = _kernel_size(kernel_size)
    dil = _kernel_size(dilation, "dilation")
    sp = _signed_pads(small_padding, "small_padding")
    bp = _signed_pads(padding, "padding")
    offset = []
    for axis, name in enumerate(("height", "width")):
        k, kk, d = small[axis], big[axis], dil[axis]
        lead, lead_small = bp[axis], sp[axis]
        trail, trail_small = bp[axis + 2], sp[axis + 2]
        where = (f"({name}: small kernel {k} with padding ({lead_small}, {trail_small}), big kernel "
                 f"{kk} with padding ({lead}, {trail}), dilation {d})")
        if k > kk:
            raise ShapeError(f"the small kernel is larger than the big one {where}")
        if (lead - lead_small) % d:
            raise ShapeError(
                f"the leading paddings differ by {lead - lead_small}, not a multiple of the dilation: "
                f"the small kernel's taps fall between the big kernel's taps {where}"
            )
        off = (lead - lead_small) // d
        if off < 0 or off > kk - k:
            raise ShapeError(
                f"the small kernel would start at tap {off}, outside 0..{kk - k}: it reads pixels "
                f"the big kernel never reaches {where}"
            )
        if trail - trail_small != d * (kk - k - off):
            raise ShapeError(
                f"the trailing paddings give a different output size: need big - small = "
                f"{d * (kk - k - off)}, got {trail - trail_small} {where}"
            )
        offset.append(off)
    return offset[0], offset[1]


def add_branches(*branches, kernel_size=None, offsets=None, scales=None, dtype=None) -> KernelBias:
    """Sum parallel convolutions on one input into one convolution.

    Parameters
    ----------
    *branches : KernelBias or (kernel, bias)
        Kernels (O, I, kh_b, kw_b) with one O and I; biases may be None.
    kernel_size : int or (KH, KW), keyword-only, optional
        The size of the result. Default: the smallest that holds every branch
        where it is placed (the largest branch kernel when all are centred).
    offsets : sequence of (top, left) or None, keyword-only, optional
        One entry per branch: where its top-left tap goes in the result, as
        :func:`pad_kernel` places it (:func:`kernel_offset` computes it from
        the branch's padding and the result's). ``None`` (the default, for the
        whole list or one entry) centres the kernel.
    scales : sequence of (O,) arrays or None, keyword-only, optional
        One entry per branch: a per-output-channel factor ``t_b`` of its
        *kernel* not multiplied in yet (``None``: 1). The branch is then the
        conv with kernel ``t_b[:, None, None, None] * W_b`` and bias ``b_b``
        (already final). ``add_branches(*branches, scales=ts)`` equals
        ``add_branches(*[scale_channels((W_b, None), t_b) + b_b ...])`` without
        the scaled copies: each factor is multiplied in as its kernel is
        added, which matters for a chain of per-channel ops (BN, ``Mul``)
        after big convs, as the ONNX converter meets them.
    dtype : keyword-only, optional
        The dtype of the result; default that of the first kernel (float64
        for an integer one). Pass float64 to go on composing without rounding.

    Returns
    -------
    KernelBias
        Kernel (O, I, KH, KW) and bias (O,), new arrays.

    Raises
    ------
    ShapeError
        If the branches differ in O or I, ``offsets`` or ``scales`` does not
        have one entry per branch, a scale is not (O,), an offset puts a kernel
        outside the result, a kernel cannot be centred, or ``kernel_size`` is
        too small.
    ValueError
        If there is no branch.

    Notes
    -----
    DBB transform II (Ding et al., CVPR 2021; official ``transII_addbranch``).
    Convolution is linear in the kernel, which is what lets RepVGG (CVPR 2021,
    Sec. 3.3) and ACNet (ICCV 2019) add their branch kernels:

    .. math:: \\sum_b \\left(W_b * x + b_b\\right) = \\Big(\\sum_b \\hat W_b\\Big) * x + \\sum_b b_b

    with ``\\hat W_b`` the kernels padded to the common size, when all branches
    share input, stride, dilation and groups and produce the same output
    size. Placement (rule 3, :func:`pad_kernel`): along one axis, a branch of
    size ``k`` with leading padding ``p_b`` placed at ``offset`` in a result of
    size ``K`` run with padding ``P`` needs

    .. math:: p_b = P - d\\cdot\\mathrm{offset}, \\qquad
              p_{b,end} = P_{end} - d\\,(K - k - \\mathrm{offset})

    Centred, ``offset = (K - k)/2``: a branch of size ``k`` uses padding
    ``p - d*(K - k)/2`` where the largest (size ``K``) uses ``p``, e.g.
    RepVGG's 3x3 with padding 1 and 1x1 with padding 0; ACNet's 1x3 with
    padding (0, 1) and 3x1 with (1, 0) next to a 3x3 with padding 1. A
    negative value means the branch crops its input (ACNet's ``CropLayer``, an
    ONNX ``Slice``); branches whose paddings differ asymmetrically, or even
    kernels, need ``offsets``.

    The sum is accumulated in one new float64 array: a float64 copy (times
    its scale) of the first kernel that fills the result, or zeros, then
    every other kernel added into its slice, so no padded copy of any operand
    is made and no input is written.
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
    offsets = _per_branch(offsets, len(parts), "offsets")
    scales = [None if t is None else _channel_vector(t, o, f"scales[{n}]", parts[n].kernel.shape)
              for n, t in enumerate(_per_branch(scales, len(parts), "scales"))]
    if kernel_size is None and any(off is not None for off in offsets):
        kernel_size = _reach(parts, offsets)
    big = _target_size(parts, kernel_size)
    places = [_placement(p.kernel.shape, big, off) for p, off in zip(parts, offsets)]

    def scaled(kernel, t):  # t W in float64 (a new array), or W itself (added, never written)
        return kernel if t is None else np.multiply(kernel, t[:, None, None, None], dtype=np.float64)

    first = next((n for n, p in enumerate(parts) if p.kernel.shape[2:] == big), None)
    if first is None:
        kernel = np.zeros((o, i) + big)
    elif scales[first] is None:
        kernel = np.array(parts[first].kernel, dtype=np.float64)  # a copy: the accumulator is ours
    else:
        kernel = scaled(parts[first].kernel, scales[first])
    bias = np.zeros(o)
    for n, (p, t, (top, left)) in enumerate(zip(parts, scales, places)):
        if n != first:
            kh, kw = p.kernel.shape[2:]
            kernel[:, :, top:top + kh, left:left + kw] += scaled(p.kernel, t)
        bias += p.bias
    dtype = _out_dtype(parts[0].kernel) if dtype is None else np.dtype(dtype)
    return KernelBias(kernel.astype(dtype, copy=False), bias.astype(dtype, copy=False))


def _per_branch(values, count: int, name: str) -> list:
    """``values`` (None, or one entry per branch) as a list of ``count`` entries."""
    if values is None:
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise ShapeError(f"{name} must have one entry per branch: {count} branches, got {len(values)} {name}")
    return values


def _reach(parts: list[KernelBias], offsets) -> tuple[int, int]:
    """The smallest size holding every branch: ``offset + k`` where placed, ``k`` where centred."""
    reach_h, reach_w = [], []
    for n, (p, off) in enumerate(zip(parts, offsets)):
        kh, kw = p.kernel.shape[2:]
        if off is None:
            reach_h.append(kh)
            reach_w.append(kw)
            continue
        try:
            top, left = (int(v) for v in off)
        except (TypeError, ValueError):
            raise ShapeError(f"offsets[{n}] must be a (top, left) pair or None, got {off!r}") from None
        reach_h.append(max(top, 0) + kh)
        reach_w.append(max(left, 0) + kw)
    return max(reach_h), max(reach_w)


def concat_branches(*branches, kernel_size=None) -> KernelBias:
    """Concatenate convolutions on one input along the output-channel axis.

    Parameters
    ----------
    *branches : KernelBias or (kernel, bias)
        Kernels (O_b, I, kh_b, kw_b) sharing I; smaller kernels are centred in
        the common size (same padding condition as :func:`add_branches`).
    kernel_size : int or (KH, KW), keyword-only, optional
        The size of the result; default the largest branch kernel.

    Returns
    -------
    KernelBias
        Kernel (sum O_b, I, KH, KW), bias (sum O_b,), dtype of the first kernel.

    Raises
    ------
    ShapeError
        If the branches differ in I, or a kernel cannot be centred.
    ValueError
        If there is no branch.

    Notes
    -----
    DBB transform IV (Ding et al., CVPR 2021; official
    ``transIV_depthconcat``), Inception-style depth concatenation:

    .. math:: \\mathrm{concat}_b\\left(W_b * x + b_b\\right) =
              \\left(\\mathrm{concat}_b \\hat W_b\\right) * x + \\mathrm{concat}_b\\, b_b

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
    big = _target_size(parts, kernel_size)
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
    ndarray, shape (O, C, kh, kw), dtype of ``kernel``
        Block diagonal: output channel ``o`` of group ``g`` keeps its taps on
        input channels ``g*C/groups ... (g+1)*C/groups - 1``, zeros elsewhere.

    Raises
    ------
    ShapeError
        If ``groups`` does not divide O.

    Notes
    -----
    A grouped conv is a dense conv whose kernel is zero between groups:

    .. math:: W_{dense}[o, g C_g + c] = W[o, c] \\ \\text{if } g = o // O_g, \\text{ else } 0

    with ``C_g = C/groups``, ``O_g = O/groups`` (the layout of ONNX ``Conv``
    and PyTorch ``Conv2d``). Used by :func:`merge_pointwise` and to concatenate
    or add grouped branches with different groups.
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
