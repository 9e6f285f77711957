"""Issue 12: the numeric checks never pass falsely, never crash, never allocate without bound.

Non-finite outputs (items 1 and 15), outputs paired by name (19), ``input_shape``
validated against the declaration (20), bounded random inputs (10) and dynamic
spatial dimensions checked at a size that shows a border (2).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp import cli
from repnp.errors import ConversionError, ShapeError
from repnp.io.onnx import check
from repnp.io.onnx.check import DYNAMIC_SPATIAL, MAX_CHECK_ELEMENTS, compare_models, make_inputs
from repnp.io.onnx.verify import verify_models
from repnp.tolerance import compare_arrays, nonfinite_mismatch, relative_error, relative_error_masked


def _model(nodes, outputs, *, inits=(), shape=(1, 2, 3, 3), inputs=("x",), out_shape=None):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(out_shape or shape)) for n in outputs],
        initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scaled(scales, *, names=("y0", "y1"), order=None, shape=(1, 2, 3, 3)):
    """outputs ``names[i] = scales[i] * x``, listed in ``order`` (default: as given)."""
    inits = [numpy_helper.from_array(np.array(s, np.float32), f"s{i}") for i, s in enumerate(scales)]
    nodes = [helper.make_node("Mul", ["x", f"s{i}"], [n]) for i, n in enumerate(names)]
    listed = [names[i] for i in (order or range(len(names)))]
    return _model(nodes, listed, inits=inits, shape=shape)


def _divided(divisor):
    """y = x / divisor: a constant holding 0 gives +-inf (and NaN where x is 0) legitimately."""
    d = numpy_helper.from_array(np.asarray(divisor, np.float32).reshape(1, 2, 1, 1), "d")
    return _model([helper.make_node("Div", ["x", "d"], ["y"])], ["y"], inits=[d])


# --- the comparison rule (repnp.tolerance) ------------------------------------------------

def test_compare_arrays_non_finite_by_position_finite_by_metric():
    b = np.array([1.0, np.nan, np.inf, -np.inf, 4.0])
    assert compare_arrays(b.copy(), b, tol=0.0).passed
    a = b.copy()
    a[4] = 4.4                                     # finite part: 0.4 / 4 = 0.1
    res = compare_arrays(a, b, tol=1e-4)
    assert not res.passed and res.error == pytest.approx(0.1) and res.max_abs == pytest.approx(0.4)
    assert relative_error_masked(a, b) == pytest.approx(0.1)
    for bad, words in [(np.nan, "has NaN where the reference has +inf"),
                       (-np.inf, "has -inf where the reference has +inf"),
                       (7.0, "has a finite value where the reference has +inf")]:
        a = b.copy()
        a[2] = bad
        res = compare_arrays(a, b, tol=np.inf)     # no tolerance lets a different pattern pass
        assert not res.passed and res.error == np.inf and words in res.reason and "(2,)" in res.reason
    a = b.copy()
    a[0] = np.nan
    assert nonfinite_mismatch(a, b).startswith("has NaN where the reference is finite (at index (0,)")
    assert relative_error(b, b) == np.inf          # the strict metric keeps its documented rule


# --- item 1: NaN anywhere fails, with the reason -------------------------------------------

def test_nan_in_a_later_output_fails_and_says_where():
    res = verify_models(_scaled([1.0, 2.0]), _scaled([1.0, float("nan")]))
    assert not res.passed and res.max_error == np.inf
    assert res.reason.startswith("output 'y1' has NaN where the reference is finite")
    assert [r[0] for r in res.outputs] == ["y0", "y1"] and res.outputs[0][3] == 0.0
    assert res.to_dict()["reason"] == res.reason
    # the converter's check, and the metric order-independent: NaN in the first output too
    res = compare_models(_scaled([float("nan"), 2.0]), _scaled([1.0, 2.0]), tol=np.inf)
    assert not res.passed and "output 'y0' has a finite value where the reference has NaN" in res.reason


def test_cli_verify_names_the_output_with_nan(capsys, tmp_path):
    onnx.save(_scaled([1.0, 2.0]), str(tmp_path / "a.onnx"))
    onnx.save(_scaled([1.0, float("nan")]), str(tmp_path / "b.onnx"))
    code = cli.main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--json"])
    out = capsys.readouterr().out
    assert code == 1 and "output 'y1' has NaN where the reference is finite" in out


# --- item 15: legitimate Inf/NaN outputs ----------------------------------------------------

@pytest.mark.parametrize("model", [
    _divided([0.0, 2.0]),                                            # +-inf in channel 0
    _model([helper.make_node("Sqrt", ["x"], ["y"])], ["y"]),       # NaN where x < 0
    _model([helper.make_node("Sqrt", ["x"], ["r"]), helper.make_node("Identity", ["x"], ["y"])], ["r", "y"]),
], ids=["div-by-zero", "sqrt", "sqrt-first-output"])
def test_a_model_with_non_finite_outputs_equals_itself(model):
    res = verify_models(model, model)
    assert res.passed and res.max_error == 0.0 and res.reason is None


def test_same_non_finite_pattern_other_finite_values_is_measured():
    res = verify_models(_divided([0.0, 2.0]), _divided([0.0, 2.2]))   # channel 1: x/2 vs x/2.2
    assert not res.passed and res.max_error == pytest.approx(1 - 2 / 2.2, rel=1e-5)
    assert "largest in output 'y'" in res.reason
    res = verify_models(_divided([0.0, 2.0]), _divided([-0.0, 2.0]))  # +inf <-> -inf
    assert not res.passed and "where the reference has" in res.reason and "inf" in res.reason


# --- item 19: outputs paired by name --------------------------------------------------------

def test_outputs_listed_in_another_order_are_paired_by_name():
    a, b = _scaled([1.0, 2.0]), _scaled([1.0, 2.0], order=[1, 0])
    res = verify_models(a, b)
    assert res.passed and res.max_error == 0.0 and res.messages == []
    assert [r[0] for r in res.outputs] == ["y0", "y1"]
    assert not verify_models(a, _scaled([1.0, 2.5], order=[1, 0])).passed


def test_other_output_names_are_paired_by_position_and_said():
    res = verify_models(_scaled([1.0, 2.0]), _scaled([1.0, 2.0], names=("z0", "z1")))
    assert res.passed and [r[0] for r in res.outputs] == ["y0 vs z0", "y1 vs z1"]
    assert any("paired by position" in m and "'z0'" in m for m in res.messages)
    assert "paired by position" in str(res.to_dict()["messages"])
    with pytest.raises(ConversionError, match=r"1 and 2 outputs"):
        compare_models(_scaled([1.0], names=("y0",)), _scaled([1.0, 2.0]))


# --- item 20: input_shape validated against the declaration ----------------------------------

def test_input_shape_of_another_rank_or_fixed_dims_is_refused_by_name():
    dynamic = _model([helper.make_node("Relu", ["x"], ["y"])], ["y"], shape=("N", 4, "H", "W"))
    with pytest.raises(ShapeError, match=r"\[1, 4, 8\].*'x'.*\[\?, 4, \?, \?\]"):
        make_inputs(dynamic, input_shape=(1, 4, 8))
    with pytest.raises(ShapeError, match=r"'x' declared \[\?, 4, \?, \?\]: dimension 1 is fixed at 4, given 3"):
        make_inputs(dynamic, input_shape=(1, 3, 8, 8))
    with pytest.raises(ShapeError, match=r"names 'z', which is not a graph input"):
        make_inputs(dynamic, input_shape={"z": (1, 4, 8, 8)})
    with pytest.raises(ShapeError, match="positive integers"):
        make_inputs(dynamic, input_shape=(1, 4, 0, 8))
    assert make_inputs(dynamic, input_shape=(2, 4, 5, 6))["x"].shape == (2, 4, 5, 6)
    with pytest.raises(ShapeError, match=r"'x'"):
        verify_models(dynamic, dynamic, input_shape=(1, 4, 8))


def test_cli_verify_input_shape_of_another_rank_is_one_line(capsys, tmp_path):
    dynamic = _model([helper.make_node("Relu", ["x"], ["y"])], ["y"], shape=("N", 4, "H", "W"))
    onnx.save(dynamic, str(tmp_path / "a.onnx"))
    code = cli.main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx"), "--input-shape", "1,4,8"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("repnp: error:") and len(err.strip().splitlines()) == 1
    assert "'x'" in err and "[1, 4, 8]" in err and "declared [?, 4, ?, ?] (4 dimensions)" in err
    assert "tuple index" not in err and "graph inputs differ" not in err   # a model does not differ from itself


def test_inspect_input_shape_is_validated_the_same_way():
    from repnp.io.onnx.inspect import inspect_onnx

    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    conv = _model([helper.make_node("Conv", ["x", "w"], ["y"])], ["y"], inits=[w], shape=("N", 4, "H", "W"))
    with pytest.raises(ShapeError, match=r"'x'.*dimension 1 is fixed at 4, given 3"):
        inspect_onnx(conv, input_shape=(1, 3, 8, 8))


# --- item 10: bounded random inputs ----------------------------------------------------------

HUGE = (1, 1, 100000, 100000)


def test_a_declared_huge_input_is_refused_before_drawing():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], ["y"], shape=HUGE)
    with pytest.raises(ConversionError, match=r"'x' of shape \[1, 1, 100000, 100000\].*MAX_CHECK_ELEMENTS"):
        make_inputs(m)
    # the limit is over all inputs together
    half = (1, 1, 1, MAX_CHECK_ELEMENTS // 2 + 1)
    two = _model([helper.make_node("Add", ["x", "z"], ["y"])], ["y"], shape=half, inputs=("x", "z"))
    with pytest.raises(ConversionError, match=r"graph input 'z'"):
        check.input_shapes(two)


def test_convert_and_verify_refuse_a_huge_input_in_one_line(capsys, tmp_path):
    from repnp.io import convert_onnx

    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"])], ["y"], inits=[w], shape=HUGE)
    with pytest.raises(ConversionError, match="fixed in the model.*--no-check"):
        convert_onnx(m)
    src = tmp_path / "huge.onnx"
    onnx.save(m, str(src))
    for argv in (["convert", str(src), str(tmp_path / "out.onnx")], ["verify", str(src), str(src)]):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("repnp: error:") and "MAX_CHECK_ELEMENTS" in err
    assert not (tmp_path / "out.onnx").exists()
    dynamic = _model([helper.make_node("Relu", ["x"], ["y"])], ["y"], shape=("N", 4, "H", "W"))
    onnx.save(dynamic, str(tmp_path / "d.onnx"))
    code = cli.main(["verify", str(tmp_path / "d.onnx"), str(tmp_path / "d.onnx"),
                     "--input-shape", "1,4,200000,200000"])
    err = capsys.readouterr().err
    assert code == 2 and "smaller input_shape" in err and "[1, 4, 200000, 200000]" in err


# --- dynamic spatial dimensions: a size that shows a border ----------------------------------

def _conv3x3(kernel):
    w = numpy_helper.from_array(kernel.reshape(1, 1, 3, 3).astype(np.float32), "w")
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], ["y"], inits=[w],
                  shape=("N", 1, "H", "W"))


def test_dynamic_spatial_dims_default_to_a_size_that_shows_the_border():
    centre = np.zeros((3, 3))
    centre[1, 1] = 1.0
    wrong = centre.copy()
    wrong[0, 0] = 0.5          # only ever multiplies padding on a 1x1 image
    res = compare_models(_conv3x3(centre), _conv3x3(wrong))
    assert not res.passed
    assert res.input_shapes == {"x": (1, 1, DYNAMIC_SPATIAL, DYNAMIC_SPATIAL)} and DYNAMIC_SPATIAL >= 8
    assert any(f"checked at [1, 1, {DYNAMIC_SPATIAL}, {DYNAMIC_SPATIAL}]" in m for m in res.messages)
    # a given shape is used as is, and no note is added
    res = compare_models(_conv3x3(centre), _conv3x3(centre), input_shape=(2, 1, 5, 7))
    assert res.passed and res.input_shapes == {"x": (2, 1, 5, 7)} and res.messages == []


def test_convert_keeps_a_model_whose_outputs_hold_nan_and_inf():
    from repnp.io import convert_onnx

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "w")
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for v, n in
          [(rng.uniform(0.5, 1.5, 2), "g"), (rng.standard_normal(2), "b"), (rng.standard_normal(2), "m"),
           (rng.uniform(0.5, 2, 2), "v")]]
    d = numpy_helper.from_array(np.array([0.0, 2.0], np.float32).reshape(1, 2, 1, 1), "d")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
             helper.make_node("Sqrt", ["n"], ["r"]), helper.make_node("Div", ["n", "d"], ["q"])]
    model = _model(nodes, ["q", "r"], inits=[w, *bn, d])
    fused, report = convert_onnx(model)
    assert report.passed and report.check["reason"] is None and len(report.fused) == 1
