"""Rule 1: a BatchNorm (or any per-output-channel affine map) after a conv, folded into it."""

from __future__ import annotations

import numpy as np

from repnp.errors import ShapeError
from repnp.fusion._common import (
    KernelBias,
    _as_kernel,
    _channel_vector,
    _kb,
    _out_dtype,
)


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
