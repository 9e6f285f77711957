"""UniRepLKNet (Ding et al., CVPR 2024): the Dilated Reparam Block and the whole block.

Train forms against the unfused computation written out here with :mod:`repnp.ops` (every
branch a conv then a BN, the official paddings), deploy forms against train forms, random BN
statistics: float64 within 1e-12, float32 within 1e-5 (``repnp.tolerance``). The real cases
of ``tests/data/large_kernels`` (official ``unireplknet.py``, PyTorch) load into the blocks and
reproduce PyTorch's output, and ``reparameterize()`` gives the official deploy weights; the
``.npz`` converter writes exactly the official deploy state dict; the export runs in
onnxruntime and the ONNX converter merges the dilated branches into one conv.
"""

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from official_cases import load_case

from repnp import ops
from repnp.blocks import Conv2d, DilatedReparamBlock, UniRepLKNetBlock, UniRepLKNetBlockDeploy
from repnp.blocks.unireplknet import DILATED_BRANCHES
from repnp.errors import ShapeError
from repnp.io import convert_onnx, convert_state
from repnp.io.npz.convert import detect_scheme, find_blocks
from repnp.io.onnx.check import run_model
from repnp.io.onnx.export import export_onnx
from repnp.testing import TOLERANCES, load_golden, relative_error

LK = Path(__file__).parent / "data" / "large_kernels"
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
DTYPES = [np.float64, np.float32]


def _close(got, ref, dtype):
    assert np.shape(got) == np.shape(ref) and np.max(np.abs(ref)) > 0
    err = relative_error(got, ref)
    assert err <= TOLERANCES[np.dtype(dtype)], err


def bn(x, b):
    return ops.batch_norm(x, *(np.asarray(v, np.float64) for v in (b.mean, b.var, b.gamma, b.beta)), eps=b.eps)


def drb_reference(block, x):
    """``BN(lk(x)) + sum BN_b(conv_b(x, dilation r_b, padding r_b (k_b // 2)))`` in float64."""
    x = np.asarray(x, np.float64)
    c = block.origin.conv
    y = bn(ops.conv2d(x, c.weight.astype(np.float64), stride=c.stride, padding=c.weight.shape[2] // 2,
                      groups=c.groups), block.origin.bn)
    for (k, r), branch in zip(block.table, block.dilated):
        w = branch.conv.weight.astype(np.float64)
        y = y + bn(ops.conv2d(x, w, stride=c.stride, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=c.groups),
                   branch.bn)
    return y


@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES), k=st.sampled_from(sorted(DILATED_BRANCHES)),
       channels=st.sampled_from([2, 4]), depthwise=st.booleans(), stride=st.integers(1, 2))
def test_drb_train_and_deploy_equal_the_unfused_branches(seed, dtype, k, channels, depthwise, stride):
    block = DilatedReparamBlock.random(seed, channels, kernel_size=k, groups=None if depthwise else 2,
                                       stride=stride, dtype=dtype)
    x = np.random.default_rng(seed + 1).standard_normal((2, channels, k + 2, k + 1)).astype(dtype)
    ref = drb_reference(block, x)
    _close(block.forward(x), ref, dtype)
    deploy = block.reparameterize()
    assert isinstance(deploy, Conv2d) and deploy.weight.shape[2:] == (k, k) and deploy.weight.dtype == dtype
    _close(deploy.forward(x), ref, dtype)


def test_drb_rejects_bad_geometry():
    block = DilatedReparamBlock.random(0, 4, kernel_size=5)
    params = block.params()
    with pytest.raises(ShapeError, match="its name says a 3x3"):
        DilatedReparamBlock.from_params({**params, "dilated_k3_r2.conv.weight": np.ones((4, 1, 5, 5))})
    with pytest.raises(ShapeError, match="exceeds K = 5"):
        DilatedReparamBlock.random(0, 4, kernel_size=5, branches=((3, 3),))
    with pytest.raises(ValueError, match="unexpected|missing"):
        DilatedReparamBlock.from_params({**params, "dilated_k3_r2.extra": np.ones(4)})
    with pytest.raises(ValueError, match="no official dilated branches"):
        DilatedReparamBlock.random(0, 4, kernel_size=3)


@pytest.mark.parametrize("fold_bn", [False, True])
def test_drb_export_runs_in_onnxruntime_and_converts_to_one_conv(tmp_path, fold_bn):
    block = DilatedReparamBlock.random(3, 4, kernel_size=9, dtype=np.float32)
    x = np.random.default_rng(4).standard_normal((1, 4, 12, 11)).astype(np.float32)
    path = export_onnx(block, tmp_path / "drb.onnx", fold_bn=fold_bn, input_shape=x.shape)
    model = onnx.load(str(path))
    (name,) = [i.name for i in model.graph.input]
    _close(run_model(model, {name: x})[0][0], block.forward(x).astype(np.float64), np.float32)
    fused, report = convert_onnx(model)
    ops_after = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops_after == {"Conv": 1}, ops_after
    assert report.check["passed"]
    _close(run_model(fused, {name: x})[0][0], drb_reference(block, x), np.float32)


@pytest.mark.parametrize("k", [0, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_deploy_equals_train(k, dtype):
    block = UniRepLKNetBlock.random(k + 10, 4, kernel_size=k, dtype=dtype)
    x = np.random.default_rng(1).standard_normal((2, 4, 9, 8)).astype(dtype)
    deploy = block.reparameterize()
    assert isinstance(deploy, UniRepLKNetBlockDeploy)
    assert "grn.beta" not in deploy.params() and "gamma" not in deploy.params()
    _close(deploy.forward(x), block.forward(x).astype(np.float64), dtype)


def test_block_rejects_bad_shapes():
    params = UniRepLKNetBlock.random(0, 4, kernel_size=3).params()
    with pytest.raises(ShapeError, match="pwconv2.weight"):
        UniRepLKNetBlock.from_params({**params, "pwconv2.weight": np.ones((4, 8))})
    with pytest.raises(ShapeError, match="gamma"):
        UniRepLKNetBlock.from_params({**params, "gamma": np.ones(3)})


# --- real cases: the official unireplknet.py in PyTorch ------------------------------------------

def _case(name):
    return load_case(LK / "state" / name)


@pytest.mark.parametrize("case", ["off_unireplknet_drb_k13_c8", "off_unireplknet_block_k7_c8",
                                  "off_unireplknet_block_k3_c8", "off_unireplknet_net_tiny"])
def test_official_state_converts_to_exactly_the_official_deploy_state(case):
    train, deploy, meta, x, y = _case(case)
    assert detect_scheme(train) == meta["scheme"] == "unireplknet"
    out, report = convert_state(train)
    assert report.passed and report.max_error <= 1e-5
    assert list(out) == list(deploy)            # keys, in the order of the official deploy state_dict()
    for key, ref in deploy.items():
        assert out[key].dtype == ref.dtype and out[key].shape == ref.shape, key
        assert relative_error(out[key], ref) <= 1e-5, key


def test_official_drb_reproduces_torch_and_its_merge():
    train, deploy, _, x, y = _case("off_unireplknet_drb_k13_c8")
    (found,) = find_blocks(train)
    block = DilatedReparamBlock.from_params(found.params)
    assert block.table == DILATED_BRANCHES[13]
    assert relative_error(block.forward(x), y) <= 1e-5
    fused = block.reparameterize()
    assert relative_error(fused.weight, deploy["lk_origin.weight"]) <= 1e-5
    assert relative_error(fused.bias, deploy["lk_origin.bias"]) <= 1e-5
    assert relative_error(fused.forward(x), y) <= 1e-5


@pytest.mark.parametrize("case", ["off_unireplknet_block_k7_c8", "off_unireplknet_block_k3_c8"])
def test_official_block_reproduces_torch_train_and_deploy(case):
    train, deploy, _, x, y = _case(case)
    (found,) = find_blocks(train)
    block = UniRepLKNetBlock.from_params(found.params)
    assert relative_error(block.forward(x), y) <= 1e-5          # SE, GELU, GRN, BN, layer scale as torch
    mine = block.reparameterize()
    assert relative_error(mine.forward(x), y) <= 1e-5
    official = dict(zip(mine.params(), deploy.values()))        # same order: the scheme's deploy list
    assert relative_error(UniRepLKNetBlockDeploy.from_params(official).forward(x), y) <= 1e-5


def test_block_without_dwconv_and_eps_override():
    # kernel_size 0 (official: dwconv and norm are nn.Identity): only the GRN / BN / gamma folds.
    block = UniRepLKNetBlock.random(5, 4, kernel_size=0, eps=1e-3, dtype=np.float32)
    p = block.params()
    names = {"se.down.weight": "se.down.weight", "se.down.bias": "se.down.bias", "se.up.weight": "se.up.weight",
             "se.up.bias": "se.up.bias", "pwconv1.weight": "pwconv1.1.weight", "pwconv1.bias": "pwconv1.1.bias",
             "grn.gamma": "act.1.gamma", "grn.beta": "act.1.beta", "pwconv2.weight": "pwconv2.0.weight",
             "pwconv2_bn.gamma": "pwconv2.2.weight", "pwconv2_bn.beta": "pwconv2.2.bias",
             "pwconv2_bn.mean": "pwconv2.2.running_mean", "pwconv2_bn.var": "pwconv2.2.running_var",
             "gamma": "gamma"}
    state = {f"stages.0.1.{names[k]}": v for k, v in p.items()}
    out, report = convert_state(state, scheme="unireplknet", eps=1e-3)
    assert report.passed and [f.kind for f in report.fused] == ["UniRepLKNetBlock (no dwconv)"]
    assert sorted(out) == sorted(f"stages.0.1.{k}" for k in ("se.down.weight", "se.down.bias", "se.up.weight",
                                                             "se.up.bias", "pwconv1.1.weight", "pwconv1.1.bias",
                                                             "act.1.gamma", "pwconv2.0.weight", "pwconv2.0.bias"))
    deploy = block.reparameterize()
    assert relative_error(out["stages.0.1.pwconv2.0.bias"], deploy.pwconv2_bias) <= 1e-6
    other, _ = convert_state(state, scheme="unireplknet", eps=1.0)   # eps= is used: another fold
    assert relative_error(other["stages.0.1.pwconv2.0.bias"], deploy.pwconv2_bias) > 1e-3


# --- ONNX: the official exports, both styles -------------------------------------------------------

def _counts(model):
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("style", ["train.onnx", "train_keepbn.onnx"])
@pytest.mark.parametrize("case", ["off_unireplknet_drb_k13_c8", "off_unireplknet_block_k7_c8",
                                  "off_unireplknet_block_k3_c8", "off_unireplknet_net_tiny"])
def test_official_export_converts_within_deploy_counts(case, style):
    d = LK / "onnx" / case
    model, report = convert_onnx(str(d / style))
    assert report.check["passed"]
    deploy = _counts(onnx.load(str(d / "deploy.onnx")))
    got = _counts(model)
    # every operator at most as often as in the official deploy graph (its Constant nodes are
    # initializers here): the dilated branches merged, BN, GRN beta and layer scale folded
    extra = {op: (n, deploy[op]) for op, n in got.items() if n > deploy[op]}
    assert not extra, extra
    assert got["BatchNormalization"] == 0 and got["Conv"] == deploy["Conv"]
    y = run_model(model, {"input": np.load(d / "input.npy")})[0][0]
    assert relative_error(y, np.load(d / "output.npy")) <= 1e-4


def test_golden_files_reproduce_with_plain_ops():
    g = load_golden(GOLDEN / "unireplknet_drb_float64.npz")
    p = {k[len("train."):]: v for k, v in g.items() if k.startswith("train.")}
    x, y = g["x"], 0
    for prefix, k, r in [("origin.", 7, 1), ("dilated_k5_r1.", 5, 1), ("dilated_k3_r2.", 3, 2),
                         ("dilated_k3_r3.", 3, 3)]:
        conv = ops.conv2d(x, p[prefix + "conv.weight"], padding=r * (k // 2), dilation=r, groups=4)
        y = y + ops.batch_norm(conv, p[prefix + "bn.mean"], p[prefix + "bn.var"], p[prefix + "bn.gamma"],
                               p[prefix + "bn.beta"], eps=1e-5)
    assert relative_error(y, g["y"]) <= 1e-12
    assert relative_error(ops.conv2d(x, g["deploy.weight"], g["deploy.bias"], padding=3, groups=4), g["y"]) <= 1e-12
    blk = load_golden(GOLDEN / "unireplknet_block_float32.npz")
    deploy = UniRepLKNetBlockDeploy.from_params({k[len("deploy."):]: v for k, v in blk.items()
                                                 if k.startswith("deploy.")})
    assert relative_error(deploy.forward(blk["x"]), blk["y"]) <= 1e-5
    # data/README.md's formula for pwconv2 (GRN beta, BN_2, layer scale)
    g = load_golden(GOLDEN / "unireplknet_block_float64.npz")
    p = {k[len("train."):]: v for k, v in g.items() if k.startswith("train.")}
    t = p["pwconv2_bn.gamma"] / np.sqrt(p["pwconv2_bn.var"] + 1e-5)
    w2 = (p["gamma"] * t)[:, None] * p["pwconv2.weight"]
    b2 = p["gamma"] * (p["pwconv2_bn.beta"] + t * (p["pwconv2.weight"] @ p["grn.beta"].reshape(-1)
                                                   - p["pwconv2_bn.mean"]))
    assert relative_error(w2, g["deploy.pwconv2.weight"]) <= 1e-12
    assert relative_error(b2, g["deploy.pwconv2.bias"]) <= 1e-12


@pytest.mark.parametrize("scheme", [None, "unireplknet"])
def test_cli_converts_the_official_block(capsys, tmp_path, scheme):
    from repnp import cli

    src = LK / "state" / "off_unireplknet_block_k7_c8" / "train_state.npz"
    extra = [] if scheme is None else ["--scheme", scheme]
    code = cli.main(["convert", str(src), str(tmp_path / "out.npz"), "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["check"]["passed"] and report["check"]["max_error"] <= 1e-5
    got = np.load(tmp_path / "out.npz")
    want = np.load(LK / "state" / "off_unireplknet_block_k7_c8" / "deploy_state.npz")
    assert list(got.files) == list(want.files)
    # a wrong scheme is a one-line error or nothing to fuse, never a traceback
    code = cli.main(["convert", str(src), str(tmp_path / "other.npz"), "--scheme", "replknet"])
    _, err = capsys.readouterr()
    assert "Traceback" not in err


# --- one description: forward, export, cost model, converter ----------------------------------------

def _unireplknet_pair(kernel_size, layer_scale):
    block = UniRepLKNetBlock.random(11 + kernel_size, 8, kernel_size=kernel_size, layer_scale=layer_scale,
                                    dtype=np.float32)
    return block, block.reparameterize()


@pytest.mark.parametrize("opset", [17, 18, 20])
@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize("kernel_size, layer_scale", [(7, True), (3, False), (0, True)])
def test_block_export_runs_in_onnxruntime_like_forward(tmp_path, kernel_size, layer_scale, fold_bn, opset):
    """Both forms are Described: export_onnx (either style; GRN's reductions take axes as an input
    from opset 18, GELU is one node from 20) computes forward in onnxruntime (float32, 1e-5)."""
    x = np.random.default_rng(3).standard_normal((2, 8, 9, 10)).astype(np.float32)
    for module in _unireplknet_pair(kernel_size, layer_scale):
        path = export_onnx(module, tmp_path / f"{type(module).__name__}.onnx", fold_bn=fold_bn,
                           input_shape=x.shape, opset=opset)
        y = run_model(onnx.load(str(path)), {"input": x})[0][0]
        assert relative_error(y, module.forward(x).astype(np.float64)) <= TOLERANCES[np.dtype(np.float32)]


def test_block_params_keep_the_official_names_and_forward_is_the_dataflow():
    block, deploy = _unireplknet_pair(7, True)
    assert "grn.gamma" in block.params() and block.params()["pwconv1.weight"].shape == (32, 8)
    assert list(deploy.params())[-2:] == ["pwconv2.weight", "pwconv2.bias"]
    ops_used = {n.op for n in block.dataflow.nodes}
    assert {"ReduceL2", "ReduceMean", "Div", "Gelu", "GlobalAveragePool", "Sigmoid"} <= ops_used
    assert UniRepLKNetBlock.from_params(block.params()).params().keys() == block.params().keys()


@pytest.mark.parametrize("kernel_size", [7, 3, 0])
def test_cost_model_deploy_never_costlier(kernel_size):
    from repnp import cost

    block, deploy = _unireplknet_pair(kernel_size, True)
    train, dep = cost.profile(block, (1, 8, 12, 12)), cost.profile(deploy, (1, 8, 12, 12))
    for field in ("macs", "weight_bytes", "traffic_bytes", "op_count", "peak_activation_bytes"):
        assert getattr(dep, field) <= getattr(train, field), field
    assert dep.op_types().get("BatchNormalization", 0) == 0 and train.op_types()["BatchNormalization"] >= 1
    if kernel_size == 7:       # the dilated branches merged
        assert dep.macs < train.macs and dep.op_types()["Conv"] < train.op_types()["Conv"]


@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize("kernel_size, layer_scale", [(7, True), (3, False)])
def test_convert_of_our_train_export_reaches_the_deploy_counts(tmp_path, capsys, kernel_size, layer_scale,
                                                                fold_bn):
    """`repnp convert` of our NCHW train export: dilated branches, BN1, GRN beta, BN2 and the layer
    scale folded; every operator at most as often as in the exported deploy form (measured: no new
    converter rule needed)."""
    from repnp import cli

    block, deploy = _unireplknet_pair(kernel_size, layer_scale)
    src = export_onnx(block, tmp_path / "train.onnx", fold_bn=fold_bn, input_shape=(1, 8, 10, 9))
    assert cli.main(["convert", str(src), str(tmp_path / "out.onnx")]) == 0
    capsys.readouterr()
    got = _counts(onnx.load(str(tmp_path / "out.onnx")))
    want = _counts(onnx.load(str(export_onnx(deploy, tmp_path / "deploy.onnx", fold_bn=True,
                                             input_shape=(1, 8, 10, 9)))))
    want.pop("Constant", None)      # the converter stores constants as initializers
    extra = {op: (n, want[op]) for op, n in got.items() if n > want[op]}
    assert not extra, extra
    assert got["Conv"] == want["Conv"] and got["BatchNormalization"] == 0
