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

from repnp.io.onnx.graph import model_without, node_attributes, subgraph_inputs

__all__ = ["probe_shapes", "fold_constants", "Constants"]

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
    """
    from repnp.io.onnx.check import run_model

    names = [n for n in dict.fromkeys(names)]
    if not names:
        return {}
    probe = model_without(model, initializers=False)   # one copy of the weights, not two
    nodes = model.graph.node
    probe.graph.node.extend(nodes if order is None else [nodes[i] for i in order])
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

