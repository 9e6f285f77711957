"""Rules 1 and 2 for fully connected layers: a per-feature affine map (an inference BN,
a scale) before or after a linear layer, and the sum of linear layers on one input.

A linear layer is a :class:`~repnp.fusion.KernelBias` whose ``kernel`` is the matrix
``W`` of shape (O, I) (PyTorch's ``nn.Linear.weight``; ONNX ``Gemm`` with
``transB=1``) and ``bias`` the vector (O,): ``y = x W^T + b``.
"""

from __future__ import annotations

import numpy as np

from repnp.errors import ShapeError
from repnp.fusion._common import KernelBias, _bias64, _out_dtype
from repnp.fusion.kernels import bn_scale_shift


def _matrix(weight, name: str = "weight") -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ShapeError(f"{name} must be a matrix (O, I), got shape {weight.shape}")
    return weight


def _vector(value, size: int, name: str) -> np.ndarray:
    vec = np.asarray(value, dtype=np.float64)
    if vec.ndim == 0:
        return np.full(size, float(vec))
    if vec.shape != (size,):
        raise ShapeError(f"{name} must be a scalar or have shape ({size},), got {vec.shape}")
    return vec


def scale_linear(weight, bias, scale, shift=None, *, before: bool = False) -> KernelBias:
    """The linear layer equal to a linear layer and a per-feature affine map ``z = scale * u + shift``.

    Parameters
    ----------
    weight : ndarray, shape (O, I)
    bias : ndarray, shape (O,), or None
    scale : float or array_like, shape (O,) (``before=False``) or (I,) (``before=True``)
    shift : float or array_like, same shape as ``scale``, optional
        Zero when omitted.
    before : bool, keyword-only
        ``False``: the affine map is applied to the layer's output; ``True``: to its input.

    Returns
    -------
    KernelBias
        ``(W', b')`` in the dtype of ``weight`` (float64 for integer input).

    Raises
    ------
    ShapeError
        If ``weight`` is not a matrix or a vector has the wrong length.

    Notes
    -----
    After the layer, :math:`s \\odot (W x + b) + t = (\\mathrm{diag}(s) W) x + (s \\odot b + t)`;
    before it, :math:`W (s \\odot x + t) + b = (W \\mathrm{diag}(s)) x + (W t + b)`.
    Computed in float64.
    """
    weight = _matrix(weight)
    o, i = weight.shape
    n = i if before else o
    s = _vector(scale, n, "scale")
    t = np.zeros(n) if shift is None else _vector(shift, n, "shift")
    w = weight.astype(np.float64)
    b = _bias64(bias, o)
    if before:
        new_w, new_b = w * s[None, :], b + w @ t
    else:
        new_w, new_b = w * s[:, None], s * b + t
    dtype = _out_dtype(weight)
    return KernelBias(new_w.astype(dtype), new_b.astype(dtype))


def fuse_bn_linear(weight, bias, mean, var, gamma, beta, *, eps: float = 1e-5,
                   bn_first: bool = False) -> KernelBias:
    """The linear layer equal to a linear layer and an inference BatchNorm1d.

    Parameters
    ----------
    weight : ndarray, shape (O, I)
    bias : ndarray, shape (O,), or None
    mean, var, gamma, beta : array_like
        The BN's statistics and affine parameters, shape (O,) (``bn_first=False``) or
        (I,) (``bn_first=True``).
    eps : float, keyword-only
    bn_first : bool, keyword-only
        ``True``: BN then linear (timm RepViT's ``BN_Linear``); ``False``: linear then BN.

    Returns
    -------
    KernelBias
        ``(W', b')`` in the dtype of ``weight``.

    Raises
    ------
    ShapeError, ValueError
        As :func:`repnp.fusion.bn_scale_shift` and :func:`scale_linear`.

    Notes
    -----
    With :math:`s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}` and :math:`t = \\beta - \\mu s`
    (:func:`repnp.fusion.bn_scale_shift`), the BN is :math:`s \\odot x + t`, so

    .. math:: W' = W \\mathrm{diag}(s),\\ b' = b + W t \\quad \\text{(BN first)}, \\qquad
              W' = \\mathrm{diag}(s) W,\\ b' = s \\odot b + t \\quad \\text{(BN after)}

    (RepVGG's eq. (3) with a 1x1 kernel; RepViT's ``BN_Linear.fuse``, Wang et al.,
    CVPR 2024, computes the first form).
    """
    s, t = bn_scale_shift(mean, var, gamma, beta, eps=eps)
    return scale_linear(weight, bias, s, t, before=bn_first)


def add_linear(*layers) -> KernelBias:
    """The linear layer equal to the sum of linear layers on one input.

    Parameters
    ----------
    *layers : KernelBias or (weight, bias) pairs
        Weights of one shape (O, I); ``bias=None`` means zeros.

    Returns
    -------
    KernelBias
        :math:`W = \\sum_k W_k`, :math:`b = \\sum_k b_k` (the sum is linear; RepViT's
        distillation head ``(head(x) + head_dist(x)) / 2`` is this, then
        :func:`scale_linear` by 1/2). Dtype of the first weight.

    Raises
    ------
    ShapeError
        If there is no layer or the weights differ in shape.
    """
    if not layers:
        raise ShapeError("add_linear needs at least one layer")
    weights = [_matrix(w, f"weight {k}") for k, (w, _) in enumerate(layers)]
    if len({w.shape for w in weights}) != 1:
        raise ShapeError(f"weights must have one shape, got {[w.shape for w in weights]}")
    o = weights[0].shape[0]
    w = np.sum([x.astype(np.float64) for x in weights], axis=0)
    b = np.sum([_bias64(bb, o, f"bias {k}") for k, (_, bb) in enumerate(layers)], axis=0)
    dtype = _out_dtype(weights[0])
    return KernelBias(w.astype(dtype), b.astype(dtype))
