"""repnp.io.npz on synthetic state dicts, checked against the unfused computation.

For the schemes without a shared PyTorch example (mmpretrain, ultralytics, YOLOv6's
eps 1e-3) and for geometry the examples do not cover (groups with an identity,
dilation, DBB with groups, several blocks under nested prefixes), state dicts are
built here with each scheme's key names, random conv weights N(0, 1/fan_in) and random
BN statistics (mean != 0, var != 1, gamma != 1, beta != 0), in float64. The fused conv
must reproduce the branch-by-branch forward computed with repnp.ops (conv2d,
batch_norm, pad2d, avg_pool2d) within 1e-12 (tolerance rule, float64).
"""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import fusion, ops
from repnp.errors import ConversionError
from repnp.io import convert_state
from repnp.io.npz import detect_scheme, find_blocks
from repnp.tolerance import relative_error as rel_err


def add_conv(state, rng, name, o, i, kh, kw=None, *, bias=False):
    kw = kh if kw is None else kw
    state[f"{name}.weight"] = rng.standard_normal((o, i, kh, kw)) / np.sqrt(i * kh * kw)
    if bias:
        state[f"{name}.bias"] = rng.normal(0, 0.5, o)


def add_bn(state, rng, name, c):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
    state[f"{name}.bias"] = rng.normal(0, 0.5, c)
    state[f"{name}.running_mean"] = rng.normal(0, 0.5, c)
    state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)
    state[f"{name}.num_batches_tracked"] = np.array(1000, dtype=np.int64)


def add_repvgg(state, rng, p, c, kxk, one, identity):
    """A RepVGG-style block (3x3 conv-BN, 1x1 conv-BN, BN skip) on C channels, under any three names."""
    add_conv(state, rng, f"{p}{kxk}.conv", c, c, 3, 3)
    add_bn(state, rng, f"{p}{kxk}.bn", c)
    add_conv(state, rng, f"{p}{one}.conv", c, c, 1, 1)
    add_bn(state, rng, f"{p}{one}.bn", c)
    add_bn(state, rng, f"{p}{identity}", c)


def bn(state, name, x, eps):
    return ops.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                          state[f"{name}.weight"], state[f"{name}.bias"], eps=eps)


def conv(state, name, x, **geometry):
    return ops.conv2d(x, state[f"{name}.weight"], state.get(f"{name}.bias"), **geometry)


def branches_forward(state, x, convs, identity, *, stride, padding, dilation, groups, eps):
    """Sum of conv-BN branches (each padded to align with the largest kernel) + identity BN."""
    kh = max(state[f"{c}.weight"].shape[2] for c, _ in convs)
    kw = max(state[f"{c}.weight"].shape[3] for c, _ in convs)
    y = 0
    for c, b in convs:
        h, w = state[f"{c}.weight"].shape[2:]
        pad = (padding - dilation * (kh - h) // 2, padding - dilation * (kw - w) // 2)
        y = y + bn(state, b, conv(state, c, x, stride=stride, padding=pad, dilation=dilation, groups=groups), eps)
    if identity:
        y = y + bn(state, identity, x, eps)
    return y


def fused_forward(out, deploy, x, **geometry):
    return ops.conv2d(x, out[f"{deploy}.weight"], out[f"{deploy}.bias"], **geometry)


# ----------------------------------------------------------------------------
# mmpretrain RepVGG and MobileOne, nested prefixes, pass-through keys
# ----------------------------------------------------------------------------

def mmpretrain_repvgg(state, rng, p, cin, cout, groups, *, identity):
    add_conv(state, rng, f"{p}branch_3x3.conv", cout, cin // groups, 3, 3)
    add_bn(state, rng, f"{p}branch_3x3.norm", cout)
    add_conv(state, rng, f"{p}branch_1x1.conv", cout, cin // groups, 1, 1)
    add_bn(state, rng, f"{p}branch_1x1.norm", cout)
    if identity:
        add_bn(state, rng, f"{p}branch_norm", cin)


def test_mmpretrain_repvgg_network_like_dict():
    rng = np.random.default_rng(0)
    state = {}
    mmpretrain_repvgg(state, rng, "backbone.stem.", 3, 8, 1, identity=False)
    mmpretrain_repvgg(state, rng, "backbone.stage_0.0.", 8, 8, 2, identity=True)
    state["backbone.stage_0.0.se_layer.conv1.conv.weight"] = rng.standard_normal((2, 8, 1, 1))
    state["backbone.stage_0.0.se_layer.conv1.conv.bias"] = rng.standard_normal(2)
    mmpretrain_repvgg(state, rng, "backbone.stage_0.1.", 8, 12, 1, identity=False)
    state["head.fc.weight"] = rng.standard_normal((5, 12))
    state["head.fc.bias"] = rng.standard_normal(5)

    assert detect_scheme(state) == "mmpretrain"
    out, _ = convert_state(state)
    # Hand-typed: the names mmpretrain's switch_to_deploy() leaves, in state_dict() order.
    assert list(out) == [
        "backbone.stem.branch_reparam.weight", "backbone.stem.branch_reparam.bias",
        "backbone.stage_0.0.branch_reparam.weight", "backbone.stage_0.0.branch_reparam.bias",
        "backbone.stage_0.0.se_layer.conv1.conv.weight", "backbone.stage_0.0.se_layer.conv1.conv.bias",
        "backbone.stage_0.1.branch_reparam.weight", "backbone.stage_0.1.branch_reparam.bias",
        "head.fc.weight", "head.fc.bias",
    ]
    for key in ("head.fc.weight", "head.fc.bias", "backbone.stage_0.0.se_layer.conv1.conv.weight"):
        assert out[key] is state[key]
    x = rng.standard_normal((2, 8, 7, 9))
    for p, groups, identity in (("backbone.stage_0.0.", 2, "backbone.stage_0.0.branch_norm"),
                                ("backbone.stage_0.1.", 1, None)):
        ref = branches_forward(state, x, [(f"{p}branch_3x3.conv", f"{p}branch_3x3.norm"),
                                          (f"{p}branch_1x1.conv", f"{p}branch_1x1.norm")], identity,
                               stride=1, padding=1, dilation=1, groups=groups, eps=1e-5)
        y = fused_forward(out, f"{p}branch_reparam", x, padding=1, groups=groups)
        assert rel_err(y, ref) <= 1e-12


def test_mmpretrain_mobileone_depthwise_and_pointwise():
    rng = np.random.default_rng(1)
    state, c = {}, 6
    p = "backbone.stage1.0."                      # depthwise 3x3, 3 conv branches, scale, skip
    for k in range(3):
        add_conv(state, rng, f"{p}branch_conv_list.{k}.conv", c, 1, 3, 3)
        add_bn(state, rng, f"{p}branch_conv_list.{k}.norm", c)
    add_conv(state, rng, f"{p}branch_scale.conv", c, 1, 1, 1)
    add_bn(state, rng, f"{p}branch_scale.norm", c)
    add_bn(state, rng, f"{p}branch_norm", c)
    q = "backbone.stage1.1."                      # pointwise, 2 branches, skip, no scale
    for k in range(2):
        add_conv(state, rng, f"{q}branch_conv_list.{k}.conv", c, c, 1, 1)
        add_bn(state, rng, f"{q}branch_conv_list.{k}.norm", c)
    add_bn(state, rng, f"{q}branch_norm", c)
    out, _ = convert_state(state, scheme="mmpretrain")
    assert set(out) == {f"{p}branch_reparam.weight", f"{p}branch_reparam.bias",
                        f"{q}branch_reparam.weight", f"{q}branch_reparam.bias"}
    x = rng.standard_normal((1, c, 6, 5))
    ref = branches_forward(state, x, [(f"{p}branch_conv_list.{k}.conv", f"{p}branch_conv_list.{k}.norm")
                                      for k in range(3)] + [(f"{p}branch_scale.conv", f"{p}branch_scale.norm")],
                           f"{p}branch_norm", stride=1, padding=1, dilation=1, groups=c, eps=1e-5)
    assert rel_err(fused_forward(out, f"{p}branch_reparam", x, padding=1, groups=c), ref) <= 1e-12
    ref = branches_forward(state, x, [(f"{q}branch_conv_list.{k}.conv", f"{q}branch_conv_list.{k}.norm")
                                      for k in range(2)], f"{q}branch_norm",
                           stride=1, padding=0, dilation=1, groups=1, eps=1e-5)
    assert rel_err(fused_forward(out, f"{q}branch_reparam", x), ref) <= 1e-12


# ----------------------------------------------------------------------------
# eps: YOLOv6 and ultralytics train with 1e-3
# ----------------------------------------------------------------------------

def official_repvgg(state, rng, p, c):
    add_repvgg(state, rng, p, c, "rbr_dense", "rbr_1x1", "rbr_identity")
    # small variances make the eps visible
    for b in ("rbr_dense.bn", "rbr_1x1.bn", "rbr_identity"):
        state[f"{p}{b}.running_var"] = rng.uniform(1e-3, 1e-2, c)


def test_yolov6_scheme_defaults_to_eps_1e3():
    rng = np.random.default_rng(2)
    state = {}
    official_repvgg(state, rng, "backbone.ERBlock_2.0.", 4)
    p = "backbone.ERBlock_2.0."
    convs = [(f"{p}rbr_dense.conv", f"{p}rbr_dense.bn"), (f"{p}rbr_1x1.conv", f"{p}rbr_1x1.bn")]
    x = rng.standard_normal((1, 4, 5, 6))
    ref3 = branches_forward(state, x, convs, f"{p}rbr_identity", stride=1, padding=1, dilation=1, groups=1, eps=1e-3)
    ref5 = branches_forward(state, x, convs, f"{p}rbr_identity", stride=1, padding=1, dilation=1, groups=1, eps=1e-5)
    assert rel_err(ref3, ref5) > 1e-2                        # the eps matters for this state
    assert detect_scheme(state) == "repvgg"                  # same names: detection cannot tell
    yolo, _ = convert_state(state, scheme="yolov6")
    assert rel_err(fused_forward(yolo, f"{p}rbr_reparam", x, padding=1), ref3) <= 1e-12
    official, _ = convert_state(state)
    assert rel_err(fused_forward(official, f"{p}rbr_reparam", x, padding=1), ref5) <= 1e-12
    explicit, _ = convert_state(state, scheme="yolov6", eps=1e-5)   # an explicit eps always wins
    assert rel_err(fused_forward(explicit, f"{p}rbr_reparam", x, padding=1), ref5) <= 1e-12


def test_ultralytics_repconv():
    rng = np.random.default_rng(3)
    state, c = {}, 6
    p = "model.28.m.0."
    add_repvgg(state, rng, p, c, "conv1", "conv2", "bn")
    state["model.28.cv1.conv.weight"] = rng.standard_normal((c, c, 1, 1))   # an ordinary Conv: folded too
    add_bn(state, rng, "model.28.cv1.bn", c)
    with pytest.raises(ConversionError, match="no re-parameterizable block"):
        detect_scheme(state)                                 # never guessed
    out, _ = convert_state(state, scheme="ultralytics")
    assert [k for k in out if k.startswith(p)] == [f"{p}conv.weight", f"{p}conv.bias"]
    # issue 13: as ultralytics' BaseModel.fuse(), every Conv+BN is folded as well
    assert [k for k in out if k.startswith("model.28.cv1.")] == ["model.28.cv1.conv.weight", "model.28.cv1.conv.bias"]
    xc = rng.standard_normal((1, c, 4, 4))
    want = ops.batch_norm(ops.conv2d(xc, state["model.28.cv1.conv.weight"]), state["model.28.cv1.bn.running_mean"],
                          state["model.28.cv1.bn.running_var"], state["model.28.cv1.bn.weight"],
                          state["model.28.cv1.bn.bias"], eps=1e-3)
    assert rel_err(ops.conv2d(xc, out["model.28.cv1.conv.weight"], out["model.28.cv1.conv.bias"]), want) <= 1e-12
    x = rng.standard_normal((2, c, 5, 5))
    ref = ops.silu(branches_forward(state, x, [(f"{p}conv1.conv", f"{p}conv1.bn"), (f"{p}conv2.conv", f"{p}conv2.bn")],
                                    f"{p}bn", stride=1, padding=1, dilation=1, groups=1, eps=1e-3))
    block, conv_bn = find_blocks(state, "ultralytics")       # the RepConv, then the plain Conv
    assert (block.name, conv_bn.name) == ("RepConv", "Conv")
    y = ops.ACTIVATIONS[block.activation](fused_forward(out, f"{p}conv", x, padding=1))
    assert rel_err(y, ref) <= 1e-12


# ----------------------------------------------------------------------------
# grouping by prefix, never by order
# ----------------------------------------------------------------------------

def timm_repvgg(state, rng, p, c):
    add_repvgg(state, rng, p, c, "conv_kxk", "conv_1x1", "identity")


def test_prefix_boundaries_and_shuffled_order():
    rng = np.random.default_rng(4)
    state = {}
    for p in ("stages.0.blocks.1.", "stages.0.blocks.10.", "stages.0.blocks.11."):
        timm_repvgg(state, rng, p, 3 + len(p) % 4)
    state["stages.0.blocks.1.attn.fc.weight"] = rng.standard_normal((3, 3))
    reference, _ = convert_state(state)
    assert [b.prefix for b in find_blocks(state)] == ["stages.0.blocks.1.", "stages.0.blocks.10.",
                                                      "stages.0.blocks.11."]
    keys = list(state)
    for seed in range(3):
        random.Random(seed).shuffle(keys)
        shuffled = {k: state[k] for k in keys}
        out, _ = convert_state(shuffled)
        assert set(out) == set(reference)
        for k in out:
            np.testing.assert_array_equal(out[k], reference[k])


# ----------------------------------------------------------------------------
# geometry: hypothesis over the branch family (timm MobileOne names)
# ----------------------------------------------------------------------------

@settings(max_examples=20)
@given(groups=st.sampled_from([1, 2, 3]), cin_per=st.integers(1, 3), cout_per=st.integers(1, 3),
       k=st.sampled_from([1, 3, 5]), n_conv=st.integers(1, 3), stride=st.sampled_from([1, 2]),
       dilation=st.sampled_from([1, 2]), scale=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_branch_family_matches_unfused(groups, cin_per, cout_per, k, n_conv, stride, dilation, scale, seed):
    rng = np.random.default_rng(seed)
    cin, cout = groups * cin_per, groups * cout_per
    identity = cin == cout and stride == 1
    scale = scale and k > 1
    state = {}
    for n in range(n_conv):
        add_conv(state, rng, f"blk.conv_kxk.{n}.conv", cout, cin_per, k, k)
        add_bn(state, rng, f"blk.conv_kxk.{n}.bn", cout)
    convs = [(f"blk.conv_kxk.{n}.conv", f"blk.conv_kxk.{n}.bn") for n in range(n_conv)]
    if scale:
        add_conv(state, rng, "blk.conv_scale.conv", cout, cin_per, 1, 1)
        add_bn(state, rng, "blk.conv_scale.bn", cout)
        convs.append(("blk.conv_scale.conv", "blk.conv_scale.bn"))
    if identity:
        add_bn(state, rng, "blk.identity", cout)
    padding = dilation * (k // 2)
    x = rng.standard_normal((1, cin, 7, 6))
    ref = branches_forward(state, x, convs, "blk.identity" if identity else None, stride=stride,
                           padding=padding, dilation=dilation, groups=groups, eps=1e-5)
    out, _ = convert_state(state, scheme="timm")
    assert set(out) == {"blk.reparam_conv.weight", "blk.reparam_conv.bias"}
    y = fused_forward(out, "blk.reparam_conv", x, stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert rel_err(y, ref) <= 1e-12


# ----------------------------------------------------------------------------
# DBB with groups and stride, against its BN-and-pad forward
# ----------------------------------------------------------------------------

def bn_pad_value(state, name, eps):
    _, shift = fusion.bn_scale_shift(state[f"{name}.running_mean"], state[f"{name}.running_var"],
                                     state[f"{name}.weight"], state[f"{name}.bias"], eps=eps)
    return shift


@pytest.mark.parametrize("stride", [1, 2])
def test_dbb_grouped_matches_bn_and_pad_forward(stride):
    rng = np.random.default_rng(5 + stride)
    cin, cout, g, k, p, eps = 4, 6, 2, 3, 1, 1e-5
    s = {}
    add_conv(s, rng, "dbb_origin.conv", cout, cin // g, k, k)
    add_bn(s, rng, "dbb_origin.bn", cout)
    add_conv(s, rng, "dbb_avg.conv", cout, cin // g, 1, 1)
    add_bn(s, rng, "dbb_avg.bn.bn", cout)
    add_bn(s, rng, "dbb_avg.avgbn", cout)
    add_conv(s, rng, "dbb_1x1.conv", cout, cin // g, 1, 1)
    add_bn(s, rng, "dbb_1x1.bn", cout)
    s["dbb_1x1_kxk.idconv1.weight"] = rng.normal(0, 0.3, (cin, cin // g, 1, 1))   # delta on the identity
    add_bn(s, rng, "dbb_1x1_kxk.bn1.bn", cin)
    add_conv(s, rng, "dbb_1x1_kxk.conv2", cout, cin // g, k, k)
    add_bn(s, rng, "dbb_1x1_kxk.bn2", cout)
    x = rng.standard_normal((2, cin, 8, 7))
    geo = dict(stride=stride, groups=g)
    y = bn(s, "dbb_origin.bn", conv(s, "dbb_origin.conv", x, padding=p, **geo), eps)
    y += bn(s, "dbb_1x1.bn", conv(s, "dbb_1x1.conv", x, padding=0, **geo), eps)
    t = bn(s, "dbb_avg.bn.bn", conv(s, "dbb_avg.conv", x, groups=g), eps)
    t = ops.pad2d(t, p, value=bn_pad_value(s, "dbb_avg.bn.bn", eps))
    y += bn(s, "dbb_avg.avgbn", ops.avg_pool2d(t, k, stride=stride), eps)
    w1 = s["dbb_1x1_kxk.idconv1.weight"] + fusion.identity_kernel(cin, groups=g, kernel_size=1)
    t = bn(s, "dbb_1x1_kxk.bn1.bn", ops.conv2d(x, w1, groups=g), eps)
    t = ops.pad2d(t, p, value=bn_pad_value(s, "dbb_1x1_kxk.bn1.bn", eps))
    y += bn(s, "dbb_1x1_kxk.bn2", conv(s, "dbb_1x1_kxk.conv2", t, **geo), eps)

    out, report = convert_state(s)
    assert list(out) == ["dbb_reparam.weight", "dbb_reparam.bias"]
    (block,) = find_blocks(s)
    assert report.fused[0].detail["groups"] == g and report.fused[0].kind == block.name
    assert rel_err(fused_forward(out, "dbb_reparam", x, padding=p, **geo), y) <= 1e-12


def test_acnet_affine_false_bns():
    # ACBlock(use_affine=False): BNs without weight / bias (gamma = 1, beta = 0).
    rng = np.random.default_rng(8)
    s = {}
    for name, (kh, kw) in (("square", (3, 3)), ("ver", (3, 1)), ("hor", (1, 3))):
        add_conv(s, rng, f"{name}_conv", 5, 4, kh, kw)
        add_bn(s, rng, f"{name}_bn", 5)
        del s[f"{name}_bn.weight"], s[f"{name}_bn.bias"]
    x = rng.standard_normal((1, 4, 6, 6))
    ref = 0
    for name, pad in (("square", (1, 1)), ("ver", (1, 0)), ("hor", (0, 1))):
        z = conv(s, f"{name}_conv", x, padding=pad)
        ref = ref + ops.batch_norm(z, s[f"{name}_bn.running_mean"], s[f"{name}_bn.running_var"],
                                   np.ones(5), np.zeros(5), eps=1e-5)
    out, _ = convert_state(s)
    assert rel_err(fused_forward(out, "fused_conv", x, padding=1), ref) <= 1e-12


def test_float32_in_float32_out():
    rng = np.random.default_rng(9)
    state = {}
    timm_repvgg(state, rng, "", 4)
    state32 = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state.items()}
    (out64, _), (out32, _) = convert_state(state), convert_state(state32)
    assert out32["reparam_conv.weight"].dtype == np.float32
    assert rel_err(out32["reparam_conv.weight"], out64["reparam_conv.weight"]) <= 1e-6


# ----------------------------------------------------------------------------
# a FastViT-like dict: PatchEmbed (large kernel + MobileOne), RepCPE, RepMixer
# ----------------------------------------------------------------------------

def test_fastvit_like_dict():
    rng = np.random.default_rng(10)
    s, c = {}, 4
    pe = "stages.1.downsample.proj."
    add_conv(s, rng, f"{pe}0.large_conv.conv", 2 * c, 1, 7, 7)       # dw (group_size 1), stride 2
    add_bn(s, rng, f"{pe}0.large_conv.bn", 2 * c)
    add_conv(s, rng, f"{pe}0.small_conv.conv", 2 * c, 1, 3, 3)
    add_bn(s, rng, f"{pe}0.small_conv.bn", 2 * c)
    add_conv(s, rng, f"{pe}1.conv_kxk.0.conv", 2 * c, 2 * c, 1, 1)   # pointwise MobileOne, no skip
    add_bn(s, rng, f"{pe}1.conv_kxk.0.bn", 2 * c)
    add_conv(s, rng, "stages.1.pos_emb.pos_enc", 2 * c, 1, 7, 7, bias=True)
    mx = "stages.1.blocks.0.token_mixer."
    add_bn(s, rng, f"{mx}norm.identity", 2 * c)
    add_bn(s, rng, f"{mx}mixer.identity", 2 * c)
    add_conv(s, rng, f"{mx}mixer.conv_kxk.0.conv", 2 * c, 1, 3, 3)
    add_bn(s, rng, f"{mx}mixer.conv_kxk.0.bn", 2 * c)
    add_conv(s, rng, f"{mx}mixer.conv_scale.conv", 2 * c, 1, 1, 1)
    add_bn(s, rng, f"{mx}mixer.conv_scale.bn", 2 * c)
    s[f"{mx}layer_scale.gamma"] = rng.uniform(0.5, 1.5, (2 * c, 1, 1))
    s["stages.1.blocks.0.mlp.fc1.weight"] = rng.standard_normal((8, 8, 1, 1))

    assert detect_scheme(s) == "timm"
    assert [b.name for b in find_blocks(s)] == ["ReparamLargeKernelConv", "MobileOneBlock", "RepConditionalPosEnc",
                                               "RepMixer"]
    out, _ = convert_state(s)
    assert list(out) == [f"{pe}0.reparam_conv.weight", f"{pe}0.reparam_conv.bias",
                         f"{pe}1.reparam_conv.weight", f"{pe}1.reparam_conv.bias",
                         "stages.1.pos_emb.reparam_conv.weight", "stages.1.pos_emb.reparam_conv.bias",
                         f"{mx}reparam_conv.weight", f"{mx}reparam_conv.bias",
                         "stages.1.blocks.0.mlp.fc1.weight"]
    # large kernel, depthwise over 8 channels (the block's input must have 8 channels)
    x = rng.standard_normal((1, 2 * c, 9, 8))
    ref = branches_forward(s, x, [(f"{pe}0.large_conv.conv", f"{pe}0.large_conv.bn"),
                                  (f"{pe}0.small_conv.conv", f"{pe}0.small_conv.bn")], None,
                           stride=2, padding=3, dilation=1, groups=2 * c, eps=1e-5)
    assert rel_err(fused_forward(out, f"{pe}0.reparam_conv", x, stride=2, padding=3, groups=2 * c), ref) <= 1e-12
    # RepCPE: x + pos_enc(x)
    ref = x + conv(s, "stages.1.pos_emb.pos_enc", x, padding=3, groups=2 * c)
    y = fused_forward(out, "stages.1.pos_emb.reparam_conv", x, padding=3, groups=2 * c)
    assert rel_err(y, ref) <= 1e-12
    # RepMixer: x + gamma * (mixer(x) - norm(x))
    mixer = branches_forward(s, x, [(f"{mx}mixer.conv_kxk.0.conv", f"{mx}mixer.conv_kxk.0.bn"),
                                    (f"{mx}mixer.conv_scale.conv", f"{mx}mixer.conv_scale.bn")],
                             f"{mx}mixer.identity", stride=1, padding=1, dilation=1, groups=2 * c, eps=1e-5)
    ref = x + s[f"{mx}layer_scale.gamma"][None] * (mixer - bn(s, f"{mx}norm.identity", x, 1e-5))
    y = fused_forward(out, f"{mx}reparam_conv", x, padding=1, groups=2 * c)
    assert rel_err(y, ref) <= 1e-12


def test_residual_conv_needs_depthwise_with_bias():
    rng = np.random.default_rng(11)
    s = {}
    add_conv(s, rng, "pe.pos_enc", 4, 2, 3, 3, bias=True)     # grouped, not depthwise: not a RepCPE
    add_conv(s, rng, "other.pos_enc", 4, 1, 3, 3)            # no bias: not a RepCPE
    # issue 13: nothing to fuse is not an error; the output is the input, the message says why
    out, report = convert_state(s, scheme="timm")
    assert list(out) == list(s) and all(out[k] is s[k] for k in s)
    assert "nothing to re-parameterize: no timm block" in report.messages[0]
    assert [e["where"] for e in report.left] == ["pe"]        # the grouped one is named, not fused


@pytest.mark.parametrize("k, p, stride", [(3, 1, 1), (3, 0, 1), (5, 1, 2), (5, 2, 1), (5, 0, 2)])
def test_acnet_with_cropping(k, p, stride):
    # ACBlock.forward (acnet/acb.py): when padding < K//2 the Kx1 branch sees the input cropped by
    # K//2 - p columns on each side (and the 1xK branch rows), with padding [p, 0] / [0, p];
    # otherwise paddings [p, p - K//2] / [p - K//2, p]. The state dict is the same either way and the
    # fused KxK conv (padding p) must equal both.
    rng = np.random.default_rng(20 + k + p)
    s = {}
    add_conv(s, rng, "acb.square_conv", 6, 3, k, k)
    add_conv(s, rng, "acb.ver_conv", 6, 3, k, 1)
    add_conv(s, rng, "acb.hor_conv", 6, 3, 1, k)
    for name in ("square_bn", "ver_bn", "hor_bn"):
        add_bn(s, rng, f"acb.{name}", 6)
    x = rng.standard_normal((1, 3, 11, 10))
    crop = k // 2 - p
    if crop > 0:
        ver_in, hor_in = x[:, :, :, crop:-crop], x[:, :, crop:-crop, :]
        ver_pad, hor_pad = (p, 0), (0, p)
    else:
        ver_in, hor_in = x, x
        ver_pad, hor_pad = (p, p - k // 2), (p - k // 2, p)
    ref = bn(s, "acb.square_bn", conv(s, "acb.square_conv", x, stride=stride, padding=p), 1e-5)
    ref = ref + bn(s, "acb.ver_bn", conv(s, "acb.ver_conv", ver_in, stride=stride, padding=ver_pad), 1e-5)
    ref = ref + bn(s, "acb.hor_bn", conv(s, "acb.hor_conv", hor_in, stride=stride, padding=hor_pad), 1e-5)
    out, _ = convert_state(s)
    assert detect_scheme(s) == "acnet" and list(out) == ["acb.fused_conv.weight", "acb.fused_conv.bias"]
    assert rel_err(fused_forward(out, "acb.fused_conv", x, stride=stride, padding=p), ref) <= 1e-12


def test_mobileone_block_named_mixer_is_not_a_repmixer():
    rng = np.random.default_rng(30)
    s = {}
    add_conv(s, rng, "mixer.conv_kxk.0.conv", 4, 1, 3, 3)
    add_bn(s, rng, "mixer.conv_kxk.0.bn", 4)
    add_bn(s, rng, "mixer.identity", 4)
    (block,) = find_blocks(s)
    assert (block.name, block.deploy) == ("MobileOneBlock", "mixer.reparam_conv")


def test_pos_enc_that_is_not_a_repcpe_is_left_and_reported():
    rng = np.random.default_rng(12)
    s = {}
    timm_repvgg(s, rng, "stem.", 4)
    add_conv(s, rng, "pe.pos_enc", 4, 2, 3, 3, bias=True)     # grouped: not a RepCPE, passes through
    out, report = convert_state(s)
    assert out["pe.pos_enc.weight"] is s["pe.pos_enc.weight"]
    assert [f.where for f in report.fused] == ["stem"]
    (left,) = report.left
    assert left["where"] == "pe" and "RepConditionalPosEnc" in left["reason"]
    assert "pe.pos_enc.weight" in left["reason"] and "(4, 2, 3, 3)" in left["reason"]
