"""Masked (fixed-pattern) depthwise kernels and their merge after a 1x1 conv (ECB, OREPA).

Two rules:

* :func:`masked_kernel`: a depthwise kernel that is a learned per-channel scale times a fixed
  mask (ECB's Sobel-x, Sobel-y and Laplacian branches; :func:`edge_mask` holds the masks);
* :func:`merge_depthwise`: a 1x1 conv followed by a depthwise KxK conv is one KxK conv
  (ECB's ``conv1x1-sobelx`` ... branches; OREPA's prior branch, a 1x1 times a fixed
  per-output-channel kernel).

Sources: Zhang, Zeng and Zhang, "Edge-oriented Convolution Block for Real-time Super
Resolution on Mobile Devices", ACM MM 2021 (official github.com/xindongzhang/ECBSR
``models/ecb.py``, commit c60b1d2712af4ed4a615c2b7afa3980222c44a31, ``SeqConv3x3``); Hu et
al., "Online Convolutional Re-parameterization", CVPR 2022 (official
github.com/JUGGHM/OREPA_CVPR2022 ``blocks.py``, commit
3ed037beeb106cc1c3d011eb2678cebfefc4cba0, ``OREPA.weight_gen``).
"""

from __future__ import annotations

import numpy as np

from repnp.errors import ShapeError
from repnp.fusion._common import KernelBias, _as_kernel, _kb, _out_dtype

__all__ = ["edge_mask", "masked_kernel", "merge_depthwise"]

# ECB's fixed masks, tap [row, column] as ``SeqConv3x3`` writes them (models/ecb.py).
_MASKS = {
    "sobelx": ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0)),
    "sobely": ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0)),
    "laplacian": ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0)),
}


def edge_mask(kind: str, *, dtype=np.float64) -> np.ndarray:
    """One of ECB's fixed 3x3 edge masks.

    Parameters
    ----------
    kind : {"sobelx", "sobely", "laplacian"}
        The mask (``conv1x1-sobelx``, ``conv1x1-sobely``, ``conv1x1-laplacian`` in ECB).
    dtype : keyword-only
        The dtype of the result.

    Returns
    -------
    ndarray, shape (3, 3)
        A new array; cross-correlation taps (row, column), as a conv kernel.

    Raises
    ------
    ValueError
        If ``kind`` is not one of the three names.

    Notes
    -----
    As ``SeqConv3x3.__init__`` of ECBSR's ``models/ecb.py`` fills its ``mask`` buffer:
    Sobel-x has +1, +2, +1 in the left column and -1, -2, -1 in the right one,
    Sobel-y the same in the top and bottom rows, the Laplacian is the 4-neighbour
    stencil (-4 in the centre).
    """
    if kind not in _MASKS:
        raise ValueError(f"kind must be one of {sorted(_MASKS)}, got {kind!r}")
    return np.array(_MASKS[kind], dtype=dtype)


def masked_kernel(scale, mask) -> np.ndarray:
    """A depthwise kernel that is a per-channel scale times a fixed mask.

    Parameters
    ----------
    scale : array_like, shape (C,) or (C, 1, 1, 1)
        The learned factor of each channel (ECB's ``scale`` parameter, (C, 1, 1, 1)).
    mask : array_like, shape (kh, kw) or (C, 1, kh, kw)
        The fixed pattern, shared by every channel or one per channel (ECB's ``mask``
        buffer is (C, 1, 3, 3), every channel the same).

    Returns
    -------
    ndarray, shape (C, 1, kh, kw)
        ``scale[c] * mask[c]``, a kernel for a depthwise conv (``groups = C``); dtype of
        ``scale`` (float64 for integers).

    Raises
    ------
    ShapeError
        If ``scale`` is not C values or ``mask`` is neither 2-D nor (C, 1, kh, kw).

    Notes
    -----
    ECB (Zhang et al., ACM MM 2021, Sec. 3.2; official ``SeqConv3x3.forward``: ``weight =
    self.scale * self.mask``, ``groups = out_planes``):

    .. math:: D[c, 0, u, v] = s_c \\, M[c, 0, u, v]

    The mask is not trained, so the branch is a depthwise conv whose kernel is fixed up
    to one factor per channel; after training it is an ordinary depthwise kernel and
    merges like one (:func:`merge_depthwise`).
    """
    scale = np.asarray(scale)
    s = scale.reshape(-1) if scale.ndim in (1, 4) else None
    if s is None or (scale.ndim == 4 and scale.shape[1:] != (1, 1, 1)):
        raise ShapeError(f"scale must have shape (C,) or (C, 1, 1, 1), got {scale.shape}")
    c = s.shape[0]
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = np.broadcast_to(mask, (c, 1) + mask.shape)
    if mask.ndim != 4 or mask.shape[:2] != (c, 1):
        raise ShapeError(f"mask must have shape (kh, kw) or ({c}, 1, kh, kw) for scale {scale.shape}, "
                         f"got {mask.shape}")
    dtype = _out_dtype(scale)
    out = s.astype(np.float64)[:, None, None, None] * mask.astype(np.float64)
    return out.astype(dtype)


def merge_depthwise(first, second) -> KernelBias:
    """Merge a 1x1 conv followed by a depthwise KxK conv into one KxK conv.

    Parameters
    ----------
    first : KernelBias or (kernel, bias)
        The 1x1 conv, kernel (M, C/g, 1, 1) with any groups ``g``, stride 1, no
        padding.
    second : KernelBias or (kernel, bias)
        The depthwise KxK conv on its M channels, kernel (M, 1, kh, kw) (``groups =
        M``), with its own stride, padding and dilation (kept by the merged conv);
        :func:`masked_kernel` makes ECB's.

    Returns
    -------
    KernelBias
        Kernel (M, C/g, kh, kw) and bias (M,), dtype of ``first.kernel``. Run it with
        the 1x1's groups ``g`` and the depthwise conv's stride, padding and dilation.

    Raises
    ------
    ShapeError
        If ``first`` is not 1x1 or ``second`` is not (M, 1, kh, kw).

    Notes
    -----
    ECB's ``conv1x1-sobelx`` / ``-sobely`` / ``-laplacian`` branches (Zhang et al., ACM MM
    2021, Sec. 3.3; official ``SeqConv3x3.rep_params``, which builds the depthwise
    kernel as a dense (M, M, 3, 3) one first) and OREPA's prior branch (Hu et al., CVPR
    2022; official ``OREPA.weight_gen``, ``einsum('oi,ohw->oihw')``). Output channel
    ``m`` of the depthwise conv reads only channel ``m`` of the 1x1, so with ``W_1`` the
    1x1 kernel as an (M, C/g) matrix and ``D`` the depthwise kernel

    .. math::

        W[m, c, u, v] = D[m, 0, u, v]\\, W_1[m, c], \\qquad
        b[m] = b_2[m] + b_1[m] \\sum_{u,v} D[m, 0, u, v]

    -- the special case of :func:`merge_sequential` (DBB transform III) with a diagonal
    second conv, which is why the 1x1's groups survive. The bias term assumes the
    depthwise conv sees ``b1`` at every tap: exact everywhere when the 1x1's output is
    padded with ``b1`` per channel (ECB's ``SeqConv3x3`` pads with zeros, then writes
    ``b0`` on the 1-pixel border; PyTorch exports it as ``Pad`` + ``ScatterND``), exact
    only in the interior when it is zero-padded, unless ``b1 == 0``.
    """
    first = _kb(first, "first")
    second = _kb(second, "second")
    w1, d = _as_kernel(first.kernel, "first.kernel"), _as_kernel(second.kernel, "second.kernel")
    m = w1.shape[0]
    if w1.shape[2:] != (1, 1):
        raise ShapeError(f"first must be a 1x1 kernel, got first.kernel shape {w1.shape}")
    if d.shape[:2] != (m, 1):
        raise ShapeError(f"second must be a depthwise kernel ({m}, 1, kh, kw) on first's {m} output "
                         f"channels, got second.kernel shape {d.shape}")
    d64 = d.astype(np.float64)
    kernel = w1.astype(np.float64)[:, :, 0, 0][:, :, None, None] * d64          # (M, C/g, kh, kw)
    bias = second.bias + first.bias * d64.sum(axis=(1, 2, 3))
    dtype = _out_dtype(first.kernel)
    return KernelBias(kernel.astype(dtype), bias.astype(dtype))
