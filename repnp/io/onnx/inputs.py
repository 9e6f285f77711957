"""The inputs of a numeric check: shapes validated, dynamic dimensions sized, values drawn.

:func:`make_inputs` draws seeded random inputs for a model, bounded by
:data:`MAX_CHECK_ELEMENTS` elements in all graph inputs together (refused by name before
anything is drawn). Dynamic dimensions get :data:`DYNAMIC_BATCH` on the batch axis and
:func:`spatial_check_size` on the spatial axes: a 1x1 image cannot show a wrong border,
padding or stride. :mod:`repnp.io.onnx.check` runs the models on them.
"""

from __future__ import annotations

import numpy as np
import onnx

from repnp.errors import ConversionError, ShapeError

__all__ = ["NP_TYPES", "MAX_CHECK_ELEMENTS", "DYNAMIC_BATCH", "DYNAMIC_SPATIAL", "DYNAMIC_SPATIAL_MAX",
           "spatial_check_size", "input_shapes", "make_inputs", "default_notes", "given_for", "given_shape"]

#: Most elements the check draws, over all graph inputs together (64 Mi: 256 MiB as
#: float32, drawn through a float64 temporary). A larger input is refused by name
#: before anything is allocated; give a smaller ``input_shape`` (``--input-shape``).
MAX_CHECK_ELEMENTS = 2**26
#: A dynamic batch axis (axis 0) is checked at this size.
DYNAMIC_BATCH = 1
#: Dynamic spatial axes (axes 2 and later of an input of rank >= 3, e.g. H and W of
#: NCHW) are checked at least at this size, and at twice the largest receptive step of
#: the model's convs and pools (:func:`spatial_check_size`) up to
#: :data:`DYNAMIC_SPATIAL_MAX`: a 3x3 conv after a stride of 32 (a ResNet's last stage)
#: is checked at 192x192, where it sees 6x6 pixels, border and interior; a single conv
#: at 32x32, where border pixels are a minority and a stride or dilation shows.
DYNAMIC_SPATIAL = 32
#: The largest size :func:`spatial_check_size` picks (ImageNet-sized networks reach it
#: only with several strides of 2 before a large kernel); smaller when the inputs would
#: exceed :data:`MAX_CHECK_ELEMENTS`.
DYNAMIC_SPATIAL_MAX = 256

#: Ops whose kernel slides over the spatial axes (their border and stride must show).
_SPATIAL_OPS = {"Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool"}

#: ONNX element type -> NumPy dtype, for the types the check can feed.
NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


def _declared(vi: onnx.ValueInfoProto) -> list | None:
    """Declared dims of a graph input (an int, or ``None`` where dynamic); ``None`` without a shape."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]


def _show(dims) -> str:
    return "(no shape)" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def spatial_check_size(model: onnx.ModelProto) -> int:
    """The size at which the check feeds a dynamic spatial axis of ``model``.

    Twice the largest receptive step of one conv or pool (its kernel extent, dilation
    included, or its stride if larger, times the stride accumulated before it), at
    least :data:`DYNAMIC_SPATIAL`, at most :data:`DYNAMIC_SPATIAL_MAX`: every conv then
    sees border and interior pixels, so that a wrong padding, border tap or stride of a
    fused kernel shows. Not a fixed 224: a small model is checked fast, and a deep one
    at about the size it was built for (a ResNet or RepVGG at 192, after a stride of 32).
    """
    from repnp.io.onnx import graph as og

    try:
        order = og.topological_order(model.graph)
    except Exception:  # a cycle is reported elsewhere, by name; list order is good enough here
        order = range(len(model.graph.node))
    inits = {t.name: t for t in model.graph.initializer}
    stride_at: dict[str, int] = {}
    reach = 1
    for idx in order:
        node = model.graph.node[idx]
        before = max([stride_at.get(n, 1) for n in node.input if n] or [1])
        after = before
        if node.op_type in _SPATIAL_OPS:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            kernel = list(attrs.get("kernel_shape") or ())
            if not kernel and len(node.input) > 1 and node.input[1] in inits:
                kernel = list(inits[node.input[1]].dims[2:])
            strides = list(attrs.get("strides") or [1])
            dilations = list(attrs.get("dilations") or [1])
            extent = max([int(d) * (int(k) - 1) + 1 for k, d in zip(kernel, dilations * len(kernel))] or [1])
            step = max(int(x) for x in strides) if strides else 1
            reach = max(reach, before * max(extent, step))
            after = before * max(step, 1)
        for out in node.output:
            if out:
                stride_at[out] = min(after, DYNAMIC_SPATIAL_MAX)
    return int(min(max(DYNAMIC_SPATIAL, 2 * reach), DYNAMIC_SPATIAL_MAX))


def _default_dim(axis: int, rank: int, spatial: int = DYNAMIC_SPATIAL) -> int:
    return spatial if rank >= 3 and axis >= 2 else DYNAMIC_BATCH


def given_for(input_shape, name: str, index: int):
    """The shape ``input_shape`` gives graph input ``name`` (the ``index``-th real input): a dict
    is looked up by name, a plain shape applies to the first input only; ``None`` if none."""
    if isinstance(input_shape, dict):
        return input_shape.get(name)
    return input_shape if input_shape is not None and index == 0 else None


def given_shape(vi: onnx.ValueInfoProto, given) -> tuple:
    """``given`` checked against ``vi``'s declaration: rank, fixed dims, positive integers."""
    declared = _declared(vi)
    try:
        shape = tuple(int(d) for d in given)
        bad_type = any(isinstance(d, (bool, np.bool_)) or int(d) != d for d in given)
    except (TypeError, ValueError):
        shape, bad_type = (), True
    if bad_type or any(d < 1 for d in shape):
        raise ShapeError(f"input_shape {given!r} for graph input {vi.name!r} must be positive integers "
                         f"(declared {_show(declared)})")
    if declared is not None:
        if len(shape) != len(declared):
            raise ShapeError(f"input_shape {list(shape)} has {len(shape)} dimensions, graph input {vi.name!r} "
                             f"is declared {_show(declared)} ({len(declared)} dimensions)")
        fixed = [(k, d, g) for k, (d, g) in enumerate(zip(declared, shape)) if d is not None and d != g]
        if fixed:
            k, d, g = fixed[0]
            raise ShapeError(f"input_shape {list(shape)} does not fit graph input {vi.name!r} declared "
                             f"{_show(declared)}: dimension {k} is fixed at {d}, given {g}")
    return shape


def input_shapes(model: onnx.ModelProto, *, input_shape=None) -> dict[str, tuple]:
    """The shape :func:`make_inputs` feeds each non-initializer graph input, checked, nothing drawn.

    Parameters
    ----------
    model : onnx.ModelProto
    input_shape : tuple or dict, keyword-only, optional
        One shape (for the first input) or a dict name -> shape. Each must have the
        input's declared rank, match its fixed dimensions and be positive integers.
        Dimensions not given: the declared ones, and where dynamic
        :data:`DYNAMIC_BATCH` on axis 0 and :func:`spatial_check_size` on axes 2 and later
        (inputs of rank >= 3; halved towards :data:`DYNAMIC_SPATIAL` while the inputs
        would exceed :data:`MAX_CHECK_ELEMENTS`), :data:`DYNAMIC_BATCH` elsewhere.

    Returns
    -------
    dict of str to tuple

    Raises
    ------
    ShapeError
        A given shape that does not fit the input's declaration (the input, its declared
        shape and the given one named), or a dict naming no graph input.
    ConversionError
        More than :data:`MAX_CHECK_ELEMENTS` elements in all inputs together (the input
        and its shape named).
    """
    inits = {t.name for t in model.graph.initializer}
    real = [vi for vi in model.graph.input if vi.name not in inits]
    if isinstance(input_shape, dict):
        unknown = [k for k in input_shape if k not in {vi.name for vi in real}]
        if unknown:
            raise ShapeError(f"input_shape names {unknown[0]!r}, which is not a graph input "
                             f"(inputs: {[vi.name for vi in real]})")
    elif input_shape is not None and not real:
        raise ShapeError(f"input_shape {list(input_shape)} given but the model has no graph input")
    shapes: dict[str, tuple] = {}
    chosen: dict[str, bool] = {}
    defaulted = []      # (name, declared dims) of the inputs with a dynamic spatial axis
    for index, vi in enumerate(real):
        given = given_for(input_shape, vi.name, index)
        if given is not None:
            shapes[vi.name] = given_shape(vi, given)
        else:
            declared = _declared(vi) or []
            shapes[vi.name] = tuple(_default_dim(k, len(declared)) if d is None else d
                                    for k, d in enumerate(declared))
            if len(declared) >= 3 and any(d is None for d in declared[2:]):
                defaulted.append((vi.name, declared))
        chosen[vi.name] = given is not None
    if defaulted:
        size = spatial_check_size(model)

        def numel(dims_by_name):
            total = 0
            for shape in dims_by_name.values():
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
            return total

        def at(side):
            out = dict(shapes)
            for name, declared in defaulted:
                out[name] = tuple(_default_dim(k, len(declared), side) if d is None else d
                                  for k, d in enumerate(declared))
            return out

        # the realistic size where it fits the check's budget, else smaller (never below the minimum)
        while size > DYNAMIC_SPATIAL and numel(at(size)) > MAX_CHECK_ELEMENTS:
            size = max(DYNAMIC_SPATIAL, size // 2)
        shapes = at(size)
    total = 0
    for name, shape in shapes.items():
        size = 1
        for d in shape:     # Python ints: no overflow for absurd declared shapes
            size *= int(d)
        total += size
        if total > MAX_CHECK_ELEMENTS:
            how = ("give a smaller input_shape (--input-shape)" if chosen[name] or
                   any(d is None for d in (_declared(next(vi for vi in real if vi.name == name)) or []))
                   else "its dimensions are fixed in the model, so it cannot be checked here "
                        "(convert without the check: check=False, --no-check)")
            raise ConversionError(
                f"graph input {name!r} of shape {list(shape)} makes {total} input elements, more than the "
                f"check draws ({MAX_CHECK_ELEMENTS}, repnp.io.onnx.check.MAX_CHECK_ELEMENTS): {how}")
    return shapes


def default_notes(model: onnx.ModelProto, input_shape, shapes: dict) -> list[str]:
    """Say which dynamic dimensions got default sizes (the check ran at those sizes only)."""
    inits = {t.name for t in model.graph.initializer}
    notes = []
    for index, vi in enumerate(v for v in model.graph.input if v.name not in inits):
        if (isinstance(input_shape, dict) and vi.name in input_shape) or \
                (input_shape is not None and not isinstance(input_shape, dict) and index == 0):
            continue
        declared = _declared(vi)
        if declared and any(d is None for d in declared) and vi.name in shapes:
            notes.append(f"graph input {vi.name!r} declared {_show(declared)}: checked at "
                         f"{list(shapes[vi.name])} (dynamic batch {DYNAMIC_BATCH}; dynamic spatial axes at "
                         f"twice the largest conv/pool reach, {DYNAMIC_SPATIAL}..{DYNAMIC_SPATIAL_MAX}; "
                         f"input_shape / --input-shape chooses)")
    return notes


def make_inputs(model: onnx.ModelProto, *, input_shape=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) inputs (zeros for integer inputs) for every non-initializer graph input.

    ``input_shape`` is one shape (for the first input) or a dict name -> shape; the
    shapes are those of :func:`input_shapes` (checked against the declarations,
    dynamic dimensions defaulted, at most :data:`MAX_CHECK_ELEMENTS` elements in all),
    all decided before anything is drawn.

    Raises
    ------
    ShapeError
        ``input_shape`` does not fit an input's declared rank or fixed dimensions.
    ConversionError
        An input type the check cannot feed, or inputs too large to draw.
    """
    inits = {t.name for t in model.graph.initializer}
    real_inputs = [vi for vi in model.graph.input if vi.name not in inits]
    for vi in real_inputs:
        elem = vi.type.tensor_type.elem_type
        if NP_TYPES.get(elem) is None:
            raise ConversionError(f"graph input {vi.name!r} has an element type ({elem}) the check "
                                  f"cannot feed")
    shapes = input_shapes(model, input_shape=input_shape)
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in real_inputs:
        dtype = NP_TYPES[vi.type.tensor_type.elem_type]
        shape = shapes[vi.name]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds
