"""Conformance of ``repnp.ops`` against engines nobody here wrote.

Three sources of truth:

1. The ONNX backend *node* test cases (``onnx.backend.test.loader.load_model_tests(kind="node")``)
   for Conv, ConvTranspose (``repnp.ops.conv_transpose2d``), BatchNormalization, AveragePool and
   Gemm: each case is a one-node model, its inputs and its expected outputs (computed by
   ONNX's own reference code). Recent onnx releases (1.23 here) generate the node cases in
   memory (``TestCase.model`` and ``TestCase.data_sets``) instead of shipping
   ``test_data_set_*/*.pb`` files, so we read them from there. 1-D cases are run as 2-D with a
   height-1 input and kernel (an exact embedding).
2. The ``test_Conv*`` cases that onnx ships under ``backend/test/data/pytorch-converted``
   (exported from PyTorch, with ``input_0.pb`` / ``output_0.pb``): groups, depthwise with a
   channel multiplier, dilation, stride, padding, non-square kernels; ``test_ConvTranspose2d*``
   (strides (3, 2) / (2, 3), pads 1, output_padding 1) run through ``conv_transpose2d``.
3. Randomised sweeps (hypothesis) against onnxruntime (Conv, AveragePool, BatchNormalization)
   and against ``scipy.signal.correlate`` in float64.

Tolerance rule (``repnp.tolerance``): ``max|ours - ref| / max|ref|`` <= 1e-5 in float32,
<= 1e-12 in float64.

Skipped cases (with onnx 1.23.2; the planner ``_plan_node_case`` decides, the list below says why):

ONNX node cases
  test_averagepool_2d_ceil ........................... ceil_mode=1 changes the output size (2 windows per
                                                        axis instead of 1); avg_pool2d floors, like the
                                                        default ceil_mode=0 of ONNX and PyTorch
  test_averagepool_2d_ceil_last_window_starts_on_pad . ceil_mode=1 changes the output size
  test_averagepool_2d_dilations ...................... dilations: avg_pool2d has no dilation
                                                        (ceil_mode=1 there does not change the size)
  test_averagepool_3d_default ........................ 3-D pooling
  test_averagepool_3d_dilations_small ................ 3-D pooling
  test_averagepool_3d_dilations_large_count_include_pad_is_{0,1}_ceil_mode_is_{True,False}
                                                        (4 cases) 3-D pooling
  test_convtranspose_output_shape .................... output_shape (the pads it implies are negative
  test_convtranspose_kernel_shape                       here: onnx widens output_padding instead)
  test_convtranspose_3d .............................. 3-D transposed convolution
  test_batchnorm_example_training_mode ............... training_mode=1 (batch statistics, 3 outputs)
  test_batchnorm_epsilon_training_mode ............... training_mode=1 (batch statistics, 3 outputs)
  test_causal_conv_with_state_*_expanded (13 cases) .. multi-node graphs (the expanded CausalConvWithState
                                                        function: Concat/Slice state handling around a
                                                        1-D Conv), float16 in two of them; not a Conv case
pytorch-converted
  test_Conv3d, test_Conv3d_dilated, test_Conv3d_dilated_strided, test_Conv3d_groups,
  test_Conv3d_no_bias, test_Conv3d_stride, test_Conv3d_stride_padding ... 3-D convolution
  (test_ConvTranspose2d and test_ConvTranspose2d_no_bias run as ConvTranspose cases, below)

Everything else in scope runs: all 6 Conv node cases (incl. auto_pad SAME_LOWER), 8 ConvTranspose
cases (1-D as 2-D, pads, output_padding, dilations, groups, auto_pad SAME_UPPER), 11 AveragePool
cases (incl. SAME_UPPER / SAME_LOWER, count_include_pad 0 and 1, 1-D), the 2 inference
BatchNormalization cases, all 11 Gemm cases (transA, transB, alpha, beta, scalar / vector /
matrix C), and 19 pytorch-converted Conv1d / Conv2d cases.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import numpy as np

# Plain imports, not importorskip: the test extra installs both, and conformance must never
# silently vanish from a run.
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from scipy import signal

from repnp import ops
from repnp.tolerance import relative_error as rel_err

OPS_IN_SCOPE = {"Conv", "ConvTranspose", "BatchNormalization", "AveragePool", "Gemm"}

#: Cases skipped on purpose, by name, and why (see the module docstring). The planner decides
#: from the attributes; ``test_documented_skips_are_skipped`` keeps this list honest.
DOCUMENTED_SKIPS = {
    "test_averagepool_2d_ceil": "ceil_mode",
    "test_averagepool_2d_ceil_last_window_starts_on_pad": "ceil_mode",
    "test_averagepool_2d_dilations": "dilations",
    "test_averagepool_3d_default": "3-D",
    "test_averagepool_3d_dilations_small": "3-D",
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True": "3-D",
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False": "3-D",
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True": "3-D",
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False": "3-D",
    "test_convtranspose_output_shape": "output_shape",
    "test_convtranspose_kernel_shape": "output_shape",
    "test_convtranspose_3d": "3-D",
    "test_batchnorm_example_training_mode": "training_mode",
    "test_batchnorm_epsilon_training_mode": "training_mode",
}




# ----------------------------------------------------------------------------
# mapping ONNX attributes onto repnp.ops
# ----------------------------------------------------------------------------

def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _explicit_pads(attrs, spatial, kernel, strides, dilations) -> list[int]:
    """ONNX ``pads`` (begins then ends), with ``auto_pad`` resolved as the ONNX spec states it.

    SAME_*: output = ceil(in / stride); total padding = max((out - 1) * s + (k - 1) * d + 1 - in, 0),
    the odd unit going at the end (SAME_UPPER) or the beginning (SAME_LOWER). VALID: no padding.
    """
    rank = len(spatial)
    mode = attrs.get("auto_pad", "NOTSET")
    if mode in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * rank)))
    if mode == "VALID":
        return [0] * (2 * rank)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


def _as_2d(x, kernel, strides, dilations, pads):
    """Embed a 1-D problem (N, C, L) into 2-D with height 1; 2-D passes through.

    Returns x, kernel (kh, kw), strides, dilations and the ONNX-order 4-tuple of pads.
    """
    if x.ndim == 3:
        return (x[:, :, None, :], (1, kernel[0]), (1, strides[0]), (1, dilations[0]),
                (0, pads[0], 0, pads[1]))
    return x, tuple(kernel), tuple(strides), tuple(dilations), tuple(pads)


def _run_conv(attrs, x, w, b=None):
    rank = x.ndim - 2
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = _explicit_pads(attrs, x.shape[2:], kernel, strides, dilations)
    x2, _, strides, dilations, pads = _as_2d(x, kernel, strides, dilations, pads)
    w2 = w[:, :, None, :] if w.ndim == 3 else w
    y = ops.conv2d(x2, w2, b, stride=strides, padding=pads, dilation=dilations,
                   groups=attrs.get("group", 1))
    return y[:, :, 0, :] if x.ndim == 3 else y


def _run_conv_transpose(attrs, x, w, b=None):
    """``ConvTranspose`` on ``repnp.ops.conv_transpose2d``; ``auto_pad`` SAME_* as the ONNX spec
    states it: output = input * stride, the total padding split with the odd unit at the end
    (SAME_UPPER) or the beginning (SAME_LOWER)."""
    rank = x.ndim - 2
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    out_pad = list(attrs.get("output_padding", [0] * rank))
    mode = attrs.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d, op in zip(x.shape[2:], kernel, strides, dilations, out_pad):
            total = s * (size - 1) + op + (k - 1) * d + 1 - size * s
            small, large = total // 2, total - total // 2
            begins.append(small if mode == "SAME_UPPER" else large)
            ends.append(large if mode == "SAME_UPPER" else small)
        pads = begins + ends
    else:
        pads = list(attrs.get("pads", [0] * (2 * rank))) if mode != "VALID" else [0] * (2 * rank)
    x2, _, strides, dilations, pads = _as_2d(x, kernel, strides, dilations, pads)
    out_pad = (0, out_pad[0]) if x.ndim == 3 else tuple(out_pad)
    w2 = w[:, :, None, :] if w.ndim == 3 else w
    y = ops.conv_transpose2d(x2, w2, b, stride=strides, padding=pads, output_padding=out_pad, dilation=dilations,
                             groups=attrs.get("group", 1))
    return y[:, :, 0, :] if x.ndim == 3 else y


def _pool_sizes(spatial, kernel, strides, pads, *, ceil):
    rank = len(spatial)
    out = []
    for i in range(rank):
        span = spatial[i] + pads[i] + pads[i + rank] - kernel[i]
        out.append((-(-span // strides[i]) if ceil else span // strides[i]) + 1)
    return out


def _plan_node_case(case):
    """Return ``(run, None)`` for a case we can map, or ``(None, reason)`` to skip it.

    ``run(inputs) -> outputs`` evaluates the node with repnp.ops.
    """
    nodes = list(case.model.graph.node)
    op_types = [n.op_type for n in nodes]
    if len(nodes) != 1:
        return None, f"multi-node graph ({', '.join(sorted(set(op_types)))}), not a single-op case"
    node = nodes[0]
    attrs = _attrs(node)
    inputs = case.data_sets[0][0]
    if any(not np.issubdtype(a.dtype, np.floating) for a in inputs):
        return None, "integer inputs"
    x_rank = inputs[0].ndim
    if node.op_type in ("Conv", "ConvTranspose", "AveragePool") and x_rank not in (3, 4):
        return None, f"{x_rank - 2}-D {node.op_type}: only 1-D (as 2-D) and 2-D are in scope"

    if node.op_type == "ConvTranspose":
        if "output_shape" in attrs:
            return None, "output_shape: an explicit output size (pads derived from it), not supported"
        return (lambda ins: [_run_conv_transpose(attrs, *ins)]), None

    if node.op_type == "Conv":
        return (lambda ins: [_run_conv(attrs, *ins)]), None

    if node.op_type == "AveragePool":
        rank = x_rank - 2
        if any(d != 1 for d in attrs.get("dilations", [1] * rank)):
            return None, "dilations: avg_pool2d has no dilation"
        kernel = list(attrs["kernel_shape"])
        strides = list(attrs.get("strides", [1] * rank))    # ONNX: strides default to 1, not the kernel
        pads = _explicit_pads(attrs, inputs[0].shape[2:], kernel, strides, [1] * rank)
        if attrs.get("ceil_mode", 0) and (
                _pool_sizes(inputs[0].shape[2:], kernel, strides, pads, ceil=True)
                != _pool_sizes(inputs[0].shape[2:], kernel, strides, pads, ceil=False)):
            return None, "ceil_mode=1 changes the output size here"
        include = bool(attrs.get("count_include_pad", 0))

        def run_pool(ins):
            x2, k2, s2, _, p2 = _as_2d(ins[0], kernel, strides, [1] * rank, pads)
            y = ops.avg_pool2d(x2, k2, stride=s2, padding=p2, count_include_pad=include)
            return [y[:, :, 0, :] if ins[0].ndim == 3 else y]
        return run_pool, None

    if node.op_type == "BatchNormalization":
        if attrs.get("training_mode", 0):
            return None, "training_mode=1 (batch statistics, extra outputs)"
        eps = attrs.get("epsilon", 1e-5)

        def run_bn(ins):
            x, gamma, beta, mean, var = ins
            return [ops.batch_norm(x, mean, var, gamma, beta, eps=eps)]
        return run_bn, None

    if node.op_type == "Gemm":
        alpha = attrs.get("alpha", 1.0)
        beta = attrs.get("beta", 1.0)

        def run_gemm(ins):
            a, b = ins[0], ins[1]
            a = a.T if attrs.get("transA", 0) else a
            # linear() takes the weight as (out, in), i.e. Gemm's B with transB=1.
            weight = b if attrs.get("transB", 0) else b.T
            if len(ins) < 3:
                return [np.float32(alpha) * ops.linear(a, weight)]
            c = ins[2]
            if c.size == weight.shape[0] and c.size > 1:
                # A bias vector: fold alpha into the weight and beta into the bias.
                return [ops.linear(a, np.float32(alpha) * weight, np.float32(beta) * c.reshape(-1))]
            return [np.float32(alpha) * ops.linear(a, weight) + np.float32(beta) * c]
        return run_gemm, None

    return None, f"op {node.op_type} not in scope"


def _load_node_cases():
    from onnx.backend.test.loader import load_model_tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # onnx's case generators warn about casts we never use
        cases = load_model_tests(kind="node")
    return [c for c in cases
            if c.model is not None and {n.op_type for n in c.model.graph.node} & OPS_IN_SCOPE]


NODE_CASES = _load_node_cases()


@pytest.mark.parametrize("case", NODE_CASES, ids=[c.name for c in NODE_CASES])
def test_onnx_node_case(case):
    run, reason = _plan_node_case(case)
    if run is None:
        pytest.skip(reason)
    for inputs, expected in case.data_sets:
        outputs = run(inputs)
        assert len(outputs) == len(expected)
        for ours, ref in zip(outputs, expected):
            assert ours.dtype == ref.dtype
            assert rel_err(ours, ref) <= 1e-5


def test_documented_skips_are_skipped():
    by_name = {c.name: c for c in NODE_CASES}
    for name, keyword in DOCUMENTED_SKIPS.items():
        if name in by_name:
            run, reason = _plan_node_case(by_name[name])
            assert run is None and keyword in reason, (name, reason)


def test_node_cases_cover_every_op():
    ran = {}
    for c in NODE_CASES:
        run, _ = _plan_node_case(c)
        if run is not None:
            op = c.model.graph.node[0].op_type
            ran[op] = ran.get(op, 0) + 1
    # Guards against a silently empty parametrization (e.g. a loader change in onnx).
    assert ran.get("Conv", 0) >= 5 and ran.get("AveragePool", 0) >= 8 and ran.get("ConvTranspose", 0) >= 7
    assert ran.get("BatchNormalization", 0) >= 2 and ran.get("Gemm", 0) >= 10


# ----------------------------------------------------------------------------
# pytorch-converted Conv cases shipped with onnx
# ----------------------------------------------------------------------------

PYTORCH_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
PYTORCH_CONV = sorted(d for d in (os.listdir(PYTORCH_DIR) if os.path.isdir(PYTORCH_DIR) else [])
                      if d.startswith("test_Conv") and not d.startswith("test_ConvTranspose"))
PYTORCH_CONV_TRANSPOSE = sorted(d for d in (os.listdir(PYTORCH_DIR) if os.path.isdir(PYTORCH_DIR) else [])
                                if d.startswith("test_ConvTranspose2d"))


def _read_pb(path):
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


@pytest.mark.parametrize("op_type, name", [("Conv", n) for n in PYTORCH_CONV] +
                         [("ConvTranspose", n) for n in PYTORCH_CONV_TRANSPOSE])
def test_pytorch_converted_conv(op_type, name):
    case_dir = os.path.join(PYTORCH_DIR, name)
    model = onnx.load(os.path.join(case_dir, "model.onnx"))
    (node,) = model.graph.node
    assert node.op_type == op_type
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = init[node.input[1]]
    if w.ndim not in (3, 4):
        pytest.skip(f"{w.ndim - 2}-D convolution")
    b = init[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    runner = _run_conv if op_type == "Conv" else _run_conv_transpose
    data_sets = sorted(d for d in os.listdir(case_dir) if d.startswith("test_data_set_"))
    assert data_sets
    for ds in data_sets:
        x = _read_pb(os.path.join(case_dir, ds, "input_0.pb"))
        ref = _read_pb(os.path.join(case_dir, ds, "output_0.pb"))
        y = runner(_attrs(node), x, w, b)
        assert y.dtype == ref.dtype == np.float32
        assert rel_err(y, ref) <= 1e-5


def test_pytorch_converted_conv_cases_found():
    assert len(PYTORCH_CONV) >= 19, PYTORCH_CONV
    assert PYTORCH_CONV_TRANSPOSE == ["test_ConvTranspose2d", "test_ConvTranspose2d_no_bias"]
    assert {"test_Conv2d_groups", "test_Conv2d_dilated", "test_Conv2d_depthwise_with_multiplier"} <= set(PYTORCH_CONV)


# ----------------------------------------------------------------------------
# randomized sweeps against onnxruntime
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _ort_session(op_type: str, opset: int, n_inputs: int, **attrs):
    names = ["x", "w", "b", "m", "v"][:n_inputs]
    node = helper.make_node(op_type, names, ["y"], **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in attrs.items()})
    graph = helper.make_graph(
        [node], op_type.lower(),
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1            # the machine is shared; tests never measure speed
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _ort_run(op_type, opset, arrays, **attrs):
    sess = _ort_session(op_type, opset, len(arrays), **attrs)
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, arrays)))[0]


@st.composite
def conv_problems(draw):
    """A small random conv: dense, depthwise (with multiplier) or grouped in between."""
    kind = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
    if kind == "dense":
        groups, cg_in, cg_out = 1, draw(st.integers(1, 5)), draw(st.integers(1, 5))
    elif kind == "depthwise":
        groups, cg_in, cg_out = draw(st.integers(1, 6)), 1, draw(st.integers(1, 2))
    else:
        groups, cg_in, cg_out = draw(st.integers(2, 3)), draw(st.integers(2, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))          # (top, left, bottom, right)
    # Input at least as large as the dilated kernel minus the padding, so the output is not empty.
    h_min = max(1, dh * (kh - 1) + 1 - pads[0] - pads[2])
    w_min = max(1, dw * (kw - 1) + 1 - pads[1] - pads[3])
    h, w = draw(st.integers(h_min, h_min + 6)), draw(st.integers(w_min, w_min + 6))
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(n=n, groups=groups, c_in=groups * cg_in, c_out=groups * cg_out, cg_in=cg_in,
                kernel=(kh, kw), stride=(sh, sw), dilation=(dh, dw), pads=pads, hw=(h, w),
                bias=draw(st.booleans()), seed=seed)


def _conv_arrays(p, dtype):
    rng = np.random.default_rng(p["seed"])
    fan_in = p["cg_in"] * p["kernel"][0] * p["kernel"][1]
    x = rng.standard_normal((p["n"], p["c_in"]) + p["hw"]).astype(dtype)
    w = (rng.standard_normal((p["c_out"], p["cg_in"]) + p["kernel"]) / math.sqrt(fan_in)).astype(dtype)
    b = rng.standard_normal(p["c_out"]).astype(dtype) if p["bias"] else None
    return x, w, b


@given(conv_problems())
def test_conv2d_matches_onnxruntime(p):
    x, w, b = _conv_arrays(p, np.float32)
    ours = ops.conv2d(x, w, b, stride=p["stride"], padding=p["pads"], dilation=p["dilation"],
                      groups=p["groups"])
    arrays = [x, w] if b is None else [x, w, b]
    ref = _ort_run("Conv", 17, arrays, kernel_shape=p["kernel"], strides=p["stride"],
                   dilations=p["dilation"], group=p["groups"], pads=p["pads"])
    assert ours.dtype == np.float32
    assert rel_err(ours, ref) <= 1e-5


@st.composite
def pool_problems(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    # onnxruntime requires every pad to be smaller than the kernel along its axis
    # (then every window also holds at least one real pixel).
    pads = (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)),
            draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)))
    h = draw(st.integers(max(1, kh - pads[0] - pads[2]), kh + 6))
    w = draw(st.integers(max(1, kw - pads[1] - pads[3]), kw + 6))
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)), kernel=(kh, kw),
                stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), pads=pads, hw=(h, w),
                include=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@given(pool_problems())
def test_avg_pool2d_matches_onnxruntime(p):
    x = np.random.default_rng(p["seed"]).standard_normal((p["n"], p["c"]) + p["hw"]).astype(np.float32)
    ours = ops.avg_pool2d(x, p["kernel"], stride=p["stride"], padding=p["pads"],
                          count_include_pad=p["include"])
    ref = _ort_run("AveragePool", 17, [x], kernel_shape=p["kernel"], strides=p["stride"],
                   pads=p["pads"], count_include_pad=int(p["include"]))
    assert ours.dtype == np.float32
    assert rel_err(ours, ref) <= 1e-5


@settings(max_examples=20)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(), (5,), (2, 3), (4, 1)]),
       st.sampled_from([1e-5, 1e-3, 0.1]))
def test_batch_norm_matches_onnxruntime(seed, spatial, eps):
    # (N, C), (N, C, L) and (N, C, H, W) inputs.
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    x = rng.standard_normal((n, c) + spatial).astype(np.float32)
    mean = rng.standard_normal(c).astype(np.float32)                 # mean != 0
    var = rng.uniform(0.2, 3.0, c).astype(np.float32)                # var != 1
    gamma = rng.uniform(0.5, 2.0, c).astype(np.float32) * rng.choice([-1, 1], c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    ours = ops.batch_norm(x, mean, var, gamma, beta, eps=eps)
    ref = _ort_run("BatchNormalization", 15, [x, gamma, beta, mean, var], epsilon=eps)
    assert ours.dtype == np.float32
    assert rel_err(ours, ref) <= 1e-5


# ----------------------------------------------------------------------------
# float64 against scipy.signal.correlate
# ----------------------------------------------------------------------------

def _scipy_conv(x, w, stride, padding, dilation, groups):
    """conv2d built from single-channel ``scipy.signal.correlate(..., mode='valid')``.

    Padding by hand, dilation by spreading the kernel with zeros, stride by slicing the
    stride-1 result; each output channel sums the correlations over its group's input channels.
    """
    top, left, bottom, right = padding
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    dh, dw = dilation
    xp = np.zeros((n, c, h + top + bottom, wd + left + right))
    xp[:, :, top:top + h, left:left + wd] = x
    out = None
    og = o // groups
    for b in range(n):
        for oc in range(o):
            g = oc // og
            acc = 0.0
            for ci in range(cg):
                kd = np.zeros((dh * (kh - 1) + 1, dw * (kw - 1) + 1))
                kd[::dh, ::dw] = w[oc, ci]
                acc = acc + signal.correlate(xp[b, g * cg + ci], kd, mode="valid", method="direct")
            acc = acc[::stride[0], ::stride[1]]
            if out is None:
                out = np.zeros((n, o) + acc.shape)
            out[b, oc] = acc
    return out


@given(conv_problems())
def test_conv2d_float64_matches_scipy_correlate(p):
    x, w, _ = _conv_arrays(p, np.float64)
    ours = ops.conv2d(x, w, stride=p["stride"], padding=p["pads"], dilation=p["dilation"],
                      groups=p["groups"])
    ref = _scipy_conv(x, w, p["stride"], p["pads"], p["dilation"], p["groups"])
    assert ours.dtype == np.float64
    assert rel_err(ours, ref) <= 1e-12


def test_conv2d_float64_single_channel_scipy_example():
    # One fixed single-channel case, the literal form: stride 2, dilation 2, asymmetric pads.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 1, 11, 9))
    w = rng.standard_normal((1, 1, 3, 4)) / math.sqrt(12)
    ours = ops.conv2d(x, w, stride=2, padding=(2, 0, 1, 3), dilation=2)
    ref = _scipy_conv(x, w, (2, 2), (2, 0, 1, 3), (2, 2), 1)
    assert ours.shape == ref.shape == (1, 1, 5, 3)    # H: (11+3-5)//2+1, W: (9+3-7)//2+1
    assert rel_err(ours, ref) <= 1e-12
