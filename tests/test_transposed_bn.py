"""Issue 13 (real networks), item 3: an inference BN folded into the ConvTranspose before it.

The rule (:func:`repnp.fusion.fuse_bn_transposed`) is checked against onnxruntime's own
``ConvTranspose`` + ``BatchNormalization`` over strides, pads, output padding, groups and
dilations; the ONNX converter folds the pair (ultralytics' ``ConvTranspose`` module, YOLO-seg's
``Proto``), and leaves it when the fold would not be exact or not alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from repnp import fusion
from repnp.errors import ShapeError
from repnp.io import convert_onnx
from repnp.tolerance import FLOAT32, relative_error

ort = pytest.importorskip("onnxruntime")


def _bn_params(rng, c):
    return {"gamma": rng.random(c) + 0.5, "beta": rng.standard_normal(c), "mean": rng.standard_normal(c) * 0.3,
            "var": rng.random(c) * 1.5 + 0.5}


def _model(nodes, inits, x_shape, y_shape=None, outputs=("y",)):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [oh.make_tensor_value_info(o, TensorProto.FLOAT, y_shape) for o in outputs], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _ct_attrs(stride, pad, out_pad, groups, dilation):
    return {"strides": [stride, stride], "pads": [pad, pad, pad, pad], "output_padding": [out_pad, out_pad],
            "group": groups, "dilations": [dilation, dilation]}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2),
       groups=st.sampled_from([1, 2, 3]), dilation=st.integers(1, 2), bias=st.booleans(),
       out_pad_wanted=st.booleans(), eps=st.sampled_from([1e-5, 1e-3]))
def test_fuse_bn_transposed_matches_onnxruntime(seed, k, stride, pad, groups, dilation, bias, out_pad_wanted, eps):
    rng = np.random.default_rng(seed)
    pad = min(pad, dilation * (k - 1))  # ONNX needs the pads inside the dilated kernel's reach
    out_pad = 1 if out_pad_wanted and stride > 1 else 0  # output_padding < stride (or dilation)
    cin, per_group = 2 * groups, int(rng.integers(1, 4))
    cout = per_group * groups
    w = rng.standard_normal((cin, per_group, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if bias else None
    bn = _bn_params(rng, cout)
    attrs = _ct_attrs(stride, pad, out_pad, groups, dilation)
    x = rng.standard_normal((1, cin, 5, 6)).astype(np.float32)
    ct_in = ["x", "w", "b"] if bias else ["x", "w"]
    inits = {"w": w, **({"b": b} if bias else {}), **bn}
    reference = _model([oh.make_node("ConvTranspose", ct_in, ["t"], **attrs),
                        oh.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"],
                                     epsilon=eps)], inits, x.shape)
    kernel, fused_bias = fusion.fuse_bn_transposed(w, b, bn["mean"], bn["var"], bn["gamma"], bn["beta"],
                                                   groups=groups, eps=eps)
    assert kernel.shape == w.shape and kernel.dtype == np.float32 and fused_bias.shape == (cout,)
    fused = _model([oh.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)],
                   {"w": kernel, "b": fused_bias}, x.shape)
    (want,), (got,) = _run(reference, x), _run(fused, x)
    assert relative_error(got, want) <= FLOAT32 * 10


def test_fuse_bn_transposed_scales_output_channels_not_input_channels():
    # C_in != C_out and groups = 2: scaling axis 0 (a conv's output axis) would be wrong
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 2, 2))
    bn = _bn_params(rng, 6)
    kernel, bias = fusion.fuse_bn_transposed(w, None, bn["mean"], bn["var"], bn["gamma"], bn["beta"], groups=2)
    t, s = fusion.bn_scale_shift(bn["mean"], bn["var"], bn["gamma"], bn["beta"])
    for o in range(6):
        g, j = divmod(o, 3)
        np.testing.assert_allclose(kernel[2 * g:2 * g + 2, j], w[2 * g:2 * g + 2, j] * t[o], rtol=1e-14)
    np.testing.assert_allclose(bias, s, rtol=1e-14)


def test_fuse_bn_transposed_rejects_bad_shapes():
    rng = np.random.default_rng(2)
    bn = _bn_params(rng, 5)
    with pytest.raises(ShapeError, match="5"):
        fusion.fuse_bn_transposed(rng.standard_normal((4, 3, 2, 2)), None, bn["mean"], bn["var"], bn["gamma"],
                                  bn["beta"])
    with pytest.raises(ShapeError, match="divisible"):
        fusion.fuse_bn_transposed(rng.standard_normal((3, 5, 2, 2)), None, bn["mean"], bn["var"], bn["gamma"],
                                  bn["beta"], groups=2)


def _proto_like(rng, *, bn_reads_twice=False, bn_output=False):
    """ultralytics ``ConvTranspose(c1, c2, 2, 2, 0, bn=True)``: ConvTranspose (no bias), BN, SiLU."""
    cin, cout = 8, 6
    inits = {"w": rng.standard_normal((cin, cout, 2, 2)) * 0.3, **_bn_params(rng, cout)}
    nodes = [oh.make_node("ConvTranspose", ["x", "w"], ["t"], strides=[2, 2], name="ct"),
             oh.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3,
                          name="bn"),
             oh.make_node("Sigmoid", ["bn"], ["s"]), oh.make_node("Mul", ["bn", "s"], ["y"])]
    outputs = ["y"]
    if bn_reads_twice:
        nodes.append(oh.make_node("Relu", ["t"], ["r"]))
        outputs.append("r")
    if bn_output:
        outputs.append("bn")
    return _model(nodes, inits, (1, cin, 5, 5), [1, cout, 10, 10], outputs)


def test_convert_onnx_folds_bn_into_conv_transpose():
    # Regression (issue 13): the BN after a ConvTranspose stayed a node (onnxruntime does not fuse it).
    model = _proto_like(np.random.default_rng(3))
    out, report = convert_onnx(model)
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["ConvTranspose", "Sigmoid", "Mul"]
    assert report.check["passed"] and report.check["max_error"] <= 1e-5
    assert any(f.kind == "ConvTranspose 2x2" for f in report.fused)
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(4).standard_normal((1, 8, 5, 5)).astype(np.float32)
    assert relative_error(_run(out, x)[0], _run(model, x)[0]) <= FLOAT32


@pytest.mark.parametrize("kind", ["read_twice", "bn_is_output"])
def test_convert_onnx_folds_only_what_it_may(kind):
    model = _proto_like(np.random.default_rng(5), bn_reads_twice=kind == "read_twice")
    if kind == "bn_is_output":
        model.graph.output.append(oh.make_tensor_value_info("t", TensorProto.FLOAT, [1, 6, 10, 10]))
    out, report = convert_onnx(model)
    ops = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" in ops and report.check["passed"]
