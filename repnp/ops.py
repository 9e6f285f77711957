"""Pure-NumPy neural-network operators, inference semantics.

Conventions (as ONNX and PyTorch): activations are NCHW, convolution weights
are OIHW with ``I = C_in / groups``, biases are 1-D of length ``O``. Every
operator returns the dtype of its input ``x``; parameters are cast to it.

The convolution is im2col: the input is unfolded into a column matrix of shape
``(N, groups, C_in/groups * kh * kw, H_out * W_out)`` and multiplied by the
weight reshaped to ``(groups, O/groups, C_in/groups * kh * kw)`` in one batched
``matmul``. The product is already laid out NCHW, so no transpose follows. The
only Python loops run over the ``kh * kw`` kernel offsets to fill the columns.
Filling the columns is the only cost on top of the GEMM, so it is done with as
few and as long copies as the geometry allows (``repnp._conv_fast.columns`` and
``columns_wide``; ``benchmarks/bench_conv.py`` measures the result). ``conv2d``'s
body lists its fast paths (pointwise, depthwise 1x1, grouped convs by chunks of
groups, bias and activation in place) and why each pays;
``tests/test_ops_paths.py`` forces every one of them against onnxruntime and scipy.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from repnp import _conv_fast as _fast
from repnp.errors import ShapeError

__all__ = [
    "conv2d",
    "conv_transpose2d",
    "batch_norm",
    "avg_pool2d",
    "linear",
    "pad2d",
    "relu",
    "relu6",
    "identity",
    "sigmoid",
    "gelu",
    "hardswish",
    "silu",
    "channel_shuffle",
    "shuffle_permutation",
    "conv_output_size",
    "conv_transpose_output_size",
    "pair",
    "normalize_padding",
    "ACTIVATIONS",
]


# ----------------------------------------------------------------------------
# argument normalisation
# ----------------------------------------------------------------------------

def pair(value, *, name: str = "value", minimum: int | None = None) -> tuple[int, int]:
    """A stride, dilation, kernel size or padding given as an int or an (h, w) pair, as ``(h, w)``.

    The one parser of int-or-pair geometry in repnp (blocks, converters and the
    command line call it too).

    Parameters
    ----------
    value : int or (int, int)
    name : str, keyword-only
        The argument's name, for the error message.
    minimum : int, optional, keyword-only
        Smallest value accepted on each axis (none by default).

    Returns
    -------
    (int, int)
        ``(value, value)`` for an int, the pair as Python ints otherwise.

    Raises
    ------
    ShapeError
        If ``value`` is neither an int nor a pair of ints, or is below ``minimum``.
    """
    if type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is type(value[1]) is int:
        hw = tuple(value)     # the common case (dataflow attributes), without the generic parsing
    elif isinstance(value, (int, np.integer)):
        hw = (int(value), int(value))
    else:
        try:
            hw = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ShapeError(f"{name} must be an int or an (h, w) pair, got {value!r}") from None
        if len(hw) != 2:
            raise ShapeError(f"{name} must be an int or an (h, w) pair, got {value!r}")
    if minimum is not None and min(hw) < minimum:
        raise ShapeError(f"{name} must be >= {minimum} on both axes, got {value!r}")
    return hw


def normalize_padding(padding) -> tuple[int, int, int, int]:
    """Return ``padding`` as the ONNX-order 4-tuple ``(top, left, bottom, right)``.

    Accepts an int (all sides), an ``(ph, pw)`` pair (symmetric per axis) or a
    4-tuple already in ONNX order ``(h_begin, w_begin, h_end, w_end)``.
    Negative values raise :class:`ShapeError`.
    """
    if type(padding) in (tuple, list) and len(padding) == 4 and all(type(p) is int for p in padding):
        pads = tuple(padding)     # the common case (dataflow attributes), without the generic parsing
    elif isinstance(padding, (int, np.integer)):
        pads = (int(padding),) * 4
    else:
        try:
            values = tuple(int(p) for p in padding)
        except TypeError:
            raise ShapeError(
                f"padding must be an int, (ph, pw) or (top, left, bottom, right), got {padding!r}"
            ) from None
        if len(values) == 2:
            pads = (values[0], values[1], values[0], values[1])
        elif len(values) == 4:
            pads = values
        else:
            raise ShapeError(
                f"padding must be an int, (ph, pw) or (top, left, bottom, right), got {padding!r}"
            )
    if min(pads) < 0:
        raise ShapeError(f"padding must be non-negative, got {padding!r}")
    return pads


def conv_output_size(size: int, kernel: int, *, stride: int = 1, pad_begin: int = 0,
                     pad_end: int = 0, dilation: int = 1) -> int:
    """Output length along one axis: ``floor((size + pads - d*(k-1) - 1) / s) + 1``."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def _check_nchw(x: np.ndarray, name: str = "x") -> None:
    if x.ndim != 4:
        raise ShapeError(f"{name} must be NCHW (4-D), got shape {x.shape}")


def _float_dtype(x: np.ndarray) -> np.dtype:
    """The dtype an operator computes and returns in: the input's if floating, else float64."""
    return x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)


# ----------------------------------------------------------------------------
# padding and column extraction
# ----------------------------------------------------------------------------

def pad2d(x: np.ndarray, padding, *, value=0.0) -> np.ndarray:
    """Pad the two spatial axes of an NCHW tensor.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    padding : int, (ph, pw) or (top, left, bottom, right)
        ONNX order for the 4-tuple.
    value : float or array of shape (C,), keyword-only
        The fill value. A per-channel vector pads channel ``c`` with
        ``value[c]``: this is DBB's "BN-and-pad" (the intermediate map of a
        1x1 -> KxK branch padded with the 1x1-BN output at zero input), which
        ONNX ``Pad`` cannot express with its single scalar.

    Returns
    -------
    ndarray, shape (N, C, H + top + bottom, W + left + right), dtype of ``x``.
    """
    x = np.asarray(x)
    _check_nchw(x)
    top, left, bottom, right = normalize_padding(padding)
    n, c, h, w = x.shape
    value = np.asarray(value, dtype=x.dtype)
    if value.ndim == 0:
        out = np.full((n, c, h + top + bottom, w + left + right), value, dtype=x.dtype)
    elif value.shape == (c,):
        out = np.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype)
        out[...] = value[None, :, None, None]
    else:
        raise ShapeError(
            f"value must be a scalar or have shape (C,) = ({c},), got shape {value.shape}"
        )
    out[:, :, top:top + h, left:left + w] = x
    return out


#: Use the wide (padded-width) columns when ``(C_out / groups) * (W_p - W_out)`` is below this.
#: Why: the wide fill is about 2x faster than the two-stage one, but the GEMM then also computes
#: ``W_p - W_out`` junk columns per output row, ``C_out / groups`` outputs deep, and crops them
#: with one more copy. That pays only when the GEMM is small next to the fill, as in depthwise
#: convs. Measured (benchmarks/bench_conv.py and its shapes, 2 cores, float32): depthwise 3x3
#: C=256 H=14 is ~10% faster wide; the dense 3x3 convs with C = 64..512 are 10-30% slower wide.
_WIDE_LIMIT = 32

#: Column-matrix elements built at a time for grouped convs (see ``conv2d``): 512 Ki elements,
#: 2 MiB in float32. Measured on MobileNetV2's and MobileOne's depthwise layers (float32, one
#: thread): 128 Ki to 512 Ki were within 10 % of each other and 1.1-4x faster than the whole
#: matrix at once; 32 Ki lost up to 3x to the per-chunk Python overhead.
_GROUP_CHUNK = 1 << 19

#: The activations ``conv2d`` can apply in place (``activation=``), by ``ACTIVATIONS`` name.
_FUSED = ("identity", "relu", "relu6")

#: ``y = act(y + bias)`` in place (``repnp.dataflow.run`` applies standalone activations with it).
_epilogue = _fast.epilogue


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, *,
           stride=1, padding=0, dilation=1, groups: int = 1,
           activation: str | None = None) -> np.ndarray:
    """2-D cross-correlation (what deep-learning frameworks call convolution).

    Parameters
    ----------
    x : ndarray, shape (N, C_in, H, W)
    weight : ndarray, shape (C_out, C_in / groups, kh, kw)
    bias : ndarray, shape (C_out,), optional
    stride, dilation : int or (h, w), keyword-only
        Positive.
    padding : int, (ph, pw) or (top, left, bottom, right), keyword-only
        Zero padding, non-negative; the 4-tuple is in ONNX order.
    groups : int, keyword-only
        ``C_in`` and ``C_out`` must both be divisible by it.
    activation : {None, "identity", "relu", "relu6"}, keyword-only
        Applied to the result in place (``relu(conv2d(...))`` without a second array): what
        ``repnp.dataflow.run`` does for a ``Conv`` whose only reader is a ``Relu`` or a
        ``Clip(0, 6)``.

    Returns
    -------
    ndarray, shape (N, C_out, H_out, W_out), dtype of ``x``.

    Notes
    -----
    .. math::

        y[n, o, i, j] = b[o] + \\sum_{c, u, v} w[o, c, u, v]\\,
            x_p[n, g(o) C_g + c, s_h i + d_h u, s_w j + d_w v]

    with ``x_p`` the zero-padded input, ``C_g = C_in / groups`` and
    ``g(o) = o // (C_out / groups)`` the group of output channel ``o``.
    ``H_out = floor((H + p_top + p_bottom - d_h (kh - 1) - 1) / s_h) + 1``.
    With ``activation``, ``y`` is then replaced by ``max(y, 0)`` or ``min(max(y, 0), 6)``.

    Every path below computes this sum in the dtype of ``x`` (float32 stays float32); they
    differ in how the operands reach the GEMM, which may change the summation order of BLAS
    and so the last bits, never more than the tolerance rule allows.
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    _check_nchw(x)
    if weight.ndim != 4:
        raise ShapeError(f"weight must be OIHW (4-D), got shape {weight.shape}")
    groups = int(groups)
    if groups < 1:
        raise ShapeError(f"groups must be >= 1, got {groups}")
    if activation is not None and activation not in _FUSED:
        raise ValueError(f"activation must be None or one of {_FUSED}, got {activation!r}")
    sh, sw = pair(stride, name="stride", minimum=1)
    dh, dw = pair(dilation, name="dilation", minimum=1)
    top, left, bottom, right = normalize_padding(padding)
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if c % groups:
        raise ShapeError(f"x has {c} channels (shape {x.shape}), not divisible by groups={groups}")
    if o % groups:
        raise ShapeError(
            f"weight has {o} output channels (shape {weight.shape}), not divisible by groups={groups}"
        )
    if cg != c // groups:
        raise ShapeError(
            f"weight in-channels {cg} (weight shape {weight.shape}) != x channels / groups = "
            f"{c}/{groups} = {c // groups} (x shape {x.shape})"
        )
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (o,):
            raise ShapeError(f"bias must have shape ({o},) to match weight {weight.shape}, got {bias.shape}")
    ho = conv_output_size(h, kh, stride=sh, pad_begin=top, pad_end=bottom, dilation=dh)
    wo = conv_output_size(w, kw, stride=sw, pad_begin=left, pad_end=right, dilation=dw)
    if ho < 1 or wo < 1:
        raise ShapeError(
            f"empty output: x spatial size {(h, w)} with padding {(top, left, bottom, right)} is "
            f"smaller than the dilated kernel {(dh * (kh - 1) + 1, dw * (kw - 1) + 1)} "
            f"(weight shape {weight.shape}, dilation {(dh, dw)})"
        )
    dtype = _float_dtype(x)
    x = x.astype(dtype, copy=False)
    w_mat = weight.astype(dtype, copy=False).reshape(groups, o // groups, cg * kh * kw)

    pads = (top, left, bottom, right)
    wp = w + left + right
    k = cg * kh * kw
    if (kh, kw, cg, o) == (1, 1, 1, groups) and not any(pads):
        # A depthwise 1x1 conv (MobileOne's 1x1 branch of its depthwise blocks) is a per-channel
        # scale of the strided input: one broadcast product instead of a GEMM per channel.
        y = np.multiply(x[:, :, ::sh, ::sw], w_mat.reshape(1, o, 1, 1))
        return _fast.epilogue(y, bias, activation)
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(pads):
        # A pointwise conv needs no unfolding: the input already is the column matrix, and the
        # product is one GEMM per image (per group) straight from x, no copy.
        y = np.matmul(w_mat, x.reshape(n, groups, cg, h * w))
        return _fast.epilogue(y.reshape(n, o, ho, wo), bias, activation)
    wide = (sh, sw) == (1, 1) and (o // groups) * (wp - wo) < _WIDE_LIMIT
    if wide:
        row = wp

        def fill(xs):
            return _fast.columns_wide(xs, (kh, kw), (dh, dw), pads, ho)
    else:
        row = wo

        def fill(xs):
            return _fast.columns(xs, (kh, kw), (sh, sw), (dh, dw), pads, (ho, wo))

    # The GEMM: (groups, O/g, K) @ (N, groups, K, P) -> (N, groups, O/g, P), already NCHW.
    # Grouped and depthwise convs are computed a few groups at a time: their GEMMs are small
    # (a matrix-vector product per channel for depthwise), so the time goes into moving the
    # column matrix, which for a chunk of groups stays in cache between its fill and its GEMM
    # (measured, float32: 144 depthwise channels of 56x56 4x faster than all at once).
    per_group = n * k * ho * row
    step = groups if per_group * groups <= _GROUP_CHUNK else max(1, _GROUP_CHUNK // per_group)
    og = o // groups
    if step >= groups:
        y = np.matmul(w_mat, fill(x).reshape(n, groups, k, ho * row))
    else:
        y = np.empty((n, groups, og, ho * row), dtype=dtype)
        # Unless the wide layout's crop carries it, the bias and activation are applied to each
        # chunk's output while it is still in cache, not in a pass over the whole map after.
        in_chunk = row == wo

        def chunk(g0):
            g1 = min(groups, g0 + step)
            cols = fill(x[:, g0 * cg:g1 * cg]).reshape(n, g1 - g0, k, ho * row)
            np.matmul(w_mat[g0:g1], cols, out=y[:, g0:g1])
            if in_chunk:
                _fast.epilogue(y[:, g0:g1].reshape(n, (g1 - g0) * og, ho * row),
                               None if bias is None else bias[g0 * og:g1 * og], activation)
        for g0 in range(0, groups, step):
            chunk(g0)
        if in_chunk:
            return y.reshape(n, o, ho, wo)
    y = y.reshape(n, o, ho, row)
    if row != wo:
        # Crop the junk columns of the wide layout; the bias rides along with that copy.
        out = np.empty((n, o, ho, wo), dtype=dtype)
        if bias is None:
            np.copyto(out, y[..., :wo])
        else:
            np.add(y[..., :wo], bias.astype(dtype, copy=False)[None, :, None, None], out=out)
        return _fast.epilogue(out, None, activation)
    return _fast.epilogue(y, bias, activation)


def batch_norm(x: np.ndarray, mean: np.ndarray, var: np.ndarray, gamma: np.ndarray,
               beta: np.ndarray, *, eps: float = 1e-5, out: np.ndarray | None = None) -> np.ndarray:
    """Inference batch normalisation over channel axis 1.

    Parameters
    ----------
    x : ndarray, shape (N, C) or (N, C, H, W) (any rank >= 2, channels on axis 1)
    mean, var, gamma, beta : ndarray, shape (C,)
        Running statistics and the affine parameters.
    eps : float, keyword-only
        Added to ``var``; frameworks differ (PyTorch 1e-5, YOLOv6 1e-3), so it is
        never hidden.
    out : ndarray, optional, keyword-only
        Array to write the result to, of ``x``'s shape and float dtype; may be ``x`` itself
        (``repnp.dataflow.run`` passes a conv output that nothing else reads).

    Notes
    -----
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta``, computed as the affine
    map ``y = t * x + (beta - mean * t)`` with ``t = gamma / sqrt(var + eps)``.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ShapeError(f"x must have a channel axis 1 (rank >= 2), got shape {x.shape}")
    c = x.shape[1]
    params = {"mean": mean, "var": var, "gamma": gamma, "beta": beta}
    for name, value in params.items():
        if np.shape(value) != (c,):
            raise ShapeError(f"{name} must have shape ({c},) for x of shape {x.shape}, got {np.shape(value)}")
    dtype = _float_dtype(x)
    var64 = np.asarray(var, dtype=np.float64) + eps
    if np.any(var64 <= 0):
        raise ValueError(f"var + eps must be positive, got min {var64.min()} (eps={eps})")
    # The affine coefficients are formed in float64, then cast: one rounding per coefficient.
    scale = np.asarray(gamma, dtype=np.float64) / np.sqrt(var64)
    shift = np.asarray(beta, dtype=np.float64) - np.asarray(mean, dtype=np.float64) * scale
    shape = (1, c) + (1,) * (x.ndim - 2)
    if out is not None and (out.shape != x.shape or out.dtype != dtype):
        raise ShapeError(f"out must have shape {x.shape} and dtype {dtype}, got {out.shape} {out.dtype}")
    # Two passes into one array (no temporary): the product, then the shift added in place.
    y = np.multiply(x.astype(dtype, copy=False), scale.astype(dtype).reshape(shape), out=out)
    y += shift.astype(dtype).reshape(shape)
    return y


def avg_pool2d(x: np.ndarray, kernel_size, *, stride=None, padding=0,
               count_include_pad: bool = True) -> np.ndarray:
    """2-D average pooling.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel_size : int or (kh, kw)
    stride : int or (h, w), keyword-only
        Defaults to ``kernel_size`` (as PyTorch and ONNX do).
    padding : int, (ph, pw) or (top, left, bottom, right), keyword-only
    count_include_pad : bool, keyword-only
        ``True`` (PyTorch's default) divides every window by ``kh * kw``, padded
        zeros included: then pooling is a convolution (see
        ``repnp.fusion.avgpool_kernel``). ``False`` (ONNX's default) divides by
        the number of real pixels in the window, which differs at the borders.

    Returns
    -------
    ndarray, shape (N, C, H_out, W_out), dtype of ``x``.
    """
    x = np.asarray(x)
    _check_nchw(x)
    kh, kw = pair(kernel_size, name="kernel_size", minimum=1)
    sh, sw = pair(kernel_size if stride is None else stride, name="stride", minimum=1)
    top, left, bottom, right = normalize_padding(padding)
    n, c, h, w = x.shape
    ho = conv_output_size(h, kh, stride=sh, pad_begin=top, pad_end=bottom)
    wo = conv_output_size(w, kw, stride=sw, pad_begin=left, pad_end=right)
    if ho < 1 or wo < 1:
        raise ShapeError(
            f"empty output: x spatial size {(h, w)} with padding {(top, left, bottom, right)} "
            f"is smaller than kernel_size {(kh, kw)}"
        )
    dtype = _float_dtype(x)
    xp = pad2d(x.astype(dtype, copy=False), (top, left, bottom, right))
    total = np.zeros((n, c, ho, wo), dtype=dtype)
    for i in range(kh):
        for j in range(kw):
            total += xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
    if count_include_pad:
        return total / dtype.type(kh * kw)
    # Count the real (unpadded) pixels under each window: pool a map of ones.
    ones = pad2d(np.ones((1, 1, h, w), dtype=dtype), (top, left, bottom, right))
    count = np.zeros((1, 1, ho, wo), dtype=dtype)
    for i in range(kh):
        for j in range(kw):
            count += ones[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
    return total / count


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Fully connected layer ``y = x W^T + b`` (ONNX ``Gemm(transB=1)``, ``torch.nn.Linear``).

    Parameters
    ----------
    x : ndarray, shape (N, in_features)
    weight : ndarray, shape (out_features, in_features)
    bias : ndarray, shape (out_features,), optional
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    if x.ndim != 2:
        raise ShapeError(f"x must be (N, in_features), got shape {x.shape}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
        raise ShapeError(
            f"weight must have shape (out_features, {x.shape[1]}) for x of shape {x.shape}, "
            f"got {weight.shape}"
        )
    dtype = _float_dtype(x)
    y = x.astype(dtype, copy=False) @ weight.astype(dtype, copy=False).T
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (weight.shape[0],):
            raise ShapeError(f"bias must have shape ({weight.shape[0]},) for weight {weight.shape}, got {bias.shape}")
        y += bias.astype(dtype, copy=False)
    return y


# ----------------------------------------------------------------------------
# activations (element-wise, dtype kept)
# ----------------------------------------------------------------------------

def identity(x: np.ndarray) -> np.ndarray:
    """``y = x`` (the 'no activation' of linear bottlenecks and ACNet/DBB blocks)."""
    return np.asarray(x)


def relu(x: np.ndarray) -> np.ndarray:
    """``y = max(x, 0)``."""
    x = np.asarray(x)
    return np.maximum(x, x.dtype.type(0))


def relu6(x: np.ndarray) -> np.ndarray:
    """``y = min(max(x, 0), 6)`` (MobileNetV2)."""
    x = np.asarray(x)
    return np.clip(x, x.dtype.type(0), x.dtype.type(6))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``y = 1 / (1 + exp(-x))`` (squeeze-and-excitation gates)."""
    x = np.asarray(x)
    return special.expit(x).astype(x.dtype, copy=False)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU ``y = x * (1 + erf(x / sqrt 2)) / 2`` (FastViT)."""
    x = np.asarray(x)
    half = x.dtype.type(0.5)
    return (half * x * (1 + special.erf(x / np.sqrt(x.dtype.type(2))))).astype(x.dtype, copy=False)


def hardswish(x: np.ndarray) -> np.ndarray:
    """``y = x * relu6(x + 3) / 6`` (MobileNetV3)."""
    x = np.asarray(x)
    return x * relu6(x + x.dtype.type(3)) / x.dtype.type(6)


def silu(x: np.ndarray) -> np.ndarray:
    """``y = x * sigmoid(x)`` (YOLO-style RepConv blocks)."""
    x = np.asarray(x)
    return x * sigmoid(x)


# ----------------------------------------------------------------------------
# channel permutation
# ----------------------------------------------------------------------------

def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """The channel order of :func:`channel_shuffle`: ``out[:, j] = x[:, perm[j]]``.

    ``perm[j] = (j % groups) * (channels // groups) + j // groups``.
    """
    channels, groups = int(channels), int(groups)
    if groups < 1 or channels < 1 or channels % groups:
        raise ShapeError(f"groups={groups} must divide channels={channels} (both >= 1)")
    j = np.arange(channels)
    return (j % groups) * (channels // groups) + j // groups


def channel_shuffle(x: np.ndarray, groups: int) -> np.ndarray:
    """ShuffleNet's channel shuffle: reshape C into (groups, C/groups), transpose, flatten.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    groups : int
        Must divide C.

    Returns
    -------
    ndarray, shape (N, C, H, W), dtype of ``x``
        ``out[:, j] = x[:, (j % g) * (C/g) + j // g]``: output channels
        ``0 .. g-1`` take the first channel of every group, and so on, so that
        each group of the next group conv reads one slice of every group of the
        previous one.

    Notes
    -----
    ShuffleNet, Sec. 3.1 and Fig. 1: "reshape the output channel dimension
    into (g, n), transposing and then flattening it back". The shuffle is a
    permutation matrix ``P`` on the channels, i.e. a 1x1 conv with kernel
    ``P[j, perm[j]] = 1`` (``tests/test_blocks_shufflenet.py`` checks that).

    Why it cannot be folded into the neighbouring group conv and keep its
    groups: a conv with ``g`` groups is a block-diagonal channel matrix ``B``
    (per tap). Folding the shuffle into the conv before it gives ``P B``, into
    the conv after it ``B' P``. These are block diagonal (a group conv) only if
    ``P`` maps every group onto one group, but the shuffle is built to do the
    opposite: each group of its output collects channels from ``min(C/g, g)``
    different input groups (from all of them when ``C/g >= g``). So ``P B`` (or
    ``B' P``) has nonzero blocks off the diagonal as soon as ``C/g > 1``:
    folding turns the group conv into a dense one (stored and computed as
    dense: up to ``g`` times the weights and MACs), which undoes what the group
    conv saved. (Folding it into
    the *depthwise* conv that follows is possible -- a depthwise conv commutes
    with a channel permutation once its channels are renamed -- but that only
    moves the shuffle, it does not remove it.) On a runtime the shuffle is a
    memory copy (ONNX Reshape -> Transpose -> Reshape), no arithmetic.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ShapeError(f"x must be NCHW (4-D), got shape {x.shape}")
    n, c, h, w = x.shape
    groups = int(groups)
    if groups < 1 or c % groups:
        raise ShapeError(f"groups={groups} must divide the {c} channels of x (shape {x.shape})")
    return x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


#: Activation functions by name, for blocks and converters that store the name.
ACTIVATIONS = {
    "identity": identity,
    "relu": relu,
    "relu6": relu6,
    "sigmoid": sigmoid,
    "gelu": gelu,
    "hardswish": hardswish,
    "silu": silu,
}


def prelu(x: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """PReLU, ``x if x >= 0 else slope * x``, ONNX ``PRelu`` (``slope`` broadcast against ``x``).

    Parameters
    ----------
    x : ndarray
    slope : ndarray
        Unidirectionally broadcastable to ``x`` (PyTorch's per-channel ``(C,)`` weight of an
        NCHW map as ``(C, 1, 1)``).

    Returns
    -------
    ndarray, the dtype of ``x``.
    """
    x = np.asarray(x)
    slope = np.asarray(slope)
    try:
        np.broadcast_shapes(x.shape, slope.shape)
    except ValueError:
        raise ShapeError(f"PReLU slope of shape {slope.shape} does not broadcast to x of shape {x.shape}") from None
    # where(x >= 0): PyTorch and onnxruntime both pass -0.0 and 0.0 through unchanged.
    return np.where(x >= 0, x, slope.astype(x.dtype, copy=False) * x).astype(x.dtype, copy=False)


def depth_to_space(x: np.ndarray, blocksize: int, *, mode: str = "CRD") -> np.ndarray:
    """ONNX ``DepthToSpace``: (N, C r^2, H, W) -> (N, C, H r, W r).

    Parameters
    ----------
    x : ndarray, NCHW
    blocksize : int
        ``r``.
    mode : {"CRD", "DCR"}, keyword-only
        "CRD" (column-row-depth) is PyTorch's ``PixelShuffle``: output channel ``c`` reads
        input channels ``c r^2 + i r + j``; "DCR" (ONNX's default) reads ``(i r + j) C + c``.

    Raises
    ------
    ShapeError
        If ``x`` is not NCHW or ``C`` is not a multiple of ``r^2``.
    ValueError
        For another mode or ``blocksize < 1``.
    """
    x = np.asarray(x)
    r = int(blocksize)
    if r < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if mode not in ("CRD", "DCR"):
        raise ValueError(f"mode must be 'CRD' or 'DCR', got {mode!r}")
    if x.ndim != 4 or x.shape[1] % (r * r):
        raise ShapeError(f"x must be NCHW with C a multiple of blocksize^2 = {r * r}, got shape {x.shape}")
    n, c, h, w = x.shape
    c //= r * r
    if mode == "CRD":
        y = x.reshape(n, c, r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, r, r, c, h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c, h * r, w * r)


# The transposed convolution has a module of its own (repnp/ops_transposed.py); an operator of repnp.ops all the same.
from repnp.ops_transposed import conv_transpose2d, conv_transpose_output_size  # noqa: E402  (it reads the helpers above)
