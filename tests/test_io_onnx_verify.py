"""repnp.io.onnx.verify: two models compared on the same inputs (what ``repnp verify`` runs)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp.errors import ConversionError, ShapeError
from repnp.io.onnx.verify import check_same_inputs, feeds_from_array, graph_inputs, verify_models


def _two_outputs(second_scale: float, *, shape=(1, 2, 3, 3), name="x") -> onnx.ModelProto:
    """outputs (x, s * x): a model with two outputs whose second one can be made NaN."""
    s = numpy_helper.from_array(np.array(second_scale, np.float32), "s")
    nodes = [helper.make_node("Identity", [name], ["y0"]), helper.make_node("Mul", [name, "s"], ["y1"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("y0", "y1")],
                              initializer=[s])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_equal_models_pass_and_report_every_output():
    res = verify_models(_two_outputs(2.0), _two_outputs(2.0))
    assert res.passed and res.max_error == 0.0
    assert [o[0] for o in res.outputs] == ["y0", "y1"]


def test_nan_in_a_later_output_fails():
    res = verify_models(_two_outputs(2.0), _two_outputs(float("nan")))
    assert not res.passed and not np.isfinite(res.max_error)


def test_a_difference_in_the_second_output_fails():
    res = verify_models(_two_outputs(2.0), _two_outputs(2.1))
    assert not res.passed and res.max_error == pytest.approx(0.1 / 2.0, rel=1e-6)


def test_given_array_is_fed_and_checked():
    x = np.arange(18, dtype=np.float64).reshape(1, 2, 3, 3)
    feeds = feeds_from_array(_two_outputs(1.0), x)
    assert feeds["x"].dtype == np.float32 and np.array_equal(feeds["x"], x)
    with pytest.raises(ShapeError, match=r"\(1, 2, 4, 3\).*needs \(1, 2, 3, 3\)"):
        feeds_from_array(_two_outputs(1.0), np.zeros((1, 2, 4, 3)))


def test_inputs_that_cannot_take_the_same_feeds_are_refused_by_name():
    a, b = _two_outputs(1.0), _two_outputs(1.0, shape=(1, 2, 4, 4))
    assert graph_inputs(a) == {"x": ("float", [1, 2, 3, 3])}
    with pytest.raises(ShapeError, match=r"'x' is float \[1, 2, 3, 3\] in 'a' but float \[1, 2, 4, 4\] in 'b'"):
        check_same_inputs(a, b, {})
    with pytest.raises(ConversionError, match="has no input named 'x'"):
        check_same_inputs(a, _two_outputs(1.0, name="z"), {})
