"""``repnp.fusion.dilate_kernel``: a dilated conv equals the dense conv of its dilated kernel.

References are the unfused computations: ``repnp.ops.conv2d`` with ``dilation`` (float64,
on the same numbers) and onnxruntime's Conv with ``dilations`` (float32, graph
optimizations off). UniRepLKNet's merge (a large depthwise kernel with BN plus dilated
depthwise branches with BN, all centred) is checked against the sum of the branches.
Tolerance rule: float64 <= 1e-12, float32 <= 1e-5.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repnp import fusion, ops
from repnp.blocks.base import random_bn, random_conv_weight
from repnp.errors import ShapeError
from repnp.testing import TOLERANCES, relative_error

DTYPES = [np.float64, np.float32]


def _close(got, ref, dtype):
    assert np.shape(got) == np.shape(ref)
    assert np.max(np.abs(ref)) > 0
    err = relative_error(got, ref)
    assert err <= TOLERANCES[np.dtype(dtype)], err


def test_dilate_kernel_places_taps_dilation_apart():
    k = np.arange(1, 7, dtype=np.float64).reshape(1, 1, 2, 3)
    dense = fusion.dilate_kernel(k, dilation=(3, 2))
    assert dense.shape == (1, 1, 4, 5)
    expected = np.zeros((4, 5))
    expected[0, [0, 2, 4]] = [1, 2, 3]
    expected[3, [0, 2, 4]] = [4, 5, 6]
    np.testing.assert_array_equal(dense[0, 0], expected)
    assert fusion.dilated_size(3, dilation=2) == (5, 5)
    one = fusion.dilate_kernel(k, dilation=1)
    np.testing.assert_array_equal(one, k)
    assert one is not k and one.dtype == k.dtype


def test_dilate_kernel_rejects_bad_input():
    with pytest.raises(ShapeError, match="OIHW"):
        fusion.dilate_kernel(np.ones((3, 3)), dilation=2)
    with pytest.raises(ShapeError, match="dilation"):
        fusion.dilate_kernel(np.ones((1, 1, 3, 3)), dilation=0)


@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES),
       ks=st.sampled_from([(1, 1), (3, 3), (5, 5), (3, 1), (2, 3)]),
       dilation=st.tuples(st.integers(1, 4), st.integers(1, 4)), stride=st.integers(1, 2),
       pads=st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)),
       groups=st.sampled_from([1, 2]), with_bias=st.booleans())
def test_dilated_conv_equals_dense_conv(seed, dtype, ks, dilation, stride, pads, groups, with_bias):
    rng = np.random.default_rng(seed)
    c = 2 * groups
    w = random_conv_weight(rng, c, c // groups, ks, dtype=dtype)
    b = rng.standard_normal(c).astype(dtype) if with_bias else None
    ext = fusion.dilated_size(ks, dilation=dilation)
    x = rng.standard_normal((2, c, ext[0] + 3, ext[1] + 2)).astype(dtype)
    ref = ops.conv2d(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64),
                     stride=stride, padding=pads, dilation=dilation, groups=groups)
    dense = fusion.dilate_kernel(w, dilation=dilation)
    assert dense.dtype == dtype
    got = ops.conv2d(x, dense, b, stride=stride, padding=pads, groups=groups)
    _close(got, ref, dtype)


def _unireplknet_case(rng, channels, big, table, dtype):
    """A DilatedReparamBlock's branches: (kernel, bn, dilation), the large one first."""
    branches = [(random_conv_weight(rng, channels, 1, big, dtype=dtype), random_bn(rng, channels, dtype=dtype), 1)]
    for k, r in table:
        w = random_conv_weight(rng, channels, 1, k, dtype=dtype)
        branches.append((w, random_bn(rng, channels, dtype=dtype), r))
    return branches


@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES),
       case=st.sampled_from([(5, [(3, 1), (3, 2)]), (7, [(5, 1), (3, 2), (3, 3)]),
                             (9, [(5, 1), (5, 2), (3, 3), (3, 4)])]),
       channels=st.integers(1, 4), extra=st.integers(0, 3))
def test_unireplknet_merge_equals_sum_of_dilated_branches(seed, dtype, case, channels, extra):
    big, table = case
    rng = np.random.default_rng(seed)
    branches = _unireplknet_case(rng, channels, big, table, dtype)
    x = rng.standard_normal((2, channels, big + extra, big + 2)).astype(dtype)
    x64 = x.astype(np.float64)
    ref = 0.0
    parts = []
    for w, bn, r in branches:
        k = w.shape[2]
        pad = (r * (k - 1) + 1) // 2          # the official padding of each branch
        y = ops.conv2d(x64, w.astype(np.float64), None, padding=pad, dilation=r, groups=channels)
        ref = ref + ops.batch_norm(y, *(np.asarray(v, np.float64) for v in (bn.mean, bn.var, bn.gamma, bn.beta)),
                                   eps=bn.eps)
        kb = fusion.fuse_bn(w, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
        parts.append((fusion.dilate_kernel(kb.kernel, dilation=r), kb.bias))
    kernel, bias = fusion.add_branches(*parts, kernel_size=big)
    assert kernel.shape == (channels, 1, big, big) and kernel.dtype == dtype
    got = ops.conv2d(x, kernel, bias, padding=big // 2, groups=channels)
    _close(got, ref, dtype)


@pytest.mark.parametrize("dilation", [(2, 2), (3, 1), (1, 4)])
def test_dilate_kernel_against_onnxruntime(dilation):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = random_conv_weight(rng, 4, 2, (3, 3), dtype=np.float32)
    x = rng.standard_normal((1, 4, 13, 11)).astype(np.float32)
    pads = [2, 1, 3, 2]
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], dilations=list(dilation),
                            pads=pads, group=2, strides=[1, 2])
    graph = helper.make_graph([node], "dilated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ref = session.run(None, {"x": x})[0]
    got = ops.conv2d(x, fusion.dilate_kernel(w, dilation=dilation), None, padding=pads, stride=(1, 2), groups=2)
    _close(got, ref.astype(np.float64), np.float32)
