"""Graph plumbing (repnp.io.onnx_graph) and the numeric check (repnp.io.onnx_check)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp.errors import ConversionError
from repnp.io import onnx_graph as og
from repnp.io.onnx_check import compare_models, make_inputs, run_model


def _model(nodes, inits=(), *, shape=(1, 2, 3, 4), opset=17, out="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_topological_order_keeps_stored_order_when_possible():
    nodes = [helper.make_node("Relu", ["b"], ["y"], name="n0"),
             helper.make_node("Neg", ["x"], ["a"], name="n1"),
             helper.make_node("Abs", ["a"], ["b"], name="n2"),
             helper.make_node("Sigmoid", ["x"], ["c"], name="n3")]
    assert og.topological_order(_model(nodes).graph) == [1, 2, 0, 3]


def test_validate_graph_names_the_missing_tensor_and_duplicates():
    with pytest.raises(ConversionError, match="'n0'.*'ghost'"):
        og.validate_graph(_model([helper.make_node("Relu", ["ghost"], ["y"], name="n0")]).graph)
    twice = [helper.make_node("Relu", ["x"], ["y"], name="a"), helper.make_node("Neg", ["x"], ["y"], name="b")]
    with pytest.raises(ConversionError, match="defined twice"):
        og.validate_graph(_model(twice).graph)


def test_fold_constants_evaluates_shape_chains_but_not_data():
    """Shape(x) -> Gather(1) -> Unsqueeze -> Concat: the exporter's index arithmetic, folded
    from the static shape (1, 2, 3, 4); the Relu on x stays data."""
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([7], np.int64), "seven")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["c"]),
             helper.make_node("Unsqueeze", ["c", "axes"], ["cu"]),
             helper.make_node("Concat", ["cu", "seven"], ["shape2"], axis=0),
             helper.make_node("Relu", ["x"], ["y"])]
    m = _model(nodes, inits)
    order = og.topological_order(m.graph)
    consts = og.fold_constants(m, order, shapes=og.static_shapes(m))
    assert consts["s"].tolist() == [1, 2, 3, 4]
    assert consts["shape2"].tolist() == [2, 7]
    assert "y" not in consts and "x" not in consts


def test_fold_constants_leaves_dynamic_shapes_alone():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Relu", ["x"], ["y"])]
    m = _model(nodes, shape=("N", 2, 3, 4))
    consts = og.fold_constants(m, [0, 1], shapes=og.static_shapes(m))
    assert "s" not in consts


def test_live_nodes_stop_at_constants():
    inits = [numpy_helper.from_array(np.zeros((1, 2, 3, 4), np.float32), "z")]
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("ConstantOfShape", ["s"], ["zeros"], name="cos"),
             helper.make_node("Add", ["x", "zeros"], ["y"], name="add")]
    m = _model(nodes, inits)
    assert og.live_nodes(m.graph) == {0, 1, 2}
    assert og.live_nodes(m.graph, {"zeros"}) == {2}


def test_compare_models_uses_the_one_metric():
    """y = x versus y = 1.001 x: max|a - b| / max|b| = 0.001 exactly (up to float32)."""
    a = _model([helper.make_node("Identity", ["x"], ["y"])])
    b = _model([helper.make_node("Mul", ["x", "k"], ["y"])], [numpy_helper.from_array(np.float32(1.001), "k")])
    res = compare_models(a, b, tol=1e-4)
    assert res.max_rel == pytest.approx(0.001, rel=1e-4) and not res.passed
    assert res.to_dict()["input_shapes"] == {"x": [1, 2, 3, 4]}
    assert compare_models(a, a).max_abs == 0.0


@pytest.mark.parametrize("opset", [9, 13, 15])
def test_reference_engine_batchnorm_matches_formula(opset):
    rng = np.random.default_rng(0)
    c = 2
    gamma, beta, mean = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c)
    var = rng.uniform(0.5, 2, c)
    inits = [numpy_helper.from_array(v.astype(np.float32), n)
             for v, n in zip((gamma, beta, mean, var), ("g", "b", "m", "v"))]
    m = _model([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3)],
               inits, opset=opset)
    x = make_inputs(m, seed=3)["x"]
    expect = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-3) \
        * gamma[None, :, None, None] + beta[None, :, None, None]
    for engine in ("reference", "onnxruntime"):
        y = run_model(m, {"x": x}, engine=engine)[0][0]
        assert np.abs(y - expect).max() / np.abs(expect).max() <= 1e-6


def test_make_inputs_seeded_and_shaped():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], shape=("N", 2, 3, 4))
    a, b = make_inputs(m, seed=5), make_inputs(m, seed=5)
    assert a["x"].shape == (1, 2, 3, 4) and np.array_equal(a["x"], b["x"])
    assert make_inputs(m, input_shape=(3, 2, 3, 4))["x"].shape == (3, 2, 3, 4)
    assert make_inputs(m, input_shape={"x": (2, 2, 3, 4)})["x"].shape == (2, 2, 3, 4)
