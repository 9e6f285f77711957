"""Any two ONNX models compared on the same inputs: what ``repnp verify`` runs.

:func:`verify_models` loads both models, builds the feeds (a given array or seeded
random inputs), refuses models whose graph inputs cannot take the same feeds —
naming the input and both declarations, before anything runs (onnxruntime's own
message would name neither file) — and compares every output with the project's
metric (:func:`repnp.io.onnx.check.compare_models`): outputs paired by name (by
position, with a message in the result, when the two models' output names are not
the same set), non-finite values by position (NaN where NaN, ``+inf`` where ``+inf``,
``-inf`` where ``-inf``), finite ones by ``max|a - b| / max|a|``.
"""

from __future__ import annotations

import numpy as np
import onnx

from repnp.errors import ConversionError, ShapeError
from repnp.io.onnx.check import CheckResult, compare_models
from repnp.io.onnx.graph import load_model, sort_nodes
from repnp.io.onnx.inputs import NP_TYPES, default_notes, make_inputs
from repnp.tolerance import NETWORK

__all__ = ["graph_inputs", "check_same_inputs", "feeds_from_array", "verify_models"]


def graph_inputs(model: onnx.ModelProto) -> dict:
    """Non-initializer graph inputs: name -> (element type name, dims; a dim is an int or a name)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "?"
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out[vi.name] = (elem, dims)
    return out


def check_same_inputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, *, names=("a", "b")) -> None:
    """Raise unless ``b`` declares the inputs ``a`` does and can take ``feeds``.

    Raises
    ------
    ConversionError
        An input of one model that the other lacks (both input lists named).
    ShapeError
        An input whose element type or fixed dimensions differ, or that the feed drawn
        for ``a`` does not fit in ``b`` (``a``'s dimension symbolic, ``b``'s fixed).
    """
    name_a, name_b = names
    ins_a, ins_b = graph_inputs(a), graph_inputs(b)
    listing = f"(inputs of {name_a!r}: {list(ins_a)}, of {name_b!r}: {list(ins_b)})"
    missing = [k for k in ins_a if k not in ins_b]
    if missing:
        raise ConversionError(f"graph inputs differ: {name_b!r} has no input named {missing[0]!r} {listing}")
    extra = [k for k in ins_b if k not in ins_a]
    if extra:
        raise ConversionError(f"graph inputs differ: {name_b!r} has an input {extra[0]!r} that {name_a!r} "
                              f"lacks {listing}")

    def show(decl):
        return f"{decl[0]} {decl[1] if decl[1] is not None else '(no shape)'}"

    for name, (elem_a, dims_a) in ins_a.items():
        elem_b, dims_b = ins_b[name]
        differ = elem_a != elem_b
        if dims_a is not None and dims_b is not None:
            differ = differ or len(dims_a) != len(dims_b) or any(
                isinstance(p, int) and isinstance(q, int) and p != q for p, q in zip(dims_a, dims_b))
        fed = feeds.get(name)
        if not differ and fed is not None and dims_b is not None:
            # a's dim is symbolic where b's is fixed: the feed drawn for a may not fit b
            differ = fed.ndim != len(dims_b) or any(
                isinstance(q, int) and q != n for q, n in zip(dims_b, fed.shape))
        if differ:
            raise ShapeError(f"graph inputs differ: {name!r} is {show(ins_a[name])} in {name_a!r} but "
                             f"{show(ins_b[name])} in {name_b!r}"
                             + (f" (fed {list(fed.shape)})" if fed is not None else ""))


def feeds_from_array(model: onnx.ModelProto, x: np.ndarray, *, name: str = "a") -> dict:
    """``{input name: x}`` for a model with one graph input, ``x`` cast to the input's type.

    Raises
    ------
    ConversionError
        The model has more or fewer than one graph input.
    ShapeError
        ``x`` does not fit the input's fixed dimensions.
    """
    inits = {t.name for t in model.graph.initializer}
    real = [vi for vi in model.graph.input if vi.name not in inits]
    if len(real) != 1:
        raise ConversionError(f"an input array feeds one graph input, {name!r} has {len(real)}")
    dtype = NP_TYPES.get(real[0].type.tensor_type.elem_type, np.float32)
    dims = real[0].type.tensor_type.shape.dim
    if x.ndim != len(dims) or any(d.HasField("dim_value") and d.dim_value != s for d, s in zip(dims, x.shape)):
        want = tuple(d.dim_value if d.HasField("dim_value") else "?" for d in dims)
        raise ShapeError(f"input array has shape {x.shape}, graph input {real[0].name!r} of {name!r} needs {want}")
    return {real[0].name: x.astype(dtype)}


def verify_models(a, b, *, tol: float = NETWORK, x: np.ndarray | None = None, input_shape=None,
                  seed: int = 0) -> CheckResult:
    """Compare two ONNX models on the same inputs.

    Parameters
    ----------
    a, b : onnx.ModelProto, str or os.PathLike
        ``a`` is the reference (``max|b - a| / max|a|``).
    tol : float, keyword-only
        Tolerance (:data:`repnp.tolerance.NETWORK` by default).
    x : ndarray, optional, keyword-only
        The input to feed (one graph input); default: seeded random inputs.
    input_shape : tuple or dict, optional, keyword-only
        Shapes for the random inputs where dimensions are dynamic (checked against the
        declared rank and fixed dimensions; dynamic ones default to batch 1, spatial
        :func:`repnp.io.onnx.check.spatial_check_size` of ``a``; ``messages`` says which).
    seed : int, keyword-only
        Seed of the random inputs.

    Returns
    -------
    repnp.io.onnx.check.CheckResult
        Per output and overall errors; ``passed`` says whether every output is within
        ``tol``. A NaN or infinity in any output where the other model has not the same
        value fails, and ``reason`` names the output (``"output 'y1' has NaN where the
        reference is finite ..."``); the same NaN/inf pattern in both is equal.
        ``messages`` says when outputs were paired by position or dynamic dimensions
        given default sizes.

    Raises
    ------
    ConversionError, ShapeError
        Unreadable models, graph inputs that cannot take the same feeds, an
        ``input_shape`` that does not fit the declared input, or random inputs larger
        than :data:`repnp.io.onnx.check.MAX_CHECK_ELEMENTS`.
    """
    label_a = a if isinstance(a, str) else "a"
    label_b = b if isinstance(b, str) else "b"
    a, b = sort_nodes(load_model(a)), sort_nodes(load_model(b))
    if x is not None:
        feeds = feeds_from_array(a, np.asarray(x), name=label_a)
    else:
        try:
            feeds = make_inputs(a, input_shape=input_shape, seed=seed)
        except (ConversionError, ShapeError) as exc:
            raise type(exc)(f"{label_a!r}: {exc}") from None
    check_same_inputs(a, b, feeds, names=(label_a, label_b))
    try:
        result = compare_models(a, b, tol=tol, feeds=feeds)
    except ConversionError as exc:
        raise ConversionError(f"{label_a!r} vs {label_b!r}: {exc}") from None
    if x is None:
        # say at which shape dynamic dimensions were checked (the inputs were drawn here)
        result.messages[:0] = default_notes(a, input_shape, {k: v.shape for k, v in feeds.items()})
    return result
