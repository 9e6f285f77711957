"""An ONNX graph as an op list (:class:`repnp.trace.OpRecord`), for the cost model.

:func:`graph_ops` turns a model into the same records a block's ``trace``
produces, so :func:`repnp.cost.profile_ops` profiles an ONNX graph exactly as
it profiles a repnp block (``repnp inspect`` compares a model before and after
conversion this way). Its parameters are counted by
:func:`repnp.io.onnx.graph.count_params`, the one ONNX parameter count.

Conventions:

* shapes come from ONNX shape inference with the graph inputs made static
  (``input_shape``, dynamic dimensions 1);
* nodes that compute constants only — ``Constant``, ops on initializers, and
  the shape subgraphs PyTorch emits (``Shape``, a constant once the inputs
  are static, then ``Range``/``Expand``/``Where``...) — launch no kernel at
  run time (every runtime folds them when loading the model): they are left
  out;
* activation shapes that shape inference cannot tell (after a ``Pad`` whose
  pads a shape subgraph computes, say) are measured by one run of the model
  on a seeded random input (:func:`repnp.io.onnx.fold.probe_shapes`);
* an operator's weight bytes are the bytes of its constant inputs (4 per
  float element, the element size otherwise); MACs are counted for ``Conv``
  (``N*O*H_out*W_out*(C/groups)*kh*kw``), ``Gemm`` and ``MatMul`` (output
  elements times the reduced dimension) and ``AveragePool`` (one MAC per window
  tap, ``prod(output_shape) * prod(kernel_shape)``, padded taps included whatever
  ``count_include_pad`` says: the pool is counted as the depthwise conv of rule 6,
  as :mod:`repnp.cost` documents and the blocks' ``trace`` records it);
  element-wise ops count 0, as in :mod:`repnp.cost`;
* a node with several outputs (``Split``, ``TopK``, ``If``...) is one operator
  writing all of them (:attr:`repnp.trace.OpRecord.extra_outputs`); an
  ``If``/``Loop``/``Scan`` counts as one operator, its body's outer-scope reads
  as its inputs and its body's kernels not broken out (how often a ``Loop``
  body runs, and which ``If`` branch, is data): its MACs count 0.
"""

from __future__ import annotations

import numpy as np
import onnx

from repnp.io.onnx.graph import subgraph_inputs
from repnp.io.onnx.inputs import given_for, given_shape
from repnp.trace import OpRecord, TensorRef

__all__ = ["graph_ops"]

_ITEMSIZE = {onnx.TensorProto.DOUBLE: 4, onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 4,
             onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT8: 1,
             onnx.TensorProto.UINT8: 1, onnx.TensorProto.BOOL: 1}


def _dims(type_proto) -> tuple | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in type_proto.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _static_inputs(model: onnx.ModelProto, input_shape) -> onnx.ModelProto:
    """A copy whose graph inputs have fixed dimensions (``input_shape`` for the first one)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in out.graph.initializer}
    real = [vi for vi in out.graph.input if vi.name not in inits]
    for index, vi in enumerate(real):
        dims = vi.type.tensor_type.shape.dim
        given = given_for(input_shape, vi.name, index)
        if given is not None:
            # the check's rule: declared rank, fixed dims and positive integers (ShapeError naming the input)
            given = given_shape(vi, given)
        for k, d in enumerate(dims):
            value = int(given[k]) if given is not None else (d.dim_value if d.HasField("dim_value") else 1)
            d.Clear()
            d.dim_value = max(value, 1)
    return out


def graph_ops(model: onnx.ModelProto, *, input_shape=None) -> tuple[list[OpRecord], list[TensorRef]]:
    """The op list and graph inputs of an ONNX model (see the module docstring).

    Parameters
    ----------
    model : onnx.ModelProto
        Nodes in topological order (as :func:`repnp.io.convert_onnx` writes them).
    input_shape : tuple or dict, keyword-only, optional
        Shape of the first graph input (or name -> shape); dynamic dimensions default to 1.

    Returns
    -------
    (list of OpRecord, list of TensorRef)
        Ready for ``repnp.cost.profile_ops(ops, inputs)``.
    """
    static = _static_inputs(model, input_shape)
    try:
        inferred = onnx.shape_inference.infer_shapes(static, data_prop=True)
    except Exception:  # shape inference is a best effort: unknown shapes count as empty
        inferred = static
    graph = inferred.graph
    shapes: dict[str, tuple] = {}
    elem: dict[str, int] = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = _dims(vi.type)
        if dims is not None:
            shapes[vi.name] = dims
        elem[vi.name] = vi.type.tensor_type.elem_type
    constant = set()
    for t in graph.initializer:
        constant.add(t.name)
        shapes[t.name] = tuple(int(d) for d in t.dims)
        elem[t.name] = t.data_type
    inits = {t.name for t in graph.initializer}
    inputs = [TensorRef(vi.name, shapes.get(vi.name, ())) for vi in graph.input if vi.name not in inits]

    def nbytes(name: str) -> int:
        return int(np.prod(shapes.get(name, ()), dtype=np.int64)) * _ITEMSIZE.get(elem.get(name), 4)

    live = []
    for node in graph.node:
        # an If/Loop/Scan body reads outer-scope tensors: they are inputs of the node
        present = [n for n in node.input if n] + sorted(subgraph_inputs(node) - set(node.input))
        outputs = [o for o in node.output if o]
        if not outputs:
            continue
        if node.op_type in ("Constant", "Shape", "Size") or all(n in constant for n in present):
            constant.update(outputs)
            continue
        live.append((node, present, outputs))
    unknown = [n for _, present, outputs in live for n in present + outputs if n not in shapes]
    if unknown:
        from repnp.io.onnx.check import make_inputs
        from repnp.io.onnx.fold import probe_shapes

        shapes.update(probe_shapes(static, unknown, make_inputs(static)))
    ops: list[OpRecord] = []
    for node, present, outputs in live:
        acts = [n for n in present if n not in constant]
        weight_bytes = sum(nbytes(n) for n in present if n in constant)
        out = outputs[0]
        out_shape = shapes.get(out, ())
        macs = 0
        if node.op_type == "Conv" and len(present) > 1 and len(out_shape) >= 3:
            w = shapes.get(node.input[1], ())
            macs = int(np.prod(out_shape, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type == "AveragePool" and out_shape:
            # one MAC per window tap (repnp.cost's convention): the pool is the depthwise
            # conv of fusion.avgpool_kernel, whose MACs are prod(out) * kh * kw
            kernel = next((list(at.ints) for at in node.attribute if at.name == "kernel_shape"), [])
            macs = int(np.prod(out_shape, dtype=np.int64)) * int(np.prod(kernel, dtype=np.int64))
        elif node.op_type in ("Gemm", "MatMul") and out_shape:
            a = shapes.get(node.input[0], ())
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            if a:
                k = a[-2] if (trans_a and len(a) >= 2) else a[-1]
                macs = int(np.prod(out_shape, dtype=np.int64)) * int(k)
        ops.append(OpRecord(node.op_type, tuple(acts), out, tuple(shapes.get(n, ()) for n in acts),
                            tuple(out_shape), int(weight_bytes), int(macs), tuple(outputs[1:]),
                            tuple(tuple(shapes.get(n, ())) for n in outputs[1:])))
    return ops, inputs
