"""Exact folds around fully connected layers (``Gemm``, or ``MatMul`` on a matrix) that
deploy graphs do: an inference BatchNormalization before or after the layer (timm
RepViT's ``BN_Linear``, a Linear then BatchNorm1d), a per-feature ``Mul``/``Div``/
``Add``/``Sub`` by a constant after it, and the sum of layers on one input (RepViT's
distillation head ``(head(x) + head_dist(x)) / 2`` becomes one Gemm).

Each fold removes nodes and never adds MACs, so the output is never slower. The algebra is
:mod:`repnp.fusion.linear`; :func:`fold_linear` runs on the rewritten model
(:mod:`repnp.io.onnx.rewrite`), whose numeric check then covers it like every fusion.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from repnp import fusion
from repnp.io.onnx import graph as og
from repnp.io.report import ConversionReport, Fused

__all__ = ["fold_linear"]

_FLOAT = (np.float16, np.float32, np.float64)


class _Linear:
    """A node computing ``y = x W^T + b`` on a matrix ``x``: its weights in float64."""

    def __init__(self, node, source, weight, bias, dtype, nodes):
        self.node, self.source, self.weight, self.bias, self.dtype = node, source, weight, bias, dtype
        self.nodes = nodes  # the nodes it stands for, in graph order


class _Graph:
    """Indexes of the model the folds read: producers, readers, initializers."""

    def __init__(self, model: onnx.ModelProto, shapes: dict) -> None:
        graph = model.graph
        self.model, self.shapes = model, shapes
        self.inits = {t.name: t for t in graph.initializer}
        self.protected = {i.name for i in graph.input}  # overridable at run time
        self.outputs = {o.name for o in graph.output}
        # One list of the node wrappers, so that nodes compare by identity throughout.
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.readers: dict[str, list] = {}
        for n in self.nodes:
            for name in list(n.input) + sorted(og.subgraph_inputs(n)):
                if name:
                    self.readers.setdefault(name, []).append(n)

    def const(self, name):
        if not name or name not in self.inits or name in self.protected:
            return None
        value = numpy_helper.to_array(self.inits[name])
        return value if value.dtype.type in _FLOAT else None

    def only_reader(self, name):
        """The one node reading ``name``, ``None`` if it is read more (or is an output)."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or name in self.outputs:
            return None
        return readers[0]


def _as_linear(g: _Graph, node) -> _Linear | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    attrs = og.node_attributes(node)
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or len(node.input) < 2:
            return None
        b = g.const(node.input[1])
        c = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if b is None or b.ndim != 2 or (len(node.input) > 2 and node.input[2] and c is None):
            return None
        weight = (b if attrs.get("transB", 0) else b.T).astype(np.float64) * float(attrs.get("alpha", 1.0))
        bias = np.zeros(weight.shape[0])
        if c is not None:
            c = np.asarray(c, np.float64) * float(attrs.get("beta", 1.0))
            if c.size not in (1, weight.shape[0]) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
                return None
            bias = bias + c.reshape(-1)
    elif node.op_type == "MatMul":
        b = g.const(node.input[1])
        shape = g.shapes.get(node.input[0])
        if b is None or b.ndim != 2 or shape is None or len(shape) != 2:
            return None
        weight, bias = b.T.astype(np.float64), np.zeros(b.shape[1])
    else:
        return None
    return _Linear(node, node.input[0], weight, bias, b.dtype, [node])


def _bn(g: _Graph, node):
    """``(s, t)`` of an inference BatchNormalization with constant parameters, else ``None``."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or \
            any(o for o in node.output[1:]) or og.node_attributes(node).get("training_mode", 0):
        return None
    params = [g.const(n) for n in node.input[1:5]]
    if len(params) != 4 or any(p is None or p.ndim != 1 for p in params):
        return None
    gamma, beta, mean, var = params
    eps = float(og.node_attributes(node).get("epsilon", 1e-5))
    try:
        return fusion.bn_scale_shift(mean, var, gamma, beta, eps=eps)
    except ValueError:
        return None


def _vector(value, size):
    """A constant that broadcasts along the last axis of an (N, size) matrix only."""
    if value is None or value.size not in (1, size) or value.ndim > 2 or (value.ndim == 2 and value.shape[0] != 1):
        return None
    return np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (size,))


def _after(g: _Graph, lin: _Linear, node):
    """``lin`` followed by ``node`` (its only reader) as one linear layer, else ``None``."""
    out = lin.nodes[-1].output[0]
    o = lin.weight.shape[0]
    op = node.op_type if node.domain in ("", "ai.onnx") else ""
    if op == "BatchNormalization" and node.input[0] == out:
        st = _bn(g, node)
        if st is None or st[0].shape != (o,):
            return None
        s, t = st
    elif op in ("Mul", "Div", "Add", "Sub") and len(node.input) == 2 and out in node.input:
        pos = list(node.input).index(out)
        if node.input[1 - pos] == out:
            return None
        c = _vector(g.const(node.input[1 - pos]), o)
        if c is None:
            return None
        if op == "Mul":
            s, t = c, None
        elif op == "Div":
            if pos != 0 or not np.all(c != 0):
                return None
            s, t = 1.0 / c, None
        elif op == "Add":
            s, t = 1.0, c
        else:  # y - c, or c - y
            s, t = (1.0, -c) if pos == 0 else (-1.0, c)
    else:
        return None
    w, b = fusion.scale_linear(lin.weight, lin.bias, s, t)
    return _Linear(node, lin.source, w, b, lin.dtype, lin.nodes + [node])


def _before(g: _Graph, lin: _Linear):
    """A BatchNormalization feeding ``lin`` (its only reader) folded into it, else ``None``."""
    prod = g.producer.get(lin.source)
    if prod is None or g.only_reader(lin.source) is not lin.nodes[0]:
        return None
    st = _bn(g, prod)
    if st is None or st[0].shape != (lin.weight.shape[1],):
        return None
    w, b = fusion.scale_linear(lin.weight, lin.bias, st[0], st[1], before=True)
    return _Linear(lin.node, prod.input[0], w, b, lin.dtype, [prod] + lin.nodes)


def _grow(g: _Graph, lin: _Linear) -> _Linear:
    """``lin`` extended by every fold before and after it (a BN before; BN, affine ops and
    a sum with a parallel layer on the same input after)."""
    while True:
        before = _before(g, lin)
        if before is not None:
            lin = before
            continue
        reader = g.only_reader(lin.nodes[-1].output[0])
        if reader is None:
            return lin
        nxt = _after(g, lin, reader)
        if nxt is None:
            nxt = _parallel(g, lin, reader)
        if nxt is None:
            return lin
        lin = nxt


def _parallel(g: _Graph, lin: _Linear, node):
    """``Add``/``Sub`` of ``lin`` and another linear layer on the same input, else ``None``."""
    if node.op_type not in ("Add", "Sub") or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    out = lin.nodes[-1].output[0]
    other_name = node.input[1] if node.input[0] == out else node.input[0]
    if other_name == out or g.only_reader(other_name) is not node:
        return None
    prod = g.producer.get(other_name)
    other = _as_linear(g, prod) if prod is not None else None
    if other is None:
        return None
    other = _grow_after(g, other, stop=node)
    if other is None or other.source != lin.source or other.weight.shape != lin.weight.shape or \
            other.dtype != lin.dtype:
        return None
    sign = -1.0 if node.op_type == "Sub" else 1.0
    first, second = (lin, other) if node.input[0] == out else (other, lin)
    w2, b2 = fusion.scale_linear(second.weight, second.bias, sign)
    w, b = fusion.add_linear((first.weight, first.bias), (w2, b2))
    nodes = [n for n in _in_order(g, lin.nodes + other.nodes)] + [node]
    return _Linear(node, lin.source, w, b, lin.dtype, nodes)


def _grow_after(g: _Graph, lin: _Linear, *, stop):
    """``lin`` extended by the affine ops after it, up to the input of ``stop``."""
    while True:
        reader = g.only_reader(lin.nodes[-1].output[0])
        if reader is None:
            return None
        if reader is stop:
            return lin
        lin = _after(g, lin, reader)
        if lin is None:
            return None


def _in_order(g: _Graph, nodes):
    position = {id(n): k for k, n in enumerate(g.nodes)}
    return sorted(nodes, key=lambda n: position[id(n)])


def fold_linear(model: onnx.ModelProto, report: ConversionReport, *, shapes=None) -> int:
    """Fold, in place, every BN, per-feature affine op and parallel layer around a
    ``Gemm`` (or a ``MatMul`` on a matrix) into it; return the number of Gemms written.

    Parameters
    ----------
    model : onnx.ModelProto
        The rewritten model (nodes and initializers in place). Models of IR < 4 are left
        alone (their initializers must be graph inputs too).
    report : ConversionReport
        One :class:`~repnp.io.report.Fused` (``kind="Gemm"``) joins ``report.fused`` per fold.
    shapes : dict, keyword-only, optional
        Tensor name -> shape: a ``MatMul`` is folded only when its input is known to be a
        matrix (rank 2), where it equals a ``Gemm``.

    Notes
    -----
    Only initializers that are not graph inputs count as constants (an initializer that
    is also a graph input can be overridden at run time). A layer whose output has more
    than one reader (or is a graph output) ends the fold there, so no value is computed
    twice. The weights are computed in float64 (:mod:`repnp.fusion.linear`) and written
    in the layer's dtype.
    """
    if model.ir_version < 4:
        return 0
    shapes = shapes or {}
    count = 0
    while True:
        g = _Graph(model, shapes)
        done = None
        for node in g.nodes:
            lin = _as_linear(g, node)
            if lin is None:
                continue
            lin = _grow(g, lin)
            if len(lin.nodes) > 1:
                done = lin
                break
        if done is None:
            return count
        _replace(model, g, done, report)
        count += 1


def _replace(model: onnx.ModelProto, g: _Graph, lin: _Linear, report: ConversionReport) -> None:
    graph = model.graph
    out = lin.nodes[-1].output[0]
    taken = set(g.inits) | set(g.producer) | {n.name for n in graph.node} | {i.name for i in graph.input}
    w_name = og.unique_name(f"{out}.repnp_weight", taken)
    b_name = og.unique_name(f"{out}.repnp_bias", taken)
    base = og.text(lin.nodes[-1].name) or og.text(out)
    name = og.unique_name(f"{base}/repnp_fused", taken)
    new = onnx.helper.make_node("Gemm", [lin.source, w_name, b_name], [out], name=name, transB=1)
    og.replace_nodes(model, lin.nodes, [new],
                     [numpy_helper.from_array(np.ascontiguousarray(lin.weight.astype(lin.dtype)), w_name),
                      numpy_helper.from_array(lin.bias.astype(lin.dtype), b_name)], keep=g.protected)
    o, i = lin.weight.shape
    report.fused.append(Fused(
        where=og.text(out), kind="Gemm", merged=[og.text(n.name) for n in lin.nodes],
        written=[og.text(name), og.text(w_name), og.text(b_name)],
        detail={"source": og.text(lin.source), "weight_shape": [int(o), int(i)],
                "op_types": dict(Counter(n.op_type for n in lin.nodes))}))
