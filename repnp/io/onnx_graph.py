"""ONNX graph plumbing for the converter: safe loading, structure checks, topological
order, static shapes and constant folding.

Nothing here knows about re-parameterization; :mod:`repnp.io.onnx_convert` builds
on it. Every function takes and returns plain ``onnx`` protos and NumPy arrays.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from repnp.errors import ConversionError

__all__ = [
    "load_model",
    "node_attributes",
    "subgraph_inputs",
    "validate_graph",
    "topological_order",
    "consumers_of",
    "live_nodes",
    "static_shapes",
    "probe_shapes",
    "fold_constants",
    "Constants",
    "opset_version",
    "with_nodes",
    "sorted_model",
]

# Ops whose output *shape* depends on input *values*: a Shape taken downstream
# of them is not a compile-time constant even when every input shape is static.
_DATA_SHAPED_OPS = {"NonZero", "Compress", "Unique", "NonMaxSuppression", "Loop", "If", "Scan",
                    "TopK", "StringSplit", "RegexFullMatch"}
# Ops that must never be folded: randomness, control flow, training ops.
_UNFOLDABLE_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                   "Multinomial", "Bernoulli", "Dropout", "Loop", "If", "Scan", "Shape", "Size",
                   "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


# ----------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------

def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def _confine_external_data(model: onnx.ModelProto, base_dir: str | None) -> None:
    """Refuse external data that would be read from outside the model's folder."""
    tensors = list(external_data_helper._get_all_tensors(model))
    external = [(t.name, _external_location(t)) for t in tensors if _external_location(t) is not None]
    if not external:
        return
    if base_dir is None:
        raise ConversionError(
            f"model has external data ({external[0][1]!r} for tensor {external[0][0]!r}) but was "
            f"given as a ModelProto: pass the file path so that its folder is known"
        )
    root = os.path.realpath(base_dir)
    for name, location in external:
        # An absolute path or one that climbs out of the folder (``../../x``, or a
        # symlink pointing elsewhere) could read any file on the machine.
        full = os.path.realpath(os.path.join(root, location))
        if not location or os.path.isabs(location) or os.path.commonpath([root, full]) != root:
            raise ConversionError(
                f"external data of tensor {name!r} points to {location!r}, outside the model's "
                f"folder {root!r}: refused"
            )
        if not os.path.isfile(full):
            raise ConversionError(f"external data file {location!r} of tensor {name!r} not found in {root!r}")
    external_data_helper.load_external_data_for_model(model, root)


def load_model(model) -> onnx.ModelProto:
    """Read an ONNX model from a path (or copy a ModelProto) and check it.

    Parameters
    ----------
    model : str, os.PathLike or onnx.ModelProto
        A ModelProto is copied, never modified.

    Returns
    -------
    onnx.ModelProto
        With external data loaded (only from files inside the model's folder).

    Raises
    ------
    ConversionError
        Unreadable, truncated or non-ONNX file, external data outside the folder.
    """
    base_dir = None
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        path = os.fspath(model)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ConversionError(f"cannot read model {path!r}: {exc}") from None
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ConversionError(f"{path!r} is not an ONNX model (protobuf parse failed: {exc})") from None
        base_dir = os.path.dirname(os.path.abspath(path))
    if proto.ir_version < 1 or not proto.HasField("graph") or not proto.graph.output:
        raise ConversionError("not an ONNX model: no IR version, graph or graph output (empty, truncated "
                              "or foreign file?)")
    _confine_external_data(proto, base_dir)
    return proto


# ----------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------

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
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
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
    producer = {out: idx for idx, node in enumerate(graph.node) for out in node.output if out}
    live: set[int] = set()
    stack = [o.name for o in graph.output]
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
        stack.extend(_node_inputs(graph.node[idx]))
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
    """Shapes from ONNX shape inference; unknown dimensions are ``None``.

    Never raises: a model shape inference cannot handle just gives fewer shapes.
    """
    # Large float initializers only matter to shape inference by their shapes: pass
    # them as typed graph inputs so that the weights are not serialized again.
    light = _without_big_initializers(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is a hint here, not a check
        inferred = model
    g = inferred.graph
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(vi.type)
        if dims is not None:
            shapes[vi.name] = dims
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _without_big_initializers(model: onnx.ModelProto, limit: int = 4096) -> onnx.ModelProto:
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    listed = {i.name for i in model.graph.input}
    g.input.extend(model.graph.input)
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) <= limit:
            g.initializer.append(t)
        elif t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            pass  # already a typed graph input (IR < 4 style)
    return light


def inputs_are_static(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = _dims(vi.type)
        if dims is None or any(d is None or d <= 0 for d in dims):
            return False
    return True


def probe_shapes(model: onnx.ModelProto, names, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Concrete shapes of ``names`` from one run of ``model`` on ``feeds``.

    Used only for static-shape models, where a run's shapes are the shapes.
    """
    from repnp.io.onnx_check import run_model

    names = [n for n in dict.fromkeys(names)]
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    values = run_model(probe, feeds, outputs=names)[0]
    return {n: tuple(np.asarray(v).shape) for n, v in zip(names, values)}


# ----------------------------------------------------------------------------
# constant folding
# ----------------------------------------------------------------------------

def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


class Constants(dict):
    """Tensor name -> value of the folded constants.

    Initializers are converted to arrays on access, and large ones are not kept:
    a model's weights are read once by the region that uses them instead of being
    held twice (proto and array) for the whole conversion.
    """

    _KEEP = 4096  # elements; small constants (shapes, indices, BN vectors) are cached

    def __init__(self, initializers=()):
        super().__init__()
        self._raw = {t.name: t for t in initializers}

    def __missing__(self, key):
        tensor = self._raw.get(key)
        if tensor is None:
            raise KeyError(key)
        value = numpy_helper.to_array(tensor)
        if value.size <= self._KEEP:
            self[key] = value
        return value

    def __contains__(self, key):
        return dict.__contains__(self, key) or key in self._raw

    def get(self, key, default=None):
        return self[key] if key in self else default


def fold_constants(model: onnx.ModelProto, order: list[int], *, shapes: dict[str, tuple]) -> Constants:
    """Values of every tensor that does not depend on the data inputs.

    Parameters
    ----------
    model : onnx.ModelProto
    order : list of int
        A topological order of the nodes.
    shapes : dict
        Known tensor shapes (``None`` for unknown dims); a ``Shape`` is folded
        only when its input's shape is fully known (static).

    Returns
    -------
    dict
        Tensor name -> ndarray: initializers, ``Constant`` outputs, and the
        outputs of every deterministic node whose inputs are all constants
        (including the Shape / Range / Where ... chains exporters emit).

    Notes
    -----
    Initializers count as constants even when also listed as graph inputs
    (IR < 4 lists every initializer there). The folded nodes are evaluated
    together by ``onnx.reference.ReferenceEvaluator``; the graph itself is not
    changed here.
    """
    graph = model.graph
    consts = Constants(graph.initializer)
    data_shaped: set[str] = set()
    fold_nodes = []
    pending: set[str] = set()  # outputs of nodes to evaluate
    for idx in order:
        node = graph.node[idx]
        ins = [n for n in node.input if n]
        if any(n in data_shaped for n in ins) or node.op_type in _DATA_SHAPED_OPS:
            data_shaped.update(o for o in node.output if o)
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None:
                consts[node.output[0]] = value
            continue
        if node.op_type in ("Shape", "Size"):
            src = node.input[0]
            dims = shapes.get(src)
            if src in data_shaped or dims is None or any(d is None for d in dims):
                continue
            dims_arr = np.array(dims, dtype=np.int64)
            if node.op_type == "Size":
                consts[node.output[0]] = np.array(int(np.prod(dims_arr)), dtype=np.int64)
            else:
                attrs = node_attributes(node)
                start, end = attrs.get("start", 0), attrs.get("end", None)
                consts[node.output[0]] = dims_arr[start:end]
            continue
        if node.op_type in _UNFOLDABLE_OPS or subgraph_inputs(node):
            continue
        if ins and all(n in consts or n in pending for n in ins):
            fold_nodes.append(node)
            pending.update(o for o in node.output if o)
    if fold_nodes:
        consts.update(_evaluate(model, fold_nodes, consts))
    return consts


def _evaluate(model: onnx.ModelProto, nodes, consts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    produced = {o for n in nodes for o in n.output if o}
    needed = {i for n in nodes for i in n.input if i and i not in produced}
    inits = [numpy_helper.from_array(np.asarray(consts[name]), name) for name in sorted(needed)]
    outputs = [onnx.ValueInfoProto(name=o) for n in nodes for o in n.output if o]
    graph = onnx.helper.make_graph(list(nodes), "repnp_fold", [], outputs, initializer=inits)
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = max(model.ir_version, 4)
    try:
        values = ReferenceEvaluator(sub).run(None, {})
    except Exception:
        # Fall back to one node at a time so that one op the evaluator cannot run
        # only leaves its own outputs (and what depends on them) unfolded.
        return _evaluate_one_by_one(model, nodes, consts)
    return {o.name: np.asarray(v) for o, v in zip(outputs, values)}


def _evaluate_one_by_one(model, nodes, consts):
    from onnx.reference import ReferenceEvaluator

    out = {}

    def known(name):
        return out[name] if name in out else consts[name]

    for node in nodes:
        ins = [i for i in node.input if i]
        if not all(i in out or i in consts for i in ins):
            continue
        inits = [numpy_helper.from_array(np.asarray(known(name)), name) for name in dict.fromkeys(ins)]
        outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
        graph = onnx.helper.make_graph([node], "repnp_fold1", [], outputs, initializer=inits)
        sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        sub.ir_version = max(model.ir_version, 4)
        try:
            values = ReferenceEvaluator(sub).run(None, {})
        except Exception:
            continue
        for o, v in zip(outputs, values):
            out[o.name] = np.asarray(v)
    return out
