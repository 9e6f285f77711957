"""convert_onnx on small graphs built with onnx.helper: every pattern of issue 6, both exporter
styles (BN folded into the conv / BN kept), random weights and random BN statistics; outputs
compared in onnxruntime (float32: tolerance rule 1e-5 for a block) or in the reference
evaluator (float64: 1e-12)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from repnp.io.onnx.check import run_model
from repnp.io.onnx.convert import convert_onnx
from repnp.tolerance import relative_error as rel_err

_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
          np.dtype(np.float64): TensorProto.DOUBLE}


class Builder:
    """A tiny graph builder: random N(0, 1/fan_in) conv weights, random BN statistics
    (mean != 0, var != 1, gamma != 1, beta != 0). ``fold=True`` writes conv-BN as the
    exporter's constant folding does (one Conv with bias, folded here by hand in float64)."""

    def __init__(self, shape=(1, 6, 9, 11), *, dtype=np.float32, seed=0, fold=False, input_dims=None):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.fold = fold
        self.shape = shape
        self.nodes, self.inits = [], []
        self.input = helper.make_tensor_value_info("x", _TYPES[self.dtype], list(input_dims or shape))
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, array, prefix="c"):
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(self.dtype), name))
        return name

    def node(self, op, inputs, prefix=None, **attrs):
        out = self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"/{out}", **attrs))
        return out

    def bn_stats(self, c):
        r = self.rng
        return (r.uniform(0.5, 1.5, c), r.normal(0, 0.5, c), r.normal(0, 0.5, c), r.uniform(0.5, 2.0, c))

    def bn(self, x, c, eps=1e-5):
        gamma, beta, mean, var = self.bn_stats(c)
        return self.node("BatchNormalization",
                         [x, self.const(gamma), self.const(beta), self.const(mean), self.const(var)],
                         epsilon=eps)

    def conv(self, x, cin, cout, k, *, stride=1, pads=None, dilation=1, group=1, bias=False):
        kh, kw = (k, k) if isinstance(k, int) else k
        if pads is None:
            pads = [dilation * (kh // 2), dilation * (kw // 2)] * 2
        w = self.rng.normal(0, 1 / np.sqrt(cin // group * kh * kw), (cout, cin // group, kh, kw))
        ins = [x, self.const(w)]
        if bias:
            ins.append(self.const(self.rng.normal(0, 0.5, cout)))
        return self.node("Conv", ins, kernel_shape=[kh, kw], strides=[stride, stride], pads=list(pads),
                         dilations=[dilation, dilation], group=group)

    def conv_bn(self, x, cin, cout, k, eps=1e-5, **kw):
        if not self.fold:
            return self.bn(self.conv(x, cin, cout, k, **kw), cout, eps)
        kh, kwid = (k, k) if isinstance(k, int) else k
        group, dilation = kw.get("group", 1), kw.get("dilation", 1)
        pads = kw.get("pads") or [dilation * (kh // 2), dilation * (kwid // 2)] * 2
        w = self.rng.normal(0, 1 / np.sqrt(cin // group * kh * kwid), (cout, cin // group, kh, kwid))
        gamma, beta, mean, var = self.bn_stats(cout)
        t = gamma / np.sqrt(var + eps)
        return self.node("Conv", [x, self.const(w * t[:, None, None, None]), self.const(beta - mean * t)],
                         kernel_shape=[kh, kwid], strides=[kw.get("stride", 1)] * 2, pads=list(pads),
                         dilations=[dilation] * 2, group=group)

    def model(self, outputs, *, opset=17, ir=8):
        outs = [helper.make_tensor_value_info(o, _TYPES[self.dtype], None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", [self.input], outs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = ir
        inferred = onnx.shape_inference.infer_shapes(m)  # output shapes, as exporters write them
        del m.graph.output[:]
        m.graph.output.extend(inferred.graph.output)
        return m


def counts(model):
    return Counter(n.op_type for n in model.graph.node)




def same_outputs(original, converted, shape, *, tol=1e-5, seed=1, engine=None):
    x = np.random.default_rng(seed).standard_normal(shape)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(original.graph.input[0].type.tensor_type.elem_type)
    feeds = {original.graph.input[0].name: x.astype(dtype)}
    ref, used = run_model(original, feeds, engine=engine)
    new, _ = run_model(converted, feeds, engine=used)
    for a, b in zip(new, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) <= tol, rel_err(a, b)


def repvgg(b, x, c, *, stride=1, group=1, identity=True):
    y = b.node("Add", [b.conv_bn(x, c, c, 3, stride=stride, group=group),
                       b.conv_bn(x, c, c, 1, stride=stride, group=group, pads=[0, 0, 0, 0])])
    if identity:
        y = b.node("Add", [y, b.bn(x, c)])
    return b.node("Relu", [y])


# ----------------------------------------------------------------------------
# sum trees
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("stride,group,identity", [(1, 1, True), (1, 3, True), (2, 1, False), (2, 2, False)])
def test_repvgg_block_becomes_one_conv(fold, stride, group, identity):
    b = Builder(fold=fold, seed=stride * 10 + group)
    out = repvgg(b, "x", 6, stride=stride, group=group, identity=identity)
    m = b.model([out])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1, "Relu": 1})
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["group"] == group and attrs["strides"] == [stride, stride] and attrs["pads"] == [1, 1, 1, 1]
    assert report.check["max_error"] <= 1e-4 and len(report.fused) == 1
    same_outputs(m, new, b.shape)
    assert sum(json.loads(json.dumps(report.to_dict()))["counts_after"].values()) == 2
    assert "Conv" in str(report) and "fused regions: 1" in str(report)


def test_sub_association_and_sum_of_three():
    b = Builder(seed=3)
    c1, c2, c3 = (b.conv_bn("x", 6, 6, k, pads=[k // 2] * 4) for k in (3, 1, 3))
    d = b.node("Sub", [c1, b.node("Sub", [c2, c3])])           # c1 - (c2 - c3)
    e = b.node("Sum", [d, b.bn("x", 6), b.conv_bn("x", 6, 6, 1, pads=[0] * 4)])
    m = b.model([e])
    new, _ = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1})
    same_outputs(m, new, b.shape)


def test_fastvit_repmixer_pattern_and_add_constant_zero():
    """x + s * (mixer(x) - norm(x)), s of shape (C, 1, 1); plus Add(t, Constant 0)."""
    b = Builder(seed=4)
    c = 6
    zero = b.node("Constant", [], value=numpy_helper.from_array(np.array(0.0, np.float32)))
    mixer = b.node("Add", [b.node("Add", [b.conv_bn("x", c, c, 3, group=c), zero]),
                           b.node("Add", [b.conv_bn("x", c, c, 1, group=c, pads=[0] * 4), b.bn("x", c)])])
    diff = b.node("Sub", [mixer, b.bn("x", c)])
    scaled = b.node("Mul", [diff, b.const(b.rng.uniform(0.5, 1.5, (c, 1, 1)))])
    out = b.node("Add", ["x", scaled])
    m = b.model([out])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1})
    conv = new.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}["group"] == c
    same_outputs(m, new, b.shape)
    assert report.params_after < report.params_before


def test_acnet_asymmetric_pads_and_slice_crop():
    """ACNet with padding 0 for a 3x3: the 1x3 / 3x1 branches crop the input with Slice
    (official ACBlock's CropLayer) instead of padding; plus a 1x3 with pads [0, 1, 0, 1]."""
    b = Builder(shape=(1, 4, 8, 10), seed=5)
    sq = b.conv_bn("x", 4, 5, 3, pads=[0, 0, 0, 0])
    crop_w = b.node("Slice", ["x", _i64(b, [1]), _i64(b, [-1]), _i64(b, [3])])
    ver = b.conv_bn(crop_w, 4, 5, (3, 1), pads=[0, 0, 0, 0])
    crop_h = b.node("Slice", ["x", _i64(b, [1]), _i64(b, [-1]), _i64(b, [2])])
    hor = b.conv_bn(crop_h, 4, 5, (1, 3), pads=[0, 0, 0, 0])
    out = b.node("Add", [b.node("Add", [sq, ver]), hor])
    m = b.model([out])
    new, _ = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1})
    same_outputs(m, new, b.shape)

    b = Builder(shape=(1, 4, 8, 10), seed=6, fold=True)
    out = b.node("Add", [b.conv_bn("x", 4, 4, 3, stride=2), b.conv_bn("x", 4, 4, (1, 3), stride=2, pads=[0, 1, 0, 1])])
    out = b.node("Add", [out, b.conv_bn("x", 4, 4, (3, 1), stride=2, pads=[1, 0, 1, 0])])
    m = b.model([out])
    new, _ = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1})
    same_outputs(m, new, b.shape)


def _i64(b, values):
    name = b.name("i")
    b.inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def test_dilation_and_mobileone_k_branches():
    b = Builder(seed=7)
    c = 6
    branches = [b.conv_bn("x", c, c, 3, group=c, dilation=2) for _ in range(3)]
    branches.append(b.conv_bn("x", c, c, 1, group=c, pads=[0] * 4))
    branches.append(b.bn("x", c))
    total = branches[0]
    for br in branches[1:]:
        total = b.node("Add", [total, br])
    m = b.model([b.node("Relu", [total])])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1, "Relu": 1})
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["dilations"] == [2, 2] and attrs["pads"] == [2, 2, 2, 2] and attrs["group"] == c
    same_outputs(m, new, b.shape)


def test_float64_model_checked_by_reference_evaluator_to_1e12():
    b = Builder(dtype=np.float64, seed=8)
    m = b.model([repvgg(b, "x", 6)])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1, "Relu": 1})
    assert report.check["engine"] == "reference"
    assert report.check["max_error"] <= 1e-12
    assert onnx.numpy_helper.to_array(new.graph.initializer[0]).dtype == np.float64


# ----------------------------------------------------------------------------
# graph surgery rules
# ----------------------------------------------------------------------------

def test_plain_conv_bn_pair_folds_and_bn_after_sum():
    b = Builder(seed=9)
    y = b.node("Relu", [b.conv_bn("x", 6, 8, 3)])                       # conv-BN pair
    s = b.node("Add", [b.conv(y, 8, 8, 3), b.conv(y, 8, 8, 1, pads=[0] * 4, bias=True)])
    out = b.node("Relu", [b.bn(s, 8)])                                   # BN after the sum
    m = b.model([out])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 2, "Relu": 2})
    assert len(report.fused) == 2
    same_outputs(m, new, b.shape)


def test_fan_out_intermediate_is_kept():
    b = Builder(seed=10)
    y = b.conv_bn("x", 6, 6, 3)                     # y read by the Add AND by the Sigmoid
    s = b.node("Add", [y, b.bn("x", 6)])
    side = b.node("Sigmoid", [y])
    m = b.model([s, side])
    new, _ = convert_onnx(m)
    produced = {o for n in new.graph.node for o in n.output}
    assert y in produced                            # the shared tensor still exists
    assert counts(new)["BatchNormalization"] == 1   # the skip BN could not join y's region
    same_outputs(m, new, b.shape)


def test_sum_that_is_also_read_elsewhere_keeps_its_bn():
    b = Builder(seed=11)
    s = b.node("Add", [b.conv("x", 6, 6, 3), b.conv("x", 6, 6, 1, pads=[0] * 4)])
    out1 = b.node("Relu", [b.bn(s, 6)])
    out2 = b.node("Sigmoid", [s])
    m = b.model([out1, out2])
    new, _ = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1, "BatchNormalization": 1, "Relu": 1, "Sigmoid": 1})
    same_outputs(m, new, b.shape)


def test_region_ending_at_graph_output_takes_its_name():
    b = Builder(seed=12)
    out = b.node("Add", [b.conv_bn("x", 6, 6, 3), b.bn("x", 6)])
    inner = b.conv_bn("x", 6, 4, 1, pads=[0] * 4)    # also a graph output and read by a Relu
    relu = b.node("Relu", [inner])
    m = b.model([out, inner, relu])
    new, _ = convert_onnx(m)
    assert [o.name for o in new.graph.output] == [out, inner, relu]
    producers = {o: n.op_type for n in new.graph.node for o in n.output}
    assert producers[out] == "Conv" and producers[inner] == "Conv"
    same_outputs(m, new, b.shape)


def test_identity_nodes_aliasing_initializers_and_constants():
    b = Builder(seed=13)
    w = b.const(b.rng.normal(0, 0.3, (6, 6, 3, 3)))
    w_alias = b.node("Identity", [w])
    conv = b.node("Conv", ["x", w_alias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    shift = b.node("Constant", [], value=numpy_helper.from_array(
        b.rng.normal(0, 1, (1, 6, 1, 1)).astype(np.float32)))
    out = b.node("Add", [b.node("Identity", [conv]), shift])
    m = b.model([out])
    new, _ = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1})
    assert len(new.graph.initializer) == 2           # unused initializers removed
    same_outputs(m, new, b.shape)


def test_float16_model_fused_in_float64_and_cast_back():
    b = Builder(dtype=np.float16, seed=14)
    m = b.model([repvgg(b, "x", 6)])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1, "Relu": 1})
    assert all(t.data_type == TensorProto.FLOAT16 for t in new.graph.initializer)
    assert new.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert report.check["passed"]
    # the float16 tolerance is the converter's own (effective_tol), said in the report
    assert report.check["tol"] == 1e-2 and any("float16" in m and "0.01" in m for m in report.messages)
    same_outputs(m, new, b.shape, tol=1e-2)


def test_dynamic_batch_stays_dynamic():
    b = Builder(seed=15, input_dims=("N", 6, 9, 11))
    m = b.model([repvgg(b, "x", 6)])
    new, report = convert_onnx(m, input_shape=(3, 6, 9, 11))
    dim0 = new.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N"
    assert report.check["input_shapes"]["x"] == [3, 6, 9, 11]
    same_outputs(m, new, (2, 6, 9, 11))
    same_outputs(m, new, (5, 6, 9, 11))


def test_ir3_initializers_listed_as_inputs():
    b = Builder(seed=16)
    out = repvgg(b, "x", 6)
    m = b.model([out], opset=7, ir=3)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(b.shape)))
    for t in b.inits:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m)
    new, report = convert_onnx(m)
    onnx.checker.check_model(new, full_check=True)
    inits = {t.name for t in new.graph.initializer}
    inputs = [i.name for i in new.graph.input]
    assert inputs[0] == "x" and set(inputs[1:]) == inits and len(inits) == 2
    assert new.ir_version == 3 and new.opset_import[0].version == 7
    same_outputs(m, new, b.shape)


# ----------------------------------------------------------------------------
# near-matches and pass-through
# ----------------------------------------------------------------------------

def test_unsupported_op_inside_pattern_is_reported_and_left():
    b = Builder(seed=17)
    branch = b.node("Relu", [b.conv("x", 6, 6, 3)])              # a ReLU inside a branch
    out = b.node("Add", [branch, b.bn("x", 6)])
    m = b.model([out])
    new, report = convert_onnx(m)
    assert counts(new) == counts(m)
    assert any("Relu" in n["reason"] for n in report.left)
    assert "left untouched" in str(report)
    same_outputs(m, new, b.shape, tol=0)


def test_zero_padding_after_biased_pointwise_is_a_near_match():
    """DBB exact only with BN-and-pad: a biased 1x1 then a zero-padded 3x3 is not one conv."""
    b = Builder(seed=18)
    mid = b.conv("x", 6, 6, 1, pads=[0] * 4, bias=True)
    out = b.node("Add", [b.conv(mid, 6, 6, 3), b.conv("x", 6, 6, 3)])
    m = b.model([out])
    new, report = convert_onnx(m)
    assert counts(new)["Conv"] == 3
    assert any("interior" in n["reason"] for n in report.left)
    same_outputs(m, new, b.shape, tol=0)


def test_avgpool_without_count_include_pad_is_not_fused():
    b = Builder(seed=19)
    pooled = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    out = b.node("Add", [b.bn(pooled, 6), b.conv_bn("x", 6, 6, 3)])
    m = b.model([out])
    new, _ = convert_onnx(m)
    assert counts(new)["AveragePool"] == 1
    same_outputs(m, new, b.shape)

    b = Builder(seed=19)
    pooled = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    out = b.node("Add", [b.bn(pooled, 6), b.conv_bn("x", 6, 6, 3)])
    m = b.model([out])
    new, _ = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1})
    same_outputs(m, new, b.shape)


def test_pointwise_then_depthwise_chain_is_not_inflated():
    """A dense 1x1-BN then a depthwise 3x3 (no sum) would become a dense 3x3: only the
    conv-BN pair is folded."""
    b = Builder(seed=20)
    out = b.conv_bn(b.conv_bn("x", 6, 6, 1, pads=[0] * 4), 6, 6, 3, group=6, pads=[0] * 4)
    m = b.model([out])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 2})
    same_outputs(m, new, b.shape)


def test_qdq_graph_left_alone():
    b = Builder(seed=21)
    scale, zp = b.const(np.array(0.05)), b.name("zp")
    b.inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zp))
    q = b.node("QuantizeLinear", ["x", scale, zp])
    dq = b.node("DequantizeLinear", [q, scale, zp])
    out = b.node("Add", [b.conv_bn(dq, 6, 6, 3), b.bn(dq, 6)])
    m = b.model([out])
    new, report = convert_onnx(m)
    assert counts(new) == counts(m)
    assert any("quantized" in msg for msg in report.messages)


def test_model_without_pattern_passes_through():
    b = Builder(seed=22)
    out = b.node("Relu", [b.conv("x", 6, 6, 3)])
    m = b.model([out])
    new, report = convert_onnx(m)
    assert [n.name for n in new.graph.node] == [n.name for n in m.graph.node]
    assert report.fused == [] and report.check["max_abs"] == 0.0


def test_nodes_out_of_order_are_sorted():
    b = Builder(seed=23)
    m = b.model([repvgg(b, "x", 6)])
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    new, _ = convert_onnx(m)
    onnx.checker.check_model(new, full_check=True)
    assert counts(new) == Counter({"Conv": 1, "Relu": 1})


# ----------------------------------------------------------------------------
# property test: random sum trees of aligned branches
# ----------------------------------------------------------------------------

_KERNELS = [(3, 3), (1, 1), (1, 3), (3, 1), (5, 5)]


@settings(max_examples=15)
@given(kinds=st.lists(st.sampled_from(_KERNELS + ["bn", "x"]), min_size=2, max_size=5),
       stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       fold=st.booleans(), signs=st.lists(st.booleans(), min_size=5, max_size=5),
       seed=st.integers(0, 2 ** 16))
def test_random_sum_trees_fuse_exactly(kinds, stride, dilation, group, fold, signs, seed):
    c = 4
    if stride != 1:  # identity branches exist only at stride 1
        kinds = [k for k in kinds if k not in ("bn", "x")]
    if not any(isinstance(k, tuple) for k in kinds):  # a region without a conv is left as it is
        kinds = kinds + [(3, 3)]
    b = Builder(shape=(1, c, 7, 8), seed=seed, fold=fold)
    branches = []
    for k in kinds:
        if k == "bn":
            branches.append(b.bn("x", c))
        elif k == "x":
            branches.append("x")
        else:
            pads = [dilation * (k[0] // 2), dilation * (k[1] // 2)] * 2
            branches.append(b.conv_bn("x", c, c, k, stride=stride, dilation=dilation, group=group, pads=pads))
    if len(branches) == 1:
        branches.append(b.conv_bn("x", c, c, 3, stride=stride, dilation=dilation, group=group,
                                  pads=[dilation] * 4))
    total = branches[0]
    for br, neg in zip(branches[1:], signs):
        total = b.node("Sub" if neg else "Add", [br, total] if neg and seed % 2 else [total, br])
    m = b.model([b.node("Relu", [total])])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1, "Relu": 1})
    same_outputs(m, new, b.shape)


def test_reshape_after_conv_bn_keeps_the_reshape():
    """A conv-BN whose output is flattened for a MatMul (a classifier head): the pair folds, the
    Reshape and MatMul pass through."""
    b = Builder(shape=(2, 6, 4, 5), seed=24)
    flat = b.node("Reshape", [b.conv_bn("x", 6, 3, 3), _i64(b, [2, 60])])
    out = b.node("MatMul", [flat, b.const(b.rng.normal(0, 0.1, (60, 7)))])
    m = b.model([out])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1, "Reshape": 1, "MatMul": 1})
    same_outputs(m, new, b.shape)


def test_compact_groups_finds_block_diagonal_structure():
    from repnp.fusion import ungroup_kernel
    from repnp.io.onnx.regions import _compact_groups

    rng = np.random.default_rng(0)
    grouped = rng.normal(size=(6, 2, 3, 3))            # groups=3 of 2 -> 2 channels
    dense = ungroup_kernel(grouped, groups=3)          # (6, 6, 3, 3), block diagonal
    kernel, g = _compact_groups(dense, 1)
    assert g == 3 and np.array_equal(kernel, grouped)
    dense[0, 5, 1, 1] = 1e-30                          # one tap outside the blocks: stays dense
    assert _compact_groups(dense, 1)[1] == 1


def test_stale_value_info_dropped_and_fresh_kept():
    b = Builder(seed=25)
    m = b.model([b.node("Relu", [b.node("Add", [b.conv_bn("x", 6, 6, 3), b.bn("x", 6)])])])
    m = onnx.shape_inference.infer_shapes(m)
    assert len(m.graph.value_info) == 4
    new, _ = convert_onnx(m)
    produced = {o for n in new.graph.node for o in n.output}
    assert [vi.name for vi in new.graph.value_info] == [n.output[0] for n in new.graph.node
                                                         if n.op_type == "Conv"]
    assert all(vi.name in produced for vi in new.graph.value_info)


@pytest.mark.parametrize("fold", [False, True])
def test_whole_mobilenet_v2_keeps_its_structure(fold):
    """A network without rep blocks: every conv-BN folds, the residual Adds and ReLU6 stay, the
    linear 1x1 project -> 1x1 expand chains are not merged (that would grow them) and say so."""
    from repnp import models
    from repnp.io.onnx.export import build_onnx

    m = build_onnx(models.mobilenet_v2(seed=0), fold_bn=fold, input_shape=(1, 3, 32, 32))
    new, report = convert_onnx(m)
    got = counts(new)
    assert got["BatchNormalization"] == 0 and got["Conv"] == counts(m)["Conv"] == 52
    assert got["Add"] == counts(m)["Add"] == 10 and got["Clip"] == 35
    assert len(report.left) == 2
    assert all("larger" in n["reason"] for n in report.left)
    assert report.check["max_error"] <= 1e-4


def test_dbb_bn_and_pad_with_wrong_border_value_is_a_near_match():
    """1x1-BN -> Pad -> 3x3 (pads 0) summed with a 3x3: exact when the border holds the BN's
    value at zero input (written here by one ScatterND, as DBB's export does), not when it
    holds zeros."""
    # (top, left, bottom, right): symmetric, and asymmetric to pin ONNX's Pad order
    # [x1_begin, x2_begin, x3_begin, x4_begin, x1_end, ...] (DBB's F.pad order bug)
    for write_border, (t, le, bo, r) in [(True, (1, 1, 1, 1)), (True, (2, 0, 0, 2)), (False, (1, 1, 1, 1))]:
        b = Builder(shape=(1, 4, 6, 7), seed=26)
        mid = b.conv_bn("x", 4, 4, 1, pads=[0] * 4)
        # the BN's value at zero input, beta - mean * gamma / sqrt(var + eps), from its constants
        gamma, beta, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in b.inits[-4:])
        padded = b.node("Pad", [mid, _i64(b, [0, 0, t, le, 0, 0, bo, r])], mode="constant")
        if write_border:
            value = beta - mean * gamma / np.sqrt(var + 1e-5)
            border = [(h, w) for h in range(6 + t + bo) for w in range(7 + le + r)
                      if not (t <= h < t + 6 and le <= w < le + 7)]
            idx = np.array([[0, c, h, w] for c in range(4) for h, w in border], dtype=np.int64)
            upd = np.array([value[c] for c in range(4) for _ in border])
            padded = b.node("ScatterND", [padded, _i64(b, idx), b.const(upd)])
        out = b.node("Add", [b.conv(padded, 4, 4, 3, pads=[0] * 4), b.conv_bn("x", 4, 4, 3, pads=[t, le, bo, r])])
        m = b.model([out])
        new, report = convert_onnx(m)
        if write_border:
            assert counts(new) == Counter({"Conv": 1})
        else:
            assert counts(new)["Pad"] == 1 and counts(new)["Conv"] == 3
            assert any("not the region's value" in n["reason"] for n in report.left)
        same_outputs(m, new, b.shape)


def test_div_neg_and_constant_operands_of_sum():
    b = Builder(seed=27)
    c = 6
    a = b.node("Div", [b.conv("x", c, c, 3), b.const(b.rng.uniform(0.5, 2.0, (c, 1, 1)))])
    n = b.node("Neg", [b.conv_bn("x", c, c, 1, pads=[0] * 4)])
    s = b.node("Sum", [a, n, b.const(b.rng.normal(0, 1, (1, c, 1, 1))), b.bn("x", c)])
    out = b.node("Sub", [b.const(np.float32(0.25)), s])          # constant minus region
    m = b.model([out])
    new, _ = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1})
    same_outputs(m, new, b.shape)


def _repmlp_like(b, *, with_local=True):
    """RepMLP as repnp's export writes it: a grouped 1x1 FC on the flat view (M, S*h*w, 1, 1),
    reshaped to (M, S, h, w) and BN'd, plus conv-BN branches on the (M, S, h, w) view."""
    s, h, w = 2, 3, 4
    flat = b.node("Reshape", ["x", _i64(b, [-1, s * h * w, 1, 1])])
    fc = b.conv(flat, s * h * w, s * h * w, 1, pads=[0] * 4, group=s)
    y = b.bn(b.node("Reshape", [fc, _i64(b, [-1, s, h, w])]), s)
    if with_local:
        view = b.node("Reshape", ["x", _i64(b, [-1, s, h, w])])
        y = b.node("Add", [y, b.conv_bn(view, s, s, 3, group=s)])
        y = b.node("Add", [y, b.conv_bn(view, s, s, 1, group=s, pads=[0] * 4)])
    return y


def test_repmlp_fc_and_local_branches_become_one_fc():
    b = Builder(shape=(2, 4, 3, 4), seed=28)     # rows M = 2 * 4 / S
    m = b.model([b.node("Relu", [_repmlp_like(b)])])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Reshape": 2, "Conv": 1, "Relu": 1})
    (region,) = report.fused
    assert region.detail["groups"] == 2                    # block-diagonal structure recovered
    same_outputs(m, new, b.shape)


def test_bn_on_a_view_alone_is_left_in_place():
    """The FC's BN acts on a reshaped view; with nothing to merge, the view ends and nothing
    that was applied to it may leak into the conv before the reshape."""
    b = Builder(shape=(2, 4, 3, 4), seed=29)
    m = b.model([b.node("Relu", [_repmlp_like(b, with_local=False)])])
    new, report = convert_onnx(m)
    assert counts(new) == counts(m) and report.fused == []
    same_outputs(m, new, b.shape)


# ----------------------------------------------------------------------------
# API: CheckFailed, progress, the input never modified, big weights still fully checked
# ----------------------------------------------------------------------------

def test_failed_check_raises_check_failed_with_the_report():
    from repnp.errors import CheckFailed, ConversionError

    b = Builder(seed=41)
    m = b.model([repvgg(b, "x", 6)])
    with pytest.raises(CheckFailed, match="differs from the original") as info:
        convert_onnx(m, tol=0.0)   # the fused conv rounds differently from the branches
    assert isinstance(info.value, ConversionError)
    report = info.value.report
    assert report.check["passed"] is False and 0 < report.check["max_error"] <= 1e-5
    assert report.check["tol"] == 0.0 and len(report.fused) == 1


def test_progress_callback_reaches_the_total():
    b = Builder(seed=42)
    m = b.model([repvgg(b, repvgg(b, "x", 6), 6)])
    calls = []
    convert_onnx(m, check=False, progress=lambda done, total: calls.append((done, total)))
    total = len(m.graph.node)
    assert calls and calls[-1] == (total, total)
    assert all(t == total and 0 < d <= t for d, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_model_proto_argument_is_not_modified():
    b = Builder(seed=43)
    m = b.model([repvgg(b, "x", 6)])
    m.graph.node.reverse()   # out of order: the check sorts a copy; the input keeps its order
    before = m.SerializeToString()
    new, _ = convert_onnx(m)
    assert m.SerializeToString() == before and counts(new) == Counter({"Conv": 1, "Relu": 1})


@pytest.mark.parametrize("fold", [False, True])
def test_big_weights_output_passes_the_real_full_check(fold):
    # 24 -> 24 channels: every 3x3 kernel has 5184 elements, above the light check's 4096, so
    # the converter's own check ran on the light copy; the real checker must agree.
    b = Builder((1, 24, 7, 7), seed=44, fold=fold)
    m = b.model([repvgg(b, repvgg(b, "x", 24), 24)])
    new, report = convert_onnx(m)
    onnx.checker.check_model(new, full_check=True)
    assert counts(new) == Counter({"Conv": 2, "Relu": 2}) and report.check["max_error"] <= 1e-5
    assert all(t.raw_data for t in new.graph.initializer)
    same_outputs(m, new, b.shape)


def test_the_converter_does_its_math_through_fusion(monkeypatch):
    # One algebra, two front doors (repnp.fusion's module docstring): the converter's sums and per-channel maps are
    # repnp.fusion's rules 1 and 2, called with the kernels as read, their BN factors pending
    # (scales=) and their placements (offsets=). Spy on fusion and check the fused kernel.
    from repnp import fusion

    calls = []

    def spy(name):
        real = getattr(fusion, name)

        def wrapper(*args, **kwargs):
            calls.append((name, args, kwargs))
            return real(*args, **kwargs)
        return wrapper

    for name in ("add_branches", "scale_channels", "bn_scale_shift"):
        monkeypatch.setattr(fusion, name, spy(name))
    b = Builder(seed=3)
    m = b.model([repvgg(b, "x", 6)])
    new, _ = convert_onnx(m, check=False)
    sums = [kw for name, _, kw in calls if name == "add_branches"]
    assert len(sums) == 2 and [n for n, _, _ in calls].count("bn_scale_shift") == 3
    # the 3x3 + 1x1 sum: both BN factors still pending, the 1x1 placed at the centre
    assert sums[0]["offsets"] == [(0, 0), (1, 1)] and all(s is not None for s in sums[0]["scales"])
    assert sums[0]["kernel_size"] == (3, 3) and sums[0]["dtype"] == np.float64
    # the fused kernel is the sum of the three fuse_bn'd branches (identity as a 1x1 kernel)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    branches = []
    for k, bn in enumerate(bns):
        gamma, beta, mean, var = (inits[i].astype(np.float64) for i in bn.input[1:5])
        kernel = inits[convs[k].input[1]] if k < 2 else fusion.identity_kernel(6)
        branches.append(fusion.fuse_bn(kernel.astype(np.float64), None, mean, var, gamma, beta, eps=1e-5))
    want = fusion.add_branches(*branches)
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    got = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert rel_err(got[conv.input[1]], want.kernel) <= 1e-6 and rel_err(got[conv.input[2]], want.bias) <= 1e-6


# ----------------------------------------------------------------------------
# auto_pad: SAME_* with a known size is explicit padding
# ----------------------------------------------------------------------------

def _auto_conv(b, x, cin, cout, k, *, stride, auto_pad, dilation=1):
    """A conv-BN whose conv has ``auto_pad`` and no ``pads`` (as TF-converted models write it)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    w = b.rng.normal(0, 1 / np.sqrt(cin * kh * kw), (cout, cin, kh, kw))
    conv = b.node("Conv", [x, b.const(w)], kernel_shape=[kh, kw], strides=[stride, stride],
                  dilations=[dilation, dilation], auto_pad=auto_pad)
    return b.bn(conv, cout)


def _fused_pads(model):
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert "auto_pad" not in attrs
    return attrs["pads"]


# (H, W) = (10, 9) at stride 2: along H the 3x3 needs 1 pixel of padding in all (odd), along W 2.
@pytest.mark.parametrize("auto_pad,stride,dilation,want", [
    ("SAME_UPPER", 2, 1, [0, 1, 1, 1]),
    ("SAME_LOWER", 2, 1, [1, 1, 0, 1]),
    ("SAME_LOWER", 2, 2, [2, 2, 1, 2]),
    ("SAME_UPPER", 1, 2, [2, 2, 2, 2]),
])
def test_repvgg_sum_with_auto_pad_becomes_one_conv(auto_pad, stride, dilation, want):
    """3x3-BN + 1x1-BN (+ BN skip at stride 1), every conv with ``auto_pad``; checked in onnxruntime.

    onnxruntime 1.x refuses SAME_* with dilation ("Dilation not supported for
    AutoPadType::SAME_UPPER"): those cases run in ONNX's reference evaluator, which
    pads by the dilated extent as the operator spec's ``ceil(in / s)`` output requires.
    """
    b = Builder(shape=(2, 4, 10, 9), seed=40)
    y = b.node("Add", [_auto_conv(b, "x", 4, 4, 3, stride=stride, auto_pad=auto_pad, dilation=dilation),
                       _auto_conv(b, "x", 4, 4, 1, stride=stride, auto_pad=auto_pad)])
    if stride == 1:
        y = b.node("Add", [y, b.bn("x", 4)])
    m = b.model([y])
    new, report = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1}) and len(report.fused) == 1
    assert _fused_pads(new) == want
    assert report.check["max_error"] <= 1e-4
    same_outputs(m, new, b.shape, engine="onnxruntime" if dilation == 1 else "reference")


def test_even_kernel_same_upper_and_lower_put_the_odd_pixel_apart():
    """A 2x2 at stride 1 pads one pixel: after the map for SAME_UPPER, before it for SAME_LOWER."""
    for auto_pad, want in [("SAME_UPPER", [0, 0, 1, 1]), ("SAME_LOWER", [1, 1, 0, 0])]:
        b = Builder(shape=(1, 3, 5, 6), seed=41)
        y = b.node("Add", [_auto_conv(b, "x", 3, 3, 2, stride=1, auto_pad=auto_pad), b.bn("x", 3)])
        m = b.model([y])
        new, _ = convert_onnx(m)
        assert counts(new) == Counter({"Conv": 1})
        assert _fused_pads(new) == want
        same_outputs(m, new, b.shape, engine="onnxruntime")


def test_auto_pad_with_dynamic_size_fuses_at_stride_1_only():
    """At stride 1 SAME padding is d*(k-1) for every size; at stride 2 it depends on H and W:
    then the block is a near-match naming ``auto_pad``, not a silent "nothing found"."""
    b = Builder(shape=(1, 4, 8, 8), seed=42, input_dims=(1, 4, "H", "W"))
    y = b.node("Add", [_auto_conv(b, "x", 4, 4, 3, stride=1, auto_pad="SAME_UPPER"),
                       _auto_conv(b, "x", 4, 4, 1, stride=1, auto_pad="SAME_UPPER")])
    m = b.model([y])
    new, _ = convert_onnx(m, input_shape=(1, 4, 8, 8))
    assert counts(new) == Counter({"Conv": 1}) and _fused_pads(new) == [1, 1, 1, 1]
    for shape in [(1, 4, 8, 8), (1, 4, 7, 10)]:
        same_outputs(m, new, shape, engine="onnxruntime")

    b = Builder(shape=(1, 4, 8, 8), seed=42, input_dims=(1, 4, "H", "W"))
    y = b.node("Add", [_auto_conv(b, "x", 4, 4, 3, stride=2, auto_pad="SAME_UPPER"),
                       _auto_conv(b, "x", 4, 4, 1, stride=2, auto_pad="SAME_UPPER")])
    m = b.model([y])
    new, report = convert_onnx(m, input_shape=(1, 4, 8, 8))
    assert counts(new) == counts(m)
    reasons = [n for n in report.left if "auto_pad=SAME_UPPER" in n["reason"]]
    assert reasons and all(n["where"] for n in reasons)   # names at least one node
    assert "auto_pad" in str(report)
    for shape in [(1, 4, 8, 8), (1, 4, 7, 9)]:
        same_outputs(m, new, shape, tol=0, engine="onnxruntime")


def test_averagepool_same_upper_with_count_include_pad_is_a_conv():
    b = Builder(shape=(1, 4, 7, 8), seed=43)
    pooled = b.node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER",
                    count_include_pad=1)
    y = b.node("Add", [b.bn(pooled, 4), _auto_conv(b, "x", 4, 4, 3, stride=2, auto_pad="SAME_UPPER")])
    m = b.model([y])
    new, _ = convert_onnx(m)
    assert counts(new) == Counter({"Conv": 1}) and _fused_pads(new) == [1, 0, 1, 1]
    same_outputs(m, new, b.shape, engine="onnxruntime")
