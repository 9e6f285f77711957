"""The project's one error metric and its named tolerances.

Every comparison in repnp — a fusion against the unfused computation, a block's
deploy form against its train form, a converted model against the original, a
port against a golden file — uses one metric,

.. math:: \\mathrm{err}(a, b) = \\frac{\\max |a - b|}{\\max |b|},

with ``b`` the reference, and one of the tolerances below. A single relative
figure for a whole tensor: an element-wise relative error is meaningless where
a ReLU outputs 0, and an absolute tolerance breaks when activations are large.

Outputs that legitimately hold NaN or infinities (a division by a constant
holding 0, ``Sqrt`` of a negative value) are compared by :func:`compare_arrays`:
the non-finite values by position — ``a`` must hold NaN exactly where ``b`` does,
``+inf`` where ``b`` does and ``-inf`` where ``b`` does, else the comparison fails
and says where — and the finite values by the metric above, restricted to the
positions where ``b`` is finite (:func:`relative_error_masked`).
:func:`relative_error` itself stays strict: any non-finite value gives ``inf``.

This module imports nothing of repnp but :mod:`repnp.errors`: the library, the
command line, the demo, the golden-file writer and the tests all import it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "relative_error_masked",
    "nonfinite_mismatch",
    "finite_extrema",
    "error_ratio",
    "ArrayComparison",
    "compare_arrays",
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
    a, b = _as_pair(a, b)
    if a.size == 0:
        return 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    return error_ratio(float(np.max(np.abs(a - b))), float(np.max(np.abs(b))))


def _as_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ShapeError(f"a and b must have one shape, got a {a.shape} and b {b.shape}")
    return a, b


def _kind(value: float) -> str:
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return "a finite value"


def nonfinite_mismatch(a, b) -> str | None:
    """Where ``a``'s NaN / +inf / -inf pattern differs from the reference ``b``'s, in words.

    Parameters
    ----------
    a, b : array_like of one shape
        ``b`` is the reference.

    Returns
    -------
    str or None
        ``None`` when ``a`` holds NaN exactly where ``b`` does, ``+inf`` exactly where
        ``b`` does and ``-inf`` exactly where ``b`` does (in particular when both are
        finite everywhere). Otherwise a sentence such as ``"has NaN where the reference
        is finite (at index (0, 1, 2, 2); 18 of 18 positions differ)"``, naming the
        first position in C order.

    Raises
    ------
    ShapeError
        If the shapes differ.
    """
    a, b = _as_pair(a, b)
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if finite_a.all() and finite_b.all():
        return None
    differ = (finite_a != finite_b) | (np.isnan(a) != np.isnan(b)) | (np.isposinf(a) != np.isposinf(b))
    count = int(np.count_nonzero(differ))
    if count == 0:
        return None
    flat = int(np.argmax(differ.ravel()))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    va, vb = a.ravel()[flat], b.ravel()[flat]
    ref = "is finite" if np.isfinite(vb) else f"has {_kind(vb)}"
    return (f"has {_kind(va)} where the reference {ref} (at index {index}; {count} of {a.size} "
            f"positions differ)")


def finite_extrema(a, b) -> tuple[float, float]:
    """``(max|a - b|, max|b|)`` over the positions where both ``a`` and ``b`` are finite.

    The two halves of :func:`relative_error_masked`, so that a caller can combine
    several tensors (the largest difference over the largest reference value of all)
    without concatenating them. ``(0.0, 0.0)`` when no position is finite in both.

    Raises
    ------
    ShapeError
        If the shapes differ.
    """
    a, b = _as_pair(a, b)
    if a.size == 0:
        return 0.0, 0.0
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.all():
        a, b = a[finite], b[finite]
        if a.size == 0:
            return 0.0, 0.0
    return float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))


def error_ratio(max_abs: float, max_ref: float) -> float:
    """``max_abs / max_ref`` with :func:`relative_error`'s rule for an all-zero reference.

    ``max_ref == 0``: 0.0 if ``max_abs == 0`` too, ``inf`` otherwise.
    """
    if max_ref == 0.0:
        return 0.0 if max_abs == 0.0 else float("inf")
    return float(max_abs) / float(max_ref)


def relative_error_masked(a, b) -> float:
    """The metric where ``a`` and ``b`` may legitimately hold NaN or infinities.

    Parameters
    ----------
    a, b : array_like of one shape
        ``b`` is the reference.

    Returns
    -------
    float
        ``inf`` if the non-finite patterns differ (:func:`nonfinite_mismatch`);
        otherwise ``max|a - b| / max|b|`` over the positions where ``b`` is finite,
        with :func:`relative_error`'s rules (empty or no finite position: 0.0; an
        all-zero finite reference: 0.0 or ``inf``). Equal to :func:`relative_error`
        when everything is finite.

    Raises
    ------
    ShapeError
        If the shapes differ.
    """
    if nonfinite_mismatch(a, b) is not None:
        return float("inf")
    return error_ratio(*finite_extrema(a, b))


@dataclass(frozen=True)
class ArrayComparison:
    """Outcome of :func:`compare_arrays`.

    Attributes
    ----------
    passed : bool
        Same non-finite pattern and ``error <= tol``.
    max_abs : float
        ``max|a - b|`` over the finite positions; ``inf`` if the patterns differ.
    error : float
        :func:`relative_error_masked`.
    reason : str or None
        Why it failed (the pattern mismatch, or the error against ``tol``); ``None`` if passed.
    """

    passed: bool
    max_abs: float
    error: float
    reason: str | None = None


def compare_arrays(a, b, *, tol: float) -> ArrayComparison:
    """Compare ``a`` with the reference ``b``: non-finite values by position, finite ones by the metric.

    Parameters
    ----------
    a, b : array_like of one shape
        ``b`` is the reference.
    tol : float, keyword-only

    Returns
    -------
    ArrayComparison
        Passed when ``a`` has NaN, ``+inf`` and ``-inf`` exactly where ``b`` has them and
        ``max|a - b| / max|b|`` over the finite positions is at most ``tol``.

    Raises
    ------
    ShapeError
        If the shapes differ.
    """
    mismatch = nonfinite_mismatch(a, b)
    if mismatch is not None:
        return ArrayComparison(False, float("inf"), float("inf"), mismatch)
    max_abs, max_ref = finite_extrema(a, b)
    error = error_ratio(max_abs, max_ref)
    if error <= tol:
        return ArrayComparison(True, max_abs, error)
    return ArrayComparison(False, max_abs, error, f"differs by max rel error {error:.3g} > tol {tol:g} "
                                                  f"(max abs {max_abs:.3g})")
