"""The ONNX converter on summed convs with different dilations (UniRepLKNet's Dilated Reparam Block).

Small graphs built with ``onnx.helper``: a large conv plus dilated branches (each with a BN,
or not) becomes one conv whose output matches the unfused graph (the converter's own check,
and onnxruntime here); merges that would cost more than the branches are left, with the reason.
Before dilated branches were re-expressed at a common dilation, every one of these sums was left
("dilations differ").
"""

import collections

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from repnp.blocks.base import random_bn, random_conv_weight
from repnp.io import convert_onnx
from repnp.io.onnx.check import run_model
from repnp.testing import relative_error


class G:
    def __init__(self, channels, size):
        self.nodes, self.inits, self.n = [], [], 0
        self.channels, self.size = channels, size
        self.rng = np.random.default_rng(channels * 100 + size)

    def const(self, a):
        self.n += 1
        self.inits.append(numpy_helper.from_array(np.asarray(a, np.float32), f"c{self.n}"))
        return f"c{self.n}"

    def node(self, op, inputs, **attrs):
        self.n += 1
        self.nodes.append(helper.make_node(op, inputs, [f"t{self.n}"], name=f"{op}_{self.n}", **attrs))
        return f"t{self.n}"

    def branch(self, k, dilation, pads, *, bn=True, groups=None):
        c = self.channels
        groups = c if groups is None else groups
        kh, kw = (k, k) if isinstance(k, int) else k
        dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
        w = random_conv_weight(self.rng, c, c // groups, (kh, kw), dtype=np.float32)
        y = self.node("Conv", ["x", self.const(w)], kernel_shape=[kh, kw], dilations=[dh, dw], pads=list(pads),
                      group=groups)
        if bn:
            b = random_bn(self.rng, c, dtype=np.float32)
            y = self.node("BatchNormalization", [y] + [self.const(v) for v in (b.gamma, b.beta, b.mean, b.var)],
                          epsilon=1e-5)
        return y

    def model(self, out):
        graph = helper.make_graph(
            self.nodes, "dilated",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, self.channels, self.size, self.size + 1])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", "c", "h", "w"])], initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m


def _sum(g, names):
    y = names[0]
    for n in names[1:]:
        y = g.node("Add", [y, n])
    return y


def _convert(model):
    x = np.random.default_rng(0).standard_normal((1,) + tuple(
        d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)[1:]).astype(np.float32)
    ref = run_model(model, {"x": x})[0][0]
    fused, report = convert_onnx(model)
    assert report.check["passed"]
    assert relative_error(run_model(fused, {"x": x})[0][0], ref) <= 1e-5
    return fused, report, collections.Counter(n.op_type for n in fused.graph.node)


def test_large_kernel_plus_dilated_branches_is_one_conv():
    g = G(4, 15)
    y = _sum(g, [g.branch(7, 1, [3] * 4), g.branch(5, 1, [2] * 4), g.branch(3, 2, [2] * 4, bn=False),
                 g.branch(3, 3, [3] * 4)])
    fused, report, counts = _convert(g.model(y))
    assert counts == {"Conv": 1}
    (conv,) = fused.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["kernel_shape"] == [7, 7] and attrs.get("dilations", [1, 1]) == [1, 1]


def test_branches_at_a_common_dilation_keep_it():
    # 5x5 with dilation 2 (extent 9) and 3x3 with dilation 4 (extent 9): one 5x5 with dilation 2
    g = G(3, 14)
    y = _sum(g, [g.branch(5, 2, [4] * 4), g.branch(3, 4, [4] * 4)])
    fused, _, counts = _convert(g.model(y))
    assert counts == {"Conv": 1}
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert attrs["kernel_shape"] == [5, 5] and attrs["dilations"] == [2, 2]


def test_asymmetric_dilation_and_dense_groups():
    # a 3x3 kernel with dilations (2, 1) (extent 5x3) inside a dense 5x5, groups 2
    g = G(4, 11)
    y = _sum(g, [g.branch(5, 1, [2] * 4, groups=2), g.branch(3, (2, 1), [2, 1, 2, 1], groups=2)])
    _, _, counts = _convert(g.model(y))
    assert counts == {"Conv": 1}


def test_costlier_merges_are_left_with_the_reason():
    # two dilated branches alone: 3x3 d2 + 3x3 d3 would be a dense 7x7 (49 taps for 18)
    g = G(4, 12)
    y = _sum(g, [g.branch(3, 2, [2] * 4), g.branch(3, 3, [3] * 4)])
    _, report, counts = _convert(g.model(y))
    assert counts["Conv"] == 2 and counts["Add"] == 1
    assert any("cost more" in item["reason"] for item in report.left), report.left
    # a dilated branch reaching outside the large kernel: 5x5 + 3x3 d3 (extent 7)
    g = G(4, 12)
    y = _sum(g, [g.branch(5, 1, [2] * 4), g.branch(3, 3, [3] * 4)])
    _, report, counts = _convert(g.model(y))
    assert counts["Conv"] == 2
    assert any("cost more" in item["reason"] for item in report.left), report.left


def _conv_weights(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return sum(inits[n.input[1]].size for n in model.graph.node if n.op_type == "Conv")


@given(big=st.sampled_from([3, 5, 7, 9]), data=st.data())
@settings(max_examples=15)
def test_random_dilated_sums_are_exact_and_never_costlier(big, data):
    branches = data.draw(st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.integers(1, 4), st.booleans()),
                                  min_size=1, max_size=3))
    g = G(2, 12)
    names = [g.branch(big, 1, [big // 2] * 4)]
    for k, r, bn in branches:
        pad = r * (k // 2)
        names.append(g.branch(k, r, [pad] * 4, bn=bn))
    model = g.model(_sum(g, names))
    fused, _, counts = _convert(model)
    assert _conv_weights(fused) <= _conv_weights(model)
    if all(r * (k - 1) + 1 <= big for k, r, _ in branches):
        assert counts == {"Conv": 1}            # every branch inside the large kernel: one conv
