"""Issue 13, items 1 and 7: the converter's output is never costlier than its input.

Patterns that runtimes fuse into one kernel (GELU, SiLU, HardSwish, LayerNorm, RMSNorm)
stay intact, merges that would add MACs or parameters are not made, and ResRep's
compactor (KxK conv-BN then a square 1x1, nothing between) becomes one conv.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from repnp.io import convert_onnx
from repnp.io.onnx.patterns import protected_nodes

ort = pytest.importorskip("onnxruntime")

C = 8


def _model(nodes, inits, *, cin=3, cout=C, hw=12):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _convs(rng, c_mid=C, cout=C):
    return {"w1": rng.standard_normal((c_mid, 3, 3, 3)), "b1": rng.standard_normal(c_mid),
            "w2": rng.standard_normal((cout, c_mid, 1, 1)), "b2": rng.standard_normal(cout)}


def _head():
    return oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")


def _tail(inp):
    return oh.make_node("Conv", [inp, "w2", "b2"], ["y"], name="conv2")


def _gelu_erf(half_first=False):
    rng = np.random.default_rng(0)
    inits = _convs(rng) | {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}
    body = [oh.make_node("Div", ["c1", "sqrt2"], ["d"]), oh.make_node("Erf", ["d"], ["e"]),
            oh.make_node("Add", ["e", "one"], ["a"])]
    if half_first:
        body += [oh.make_node("Mul", ["c1", "half"], ["h"]), oh.make_node("Mul", ["h", "a"], ["g"])]
    else:
        body += [oh.make_node("Mul", ["c1", "a"], ["m"]), oh.make_node("Mul", ["m", "half"], ["g"])]
    return _model([_head(), *body, _tail("g")], inits)


def _gelu_tanh():
    rng = np.random.default_rng(1)
    inits = _convs(rng) | {"three": 3.0, "k": 0.044715, "s": np.sqrt(2 / np.pi), "one": 1.0, "half": 0.5}
    body = [oh.make_node("Pow", ["c1", "three"], ["p"]), oh.make_node("Mul", ["p", "k"], ["pk"]),
            oh.make_node("Add", ["c1", "pk"], ["inner"]), oh.make_node("Mul", ["inner", "s"], ["arg"]),
            oh.make_node("Tanh", ["arg"], ["t"]), oh.make_node("Add", ["t", "one"], ["a"]),
            oh.make_node("Mul", ["c1", "a"], ["m"]), oh.make_node("Mul", ["m", "half"], ["g"])]
    return _model([_head(), *body, _tail("g")], inits)


def _hardswish():
    rng = np.random.default_rng(2)
    inits = _convs(rng) | {"three": 3.0, "zero": 0.0, "six": 6.0}
    body = [oh.make_node("Add", ["c1", "three"], ["a"]), oh.make_node("Clip", ["a", "zero", "six"], ["cl"]),
            oh.make_node("Mul", ["c1", "cl"], ["m"]), oh.make_node("Div", ["m", "six"], ["g"])]
    return _model([_head(), *body, _tail("g")], inits)


def _silu_scaled():
    """Swish with beta (``x * sigmoid(1.702 x)``, QuickGELU), then a constant scale."""
    rng = np.random.default_rng(3)
    inits = _convs(rng) | {"beta": 1.702, "k": 0.5}
    body = [oh.make_node("Mul", ["c1", "beta"], ["bx"]), oh.make_node("Sigmoid", ["bx"], ["s"]),
            oh.make_node("Mul", ["c1", "s"], ["m"]), oh.make_node("Mul", ["m", "k"], ["g"])]
    return _model([_head(), *body, _tail("g")], inits)


def _layernorm(rms=False):
    """ConvNeXt's channels-first LayerNorm (or RMSNorm) between two convs."""
    rng = np.random.default_rng(4)
    inits = _convs(rng) | {"two": 2.0, "eps": 1e-6, "gamma": rng.standard_normal((C, 1, 1)),
                           "beta": rng.standard_normal((C, 1, 1))}
    body = []
    d = "c1"
    if not rms:
        body += [oh.make_node("ReduceMean", ["c1"], ["mu"], axes=[1]), oh.make_node("Sub", ["c1", "mu"], ["dd"])]
        d = "dd"
    body += [oh.make_node("Pow", [d, "two"], ["sq"]), oh.make_node("ReduceMean", ["sq"], ["var"], axes=[1]),
             oh.make_node("Add", ["var", "eps"], ["ve"]), oh.make_node("Sqrt", ["ve"], ["sd"]),
             oh.make_node("Div", [d, "sd"], ["n"]), oh.make_node("Mul", ["n", "gamma"], ["ng" if not rms else "g"])]
    if not rms:
        body.append(oh.make_node("Add", ["ng", "beta"], ["g"]))
    return _model([_head(), *body, _tail("g")], inits)


def _optimized_ops(model, level, path):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = str(path)
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _ops(model):
    return [n.op_type for n in model.graph.node]


# -- item 1: runtime-fused patterns kept ---------------------------------------------------
@pytest.mark.parametrize("half_first", [False, True])
@pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_gelu_between_convs_keeps_onnxruntime_gelu_fusion(tmp_path, half_first, level):
    model = _gelu_erf(half_first)
    lv = getattr(ort.GraphOptimizationLevel, level)
    before = _optimized_ops(model, lv, tmp_path / "in.onnx")
    assert "Gelu" in before  # the runtime does fuse the input: the test means something
    out, report = convert_onnx(model)
    assert report.check["passed"]
    after = _optimized_ops(out, lv, tmp_path / "out.onnx")
    assert {"Gelu", "FastGelu", "BiasGelu"} & set(after), after
    assert _ops(out).count("Mul") == _ops(model).count("Mul")


@pytest.mark.parametrize("build, op, count", [
    (_gelu_tanh, "Mul", 4), (_hardswish, "Div", 1), (_silu_scaled, "Mul", 3),
    (lambda: _layernorm(False), "Add", 2), (lambda: _layernorm(False), "Mul", 1),
    (lambda: _layernorm(True), "Mul", 1)])
def test_fused_pattern_constants_not_folded_into_next_conv(build, op, count):
    model = build()
    assert _ops(model).count(op) == count
    out, report = convert_onnx(model)
    assert report.check["passed"]
    assert _ops(out) == _ops(model)


@pytest.mark.parametrize("build", [_gelu_erf, _gelu_tanh, _hardswish, _silu_scaled, _layernorm,
                                   lambda: _layernorm(True)])
def test_every_pattern_node_is_protected(build):
    model = build()
    nodes = list(model.graph.node)
    consts = {t.name for t in model.graph.initializer}
    prot = protected_nodes(nodes, consts)
    assert prot == {i for i, n in enumerate(nodes) if n.op_type != "Conv"}


def test_aggressive_folds_the_pattern_constants():
    model = _gelu_erf()
    out, report = convert_onnx(model, aggressive=True)
    assert report.check["passed"]
    assert _ops(out).count("Mul") == _ops(model).count("Mul") - 1


def test_plain_relu6_and_sigmoid_gate_of_another_tensor_not_protected():
    """MobileNet's Clip between convs and a gate of an unrelated tensor are no pattern."""
    x = oh.make_node("Clip", ["c1", "zero", "six"], ["r"])
    s = oh.make_node("Sigmoid", ["r"], ["s"])
    m = oh.make_node("Mul", ["other", "s"], ["m"])
    assert protected_nodes([_head(), x, s, m], {"zero", "six", "w1", "b1"}) == set()


def test_conv_add_relu_residual_kept():
    rng = np.random.default_rng(5)
    inits = {"w1": rng.standard_normal((3, 3, 3, 3)), "b1": rng.standard_normal(3), "k": 0.5}
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r"]),
             oh.make_node("Conv", ["r", "w1", "b1"], ["c2"], pads=[1, 1, 1, 1]),
             oh.make_node("Add", ["c2", "x"], ["s"]), oh.make_node("Relu", ["s"], ["y"])]
    model = _model(nodes, inits, cout=3)
    out, _ = convert_onnx(model)
    assert _ops(out) == _ops(model)


# -- item 7: ResRep's compactor, cost-aware ------------------------------------------------
def _conv_bn_1x1(rng, *, cin=4, mid=6, cout=6, groups=1, k=3, stride=1):
    inits = {"w1": rng.standard_normal((mid, cin // groups, k, k)),
             "g": rng.uniform(0.5, 2, mid), "bt": rng.standard_normal(mid),
             "mu": rng.standard_normal(mid), "var": rng.uniform(0.5, 2, mid),
             "q": rng.standard_normal((cout, mid, 1, 1)), "qb": rng.standard_normal(cout)}
    nodes = [oh.make_node("Conv", ["x", "w1"], ["c1"], pads=[k // 2] * 4, group=groups, strides=[stride] * 2,
                          name="conv"),
             oh.make_node("BatchNormalization", ["c1", "g", "bt", "mu", "var"], ["b1"], name="bn"),
             oh.make_node("Conv", ["b1", "q", "qb"], ["y"], name="compactor")]
    hw, out = 12, 12 // stride
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in inits.items()]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, out, out])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("stride", [1, 2])
def test_resrep_compactor_merged_into_one_conv(stride):
    model = _conv_bn_1x1(np.random.default_rng(6), stride=stride)
    out, report = convert_onnx(model)
    assert _ops(out) == ["Conv"]
    assert report.check["passed"] and report.check["max_error"] < 1e-5
    assert report.params_after < report.params_before


@pytest.mark.parametrize("kw", [dict(cin=4, mid=4, cout=16),          # a wide 1x1 after the KxK
                                dict(cin=8, mid=8, cout=8, groups=8)])  # depthwise then dense 1x1
def test_costlier_compactor_merge_not_made(kw):
    model = _conv_bn_1x1(np.random.default_rng(7), **kw)
    out, report = convert_onnx(model)
    assert _ops(out) == ["Conv", "Conv"]
    assert report.params_after <= report.params_before
    agg, report = convert_onnx(model, aggressive=True)
    assert _ops(agg) == ["Conv"] and report.check["passed"]


def test_cli_aggressive_flag_reaches_the_converter(tmp_path, capsys):
    """``repnp convert --aggressive`` folds the pattern constants the default keeps."""
    import onnx

    from repnp import cli

    model = _gelu_model_for_cli()
    src = tmp_path / "g.onnx"
    onnx.save(model, src)
    counts = {}
    for flag in ([], ["--aggressive"]):
        out = tmp_path / f"o{len(flag)}.onnx"
        assert cli.main(["convert", str(src), str(out), *flag]) == 0
        counts[bool(flag)] = len(onnx.load(out).graph.node)
    assert counts[True] < counts[False] == len(model.graph.node)
    capsys.readouterr()
    import numpy as np

    state = tmp_path / "s.npz"
    np.savez(state, **{"fc.weight": np.ones((2, 3), np.float32)})
    assert cli.main(["convert", str(state), str(tmp_path / "o.npz"), "--aggressive"]) == 2
    assert "--aggressive applies to ONNX models" in capsys.readouterr().err


def _gelu_model_for_cli():
    """Conv 3x3 -> GELU (the exporters' erf chain, trailing Mul by 0.5) -> Conv 1x1."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    c = 4

    def init(name, a):
        return numpy_helper.from_array(np.asarray(a, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1] * 4),
             helper.make_node("Div", ["h", "s2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["h", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]), helper.make_node("Conv", ["g", "w2", "b2"], ["y"])]
    inits = [init("w1", rng.standard_normal((c, c, 3, 3)) / 6), init("b1", rng.standard_normal(c)),
             init("w2", rng.standard_normal((c, c, 1, 1)) / 2), init("b2", rng.standard_normal(c)),
             init("s2", np.sqrt(2.0)), init("one", 1.0), init("half", 0.5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# -- tied weights and MatMul + bias: what the TorchScript exporter writes for transformers ---
def _tied_linear_model(*, seq_transpose=True, bias_zero=True, layers=3):
    """Conv-BN, then ``layers`` Linear layers sharing one weight and one bias, each read
    through its own ``Identity`` (how the TorchScript exporter writes a tied or cloned
    parameter, e.g. rtdetr-l's decoder layers), on a (1, HW, C) sequence."""
    rng = np.random.default_rng(11)
    c, hw = C, 6
    inits = {"w": rng.standard_normal((c, 3, 3, 3)), "g": rng.uniform(0.5, 2, c), "bt": rng.standard_normal(c),
             "mu": rng.standard_normal(c), "var": rng.uniform(0.5, 2, c),
             "lw": rng.standard_normal((c, c)) * 0.3, "lb": np.zeros(c) if bias_zero else rng.standard_normal(c),
             "seq": np.array([1, c, hw * hw]), "img": np.array([1, c, hw, hw])}
    nodes = [oh.make_node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1]),
             oh.make_node("BatchNormalization", ["c1", "g", "bt", "mu", "var"], ["bn"]),
             oh.make_node("Reshape", ["bn", "seq"], ["s0"]),
             oh.make_node("Transpose", ["s0"], ["t0"], perm=[0, 2, 1])]
    cur = "t0"
    for k in range(layers):
        nodes += [oh.make_node("Identity", ["lw"], [f"w{k}"]), oh.make_node("Identity", ["lb"], [f"lb{k}"]),
                  oh.make_node("MatMul", [cur, f"w{k}"], [f"m{k}"]),
                  oh.make_node("Add", [f"m{k}", f"lb{k}"], [f"a{k}"]), oh.make_node("Relu", [f"a{k}"], [f"r{k}"])]
        cur = f"r{k}"
    nodes += [oh.make_node("Transpose", [cur], ["tb"], perm=[0, 2, 1]), oh.make_node("Reshape", ["tb", "img"], ["y"])]
    onnx_inits = [numpy_helper.from_array(np.asarray(v, np.int64 if k in ("seq", "img") else np.float32), k)
                  for k, v in inits.items()]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, hw, hw])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])], onnx_inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _stored_bytes(model):
    return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


@pytest.mark.parametrize("bias_zero", [True, False])
def test_tied_weight_read_through_identities_is_stored_once(bias_zero):
    """Each Identity of the shared weight used to become its own copy of it (rtdetr-l's
    output grew from 112 to 131 MB); the readers now read the one initializer."""
    model = _tied_linear_model(bias_zero=bias_zero)
    out, report = convert_onnx(model)
    assert report.check["passed"]
    assert "Identity" not in _ops(out) and "BatchNormalization" not in _ops(out)
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 3 and len({n.input[1] for n in matmuls}) == 1
    values = [(t.data_type, tuple(t.dims), t.raw_data) for t in out.graph.initializer]
    assert len(values) == len(set(values))
    assert _stored_bytes(out) <= _stored_bytes(model)


@pytest.mark.parametrize("bias_zero", [True, False])
def test_matmul_bias_add_left_for_the_runtime_to_fuse(tmp_path, bias_zero):
    """MatMul -> Add(bias) on a sequence is onnxruntime's MatMulAddFusion pattern (a Gemm):
    dropping a zero bias or merging nothing else would leave the MatMuls unfused and the
    Transposes before them folded into FusedMatMuls, as the rtdetr-l output was."""
    model = _tied_linear_model(bias_zero=bias_zero)
    out, _ = convert_onnx(model)
    assert [n.op_type for n in out.graph.node if n.op_type in ("MatMul", "Add")] == ["MatMul", "Add"] * 3
    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    before = _optimized_ops(model, level, tmp_path / "in.onnx")
    after = _optimized_ops(out, level, tmp_path / "out.onnx")
    for op in ("Gemm", "MatMul", "FusedMatMul"):
        assert after.count(op) == before.count(op), op
