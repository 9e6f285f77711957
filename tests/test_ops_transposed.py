"""``repnp.ops.conv_transpose2d`` (repnp/ops_transposed.py) against onnxruntime and its definition.

Two sources of truth: onnxruntime's ``ConvTranspose`` (float32: onnxruntime has no float64
kernel for it) over strides, asymmetric pads, output padding, dilations and groups; and, in
float64, the operator's definition written out as loops (every input pixel scatters its kernel
into the output). The ONNX node cases of ``ConvTranspose`` run in ``tests/test_ops_conformance.py``.
Tolerance rule: ``max|ours - ref| / max|ref|`` <= 1e-5 float32, <= 1e-12 float64.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from repnp import ops
from repnp.errors import ShapeError
from repnp.ops_transposed import conv_transpose_output_size
from repnp.tolerance import relative_error


def _onnxruntime(x, w, b, attrs):
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    graph = oh.make_graph([oh.make_node("ConvTranspose", inputs, ["y"], **attrs)], "g",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _definition(x, w, b, *, stride, pads, output_padding, dilation, groups):
    """The ONNX / PyTorch definition as loops: y[s i - p + d u] += x[i] w[u], per channel pair."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    (sh, sw), (dh, dw), (oph, opw) = stride, dilation, output_padding
    top, left, bottom, right = pads
    ho = sh * (h - 1) + oph + dh * (kh - 1) + 1 - top - bottom
    wo = sw * (wd - 1) + opw + dw * (kw - 1) + 1 - left - right
    y = np.zeros((n, og * groups, ho, wo))
    cg = c // groups
    for ci in range(c):
        g = ci // cg
        for j in range(og):
            for i in range(h):
                for k in range(wd):
                    for u in range(kh):
                        for v in range(kw):
                            r, q = sh * i - top + dh * u, sw * k - left + dw * v
                            if 0 <= r < ho and 0 <= q < wo:
                                y[:, g * og + j, r, q] += x[:, ci, i, k] * w[ci, j, u, v]
    if b is not None:
        y += b[None, :, None, None]
    return y


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3),
       sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]),
       bias=st.booleans(), out_pad=st.booleans(), pads=st.lists(st.integers(0, 2), min_size=4, max_size=4))
def test_matches_onnxruntime(seed, kh, kw, sh, sw, dh, dw, groups, bias, out_pad, pads):
    rng = np.random.default_rng(seed)
    # onnxruntime wants each pad within the dilated kernel's reach and output_padding < stride
    # (PyTorch: < stride or dilation; the test of the definition below covers the rest)
    pads = [min(p, d * (k - 1)) for p, d, k in zip(pads, (dh, dw, dh, dw), (kh, kw, kh, kw))]
    output_padding = [sh - 1 if out_pad else 0, sw - 1 if out_pad else 0]
    cin, per_group = groups * int(rng.integers(1, 4)), int(rng.integers(1, 4))
    x = rng.standard_normal((2, cin, int(rng.integers(1, 6)), int(rng.integers(1, 6)))).astype(np.float32)
    assume(min(conv_transpose_output_size(size, k, stride=s, pad_begin=p0, pad_end=p1, output_padding=op,
                                          dilation=d) for size, k, s, p0, p1, op, d in
               zip(x.shape[2:], (kh, kw), (sh, sw), pads[:2], pads[2:], output_padding, (dh, dw))) >= 1)
    w = rng.standard_normal((cin, per_group, kh, kw)).astype(np.float32)
    b = rng.standard_normal(per_group * groups).astype(np.float32) if bias else None
    attrs = {"strides": [sh, sw], "pads": pads, "dilations": [dh, dw], "group": groups,
             "output_padding": output_padding, "kernel_shape": [kh, kw]}
    want = _onnxruntime(x, w, b, attrs)
    got = ops.conv_transpose2d(x, w, b, stride=(sh, sw), padding=pads, output_padding=output_padding,
                               dilation=(dh, dw), groups=groups)
    assert got.shape == want.shape and got.dtype == np.float32
    assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("case", [
    # (C_in, C_out/g, k, stride, pads, output_padding, dilation, groups, (H, W))
    (4, 3, (2, 2), (2, 2), (0, 0, 0, 0), (0, 0), (1, 1), 1, (3, 4)),      # ultralytics' default k=2 s=2
    (4, 2, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), (1, 1), 2, (3, 3)),      # k=4 s=2 p=1, grouped
    (3, 2, (3, 2), (3, 2), (2, 0, 1, 1), (2, 1), (1, 2), 1, (2, 3)),      # asymmetric everything
    (2, 1, (1, 1), (3, 3), (0, 0, 2, 2), (2, 2), (1, 1), 2, (2, 2)),      # output padding past the taps
    (6, 1, (3, 3), (1, 1), (1, 1, 1, 1), (0, 0), (2, 2), 6, (4, 3)),      # depthwise, dilated
])
def test_matches_the_definition_in_float64(case):
    cin, per_group, k, stride, pads, output_padding, dilation, groups, size = case
    rng = np.random.default_rng(sum(k) + cin)
    x = rng.standard_normal((2, cin) + size)
    w = rng.standard_normal((cin, per_group) + k)
    b = rng.standard_normal(per_group * groups)
    want = _definition(x, w, b, stride=stride, pads=pads, output_padding=output_padding, dilation=dilation,
                       groups=groups)
    got = ops.conv_transpose2d(x, w, b, stride=stride, padding=pads, output_padding=output_padding,
                               dilation=dilation, groups=groups)
    assert got.shape == want.shape and got.dtype == np.float64
    assert relative_error(got, want) <= 1e-12
    assert conv_transpose_output_size(size[0], k[0], stride=stride[0], pad_begin=pads[0], pad_end=pads[2],
                                      output_padding=output_padding[0], dilation=dilation[0]) == want.shape[2]


def test_transposes_conv2d():
    # <conv2d(x), y> == <x, conv_transpose2d(y)> with the same weight: it is conv2d's adjoint
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 2, 3, 3))          # conv2d: O=6, C/g=2 with g=2 -> C=4
    x = rng.standard_normal((2, 4, 7, 6))
    y = ops.conv2d(x, w, stride=2, padding=1, groups=2)
    z = rng.standard_normal(y.shape)
    back = ops.conv_transpose2d(z, w, stride=2, padding=1, groups=2, output_padding=(0, 1))
    assert back.shape == x.shape
    assert abs(np.vdot(y, z) - np.vdot(x, back)) <= 1e-12 * abs(np.vdot(y, z))


def test_errors_name_the_shapes():
    x, w = np.zeros((1, 4, 3, 3)), np.zeros((4, 2, 2, 2))
    with pytest.raises(ShapeError, match=r"reads 3 input channels.*\(1, 4, 3, 3\)"):
        ops.conv_transpose2d(x, np.zeros((3, 2, 2, 2)))
    with pytest.raises(ShapeError, match="not divisible by groups=3"):
        ops.conv_transpose2d(x, w, groups=3)
    with pytest.raises(ShapeError, match=r"bias must have shape \(4,\)"):
        ops.conv_transpose2d(x, w, np.zeros(2), groups=2)
    with pytest.raises(ShapeError, match="empty output"):
        ops.conv_transpose2d(x, w, padding=3)
    with pytest.raises(ShapeError, match="output_padding"):
        ops.conv_transpose2d(x, w, output_padding=-1)
    with pytest.raises(ShapeError, match="4-D"):
        ops.conv_transpose2d(x, w[0])
    assert ops.conv_transpose2d(x.astype(np.int64), w).dtype == np.float64
