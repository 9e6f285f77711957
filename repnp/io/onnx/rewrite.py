"""Emission of the converted ONNX graph: each region the walker found becomes one Conv.

:func:`_rewrite` takes the regions of :class:`repnp.io.onnx.walk._Converter` and builds
the output model from the input's nodes and initializers (only those it keeps are copied)
plus the fused kernels, each written as an initializer and then released, so that the
peak memory stays near the input model plus the fused weights. It also folds a kept
node's input computed from constants only into an initializer (as the PyTorch exporter's
constant folding does) and turns readers of removed tensors into ``Constant`` nodes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
from onnx import numpy_helper

from repnp.errors import ConversionError
from repnp.io.onnx import fold as _fold
from repnp.io.onnx import gemm as _gemm
from repnp.io.onnx import graph as og
from repnp.io.onnx import transpose as _transpose
from repnp.io.onnx.channels_last import fold_channels_last
from repnp.io.onnx.regions import _compact_groups, _kernel, _Region, _View
from repnp.io.onnx.walk import _Converter
from repnp.io.report import ConversionReport, Fused


def _rewrite(model: onnx.ModelProto, conv: _Converter, regions, report: ConversionReport):
    """The new model: each region of ``regions`` (from :meth:`_Converter.run`) one Conv.

    Each region's Conv (plus a ``Reshape`` for an FC on a flat view) takes the place of
    its last node; the nodes it merged go, and so do the nodes the rewrite leaves dead,
    while nodes dead before stay. One :class:`~repnp.io.report.Fused` per region joins
    ``report.fused``.

    Returns
    -------
    (onnx.ModelProto, set of str)
        The model (nodes sorted) and the names of the initializers written here
        (right by construction, so :func:`repnp.io.onnx.graph.check_model_full` skips them).
    """
    graph = model.graph
    nodes = conv.nodes
    names = {o for n in nodes for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer} | {n.name for n in nodes}
    removed, anchors, new_inits = set(), {}, []
    position = {idx: pos for pos, idx in enumerate(conv.order)}
    for out_name, st in regions:
        view = st if isinstance(st, _View) else None
        if view is not None:
            st = view.region
            kernel, groups = _compact_groups(_kernel(st), st.groups)
            st = replace(st, kernel=kernel, groups=groups, nodes=view.nodes, scale=None)
        anchor = max(st.nodes, key=position.__getitem__)
        dtype = conv.out_dtype(out_name, st)
        w_name = og.unique_name(f"{out_name}.repnp_weight", names)
        b_name = og.unique_name(f"{out_name}.repnp_bias", names)
        # The arrays become TensorProtos only when the output is assembled, one at a
        # time, each released as soon as it is written (see _add_used_initializers).
        st.kernel, st.scale, st.bias = _kernel(st, dtype), None, st.bias.astype(dtype, copy=False)
        new_inits += [_NewInit(w_name, st, "kernel"), _NewInit(b_name, st, "bias")]
        base = og.text(nodes[anchor].name) or og.text(out_name)
        conv_name = og.unique_name(f"{base}/repnp_fused", names)
        kh, kw = st.kernel.shape[2:]
        conv_out = out_name if view is None else og.unique_name(f"{out_name}.repnp_fc", names)
        new = onnx.helper.make_node(
            "Conv", [st.source, w_name, b_name], [conv_out], name=conv_name,
            kernel_shape=[int(kh), int(kw)], strides=[int(s) for s in st.stride],
            dilations=[int(d) for d in st.dilation], pads=[int(p) for p in st.pads], group=int(st.groups))
        anchors[anchor] = [new]
        if view is not None:
            # The FC's output rows go back into the shape the sum had (batch axis -1).
            shape_name = og.unique_name(f"{out_name}.repnp_shape", names)
            new_inits.append(numpy_helper.from_array(np.array((-1,) + tuple(view.shape[1:]), np.int64),
                                                     shape_name))
            anchors[anchor].append(onnx.helper.make_node("Reshape", [conv_out, shape_name], [out_name],
                                                         name=og.unique_name(f"{conv_name}/reshape", names)))
        removed.update(st.nodes)
        written = [conv_name, w_name, b_name]
        if view is not None:
            written += [anchors[anchor][1].name, shape_name]
        report.fused.append(Fused(
            where=og.text(out_name), kind=f"Conv {int(kh)}x{int(kw)}",
            merged=[conv.name(i) for i in sorted(st.nodes, key=position.__getitem__)],
            written=[og.text(w) for w in written],
            detail={"source": og.text(st.source), "kernel_shape": [int(kh), int(kw)], "groups": int(st.groups),
                    "strides": list(map(int, st.stride)), "pads": list(map(int, st.pads)),
                    "dilations": list(map(int, st.dilation)),
                    "op_types": dict(Counter(nodes[i].op_type for i in st.nodes))}))
    was_live = og.live_nodes(graph)
    kept = []
    for idx in conv.order:
        if idx in anchors:
            kept.extend(anchors[idx])
        elif idx not in removed:
            kept.append((idx, nodes[idx]))
    outputs = [o.name for o in graph.output]

    def live_positions(items):
        return og.live_indices([n if isinstance(n, onnx.NodeProto) else n[1] for n in items], outputs)

    # Shape-only chains are folded whether or not anything was fused, so that every
    # export style (constant-folded or not) comes out the same.
    kept = _fold_computed_inputs(kept, live_positions(kept), conv, names, new_inits, report)
    out = _skeleton(model)
    live = live_positions(kept)
    final = []
    for pos, item in enumerate(kept):
        if isinstance(item, onnx.NodeProto):
            final.append((True, item))
        else:
            idx, node = item
            # Drop only what the rewrite made dead (e.g. DBB's shape chains);
            # nodes that were already dead pass through untouched.
            if pos in live or idx not in was_live:
                final.append((pos in live, node))
    repaired = _repair_readers(final, graph, new_inits, conv.consts)
    out.graph.node.extend(_constants_as_initializers(repaired, outputs, new_inits, report))
    _add_used_initializers(out, list(graph.initializer) + new_inits, report,
                           fold_inputs=conv.fold_input_initializers and bool(conv.input_initializers))
    # BN, affine ops and parallel heads around a Gemm (RepViT's BN_Linear and
    # distillation head) become one Gemm (repnp.io.onnx.gemm).
    gemms = _gemm.fold_linear(out, report, shapes=conv.shapes)
    if gemms:
        report.messages.append(f"{gemms} fully connected layers merged with the BN, affine ops or parallel "
                               f"layers around them (one Gemm each)")
    folded = fold_channels_last(out, report)     # UniRepLKNet's NHWC Linear, then BN / layer scale in NCHW
    if folded:
        report.messages.append(f"{folded} channels-last MatMul layers merged with the affine ops around them")
    # ConvTranspose + BN (ultralytics' ConvTranspose, YOLO-seg's Proto): repnp.io.onnx.transpose.
    if _transpose.fold_transposed_bn(out, report):
        report.messages.append("BatchNormalization folded into the ConvTranspose before it")
    merged = og.merge_equal_initializers(out, keep=conv.input_initializers)
    if merged:
        report.messages.append(f"{merged} initializers equal to another one dropped (their readers read that one)")
    used = {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input} | \
        {t.name for t in out.graph.initializer}
    keep_vi = [vi for vi in out.graph.value_info if vi.name in used]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep_vi)
    og.sort_nodes(out)
    return out, {t.name for t in new_inits if isinstance(t, _NewInit)}


class _NewInit:
    """An initializer the rewrite adds: written into the output model from the region's
    array, which is then dropped (the region keeps only its geometry)."""

    def __init__(self, name: str, region: _Region, attr: str) -> None:
        self.name, self.region, self.attr = name, region, attr

    def write_into(self, graph: onnx.GraphProto) -> None:
        array = np.ascontiguousarray(getattr(self.region, self.attr))
        setattr(self.region, self.attr, None)
        self.region = None
        if array.dtype in (np.float16, np.float32, np.float64):
            t = graph.initializer.add()
            t.name = self.name
            t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            t.dims.extend(array.shape)
            t.raw_data = numpy_helper.tobytes_little_endian(array)
        else:
            graph.initializer.append(numpy_helper.from_array(array, self.name))


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its nodes and initializers (copying the weights
    only to drop most of them would double the peak memory)."""
    return og.model_without(model)


#: Largest folded value (bytes) :func:`_fold_computed_inputs` writes as an initializer: a
#: chain that expands a small constant (``Expand``, ``Tile``, ``ConstantOfShape``) costs
#: less to run than to store, as simplifiers also judge (shape and index tensors are far
#: smaller).
FOLD_WRITE_LIMIT = 1 << 20


def _fold_computed_inputs(kept, live, conv, names, new_inits, report):
    """A data node's input computed from constants only (a Reshape target built by
    Shape/Gather/Unsqueeze/Concat on static shapes, or by Constant/Unsqueeze/Concat
    when the exporter did not fold) is written as an initializer, as the exporter's
    constant folding does, so that the chain computing it can go (values larger than
    :data:`FOLD_WRITE_LIMIT` bytes stay computed)."""
    derived = set()
    # An ``Identity`` of a constant initializer is that initializer: its readers read it
    # directly (the TorchScript exporter reads a tied weight through one Identity per use;
    # a copy per reader made rtdetr-l's output 18 MB larger and slower in onnxruntime).
    originals = {t.name for t in conv.graph.initializer}
    alias = {}
    for idx in conv.order:
        node = conv.nodes[idx]
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.output[0] in conv.consts:
            source = alias.get(node.input[0], node.input[0])
            if source in originals and source in conv.consts:
                alias[node.output[0]] = source
        if node.op_type == "Constant":
            continue
        for o in node.output:
            if o and o in conv.consts and (o in alias or np.asarray(conv.consts[o]).nbytes <= FOLD_WRITE_LIMIT):
                derived.add(o)
    written = {}    # derived name -> the initializer its readers read (one per value, not per reader)
    out, count = [], 0
    for pos, item in enumerate(kept):
        if isinstance(item, onnx.NodeProto):
            out.append(item)
            continue
        idx, node = item
        if pos not in live or all(o in conv.consts for o in node.output if o) or \
                not any(i in derived for i in node.input):
            out.append(item)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, name in enumerate(new.input):
            if name in derived:
                if name not in written:
                    if name in alias:
                        written[name] = alias[name]
                    else:
                        written[name] = og.unique_name(f"{name}.repnp_const", names)
                        new_inits.append(numpy_helper.from_array(np.asarray(conv.consts[name]), written[name]))
                        count += 1
                new.input[k] = written[name]
        out.append((idx, new))
    if count:
        report.messages.append(f"constant folding: {count} computed inputs of kept nodes written as initializers")
    return out


def _repair_readers(final, graph, new_inits, consts):
    """Nodes left reading a tensor the rewrite removed: a dead one goes, a live one
    whose outputs are all folded constants (a ``Shape`` of a fused intermediate)
    becomes initializers (``Constant`` nodes when an output is a graph output)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {t.name for t in new_inits}
    out = []
    for live, node in final:
        if all(i in available for i in node.input if i):
            out.append(node)
            available.update(o for o in node.output if o)
        elif live and all(o in consts for o in node.output if o):
            for o in node.output:
                if o:
                    # A Constant node; :func:`_constants_as_initializers` makes it an
                    # initializer unless it is a graph output.
                    out.append(onnx.helper.make_node("Constant", [], [o], name=f"{node.name}/repnp_folded",
                                                     value=numpy_helper.from_array(np.asarray(consts[o]), o)))
                    available.add(o)
        elif live:
            raise ConversionError(f"internal error: node {node.name!r} would read a removed tensor")
    return out


def _constants_as_initializers(nodes, outputs, new_inits, report):
    """``nodes`` with their ``Constant`` nodes written as initializers instead (as
    simplifiers do: a runtime then sees one weight, not a node to run).

    A ``Constant`` that is a graph output stays (an initializer cannot be one in every
    runtime); so does one holding a sparse tensor or strings, and any in a subgraph
    (their bodies are copied as they are)."""
    graph_outputs = set(outputs)
    out, count = [], 0
    for node in nodes:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1 and \
                node.output[0] not in graph_outputs:
            value = _fold.constant_value(node)
            if value is not None and value.dtype.kind in "biufc":
                new_inits.append(numpy_helper.from_array(np.asarray(value), node.output[0]))
                count += 1
                continue
        out.append(node)
    if count:
        report.messages.append(f"{count} Constant nodes written as initializers")
    return out


def _add_used_initializers(model: onnx.ModelProto, initializers, report: ConversionReport, *,
                           fold_inputs: bool = False) -> None:
    """Give ``model`` (nodes in place, no initializers yet) those of ``initializers`` it uses.

    ``fold_inputs``: the initializers listed as graph inputs were folded as constants
    (``convert_onnx(fold_input_initializers=True)``): those no node reads any more leave
    both the initializers and the graph inputs (kept, they would be dead inputs that
    override nothing)."""
    graph = model.graph
    used = set()
    for n in graph.node:
        used.update(i for i in n.input if i)
        used.update(og.subgraph_inputs(n))
    used.update(o.name for o in graph.output)
    input_names = {i.name for i in graph.input}
    legacy = model.ir_version < 4
    keep, dropped = [], []
    for t in initializers:
        # IR >= 4: an initializer listed as a graph input is an overridable default;
        # removing it would turn it into a required input, so it stays.
        if t.name in used or (t.name in input_names and not legacy and not fold_inputs):
            keep.append(t)
        else:
            dropped.append(t.name)
    for t in keep:
        if isinstance(t, _NewInit):
            t.write_into(graph)
        else:
            graph.initializer.append(t)
    keep = graph.initializer
    if fold_inputs and not legacy:
        gone = set(dropped) & input_names
        if gone:
            inputs = [i for i in graph.input if i.name not in gone]
            del graph.input[:]
            graph.input.extend(inputs)
            report.messages.append(f"fold_input_initializers: {len(gone)} initializers that were also graph "
                                   f"inputs were folded and removed from the graph inputs")
    if legacy:
        # IR < 3/4 lists every initializer as a graph input (the checker requires it):
        # removed ones leave the inputs, new ones join at the end.
        gone = set(dropped)
        inputs = [i for i in graph.input if i.name not in gone]
        listed = {i.name for i in inputs}
        for t in keep:
            if t.name not in listed:
                inputs.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del graph.input[:]
        graph.input.extend(inputs)
        left = [n for n in dropped if n in input_names]
        if left:
            report.messages.append(f"IR {model.ir_version} model: {len(left)} removed initializers also left "
                                   f"the graph inputs")

