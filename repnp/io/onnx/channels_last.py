"""Exact folds around a channels-last Linear (``MatMul`` on NHWC, then back to NCHW), as
UniRepLKNet's ``UniRepLKNetBlock.reparameterize`` does them.

The official block runs its FFN channels-last: ``Transpose(0,2,3,1) -> Linear -> GELU -> GRN ->
Linear (no bias) -> Transpose(0,3,1,2) -> BatchNorm -> * gamma``; exported, each Linear is a
``MatMul`` by an (F, C) constant (``Transpose`` of the weight when constants are not folded) and
an ``Add`` of its bias. Around such a ``MatMul`` this pass folds, exactly (rules 1 and 2 for a
linear layer, :func:`repnp.fusion.scale_linear`):

* before it: ``Add``/``Sub``/``Mul``/``Div`` by a constant along the last axis (GRN's ``beta``:
  ``W (u + beta) = W u + W beta``);
* after it: the same ops along the last axis, then through ``Transpose(perm=[0, 3, 1, 2])``,
  ``BatchNormalization`` and ``Mul``/``Div``/``Add``/``Sub`` by per-channel constants (the BN
  and the layer scale).

The result is ``MatMul -> Add(bias) -> Transpose``: the official deploy graph's nodes, fewer than
before (never slower). GRN's input-dependent part (``gamma N(x) x``) is not linear and stays.
Runs on the rewritten model, like :func:`repnp.io.onnx.gemm.fold_linear`; the converter's
numeric check covers it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from repnp import fusion
from repnp.io.onnx import graph as og
from repnp.io.onnx.gemm import _bn, _Graph
from repnp.io.report import ConversionReport, Fused

__all__ = ["fold_channels_last"]

_TO_NCHW = [0, 3, 1, 2]


def _last_axis(value, size):
    """A constant broadcasting along the last axis only: shape (size,) or (1, ..., 1, size)."""
    if value is None or value.ndim == 0 or value.shape[-1] != size or any(d != 1 for d in value.shape[:-1]) \
            or value.ndim > 4:
        return None
    return np.asarray(value, np.float64).reshape(-1)


def _channel(value, size):
    """A per-channel constant of an NCHW tensor: shape (C, 1, 1) or (1, C, 1, 1)."""
    if value is None or value.ndim not in (3, 4) or value.size != size or value.shape[-2:] != (1, 1):
        return None
    return np.asarray(value, np.float64).reshape(-1)


def _affine(g, node, inp, size, as_vector):
    """``(scale, shift)`` of ``node`` = an elementwise op of ``inp`` with a constant, else ``None``."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Add", "Sub", "Mul", "Div") or \
            len(node.input) != 2 or list(node.input).count(inp) != 1:
        return None
    pos = list(node.input).index(inp)
    c = as_vector(g.const(node.input[1 - pos]), size)
    if c is None:
        return None
    if node.op_type == "Mul":
        return c, None
    if node.op_type == "Div":
        return (1.0 / c, None) if pos == 0 and np.all(c != 0) else None
    if node.op_type == "Add":
        return 1.0, c
    return (1.0, -c) if pos == 0 else (-1.0, c)


def _weight(g, node):
    """``(B, transpose node or None)``: the MatMul's constant (F, C) right operand."""
    b = g.const(node.input[1])
    if b is not None:
        return (b, None) if b.ndim == 2 else (None, None)
    prod = g.producer.get(node.input[1])
    if prod is None or prod.op_type != "Transpose" or g.only_reader(node.input[1]) is not node:
        return None, None
    perm = list(og.node_attributes(prod).get("perm", [1, 0]))
    w = g.const(prod.input[0])
    if w is None or w.ndim != 2 or perm != [1, 0]:
        return None, None
    return w.T, prod


def _match(g: _Graph, node):
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    b, wt = _weight(g, node)
    if b is None:
        return None
    dtype = b.dtype
    weight, bias = b.T.astype(np.float64), np.zeros(b.shape[1])
    f, c = b.shape
    source, before = node.input[0], []
    while g.only_reader(source) is (before[0] if before else node):
        prod = g.producer.get(source)
        if prod is None:
            break
        other = next((i for i in prod.input if g.const(i) is None), None)
        st = _affine(g, prod, other, f, _last_axis) if other is not None else None
        if st is None:
            break
        weight, bias = fusion.scale_linear(weight, bias, st[0], st[1], before=True)
        before.insert(0, prod)
        source = other
    after, transpose, out = [], None, node.output[0]
    while True:
        reader = g.only_reader(out)
        if reader is None:
            break
        if transpose is None and reader.op_type == "Transpose" and \
                list(og.node_attributes(reader).get("perm", [])) == _TO_NCHW:
            transpose, out = reader, reader.output[0]
            after.append(reader)
            continue
        if transpose is not None and reader.op_type == "BatchNormalization" and reader.input[0] == out:
            st = _bn(g, reader)
            if st is None or st[0].shape != (c,):
                break
        else:
            st = _affine(g, reader, out, c, _channel if transpose is not None else _last_axis)
            if st is None:
                break
        weight, bias = fusion.scale_linear(weight, bias, st[0], st[1])
        after.append(reader)
        out = reader.output[0]
    while after and after[-1] is transpose:     # nothing folded after the transpose: it stays as it is
        after.pop()
        transpose, out = None, after[-1].output[0] if after else node.output[0]
    written = 1 + bool(np.any(bias != 0)) + (transpose is not None)
    if len(before) + len(after) + 1 <= written:     # only if it removes nodes (never slower)
        return None
    if not before and transpose is None and all(n.op_type in ("Add", "Sub") for n in after):
        # Only bias additions after the MatMul: runtimes fuse MatMul -> Add into one GEMM
        # themselves (onnxruntime's MatMulAddFusion); merging two bias Adds, or dropping a
        # zero bias, would break that pattern for no MACs saved (rtdetr-l: 34 MatMuls left
        # unfused, the transposes before 7 of them folded into slower FusedMatMuls).
        return None
    nodes = before + ([wt] if wt is not None else []) + [node] + after
    return source, weight, bias, dtype, transpose, out, nodes


def fold_channels_last(model: onnx.ModelProto, report: ConversionReport, *, shapes=None) -> int:
    """Fold, in place, the affine ops around every channels-last ``MatMul``; return how many.

    Parameters
    ----------
    model : onnx.ModelProto
        The rewritten model. IR < 4 models are left alone (initializers are inputs there).
    report : ConversionReport
        One :class:`~repnp.io.report.Fused` (``kind="MatMul (channels last)"``) per fold.
    shapes : dict, keyword-only, optional
        Unused (the ops folded need no shape: last-axis constants and the NCHW transpose say it).
    """
    if model.ir_version < 4:
        return 0
    count = 0
    while True:
        g = _Graph(model, shapes or {})
        found = next((m for m in (_match(g, n) for n in g.nodes) if m is not None), None)
        if found is None:
            return count
        _replace(model, g, found, report)
        count += 1


def _replace(model, g, found, report) -> None:
    source, weight, bias, dtype, transpose, out, nodes = found
    graph = model.graph
    taken = set(g.inits) | set(g.producer) | {n.name for n in graph.node} | {i.name for i in graph.input}
    w_name = og.unique_name(f"{out}.repnp_weight", taken)
    taken.add(w_name)
    b_name = og.unique_name(f"{out}.repnp_bias", taken)
    taken.add(b_name)
    base = og.text(nodes[-1].name) or og.text(out)
    new, mid = [], og.unique_name(f"{out}.repnp_matmul", taken)
    taken.add(mid)
    has_bias = bool(np.any(bias != 0))
    last = out if transpose is None and not has_bias else mid
    new.append(onnx.helper.make_node("MatMul", [source, w_name], [last],
                                     name=og.unique_name(f"{base}/repnp_matmul", taken)))
    if has_bias:
        biased = out if transpose is None else og.unique_name(f"{out}.repnp_biased", taken)
        new.append(onnx.helper.make_node("Add", [last, b_name], [biased],
                                         name=og.unique_name(f"{base}/repnp_bias_add", taken)))
        last = biased
    if transpose is not None:
        new.append(onnx.helper.make_node("Transpose", [last], [out], perm=_TO_NCHW,
                                         name=og.unique_name(f"{base}/repnp_transpose", taken)))
    inits = [numpy_helper.from_array(np.ascontiguousarray(weight.T.astype(dtype)), w_name)]
    if has_bias:
        inits.append(numpy_helper.from_array(bias.astype(dtype), b_name))
    og.replace_nodes(model, nodes, new, inits, keep=g.protected)
    og.sort_nodes(model)
    report.fused.append(Fused(
        where=og.text(out), kind="MatMul (channels last)", merged=[og.text(n.name) for n in nodes],
        written=[og.text(n.name) for n in new],
        detail={"source": og.text(source), "weight_shape": [int(s) for s in weight.T.shape],
                "op_types": dict(Counter(n.op_type for n in nodes))}))
