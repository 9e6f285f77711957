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
