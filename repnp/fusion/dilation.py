"""Dilated kernels as dense ones: what lets UniRepLKNet's dilated branches join its large kernel.

A KxK kernel used with dilation ``r`` reads the input at taps ``r`` pixels apart; the same
conv is a dense ``(r(K-1)+1)``-square kernel holding the taps ``r`` apart and zeros between
them, used with dilation 1 and the same padding. Centred in the large kernel
(:func:`repnp.fusion.pad_kernel`) and added (:func:`repnp.fusion.add_branches`), it merges
like any other branch.
"""

from __future__ import annotations

import numpy as np

from repnp.fusion._common import _as_kernel, _kernel_size

__all__ = ["dilate_kernel", "dilated_size"]


def dilated_size(kernel_size, *, dilation) -> tuple[int, int]:
    """The extent ``d (k - 1) + 1`` per axis of a kernel of ``kernel_size`` with ``dilation``.

    Parameters
    ----------
    kernel_size : int or (h, w)
        Positive.
    dilation : int or (h, w), keyword-only
        Positive.

    Returns
    -------
    (int, int)
        The height and width of the dense kernel :func:`dilate_kernel` returns.

    Raises
    ------
    ShapeError
        If a value is not a positive int or pair.
    """
    k = _kernel_size(kernel_size)
    d = _kernel_size(dilation, "dilation")
    return d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1


def dilate_kernel(kernel, *, dilation) -> np.ndarray:
    """The dense kernel equal to ``kernel`` used with ``dilation``.

    Parameters
    ----------
    kernel : ndarray, shape (O, I, kh, kw)
    dilation : int or (dh, dw), keyword-only
        The dilation the kernel is used with, positive.

    Returns
    -------
    ndarray, shape (O, I, dh (kh - 1) + 1, dw (kw - 1) + 1), dtype of ``kernel``
        ``kernel`` at taps ``dh`` rows and ``dw`` columns apart, zeros between; a new array
        (also for dilation 1). Used with dilation 1, the same stride, groups and padding,
        it computes what ``kernel`` computes with ``dilation``.

    Raises
    ------
    ShapeError
        If ``kernel`` is not 4-D or ``dilation`` is not a positive int or pair.

    Notes
    -----
    Along one axis a conv with kernel ``w`` (size ``k``), dilation ``r`` and leading padding
    ``p`` computes ``y[i] = sum_u w[u] x[s i - p + r u]``. With
    ``W[r u] = w[u]`` and ``W = 0`` elsewhere (size ``r (k - 1) + 1``),

    .. math:: \\sum_v W[v]\\, x[s i - p + v] = \\sum_u w[u]\\, x[s i - p + r u],

    the same sum, so the output size and the padding are unchanged. UniRepLKNet (Ding et al.,
    "UniRepLKNet: A Universal Perception Large-Kernel ConvNet ...", CVPR 2024, Sec. 3.2,
    Fig. 2) merges its dilated depthwise branches into the large kernel this way; the
    official ``convert_dilated_to_nondilated`` in ``unireplknet.py`` of
    github.com/AILab-CVC/UniRepLKNet (commit b5677d8) computes it as a transposed conv with
    stride ``r`` and a 1x1 kernel of one. Then the dense kernel is centred in the large one
    (``merge_dilated_into_large_kernel``: padded by ``K//2 - (r(k-1)+1)//2`` on each side,
    :func:`repnp.fusion.pad_kernel`) and added (:func:`repnp.fusion.add_branches`), which is
    exact when the branch's padding is the large conv's minus that amount (both centred).
    """
    kernel = _as_kernel(kernel)
    dh, dw = _kernel_size(dilation, "dilation")
    o, i, kh, kw = kernel.shape
    out = np.zeros((o, i) + dilated_size((kh, kw), dilation=(dh, dw)), dtype=kernel.dtype)
    out[:, :, ::dh, ::dw] = kernel
    return out
