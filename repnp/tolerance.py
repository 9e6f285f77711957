"""The project's one error metric and its named tolerances.

Every comparison in repnp — a fusion against the unfused computation, a block's
deploy form against its train form, a converted model against the original, a
port against a golden file — uses one metric,

.. math:: \\mathrm{err}(a, b) = \\frac{\\max |a - b|}{\\max |b|},

with ``b`` the reference, and one of the tolerances below. A single relative
figure for a whole tensor: an element-wise relative error is meaningless where
a ReLU outputs 0, and an absolute tolerance breaks when activations are large.

This module imports nothing of repnp but :mod:`repnp.errors`: the library, the
command line, the demo, the golden-file writer and the tests all import it.
"""

from __future__ import annotations

import numpy as np

from repnp.errors import ShapeError

__all__ = [
    "FLOAT64",
    "FLOAT32",
    "NETWORK",
    "FLOAT16",
    "TOLERANCES",
    "default_tolerance",
    "relative_error",
]

#: One fusion or one block computed in float64: rounding of a few dozen operations.
FLOAT64 = 1e-12
#: One fusion or one block computed in float32.
FLOAT32 = 1e-5
#: Whole networks and ONNX conversions in float32: deep nets amplify rounding.
NETWORK = 1e-4
#: Models stored in float16 (fused in float64, run in float16): their rounding step is ~1e-3.
FLOAT16 = 1e-2

#: The tolerance of one block or fusion, by the dtype it is computed in.
TOLERANCES = {np.dtype(np.float64): FLOAT64, np.dtype(np.float32): FLOAT32,
              np.dtype(np.float16): FLOAT16}


def default_tolerance(dtype) -> float:
    """The tolerance for one block or fusion computed in ``dtype``.

    Parameters
    ----------
    dtype : numpy dtype or anything :class:`numpy.dtype` accepts

    Returns
    -------
    float
        float64 -> :data:`FLOAT64` (1e-12), float32 -> :data:`FLOAT32` (1e-5),
        float16 -> :data:`FLOAT16` (1e-2). Whole networks use :data:`NETWORK`
        whatever their dtype: pass it explicitly.

    Raises
    ------
    ValueError
        For a dtype the rule does not cover (integers, complex).
    """
    dtype = np.dtype(dtype)
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(
            f"no default tolerance for dtype {dtype} (the rule covers float64, float32 and float16); "
            f"pass the tolerance explicitly"
        ) from None


def relative_error(a, b) -> float:
    """``max|a - b| / max|b|``, the project's one error metric (``b`` the reference).

    Parameters
    ----------
    a, b : array_like of one shape
        ``b`` is the reference.

    Returns
    -------
    float
        Computed in float64.

        * empty arrays: 0.0;
        * any NaN or infinity in ``a`` or ``b``: ``inf`` (a non-finite value is never
          "within tolerance", wherever it is);
        * ``b`` all zeros: 0.0 if ``a`` is all zeros too, ``inf`` otherwise (the ratio
          is undefined; any difference from an all-zero reference is a failure).

    Raises
    ------
    ShapeError
        If the shapes differ (broadcasting would hide a layout bug).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ShapeError(f"a and b must have one shape, got a {a.shape} and b {b.shape}")
    if a.size == 0:
        return 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    diff = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale
