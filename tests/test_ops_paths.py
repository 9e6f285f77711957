"""Every fast path of ``repnp.ops.conv2d`` and of ``repnp.dataflow.run`` (issue 15), conformance-tested.

``conv2d`` picks its path from the geometry and the data size: pointwise (one GEMM straight
from ``x``), depthwise 1x1 (a per-channel scale), im2col with the two-stage or the wide column
fill, grouped convs a few groups at a time (``_GROUP_CHUNK``, bias and activation applied per
chunk), and ``activation=`` applied in place. The small
shapes of a test would only ever take the first branch of each size switch, so the tests force
every switch both ways (``forced``) and compare against onnxruntime (float32) and against
``scipy.signal.correlate`` (float64), the references of ``tests/test_ops_conformance.py``.

``run`` applies activations, BNs and Adds in place when it may: the tests compare it, bitwise,
with the plain node-by-node interpreter on every network and on dataflows built to tempt it
into writing over a tensor that is still read, and bound its peak memory with ``tracemalloc``
(NumPy reports its allocations there).
"""

from __future__ import annotations

import contextlib
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops_conformance import _ort_run, _scipy_conv

from repnp import dataflow, models, ops
from repnp.dataflow import Dataflow, run
from repnp.errors import ShapeError
from repnp.tolerance import relative_error as rel_err

#: The size switches of conv2d (``repnp.ops``), each forced to both sides: the group chunk and
#: the wide-fill limit.
CONFIGS = {
    "default": dict(),
    "chunked": dict(_GROUP_CHUNK=1),                      # one group at a time
    "chunked-7": dict(_GROUP_CHUNK=7),                    # several groups, a ragged last chunk
    "chunked-narrow": dict(_GROUP_CHUNK=1, _WIDE_LIMIT=0),  # per-chunk epilogue on the two-stage fill
    "chunked-wide": dict(_GROUP_CHUNK=1, _WIDE_LIMIT=10**9),  # chunks of the wide fill: the crop adds the bias
    "narrow": dict(_WIDE_LIMIT=0),                        # never the wide fill
    "wide": dict(_WIDE_LIMIT=10**9),                      # the wide fill whenever stride is 1
}


@contextlib.contextmanager
def forced(config: str):
    """Set the switches for one configuration (hypothesis cannot use monkeypatch)."""
    values = CONFIGS[config]
    old = {k: getattr(ops, k) for k in values}
    for k, v in values.items():
        setattr(ops, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(ops, k, v)


@st.composite
def path_problems(draw):
    """A small conv aimed at one path: pointwise, depthwise 1x1 / KxK, grouped, dense."""
    kind = draw(st.sampled_from(["pointwise", "dw1x1", "depthwise", "grouped", "dense"]))
    groups = 1 if kind in ("pointwise", "dense") else draw(st.integers(2, 9))
    cg_in = 1 if kind in ("dw1x1", "depthwise") else draw(st.integers(1, 4))
    cg_out = 1 if kind in ("dw1x1", "depthwise") else draw(st.integers(1, 4))
    if kind in ("pointwise", "dw1x1"):
        kh = kw = 1
        pads = (0, 0, 0, 0)
        stride = (1, 1) if kind == "pointwise" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    else:
        kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (1, 1) if kh == kw == 1 else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h_min = max(1, dilation[0] * (kh - 1) + 1 - pads[0] - pads[2])
    w_min = max(1, dilation[1] * (kw - 1) + 1 - pads[1] - pads[3])
    return dict(n=draw(st.integers(1, 3)), groups=groups, c_in=groups * cg_in, c_out=groups * cg_out,
                cg_in=cg_in, kernel=(kh, kw), stride=stride, dilation=dilation, pads=pads,
                hw=(draw(st.integers(h_min, h_min + 8)), draw(st.integers(w_min, w_min + 8))),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
                activation=draw(st.sampled_from([None, "relu", "relu6"])),
                config=draw(st.sampled_from(sorted(CONFIGS))))


def _arrays(p, dtype):
    rng = np.random.default_rng(p["seed"])
    fan_in = p["cg_in"] * p["kernel"][0] * p["kernel"][1]
    x = (3 * rng.standard_normal((p["n"], p["c_in"]) + p["hw"])).astype(dtype)   # values beyond 6
    w = (rng.standard_normal((p["c_out"], p["cg_in"]) + p["kernel"]) / math.sqrt(fan_in)).astype(dtype)
    b = rng.standard_normal(p["c_out"]).astype(dtype) if p["bias"] else None
    return x, w, b


def _conv(p, x, w, b):
    with forced(p["config"]):
        return ops.conv2d(x, w, b, stride=p["stride"], padding=p["pads"], dilation=p["dilation"],
                          groups=p["groups"], activation=p["activation"])


def _activate(y, activation):
    return {None: y, "relu": np.maximum(y, 0), "relu6": np.clip(y, 0, 6)}[activation]


@settings(max_examples=60)
@given(path_problems())
def test_every_conv_path_matches_onnxruntime_float32(p):
    x, w, b = _arrays(p, np.float32)
    ours = _conv(p, x, w, b)
    ref = _ort_run("Conv", 17, [x, w] if b is None else [x, w, b], kernel_shape=p["kernel"],
                   strides=p["stride"], dilations=p["dilation"], group=p["groups"], pads=p["pads"])
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert rel_err(ours, _activate(ref, p["activation"])) <= 1e-5


@settings(max_examples=60)
@given(path_problems())
def test_every_conv_path_matches_scipy_float64(p):
    x, w, b = _arrays(p, np.float64)
    ours = _conv(p, x, w, b)
    ref = _scipy_conv(x, w, p["stride"], p["pads"], p["dilation"], p["groups"])
    if b is not None:
        ref = ref + b[None, :, None, None]
    assert ours.dtype == np.float64
    assert rel_err(ours, _activate(ref, p["activation"])) <= 1e-12


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paths_agree_bitwise_on_network_shapes(config, dtype):
    # Depthwise 3x3 (stride 1 and 2), dense 3x3, pointwise and depthwise 1x1, batch 2, odd sizes:
    # chunks only reorder copies and split independent GEMMs, so the numbers are
    # the default path's, bit for bit.
    rng = np.random.default_rng(5)
    cases = [((2, 12, 15, 13), (12, 1, 3, 3), 12, 1, 1), ((2, 12, 15, 13), (12, 1, 3, 3), 12, 2, 1),
             ((2, 6, 11, 9), (10, 6, 3, 3), 1, 1, 1), ((2, 6, 11, 9), (10, 6, 3, 3), 1, 2, 1),
             ((2, 6, 11, 9), (10, 6, 1, 1), 1, 1, 0), ((2, 6, 11, 9), (6, 1, 1, 1), 6, 2, 0),
             ((1, 8, 9, 9), (8, 2, 3, 3), 4, 1, 2)]
    for xs, ws, g, s, pad in cases:
        x = rng.standard_normal(xs).astype(dtype)
        w = rng.standard_normal(ws).astype(dtype)
        b = rng.standard_normal(ws[0]).astype(dtype)
        ref = ops.conv2d(x, w, b, stride=s, padding=pad, groups=g)
        with forced(config):
            y = ops.conv2d(x, w, b, stride=s, padding=pad, groups=g)
            y6 = ops.conv2d(x, w, b, stride=s, padding=pad, groups=g, activation="relu6")
        if config.endswith(("narrow", "wide")):
            # Another fill is another GEMM shape, which BLAS may sum in another order.
            tol = 1e-5 if dtype == np.float32 else 1e-12
            assert rel_err(y, ref) <= tol and rel_err(y6, np.clip(ref, 0, 6)) <= tol
        else:
            np.testing.assert_array_equal(y, ref)
            np.testing.assert_array_equal(y6, np.clip(ref, 0, 6))


def test_activation_in_place_is_the_activation_of_the_result():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan                       # NaN passes through relu and relu6 as it does alone
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    y = ops.conv2d(x, w, padding=1)
    np.testing.assert_array_equal(ops.conv2d(x, w, padding=1, activation="relu"), ops.relu(y))
    np.testing.assert_array_equal(ops.conv2d(x, w, padding=1, activation="relu6"), ops.relu6(y))
    np.testing.assert_array_equal(ops.conv2d(x, w, padding=1, activation="identity"), y)
    with pytest.raises(ValueError, match="activation must be None or one of"):
        ops.conv2d(x, w, padding=1, activation="gelu")


def test_batch_norm_out_writes_in_place():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    stats = [rng.standard_normal(3), rng.uniform(0.5, 2, 3), rng.standard_normal(3), rng.standard_normal(3)]
    ref = ops.batch_norm(x, *stats, eps=1e-3)
    y = x.copy()
    assert ops.batch_norm(y, *stats, eps=1e-3, out=y) is y
    np.testing.assert_array_equal(y, ref)
    with pytest.raises(ShapeError, match=r"out must have shape \(2, 3, 4, 5\) and dtype float32"):
        ops.batch_norm(x, *stats, out=np.empty((2, 3, 4, 5)))


# ----------------------------------------------------------------------------
# memory: what the fast paths must not allocate
# ----------------------------------------------------------------------------

def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_depthwise_column_matrix_is_built_a_chunk_at_a_time():
    # 64 channels of 64x64, 3x3: the whole column matrix would be 9x the input (9.7 MB in
    # float32); built _GROUP_CHUNK elements (2 MiB) at a time, the peak stays near output + chunk.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 64, 64, 64)).astype(np.float32)
    w = rng.standard_normal((64, 1, 3, 3)).astype(np.float32)
    ops.conv2d(x, w, padding=1, groups=64)
    peak = _peak_bytes(lambda: ops.conv2d(x, w, padding=1, groups=64))
    assert peak < 4 * x.nbytes, peak


def _conv_then(op: str, **attrs) -> tuple[Dataflow, np.ndarray]:
    """input -> Conv 1x1 (16 -> 16, bias) -> ``op``: a dataflow and a 1x16x64x64 input."""
    rng = np.random.default_rng(3)
    d = Dataflow()
    x = d.input()
    w = d.param("w", rng.standard_normal((16, 16, 1, 1)).astype(np.float32))
    b = d.param("b", rng.standard_normal(16).astype(np.float32))
    y = d.conv(x, w, b, "conv.", kernel_shape=(1, 1))
    if op == "BatchNormalization":
        names = [d.param(k, rng.uniform(0.5, 2, 16).astype(np.float32)) for k in ("g", "be", "m", "v")]
        y = d.node(op, [y, *names], "bn.", epsilon=1e-5)
    else:
        y = d.node(op, [y], "act.", **attrs)
    d.outputs.append(y)
    return d, rng.standard_normal((1, 16, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("op, attrs", [("Relu", {}), ("Clip", {"min": 0.0, "max": 6.0}),
                                       ("BatchNormalization", None)])
def test_run_holds_one_map_for_conv_and_its_activation_or_bn(op, attrs):
    # The conv's output and the activation's (or BN's) are one array: about one 256 KiB map at
    # the peak, not two (as when every node made a new array).
    d, x = _conv_then(op, **(attrs or {}))
    ref = _plain_run(d, x)
    np.testing.assert_array_equal(run(d, x), ref)
    peak = _peak_bytes(lambda: run(d, x))
    assert peak < 1.5 * ref.nbytes, (peak, ref.nbytes)


# ----------------------------------------------------------------------------
# run: in place only where nothing else reads
# ----------------------------------------------------------------------------

def _plain_run(flow: Dataflow, *inputs):
    """The reference interpreter: every node through ``evaluate``, every result a new array."""
    env = {name: flow.tensor(name).astype(inputs[0].dtype, copy=False)
           if np.issubdtype(flow.tensor(name).dtype, np.floating) else flow.tensor(name)
           for name in (*flow.params, *flow.consts)}
    env.update(zip(flow.inputs, inputs))
    for node in flow.nodes:
        env[node.output] = dataflow.evaluate(node, [env[n] for n in node.inputs])
    out = tuple(env[n] for n in flow.outputs)
    return out[0] if len(out) == 1 else out


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "mobilenet_v2"])
def test_run_is_bitwise_the_plain_interpreter_on_networks(name):
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    train = models.create(name, seed=0)
    for net in (train, train.reparameterize()):
        keep = x.copy()
        np.testing.assert_array_equal(net.forward(x), _plain_run(net.dataflow, x))
        np.testing.assert_array_equal(x, keep)                      # the caller's input untouched


def test_run_never_writes_a_tensor_that_is_read_again_or_a_view_or_an_input():
    # conv output read twice (Relu and Add); a Relu on the graph input; a Relu on an Identity
    # (a view of the conv output); an Add whose operand broadcasts; a parameter added to.
    rng = np.random.default_rng(6)
    d = Dataflow()
    x = d.input()
    w = d.param("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))
    bias = d.param("bias", rng.standard_normal((1, 4, 1, 1)).astype(np.float32))
    c1 = d.conv(x, w, None, "c1.", kernel_shape=(3, 3), padding=1)
    r1 = d.node("Relu", [c1], "r1.")
    s1 = d.add(r1, c1, "s1.")                          # c1 still read after r1
    r0 = d.node("Relu", [x], "r0.")                    # the input
    c2 = d.conv(r0, w, None, "c2.", kernel_shape=(3, 3), padding=1)
    v = d.node("Identity", [c2], "v.")
    r2 = d.node("Relu", [v], "r2.")                    # a view
    s2 = d.add(bias, r2, "s2.")                        # broadcast operand first: written into r2
    s3 = d.add(s2, c2, "s3.")                          # c2 read again through the view's base
    t = d.add(s1, s3, "t.")
    d.outputs.append(t)
    xin = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    keep, pkeep = xin.copy(), d.params["bias"].copy()
    np.testing.assert_array_equal(run(d, xin), _plain_run(d, xin))
    np.testing.assert_array_equal(xin, keep)
    np.testing.assert_array_equal(d.params["bias"], pkeep)
