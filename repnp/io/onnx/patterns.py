"""Decompositions that runtimes fuse into one kernel, which the converter must leave intact.

Exporters write GELU, SiLU/Swish, HardSwish, LayerNorm and RMSNorm as chains of
elementwise ops, and runtimes recognise those chains and run each as one fused kernel
(onnxruntime's ``GeluFusion``, ``FastGeluFusion``, ``QuickGeluFusion``,
``LayerNormFusion``, ``SimplifiedLayerNormFusion``; OpenVINO's equivalents). Some of
their nodes multiply or add a constant (GELU's trailing ``* 0.5``, HardSwish's ``/ 6``,
LayerNorm's ``* gamma + beta``), which the converter could otherwise fold into the next
1x1 Conv: exact, and one elementwise op fewer, but the runtime then no longer sees its
pattern and runs five unfused ops instead of one (issue 13: +17 to +26 % on FastViT,
RepViT and ConvNeXt in onnxruntime). :func:`protected_nodes` finds those chains; the
walk (:mod:`repnp.io.onnx.walk`) treats each of their nodes as the end of every region.

The matchers are structural and tolerant (either operand order, ``Div`` by a constant
or ``Mul`` by its inverse, the ``0.5`` on either side); their constants are not
checked, so that a slightly different spelling stays protected too: protecting a node
never changes a result, it only keeps a Conv from absorbing it.
"""

from __future__ import annotations

import onnx

__all__ = ["protected_nodes"]

#: Elementwise ops a gate's argument may be computed with (GELU tanh: ``x + 0.044715 x^3``).
_ARITH = {"Mul", "Div", "Add", "Sub", "Pow"}
#: The nonlinearity at the heart of a gated activation ``x * f(x)``.
_GATES = {"Erf", "Tanh", "Sigmoid", "HardSigmoid", "Clip", "Relu"}
#: Longest arithmetic chain followed between ``x`` and the gate (GELU tanh needs 5).
_MAX_ARG = 8


class _Graph:
    def __init__(self, nodes, consts):
        self.nodes = nodes
        self.consts = consts
        self.producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        self.readers: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            for name in n.input:
                if name:
                    self.readers.setdefault(name, []).append(i)

    def is_const(self, name) -> bool:
        return bool(name) and name in self.consts

    def data_inputs(self, idx):
        return [n for n in self.nodes[idx].input if n and not self.is_const(n)]

    def only_reader(self, name):
        """The node reading ``name`` when there is exactly one, else ``None``."""
        r = self.readers.get(name, ())
        return r[0] if len(r) == 1 else None

    def const_op(self, idx, ops=("Mul", "Div", "Add", "Sub")) -> bool:
        """Node ``idx`` is an elementwise op of ``ops`` with one constant and one data operand."""
        n = self.nodes[idx]
        return n.op_type in ops and len(n.input) == 2 and len(self.data_inputs(idx)) == 1

    def prod(self, name):
        return self.producer.get(name) if name else None


def _argument_closure(g: _Graph, start: str, x: str):
    """Nodes computing ``start`` from ``x`` and constants with elementwise arithmetic only
    (``start == x``: none), or ``None`` when ``start`` needs anything else."""
    found, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name == x or g.is_const(name):
            continue
        idx = g.prod(name)
        if idx is None or g.nodes[idx].op_type not in _ARITH or len(found) >= _MAX_ARG:
            return None
        if idx not in found:
            found.add(idx)
            todo.extend(g.data_inputs(idx))
    return found


def _gated(g: _Graph, core: int):
    """``x * f(x)`` around the gate ``core`` (GELU erf/tanh, SiLU, Swish, QuickGELU,
    HardSwish): the set of its nodes, or ``None``."""
    node = g.nodes[core]
    if not node.input or not node.output:
        return None
    side, cur = [], node.output[0]
    # f's tail: constant ops after the gate (GELU's ``+ 1``, HardSwish's ``/ 6``)
    mul = None
    for _ in range(3):
        nxt = g.only_reader(cur)
        if nxt is None:
            return None
        if g.const_op(nxt):
            side.append(nxt)
            cur = g.nodes[nxt].output[0]
            continue
        if g.nodes[nxt].op_type == "Mul" and len(g.data_inputs(nxt)) == 2:
            mul = nxt
        break
    if mul is None:
        return None
    other = next(n for n in g.nodes[mul].input if n != cur)
    found = {core, mul, *side}
    # x, possibly through GELU's leading ``x * 0.5``
    candidates = [other]
    p = g.prod(other)
    if p is not None and g.const_op(p, ("Mul", "Div")):
        candidates.append(g.data_inputs(p)[0])
    for x in candidates:
        arg = _argument_closure(g, node.input[0], x)
        if arg is None:
            continue
        if x != other:
            found.add(p)
        found |= arg
        # GELU's trailing ``* 0.5`` (or HardSwish's ``/ 6``) after the product
        last = g.only_reader(g.nodes[mul].output[0])
        if last is not None and g.const_op(last, ("Mul", "Div")):
            found.add(last)
        return found
    return None


def _normalization(g: _Graph, reduce2: int):
    """LayerNorm ``(x - mean) / sqrt(var + eps) * gamma + beta`` or RMSNorm
    ``x / sqrt(mean(x^2) + eps) * gamma``, found from its second ``ReduceMean`` (the one
    over the square): the set of its nodes, or ``None``."""
    sq = g.prod(g.nodes[reduce2].input[0]) if g.nodes[reduce2].input else None
    if sq is None or g.nodes[sq].op_type not in ("Pow", "Mul"):
        return None
    d_inputs = g.data_inputs(sq)
    d = d_inputs[0] if d_inputs else None
    if d is None or any(n != d for n in d_inputs):
        return None
    found = {reduce2, sq}
    sub = g.prod(d)
    if sub is not None and g.nodes[sub].op_type == "Sub":
        x, mean = g.nodes[sub].input[0], g.nodes[sub].input[1]
        r1 = g.prod(mean)
        if r1 is not None and g.nodes[r1].op_type == "ReduceMean" and g.nodes[r1].input[0] == x:
            found |= {sub, r1}
    # var -> + eps -> Sqrt -> Div (or Reciprocal then Mul, or Pow -0.5 then Mul)
    cur = g.nodes[reduce2].output[0]
    norm = None
    for _ in range(4):
        nxt = g.only_reader(cur)
        if nxt is None:
            return None
        op = g.nodes[nxt].op_type
        if op in ("Div", "Mul") and d in g.nodes[nxt].input and cur in g.nodes[nxt].input:
            norm = nxt
            break
        if op in ("Add", "Sqrt", "Reciprocal", "Pow"):
            found.add(nxt)
            cur = g.nodes[nxt].output[0]
            continue
        return None
    if norm is None:
        return None
    found.add(norm)
    cur = g.nodes[norm].output[0]
    for _ in range(2):  # the affine tail: * gamma, + beta
        nxt = g.only_reader(cur)
        if nxt is None or not g.const_op(nxt, ("Mul", "Add")):
            break
        found.add(nxt)
        cur = g.nodes[nxt].output[0]
    return found


def protected_nodes(nodes: list[onnx.NodeProto], consts) -> set[int]:
    """Indices (into ``nodes``) of the nodes of every runtime-fused pattern.

    Parameters
    ----------
    nodes : list of onnx.NodeProto
        The graph's nodes.
    consts : mapping
        The tensors known to be constants (initializers and folded values), by name.

    Returns
    -------
    set of int
        The nodes of every gated activation (GELU in its erf and tanh forms, SiLU/Swish,
        QuickGELU, HardSwish written as ``x * clip(x + 3, 0, 6) / 6`` or with
        ``HardSigmoid``) and of every LayerNorm/RMSNorm decomposition, constant
        ``Mul``/``Add`` tails included.
    """
    g = _Graph(nodes, consts)
    out: set[int] = set()
    for i, n in enumerate(nodes):
        if n.domain not in ("", "ai.onnx"):
            continue
        found = None
        if n.op_type in _GATES:
            found = _gated(g, i)
        elif n.op_type == "ReduceMean":
            found = _normalization(g, i)
        if found:
            out |= found
    return out
