"""Issue 13 item 6: the converter's output is as clean as a simplifier's.

No ``Constant`` node is left (initializers instead), the shape-only chains exporters
emit are folded whether or not anything was fused, and a general simplifier (onnxslim,
when installed) finds no Conv/BatchNormalization/Add left to remove.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp.io.onnx import convert_onnx

RNG = np.random.default_rng(13)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _const(name, array):
    return helper.make_node("Constant", [], [name], name=f"{name}_node", value=_init(name, array))


def _bn(prefix, c):
    return [_init(f"{prefix}.g", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
            _init(f"{prefix}.b", RNG.normal(0, 0.5, c).astype(np.float32)),
            _init(f"{prefix}.m", RNG.normal(0, 0.5, c).astype(np.float32)),
            _init(f"{prefix}.v", RNG.uniform(0.5, 2.0, c).astype(np.float32))]


def _model(nodes, inits, *, out_shape=(1, 5)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _head(source, *, folded):
    """Flatten as PyTorch's ``x.view(x.size(0), -1)`` exports it, then a Gemm: without
    constant folding the target is built by Shape/Gather/Unsqueeze/Concat from Constant
    nodes; with it, the batch index still comes from Shape (nothing static to fold for
    the exporter when the batch axis is dynamic), here static."""
    nodes, inits = [], [_init("fc.w", RNG.normal(0, 0.3, (5, 4 * 8 * 8)).astype(np.float32)),
                        _init("fc.b", RNG.normal(0, 0.3, 5).astype(np.float32))]
    if folded:
        inits += [_init("zero", np.array(0, np.int64)), _init("minus1", np.array([-1], np.int64)),
                  _init("axes0", np.array([0], np.int64))]
    else:
        nodes += [_const("zero", np.array(0, np.int64)), _const("minus1", np.array([-1], np.int64)),
                  _const("axes0", np.array([0], np.int64))]
    nodes += [helper.make_node("Shape", [source], ["shp"], name="shape"),
              helper.make_node("Gather", ["shp", "zero"], ["n"], name="gather", axis=0),
              helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsq"),
              helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
              helper.make_node("Reshape", [source, "target"], ["flat"], name="reshape"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1)]
    return nodes, inits


def _clip_net(*, folded, fusable=True):
    """mobilenet_v2's pattern: Conv (+BN when ``fusable``), Clip(0, 6) whose limits are
    Constant nodes (no-folding export) or initializers, then the flatten head."""
    inits = [_init("w", RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32))] + _bn("bn", 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    if fusable:
        nodes.append(helper.make_node("BatchNormalization", ["c", "bn.g", "bn.b", "bn.m", "bn.v"], ["a"],
                                      name="bn"))
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["a"], name="relu"))
    if folded:
        inits += [_init("lo", np.array(0, np.float32)), _init("hi", np.array(6, np.float32))]
    else:
        nodes += [_const("lo", np.array(0, np.float32)), _const("hi", np.array(6, np.float32))]
    nodes.append(helper.make_node("Clip", ["a", "lo", "hi"], ["r"], name="clip"))
    head, more = _head("r", folded=folded)
    return _model(nodes + head, inits + more)


@pytest.mark.parametrize("fusable", [True, False], ids=["fused", "nothing-fused"])
@pytest.mark.parametrize("folded", [True, False], ids=["cf", "nocf"])
def test_no_constant_nodes_and_shape_chains_folded(folded, fusable):
    model = _clip_net(folded=folded, fusable=fusable)
    out, report = convert_onnx(model)
    ops = Counter(n.op_type for n in out.graph.node)
    assert "Constant" not in ops
    # The flatten target is a folded initializer: Shape/Gather/Unsqueeze/Concat are gone.
    assert not {"Shape", "Gather", "Unsqueeze", "Concat"} & set(ops)
    expected = {"Conv": 1, "Clip": 1, "Reshape": 1, "Gemm": 1}
    if not fusable:
        expected["Relu"] = 1
    assert ops == Counter(expected)
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert report.check["passed"]


def test_every_export_style_gives_the_same_graph():
    counts = {(f, u): Counter(n.op_type for n in convert_onnx(_clip_net(folded=f, fusable=u))[0].graph.node)
              for f in (True, False) for u in (True, False)}
    assert counts[True, True] == counts[False, True]
    assert counts[True, False] == counts[False, False]


def test_constant_graph_output_stays_a_node():
    # An initializer cannot be a graph output in every runtime: that Constant stays.
    w = _init("w", RNG.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), _const("k", np.arange(3, dtype=np.float32))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
                               helper.make_tensor_value_info("k", TensorProto.FLOAT, [3])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = convert_onnx(model)
    assert [n.op_type for n in out.graph.node if n.op_type == "Constant"] == ["Constant"]


def test_a_large_expanded_constant_stays_computed():
    # Expand of a scalar to 2 MiB of floats: cheaper to compute than to store.
    big = (1, 8, 256, 256)  # more than rewrite.FOLD_WRITE_LIMIT bytes
    nodes = [helper.make_node("Expand", ["one", "shape"], ["ones"], name="expand"),
             helper.make_node("Add", ["x", "ones"], ["y"], name="add")]
    inits = [_init("one", np.array(1, np.float32)), _init("shape", np.array(big, np.int64))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(big))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(big))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = convert_onnx(model, check=False)
    assert "Expand" in {n.op_type for n in out.graph.node}
    assert sum(np.prod(t.dims) for t in out.graph.initializer) < 100


def _rep_block():
    """A RepVGG block (3x3+BN, 1x1+BN, identity BN, Add, Relu) twice, no-folding style
    (Clip limits as Constant nodes), then the flatten head."""
    nodes, inits, src = [], [], "x"
    for b in range(2):
        p = f"b{b}"
        inits += [_init(f"{p}.w3", RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)),
                  _init(f"{p}.w1", RNG.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32))]
        inits += _bn(f"{p}.bn3", 4) + _bn(f"{p}.bn1", 4) + _bn(f"{p}.bnid", 4)
        nodes += [helper.make_node("Conv", [src, f"{p}.w3"], [f"{p}.c3"], pads=[1, 1, 1, 1], name=f"{p}.conv3"),
                  helper.make_node("Conv", [src, f"{p}.w1"], [f"{p}.c1"], name=f"{p}.conv1")]
        for k, t in (("bn3", "c3"), ("bn1", "c1")):
            nodes.append(helper.make_node("BatchNormalization", [f"{p}.{t}"] + [f"{p}.{k}.{s}" for s in "gbmv"],
                                          [f"{p}.{k}.y"], name=f"{p}.{k}"))
        nodes.append(helper.make_node("BatchNormalization", [src] + [f"{p}.bnid.{s}" for s in "gbmv"],
                                      [f"{p}.id"], name=f"{p}.bnid"))
        nodes += [helper.make_node("Add", [f"{p}.bn3.y", f"{p}.bn1.y"], [f"{p}.s"], name=f"{p}.add1"),
                  helper.make_node("Add", [f"{p}.s", f"{p}.id"], [f"{p}.t"], name=f"{p}.add2"),
                  _const(f"{p}.lo", np.array(0, np.float32)), _const(f"{p}.hi", np.array(6, np.float32)),
                  helper.make_node("Clip", [f"{p}.t", f"{p}.lo", f"{p}.hi"], [f"{p}.r"], name=f"{p}.clip")]
        src = f"{p}.r"
    head, more = _head(src, folded=False)
    return _model(nodes + head, inits + more)


def test_a_simplifier_changes_no_conv_bn_add_count(tmp_path):
    onnxslim = pytest.importorskip("onnxslim")
    model = _rep_block()
    out, _ = convert_onnx(model)
    ops = Counter(n.op_type for n in out.graph.node)
    assert ops["Conv"] == 2 and "BatchNormalization" not in ops and "Add" not in ops and "Constant" not in ops
    slim = onnxslim.slim(out)
    after = Counter(n.op_type for n in slim.graph.node)
    for op in ("Conv", "BatchNormalization", "Add", "Constant", "Shape", "Gather", "Concat"):
        assert after[op] == ops[op], op
    assert len(slim.graph.node) == len(out.graph.node)
