"""``repnp.fusion.masked``: ECB's masked depthwise kernels and the 1x1 -> depthwise merge.

Reference: the unfused computation in float64 with ``repnp.ops`` (1x1 conv + BN, its output
padded with its own value at zero input per channel -- ECB's bias padding -- then the
depthwise conv without padding), weights and BN statistics random (mean != 0, var != 1,
gamma != 1, beta != 0); tolerance rule float64 1e-12, float32 1e-5; and onnxruntime on the
unfused graph as PyTorch exports it (Conv, zero Pad, ScatterND writes of the bias on the
border, depthwise Conv).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from repnp import fusion, ops
from repnp.blocks.base import random_bn, random_conv_weight
from repnp.errors import ShapeError
from repnp.testing import TOLERANCES, relative_error


def _first(rng, m, cg, dtype):
    """A 1x1 conv with its BN folded in: a non-zero bias, as ECB's b0."""
    bn = random_bn(rng, m, dtype=dtype)
    return fusion.fuse_bn(random_conv_weight(rng, m, cg, 1, dtype=dtype), None, bn.mean, bn.var, bn.gamma,
                          bn.beta, eps=bn.eps)


def _unfused(x, first, second, *, groups, pad, stride, dilation):
    x, w1, b1, d, b2 = (np.asarray(a, dtype=np.float64) for a in (x, *first, *second))
    y = ops.conv2d(x, w1, b1, groups=groups)
    y = ops.pad2d(y, pad, value=b1)          # ECB: zeros, then b0 written on the border
    return ops.conv2d(y, d, b2, stride=stride, dilation=dilation, groups=d.shape[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.sampled_from([1, 2, 3]), mpg=st.integers(1, 3),
       cpg=st.integers(1, 3), k=st.sampled_from([1, 3, 5, (3, 1), (1, 3)]), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), dtype=st.sampled_from([np.float64, np.float32]), masked=st.booleans())
def test_merge_depthwise_equals_unfused(seed, groups, mpg, cpg, k, stride, dilation, dtype, masked):
    rng = np.random.default_rng(seed)
    m, c = groups * mpg, groups * cpg
    kh, kw = ops.pair(k)
    first = _first(rng, m, cpg, dtype)
    if masked and (kh, kw) == (3, 3):
        d = fusion.masked_kernel(rng.standard_normal((m, 1, 1, 1)).astype(dtype),
                                 fusion.edge_mask(["sobelx", "sobely", "laplacian"][seed % 3]))
    else:
        d = random_conv_weight(rng, m, 1, (kh, kw), dtype=dtype)
    second = (d, rng.standard_normal(m).astype(dtype))
    pad = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    x = rng.standard_normal((2, c, 7, 8)).astype(dtype)
    kernel, bias = fusion.merge_depthwise(first, second)
    assert kernel.shape == (m, cpg, kh, kw) and kernel.dtype == np.dtype(dtype) and bias.dtype == np.dtype(dtype)
    got = ops.conv2d(x.astype(np.float64), kernel.astype(np.float64), bias.astype(np.float64), padding=pad,
                     stride=stride, dilation=dilation, groups=groups)
    ref = _unfused(x, first, second, groups=groups, pad=pad, stride=stride, dilation=dilation)
    assert relative_error(got, ref) <= TOLERANCES[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merge_depthwise_is_merge_sequential_with_a_diagonal_second_conv(dtype):
    rng = np.random.default_rng(3)
    first = _first(rng, 6, 4, dtype)
    d = random_conv_weight(rng, 6, 1, 3, dtype=dtype)
    b2 = rng.standard_normal(6).astype(dtype)
    a = fusion.merge_depthwise(first, (d, b2))
    b = fusion.merge_sequential(first, (fusion.ungroup_kernel(d, groups=6), b2))
    assert relative_error(a.kernel, b.kernel) <= TOLERANCES[np.dtype(dtype)]
    assert relative_error(a.bias, b.bias) <= TOLERANCES[np.dtype(dtype)]


def test_masked_kernel_and_edge_masks():
    sx = fusion.edge_mask("sobelx")
    assert sx.tolist() == [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    assert fusion.edge_mask("sobely").tolist() == sx.T.tolist()
    lap = fusion.edge_mask("laplacian")
    assert lap.sum() == 0 and lap[1, 1] == -4
    k = fusion.masked_kernel(np.array([2.0, -1.0], dtype=np.float32).reshape(2, 1, 1, 1), lap)
    assert k.shape == (2, 1, 3, 3) and k.dtype == np.float32
    assert np.array_equal(k[1, 0], -lap) and np.array_equal(k[0, 0], 2 * lap)
    full = np.stack([lap, sx])[:, None]
    assert np.array_equal(fusion.masked_kernel([1.0, 3.0], full)[1, 0], 3 * sx)


@pytest.mark.parametrize("call, match", [
    (lambda: fusion.merge_depthwise((np.ones((4, 2, 3, 3)), None), (np.ones((4, 1, 3, 3)), None)), "1x1"),
    (lambda: fusion.merge_depthwise((np.ones((4, 2, 1, 1)), None), (np.ones((4, 4, 3, 3)), None)), "depthwise"),
    (lambda: fusion.merge_depthwise((np.ones((4, 2, 1, 1)), None), (np.ones((5, 1, 3, 3)), None)), "depthwise"),
    (lambda: fusion.masked_kernel(np.ones((3, 2)), np.ones((3, 3))), "scale"),
    (lambda: fusion.masked_kernel(np.ones(3), np.ones((2, 1, 3, 3))), "mask"),
])
def test_bad_shapes_are_named(call, match):
    with pytest.raises(ShapeError, match=match):
        call()


def test_edge_mask_unknown_kind():
    with pytest.raises(ValueError, match="sobelx"):
        fusion.edge_mask("prewitt")


@pytest.mark.parametrize("groups, kind", [(1, "sobelx"), (2, "laplacian"), (1, "sobely")])
def test_merge_depthwise_vs_onnxruntime_bias_padded_graph(groups, kind):
    """The unfused branch as PyTorch exports ECB's SeqConv3x3: Conv 1x1, Pad with zeros,
    ScatterND writes of b0 on the 1-pixel border, depthwise Conv (padding 0)."""
    rng = np.random.default_rng(7)
    m, cpg, h, w = 4, 3, 6, 7
    w1, b1 = _first(rng, m, cpg, np.float32)
    d = fusion.masked_kernel(rng.standard_normal(m).astype(np.float32), fusion.edge_mask(kind))
    b2 = rng.standard_normal(m).astype(np.float32)
    x = rng.standard_normal((1, cpg * groups, h, w)).astype(np.float32)
    border = np.ones((h + 2, w + 2), bool)
    border[1:-1, 1:-1] = False
    iy, ix = np.nonzero(border)
    idx = np.array([[[0, c, y, x_] for y, x_ in zip(iy, ix)] for c in range(m)], dtype=np.int64)
    upd = np.repeat(b1[:, None], len(iy), axis=1).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (d, "d"), (b2, "b2"), (idx, "idx"),
                                                        (upd, "upd"),
                                                        (np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y0"], kernel_shape=[1, 1], group=groups),
             helper.make_node("Pad", ["y0", "pads"], ["y1"]),
             helper.make_node("ScatterND", ["y1", "idx", "upd"], ["y2"]),
             helper.make_node("Conv", ["y2", "d", "b2"], ["y"], kernel_shape=[3, 3], group=m)]
    graph = helper.make_graph(nodes, "seqconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model.SerializeToString(), options,
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    kernel, bias = fusion.merge_depthwise((w1, b1), (d, b2))
    got = ops.conv2d(x, kernel, bias, padding=1, groups=groups)
    assert relative_error(got, ref) <= 1e-5
