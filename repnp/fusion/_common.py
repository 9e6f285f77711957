"""What every rule shares: the :class:`KernelBias` type and the argument checks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from repnp import ops
from repnp.errors import ShapeError


class KernelBias(NamedTuple):
    """A convolution's parameters: ``kernel`` (O, I, kh, kw) and ``bias`` (O,).

    Unpacks like a pair: ``kernel, bias = fuse_bn(...)``. Every function of
    this module that takes a branch accepts a ``KernelBias`` or any
    ``(kernel, bias)`` pair, with ``bias=None`` meaning zeros.
    """

    kernel: np.ndarray
    bias: np.ndarray


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------

def _as_kernel(kernel, name: str = "kernel") -> np.ndarray:
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
        raise ShapeError(f"{name} must be OIHW (4-D), got shape {kernel.shape}")
    return kernel


def _out_dtype(array: np.ndarray) -> np.dtype:
    return array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float64)


def _bias64(bias, out_channels: int, name: str = "bias") -> np.ndarray:
    """``bias`` as a new float64 array of shape (O,); ``None`` means zeros."""
    if bias is None:
        return np.zeros(out_channels)
    bias = np.asarray(bias, dtype=np.float64)
    if bias.shape != (out_channels,):
        raise ShapeError(f"{name} must have shape ({out_channels},), got {bias.shape}")
    return bias


def _channel_vector(value, out_channels: int, name: str, kernel_shape) -> np.ndarray:
    """A scalar or an (O,) vector as a float64 array of shape (O,) (read-only if broadcast)."""
    vec = np.asarray(value, dtype=np.float64)
    if vec.ndim == 0:
        return np.broadcast_to(vec, (out_channels,))
    if vec.shape != (out_channels,):
        raise ShapeError(f"{name} must be a scalar or have shape ({out_channels},) for the kernel "
                         f"{tuple(kernel_shape)}, got {vec.shape}")
    return vec


def _kb(branch, name: str) -> KernelBias:
    """Accept a KernelBias or a (kernel, bias) pair; bias may be None."""
    try:
        kernel, bias = branch
    except (TypeError, ValueError):
        raise ShapeError(f"{name} must be a KernelBias or a (kernel, bias) pair") from None
    kernel = _as_kernel(kernel, f"{name}.kernel")
    return KernelBias(kernel, _bias64(bias, kernel.shape[0], f"{name}.bias"))


def _kernel_size(kernel_size, name: str = "kernel_size") -> tuple[int, int]:
    """``kernel_size`` (int or (kh, kw)) as a pair of positive ints."""
    return ops.pair(kernel_size, name=name, minimum=1)


def _signed_pads(padding, name: str) -> tuple[int, int, int, int]:
    """Padding as ONNX (top, left, bottom, right); negative values (crops) allowed."""
    if isinstance(padding, (int, np.integer)):
        return (int(padding),) * 4
    try:
        values = tuple(int(p) for p in padding)
    except (TypeError, ValueError):
        values = ()
    if len(values) == 2:
        return (values[0], values[1], values[0], values[1])
    if len(values) == 4:
        return values
    raise ShapeError(f"{name} must be an int, (ph, pw) or (top, left, bottom, right), got {padding!r}")


def _target_size(parts: list[KernelBias], kernel_size) -> tuple[int, int]:
    """The common kernel size of branches: the largest, or ``kernel_size`` if given."""
    big = (max(p.kernel.shape[2] for p in parts), max(p.kernel.shape[3] for p in parts))
    if kernel_size is None:
        return big
    size = _kernel_size(kernel_size)
    if size[0] < big[0] or size[1] < big[1]:
        raise ShapeError(
            f"kernel_size {size} is smaller than the largest branch kernel "
            f"{big} (branch kernel shapes {[p.kernel.shape for p in parts]})"
        )
    return size
