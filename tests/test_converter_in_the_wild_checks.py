"""Issue 13, items 2-4: ``inspect`` on multi-output nodes and subgraphs, the check past
data-dependent ops (TopK...), and dynamic height/width checked at a size that shows borders.

Every model is built with ``onnx.helper``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from repnp.cli import main

OPSET = [helper.make_opsetid("", 17)]


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=()):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=OPSET)
    onnx.checker.check_model(m)
    return m


# --- item 2: inspect reads every output of a multi-output node, and If/Loop bodies -----------

def _split_add():
    split = numpy_helper.from_array(np.array([2, 2], np.int64), "split")
    nodes = [helper.make_node("Split", ["x", "split"], ["a", "b"], axis=1),
             helper.make_node("Add", ["a", "b"], ["y"])]
    return _model(nodes, [_vi("x", [1, 4, 8, 8])], [_vi("y", [1, 2, 8, 8])], [split])


def test_inspect_counts_a_split_read_twice_as_one_operator_with_two_outputs():
    from repnp.io.onnx.inspect import inspect_onnx

    _, cmp = inspect_onnx(_split_add())
    for prof in (cmp.train, cmp.deploy):
        assert prof.op_types() == {"Split": 1, "Add": 1}
        split = prof.ops[0]
        assert split.op.outputs == ("a", "b") and split.bytes_written == 2 * 2 * 64 * 4
        # x (1 KiB) and both halves alive while Split runs; the Add reads both and frees them
        assert split.live_bytes == 4 * 64 * 4 + 2 * 2 * 64 * 4
        assert prof.ops[1].resident_bytes == 2 * 64 * 4


def test_cli_inspect_exits_0_on_split_then_add(tmp_path, capsys):
    path = tmp_path / "split.onnx"
    onnx.save(_split_add(), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "operators" in out


def test_inspect_counts_an_if_as_one_operator_reading_its_body_outer_tensors():
    from repnp.io.onnx.inspect import inspect_onnx

    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [_vi("t", [1, 4, 8, 8])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", [1, 4, 8, 8])])
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y0"], then_branch=then_g, else_branch=else_g),
             helper.make_node("TopK", ["y0", "k"], ["v", "i"], axis=1),
             helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["v", "fi"], ["y"])]
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    m = _model(nodes, [_vi("x", [1, 4, 8, 8])], [_vi("y", [1, 2, 8, 8])], [zero, k])
    _, cmp = inspect_onnx(m)
    assert cmp.train.op_types() == {"ReduceSum": 1, "Greater": 1, "If": 1, "TopK": 1, "Cast": 1, "Add": 1}
    if_op = cmp.train.ops[2].op
    assert set(if_op.inputs) == {"c", "x"}      # the body reads x: x stays alive until the If


# --- item 4: dynamic height/width checked where the deepest conv sees a border and an interior ---

def _strided_chain(last_kernel):
    """Five stride-2 3x3 convs (a stride of 32, as a ResNet's) then a 3x3 conv, H and W dynamic."""
    rng = np.random.default_rng(4)
    nodes, inits, t = [], [], "x"
    for i in range(5):
        w = numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [t, f"w{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]))
        t = f"c{i}"
    inits.append(numpy_helper.from_array(last_kernel.astype(np.float32), "wl"))
    nodes.append(helper.make_node("Conv", [t, "wl"], ["y"], pads=[1, 1, 1, 1]))
    return _model(nodes, [_vi("x", ["N", 2, "H", "W"])], [_vi("y", ["N", 2, "h", "w"])], inits)


def test_verify_checks_dynamic_spatial_dims_where_the_last_conv_sees_its_border(tmp_path):
    from repnp.io.onnx.check import DYNAMIC_SPATIAL_MAX, spatial_check_size
    from repnp.io.onnx.verify import verify_models

    right = np.random.default_rng(5).standard_normal((2, 2, 3, 3))
    wrong = right.copy()
    wrong[:, :, 0, 0] += 0.5       # a border tap: only ever multiplies padding on a 1x1 map
    a, b = _strided_chain(right), _strided_chain(wrong)
    size = spatial_check_size(a)
    assert size == 192 and size <= DYNAMIC_SPATIAL_MAX      # 2 * (3 taps * stride 32)
    res = verify_models(a, b)
    assert not res.passed, res
    assert res.input_shapes == {"x": (1, 2, 192, 192)}
    assert any("checked at [1, 2, 192, 192]" in m for m in res.messages)
    assert verify_models(a, _strided_chain(right)).passed
    # the CLI says which shape was used
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    assert main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]) == 1


def test_convert_reports_the_dynamic_spatial_shape_it_checked_at():
    from repnp.io import convert_onnx

    m = _strided_chain(np.random.default_rng(6).standard_normal((2, 2, 3, 3)))
    _, report = convert_onnx(m)
    assert report.check["input_shapes"]["x"] == [1, 2, 192, 192]
    assert any("checked at" in msg and "192" in msg for msg in report.messages)


def test_dynamic_spatial_size_shrinks_to_fit_the_check_budget():
    from repnp.io.onnx.check import DYNAMIC_SPATIAL, MAX_CHECK_ELEMENTS, input_shapes

    m = _strided_chain(np.ones((2, 2, 3, 3)))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4096   # many channels: 192x192 too large
    shape = input_shapes(m)["x"]
    assert DYNAMIC_SPATIAL <= shape[2] < 192 and np.prod(shape) <= MAX_CHECK_ELEMENTS
