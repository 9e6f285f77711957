"""Issue 13: ultralytics' ``Conv2`` and ``ConvTranspose`` (+ BN) in ``repnp convert --scheme ultralytics``.

The state dicts are built here with NumPy (no PyTorch), in the key layout of ultralytics 8.4.190
(``ultralytics/nn/modules/conv.py`` ``Conv``, ``Conv2``, ``ConvTranspose``;
``ultralytics/nn/modules/block.py`` ``BottleneckCSP``, ``Proto``), with random weights and random
BN statistics (mean != 0, var != 1, gamma != 1, beta != 0). The expected keys are what
``BaseModel.fuse()`` (``ultralytics/nn/tasks.py``) leaves: ``Conv`` / ``Conv2`` -> ``conv.weight``,
``conv.bias`` (``Conv2.fuse_convs()`` then ``fuse_conv_and_bn``); ``ConvTranspose`` with a BN ->
``conv_transpose.weight``, ``conv_transpose.bias`` (``fuse_deconv_and_bn``); every other module
as it is. The values are checked against computations written out here: for ``Conv2`` the centre
add and the BN fold in NumPy, for ``ConvTranspose`` the forward of the fused transposed conv
against onnxruntime's ``ConvTranspose`` + ``BatchNormalization`` (float32; onnxruntime has no
float64 ConvTranspose) or, in float64, against the operator's definition as loops.
Tolerance rule: ``max|a - b| / max|b|`` <= 1e-12 float64, <= 1e-5 float32.
One reference case comes from ultralytics itself (``tests/data/ultralytics_fuse``: the state dict
before and after its own ``fuse()``, made by ``tests/data/generators/ultralytics_fuse.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from test_ops_transposed import _definition as conv_transpose_definition

from repnp import cli, ops
from repnp.blocks import ConvTransposeBN, ParallelConvBN
from repnp.errors import ConversionError, ShapeError
from repnp.io import convert_state, load_state
from repnp.io.npz import check_state
from repnp.tolerance import relative_error as rel_err

EPS = 1e-3          # ultralytics' initialize_weights sets every BN's eps to 1e-3
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def add_conv(s, rng, name, shape, dtype, *, bias=False):
    fan_in = int(np.prod(shape[1:]))
    s[f"{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
    if bias:
        s[f"{name}.bias"] = rng.normal(0, 0.5, shape[0]).astype(dtype)


def add_bn(s, rng, name, c, dtype):
    s[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(dtype)          # gamma != 1
    s[f"{name}.bias"] = rng.normal(0, 0.5, c).astype(dtype)               # beta != 0
    s[f"{name}.running_mean"] = rng.normal(0, 0.5, c).astype(dtype)       # mean != 0
    s[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(dtype)     # var != 1
    s[f"{name}.num_batches_tracked"] = np.array(1000, dtype=np.int64)


#: ConvTranspose modules of the state dict: prefix -> (C_in, C_out, k, stride, padding, groups).
TRANSPOSED = {
    "model.3.": (16, 8, 2, 2, 0, 1),      # ConvTranspose(16, 8): ultralytics' default k=2, s=2, p=0
    "model.4.": (8, 6, 4, 2, 1, 1),       # ConvTranspose(8, 6, k=4, s=2, p=1)
    "model.5.": (6, 4, 2, 2, 0, 2),       # a grouped nn.ConvTranspose2d in the same module layout
}
#: Conv2 modules: prefix -> (C_in, C_out, k, stride, groups).
CONV2 = {"model.1.": (8, 16, 3, 2, 1), "model.2.": (16, 16, 3, 1, 4)}


def ultralytics_state(dtype, seed=0):
    rng = np.random.default_rng(seed)
    s = {}
    add_conv(s, rng, "model.0.conv", (8, 3, 3, 3), dtype)                              # Conv(3, 8, 3, 2)
    add_bn(s, rng, "model.0.bn", 8, dtype)
    for p, (c1, c2, k, _, g) in CONV2.items():                                         # Conv2(c1, c2, k, s, g=g)
        add_conv(s, rng, f"{p}conv", (c2, c1 // g, k, k), dtype)
        add_conv(s, rng, f"{p}cv2", (c2, c1 // g, 1, 1), dtype)
        add_bn(s, rng, f"{p}bn", c2, dtype)
    for p, (c1, c2, k, _, _, g) in TRANSPOSED.items():                                 # ConvTranspose(c1, c2, k, s, p)
        add_conv(s, rng, f"{p}conv_transpose", (c1, c2 // g, k, k), dtype)
        add_bn(s, rng, f"{p}bn", c2, dtype)
    add_conv(s, rng, "model.6.conv_transpose", (4, 4, 2, 2), dtype, bias=True)       # ConvTranspose(bn=False)
    add_conv(s, rng, "model.7.cv1.conv", (4, 4, 3, 3), dtype)                          # Proto: cv1 (Conv), then
    add_bn(s, rng, "model.7.cv1.bn", 4, dtype)
    add_conv(s, rng, "model.7.upsample", (4, 4, 2, 2), dtype, bias=True)             # a bare nn.ConvTranspose2d
    p = "model.8."                                                                      # BottleneckCSP(4, 4): cv2 a
    add_conv(s, rng, f"{p}cv1.conv", (2, 4, 1, 1), dtype)                              # bare conv, bn over cat(cv2,
    add_bn(s, rng, f"{p}cv1.bn", 2, dtype)                                             # cv3): no Conv2, no Conv
    add_conv(s, rng, f"{p}cv2", (2, 4, 1, 1), dtype)
    add_conv(s, rng, f"{p}cv3", (2, 2, 1, 1), dtype)
    add_conv(s, rng, f"{p}cv4.conv", (4, 4, 1, 1), dtype)
    add_bn(s, rng, f"{p}cv4.bn", 4, dtype)
    add_bn(s, rng, f"{p}bn", 4, dtype)
    return s


#: The fused model's state_dict() keys (BaseModel.fuse(), ultralytics 8.4.190 ultralytics/nn/tasks.py): a Conv or
#: Conv2 leaves conv.weight / conv.bias, a ConvTranspose with a BN conv_transpose.weight / .bias, the rest stays.
FUSED_KEYS = (["model.0.conv.weight", "model.0.conv.bias"]
              + [f"{p}conv.{leaf}" for p in CONV2 for leaf in ("weight", "bias")]
              + [f"{p}conv_transpose.{leaf}" for p in TRANSPOSED for leaf in ("weight", "bias")]
              + ["model.6.conv_transpose.weight", "model.6.conv_transpose.bias",
                 "model.7.cv1.conv.weight", "model.7.cv1.conv.bias", "model.7.upsample.weight", "model.7.upsample.bias",
                 "model.8.cv1.conv.weight", "model.8.cv1.conv.bias", "model.8.cv2.weight", "model.8.cv3.weight",
                 "model.8.cv4.conv.weight", "model.8.cv4.conv.bias"]
              + [f"model.8.bn.{leaf}" for leaf in BN_LEAVES])


def bn_affine(s, name):
    """``(t, c)`` of an inference BN, in float64: ``BN(y) = t y + c``."""
    g, b, m, v = (s[f"{name}.{k}"].astype(np.float64) for k in ("weight", "bias", "running_mean", "running_var"))
    t = g / np.sqrt(v + EPS)
    return t, b - m * t


def conv2_fused_by_hand(s, p):
    """Conv2.fuse_convs() then fuse_conv_and_bn, written out: the 1x1 added at index k // 2 of each
    spatial axis of conv's weight, then the BN scale on the output axis and its shift as the bias."""
    w = s[f"{p}conv.weight"].astype(np.float64)
    w[:, :, w.shape[2] // 2, w.shape[3] // 2] += s[f"{p}cv2.weight"][:, :, 0, 0]
    t, c = bn_affine(s, f"{p}bn")
    return w * t[:, None, None, None], c


def _ort(nodes, inits, x):
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _transposed_by_definition(x, w, b, *, stride, pad, groups):
    """ONNX ConvTranspose as loops, float64 (``tests/test_ops_transposed.py``'s definition), square geometry."""
    return conv_transpose_definition(x, w, b, stride=(stride, stride), pads=(pad,) * 4, output_padding=(0, 0),
                                     dilation=(1, 1), groups=groups)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def converted(request):
    s = ultralytics_state(request.param)
    out, report = convert_state(s, scheme="ultralytics")
    return s, out, report


def test_keys_are_those_fuse_leaves(converted):
    s, out, report = converted
    assert list(out) == FUSED_KEYS
    assert [f.kind for f in report.fused] == ["Conv", "Conv2", "Conv2", "ConvTranspose", "ConvTranspose",
                                              "ConvTranspose", "Conv", "Conv", "Conv"]
    assert report.left == [] and report.check["passed"] and report.info["eps"] == EPS
    dtype = s["model.0.conv.weight"].dtype
    assert all(out[k].dtype == dtype for k in out if not k.endswith("num_batches_tracked"))
    # what fuse() does not touch passes through as the same arrays
    for k in ("model.6.conv_transpose.weight", "model.6.conv_transpose.bias", "model.7.upsample.weight",
              "model.8.cv2.weight", "model.8.cv3.weight", "model.8.bn.running_var"):
        assert out[k] is s[k]
    # groups: the arrays tell them for a ConvTranspose with a BN (C_out of the BN / the weight's axis 1)
    assert [f.detail["groups"] for f in report.fused if f.kind == "ConvTranspose"] == [1, 1, 2]
    assert check_state(s, out, scheme="ultralytics")["passed"]


def test_conv2_is_the_centre_add_then_the_bn_fold(converted):
    s, out, _ = converted
    tol = TOL[s["model.0.conv.weight"].dtype]
    for p in CONV2:
        w, b = conv2_fused_by_hand(s, p)
        assert out[f"{p}conv.weight"].shape == s[f"{p}conv.weight"].shape
        assert rel_err(out[f"{p}conv.weight"], w) <= tol and rel_err(out[f"{p}conv.bias"], b) <= tol


def test_conv_transpose_forward_matches_convtranspose_then_bn(converted):
    s, out, _ = converted
    dtype = s["model.0.conv.weight"].dtype
    rng = np.random.default_rng(7)
    for p, (c1, c2, k, stride, pad, groups) in TRANSPOSED.items():
        x = rng.standard_normal((2, c1, 5, 4))
        w, b = out[f"{p}conv_transpose.weight"], out[f"{p}conv_transpose.bias"]
        assert w.shape == s[f"{p}conv_transpose.weight"].shape and b.shape == (c2,)
        if dtype == np.float32:
            attrs = {"strides": [stride, stride], "pads": [pad] * 4, "group": groups}
            bn = {k2: s[f"{p}bn.{leaf}"] for k2, leaf in (("g", "weight"), ("b", "bias"), ("m", "running_mean"),
                                                          ("v", "running_var"))}
            want = _ort([oh.make_node("ConvTranspose", ["x", "w"], ["t"], **attrs),
                         oh.make_node("BatchNormalization", ["t", "g", "b", "m", "v"], ["y"], epsilon=EPS)],
                        {"w": s[f"{p}conv_transpose.weight"], **bn}, x.astype(np.float32))
            got = _ort([oh.make_node("ConvTranspose", ["x", "w", "c"], ["y"], **attrs)], {"w": w, "c": b},
                       x.astype(np.float32))
        else:
            t, c = bn_affine(s, f"{p}bn")
            want = (t[None, :, None, None] * _transposed_by_definition(
                x, s[f"{p}conv_transpose.weight"], np.zeros(c2), stride=stride, pad=pad, groups=groups)
                + c[None, :, None, None])
            got = _transposed_by_definition(x, w, b, stride=stride, pad=pad, groups=groups)
        assert got.shape == want.shape == (2, c2, 2 * 5 + k - 2 - 2 * pad, 2 * 4 + k - 2 - 2 * pad)
        assert rel_err(got, want) <= TOL[np.dtype(dtype)], p


def test_conv_transpose_weights_as_fuse_deconv_and_bn_computes_them(converted):
    # fuse_deconv_and_bn: the weight viewed as (g, C_in/g, C_out/g, k, k), transposed to the conv layout
    # (g * C_out/g, C_in/g, k, k), scaled on axis 0, viewed back
    s, out, _ = converted
    tol = TOL[s["model.0.conv.weight"].dtype]
    for p, (c1, c2, k, _, _, g) in TRANSPOSED.items():
        t, c = bn_affine(s, f"{p}bn")
        w = s[f"{p}conv_transpose.weight"].astype(np.float64)
        conv_layout = w.reshape(g, c1 // g, c2 // g, k, k).transpose(0, 2, 1, 3, 4).reshape(c2, c1 // g, k, k)
        scaled = conv_layout * t[:, None, None, None]
        back = scaled.reshape(g, c2 // g, c1 // g, k, k).transpose(0, 2, 1, 3, 4).reshape(c1, c2 // g, k, k)
        assert rel_err(out[f"{p}conv_transpose.weight"], back) <= tol
        assert rel_err(out[f"{p}conv_transpose.bias"], c) <= tol


def test_cli_convert_scheme_ultralytics(capsys, tmp_path):
    s = ultralytics_state(np.float32, seed=1)
    np.savez(tmp_path / "train.npz", **s)
    code = cli.main(["convert", str(tmp_path / "train.npz"), str(tmp_path / "fused.npz"), "--scheme", "ultralytics"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "9 ultralytics block(s) fused" in text
    written = load_state(tmp_path / "fused.npz")
    assert list(written) == FUSED_KEYS
    want, _ = convert_state(s, scheme="ultralytics")
    assert all(np.array_equal(written[k], want[k]) for k in FUSED_KEYS)


def test_end2end_scheme_folds_them_too():
    s = ultralytics_state(np.float64, seed=2)
    out, _ = convert_state(s, scheme="ultralytics-end2end")
    assert list(out) == FUSED_KEYS


# ----------------------------------------------------------------------------
# what does not fit is refused, with the framework's keys
# ----------------------------------------------------------------------------

def test_even_conv2_kernel_is_refused():
    # ultralytics' Conv2 cannot run with an even k (its cv2 output is one pixel smaller): no such checkpoint
    s = {}
    rng = np.random.default_rng(3)
    add_conv(s, rng, "m.conv", (4, 4, 2, 2), np.float32)
    add_conv(s, rng, "m.cv2", (4, 4, 1, 1), np.float32)
    add_bn(s, rng, "m.bn", 4, np.float32)
    with pytest.raises(ConversionError, match=r"Conv2 block 'm' cannot be fused.*even kernel"):
        convert_state(s, scheme="ultralytics")


def test_misfit_shapes_name_the_framework_keys():
    rng = np.random.default_rng(4)
    s = {}
    add_conv(s, rng, "m.conv", (4, 4, 3, 3), np.float32)
    add_conv(s, rng, "m.cv2", (4, 2, 1, 1), np.float32)
    add_bn(s, rng, "m.bn", 4, np.float32)
    with pytest.raises(ShapeError, match=r"m\.cv2\.weight.*\(4, 2, 1, 1\).*m\.conv\.weight"):
        convert_state(s, scheme="ultralytics")
    s = {}
    add_conv(s, rng, "up.conv_transpose", (4, 3, 2, 2), np.float32)
    add_bn(s, rng, "up.bn", 5, np.float32)                          # 5 is no multiple of C_out/groups = 3
    with pytest.raises(ShapeError, match=r"up\.bn.*5 channels.*up\.conv_transpose\.weight"):
        convert_state(s, scheme="ultralytics")


def test_blocks_refuse_bad_params():
    params = ParallelConvBN.random(0, 4, 4).params()
    del params["conv_1x1.weight"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['conv_1x1.weight'\]"):
        ParallelConvBN.from_params(params)
    params = ConvTransposeBN.random(0, 4, 6, groups=2).params()
    with pytest.raises(ShapeError, match="groups = C_out / 3 dividing C_in = 4"):
        ConvTransposeBN.from_params(params, groups=3)
    assert ConvTransposeBN.from_params(params).conv_transpose.groups == 2
    with pytest.raises(ShapeError, match="groups=3 must divide"):
        ConvTransposeBN.random(0, 4, 6, groups=3)


def test_conv_transpose_bn_exports_to_onnx(tmp_path):
    # the dataflow's ConvTranspose node, written by export_onnx and run by onnxruntime
    from repnp.io import export_onnx

    block = ConvTransposeBN.random(5, 4, 6, kernel_size=4, stride=2, padding=1, groups=2, dtype=np.float32)
    x = np.random.default_rng(6).standard_normal((1, 4, 5, 4)).astype(np.float32)
    for form in (block, block.reparameterize()):
        path = export_onnx(form, tmp_path / f"{type(form).__name__}.onnx", input_shape=x.shape)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
        assert rel_err(got, form.forward(x)) <= 1e-5
    assert rel_err(block.reparameterize().forward(x), block.forward(x)) <= 1e-5


# ----------------------------------------------------------------------------
# ultralytics' own fuse() (tests/data/ultralytics_fuse, made by tests/data/generators/ultralytics_fuse.py)
# ----------------------------------------------------------------------------

REFERENCE = Path(__file__).parent / "data" / "ultralytics_fuse"


def test_matches_ultralytics_own_fuse():
    train, fused = load_state(REFERENCE / "train_state.npz"), load_state(REFERENCE / "fused_state.npz")
    out, report = convert_state(train, scheme="ultralytics")
    assert list(out) == list(fused)
    assert [f.kind for f in report.fused] == ["Conv", "Conv2", "Conv2", "ConvTranspose", "ConvTranspose"]
    for key, value in fused.items():
        assert out[key].dtype == value.dtype == np.float32 and out[key].shape == value.shape
        assert rel_err(out[key], value) <= 1e-5, key
    # the converted weights, run with repnp.ops (SiLU after every module), give PyTorch's train-form output
    x = np.load(REFERENCE / "input.npy")
    y = x
    for i, (stride, groups) in enumerate([(2, 1), (2, 2), (1, 1)]):
        y = ops.silu(ops.conv2d(y, out[f"model.{i}.conv.weight"], out[f"model.{i}.conv.bias"], stride=stride,
                                padding=1, groups=groups))
    for i, (stride, pad) in zip((3, 4, 5), [(2, 0), (2, 1), (2, 0)]):
        y = ops.silu(ops.conv_transpose2d(y, out[f"model.{i}.conv_transpose.weight"],
                                          out[f"model.{i}.conv_transpose.bias"], stride=stride, padding=pad))
    assert rel_err(y, np.load(REFERENCE / "output.npy")) <= 1e-5
