"""Graph plumbing (repnp.io.onnx.graph, repnp.io.onnx.fold) and the numeric check (repnp.io.onnx.check)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp.errors import ConversionError
from repnp.io.onnx import graph as og
from repnp.io.onnx.check import compare_models, make_inputs, run_model
from repnp.io.onnx.fold import fold_constants


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
    consts = fold_constants(m, order, shapes=og.static_shapes(m))
    assert consts["s"].tolist() == [1, 2, 3, 4]
    assert consts["shape2"].tolist() == [2, 7]
    assert "y" not in consts and "x" not in consts


def test_fold_constants_leaves_dynamic_shapes_alone():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Relu", ["x"], ["y"])]
    m = _model(nodes, shape=("N", 2, 3, 4))
    consts = fold_constants(m, [0, 1], shapes=og.static_shapes(m))
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
    assert res.max_error == pytest.approx(0.001, rel=1e-4) and not res.passed
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


# ----------------------------------------------------------------------------
# the full check without serializing the weights, light copies, in-place sort
# ----------------------------------------------------------------------------

def _conv_model(*, ir=8, cout=64, listed=False):
    """x (1, 32, 5, 5) -> Conv with a (cout, 32, 3, 3) weight: > 4096 elements, a 'big' initializer."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((cout, 32, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), "b")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 5, 5])]
    if listed:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in (w, b)]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 5, 5])], [w, b])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7 if ir < 4 else 17)])
    m.ir_version = ir
    return m


def _checker_verdict(fn, m):
    try:
        fn(m)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("ir,listed", [(8, False), (8, True), (3, True)])
def test_check_model_full_agrees_with_onnx_checker(ir, listed):
    import onnx

    full = lambda m: onnx.checker.check_model(m, full_check=True)   # noqa: E731
    good = _conv_model(ir=ir, listed=listed)
    assert _checker_verdict(full, good) and _checker_verdict(og.check_model_full, good)
    # a big initializer whose raw data is short: the checker's storage check, done by repnp itself
    short = _conv_model(ir=ir, listed=listed)
    short.graph.initializer[0].raw_data = short.graph.initializer[0].raw_data[:-4]
    assert not _checker_verdict(full, short)
    with pytest.raises(ConversionError, match="'w'.*raw_data has"):
        og.check_model_full(short)
    # a conv whose weight does not match its declared output: shape inference (on the light copy)
    wrong = _conv_model(ir=ir, listed=listed)
    wrong.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 65
    assert not _checker_verdict(full, wrong) and not _checker_verdict(og.check_model_full, wrong)


def test_check_model_full_trusts_only_named_initializers():
    short = _conv_model()
    short.graph.initializer[0].raw_data = short.graph.initializer[0].raw_data[:-4]
    og.check_model_full(short, trusted={"w"})   # the caller vouches for it (built by from_array)
    with pytest.raises(ConversionError):
        og.check_model_full(short, trusted={"b"})


def test_ir3_initializer_missing_from_inputs_still_fails():
    m = _conv_model(ir=3, listed=True)
    del m.graph.input[1]      # "w" no longer a graph input: invalid below IR 4
    assert not _checker_verdict(og.check_model_full, m)


def test_check_initializer_storages():
    ok = helper.make_tensor("t", TensorProto.FLOAT, [2, 3], np.arange(6, dtype=np.float32).tolist())
    og.check_initializer(ok)
    few = TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[2, 3], float_data=[1.0, 2.0])
    with pytest.raises(ConversionError, match="float_data has 2 values.*needs 6"):
        og.check_initializer(few)
    empty = TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[2])
    with pytest.raises(ConversionError, match="no values"):
        og.check_initializer(empty)
    twice = TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[1], float_data=[1.0], raw_data=b"\0" * 4)
    with pytest.raises(ConversionError, match="twice"):
        og.check_initializer(twice)
    og.check_initializer(numpy_helper.from_array(np.zeros((3, 5), np.float16), "h"))
    og.check_initializer(numpy_helper.from_array(np.zeros(7, np.bool_), "flags"))


def test_light_model_and_model_without_keep_everything_but_the_weights():
    m = _conv_model()
    m.producer_name, m.doc_string = "p", "d"
    m.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 5, 5]))
    light = og.light_model(m)
    assert [t.name for t in light.graph.initializer] == ["b"]     # 64 elements: small, kept
    assert [i.name for i in light.graph.input] == ["x", "w"]
    assert list(light.graph.input[1].type.tensor_type.shape.dim[i].dim_value for i in range(4)) == [64, 32, 3, 3]
    bare = og.model_without(m)
    assert not bare.graph.node and not bare.graph.initializer
    assert (bare.producer_name, bare.doc_string, bare.ir_version) == ("p", "d", 8)
    assert len(bare.graph.value_info) == 1 and bare.opset_import == m.opset_import
    assert len(og.model_without(m, nodes=False).graph.node) == 1


def test_load_model_without_copy_and_sort_nodes_in_place():
    nodes = [helper.make_node("Relu", ["a"], ["y"], name="n0"), helper.make_node("Neg", ["x"], ["a"], name="n1")]
    m = _model(nodes)
    assert og.load_model(m, copy=False) is m
    copy = og.load_model(m)
    assert copy is not m and copy == m
    assert og.sort_nodes(m) is m and [n.name for n in m.graph.node] == ["n1", "n0"]
    assert [n.name for n in copy.graph.node] == ["n0", "n1"]     # the copy was not touched


def test_load_model_from_a_mapped_file_equals_onnx_load(tmp_path):
    import onnx

    m = _conv_model(cout=128)          # 147 KiB of weights: parsed from the memory map
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    loaded = og.load_model(path)
    assert loaded == onnx.load(path) and loaded.SerializeToString() == m.SerializeToString()
    empty = tmp_path / "empty.onnx"    # cannot be mapped: read, then refused as not ONNX
    empty.write_bytes(b"")
    with pytest.raises(ConversionError, match="not an ONNX model"):
        og.load_model(empty)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 100)
    with pytest.raises(ConversionError, match="not an ONNX model"):
        og.load_model(garbage)


def test_probe_shapes_outputs_shapes_not_the_tensors(monkeypatch):
    # Probing many intermediates must not keep them all alive: the probe run asks the
    # runtime for a Shape of each (a few int64s), and the tensors are freed as usual.
    from onnx import TensorProto, helper

    from repnp.io.onnx import check, fold

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Pad", ["a", "pads"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["y"])]
    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 2, 0, 0, 3, 4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [pads]),
                              opset_imports=[helper.make_opsetid("", 17)])
    seen = []
    real = check.run_model

    def spy(m, feeds, **kw):
        seen.append([o.name for o in m.graph.output])
        seen.append([n.op_type for n in m.graph.node if n.output[0] in seen[0]])
        return real(m, feeds, **kw)

    monkeypatch.setattr(check, "run_model", spy)
    feeds = {"x": np.ones((1, 2, 5, 6), np.float32)}
    shapes = fold.probe_shapes(model, ["a", "b", "y"], feeds)
    assert shapes == {"a": (1, 2, 5, 6), "b": (1, 2, 9, 12), "y": (1, 2, 9, 12)}
    assert seen[1] == ["Shape", "Shape", "Shape"] and not {"a", "b", "y"} & set(seen[0])
    # the caller's model is not modified
    assert [o.name for o in model.graph.output] == ["y"] and len(model.graph.node) == 3


def test_merge_equal_initializers_keeps_one_per_value():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    inits = [numpy_helper.from_array(a, "a"), numpy_helper.from_array(a.copy(), "a2"),
             numpy_helper.from_array(a.astype(np.float64), "a64"),          # other dtype: another value
             numpy_helper.from_array(a.reshape(3, 2), "a_t"),                # other dims: another value
             numpy_helper.from_array(a.copy(), "over"),                      # overridable: left alone
             numpy_helper.from_array(a + 1, "b")]
    nodes = [helper.make_node("MatMul", ["x", "a"], ["p"]), helper.make_node("MatMul", ["x", "a2"], ["q"]),
             helper.make_node("MatMul", ["x", "over"], ["r"]), helper.make_node("MatMul", ["x", "b"], ["s"]),
             helper.make_node("Cast", ["a64"], ["c64"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["a_t", "shape"], ["t"]),
             helper.make_node("Sum", ["p", "q", "r", "s", "c64", "t"], ["y"])]
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "shape"))
    m = _model(nodes, inits, shape=(2, 2))
    before = run_model(m, {"x": np.ones((2, 2), np.float32)})[0][0]
    assert og.merge_equal_initializers(m, keep={"over"}) == 1
    names = [t.name for t in m.graph.initializer]
    assert "a2" not in names and {"a", "a64", "a_t", "over", "b", "shape"} <= set(names)
    assert [n.input[1] for n in m.graph.node[:4]] == ["a", "a", "over", "b"]
    after = run_model(m, {"x": np.ones((2, 2), np.float32)})[0][0]
    np.testing.assert_array_equal(after, before)
    assert og.merge_equal_initializers(m) == 1          # without keep=, "over" joins "a"
