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


# --- item 3: a selection (TopK) flipped by rounding: compare what feeds it, say what was not ---

def _topk_model(delta, seed):
    """RepVGG block -> ReduceMax over H, W -> + delta -> TopK(k=1) -> index as float.

    Outputs ``m`` (the pooled scores, before the selection) and ``idx`` (after it)."""
    from test_io_onnx_convert import Builder, repvgg

    b = Builder(shape=(1, 4, 6, 6), seed=seed)
    y = repvgg(b, "x", 4)
    b.nodes.append(helper.make_node("ReduceMax", [y], ["m"], axes=[2, 3], keepdims=0))
    b.inits.append(numpy_helper.from_array(np.asarray(delta, np.float32).reshape(1, 4), "delta"))
    b.inits.append(numpy_helper.from_array(np.array([1], np.int64), "k"))
    b.nodes += [helper.make_node("Add", ["m", "delta"], ["s"]),
                helper.make_node("TopK", ["s", "k"], ["v", "i"], axis=1, name="select"),
                helper.make_node("Cast", ["i"], ["idx"], to=TensorProto.FLOAT)]
    return b.model(["m", "idx"])


def _flipping_topk():
    """A TopK model whose selection differs between the train graph and its fused form
    (two scores equal up to the rounding of the fused conv), and the fused model."""
    from repnp.io import convert_onnx
    from repnp.io.onnx.check import make_inputs, run_model

    for seed in range(20):
        m = _topk_model(np.zeros(4), seed)
        fused, _ = convert_onnx(m, check=False)
        feeds = make_inputs(m)                      # the check's own inputs (seed 0)
        (ref_m, _), used = run_model(m, feeds)
        (new_m, _), _ = run_model(fused, feeds, engine=used)
        ref_m, new_m = ref_m[0].astype(np.float32), new_m[0].astype(np.float32)
        # delta keeps channels 0 and 1 in the race; t on channel 1 puts them a rounding error apart
        base = ref_m[0] - ref_m[1]
        t = np.float32(base)
        for _ in range(64):
            ref_pick = np.float32(ref_m[1] + t) > ref_m[0]
            new_pick = np.float32(new_m[1] + t) > new_m[0]
            if ref_pick != new_pick:
                delta = np.array([0.0, t, -100.0, -100.0], np.float32)
                m = _topk_model(delta, seed)
                fused, _ = convert_onnx(m, check=False)
                outs_ref, _ = run_model(m, feeds, engine=used)
                outs_new, _ = run_model(fused, feeds, engine=used)
                if outs_ref[1].ravel()[0] != outs_new[1].ravel()[0]:
                    return m, fused
            t = np.nextafter(t, np.float32(np.inf) if ref_m[0] - ref_m[1] < new_m[0] - new_m[1] else
                             np.float32(-np.inf))
    raise AssertionError("no seed made TopK flip: rounding of the fused conv matched the train graph")


def test_convert_writes_a_model_whose_topk_selection_flips_by_rounding(tmp_path, capsys):
    from repnp.io import convert_onnx

    m, _ = _flipping_topk()
    fused, report = convert_onnx(m)                  # the check passes: the fused part is exact
    assert report.check["passed"] and report.check["max_error"] <= 1e-5
    assert report.check["not_compared"] == ["idx"]
    notes = " ".join(report.messages)
    assert "outputs after TopK not compared: data-dependent selection" in notes and "'idx'" in notes
    assert "feeding it (['s'])" in notes and "(['m'])" in notes
    assert sum(n.op_type == "Conv" for n in fused.graph.node) == 1
    # the CLI writes the model and prints why an output was not compared
    src, dst = tmp_path / "topk.onnx", tmp_path / "deploy.onnx"
    onnx.save(m, src)
    assert main(["convert", str(src), str(dst)]) == 0 and dst.exists()
    assert "data-dependent selection" in capsys.readouterr().out


def test_a_wrong_tensor_feeding_topk_still_fails_the_check():
    from repnp.io.onnx.check import compare_models

    m = _topk_model(np.zeros(4), 0)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(m)
    w = next(t for t in wrong.graph.initializer if len(t.dims) == 4 and t.dims[2] == 3)
    arr = numpy_helper.to_array(w).copy()
    arr[0, 0, 1, 1] += 0.5
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    res = compare_models(m, wrong)
    assert not res.passed and ("'m'" in res.reason or "'s'" in res.reason), res.reason


def test_data_dependent_ops_ignore_shape_subgraphs_and_constant_conditions():
    from repnp.io.onnx.check import data_dependent_ops

    cond = numpy_helper.from_array(np.array([True, False]), "cond")
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("ArgMax", ["sh"], ["am"], keepdims=0),          # shapes only
             helper.make_node("Where", ["cond", "x", "x"], ["w"]),           # constant condition
             helper.make_node("Greater", ["x", "w"], ["g"]),
             helper.make_node("Where", ["g", "x", "w"], ["y"], name="masked")]  # computed mask
    m = _model(nodes, [_vi("x", [2])], [_vi("y", [2]), _vi("am", [], TensorProto.INT64)], [cond])
    assert [n.name for n in data_dependent_ops(m)] == ["masked"]
