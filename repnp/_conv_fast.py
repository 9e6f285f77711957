"""The machinery behind :func:`repnp.ops.conv2d`: column fills and the in-place epilogue.

:mod:`repnp.ops` is the readable entry point: ``conv2d``'s docstring holds the reference
formula and its body says which path runs when and why. This module holds the pieces those
paths share; each computes exactly the formula (the same products and sums, in the input's
dtype), only with other memory accesses, and every one of them is exercised by the conformance
tests (``tests/test_ops_conformance.py``, ``tests/test_ops_paths.py``, which forces each size
switch both ways on small shapes).
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------
# the epilogue
# ----------------------------------------------------------------------------

def epilogue(y: np.ndarray, bias: np.ndarray | None, activation: str | None) -> np.ndarray:
    """``y = act(y + bias)`` in place on the fresh output ``y``: no temporaries, one pass each."""
    if bias is not None:
        y += bias.astype(y.dtype, copy=False).reshape((-1,) + (1,) * (y.ndim - 2))
    if activation == "relu":
        np.maximum(y, 0, out=y)
    elif activation == "relu6":
        np.clip(y, 0, 6, out=y)
    return y


# ----------------------------------------------------------------------------
# column fills (im2col)
# ----------------------------------------------------------------------------

def valid_span(out_len: int, size: int, offset: int, stride: int, pad_begin: int) -> tuple[int, int]:
    """Output positions ``[lo, hi)`` along one axis whose tap ``r * stride + offset - pad_begin``
    falls inside the unpadded input ``[0, size)``; the others read zero padding."""
    lo = max(0, -(-(pad_begin - offset) // stride))
    hi = min(out_len, (size - 1 + pad_begin - offset) // stride + 1)
    return lo, max(lo, hi)


def columns(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int], pads: tuple[int, int, int, int],
             out_hw: tuple[int, int]) -> np.ndarray:
    """Unfold an unpadded NCHW tensor into ``(N, C, kh, kw, H_out, W_out)`` columns.

    Channel-major, then kernel offset, then output pixel: reshaped to
    ``(N, groups, C/groups * kh * kw, H_out * W_out)`` this is a view, and the
    GEMM against the weight yields an NCHW result directly. ``pads`` is the
    ONNX-order 4-tuple; the padded input is never built whole: the taps that land
    in the padding are zeroed and the others copied straight from ``x``.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = stride
    dh, dw = dilation
    top, left = pads[0], pads[1]
    ho, wo = out_hw
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    if sh == 1:
        # Two stages: for each kernel column j, the horizontally shifted map
        # shifted[c, r, q] = x_p[c, r, j d_w + q s_w] over all padded rows r; then every kernel
        # row i is the contiguous block of rows [i d_h, i d_h + H_out) of it. The short
        # (W_out-long) copies happen kw times instead of kh * kw times.
        hp = h + top + pads[2]
        shifted = np.empty((n, c, hp, wo), dtype=x.dtype)
        shifted[:, :, :top] = 0
        shifted[:, :, top + h:] = 0
        for j in range(kw):
            c0, c1 = valid_span(wo, w, j * dw, sw, left)
            inner = shifted[:, :, top:top + h]
            inner[..., :c0] = 0
            inner[..., c1:] = 0
            if c1 > c0:
                ws = c0 * sw + j * dw - left
                inner[..., c0:c1] = x[:, :, :, ws:ws + (c1 - c0 - 1) * sw + 1:sw]
            for i in range(kh):
                cols[:, :, i, j] = shifted[:, :, i * dh:i * dh + ho]
        return cols
    for i in range(kh):
        r0, r1 = valid_span(ho, h, i * dh, sh, top)
        for j in range(kw):
            c0, c1 = valid_span(wo, w, j * dw, sw, left)
            dst = cols[:, :, i, j]
            if r0 == r1 or c0 == c1:            # this tap only ever reads padding
                dst[...] = 0
                continue
            dst[:, :, :r0] = 0
            dst[:, :, r1:] = 0
            dst[:, :, r0:r1, :c0] = 0
            dst[:, :, r0:r1, c1:] = 0
            hs = r0 * sh + i * dh - top
            ws = c0 * sw + j * dw - left
            dst[:, :, r0:r1, c0:c1] = x[:, :, hs:hs + (r1 - r0 - 1) * sh + 1:sh,
                                        ws:ws + (c1 - c0 - 1) * sw + 1:sw]
    return cols


def columns_wide(x: np.ndarray, kernel: tuple[int, int], dilation: tuple[int, int],
                  pads: tuple[int, int, int, int], out_h: int) -> np.ndarray:
    """Stride-1 columns over the *padded* width: ``(N, C, kh, kw, H_out * W_p)``.

    With stride 1, the window of kernel offset ``(i, j)`` at output row ``r`` starts at flat
    index ``(r + i d_h) W_p + j d_w`` of the padded input, so consecutive output rows are
    ``W_p`` apart and the whole column row is ONE contiguous run of ``H_out * W_p`` values.
    Copying long runs is several times faster than copying ``W_out``-long pieces; the price
    is ``W_p - W_out = (kw - 1) d_w`` junk columns per output row, which the GEMM computes
    and the caller crops away.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    dh, dw = dilation
    top, left, bottom, right = pads
    hp, wp = h + top + bottom, w + left + right
    tail = (kw - 1) * dw                   # the last run reads this far past the padded map
    flat = np.zeros((n, c, hp * wp + tail), dtype=x.dtype)
    flat[:, :, :hp * wp].reshape(n, c, hp, wp)[:, :, top:top + h, left:left + w] = x
    run = out_h * wp
    sn, sc, item = flat.strides[0], flat.strides[1], flat.itemsize
    # The overlapping view, built with the ndarray constructor: unlike ``as_strided`` it checks
    # that every window lies inside ``flat``, and it costs 0.6 us instead of 4 us (this runs
    # once per conv, and small convs take a few tens of us).
    windows = np.ndarray((n, c, kh, kw, run), flat.dtype, flat, 0,
                         (sn, sc, dh * wp * item, dw * item, item))
    return np.ascontiguousarray(windows)

