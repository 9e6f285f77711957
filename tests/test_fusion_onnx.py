"""``repnp.fusion`` against onnxruntime: the unfused subgraph runs in ORT, the fused kernel in repnp.

Each test builds the *unfused* subgraph with ``onnx.helper`` (Conv,
BatchNormalization, Add, Concat, AveragePool, Pad, Slice, Flatten nodes, opset
17), runs it in onnxruntime on float32 with graph optimizations off (so ORT
does not fuse anything itself), and compares with ``repnp.ops.conv2d`` of the
kernel that ``repnp.fusion`` produced: tolerance rule, float32, <= 1e-5.
"""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp import fusion, ops
from repnp.blocks.base import random_bn, random_conv_weight
from repnp.testing import relative_error as rel_err

OPSET = 17
TOL = 1e-5  # the tolerance rule for one fusion in float32


class Graph:
    """A tiny builder: named initializers and nodes, one float32 input ``x``, one output."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def const(self, array, dtype=np.float32):
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def node(self, op, inputs, **attrs):
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv(self, x, weight, bias=None, *, stride=1, pads=0, dilation=1, groups=1):
        pads = ops.normalize_padding(pads)  # ONNX order (top, left, bottom, right)
        inputs = [x, self.const(weight)] + ([] if bias is None else [self.const(bias)])
        pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        return self.node("Conv", inputs, kernel_shape=list(weight.shape[2:]), strides=pair(stride),
                         pads=list(pads), dilations=pair(dilation), group=groups)

    def bn(self, x, bn):
        return self.node("BatchNormalization", [x] + [self.const(v) for v in
                                                    (bn.gamma, bn.beta, bn.mean, bn.var)], epsilon=bn.eps)

    def conv_bn(self, x, weight, bn, bias=None, **geometry):
        return self.bn(self.conv(x, weight, bias, **geometry), bn)

    def run(self, output, x, *, rank=4):
        dims = [f"d{i}" for i in range(rank)]  # symbolic: the checker wants a rank, ORT finds the sizes
        graph = helper.make_graph(
            self.nodes, "unfused",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, dims)],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8  # what opset 17 needs; accepted by every onnxruntime we support
        onnx.checker.check_model(model)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0].astype(np.float64)


def fused_bn(weight, bn, bias=None):
    return fusion.fuse_bn(weight, bias, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)


F32 = np.float32


def data(seed, c, h, w, n=2):
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal((n, c, h, w)).astype(F32)


# ----------------------------------------------------------------------------
# rule 1 and 4
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("ks, stride, pads, dilation, c_in, c_out, groups, eps", [
    ((3, 3), 1, 1, 1, 4, 6, 1, 1e-5),
    ((5, 1), (2, 1), (2, 0, 1, 0), (2, 1), 4, 6, 2, 1e-3),
    ((3, 3), 2, (1, 0, 0, 1), 1, 6, 6, 6, 0.1),
    ((1, 5), 1, (0, 2), (1, 2), 6, 3, 3, 1e-5),
])
def test_fuse_bn_vs_ort(ks, stride, pads, dilation, c_in, c_out, groups, eps):
    rng, x = data(1, c_in, 9, 10)
    weight = random_conv_weight(rng, c_out, c_in // groups, ks, dtype=F32)
    bias = (0.5 * rng.standard_normal(c_out)).astype(F32)
    bn = random_bn(rng, c_out, eps=eps, dtype=F32)
    geometry = dict(stride=stride, pads=pads, dilation=dilation, groups=groups)
    g = Graph()
    ref = g.run(g.conv_bn("x", weight, bn, bias, **geometry), x)
    kernel, fb = fused_bn(weight, bn, bias)
    assert kernel.dtype == F32
    got = ops.conv2d(x, kernel, fb, stride=stride, padding=pads, dilation=dilation, groups=groups)
    assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("c, groups, ks, dilation", [
    (4, 1, 3, 1), (4, 2, (1, 3), 1), (6, 6, (3, 5), 2), (6, 3, (5, 1), (2, 1)),
])
def test_bn_skip_as_identity_conv_vs_ort(c, groups, ks, dilation):
    """The BN-only branch (a lone BatchNormalization node) as ``fuse_bn(identity_kernel)``."""
    rng, x = data(2, c, 7, 8)
    bn = random_bn(rng, c, dtype=F32)
    g = Graph()
    ref = g.run(g.bn("x", bn), x)
    kernel = fusion.identity_kernel(c, groups=groups, kernel_size=ks, dtype=F32)
    kh, kw = kernel.shape[2:]
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    got = ops.conv2d(x, *fused_bn(kernel, bn), padding=(dh * (kh // 2), dw * (kw // 2)),
                     dilation=dilation, groups=groups)
    assert rel_err(got, ref) <= TOL


# ----------------------------------------------------------------------------
# rules 2, 3, 7: branches
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("stride, dilation, groups", [(1, 1, 1), (2, 1, 2), (1, 2, 4), ((2, 1), (1, 2), 1)])
def test_acnet_repvgg_branch_sum_vs_ort(stride, dilation, groups):
    """5x5 + 1x5 + 5x1 + 3x3 + 1x1 conv-BN branches and a BN skip, summed with Add nodes."""
    c = 4
    rng, x = data(3, c, 9, 11)
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    big = (2 * dh, 2 * dw)
    g, out, parts = Graph(), None, []
    for kh, kw in [(5, 5), (1, 5), (5, 1), (3, 3), (1, 1)]:
        weight = random_conv_weight(rng, c, c // groups, (kh, kw), dtype=F32)
        bn = random_bn(rng, c, dtype=F32)
        pads = (big[0] - dh * (5 - kh) // 2, big[1] - dw * (5 - kw) // 2)
        y = g.conv_bn("x", weight, bn, stride=stride, pads=pads, dilation=dilation, groups=groups)
        out = y if out is None else g.node("Add", [out, y])
        parts.append(fused_bn(weight, bn))
    if stride == 1:
        bn = random_bn(rng, c, dtype=F32)
        out = g.node("Add", [out, g.bn("x", bn)])
        parts.append(fused_bn(fusion.identity_kernel(c, groups=groups, dtype=F32), bn))
    ref = g.run(out, x)
    kernel, bias = fusion.add_branches(*parts)
    assert kernel.shape == (c, c // groups, 5, 5)
    got = ops.conv2d(x, kernel, bias, stride=stride, padding=big, dilation=dilation, groups=groups)
    assert rel_err(got, ref) <= TOL


def test_offsets_crop_and_asymmetric_pads_vs_ort():
    """Branches placed by explicit offsets: crops (Slice) and asymmetric pads.

    The 3x3 uses pads (top, left, bottom, right) = (0, 1, 0, 1). As in ACNet
    with padding below K//2, the 1x3 branch crops a row top and bottom
    (signed pads (-1, 1, -1, 1), offset (1, 0)); the 3x1 has no padding
    (offset (0, 1)); a 2x2 branch drops the last row and pads the left only
    (signed pads (0, 1, -1, 0), offset (0, 0)).
    """
    c_in, c_out = 3, 5
    rng, x = data(4, c_in, 8, 9)
    g, parts = Graph(), []
    w33, w13, w31, w22 = (random_conv_weight(rng, c_out, c_in, s, dtype=F32)
                          for s in [(3, 3), (1, 3), (3, 1), (2, 2)])
    bns = [random_bn(rng, c_out, dtype=F32) for _ in range(4)]
    i64 = lambda v: g.const([v], np.int64)  # noqa: E731
    crop_h = g.node("Slice", ["x", i64(1), i64(-1), i64(2)])      # x[:, :, 1:-1, :]
    drop_last = g.node("Slice", ["x", i64(0), i64(-1), i64(2)])   # x[:, :, :-1, :]
    ys = [g.conv_bn("x", w33, bns[0], pads=(0, 1, 0, 1)), g.conv_bn(crop_h, w13, bns[1], pads=(0, 1, 0, 1)),
          g.conv_bn("x", w31, bns[2]), g.conv_bn(drop_last, w22, bns[3], pads=(0, 1, 0, 0))]
    out = g.node("Add", [g.node("Add", [ys[0], ys[1]]), g.node("Add", [ys[2], ys[3]])])
    ref = g.run(out, x)
    weights, signed_pads = [w33, w13, w31, w22], [(0, 1, 0, 1), (-1, 1, -1, 1), 0, (0, 1, -1, 0)]
    offsets = [fusion.kernel_offset(w.shape[2:], p, kernel_size=3, padding=(0, 1, 0, 1))
               for w, p in zip(weights, signed_pads)]
    assert offsets == [(0, 0), (1, 0), (0, 1), (0, 0)]
    for weight, offset, bn in zip(weights, offsets, bns):
        parts.append(fused_bn(fusion.pad_kernel(weight, 3, offset=offset), bn))
    got = ops.conv2d(x, *fusion.add_branches(*parts), padding=(0, 1, 0, 1))
    assert rel_err(got, ref) <= TOL


def test_concat_branches_vs_ort():
    c_in = 3
    rng, x = data(5, c_in, 7, 6)
    g, ys, parts = Graph(), [], []
    for c_out, ks, pads in [(4, 3, 1), (2, 1, 0), (3, (1, 3), (0, 1))]:
        weight = random_conv_weight(rng, c_out, c_in, ks, dtype=F32)
        bn = random_bn(rng, c_out, dtype=F32)
        ys.append(g.conv_bn("x", weight, bn, stride=2, pads=pads))
        parts.append(fused_bn(weight, bn))
    ref = g.run(g.node("Concat", ys, axis=1), x)
    kernel, bias = fusion.concat_branches(*parts)
    assert kernel.shape == (9, c_in, 3, 3)
    assert rel_err(ops.conv2d(x, kernel, bias, stride=2, padding=1), ref) <= TOL


# ----------------------------------------------------------------------------
# rule 5: 1x1 -> KxK and KxK -> 1x1
# ----------------------------------------------------------------------------

def _border_mask_graph(g, y, value, pads, shape):
    """Pad ``y`` with ``value[c]`` per channel: a zero Pad, then Add of a constant border mask.

    ONNX Pad takes one scalar, so a per-channel pad value cannot be one Pad
    node. PyTorch exports DBB's BNAndPad as a zero Pad plus ScatterND writes of
    the values into the border; adding a constant tensor that is ``value[c]``
    on the border and 0 inside computes the same thing with two plain nodes
    (the input size is fixed here).
    """
    top, left, bottom, right = pads
    n, c, h, w = shape
    mask = np.empty((1, c, h + top + bottom, w + left + right), dtype=F32)
    mask[...] = value[None, :, None, None]
    mask[:, :, top:top + h, left:left + w] = 0
    padded = g.node("Pad", [y, g.const([0, 0, top, left, 0, 0, bottom, right], np.int64)], mode="constant")
    return g.node("Add", [padded, g.const(mask)])


@pytest.mark.parametrize("ks, stride, pads, dilation, groups", [
    ((3, 3), 1, (1, 1, 1, 1), 1, 1), ((3, 3), 2, (1, 2, 0, 1), 1, 2), ((5, 3), 1, (4, 2, 4, 2), 2, 4),
    ((1, 3), (1, 2), (0, 1, 0, 1), 1, 4),
])
def test_merge_sequential_vs_ort(ks, stride, pads, dilation, groups):
    c_in, mid, c_out = 4, 8, 4
    rng, x = data(6, c_in, 11, 12)
    w1 = random_conv_weight(rng, mid, c_in // groups, 1, dtype=F32)
    b1 = (0.5 * rng.standard_normal(mid)).astype(F32)
    w2 = random_conv_weight(rng, c_out, mid // groups, ks, dtype=F32)
    bn1, bn2 = random_bn(rng, mid, dtype=F32), random_bn(rng, c_out, dtype=F32)
    geometry = dict(stride=stride, dilation=dilation, groups=groups)
    kernel, bias = fusion.merge_sequential(fused_bn(w1, bn1, b1), fused_bn(w2, bn2), groups=groups)
    got = ops.conv2d(x, kernel, bias, padding=pads, **geometry)

    # (a) DBB's BNAndPad: pad value = the first conv-BN's output at zero input, computed from the
    # unfused parameters; exact everywhere.
    at_zero = ops.batch_norm(b1[None, :].astype(np.float64), bn1.mean, bn1.var, bn1.gamma, bn1.beta,
                             eps=bn1.eps)[0].astype(F32)
    g = Graph()
    y1 = g.conv_bn("x", w1, bn1, b1, groups=groups)
    padded = _border_mask_graph(g, y1, at_zero, ops.normalize_padding(pads), (2, mid) + x.shape[2:])
    ref = g.run(g.conv_bn(padded, w2, bn2, **geometry), x)
    assert rel_err(got, ref) <= TOL

    # (b) plain zero padding of the intermediate map: equal in the interior, not on the border.
    g = Graph()
    ref0 = g.run(g.conv_bn(g.conv_bn("x", w1, bn1, b1, groups=groups), w2, bn2, pads=pads, **geometry), x)
    top, left = ops.normalize_padding(pads)[:2]
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    # Interior: the output's window lies inside the unpadded intermediate map.
    rows = [i for i in range(ref0.shape[2]) if 0 <= sh * i - top <= x.shape[2] - 1 - dh * (ks[0] - 1)]
    cols = [j for j in range(ref0.shape[3]) if 0 <= sw * j - left <= x.shape[3] - 1 - dw * (ks[1] - 1)]
    inner = np.ix_(range(2), range(c_out), rows, cols)
    assert rows and cols and len(rows) * len(cols) < ref0.shape[2] * ref0.shape[3]
    assert rel_err(got[inner], ref0[inner]) <= TOL
    assert rel_err(got, ref0) > 1e-3


def test_dbb_1x1_avgpool_branch_vs_ort():
    """DBB's 1x1-BN -> (BN-and-pad) -> AvgPool 3x3 stride 2 -> BN branch as one 3x3 conv."""
    c, groups = 6, 2
    rng, x = data(7, c, 9, 8)
    w1 = random_conv_weight(rng, c, c // groups, 1, dtype=F32)
    bn1, bn2 = random_bn(rng, c, dtype=F32), random_bn(rng, c, dtype=F32)
    # The 1x1 has no bias: its conv-BN gives the BN of 0 at zero input.
    at_zero = ops.batch_norm(np.zeros((1, c)), bn1.mean, bn1.var, bn1.gamma, bn1.beta, eps=bn1.eps)[0]
    g = Graph()
    y1 = g.conv_bn("x", w1, bn1, groups=groups)
    padded = _border_mask_graph(g, y1, at_zero.astype(F32), (1, 1, 1, 1), (2, c, 9, 8))
    pooled = g.node("AveragePool", [padded], kernel_shape=[3, 3], strides=[2, 2], count_include_pad=1)
    ref = g.run(g.bn(pooled, bn2), x)
    pool = fusion.avgpool_kernel(c, 3, groups=groups, dtype=F32)
    kernel, bias = fusion.merge_sequential(fused_bn(w1, bn1), fused_bn(pool, bn2), groups=groups)
    assert rel_err(ops.conv2d(x, kernel, bias, stride=2, padding=1, groups=groups), ref) <= TOL


@pytest.mark.parametrize("ks, groups, c_in, mid", [((3, 3), 1, 4, 5), ((3, 3), 6, 6, 6), ((1, 5), 2, 4, 6)])
def test_merge_pointwise_vs_ort(ks, groups, c_in, mid):
    """KxK conv-BN (grouped / depthwise) -> 1x1 conv-BN (ResRep compactor, MobileNet dw -> pw)."""
    c_out = 3
    rng, x = data(8, c_in, 8, 7)
    w1 = random_conv_weight(rng, mid, c_in // groups, ks, dtype=F32)
    w2 = random_conv_weight(rng, c_out, mid, 1, dtype=F32)
    bn1, bn2 = random_bn(rng, mid, dtype=F32), random_bn(rng, c_out, dtype=F32)
    pads = (ks[0] // 2, ks[1] // 2)
    g = Graph()
    ref = g.run(g.conv_bn(g.conv_bn("x", w1, bn1, stride=2, pads=pads, groups=groups), w2, bn2), x)
    kernel, bias = fusion.merge_pointwise(fused_bn(w1, bn1), fused_bn(w2, bn2), groups=groups)
    assert kernel.shape == (c_out, c_in) + ks  # dense
    assert rel_err(ops.conv2d(x, kernel, bias, stride=2, padding=pads), ref) <= TOL


@pytest.mark.parametrize("groups, second_groups, c_in, mid, c_out", [(6, 3, 6, 6, 9), (4, 6, 4, 12, 6)])
def test_merge_pointwise_grouped_1x1_vs_ort(groups, second_groups, c_in, mid, c_out):
    """KxK conv-BN -> 1x1 group conv-BN (ShuffleNet's dw -> GConv): one conv with gcd(groups) groups."""
    rng, x = data(10, c_in, 8, 7)
    w1 = random_conv_weight(rng, mid, c_in // groups, 3, dtype=F32)
    w2 = random_conv_weight(rng, c_out, mid // second_groups, 1, dtype=F32)
    bn1, bn2 = random_bn(rng, mid, dtype=F32), random_bn(rng, c_out, dtype=F32)
    g = Graph()
    hidden = g.conv_bn("x", w1, bn1, stride=2, pads=(1, 1), groups=groups)
    ref = g.run(g.conv_bn(hidden, w2, bn2, groups=second_groups), x)
    kernel, bias = fusion.merge_pointwise(fused_bn(w1, bn1), fused_bn(w2, bn2), groups=groups,
                                          second_groups=second_groups)
    common = math.gcd(groups, second_groups)
    assert kernel.shape == (c_out, c_in // common, 3, 3)
    assert rel_err(ops.conv2d(x, kernel, bias, stride=2, padding=1, groups=common), ref) <= TOL


# ----------------------------------------------------------------------------
# rules 6 and 8
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("ks, stride, pads", [
    (3, 1, (1, 1, 1, 1)), ((2, 3), 2, (1, 0, 0, 1)), (5, (2, 1), (2, 2, 2, 2)),
])
def test_avgpool_kernel_vs_ort(ks, stride, pads):
    c = 3
    _, x = data(9, c, 8, 9)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    g = Graph()
    attrs = dict(kernel_shape=pair(ks), strides=pair(stride), pads=list(pads))
    ref = g.run(g.node("AveragePool", ["x"], count_include_pad=1, **attrs), x)
    kernel = fusion.avgpool_kernel(c, ks, groups=c, dtype=F32)
    got = ops.conv2d(x, kernel, stride=stride, padding=pads, groups=c)
    assert rel_err(got, ref) <= TOL
    # ONNX's default count_include_pad=0 is not this conv: it differs on the border.
    g = Graph()
    exclude = g.run(g.node("AveragePool", ["x"], **attrs), x)
    assert rel_err(got, exclude) > 1e-2


def test_conv_to_fc_vs_ort():
    c_in, c_out, groups = 4, 6, 2
    rng, x = data(10, c_in, 5, 6)
    weight = random_conv_weight(rng, c_out, c_in // groups, 3, dtype=F32)
    bn = random_bn(rng, c_out, dtype=F32)
    geometry = dict(stride=2, pads=(1, 0, 1, 1), dilation=(1, 2), groups=groups)
    g = Graph()
    ref = g.run(g.node("Flatten", [g.conv_bn("x", weight, bn, **geometry)], axis=1), x, rank=2)
    kernel, bias = fused_bn(weight, bn)
    matrix, fc_bias = fusion.conv_to_fc(kernel, bias, input_shape=x.shape[1:], stride=2, padding=(1, 0, 1, 1),
                                        dilation=(1, 2), groups=groups)
    assert matrix.shape == (ref.shape[1], c_in * 5 * 6)
    assert rel_err(ops.linear(x.reshape(2, -1), matrix, fc_bias), ref) <= TOL
