"""The one error metric and the named tolerances (repnp.tolerance)."""

import numpy as np
import pytest

from repnp import testing, tolerance
from repnp.errors import ShapeError
from repnp.tolerance import relative_error


def test_named_tolerances_are_the_rule():
    assert (tolerance.FLOAT64, tolerance.FLOAT32, tolerance.NETWORK, tolerance.FLOAT16) == (1e-12, 1e-5, 1e-4, 1e-2)


def test_hand_computed_error():
    # max|a - b| = 0.5 (second element), max|b| = 4
    assert relative_error([1.0, 2.5, -4.0], [1.0, 2.0, -4.0]) == 0.125


def test_all_zero_reference():
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error([0.0, 1e-30, 0.0], np.zeros(3)) == np.inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["a", "b"])
def test_non_finite_anywhere_is_infinite_error(bad, where):
    a = np.ones((2, 3, 4))
    b = np.ones((2, 3, 4))
    (a if where == "a" else b)[1, 2, 3] = bad     # not the first element
    assert relative_error(a, b) == np.inf


def test_empty_and_shape_mismatch():
    assert relative_error(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0
    with pytest.raises(ShapeError, match=r"\(2,\).*\(3,\)"):
        relative_error(np.zeros(2), np.zeros(3))


def test_testing_reexports_the_one_metric():
    assert testing.relative_error is relative_error
    assert testing.default_tolerance is tolerance.default_tolerance
