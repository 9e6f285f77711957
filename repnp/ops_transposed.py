"""The 2-D transposed convolution (ONNX ``ConvTranspose``, PyTorch ``ConvTranspose2d``), pure NumPy.

In a module of its own so that :mod:`repnp.ops` stays readable; :mod:`repnp.ops` re-exports
:func:`conv_transpose2d`, import it from there.

The computation is the transpose of :func:`repnp.ops.conv2d`'s im2col: one batched GEMM per
group gives every input pixel's contribution to every kernel tap, ``(N, C_out, kh, kw, H, W)``,
and col2im adds the ``kh * kw`` tap planes into the output at their strided, dilated
positions (the only Python loop runs over the taps), before the padding is cropped.
"""

from __future__ import annotations

import numpy as np

from repnp.errors import ShapeError
from repnp.ops import _check_nchw, _float_dtype, normalize_padding, pair

__all__ = ["conv_transpose2d", "conv_transpose_output_size"]


def conv_transpose_output_size(size: int, kernel: int, *, stride: int = 1, pad_begin: int = 0,
                               pad_end: int = 0, output_padding: int = 0, dilation: int = 1) -> int:
    """Output length along one axis: ``s (size - 1) + output_padding + d (k - 1) + 1 - pads``
    (the ONNX ``ConvTranspose`` operator's ``output_shape`` formula, PyTorch's ``ConvTranspose2d``)."""
    return stride * (size - 1) + output_padding + dilation * (kernel - 1) + 1 - pad_begin - pad_end


def conv_transpose2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, *,
                     stride=1, padding=0, output_padding=0, dilation=1, groups: int = 1) -> np.ndarray:
    """2-D transposed convolution (the gradient of :func:`repnp.ops.conv2d` with respect to its input).

    Parameters
    ----------
    x : ndarray, shape (N, C_in, H, W)
    weight : ndarray, shape (C_in, C_out / groups, kh, kw)
        The transposed layout: input channels first (PyTorch ``ConvTranspose2d.weight``,
        ONNX ``ConvTranspose`` input ``W``).
    bias : ndarray, shape (C_out,), optional
    stride, dilation : int or (h, w), keyword-only
        Positive.
    padding : int, (ph, pw) or (top, left, bottom, right), keyword-only
        Non-negative; cropped from the full output (ONNX ``pads``, the 4-tuple in ONNX order).
    output_padding : int or (h, w), keyword-only
        Non-negative; rows and columns added at the bottom and right of the output (ONNX
        ``output_padding``), which tells apart the input sizes a strided conv maps to one size.
    groups : int, keyword-only
        ``C_in`` must be divisible by it.

    Returns
    -------
    ndarray, shape (N, C_out, H_out, W_out), dtype of ``x``.

    Raises
    ------
    ShapeError
        If ``x`` or ``weight`` is not 4-D, the channels or the bias do not fit, a value is
        negative, or the output would be empty.

    Notes
    -----
    The ONNX operator ``ConvTranspose`` (onnx/docs/Operators.md, opset 11+) and PyTorch's
    ``torch.nn.ConvTranspose2d``: every input pixel scatters its kernel into the output,

    .. math::

        y[n, o, s_h i - p_t + d_h u, s_w j - p_l + d_w v] \\mathrel{+}=
            x[n, g C_g + c, i, j]\\, w[g C_g + c, o - g O_g, u, v]

    summed over ``c < C_g = C_in / groups``, the input pixels ``(i, j)`` and the taps
    ``(u, v)``, with ``g = o // O_g``, ``O_g = C_out / groups``, plus ``b[o]``; output positions
    outside ``[0, H_out) x [0, W_out)`` are dropped, positions never reached are ``b[o]``.
    ``H_out = s_h (H - 1) + output_padding_h + d_h (kh - 1) + 1 - p_t - p_b``
    (:func:`conv_transpose_output_size`). The sum is computed in the dtype of ``x``.
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    _check_nchw(x)
    if weight.ndim != 4:
        raise ShapeError(f"weight must be (C_in, C_out/groups, kh, kw) (4-D), got shape {weight.shape}")
    groups = int(groups)
    if groups < 1:
        raise ShapeError(f"groups must be >= 1, got {groups}")
    sh, sw = pair(stride, name="stride", minimum=1)
    dh, dw = pair(dilation, name="dilation", minimum=1)
    oph, opw = pair(output_padding, name="output_padding", minimum=0)
    top, left, bottom, right = normalize_padding(padding)
    n, c, h, w = x.shape
    ci, og, kh, kw = weight.shape
    if ci != c:
        raise ShapeError(f"weight {weight.shape} reads {ci} input channels (axis 0), x has {c} (shape {x.shape})")
    if c % groups:
        raise ShapeError(f"x has {c} channels (shape {x.shape}), not divisible by groups={groups}")
    o = og * groups
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (o,):
            raise ShapeError(f"bias must have shape ({o},) to match weight {weight.shape} with groups={groups}, "
                             f"got {bias.shape}")
    ho = conv_transpose_output_size(h, kh, stride=sh, pad_begin=top, pad_end=bottom, output_padding=oph,
                                    dilation=dh)
    wo = conv_transpose_output_size(w, kw, stride=sw, pad_begin=left, pad_end=right, output_padding=opw,
                                    dilation=dw)
    if ho < 1 or wo < 1 or h < 1 or w < 1:
        raise ShapeError(f"empty output: x {x.shape}, weight {weight.shape}, stride {(sh, sw)}, padding "
                         f"{(top, left, bottom, right)}, output_padding {(oph, opw)}, dilation {(dh, dw)} "
                         f"give {(ho, wo)}")
    dtype = _float_dtype(x)
    cg = c // groups
    # (g, O_g * kh * kw, C_g) @ (N, g, C_g, H * W): each input pixel's contribution to each tap.
    w_mat = weight.astype(dtype, copy=False).reshape(groups, cg, og * kh * kw).transpose(0, 2, 1)
    taps = np.matmul(w_mat, x.astype(dtype, copy=False).reshape(n, groups, cg, h * w))
    taps = taps.reshape(n, o, kh, kw, h, w)
    # col2im into the uncropped output (tall enough for the crop window when the output
    # padding reaches past the last tap), then crop the padding.
    full_h, full_w = max(sh * (h - 1) + dh * (kh - 1) + 1, top + ho), max(sw * (w - 1) + dw * (kw - 1) + 1, left + wo)
    full = np.zeros((n, o, full_h, full_w), dtype=dtype)
    for u in range(kh):
        for v in range(kw):
            full[:, :, dh * u:dh * u + sh * (h - 1) + 1:sh, dw * v:dw * v + sw * (w - 1) + 1:sw] += taps[:, :, u, v]
    y = full[:, :, top:top + ho, left:left + wo]
    if bias is not None:
        y = y + bias.astype(dtype, copy=False)[None, :, None, None]
    return np.ascontiguousarray(y)
