"""QARepVGG v1 / v2 (YOLOv6 QARepVGGBlock / QARepVGGBlockV2): train form == deploy form (one conv, or
YOLOv6's conv + kept BN), written out with repnp.ops and against onnxruntime; yolov7's RepConv as a
RepVGGBlock with groups and depthwise, against yolov7's own (wrong) grouped fuse."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import ops
from repnp.blocks import ConvAct, ConvBNAct, QARepVGGBlock, RepVGGBlock
from repnp.blocks.base import BatchNorm, Conv2d
from repnp.errors import ShapeError
from repnp.io.onnx.check import run_model
from repnp.io.onnx.export import export_onnx
from repnp.testing import random_input
from repnp.tolerance import FLOAT32, FLOAT64, relative_error


def _unfused(block, x):
    """The pre-activation written out with repnp.ops: BN(BN_k(conv_k(x)) + conv_1(x) [+ x] [+ avg(x)])."""
    k, one, bn = block.conv_kxk, block.conv_1x1, block.bn
    c = k.conv
    y = k.bn.forward(ops.conv2d(x, c.weight, None, stride=c.stride, padding=c.padding, groups=c.groups))
    y = y + ops.conv2d(x, one.weight, None, stride=one.stride, padding=one.padding, groups=one.groups)
    if block.identity:
        y = y + x
    if block.avg:
        y = y + ops.avg_pool2d(x, block.kernel_size, stride=c.stride, padding=c.padding, count_include_pad=True)
    return bn.forward(y)


@st.composite
def configs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    same = draw(st.booleans())
    return dict(in_channels=c_in, out_channels=c_in if same else groups * draw(st.integers(1, 3)), groups=groups,
                kernel_size=draw(st.sampled_from([3, 5])), stride=draw(st.sampled_from([1, 2])),
                version=draw(st.sampled_from([1, 2])), keep_bn=draw(st.booleans()),
                eps=draw(st.sampled_from([1e-5, 1e-3])), hw=(draw(st.integers(4, 9)), draw(st.integers(4, 9))),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), dtype=st.sampled_from([np.float64, np.float32]))
def test_reparameterize_is_exact(cfg, dtype):
    block = QARepVGGBlock.random(cfg["seed"], cfg["in_channels"], cfg["out_channels"], groups=cfg["groups"],
                                 kernel_size=cfg["kernel_size"], stride=cfg["stride"], version=cfg["version"],
                                 keep_bn=cfg["keep_bn"], eps=cfg["eps"], dtype=dtype)
    x = random_input((2, cfg["in_channels"]) + cfg["hw"], dtype=dtype, seed=cfg["seed"] + 1)
    tol = FLOAT64 if dtype == np.float64 else FLOAT32
    pre = _unfused(block, x.astype(np.float64))
    assert relative_error(block.forward(x), ops.relu(pre)) <= tol
    deploy = block.reparameterize()
    assert isinstance(deploy, ConvBNAct if cfg["keep_bn"] else ConvAct)
    assert deploy.conv.weight.dtype == dtype and deploy.forward(x).dtype == dtype
    possible = cfg["stride"] == 1 and cfg["in_channels"] == cfg["out_channels"]
    assert block.identity == possible and block.avg == (possible and cfg["version"] == 2)
    one_conv = deploy.reparameterize() if cfg["keep_bn"] else deploy
    assert isinstance(one_conv, ConvAct)
    assert relative_error(one_conv.conv.forward(x), pre) <= tol
    assert np.max(np.abs(deploy.forward(x) - block.forward(x))) <= tol * np.max(np.abs(pre))
    # YOLOv6's deploy form: the summed conv is the pre-BN sum
    if cfg["keep_bn"]:
        bn = block.bn
        before = (pre - bn.beta[:, None, None]) / (bn.gamma / np.sqrt(bn.var + bn.eps))[:, None, None] \
            + bn.mean[:, None, None]
        assert relative_error(deploy.conv.forward(x), before) <= 100 * tol


def test_random_bn_statistics_are_not_trivial():
    block = QARepVGGBlock.random(0, 4, 4, version=2)
    for bn in (block.conv_kxk.bn, block.bn):
        assert np.all(bn.mean != 0) and np.all(bn.var != 1) and np.all(bn.gamma != 1) and np.all(bn.beta != 0)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fold_bn", [False, True])
def test_export_runs_in_onnxruntime_and_fuses(tmp_path, version, fold_bn):
    from repnp.io.onnx.convert import convert_onnx

    block = QARepVGGBlock.random(3, 6, 6, groups=2, version=version, dtype=np.float32)
    path = export_onnx(block, tmp_path / "qa.onnx", fold_bn=fold_bn, input_shape=(1, 6, 9, 8))
    model = onnx.load(str(path))
    ops_in = [n.op_type for n in model.graph.node]
    assert ops_in.count("Add") == (3 if version == 2 else 2) and ("AveragePool" in ops_in) == (version == 2)
    x = random_input((1, 6, 9, 8), dtype=np.float32, seed=4)
    (y,), _ = run_model(model, {model.graph.input[0].name: x})
    assert relative_error(y, block.forward(x)) <= FLOAT32
    fused, report = convert_onnx(model)
    assert sorted(n.op_type for n in fused.graph.node) == ["Conv", "Relu"]
    (y2,), _ = run_model(fused, {fused.graph.input[0].name: x})
    assert relative_error(y2, block.reparameterize().forward(x)) <= FLOAT32
    assert report.check["passed"]


def test_keep_bn_deploy_form_exports_and_folds(tmp_path):
    block = QARepVGGBlock.random(5, 4, 4, keep_bn=True, dtype=np.float32)
    deploy = block.reparameterize()
    assert list(deploy.params()) == ["conv.weight", "conv.bias", "bn.mean", "bn.var", "bn.gamma", "bn.beta"]
    assert deploy.bn is block.bn        # the BN is YOLOv6's own, unchanged
    path = export_onnx(deploy, tmp_path / "d.onnx", input_shape=(1, 4, 6, 6))
    x = random_input((1, 4, 6, 6), dtype=np.float32, seed=1)
    model = onnx.load(str(path))
    (y,), _ = run_model(model, {model.graph.input[0].name: x})
    assert relative_error(y, block.forward(x)) <= FLOAT32


def test_bad_blocks_are_refused_with_names():
    good = QARepVGGBlock.random(0, 4, 4)
    with pytest.raises(ShapeError, match="conv_1x1 of a QARepVGG block has no bias"):
        QARepVGGBlock(good.conv_kxk, Conv2d(good.conv_1x1.weight, np.zeros(4)), good.bn)
    with pytest.raises(ShapeError, match="bn has 6 channels"):
        QARepVGGBlock(good.conv_kxk, good.conv_1x1, BatchNorm(*(np.ones(6),) * 4))
    wide = QARepVGGBlock.random(1, 4, 8)
    with pytest.raises(ShapeError, match="avg: the pooling branch needs C_in == C_out"):
        QARepVGGBlock(wide.conv_kxk, wide.conv_1x1, wide.bn, avg=True)
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        QARepVGGBlock.random(0, 4, 4, version=3)
    params = dict(good.params())
    params["conv_1x1.weight"] = np.zeros((4, 2, 1, 1))
    with pytest.raises(ShapeError, match=r"conv_1x1.weight has shape \(4, 2, 1, 1\)"):
        QARepVGGBlock.from_params(params)
    with pytest.raises(ValueError, match="bn.var"):
        QARepVGGBlock.from_params({k: v for k, v in good.params().items() if k != "bn.var"})


def test_from_params_follows_yolov6s_identity_rule():
    block = QARepVGGBlock.random(0, 6, 6, version=2)
    assert block.identity and block.avg
    rebuilt = QARepVGGBlock.from_params(block.params(), version=2)
    assert rebuilt.identity and rebuilt.avg
    # a stride-2 block with C_in == C_out: no identity, no pooling (YOLOv6's rule), when told the stride
    s2 = QARepVGGBlock.from_params(block.params(), version=2, stride=2)
    assert not s2.identity and not s2.avg
    assert not QARepVGGBlock.from_params(block.params(), version=1).avg


# -- yolov7 RepConv: RepVGGBlock's algebra, exact for groups and depthwise -------------------------


def _yolov7_fuse_repvgg_block(block):
    """yolov7 RepConv.fuse_repvgg_block()'s identity term written out in NumPy: a (C, C/g) matrix with
    fill_diagonal_(1.0), i.e. ones at [i, i] for i < C/g only, then BN-folded and padded to 3x3."""
    c, per = block.out_channels, block.out_channels // block.groups
    eye = np.zeros((c, per))
    np.fill_diagonal(eye, 1.0)
    bn = block.identity
    t = bn.gamma / np.sqrt(bn.var + bn.eps)
    kernel = np.zeros((c, per, 3, 3))
    kernel[:, :, 1, 1] = eye * t[:, None]
    return kernel, bn.beta - bn.mean * t


@pytest.mark.parametrize("groups", [2, 4])
def test_yolov7_grouped_repconv_ours_exact_theirs_not(groups):
    block = RepVGGBlock.random(0, 8, 8, groups=groups, activation="silu", eps=1e-3)
    x = random_input((2, 8, 7, 6), seed=1)
    ours = block.reparameterize()
    assert relative_error(ours.forward(x), block.forward(x)) <= FLOAT64
    # theirs: dense and 1x1 folded as ours, the identity term only where i < C/g
    kxk = block.conv_kxk.fused()
    one = block.conv_1x1.fused()
    ident_k, ident_b = _yolov7_fuse_repvgg_block(block)
    w = kxk.kernel + np.pad(one.kernel, ((0, 0), (0, 0), (1, 1), (1, 1))) + ident_k
    theirs = ConvAct(Conv2d(w, kxk.bias + one.bias + ident_b, padding=1, groups=groups), "silu")
    assert relative_error(theirs.forward(x), block.forward(x)) > 0.01
    # exactly the channels >= C/g lose their identity
    diff = np.abs(theirs.forward(x) - block.forward(x)).max(axis=(0, 2, 3))
    assert np.all(diff[: 8 // groups] < 1e-9) and np.all(diff[8 // groups:] > 1e-3)


def test_yolov7_depthwise_repconv_is_exact():
    """yolov7's own fuse cannot run on a depthwise RepConv (fill_diagonal_ on a 1-D weight); ours is exact."""
    block = RepVGGBlock.random(1, 6, 6, groups=6, activation="silu", eps=1e-3, dtype=np.float32)
    x = random_input((2, 6, 7, 6), dtype=np.float32, seed=2)
    deploy = block.reparameterize()
    assert deploy.conv.weight.shape == (6, 1, 3, 3) and deploy.conv.groups == 6
    assert relative_error(deploy.forward(x), block.forward(x)) <= FLOAT32
