"""Constant folding for the ONNX converter: the values of the tensors that depend only on
constants and static shapes.

The PyTorch exporter wraps some writes in shape-only subgraphs (``Shape``, ``Range``,
``Expand``, ``Where`` ... computing the indices of a ``ScatterND``): they are evaluated
here first, so that the walker (:mod:`repnp.io.onnx.walk`) sees constants where the
graph computes them. :func:`probe_shapes` measures the shapes shape inference cannot
tell by one run of a static-shape model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from repnp.io.onnx.graph import model_without, node_attributes, subgraph_inputs, text

__all__ = ["probe_shapes", "fold_constants", "Constants", "FOLD_LIMIT"]

#: Largest number of elements constant folding may materialise for one tensor. A node
#: whose output would be larger (as shape inference tells it) is not folded, and the
#: report says so: a 1 KB model may hold a ``ConstantOfShape([30000, 30000])``, and the
#: converter must not spend gigabytes on it. 2**24 elements is 128 MB in float64, far
#: more than any index or shape tensor an exporter computes.
FOLD_LIMIT = 1 << 24
# Ops whose output never has more elements than their inputs together: with an unknown
# output shape these may still be folded (their inputs are bounded already). Anything
# else with an unknown output shape (ConstantOfShape, Expand, Tile, Pad, Range, a
# broadcasting Mul, ...) could be arbitrarily large and is not folded.
_BOUNDED_OPS = {"Identity", "Cast", "CastLike", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                "Transpose", "Concat", "Split", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor", "Ceil",
                "Round", "Sign", "Not", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "ReduceSum", "ReduceMax",
                "ReduceMin", "ReduceProd", "ReduceMean", "ArgMax", "ArgMin"}

# Ops whose output *shape* depends on input *values*: a Shape taken downstream
# of them is not a compile-time constant even when every input shape is static.
_DATA_SHAPED_OPS = {"NonZero", "Compress", "Unique", "NonMaxSuppression", "Loop", "If", "Scan",
                    "TopK", "StringSplit", "RegexFullMatch"}
# Ops that must never be folded: randomness, control flow, training ops.
_UNFOLDABLE_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                   "Multinomial", "Bernoulli", "Dropout", "Loop", "If", "Scan", "Shape", "Size",
                   "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def probe_shapes(model: onnx.ModelProto, names, feeds: dict[str, np.ndarray], *, order=None) -> dict[str, tuple]:
    """Concrete shapes of ``names`` from one run of ``model`` on ``feeds``.

    Used only for static-shape models, where a run's shapes are the shapes. ``order``: a
    topological order of the nodes when they are not stored in one (runtimes need it).
    The run outputs a ``Shape`` of each probed tensor, not the tensor: the runtime frees
    every intermediate as usual, so probing many tensors costs no more memory than one
    run of the model (asking for the tensors themselves would keep them all alive).
    """
    from repnp.io.onnx.check import run_model
    from repnp.io.onnx.graph import unique_name

    names = [n for n in dict.fromkeys(names)]
    if not names:
        return {}
    probe = model_without(model, initializers=False)   # one copy of the weights, not two
    nodes = model.graph.node
    probe.graph.node.extend(nodes if order is None else [nodes[i] for i in order])
    taken = {o for n in nodes for o in n.output} | {t.name for t in model.graph.initializer} | {
        i.name for i in model.graph.input}
    del probe.graph.output[:]
    shape_names = []
    for name in names:
        shape_name = unique_name(f"{name}__probe_shape", taken)
        probe.graph.node.append(onnx.helper.make_node("Shape", [name], [shape_name]))
        probe.graph.output.append(onnx.ValueInfoProto(name=shape_name))
        shape_names.append(shape_name)
    values = run_model(probe, feeds, outputs=shape_names)[0]
    return {n: tuple(int(d) for d in np.asarray(v)) for n, v in zip(names, values)}


#: Ops whose outputs are shape arithmetic, never a data tensor the walker fuses: their
#: outputs are not probed by :func:`unknown_shapes`.
_SHAPE_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape", "Range", "Equal", "Where", "Cast",
                        "Gather", "Unsqueeze", "Squeeze", "Concat", "Expand", "Slice", "Reshape", "Sub"})


def unknown_shapes(nodes, live, shapes) -> list[str]:
    """Outputs of the live data nodes (Conv, Pad, ScatterND, Add, activations ...) whose
    shape inference left unknown or partly unknown, for :func:`probe_shapes`.

    Shape arithmetic ops (``_SHAPE_OPS``) are left out: their outputs are folded as
    constants, and probing them would only keep more tensors alive during the run.
    """
    out = []
    for i, node in enumerate(nodes):
        if i not in live or node.op_type in _SHAPE_OPS:
            continue
        for name in node.output:
            shape = shapes.get(name) if name else ()
            if name and (shape is None or any(d is None for d in shape)):
                out.append(name)
    return out


# ----------------------------------------------------------------------------
# constant folding
# ----------------------------------------------------------------------------

def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``),
    ``None`` for the other forms (sparse tensors, strings)."""
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


def fold_constants(model: onnx.ModelProto, order: list[int], *, shapes: dict[str, tuple],
                   exclude=(), among=None) -> Constants:
    """Values of every tensor that does not depend on the data inputs.

    Parameters
    ----------
    model : onnx.ModelProto
    order : list of int
        A topological order of the nodes.
    shapes : dict
        Known tensor shapes (``None`` for unknown dims); a ``Shape`` is folded
        only when its input's shape is fully known (static).
    exclude : set of str
        Initializers that are not constants (overridable graph inputs,
        :func:`repnp.io.onnx.graph.overridable_initializers`): neither they nor what is
        computed from them is folded.
    among : set of int, optional
        Evaluate only these nodes (by index), e.g. :func:`repnp.io.onnx.graph.live_nodes`:
        the converter never evaluates a node no graph output depends on, however
        large its output. Default: every node.

    Returns
    -------
    dict
        Tensor name -> ndarray: initializers, ``Constant`` outputs, and the
        outputs of every deterministic node whose inputs are all constants
        (including the Shape / Range / Where ... chains exporters emit) and that some
        graph output depends on (``among``). Its ``skipped`` attribute lists ``(node name, op type,
        elements or None)`` for the nodes not folded because their output could exceed
        :data:`FOLD_LIMIT` elements.

    Notes
    -----
    Initializers count as constants unless named in ``exclude`` (IR < 4 lists every
    initializer as a graph input by necessity). Every folded tensor is bounded by
    :data:`FOLD_LIMIT` elements, judged before evaluating it: from the shapes propagated
    by shape inference, else from its inputs' values (a ``Range``'s length, an
    ``Expand``'s target). The folded nodes are evaluated by
    ``onnx.reference.ReferenceEvaluator``, in as few runs as those judgements allow; the
    graph itself is not changed here.
    """
    graph = model.graph
    exclude = set(exclude)
    consts = Constants([t for t in graph.initializer if t.name not in exclude])
    consts.skipped = []
    # element types of the graph inputs (declared types do not go stale the way shapes do)
    input_types = {vi.name: vi.type.tensor_type.elem_type for vi in graph.input if vi.type.HasField("tensor_type")}
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
            value = constant_value(node)
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
        if node.op_type in _UNFOLDABLE_OPS or subgraph_inputs(node) or \
                (among is not None and idx not in among):
            continue
        if node.op_type == "CastLike" and len(ins) == 2 and ins[1] not in consts and ins[1] not in pending \
                and input_types.get(ins[1]):
            # CastLike reads only the element type of its second input: a constant cast
            # "like" a data input is a constant (the dynamo exporter's zero bias of a
            # bias-free conv, OREPA's, is CastLike(0, input) then Expand).
            node = onnx.helper.make_node("Cast", [ins[0]], list(node.output), name=node.name,
                                         to=input_types[ins[1]])
            ins = ins[:1]
        if not ins or not all(n in consts or n in pending for n in ins):
            continue
        size = _output_size(node, shapes)
        if size is None:
            # Shape inference cannot tell (a Range's length, an Expand to a computed shape):
            # judge from the input values, evaluating what is pending first.
            if any(n in pending for n in ins):
                consts.update(_evaluate(model, fold_nodes, consts))
                fold_nodes, pending = [], set()
                if not all(n in consts for n in ins):
                    continue  # an input the evaluator could not compute
            size = _estimate_size(node, consts)
        if size is None or size > FOLD_LIMIT:
            consts.skipped.append((text(node.name) or f"#{idx}", node.op_type, size))
            continue
        fold_nodes.append(node)
        pending.update(o for o in node.output if o)
    if fold_nodes:
        consts.update(_evaluate(model, fold_nodes, consts))
    return consts


def _output_size(node: onnx.NodeProto, shapes: dict) -> int | None:
    """Elements of the largest output of ``node`` as shape inference tells them; ``None``
    when some output's shape is not fully known."""
    largest = 0
    for out in node.output:
        if not out:
            continue
        dims = shapes.get(out)
        if dims is None or any(d is None for d in dims):
            return None
        largest = max(largest, int(np.prod(dims, dtype=object)))
    return largest


_BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal",
                  "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift",
                  "BitwiseAnd", "BitwiseOr", "BitwiseXor"}


def _shape_of(consts: Constants, name: str) -> tuple:
    """The shape of a constant, without converting a large initializer to an array."""
    if dict.__contains__(consts, name):
        return tuple(np.shape(dict.__getitem__(consts, name)))
    return tuple(consts._raw[name].dims)


def _estimate_size(node: onnx.NodeProto, consts: Constants) -> int | None:
    """Elements of the output of ``node`` computed from its constant inputs' values and
    shapes, before evaluating it; ``None`` when the op's output size is not bounded here."""
    ins = list(node.input)
    op = node.op_type

    def value(k):
        return np.asarray(consts[ins[k]]) if k < len(ins) and ins[k] else None

    try:
        if op in _BOUNDED_OPS:
            return sum(int(np.prod(_shape_of(consts, n), dtype=object)) for n in ins if n)
        if op in _BROADCAST_OPS:
            return int(np.prod(np.broadcast_shapes(*[_shape_of(consts, n) for n in ins if n]), dtype=object))
        if op == "Range":
            start, limit, delta = (float(value(k)) for k in range(3))
            return None if delta == 0 else max(int(np.ceil((limit - start) / delta)), 0)
        if op == "ConstantOfShape":
            return int(np.prod([int(d) for d in value(0).ravel()], dtype=object))
        if op == "Expand":
            target = tuple(int(d) for d in value(1).ravel())
            if any(d < 0 for d in target):
                return None
            return int(np.prod(np.broadcast_shapes(_shape_of(consts, ins[0]), target), dtype=object))
        if op == "Tile":
            reps = [int(r) for r in value(1).ravel()]
            shape = _shape_of(consts, ins[0])
            if len(reps) != len(shape) or min(reps, default=0) < 0:
                return None
            return int(np.prod([d * r for d, r in zip(shape, reps)], dtype=object))
        if op == "Gather":
            data, idx = _shape_of(consts, ins[0]), _shape_of(consts, ins[1])
            axis = int(node_attributes(node).get("axis", 0)) % max(len(data), 1)
            return int(np.prod(data[:axis] + idx + data[axis + 1:], dtype=object))
    except (TypeError, ValueError, IndexError, KeyError, OverflowError):
        return None
    return None


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

