"""Rule 8: any conv on a fixed-size map as a fully connected layer (RepMLP)."""

from __future__ import annotations

import numpy as np

from repnp import ops
from repnp.errors import ShapeError
from repnp.fusion._common import KernelBias, _as_kernel, _bias64, _out_dtype


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
        (O*H_out*W_out,), both in NCHW flattening order (channel first, as
        ``x.reshape(N, -1)`` and ONNX ``Flatten`` do), so that
        ``linear(x.reshape(N, -1), *fc).reshape(N, O, H_out, W_out) ==
        conv2d(x, kernel, bias, ...)``. Dtype of ``kernel``.

    Raises
    ------
    ShapeError
        If ``input_shape`` is not (C, H, W) with ``C == groups * I``, or the
        geometry gives an empty output.

    Notes
    -----
    RepMLP (Ding et al., arXiv 2105.01883; RepMLPNet, CVPR 2022; official
    ``repmlpnet.py`` ``RepMLPBlock._convert_conv_to_fc``): a conv on a fixed-size
    map is linear, so it is a matrix ``M`` with

    .. math:: \\mathrm{vec}(W * x + b) = M\\, \\mathrm{vec}(x) + b \\otimes \\mathbf 1_{H_o W_o},
              \\qquad M_{:, j} = \\mathrm{vec}(W * e_j)

    Feeding the identity basis (``C*H*W`` one-hot images ``e_j``) through the
    conv, without bias and with the padding it had, gives the columns of
    ``M`` one by one; the bias is the conv bias repeated over the
    ``H_out*W_out`` positions of each channel. Memory grows as ``(C H W)^2``:
    meant for RepMLP's small partitions.
    """
    kernel = _as_kernel(kernel)
    try:
        c, h, w = (int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise ShapeError(f"input_shape must be (C, H, W), got {input_shape!r}") from None
    if min(c, h, w) < 1:
        raise ShapeError(f"input_shape must be positive, got {input_shape!r}")
    if int(groups) < 1 or c != kernel.shape[1] * int(groups):
        raise ShapeError(
            f"input_shape {tuple(input_shape)} has C = {c}, but kernel {kernel.shape} with "
            f"groups={groups} reads I * groups = {kernel.shape[1]} * {groups} channels"
        )
    dtype = _out_dtype(kernel)
    basis = np.eye(c * h * w, dtype=np.float64).reshape(c * h * w, c, h, w)
    response = ops.conv2d(basis, kernel.astype(np.float64), None, stride=stride, padding=padding,
                          dilation=dilation, groups=groups)
    o, ho, wo = response.shape[1:]
    matrix = response.reshape(c * h * w, o * ho * wo).T
    fc_bias = np.repeat(_bias64(bias, o), ho * wo)
    return KernelBias(matrix.astype(dtype), fc_bias.astype(dtype))
