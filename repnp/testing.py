"""Helpers for checking re-parameterizations and ports, by the project's one tolerance rule.

A port (a re-implementation of a block in another framework, or in C, or in an
NPU toolchain) is checked against a golden file of ``data/golden`` the same way
repnp checks itself: run the port on the stored input with the stored
parameters and compare with the stored output by

.. math:: \\mathrm{err} = \\frac{\\max |a - b|}{\\max |b|}

``b`` the reference (the project's tolerance rule, :mod:`repnp.tolerance`). One relative metric for a
whole tensor: element-wise relative error is meaningless where a ReLU outputs
0, and an absolute tolerance breaks when activations are large.

Typical use (see ``tests/test_testing.py`` for a complete port check)::

    g = repnp.testing.load_golden("data/golden/acnet_float32.npz")
    err = repnp.testing.check_port(g, my_forward)   # my_forward(x, params, config)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from repnp.tolerance import TOLERANCES, default_tolerance, relative_error

__all__ = [
    "TOLERANCES",
    "default_tolerance",
    "relative_error",
    "assert_reparam_equivalent",
    "load_golden",
    "golden_config",
    "golden_params",
    "check_port",
    "random_input",
    "assert_reparam_keeps_block",
]

def random_input(shape, *, dtype=np.float64, seed=0) -> np.ndarray:
    """A test input drawn N(0, 1), e.g. an NCHW activation.

    Parameters
    ----------
    shape : tuple of int
    dtype : keyword-only
        The result's dtype; values are drawn in float64, then cast (so a
        float32 input is the float64 one rounded, as in the golden files).
    seed : int or numpy.random.Generator, keyword-only

    Returns
    -------
    ndarray of ``shape`` and ``dtype``
        ``numpy.random.default_rng(seed).standard_normal(shape)``: O(1)
        values, like the activations of a network with N(0, 1/fan_in) weights.
    """
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(dtype)


def assert_reparam_equivalent(block, x, *, rtol: float | None = None) -> float:
    """Check that ``block.reparameterize()`` computes what ``block`` computes on ``x``.

    Parameters
    ----------
    block : train-form block
        Anything with ``forward(x)`` and ``reparameterize()`` (the block API).
    x : ndarray
        The input; its dtype picks the default tolerance.
    rtol : float, keyword-only, optional
        Largest accepted error; default by dtype (float64 1e-12, float32 1e-5).

    Returns
    -------
    float
        The error ``max|deploy(x) - train(x)| / max|train(x)|``.

    Raises
    ------
    AssertionError
        If the error exceeds ``rtol`` or the output dtypes/shapes differ.
    """
    x = np.asarray(x)
    tol = default_tolerance(x.dtype) if rtol is None else float(rtol)
    expected = block.forward(x)
    deploy = block.reparameterize()
    actual = deploy.forward(x)
    if actual.shape != expected.shape:
        raise AssertionError(f"deploy output shape {actual.shape} != train output shape {expected.shape}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"deploy output dtype {actual.dtype} != train output dtype {expected.dtype}")
    err = relative_error(actual, expected)
    if not err <= tol:
        raise AssertionError(
            f"{type(block).__name__} -> {type(deploy).__name__}: err = max|deploy - train| / "
            f"max|train| = {err:.3e} > {tol:.1e} (input {x.shape} {x.dtype})"
        )
    return err


def assert_reparam_keeps_block(block):
    """Check that ``block.reparameterize()`` returns a new object and leaves ``block`` as it was.

    Blocks are frozen dataclasses, but their arrays are not: a fusion that
    wrote into a kernel in place would change the train form behind the
    user's back.

    Returns
    -------
    The deploy form.

    Raises
    ------
    AssertionError
        If the deploy form is ``block`` itself, or a parameter of ``block``
        (by ``params()``) changed its name set, dtype or any value.
    """
    before = {name: np.array(value, copy=True) for name, value in block.params().items()}
    deploy = block.reparameterize()
    if deploy is block:
        raise AssertionError(f"{type(block).__name__}.reparameterize() returned the block itself")
    after = block.params()
    if set(after) != set(before):
        raise AssertionError(f"reparameterize() changed the parameter names: {sorted(set(after) ^ set(before))}")
    for name, value in before.items():
        now = np.asarray(after[name])
        if now.dtype != value.dtype or not np.array_equal(now, value):
            raise AssertionError(f"reparameterize() changed parameter {name!r} of {type(block).__name__}")
    return deploy


def load_golden(path) -> dict[str, np.ndarray]:
    """Read a golden ``.npz`` file into a dict of arrays (``allow_pickle=False``).

    The arrays are copied out of the archive, so the file is closed on return.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def golden_config(golden: dict) -> dict:
    """The ``config`` entry of a golden file (a JSON string stored as a 0-d unicode array)."""
    if "config" not in golden:
        raise KeyError("golden has no 'config' entry; keys: " + ", ".join(sorted(golden)))
    return json.loads(str(golden["config"][()]))


def golden_params(golden: dict, form: str = "train") -> dict[str, np.ndarray]:
    """The parameters of one form, ``"train"`` or ``"deploy"``, with the ``form.`` prefix removed."""
    if form not in ("train", "deploy"):
        raise ValueError(f"form must be 'train' or 'deploy', got {form!r}")
    prefix = form + "."
    params = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
    if not params:
        raise KeyError(f"golden has no '{prefix}*' entries")
    return params


def check_port(golden: dict, forward_fn: Callable, *, form: str = "train",
               rtol: float | None = None) -> float:
    """Check a port's forward pass against a golden file.

    Parameters
    ----------
    golden : dict
        As returned by :func:`load_golden`: keys ``x``, ``y``, ``config``,
        ``train.*``, ``deploy.*`` (see ``data/README.md``).
    forward_fn : callable
        ``forward_fn(x, params, config) -> y`` — the port. ``params`` is the
        ``{name: array}`` dict of the chosen form with its prefix removed (e.g.
        ``"square.conv.weight"``), ``config`` the decoded JSON config.
    form : {"train", "deploy"}, keyword-only
        Which parameter set to hand to the port. Both must reproduce ``y``.
    rtol : float, keyword-only, optional
        Default by the dtype of ``golden["y"]`` (float64 1e-12, float32 1e-5).

    Returns
    -------
    float
        The error ``max|port - y| / max|y|``.

    Raises
    ------
    AssertionError
        If the port's output has another shape or an error above ``rtol``.
    """
    x, y = golden["x"], golden["y"]
    tol = default_tolerance(y.dtype) if rtol is None else float(rtol)
    out = np.asarray(forward_fn(x, golden_params(golden, form), golden_config(golden)))
    if out.shape != y.shape:
        raise AssertionError(f"port output shape {out.shape} != golden y {y.shape}")
    err = relative_error(out, y)
    if not err <= tol:
        raise AssertionError(f"port ({form} parameters): err = {err:.3e} > {tol:.1e}")
    return err
