"""ECB (xindongzhang/ECBSR models/ecb.py): the block, the .npz scheme and the ONNX converter.

Reference data (tests/data/ecb_orepa, made by tests/data/generators/make_ecb_orepa.py from the
official repository with PyTorch): two ECB blocks and a whole ECBSR network (m1c4, x2), each
with the official deploy form made as the official convert.py does (rep_params() into PlainSR).
Their ONNX files are stored xz-compressed (the training-mode export is mostly Constant nodes).
"""

import collections
import lzma
from pathlib import Path

import numpy as np
import onnx
import pytest
from official_cases import load_case
from onnx import TensorProto, helper, numpy_helper

from repnp import fusion, ops
from repnp.blocks import ECB
from repnp.blocks.ecb import SeqConv3x3
from repnp.errors import ShapeError
from repnp.io import check_state, convert_state
from repnp.io.npz import detect_scheme
from repnp.io.onnx.check import run_model
from repnp.io.onnx.convert import convert_onnx
from repnp.io.onnx.export import export_onnx
from repnp.tolerance import relative_error as rel_err

DATA = Path(__file__).parent / "data" / "ecb_orepa"
ECB_CASES = ["off_ecb_c4to8_prelu", "off_ecb_idt_c6_linear"]
ALL_CASES = ECB_CASES + ["off_ecbsr_m1c4_x2"]
SCHEME = {"off_ecb_c4to8_prelu": None, "off_ecb_idt_c6_linear": "ecb_idt", "off_ecbsr_m1c4_x2": None}


def load_onnx_xz(case, name):
    return onnx.load_from_string(lzma.decompress((DATA / "onnx" / case / f"{name}.onnx.xz").read_bytes()))


def prelu(x, a):
    a = a.reshape(1, -1, 1, 1)
    return np.where(x > 0, x, a * x)


def unfused(block, x):
    """ECB written out with repnp.ops, in float64: the official SeqConv3x3.forward per branch."""
    x = x.astype(np.float64)
    y = ops.conv2d(x, block.conv3x3.weight, block.conv3x3.bias, padding=1)
    for name in ("conv1x1_3x3", "conv1x1_sbx", "conv1x1_sby", "conv1x1_lpl"):
        s = getattr(block, name)
        h = ops.conv2d(x, s.k0, s.b0)
        h = ops.pad2d(h, 1)                     # F.pad with zeros ...
        h[:, :, [0, -1], :] = s.b0.reshape(1, -1, 1, 1)   # ... then b0 on the border rows
        h[:, :, :, [0, -1]] = s.b0.reshape(1, -1, 1, 1)   # ... and columns
        if s.masked:
            y = y + ops.conv2d(h, s.scale * s.mask, s.bias, groups=s.out_channels)
        else:
            y = y + ops.conv2d(h, s.k1, s.b1)
    return y + x if block.with_idt else y


# ----------------------------------------------------------------------------
# the block
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("cin, cout, idt, mult", [(3, 5, False, 2.0), (4, 4, True, 2.0), (6, 6, False, 0.5),
                                                  (1, 4, True, 1.0)])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_ecb_train_equals_unfused_and_deploy(cin, cout, idt, mult, dtype, tol):
    block = ECB.random(cin + cout, cin, cout, with_idt=idt, depth_multiplier=mult, dtype=dtype)
    x = np.random.default_rng(7).standard_normal((2, cin, 6, 7)).astype(dtype)
    ref = unfused(block, x)
    assert rel_err(block.forward(x), ref) <= tol
    deploy = block.reparameterize()
    assert deploy.weight.shape == (cout, cin, 3, 3) and deploy.weight.dtype == dtype
    assert rel_err(deploy.forward(x), ref) <= tol
    assert block.with_idt == (idt and cin == cout)


def test_ecb_border_needs_the_bias_padding():
    """With the 1x1 output zero-padded instead, the fused conv is wrong exactly on the border."""
    block = ECB.random(3, 4, 4)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 7))
    s = block.conv1x1_3x3
    kernel, bias = s.fused()
    zero_padded = ops.conv2d(ops.pad2d(ops.conv2d(x, s.k0, s.b0), 1), s.k1, s.b1)
    fused = ops.conv2d(x, kernel, bias, padding=1)
    diff = np.abs(fused - zero_padded).max(axis=(0, 1))
    assert diff[1:-1, 1:-1].max() < 1e-12 and diff[0].max() > 1e-3


def test_ecb_rejects_bad_shapes():
    b = ECB.random(0, 3, 4)
    with pytest.raises(ShapeError, match="identity"):
        ECB(b.conv3x3, b.conv1x1_3x3, b.conv1x1_sbx, b.conv1x1_sby, b.conv1x1_lpl, with_idt=True)
    with pytest.raises(ShapeError, match="masked"):
        ECB(b.conv3x3, b.conv1x1_3x3, b.conv1x1_3x3, b.conv1x1_sby, b.conv1x1_lpl)
    with pytest.raises(ShapeError, match="mask"):
        SeqConv3x3(b.conv1x1_sbx.k0, b.conv1x1_sbx.b0, scale=b.conv1x1_sbx.scale, bias=b.conv1x1_sbx.bias,
                   mask=np.ones((4, 1, 5, 5)))
    params = b.params()
    params["conv1x1_lpl.mask"] = np.ones((4, 1, 3, 3, 1))
    with pytest.raises(ShapeError, match="conv1x1_lpl.mask"):
        ECB.from_params(params)
    params = b.params()
    del params["conv1x1_sbx.scale"]
    with pytest.raises(ValueError, match="conv1x1_sbx.scale"):
        ECB.from_params(params)


@pytest.mark.parametrize("fold_bn", [False, True])
def test_ecb_export_runs_in_onnxruntime_and_converts_to_one_conv(tmp_path, fold_bn):
    block = ECB.random(5, 3, 4, with_idt=False, dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 9)).astype(np.float32)
    path = export_onnx(block, tmp_path / "ecb.onnx", fold_bn=fold_bn, input_shape=x.shape)
    model = onnx.load(str(path))
    assert collections.Counter(n.op_type for n in model.graph.node)["ScatterND"] == 4
    y = run_model(model, {model.graph.input[0].name: x})[0][0]
    assert rel_err(y, block.forward(x)) <= 1e-5
    fused, report = convert_onnx(model)
    assert collections.Counter(n.op_type for n in fused.graph.node) == {"Conv": 1}
    assert report.check["passed"]


# ----------------------------------------------------------------------------
# the official examples
# ----------------------------------------------------------------------------

def _case(case):
    return load_case(DATA / "state" / case)


@pytest.mark.parametrize("case", ECB_CASES)
def test_official_ecb_loads_and_reproduces_torch(case):
    train, deploy, meta, x, want = _case(case)
    params = {k: v for k, v in train.items() if not k.startswith("act.")}
    block = ECB.from_params(params, with_idt=meta["constructor_kwargs"]["with_idt"])
    y = block.forward(x)
    if meta["forward"]["activation"] == "prelu":
        y = prelu(y, train["act.weight"])
    assert rel_err(y, want) <= 1e-5
    fused = block.reparameterize()
    assert rel_err(fused.weight, deploy["conv3x3.weight"]) <= 1e-5
    assert rel_err(fused.bias, deploy["conv3x3.bias"]) <= 1e-5


@pytest.mark.parametrize("case", ALL_CASES)
def test_npz_converts_to_exactly_the_official_deploy_state(case):
    train, deploy, *_ = _case(case)
    if SCHEME[case] is None:
        assert detect_scheme(train) == "ecb"
    out, report = convert_state(train, scheme=SCHEME[case])
    assert report.passed and report.max_error <= 1e-5
    assert list(out) == list(deploy)           # keys and order of PlainSR's state_dict()
    for key, ref in deploy.items():
        assert out[key].dtype == ref.dtype == np.float32 and out[key].shape == ref.shape
        assert rel_err(out[key], ref) <= 1e-5, key
    assert check_state(train, out, scheme=SCHEME[case])["passed"]


def test_ecbsr_network_npz_runs_like_torch():
    """The converted ECBSR state dict run as PlainSR (conv3x3 + PReLU per layer, + x, PixelShuffle)."""
    train, _, meta, x, want = _case("off_ecbsr_m1c4_x2")
    out, _ = convert_state(train)
    h = x
    for i in range(3):
        h = ops.conv2d(h, out[f"backbone.{i}.conv3x3.weight"], out[f"backbone.{i}.conv3x3.bias"], padding=1)
        if f"backbone.{i}.act.weight" in out:
            h = prelu(h, out[f"backbone.{i}.act.weight"])
    h = h + x
    n, c, hh, ww = h.shape
    r = meta["constructor_kwargs"]["scale"]
    y = h.reshape(n, c // (r * r), r, r, hh, ww).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), hh * r, ww * r)
    assert rel_err(y, want) <= 1e-4


@pytest.mark.parametrize("style", ["train", "train_keepbn"])
@pytest.mark.parametrize("case", ALL_CASES)
def test_official_onnx_reaches_the_deploy_counts(case, style):
    model = load_onnx_xz(case, style)
    # check=False: the result is checked against torch's output below; the converter's own check
    # would run the 7000-node training graph once more
    fused, report = convert_onnx(model, check=False)
    deploy = collections.Counter(n.op_type for n in load_onnx_xz(case, "deploy").graph.node)
    got = collections.Counter(n.op_type for n in fused.graph.node)
    extra = {k: (v, deploy.get(k, 0)) for k, v in got.items() if v > deploy.get(k, 0)}
    assert not extra, f"more nodes than the official deploy graph (got, deploy): {extra}"
    assert got["Conv"] == deploy["Conv"]
    if style == "train_keepbn":
        # Regression (ECBSR, training-mode export): shape inference stops at the first F.pad whose
        # pads are computed, so the blocks after it had no shapes and kept their Pad + ScatterND.
        assert len(report.fused) == deploy["Conv"]
    assert got["ScatterND"] == got["Pad"] == 0
    x = np.load(DATA / "onnx" / case / "input.npy")
    y = run_model(fused, {"input": x})[0][0]
    assert rel_err(y, np.load(DATA / "onnx" / case / "output.npy")) <= 1e-4


def _seq_graph(blocks: int, c: int = 3, h: int = 5, w: int = 6):
    """``blocks`` bias-padded 1x1 -> 3x3 branches in a chain, each padded by a ``Pad`` whose pads
    ONNX shape inference cannot compute (a ``Max`` of two constants), so no tensor after the
    first ``Pad`` has an inferred shape; the border written by ``ScatterND`` as PyTorch does."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def init(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    x = "x"
    init("pa", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    init("pb", np.zeros(8, np.int64))
    nodes.append(helper.make_node("Max", ["pa", "pb"], ["pads"]))
    border = np.ones((h + 2, w + 2), bool)
    border[1:-1, 1:-1] = False
    iy, ix = np.nonzero(border)
    idx = np.array([[[0, ch, y, x_] for y, x_ in zip(iy, ix)] for ch in range(c)], np.int64)
    init("idx", idx)
    for i in range(blocks):
        b0 = rng.standard_normal(c).astype(np.float32)
        init(f"k0_{i}", rng.standard_normal((c, c, 1, 1)).astype(np.float32))
        init(f"b0_{i}", b0)
        init(f"k1_{i}", (0.3 * rng.standard_normal((c, c, 3, 3))).astype(np.float32))
        init(f"b1_{i}", rng.standard_normal(c).astype(np.float32))
        init(f"upd_{i}", np.repeat(b0[:, None], len(iy), axis=1))
        nodes += [helper.make_node("Conv", [x, f"k0_{i}", f"b0_{i}"], [f"h{i}"], kernel_shape=[1, 1]),
                  helper.make_node("Pad", [f"h{i}", "pads"], [f"p{i}"]),
                  helper.make_node("ScatterND", [f"p{i}", "idx", f"upd_{i}"], [f"s{i}"]),
                  helper.make_node("Conv", [f"s{i}", f"k1_{i}", f"b1_{i}"], [f"c{i}"], kernel_shape=[3, 3]),
                  helper.make_node("Relu", [f"c{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", "c", "h", "w"])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_chained_bias_padded_blocks_after_an_uninferable_pad_all_fuse():
    fused, report = convert_onnx(_seq_graph(3))
    got = collections.Counter(n.op_type for n in fused.graph.node)
    assert got == {"Conv": 3, "Relu": 3}, got
    assert report.check["passed"]


def test_masked_kernel_fusion_matches_the_official_rep_params():
    """``merge_depthwise(k0, scale*mask)`` equals the official rep_params' dense construction:
    ``k1[i, i] = scale[i] * mask[i]``, ``RK = conv2d(k1, k0.permute(1, 0, 2, 3))``, ``RB`` the conv of a
    3x3 map of ``b0`` with ``k1`` plus ``bias``."""
    train = _case("off_ecb_c4to8_prelu").train
    k0, b0 = train["conv1x1_lpl.k0"].astype(np.float64), train["conv1x1_lpl.b0"].astype(np.float64)
    tmp = train["conv1x1_lpl.scale"] * train["conv1x1_lpl.mask"]
    o = k0.shape[0]
    k1 = np.zeros((o, o, 3, 3))
    k1[np.arange(o), np.arange(o)] = tmp[:, 0]
    rk = ops.conv2d(k1, k0.transpose(1, 0, 2, 3))
    rb = ops.conv2d(np.ones((1, o, 3, 3)) * b0.reshape(1, -1, 1, 1), k1).reshape(-1) + train["conv1x1_lpl.bias"]
    depthwise = fusion.masked_kernel(train["conv1x1_lpl.scale"], train["conv1x1_lpl.mask"])
    kernel, bias = fusion.merge_depthwise((k0, b0), (depthwise, None))
    bias = bias + train["conv1x1_lpl.bias"]
    assert rel_err(kernel, rk) <= 1e-12 and rel_err(bias, rb) <= 1e-12


# ----------------------------------------------------------------------------
# the whole network: ECBSR (train) and PlainSR (deploy), Described
# ----------------------------------------------------------------------------

def test_ecbsr_from_the_official_state_reproduces_torch():
    """off_ecbsr_m1c4_x2: ECBSR.from_params(state_dict) computes torch's output (head, body, tail
    ECBs, PReLU, + x, PixelShuffle as DepthToSpace CRD); its deploy form is convert.py's PlainSR."""
    from repnp.blocks.ecb import ECBSR, PlainSR

    train, deploy, meta, x, want = _case("off_ecbsr_m1c4_x2")
    kw = meta["constructor_kwargs"]
    net = ECBSR.from_params(train, act_type=kw["act_type"], with_idt=bool(kw["with_idt"]))
    assert (net.scale, net.colors, len(net.backbone)) == (kw["scale"], kw["colors"], kw["module_nums"] + 2)
    assert list(net.params()) == list(train)             # the official keys, in state_dict() order
    assert rel_err(net.forward(x), want) <= 1e-5
    plain = net.reparameterize()
    assert isinstance(plain, PlainSR) and list(plain.params()) == list(deploy)
    for key, ref in deploy.items():
        assert rel_err(plain.params()[key], ref) <= 1e-5, key
    assert rel_err(plain.forward(x), want) <= 1e-5
    assert rel_err(PlainSR.from_params(deploy).forward(x), want) <= 1e-5


@pytest.mark.parametrize("act_type, scale, idt", [("prelu", 3, False), ("relu", 2, True), ("linear", 1, False)])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_ecbsr_random_deploy_equals_train(act_type, scale, idt, dtype, tol):
    from repnp.blocks.ecb import ECBSR

    net = ECBSR.random(5, module_nums=2, channel_nums=6, scale=scale, act_type=act_type, with_idt=idt,
                       dtype=dtype)
    x = np.random.default_rng(1).standard_normal((2, 1, 5, 7)).astype(dtype)
    y = net.forward(x)
    assert y.shape == (2, 1, 5 * scale, 7 * scale) and y.dtype == dtype
    assert rel_err(net.reparameterize().forward(x), y.astype(np.float64)) <= tol
    again = ECBSR.from_params(net.params(), act_type=act_type, with_idt=idt)
    assert rel_err(again.forward(x), y) == 0


@pytest.mark.parametrize("fold_bn", [False, True])
def test_ecbsr_export_runs_in_onnxruntime_and_converts_to_the_deploy_counts(tmp_path, fold_bn):
    """export_onnx of both forms matches forward in onnxruntime; the converter turns the exported
    train form into exactly the official deploy graph's operators (3 Conv, 2 PRelu, Add, DepthToSpace)."""
    from repnp.blocks.ecb import ECBSR

    train = _case("off_ecbsr_m1c4_x2").train
    net = ECBSR.from_params(train)
    x = np.load(DATA / "onnx" / "off_ecbsr_m1c4_x2" / "input.npy")
    for module in (net, net.reparameterize()):
        path = export_onnx(module, tmp_path / f"{type(module).__name__}.onnx", fold_bn=fold_bn, input_shape=x.shape)
        assert rel_err(run_model(onnx.load(str(path)), {"input": x})[0][0], module.forward(x).astype(np.float64)) \
            <= 1e-5
    fused, report = convert_onnx(onnx.load(str(tmp_path / "ECBSR.onnx")))
    assert report.check["passed"]
    deploy = collections.Counter(n.op_type for n in load_onnx_xz("off_ecbsr_m1c4_x2", "deploy").graph.node)
    assert collections.Counter(n.op_type for n in fused.graph.node) == deploy
    d2s = [n for n in fused.graph.node if n.op_type == "DepthToSpace"][0]
    assert {a.name: helper.get_attribute_value(a) for a in d2s.attribute} == {"blocksize": 2, "mode": b"CRD"}


def test_ecbsr_cost_model_deploy_cheaper():
    from repnp import cost
    from repnp.blocks.ecb import ECBSR

    net = ECBSR.random(2, module_nums=2, channel_nums=8, scale=2)
    train, deploy = cost.profile(net, (1, 1, 16, 16)), cost.profile(net.reparameterize(), (1, 1, 16, 16))
    for field in ("macs", "weight_bytes", "traffic_bytes", "op_count", "peak_activation_bytes"):
        assert getattr(deploy, field) <= getattr(train, field), field
    assert deploy.op_types() == {"Conv": 4, "PRelu": 3, "Add": 1, "DepthToSpace": 1}


def test_ecbsr_bad_input_is_named():
    from repnp.blocks.ecb import ECBSR, PlainSR

    train, deploy, *_ = _case("off_ecbsr_m1c4_x2")
    with pytest.raises(ValueError, match=r"missing key 'backbone.1.act.weight'"):
        ECBSR.from_params({k: v for k, v in train.items() if k != "backbone.1.act.weight"})
    with pytest.raises(ValueError, match=r"unexpected key 'head.weight'"):
        ECBSR.from_params({**train, "head.weight": np.zeros(1)})
    with pytest.raises(ValueError, match=r"backbone.2: .*missing key"):
        ECBSR.from_params({k: v for k, v in train.items() if k != "backbone.2.conv1x1_lpl.mask"})
    with pytest.raises(ValueError, match="act_type"):
        PlainSR.from_params(deploy, act_type="softplus")
    with pytest.raises(ShapeError, match="colors == 1"):
        ECBSR.random(0, colors=3, scale=2)
    with pytest.raises(ShapeError, match=r"C = 1, got shape \(1, 3, 4, 4\)"):
        ECBSR.from_params(train).forward(np.zeros((1, 3, 4, 4), np.float32))
    bad = dict(deploy)
    bad["backbone.2.conv3x3.weight"] = np.zeros((3, 4, 3, 3), np.float32)
    bad["backbone.2.conv3x3.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ShapeError, match="tail writes 3 channels"):
        PlainSR.from_params(bad)
