"""Issue 13 item 6: exact folds around fully connected layers, as deploy graphs do them
(timm RepViT's ``BN_Linear`` and distillation head), checked against onnxruntime on
random weights and random BN statistics."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp import fusion
from repnp.errors import ShapeError
from repnp.io.onnx import convert_onnx

RNG = np.random.default_rng(6)
C, OUT, N = 6, 5, 3


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _bn_params(c):
    return (RNG.normal(0, 0.5, c), RNG.uniform(0.5, 2.0, c), RNG.uniform(0.5, 1.5, c), RNG.normal(0, 0.5, c))


def _bn(prefix, src, out, c, eps=1e-5):
    mean, var, gamma, beta = (p.astype(np.float32) for p in _bn_params(c))
    inits = [_init(f"{prefix}.g", gamma), _init(f"{prefix}.b", beta), _init(f"{prefix}.m", mean),
             _init(f"{prefix}.v", var)]
    node = helper.make_node("BatchNormalization", [src] + [f"{prefix}.{k}" for k in "gbmv"], [out],
                            name=prefix, epsilon=eps)
    return [node], inits


def _gemm(prefix, src, out, i, o, *, trans_b=1, alpha=1.0, beta=1.0):
    w = RNG.normal(0, 0.4, (o, i) if trans_b else (i, o)).astype(np.float32)
    b = RNG.normal(0, 0.4, o).astype(np.float32)
    node = helper.make_node("Gemm", [src, f"{prefix}.w", f"{prefix}.b"], [out], name=prefix, transB=trans_b,
                            alpha=alpha, beta=beta)
    return [node], [_init(f"{prefix}.w", w), _init(f"{prefix}.b", b)]


def _model(nodes, inits, *, c=C, o=OUT, outputs=("y",)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, c])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [N, o]) for n in outputs],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _converted(model, c=C):
    out, report = convert_onnx(model)
    x = RNG.standard_normal((N, c)).astype(np.float32)
    for a, b in zip(_run(out, x), _run(model, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert report.check["passed"]
    return out, report


def _ops(model):
    return Counter(n.op_type for n in model.graph.node)


# -- repnp.fusion.linear ---------------------------------------------------------


@pytest.mark.parametrize("bn_first", [True, False])
def test_fuse_bn_linear_matches_bn_and_linear(bn_first):
    w, b = RNG.normal(size=(OUT, C)), RNG.normal(size=OUT)
    mean, var, gamma, beta = _bn_params(C if bn_first else OUT)
    x = RNG.normal(size=(7, C))

    def bn(v):
        return (v - mean) / np.sqrt(var + 1e-3) * gamma + beta

    ref = bn(x) @ w.T + b if bn_first else bn(x @ w.T + b)
    fw, fb = fusion.fuse_bn_linear(w, b, mean, var, gamma, beta, eps=1e-3, bn_first=bn_first)
    np.testing.assert_allclose(x @ fw.T + fb, ref, rtol=1e-12, atol=1e-12)


def test_scale_and_add_linear():
    w1, b1, w2, b2 = RNG.normal(size=(OUT, C)), RNG.normal(size=OUT), RNG.normal(size=(OUT, C)), None
    x = RNG.normal(size=(4, C))
    w, b = fusion.add_linear((w1, b1), (w2, b2))
    w, b = fusion.scale_linear(w, b, 0.5)
    np.testing.assert_allclose(x @ w.T + b, ((x @ w1.T + b1) + x @ w2.T) / 2, rtol=1e-12, atol=1e-12)
    w32, b32 = fusion.scale_linear(w1.astype(np.float32), None, np.arange(OUT), 1.0)
    assert w32.dtype == b32.dtype == np.float32


def test_linear_rules_reject_wrong_shapes():
    with pytest.raises(ShapeError, match="matrix"):
        fusion.scale_linear(np.ones((2, 2, 1, 1)), None, 1.0)
    with pytest.raises(ShapeError, match=r"shape \(5,\)"):
        fusion.scale_linear(np.ones((5, 3)), None, np.ones(3))
    with pytest.raises(ShapeError, match="one shape"):
        fusion.add_linear((np.ones((2, 3)), None), (np.ones((3, 2)), None))
    with pytest.raises(ValueError, match="var"):
        fusion.fuse_bn_linear(np.ones((2, 3)), None, np.zeros(2), -np.ones(2), np.ones(2), np.zeros(2))


# -- the converter ----------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_then_gemm_is_one_gemm(trans_b):
    n1, i1 = _bn("bn", "x", "u", C, eps=1e-3)
    n2, i2 = _gemm("fc", "u", "y", C, OUT, trans_b=trans_b, alpha=0.7, beta=1.3)
    out, report = _converted(_model(n1 + n2, i1 + i2))
    assert _ops(out) == Counter({"Gemm": 1})
    assert [f.kind for f in report.fused] == ["Gemm"]
    assert report.fused[0].merged == ["bn", "fc"]


def test_gemm_then_bn_is_one_gemm():
    n1, i1 = _gemm("fc", "x", "u", C, OUT)
    n2, i2 = _bn("bn", "u", "y", OUT)
    out, _ = _converted(_model(n1 + n2, i1 + i2))
    assert _ops(out) == Counter({"Gemm": 1})


def test_repvit_distillation_head_is_one_gemm():
    # timm RepViT: BN_Linear head and head_dist on the pooled vector, averaged.
    nodes, inits = [], []
    for name in ("head", "head_dist"):
        n1, i1 = _bn(f"{name}.bn", "x", f"{name}.u", C)
        n2, i2 = _gemm(f"{name}.l", f"{name}.u", f"{name}.y", C, OUT)
        nodes += n1 + n2
        inits += i1 + i2
    inits.append(_init("two", np.array(2, np.float32)))
    nodes += [helper.make_node("Add", ["head.y", "head_dist.y"], ["s"], name="add"),
              helper.make_node("Div", ["s", "two"], ["y"], name="div")]
    model = _model(nodes, inits)
    # Each branch reads x through its own BN: two Gemms on x, then summed into one.
    out, report = _converted(model)
    assert _ops(out) == Counter({"Gemm": 1})
    assert len(out.graph.initializer) == 2


def test_parallel_heads_on_one_bn_and_a_difference():
    n0, i0 = _bn("bn", "x", "u", C)
    n1, i1 = _gemm("a", "u", "ya", C, OUT)
    n2, i2 = _gemm("b", "u", "yb", C, OUT, trans_b=0)
    nodes = n0 + n1 + n2 + [helper.make_node("Sub", ["ya", "yb"], ["d"], name="sub"),
                            helper.make_node("Mul", ["d", "k"], ["y"], name="mul")]
    inits = i0 + i1 + i2 + [_init("k", RNG.normal(size=OUT).astype(np.float32))]
    out, _ = _converted(_model(nodes, inits))
    # The two heads and the scale become one Gemm; the BN, read by that Gemm only then,
    # folds into it too.
    assert _ops(out) == Counter({"Gemm": 1})


def test_matmul_on_a_matrix_then_add_is_a_gemm():
    w = RNG.normal(size=(C, OUT)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["u"], name="add")]
    n2, i2 = _bn("bn", "u", "y", OUT)
    out, _ = _converted(_model(nodes + n2, [_init("w", w), _init("b", RNG.normal(size=OUT).astype(np.float32))] + i2))
    assert _ops(out) == Counter({"Gemm": 1})


def test_shared_or_output_tensors_are_not_folded():
    # The Gemm's output is also a graph output: folding the BN would lose it.
    n1, i1 = _gemm("fc", "x", "u", C, OUT)
    n2, i2 = _bn("bn", "u", "y", OUT)
    out, report = _converted(_model(n1 + n2, i1 + i2, outputs=("y", "u")))
    assert _ops(out) == Counter({"Gemm": 1, "BatchNormalization": 1})
    assert not report.fused


def test_a_non_broadcast_or_reversed_op_is_not_folded():
    n1, i1 = _gemm("fc", "x", "u", C, OUT)
    nodes = n1 + [helper.make_node("Div", ["k", "u"], ["y"], name="div")]  # k / y is not affine
    out, _ = _converted(_model(nodes, i1 + [_init("k", np.float32(3.0))]))
    assert _ops(out) == Counter({"Gemm": 1, "Div": 1})
    n1, i1 = _gemm("fc", "x", "u", C, OUT)
    nodes = n1 + [helper.make_node("Add", ["u", "k"], ["y"], name="add")]  # (N, OUT) constant: not a bias
    out, _ = _converted(_model(nodes, i1 + [_init("k", RNG.normal(size=(N, OUT)).astype(np.float32))]))
    assert _ops(out) == Counter({"Gemm": 1, "Add": 1})


def test_overridable_weights_are_not_folded():
    n1, i1 = _bn("bn", "x", "u", C)
    n2, i2 = _gemm("fc", "u", "y", C, OUT)
    model = _model(n1 + n2, i1 + i2)
    model.graph.input.append(helper.make_tensor_value_info("fc.w", TensorProto.FLOAT, [OUT, C]))
    out, _ = convert_onnx(model)
    assert _ops(out) == Counter({"Gemm": 1, "BatchNormalization": 1})


# -- official RepViT's Classfier as exporters write it -----------------------------


@pytest.mark.parametrize("average", ["Mul", "Div"])
@pytest.mark.parametrize("bias", [True, False])
def test_official_repvit_classfier_head_is_the_blocks_linear(average, bias):
    """Classfier (two BN_Linear heads, BatchNorm1d exported as BatchNormalization on the (N, C) vector,
    averaged by a Constant Mul 0.5 or Div 2) folds into one Gemm whose weights are
    RepVitClassifier.reparameterize()'s (official Classfier.fuse's algebra)."""
    from repnp.blocks import RepVitClassifier
    from repnp.blocks.base import BatchNorm
    from repnp.blocks.repvit import Linear, NormLinear

    rng = np.random.default_rng(14)
    heads, nodes, inits = [], [], []
    for name in ("classifier", "classifier_dist"):
        bn = BatchNorm(*(p.astype(np.float32) for p in _bn_params(C)), eps=1e-5)
        w = rng.normal(0, 0.4, (OUT, C)).astype(np.float32)
        b = rng.normal(0, 0.4, OUT).astype(np.float32) if bias else None
        heads.append(NormLinear(bn, Linear(w, b)))
        inits += [_init(f"{name}.g", bn.gamma), _init(f"{name}.b", bn.beta), _init(f"{name}.m", bn.mean),
                  _init(f"{name}.v", bn.var), _init(f"{name}.w", w)] + ([_init(f"{name}.c", b)] if bias else [])
        nodes += [helper.make_node("BatchNormalization", ["x"] + [f"{name}.{k}" for k in "gbmv"], [f"{name}.u"],
                                   epsilon=1e-5),
                  helper.make_node("Gemm", [f"{name}.u", f"{name}.w"] + ([f"{name}.c"] if bias else []),
                                   [f"{name}.y"], transB=1)]
    factor = np.array(0.5 if average == "Mul" else 2.0, np.float32)
    nodes += [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(factor)),
              helper.make_node("Add", ["classifier.y", "classifier_dist.y"], ["s"]),
              helper.make_node(average, ["s", "k"], ["y"])]
    model = _model(nodes, inits)
    out, report = _converted(model)
    assert _ops(out) == Counter({"Gemm": 1})
    fused = RepVitClassifier(heads[0], heads[1]).reparameterize()
    arrays = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    gemm = out.graph.node[0]
    np.testing.assert_allclose(arrays[gemm.input[1]], fused.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays[gemm.input[2]], fused.bias, rtol=1e-5, atol=1e-6)
    # first one head's BN folded into its Gemm, then the other head's BN, the sum and the average
    assert [f.detail["op_types"] for f in report.fused] == [
        {"BatchNormalization": 1, "Gemm": 1}, {"BatchNormalization": 1, "Gemm": 2, "Add": 1, average: 1}]
