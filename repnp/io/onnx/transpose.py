"""An inference BatchNormalization after a ``ConvTranspose`` folded into it (ultralytics'
``ConvTranspose`` module and YOLO-seg's ``Proto`` upsampler: transposed conv, BN, activation).

onnxruntime fuses Conv+BN itself but not ConvTranspose+BN, so the fold saves a pass over the
largest map of the segmentation head; it removes one node and adds no MACs. The algebra is
:func:`repnp.fusion.fuse_bn_transposed`; :func:`fold_transposed_bn` runs on the rewritten
model (:mod:`repnp.io.onnx.rewrite`), whose numeric check then covers it like every fusion.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from repnp import fusion
from repnp.io.onnx import graph as og
from repnp.io.report import ConversionReport, Fused

__all__ = ["fold_transposed_bn"]

_FLOAT = (np.float16, np.float32, np.float64)


def _const(inits: dict, protected: set, name: str):
    if not name or name not in inits or name in protected:
        return None
    value = numpy_helper.to_array(inits[name])
    return value if value.dtype.type in _FLOAT else None


def _bn_params(node, inits, protected):
    """``(gamma, beta, mean, var, eps)`` of an inference BN with constant (C,) parameters, else ``None``."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 5 \
            or any(o for o in node.output[1:]) or og.node_attributes(node).get("training_mode", 0):
        return None
    params = [_const(inits, protected, n) for n in node.input[1:5]]
    if any(p is None or p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        return None
    return (*params, float(og.node_attributes(node).get("epsilon", 1e-5)))


def fold_transposed_bn(model: onnx.ModelProto, report: ConversionReport) -> int:
    """Fold every BatchNormalization that alone reads a 2-D ``ConvTranspose`` into it, in place.

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place: the ConvTranspose gets new weight and bias initializers and the
        BN's output; the BN node and the initializers nothing reads any more are removed.
    report : ConversionReport
        One :class:`~repnp.io.report.Fused` (kind ``ConvTranspose KxK``) is appended per fold.

    Returns
    -------
    int
        The number of folds.

    Notes
    -----
    Only a ConvTranspose whose weight (and bias, if any) are initializers that no graph input
    overrides, whose output is read by that one BN and is not a graph output, and a BN in
    inference mode whose four parameters are constant vectors of the ConvTranspose's output
    channels. Anything else is left as it is.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    protected = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in list(n.input) + sorted(og.subgraph_inputs(n)):
            if name:
                readers.setdefault(name, []).append(n)
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
        {n.name for n in graph.node}
    drop, added, count = set(), [], 0
    for ct in list(graph.node):
        if ct.op_type != "ConvTranspose" or ct.domain not in ("", "ai.onnx") or not ct.output[0] \
                or ct.output[0] in outputs:
            continue
        weight = _const(inits, protected, ct.input[1])
        bias = _const(inits, protected, ct.input[2]) if len(ct.input) > 2 and ct.input[2] else None
        if weight is None or weight.ndim != 4 or (len(ct.input) > 2 and ct.input[2] and bias is None):
            continue
        bns = readers.get(ct.output[0], [])
        if len(bns) != 1 or id(bns[0]) in drop:
            continue
        bn = bns[0]
        params = _bn_params(bn, inits, protected)
        groups = int(og.node_attributes(ct).get("group", 1))
        if params is None or groups < 1 or weight.shape[0] % groups or \
                params[0].shape != (weight.shape[1] * groups,):
            continue
        gamma, beta, mean, var, eps = params
        try:
            fused = fusion.fuse_bn_transposed(weight, bias, mean, var, gamma, beta, groups=groups, eps=eps)
        except ValueError:  # var + eps <= 0: the BN is not an affine map; leave it
            continue
        base = bn.output[0]
        w_name = og.unique_name(f"{base}.repnp_weight", taken)
        b_name = og.unique_name(f"{base}.repnp_bias", taken)
        added += [numpy_helper.from_array(np.ascontiguousarray(fused.kernel.astype(weight.dtype)), w_name),
                  numpy_helper.from_array(fused.bias.astype(weight.dtype), b_name)]
        merged = [og.text(ct.name), og.text(bn.name)]
        old_inputs = list(ct.input[1:]) + list(bn.input[1:])
        del ct.input[1:]
        ct.input.extend([w_name, b_name])
        ct.output[0] = bn.output[0]
        drop.add(id(bn))
        for name in old_inputs:
            readers[name] = [r for r in readers.get(name, []) if r is not ct and r is not bn]
        kh, kw = weight.shape[2:]
        report.fused.append(Fused(
            where=og.text(base), kind=f"ConvTranspose {kh}x{kw}", merged=merged,
            written=[og.text(ct.name), og.text(w_name), og.text(b_name)],
            detail={"weight_shape": [int(d) for d in weight.shape], "groups": groups,
                    "op_types": {"ConvTranspose": 1, "BatchNormalization": 1}}))
        count += 1
    if not count:
        return 0
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    still = {name for n in graph.node for name in n.input} | outputs
    for n in graph.node:
        still |= og.subgraph_inputs(n)
    keep = [t for t in graph.initializer if t.name in still or t.name in protected]
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    return count
