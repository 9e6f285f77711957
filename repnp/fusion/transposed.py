"""Rule 1 for transposed convolutions: an inference BatchNorm after a ``ConvTranspose``."""

from __future__ import annotations

import numpy as np

from repnp.errors import ShapeError
from repnp.fusion._common import KernelBias, _as_kernel, _bias64, _out_dtype
from repnp.fusion.kernels import bn_scale_shift

__all__ = ["fuse_bn_transposed"]


def fuse_bn_transposed(kernel, bias, mean, var, gamma, beta, *, groups: int = 1,
                       eps: float = 1e-5) -> KernelBias:
    """Fold an inference BatchNorm into the transposed convolution before it.

    Parameters
    ----------
    kernel : ndarray, shape (C_in, C_out / groups, kh, kw)
        The transposed conv's weight in its own layout (PyTorch's
        ``ConvTranspose2d.weight``, ONNX ``ConvTranspose`` input ``W``): input
        channels first. Output channel ``o`` of group ``g = o // (C_out / groups)``
        is ``kernel[g * C_in/groups : (g+1) * C_in/groups, o % (C_out / groups)]``.
    bias : ndarray, shape (C_out,), or None
        The transposed conv's bias (``None``: zeros).
    mean, var, gamma, beta : ndarray, shape (C_out,)
        BN running statistics and affine parameters.
    groups : int, keyword-only
        The transposed conv's ``groups`` (``C_in`` and ``C_out`` divisible by it).
    eps : float, keyword-only
        The BN's epsilon.

    Returns
    -------
    KernelBias
        ``(W', b')`` with ``W'`` in the same transposed layout and dtype as
        ``kernel``, ``b'`` of shape (C_out,). The transposed conv keeps its
        strides, pads, output padding, dilations and groups.

    Raises
    ------
    ShapeError
        If ``kernel`` is not 4-D, ``C_in`` is not divisible by ``groups``, or
        ``bias`` / the BN vectors are not (C_out,).
    ValueError
        If ``groups < 1`` or ``var + eps <= 0`` anywhere.

    Notes
    -----
    The same algebra as :func:`repnp.fusion.fuse_bn` (RepVGG, Ding et al., CVPR
    2021, eq. (3)): with ``(t, s)`` from :func:`repnp.fusion.bn_scale_shift`,
    ``BN(y) = t y + s`` per output channel, and every output pixel of channel
    ``o`` of a transposed conv is a sum of products with ``W[:, o']`` (``o'`` its
    index within its group) plus ``b_o``, so

    .. math:: W'_{i, o'} = t_o W_{i, o'}, \\qquad b'_o = t_o b_o + s_o

    exact at every pixel, whatever the stride, padding, output padding or
    dilation. Only the axis differs from a conv's: the output channel is axis 1
    of the transposed layout, within a group. Ultralytics folds its
    ``ConvTranspose`` + BN the same way (``fuse_deconv_and_bn`` in
    ``ultralytics/utils/torch_utils.py``).
    """
    kernel = _as_kernel(kernel)
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    c_in, per_group, kh, kw = kernel.shape
    if c_in % groups:
        raise ShapeError(f"kernel {kernel.shape}: C_in = {c_in} is not divisible by groups = {groups}")
    c_out = per_group * groups
    t, s = bn_scale_shift(mean, var, gamma, beta, eps=eps)
    if t.shape != (c_out,):
        raise ShapeError(f"BN parameters have shape {t.shape}, the transposed kernel {kernel.shape} with "
                         f"groups={groups} has {c_out} output channels")
    b = _bias64(bias, c_out)
    dtype = _out_dtype(kernel)
    # (g, C_in/g, C_out/g, kh, kw) times t laid out as (g, 1, C_out/g, 1, 1): products in
    # float64, rounded once into the kernel's dtype.
    grouped = kernel.reshape(groups, c_in // groups, per_group, kh, kw)
    fused = np.empty(grouped.shape, dtype=dtype)
    np.multiply(grouped, t.reshape(groups, 1, per_group, 1, 1), out=fused, dtype=np.float64, casting="same_kind")
    return KernelBias(fused.reshape(kernel.shape), (b * t + s).astype(dtype, copy=False))
