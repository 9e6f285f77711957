"""The ONNX converter's folds around a channels-last ``MatMul`` (UniRepLKNet's FFN).

``Transpose(0,2,3,1) -> MatMul -> ... -> Add(beta) -> MatMul(W2) -> Transpose(0,3,1,2) ->
BatchNormalization -> Mul(gamma)``, built with ``onnx.helper``: GRN's beta, the BN and the layer
scale fold into ``MatMul -> Add(bias) -> Transpose`` (the official deploy graph), outputs equal
(onnxruntime, float32 1e-5). Before this pass the BN and the Mul were left.
"""

import collections

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from repnp.blocks.base import random_bn
from repnp.io import convert_onnx
from repnp.io.onnx.check import run_model
from repnp.testing import relative_error

C, F = 4, 12


def _model(*, transposed_weight=False, perm=(0, 3, 1, 2), bias_before=True, with_bn=True, w=6):
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    y = node("Transpose", ["x"], "nhwc", perm=[0, 2, 3, 1])
    y = node("MatMul", [y, const("w1", rng.standard_normal((C, F)) / 2)], "mm1")
    y = node("Relu", [y], "act")              # a nonlinearity between the two Linears
    if bias_before:
        y = node("Add", [y, const("beta", rng.standard_normal((1, 1, 1, F)))], "grn_beta")
    w2 = rng.standard_normal((F, C)) / 3
    if transposed_weight:
        w = node("Transpose", [const("w2t", w2.T)], "w2", perm=[1, 0])
    else:
        w = const("w2", w2)
    y = node("MatMul", [y, w], "mm2")
    y = node("Transpose", [y], "nchw", perm=list(perm))
    if with_bn:
        b = random_bn(rng, C, dtype=np.float32)
        y = node("BatchNormalization", [y] + [const(f"bn{i}", v) for i, v in
                                              enumerate((b.gamma, b.beta, b.mean, b.var))], "bn", epsilon=1e-6)
    y = node("Mul", [const("gamma", rng.uniform(0.5, 1.5, (C, 1, 1))), y], "scaled")
    node("Add", ["x", y], "out")
    graph = helper.make_graph(nodes, "cl", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 5, w])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, C, 5, w])],
                              initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _convert(model):
    w = model.graph.input[0].type.tensor_type.shape.dim[3].dim_value
    x = np.random.default_rng(1).standard_normal((1, C, 5, w)).astype(np.float32)
    fused, report = convert_onnx(model)
    assert report.check["passed"]
    assert relative_error(run_model(fused, {"x": x})[0][0], run_model(model, {"x": x})[0][0]) <= 1e-5
    return fused, report, collections.Counter(n.op_type for n in fused.graph.node)


def test_grn_beta_bn_and_layer_scale_fold_into_the_matmul():
    for transposed in (False, True):
        _, report, counts = _convert(_model(transposed_weight=transposed))
        assert counts == {"Transpose": 2, "MatMul": 2, "Relu": 1, "Add": 2}, counts
        assert any(f.kind == "MatMul (channels last)" for f in report.fused)


def test_without_bias_no_add_is_written():
    _, _, counts = _convert(_model(bias_before=False, with_bn=False))
    assert counts == {"Transpose": 2, "MatMul": 2, "Relu": 1, "Add": 1}, counts


def test_other_transposes_are_left():
    fused, _ = convert_onnx(_model(perm=(0, 3, 2, 1), w=5), check=False)   # (N, W, H, C) -> (N, C, H, W)
    counts = collections.Counter(n.op_type for n in fused.graph.node)
    assert counts["BatchNormalization"] == 1 and counts["Mul"] == 1 and counts["Add"] == 2
