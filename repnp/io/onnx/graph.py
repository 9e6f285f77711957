"""ONNX graph facts for the converter: structure checks, topological
order, static shapes, attributes, parameter and operator counts, and the output check
``onnx.checker`` runs (without serializing the weights).

Nothing here knows about re-parameterization; :mod:`repnp.io.onnx.walk` builds on it,
and constant folding is :mod:`repnp.io.onnx.fold`. Every function takes and returns
plain ``onnx`` protos and NumPy arrays. Loading is :mod:`repnp.io.onnx.load`
(re-exported here).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict

import numpy as np
import onnx

from repnp.errors import ConversionError, ShapeError
from repnp.io.onnx.load import load_model, load_onnx  # noqa: F401  (re-exported: graph facts start here)
from repnp.ops import pair

__all__ = [
    "replace_nodes",
    "merge_equal_initializers",
    "load_onnx",
    "load_model",
    "count_params",
    "op_counts",
    "pair_attribute",
    "explicit_pads",
    "inputs_are_static",
    "node_attributes",
    "subgraph_inputs",
    "validate_graph",
    "topological_order",
    "consumers_of",
    "live_nodes",
    "live_indices",
    "static_shapes",
    "opset_version",
    "with_nodes",
    "sorted_model",
    "sort_nodes",
    "model_without",
    "copy_fields",
    "light_model",
    "check_initializer",
    "check_model_full",
    "text",
    "overridable_initializers",
    "unique_name",
]

# ----------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------

def text(name) -> str:
    """A name read from the proto as ``str``, for reports and messages.

    ONNX is proto2, where a string field may hold bytes that are not UTF-8: protobuf then
    returns ``bytes``. Those are decoded with ``backslashreplace`` (``b'a\\xff'`` reads
    ``a\\xff``), so that every report field is text that prints and serializes to JSON.
    """
    if isinstance(name, bytes):
        return name.decode("utf-8", errors="backslashreplace")
    return str(name)


def overridable_initializers(model: onnx.ModelProto) -> set[str]:
    """Initializers that are also graph inputs in a model of IR version 4 or later.

    From IR 4 on an initializer need not be a graph input; one that is listed there is a
    default the caller may override at run time (PyTorch's
    ``keep_initializers_as_inputs=True``), so its value is not a constant of the graph.
    Below IR 4 every initializer must be listed as an input: there the listing says
    nothing, and the empty set is returned (those initializers are constants, as the
    exporters of that time meant them).
    """
    if model.ir_version < 4:
        return set()
    listed = {i.name for i in model.graph.input}
    return {t.name for t in model.graph.initializer if t.name in listed}


def node_attributes(node: onnx.NodeProto) -> dict:
    """Attributes of ``node`` as Python values (bytes decoded to str)."""
    out = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        out[attr.name] = value
    return out


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that the subgraphs of ``node`` (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs = [attr.g]
        elif len(attr.graphs):
            graphs = list(attr.graphs)
        else:  # ints, floats, tensors...: most attributes; no list built for them
            continue
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                defined.update(inner.output)
            for inner in g.node:
                names.update(n for n in inner.input if n and n not in defined)
                names.update(n for n in subgraph_inputs(inner) if n not in defined)
            names.update(o.name for o in g.output if o.name not in defined)
    return names


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    return [n for n in node.input if n] + sorted(subgraph_inputs(node))


def validate_graph(graph: onnx.GraphProto) -> None:
    """Refuse graphs whose names do not connect: missing inputs, doubly defined tensors.

    Raises
    ------
    ConversionError
        Naming the node and the tensor.
    """
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    producers: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in producers or out in defined:
                raise ConversionError(f"tensor {out!r} is defined twice (node {node.name!r} and "
                                      f"{producers.get(out, 'a graph input or initializer')!r})")
            producers[out] = node.name
    known = defined | set(producers)
    for node in graph.node:
        for name in _node_inputs(node):
            if name not in known:
                raise ConversionError(
                    f"node {node.name!r} ({node.op_type}) reads {name!r}, which is neither an "
                    f"initializer, a graph input nor any node's output (missing initializer?)"
                )
    for out in graph.output:
        if out.name not in known:
            raise ConversionError(f"graph output {out.name!r} is not produced by any node")


def topological_order(graph: onnx.GraphProto) -> list[int]:
    """Node indices in a topological order, as close to the stored order as possible.

    Raises
    ------
    ConversionError
        If the graph has a cycle (naming some of the nodes on it).
    """
    producer = {}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = idx
    deps = [set() for _ in graph.node]
    users = defaultdict(list)
    for idx, node in enumerate(graph.node):
        for name in _node_inputs(node):
            if name in producer and producer[name] != idx:
                deps[idx].add(producer[name])
            elif name in producer:  # a node reading its own output
                deps[idx].add(idx)
        for d in deps[idx]:
            users[d].append(idx)
    import heapq
    missing = [len(d) for d in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        idx = heapq.heappop(ready)
        order.append(idx)
        for user in users[idx]:
            missing[user] -= 1
            if missing[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(graph.node):
        stuck = [graph.node[i].name or f"#{i}" for i, m in enumerate(missing) if m > 0]
        raise ConversionError(f"the graph has a cycle: nodes {stuck[:8]} wait on each other")
    return order


def consumers_of(graph: onnx.GraphProto, among=None) -> dict[str, list[int]]:
    """For each tensor name, the indices of the nodes reading it (once per use),
    counting only the nodes in ``among`` when given."""
    users: dict[str, list[int]] = defaultdict(list)
    for idx, node in enumerate(graph.node):
        if among is not None and idx not in among:
            continue
        for name in _node_inputs(node):
            users[name].append(idx)
    return users


def live_nodes(graph: onnx.GraphProto, constants=()) -> set[int]:
    """Indices of the nodes that some graph output depends on.

    With ``constants`` (names of folded tensors), the walk stops at them: the
    result is the nodes the *data* path needs, e.g. not the ``Shape`` chains
    that only compute constant ``ScatterND`` indices.
    """
    return live_indices(graph.node, [o.name for o in graph.output], constants)


def live_indices(nodes, outputs, constants=()) -> set[int]:
    """:func:`live_nodes` for a plain sequence of nodes and the names of the outputs
    (no GraphProto needs to be built around a node list to ask)."""
    nodes = list(nodes)
    producer = {out: idx for idx, node in enumerate(nodes) for out in node.output if out}
    live: set[int] = set()
    stack = list(outputs)
    seen = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        idx = producer.get(name)
        if idx is None or idx in live or name in constants:
            continue
        live.add(idx)
        stack.extend(_node_inputs(nodes[idx]))
    return live


def with_nodes(model: onnx.ModelProto, nodes) -> onnx.ModelProto:
    """A copy of ``model`` whose graph holds ``nodes`` instead of its own."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def sorted_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its nodes in topological order (runtimes need it).

    Raises
    ------
    ConversionError
        On a cycle.
    """
    return with_nodes(model, [model.graph.node[i] for i in topological_order(model.graph)])


def sort_nodes(model: onnx.ModelProto, order=None) -> onnx.ModelProto:
    """Put the nodes of ``model`` in topological order, in place (only the nodes are copied,
    never the weights); returns ``model``.

    Raises
    ------
    ConversionError
        On a cycle.
    """
    order = topological_order(model.graph) if order is None else list(order)
    if order != list(range(len(model.graph.node))):
        nodes = [onnx.NodeProto() for _ in order]
        for new, i in zip(nodes, order):
            new.CopyFrom(model.graph.node[i])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


# ----------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------

def _dims(type_proto: onnx.TypeProto) -> tuple | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim)


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Shapes propagated by ONNX shape inference from the graph inputs' declared dims and
    the initializers; unknown dimensions are ``None``.

    The model's own ``value_info`` entries and the graph outputs' declared shapes are
    *not* used: they are claims an exporter or an editing tool wrote, and may be stale (a
    ``value_info`` saying 9x9 where the graph input is dynamic would give a SAME-padded,
    stride-2 conv the padding of a 9x9 map, wrong at every other size). Only what follows
    from the inputs counts.

    Never raises: a model shape inference cannot handle just gives fewer shapes.
    """
    # Large float initializers only matter to shape inference by their shapes: pass
    # them as typed graph inputs so that the weights are not serialized again.
    light = light_model(model)
    del light.graph.value_info[:]
    for out in light.graph.output:
        # keep the element type (inference checks it), forget the declared dims
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is a hint here, not a check
        inferred = light
    g = inferred.graph
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(vi.type)
        if dims is not None:
            shapes[vi.name] = dims
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def copy_fields(source, target, *, skip=(), numbers=None) -> None:
    """Copy the set fields of protobuf message ``source`` into ``target`` (same type): all but
    those named in ``skip``, and only those whose field number is in ``numbers`` when given."""
    for fd, value in source.ListFields():
        if fd.name in skip or (numbers is not None and fd.number not in numbers):
            continue
        if hasattr(value, "extend"):      # repeated field
            getattr(target, fd.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # message field
            getattr(target, fd.name).CopyFrom(value)
        else:
            setattr(target, fd.name, value)


def model_without(model: onnx.ModelProto, *, nodes=True, initializers=True) -> onnx.ModelProto:
    """A copy of ``model`` (every field: opsets, functions, metadata, graph inputs, outputs,
    ``value_info``) without its nodes and/or its initializers.

    Copying a whole ModelProto copies its weights; a rewrite that keeps few of them
    builds on this skeleton instead, so that the peak memory is not doubled.
    """
    skip_graph = {"node"} if nodes else set()
    if initializers:
        skip_graph.add("initializer")
    out = onnx.ModelProto()
    copy_fields(model, out, skip={"graph"})
    copy_fields(model.graph, out.graph, skip=skip_graph)
    return out


def light_model(model: onnx.ModelProto, *, limit: int = 4096, keep_ir: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of more than ``limit`` elements are typed graph
    inputs instead (name, element type and shape kept, no values).

    Shape inference and ``onnx.checker`` only need the shapes and types of large weights;
    serializing them again for each would cost time and a copy of the weights. Small
    initializers (shape tensors, BN vectors) stay, so that data propagation still sees them.
    ``keep_ir=False`` raises the IR version to at least 4 (where an initializer need not be
    a graph input); ``keep_ir=True`` keeps it, for the checker, and then an IR < 4 model
    keeps a large initializer that it does not list as a graph input (the checker must
    see that error).
    """
    light = model_without(model, nodes=False)
    if not keep_ir:
        light.ir_version = max(model.ir_version, 4)
    legacy = light.ir_version < 4
    listed = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if math.prod(t.dims) <= limit or (legacy and t.name not in listed):
            light.graph.initializer.append(t)
        elif t.name not in listed:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        # else: already a typed graph input (IR < 4 style)
    return light


_FOUR_BIT_TYPES = {"INT4", "UINT4", "FLOAT4E2M1"}
_PLAIN_TYPES = {"FLOAT", "UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64", "BOOL", "FLOAT16", "DOUBLE",
                "UINT32", "UINT64", "COMPLEX64", "COMPLEX128", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
                "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0"}
_STORAGE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def check_initializer(tensor: onnx.TensorProto) -> None:
    """What ``onnx.checker`` checks of an initializer's storage, without serializing it.

    Raises
    ------
    ConversionError
        Undefined element type, negative dimension, no or two storages, or a storage whose
        size does not match the shape (naming the tensor).
    """
    name = tensor.name
    if tensor.data_type == onnx.TensorProto.UNDEFINED or \
            tensor.data_type not in onnx.TensorProto.DataType.values():
        raise ConversionError(f"initializer {name!r} has an undefined element type ({tensor.data_type})")
    if any(d < 0 for d in tensor.dims):
        raise ConversionError(f"initializer {name!r} has a negative dimension {list(tensor.dims)}")
    count = math.prod(tensor.dims)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return  # loaded by load_model (inside the model's folder); checked there
    typed = [f for f in _STORAGE_FIELDS if len(getattr(tensor, f))]
    has_raw = tensor.HasField("raw_data")
    if has_raw and typed:
        raise ConversionError(f"initializer {name!r} stores its values twice (raw_data and {typed[0]})")
    if has_raw:
        if tensor.data_type == onnx.TensorProto.STRING:
            raise ConversionError(f"initializer {name!r}: a STRING tensor cannot use raw_data")
        kind = onnx.TensorProto.DataType.Name(tensor.data_type)
        if kind in _FOUR_BIT_TYPES:
            bits = 4
        elif kind in _PLAIN_TYPES:
            bits = 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        else:  # 2- and 6-bit types: let the checker itself judge this one tensor
            onnx.checker.check_tensor(tensor)
            return
        need = (count * bits + 7) // 8
        have = len(tensor.raw_data)
        if have != need:
            raise ConversionError(f"initializer {name!r}: raw_data has {have} bytes, shape "
                                  f"{list(tensor.dims)} needs {need}")
    elif count and typed:
        have = len(getattr(tensor, typed[0]))
        per = 2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
        if have != per * count:
            raise ConversionError(f"initializer {name!r}: {typed[0]} has {have} values, shape "
                                  f"{list(tensor.dims)} needs {per * count}")
    elif count:
        raise ConversionError(f"initializer {name!r} of shape {list(tensor.dims)} has no values")


def check_model_full(model: onnx.ModelProto, *, limit: int = 4096, trusted=()) -> None:
    """``onnx.checker.check_model(model, full_check=True)`` without serializing the weights.

    The checker runs on :func:`light_model` (large initializers as typed graph inputs, IR
    version kept), so it checks the graph, its types and shapes (shape inference); the large
    initializers' storages are checked by :func:`check_initializer`. Together this is what
    the full check verifies, at the cost of a pass over the graph instead of a copy of the
    weights.

    ``trusted``: names of initializers the caller built itself with
    ``numpy_helper.from_array`` (right by construction), not checked again.

    Raises
    ------
    onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ConversionError
    """
    onnx.checker.check_model(light_model(model, limit=limit, keep_ir=True), full_check=True)
    trusted = set(trusted)
    for t in model.graph.initializer:
        if math.prod(t.dims) > limit and t.name not in trusted:
            check_initializer(t)


def inputs_are_static(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = _dims(vi.type)
        if dims is None or any(d is None or d <= 0 for d in dims):
            return False
    return True


# ----------------------------------------------------------------------------
# attributes
# ----------------------------------------------------------------------------

def pair_attribute(node: onnx.NodeProto, attrs: dict, name: str) -> tuple[int, int]:
    """A 2-D op's ``strides``, ``dilations`` or ``kernel_shape`` as ``(h, w)``, 1 when absent.

    Parsed by :func:`repnp.ops.pair`, the one int-or-pair parser.

    Raises
    ------
    ConversionError
        If the attribute is not a pair (a 2-D op with a 1-D or 3-D geometry), naming the node.
    """
    value = attrs.get(name)
    if not value:
        return (1, 1)
    try:
        return pair(value, name=f"attribute {name} of {node.op_type} {node.name!r}")
    except ShapeError as exc:
        raise ConversionError(str(exc)) from None


def explicit_pads(mode, spatial, kernel, stride, dilation):
    """Explicit ONNX pads (top, left, bottom, right) for an ``auto_pad`` mode, or ``None``
    when they depend on an input height/width that is not static.

    Notes
    -----
    ONNX operator spec (Conv, AveragePool): ``SAME_*`` gives ``out = ceil(in / s)``
    with total padding ``max(0, (out - 1)*s + d*(k - 1) + 1 - in)`` along an axis;
    an odd total puts the extra pixel at the end for ``SAME_UPPER``, at the start
    for ``SAME_LOWER``. ``VALID`` means no padding (any ``pads`` attribute is then
    ignored, as onnxruntime does). At stride 1 the total is ``d*(k - 1)`` whatever
    the input size, so a dynamic height/width is fine there.
    """
    if mode == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for axis in range(2):
        s, extent = stride[axis], dilation[axis] * (kernel[axis] - 1) + 1
        if s == 1:
            total = extent - 1
        elif spatial is None:
            return None
        else:
            n = spatial[axis]
            total = max(0, (-(-n // s) - 1) * s + extent - n)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def declared_types(model: onnx.ModelProto) -> dict:
    """Tensor name -> ONNX element type, for the tensors the model declares (inputs, value infos, outputs)."""
    return {vi.name: vi.type.tensor_type.elem_type
            for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}


def tensor_dtype(declared: dict, names, fallback) -> np.dtype:
    """The element type of the first of ``names`` the model declares, else ``fallback``."""
    for name in names:
        if declared.get(name):
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(declared[name]))
    return np.dtype(fallback)


# ----------------------------------------------------------------------------
# counts
# ----------------------------------------------------------------------------

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """Number of nodes per op type."""
    return dict(Counter(n.op_type for n in graph.node))


def count_params(graph) -> int:
    """Trainable parameters stored in a graph, counted as :func:`repnp.cost.count_params` does.

    The elements of the floating-point initializers and ``Constant`` tensors, except the
    BN running statistics (inputs 3 and 4 of ``BatchNormalization``) when nothing else
    reads them: those are buffers, not parameters (PyTorch's ``model.parameters()``
    leaves them out, and so do published parameter counts). Integer tensors (shapes,
    indices) are not parameters. An export that keeps its BNs therefore counts what the
    PyTorch module or the repnp block counts, and a conversion that folds the BNs
    changes the count by exactly what it merged.

    Parameters
    ----------
    graph : onnx.GraphProto or onnx.ModelProto
        The model or its ``graph`` (subgraphs of control-flow nodes are not counted).

    Returns
    -------
    int

    Examples
    --------
    A 3x3 conv 2 -> 4 without bias and a BN on its 4 channels:
    ``4*2*3*3 = 72`` weights plus ``gamma`` and ``beta`` (8) is 80; the running
    mean and variance (8 more elements) are not counted.
    """
    if isinstance(graph, onnx.ModelProto):
        graph = graph.graph
    stats, others = set(), set()
    for node in graph.node:
        for k, name in enumerate(node.input):
            (stats if node.op_type == "BatchNormalization" and k in (3, 4) else others).add(name)
    for out in graph.output:
        others.add(out.name)

    def counted(name):
        return not (name in stats and name not in others)

    total = 0
    for t in graph.initializer:
        if t.data_type in _FLOAT_TYPES and counted(t.name):
            total += math.prod(t.dims)
    for n in graph.node:
        if n.op_type == "Constant" and n.output and counted(n.output[0]):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT_TYPES:
                    total += math.prod(a.t.dims)
    return total


def replace_nodes(model: onnx.ModelProto, old, new, initializers=(), *, keep=()) -> None:
    """Put the nodes ``new`` in place of the nodes ``old`` of ``model``'s graph (in place).

    The initializers only the removed nodes read are dropped (unless named in ``keep``:
    graph inputs a caller may override), then ``initializers`` (TensorProtos) are added.
    The new nodes go after the kept ones; callers that need a topological order sort.
    """
    graph = model.graph
    # Nodes are told apart by their outputs (unique in a valid graph): the wrappers protobuf
    # hands out for the same node need not be the same Python object.
    removed = {(tuple(n.output), n.op_type) for n in old}
    read = {i for n in old for i in n.input if i}
    kept = []
    for n in graph.node:
        if (tuple(n.output), n.op_type) not in removed:
            # Copies: clearing the repeated field below releases the messages it holds.
            kept.append(onnx.NodeProto())
            kept[-1].CopyFrom(n)
    del graph.node[:]
    graph.node.extend(kept + list(new))
    still = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:
        still |= subgraph_inputs(n)
    inits = [t for t in graph.initializer if t.name not in read or t.name in still or t.name in keep]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    graph.initializer.extend(initializers)


def merge_equal_initializers(model: onnx.ModelProto, *, keep=()) -> int:
    """Make the nodes of ``model`` read one initializer per distinct value (in place);
    return how many initializers were dropped.

    Initializers of equal data type, dims and bytes are one value: the first (in graph
    order) is kept and the nodes reading the others read it instead. Exporters write a
    tied or cloned weight once (the TorchScript exporter reads it through an ``Identity``
    or ``Transpose`` per use); folding those per reader would store it once per reader.
    Left alone: initializers named in ``keep`` (graph inputs a caller may override), graph
    outputs, names a subgraph reads (its body is not rewritten), and external or
    non-raw data (not compared without loading it).
    """
    graph = model.graph
    fixed = set(keep) | {o.name for o in graph.output}
    for n in graph.node:
        fixed |= subgraph_inputs(n)
    first: dict[tuple, onnx.TensorProto] = {}
    rename: dict[str, str] = {}
    for t in graph.initializer:
        if t.name in fixed or not t.HasField("raw_data") or \
                t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        raw = t.raw_data
        key = (t.data_type, tuple(t.dims), hashlib.sha256(raw).digest())
        if key in first and first[key].raw_data == raw:     # equal digests: the bytes decide
            rename[t.name] = first[key].name
        elif key not in first:
            first[key] = t
    if not rename:
        return 0
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
    inits = [t for t in graph.initializer if t.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return len(rename)


def unique_name(base: str, taken: set) -> str:
    """``base``, or ``base_1``, ``base_2`` ... whichever is not in ``taken``; added to ``taken``."""
    name, k = base, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name
