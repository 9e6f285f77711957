"""Issue 13 item 5: the state dicts of the networks people deploy (timm, ultralytics).

The key layouts are built here from the frameworks' source (file and commit cited in
``repnp/io/npz/schemes.py`` next to each block type), with random conv weights and random BN
statistics in float64; no PyTorch. Each fused dict is checked against a forward computed
branch by branch with repnp.ops, and its keys against the keys the framework's own fusion
leaves (``reparameterize_model`` for timm, ``fuse()`` for ultralytics).
"""

from pathlib import Path

import numpy as np
import pytest
from test_io_npz_synthetic import add_bn, add_conv

from repnp import cli, ops
from repnp.errors import ConversionError
from repnp.io import convert_state, load_state
from repnp.io.npz import check_state
from repnp.tolerance import relative_error as rel_err

STATE = Path(__file__).parent / "data" / "state"


def bn(state, name, x, eps):
    return ops.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                          state[f"{name}.bias"], eps=eps)


def conv(state, name, x, *, groups=1, bias=None):
    w = state[f"{name}.weight"]
    b = state.get(f"{name}.bias") if bias is None else bias
    return ops.conv2d(x, w, b, padding=w.shape[2] // 2, groups=groups)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------
# nothing to fuse, flag names in messages
# ----------------------------------------------------------------------------

def resnet_like(rng):
    """torchvision / timm resnet names (conv1 / bn1, layer1.0.conv1 ...): no scheme's blocks."""
    s = {}
    add_conv(s, rng, "conv1", 8, 3, 3)
    add_bn(s, rng, "bn1", 8)
    add_conv(s, rng, "layer1.0.conv1", 8, 8, 3)
    add_bn(s, rng, "layer1.0.bn1", 8)
    s["fc.weight"] = rng.standard_normal((10, 8)).astype(np.float32)
    s["fc.bias"] = np.zeros(10, np.float32)
    return s


def test_nothing_to_fuse_exits_0_and_writes_the_input(capsys, tmp_path):
    state = resnet_like(np.random.default_rng(0))
    np.savez(tmp_path / "r.npz", **state)
    code, out, err = run(capsys, "convert", tmp_path / "r.npz", tmp_path / "o.npz")
    assert code == 0 and err == ""
    assert "nothing to re-parameterize" in out
    got = load_state(tmp_path / "o.npz")
    assert list(got) == list(state)
    assert all(np.array_equal(got[k], state[k]) and got[k].dtype == state[k].dtype for k in state)
    code, out, _ = run(capsys, "convert", tmp_path / "r.npz", tmp_path / "j.npz", "--json")
    assert code == 0 and '"nothing_to_fuse": true' in out
    code, out, _ = run(capsys, "inspect", tmp_path / "r.npz")
    assert code == 0 and "nothing to re-parameterize" in out


def test_nothing_to_fuse_with_a_scheme_and_check_state():
    state = resnet_like(np.random.default_rng(1))
    out, report = convert_state(state, scheme="timm")
    assert out == state and report.fused == [] and report.check["passed"]
    assert "nothing to re-parameterize: no timm block" in report.messages[0]
    result = check_state(state, out)
    assert result["passed"] and result["per_block"] == {}
    assert "nothing to re-parameterize" in result["messages"][-1]


def test_messages_name_the_cli_flags():
    state = resnet_like(np.random.default_rng(2))
    _, report = convert_state(state)
    assert "--scheme" in report.messages[0] and "named with scheme=" not in report.messages[0]
    # several schemes: the flag, as the CLI spells it
    rv = load_state(STATE / "off_repvgg_ident_c10" / "train_state.npz")
    timm = load_state(STATE / "timm_repvgg_ident_c12" / "train_state.npz")
    mixed = {f"a.{k}": v for k, v in rv.items()} | {f"b.{k}": v for k, v in timm.items()}
    with pytest.raises(ConversionError, match="choose one with --scheme"):
        convert_state(mixed)


# ----------------------------------------------------------------------------
# RepMLP: a partition per block
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_repmlp():
    case = STATE / "off_repmlp_block_c12_h6w7"
    train, deploy = load_state(case / "train_state.npz"), load_state(case / "deploy_state.npz")
    both = lambda d: {f"s.{n}.{k}": v for n in ("0", "1") for k, v in d.items()}  # noqa: E731
    return both(train), both(deploy)


def test_partition_per_block(two_repmlp):
    train, deploy = two_repmlp
    for partition in ({"s.0": (6, 7), "s.1": (6, 7)}, {"s.0": (6, 7), None: (6, 7)}, (6, 7)):
        out, report = convert_state(train, partition=partition)
        assert list(out) == list(deploy) and report.check["passed"]
        assert max(rel_err(out[k], deploy[k]) for k in deploy) <= 1e-5
    with pytest.raises(ConversionError, match=r"'s\.1'.*--partition"):
        convert_state(train, partition={"s.0": (6, 7)})
    with pytest.raises(ConversionError, match=r"names \['s\.9'\].*RepMLP blocks: \['s\.0', 's\.1'\]"):
        convert_state(train, partition={"s.9": (6, 7), None: (6, 7)})


def test_partition_flag_repeatable(capsys, tmp_path, two_repmlp):
    train, deploy = two_repmlp
    np.savez(tmp_path / "t.npz", **train)
    code, out, err = run(capsys, "convert", tmp_path / "t.npz", tmp_path / "o.npz",
                         "--partition", "s.0=6,7", "--partition", "s.1=6,7")
    assert code == 0, err
    got = load_state(tmp_path / "o.npz")
    assert max(rel_err(got[k], deploy[k]) for k in deploy) <= 1e-5
    code, _, err = run(capsys, "convert", tmp_path / "t.npz", tmp_path / "p.npz", "--partition", "6,7")
    assert code == 0, err
    code, _, err = run(capsys, "convert", tmp_path / "t.npz", tmp_path / "q.npz", "--partition", "s.0=6,7")
    assert code == 2 and "--partition" in err and "'s.1'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:          # argparse: usage errors exit 2, one line
        cli.main(["convert", str(tmp_path / "t.npz"), str(tmp_path / "q.npz"), "--partition", "=6,7"])
    assert exc.value.code == 2 and "PREFIX=H,W" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# ultralytics: BaseModel.fuse() in full (Conv, RepConv, RepVGGDW, Conv2; LightConv not a RepConv)
# ----------------------------------------------------------------------------

def ultralytics_state(rng):
    s = {}
    add_conv(s, rng, "model.0.conv", 8, 3, 3)                         # Conv
    add_bn(s, rng, "model.0.bn", 8)
    p = "model.1.m.0.cv1.2."                                          # RepVGGDW (YOLOv10 CIB, lk=True)
    add_conv(s, rng, f"{p}conv.conv", 8, 1, 7)
    add_bn(s, rng, f"{p}conv.bn", 8)
    add_conv(s, rng, f"{p}conv1.conv", 8, 1, 3)
    add_bn(s, rng, f"{p}conv1.bn", 8)
    p = "model.2.m.0."                                                # LightConv (rtdetr-l HGBlock)
    add_conv(s, rng, f"{p}conv1.conv", 12, 8, 1)
    add_bn(s, rng, f"{p}conv1.bn", 12)
    add_conv(s, rng, f"{p}conv2.conv", 12, 1, 5)
    add_bn(s, rng, f"{p}conv2.bn", 12)
    p = "model.3.m.0."                                                # RepConv (RepC3)
    add_conv(s, rng, f"{p}conv1.conv", 12, 12, 3)
    add_bn(s, rng, f"{p}conv1.bn", 12)
    add_conv(s, rng, f"{p}conv2.conv", 12, 12, 1)
    add_bn(s, rng, f"{p}conv2.bn", 12)
    add_conv(s, rng, "model.4.conv", 12, 12, 3)                       # Conv2: cv2 added before the BN
    add_conv(s, rng, "model.4.cv2", 12, 12, 1)
    add_bn(s, rng, "model.4.bn", 12)
    add_conv(s, rng, "model.5.dfl.conv", 1, 16, 1)                    # DFL: a plain conv
    return s


#: The keys of the fused model's state_dict() (BaseModel.fuse(), ultralytics/nn/tasks.py @002217d4).
FUSED_KEYS = (["model.0.conv.weight", "model.0.conv.bias", "model.1.m.0.cv1.2.conv.weight",
               "model.1.m.0.cv1.2.conv.bias"]
              + [f"model.2.m.0.{m}.conv.{leaf}" for m in ("conv1", "conv2") for leaf in ("weight", "bias")]
              + ["model.3.m.0.conv.weight", "model.3.m.0.conv.bias", "model.4.conv.weight", "model.4.conv.bias"]
              + ["model.5.dfl.conv.weight"])


def test_ultralytics_fuse_in_full():
    rng = np.random.default_rng(5)
    s = ultralytics_state(rng)
    out, report = convert_state(s, scheme="ultralytics")
    assert list(out) == FUSED_KEYS
    assert [f.kind for f in report.fused] == ["Conv", "RepVGGDW", "Conv", "Conv", "RepConv", "Conv2"]
    assert report.left == [] and report.check["passed"]
    eps, x = 1e-3, rng.standard_normal((2, 8, 9, 9))
    # Conv
    y = bn(s, "model.0.bn", ops.conv2d(x[:, :3], s["model.0.conv.weight"], padding=1), eps)
    assert rel_err(ops.conv2d(x[:, :3], out["model.0.conv.weight"], out["model.0.conv.bias"], padding=1), y) <= 1e-12
    # RepVGGDW: conv(7x7 dw) + conv1(3x3 dw), both with their BN (before the SiLU)
    p = "model.1.m.0.cv1.2."
    want = (bn(s, f"{p}conv.bn", conv(s, f"{p}conv.conv", x, groups=8), eps)
            + bn(s, f"{p}conv1.bn", conv(s, f"{p}conv1.conv", x, groups=8), eps))
    assert rel_err(ops.conv2d(x, out[f"{p}conv.weight"], out[f"{p}conv.bias"], padding=3, groups=8), want) <= 1e-12
    # LightConv: the 1x1 then the depthwise 5x5, each its BN folded
    p = "model.2.m.0."
    want = bn(s, f"{p}conv2.bn", conv(s, f"{p}conv2.conv", bn(s, f"{p}conv1.bn", conv(s, f"{p}conv1.conv", x), eps),
                                       groups=12), eps)
    got = ops.conv2d(ops.conv2d(x, out[f"{p}conv1.conv.weight"], out[f"{p}conv1.conv.bias"]),
                     out[f"{p}conv2.conv.weight"], out[f"{p}conv2.conv.bias"], padding=2, groups=12)
    assert rel_err(got, want) <= 1e-12
    # Conv2: conv(3x3) + cv2(1x1) summed, then the BN (Conv2.fuse_convs, then fuse_conv_and_bn)
    x12 = rng.standard_normal((2, 12, 9, 9))
    want = bn(s, "model.4.bn", conv(s, "model.4.conv", x12) + conv(s, "model.4.cv2", x12), eps)
    assert rel_err(ops.conv2d(x12, out["model.4.conv.weight"], out["model.4.conv.bias"], padding=1), want) <= 1e-12
    # the DFL conv passes through as it is
    assert all(out[k] is s[k] for k in s if k.startswith("model.5."))


def test_lightconv_alone_is_not_refused(capsys, tmp_path):
    # rtdetr-l: before issue 13 the 1x1 -> depthwise 5x5 pair was read as a RepConv and the whole file refused
    rng = np.random.default_rng(6)
    s = {k: v for k, v in ultralytics_state(rng).items() if k.startswith("model.2.")}
    out, report = convert_state(s, scheme="ultralytics")
    assert list(out) == [k for k in FUSED_KEYS if k.startswith("model.2.")] and report.left == []
    np.savez(tmp_path / "l.npz", **s)
    code, text, err = run(capsys, "convert", tmp_path / "l.npz", tmp_path / "o.npz", "--scheme", "ultralytics")
    assert code == 0, err
    assert "2 ultralytics block(s) fused" in text


# ----------------------------------------------------------------------------
# timm RepViT (timm/models/repvit.py @1bcbc1c, reparameterize_model in timm/utils/model.py)
# ----------------------------------------------------------------------------

def add_convnorm(s, rng, name, o, i, k, *, groups=1):
    add_conv(s, rng, f"{name}.c", o, i // groups, k)
    add_bn(s, rng, f"{name}.bn", o)


def repvit_state(rng, c=8, classes=5, *, legacy=False):
    s = {}
    add_convnorm(s, rng, "stem.conv1", c // 2, 3, 3)
    add_convnorm(s, rng, "stem.conv2", c, c // 2, 3)
    p = "stages.0.blocks.0.token_mixer."
    add_convnorm(s, rng, f"{p}conv", c, c, 3, groups=c)
    if legacy:
        add_convnorm(s, rng, f"{p}conv1", c, c, 1, groups=c)
    else:
        add_conv(s, rng, f"{p}conv1", c, 1, 1, bias=True)
        add_bn(s, rng, f"{p}bn", c)
    s["stages.0.blocks.0.se.fc1.weight"] = rng.standard_normal((2, c, 1, 1))     # SqueezeExcite: passes
    s["stages.0.blocks.0.se.fc1.bias"] = rng.standard_normal(2)
    add_convnorm(s, rng, "stages.0.blocks.0.channel_mixer.conv1", 2 * c, c, 1)
    add_convnorm(s, rng, "stages.0.blocks.0.channel_mixer.conv2", c, 2 * c, 1)
    for h in ("head", "head_dist"):
        add_bn(s, rng, f"head.{h}.bn", c)
        s[f"head.{h}.l.weight"] = rng.standard_normal((classes, c)) / np.sqrt(c)
        s[f"head.{h}.l.bias"] = rng.normal(0, 0.5, classes)
    return s


REPVIT_KEYS = ["stem.conv1.weight", "stem.conv1.bias", "stem.conv2.weight", "stem.conv2.bias",
               "stages.0.blocks.0.token_mixer.weight", "stages.0.blocks.0.token_mixer.bias",
               "stages.0.blocks.0.se.fc1.weight", "stages.0.blocks.0.se.fc1.bias",
               "stages.0.blocks.0.channel_mixer.conv1.weight", "stages.0.blocks.0.channel_mixer.conv1.bias",
               "stages.0.blocks.0.channel_mixer.conv2.weight", "stages.0.blocks.0.channel_mixer.conv2.bias",
               "head.weight", "head.bias"]


@pytest.mark.parametrize("legacy", [False, True])
def test_timm_repvit(legacy):
    rng = np.random.default_rng(7)
    s, eps = repvit_state(rng, legacy=legacy), 1e-5
    out, report = convert_state(s)                       # detected: timm
    assert report.info["scheme"] == "timm" and report.check["passed"]
    assert list(out) == REPVIT_KEYS
    assert sorted({f.kind for f in report.fused}) == ["ConvNorm", "RepVggDw", "RepVitClassifier"]
    x = rng.standard_normal((2, 8, 6, 7))
    p = "stages.0.blocks.0.token_mixer."
    y = bn(s, f"{p}conv.bn", conv(s, f"{p}conv.c", x, groups=8), eps) + x
    if legacy:
        y = y + bn(s, f"{p}conv1.bn", conv(s, f"{p}conv1.c", x, groups=8), eps)
    else:
        y = bn(s, f"{p}bn", y + conv(s, f"{p}conv1", x, groups=8), eps)
    got = ops.conv2d(x, out[f"{p}weight"], out[f"{p}bias"], padding=1, groups=8)
    assert rel_err(got, y) <= 1e-12
    # the classifier: (head(v) + head_dist(v)) / 2, BN1d on the pooled vector then Linear
    v = rng.standard_normal((3, 8))
    heads = [ops.linear(bn(s, f"head.{h}.bn", v, eps), s[f"head.{h}.l.weight"], s[f"head.{h}.l.bias"])
             for h in ("head", "head_dist")]
    assert rel_err(ops.linear(v, out["head.weight"], out["head.bias"]), (heads[0] + heads[1]) / 2) <= 1e-12
    # a ConvNorm
    got = ops.conv2d(x[:, :3], out["stem.conv1.weight"], out["stem.conv1.bias"], padding=1)
    assert rel_err(got, bn(s, "stem.conv1.bn", conv(s, "stem.conv1.c", x[:, :3]), eps)) <= 1e-12


def test_timm_repvit_single_head_and_cli(capsys, tmp_path):
    rng = np.random.default_rng(8)
    s = {k: v for k, v in repvit_state(rng).items() if not k.startswith("head.head_dist.")}
    s = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in s.items()}
    np.savez(tmp_path / "r.npz", **s)
    code, text, err = run(capsys, "convert", tmp_path / "r.npz", tmp_path / "o.npz", "--scheme", "timm")
    assert code == 0, err
    out = load_state(tmp_path / "o.npz")
    assert list(out) == REPVIT_KEYS and out["head.weight"].dtype == np.float32
    v = rng.standard_normal((3, 8))
    want = ops.linear(bn(s, "head.head.bn", v, 1e-5), s["head.head.l.weight"], s["head.head.l.bias"])
    assert rel_err(ops.linear(v, out["head.weight"], out["head.bias"]), want) <= 1e-5


@pytest.mark.parametrize("legacy", [False, True])
def test_repvit_blocks_round_trip_and_fuse(legacy):
    from repnp.blocks.repvit import RepVggDw, RepVitClassifier

    block = RepVggDw.random(0, 6, kernel_size=5, legacy=legacy)
    again = RepVggDw.from_params(block.params())
    x = np.random.default_rng(1).standard_normal((2, 6, 7, 6))
    np.testing.assert_array_equal(again.forward(x), block.forward(x))
    assert rel_err(block.reparameterize().forward(x), block.forward(x)) <= 1e-12
    head = RepVitClassifier.random(0, 6, 4, distillation=not legacy)
    v = np.random.default_rng(2).standard_normal((3, 6))
    np.testing.assert_array_equal(RepVitClassifier.from_params(head.params()).forward(v), head.forward(v))
    assert rel_err(head.reparameterize().forward(v), head.forward(v)) <= 1e-12


# ----------------------------------------------------------------------------
# timm FastViT MobileOneBlock with only its identity BN (timm/models/fastvit.py @aa4b585:
# num_conv_branches=0, use_scale_branch=False, group_size=1; reparameterize() -> reparam_conv)
# ----------------------------------------------------------------------------

def test_timm_mobileone_identity_only(capsys, tmp_path):
    rng = np.random.default_rng(9)
    s, eps = {}, 1e-5
    add_bn(s, rng, "stages.0.norm.identity", 6)
    s["stages.0.norm.identity.num_batches_tracked"] = np.array(7)
    add_conv(s, rng, "head.fc", 4, 6, 1, bias=True)                           # passes through
    out, report = convert_state(s, scheme="timm")
    assert report.check["passed"] and [f.kind for f in report.fused] == ["MobileOneBlock (identity only)"]
    assert list(out) == ["stages.0.norm.reparam_conv.weight", "stages.0.norm.reparam_conv.bias",
                         "head.fc.weight", "head.fc.bias"]
    w, b = out["stages.0.norm.reparam_conv.weight"], out["stages.0.norm.reparam_conv.bias"]
    assert w.shape == (6, 1, 3, 3) and b.shape == (6,)          # depthwise 3x3, as timm writes it
    x = rng.standard_normal((2, 6, 5, 7))
    assert rel_err(ops.conv2d(x, w, b, padding=1, groups=6), bn(s, "stages.0.norm.identity", x, eps)) <= 1e-12
    t = s["stages.0.norm.identity.weight"] / np.sqrt(s["stages.0.norm.identity.running_var"] + eps)
    np.testing.assert_allclose(w[:, 0, 1, 1], t, rtol=1e-14)
    assert np.count_nonzero(w) == 6
    # detected automatically too, and through the CLI
    np.savez(tmp_path / "m.npz", **s)
    code, text, err = run(capsys, "convert", tmp_path / "m.npz", tmp_path / "o.npz")
    assert code == 0, err
    assert list(load_state(tmp_path / "o.npz")) == list(out)


def test_timm_mobileone_identity_does_not_take_other_blocks():
    # RepMixer's norm.identity belongs to the RepMixer; a RepVggBlock's identity to the RepVggBlock
    rng = np.random.default_rng(10)
    s = {}
    add_conv(s, rng, "b.conv_kxk.conv", 4, 4, 3)
    add_bn(s, rng, "b.conv_kxk.bn", 4)
    add_conv(s, rng, "b.conv_1x1.conv", 4, 4, 1)
    add_bn(s, rng, "b.conv_1x1.bn", 4)
    add_bn(s, rng, "b.identity", 4)
    out, report = convert_state(s, scheme="timm")
    assert [f.kind for f in report.fused] == ["RepVggBlock"] and list(out) == ["b.reparam_conv.weight",
                                                                                "b.reparam_conv.bias"]


# ----------------------------------------------------------------------------
# timm RepGhost (timm/models/repghost.py @03fa149: RepGhostModule.switch_to_deploy)
# ----------------------------------------------------------------------------

def repghost_state(rng, c_in=6, c=8, k=3):
    s, p = {}, "blocks.0.0.ghost1."
    add_conv(s, rng, f"{p}primary_conv.0", c, c_in, 1)
    add_bn(s, rng, f"{p}primary_conv.1", c)
    s[f"{p}primary_conv.1.num_batches_tracked"] = np.array(3)
    add_bn(s, rng, f"{p}fusion_bn.0", c)
    add_conv(s, rng, f"{p}cheap_operation.0", c, 1, k)
    add_bn(s, rng, f"{p}cheap_operation.1", c)
    s["blocks.0.0.se.conv_reduce.weight"] = rng.standard_normal((2, c, 1, 1))   # SE: passes through
    return s


REPGHOST_KEYS = ["blocks.0.0.ghost1.primary_conv.0.weight", "blocks.0.0.ghost1.primary_conv.1.weight",
                 "blocks.0.0.ghost1.primary_conv.1.bias", "blocks.0.0.ghost1.primary_conv.1.running_mean",
                 "blocks.0.0.ghost1.primary_conv.1.running_var", "blocks.0.0.ghost1.primary_conv.1.num_batches_tracked",
                 "blocks.0.0.ghost1.cheap_operation.weight", "blocks.0.0.ghost1.cheap_operation.bias",
                 "blocks.0.0.se.conv_reduce.weight"]


@pytest.mark.parametrize("k", [3, 5])
def test_timm_repghost(k):
    rng = np.random.default_rng(11)
    s, eps = repghost_state(rng, k=k), 1e-5
    out, report = convert_state(s)                       # detected: timm
    assert report.info["scheme"] == "timm" and report.check["passed"]
    assert [f.kind for f in report.fused] == ["RepGhostModule"]
    assert sorted(out) == sorted(REPGHOST_KEYS)
    p = "blocks.0.0.ghost1."
    assert all(out[key] is s[key] for key in s if key.startswith((f"{p}primary_conv", "blocks.0.0.se.")))
    x1 = rng.standard_normal((2, 8, 6, 7))
    want = bn(s, f"{p}cheap_operation.1", conv(s, f"{p}cheap_operation.0", x1, groups=8), eps)
    want = want + bn(s, f"{p}fusion_bn.0", x1, eps)
    w, b = out[f"{p}cheap_operation.weight"], out[f"{p}cheap_operation.bias"]
    assert w.shape == (8, 1, k, k)
    assert rel_err(ops.conv2d(x1, w, b, padding=k // 2, groups=8), want) <= 1e-12


def test_timm_repghost_cli(capsys, tmp_path):
    rng = np.random.default_rng(12)
    s = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in repghost_state(rng).items()}
    np.savez(tmp_path / "g.npz", **s)
    code, text, err = run(capsys, "convert", tmp_path / "g.npz", tmp_path / "o.npz", "--scheme", "timm")
    assert code == 0, err
    out = load_state(tmp_path / "o.npz")
    assert sorted(out) == sorted(REPGHOST_KEYS) and out["blocks.0.0.ghost1.cheap_operation.weight"].dtype == np.float32
