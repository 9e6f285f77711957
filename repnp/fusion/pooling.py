"""Rule 6: average pooling (``count_include_pad``) as a convolution."""

from __future__ import annotations

import numpy as np

from repnp.errors import ShapeError
from repnp.fusion._common import _kernel_size


def avgpool_kernel(channels: int, kernel_size, *, groups: int = 1, dtype=np.float64) -> np.ndarray:
    """The kernel of a conv that computes KxK average pooling (DBB transform V).

    Parameters
    ----------
    channels : int
    kernel_size : int or (kh, kw)
    groups : int, keyword-only
        The groups of the conv that will carry the kernel; must divide
        channels. ``groups=channels`` gives the cheapest (depthwise) form.
    dtype : keyword-only
        The dtype of the result.

    Returns
    -------
    ndarray, shape (C, C/groups, kh, kw)
        ``1/(kh*kw)`` at ``[i, i % (C/groups), :, :]``, zero elsewhere. Run it
        with the pooling's stride and padding (dilation 1).

    Raises
    ------
    ShapeError
        If ``groups`` does not divide ``channels`` or a size is not positive.

    Notes
    -----
    DBB transform V (Ding et al., CVPR 2021; official ``transV_avg``): pooling
    channel ``i`` is a conv whose output
    ``i`` reads only input ``i`` with uniform weights,

    .. math:: W[i, c, u, v] = \\frac{[c = i \\bmod C_g]}{k_h k_w}

    Exact with ``count_include_pad=True`` (PyTorch's default), where every
    window divides by ``kh*kw``, padded zeros included. ONNX ``AveragePool``
    defaults to ``count_include_pad=0``, dividing border windows by the number
    of real pixels only: that is not a convolution at the borders and cannot
    be fused this way.
    """
    kh, kw = _kernel_size(kernel_size)
    channels, groups = int(channels), int(groups)
    if channels < 1 or groups < 1 or channels % groups:
        raise ShapeError(f"groups={groups} must divide channels={channels} (both >= 1)")
    per_group = channels // groups
    kernel = np.zeros((channels, per_group, kh, kw), dtype=dtype)
    idx = np.arange(channels)
    kernel[idx, idx % per_group] = 1.0 / (kh * kw)
    return kernel
