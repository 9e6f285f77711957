"""Cost model: hand-computed figures on tiny op lists and a tiny RepVGG block."""

import numpy as np
import pytest

from repnp import cost, models
from repnp.blocks.base import Conv2d
from repnp.blocks.common import Activation, ConvAct
from repnp.blocks.repvgg import RepVGGBlock
from repnp.trace import OpRecord, Trace

# One feature map of shape (1, 2, 4, 4): 32 float32 = 128 bytes. A 3x3 conv 2 -> 2:
# 2*2*3*3 = 36 weights = 144 bytes, MACs = N*O*H*W*(C/g)*k*k = 1*2*4*4*2*9 = 576.
MAP = 128
W = 144
MACS = 576


def _chain(residual):
    """RepVGG's peak-memory figure (Ding et al., CVPR 2021; see docs/sources.md): x -> conv -> conv (-> + x)."""
    t = Trace()
    x = t.input((1, 2, 4, 4))
    t1 = t.add("Conv", [x], (1, 2, 4, 4), weight_bytes=W, macs=MACS)
    t2 = t.add("Conv", [t1], (1, 2, 4, 4), weight_bytes=W, macs=MACS)
    if residual:
        t.add("Add", [t2, x], (1, 2, 4, 4))
    return cost.profile_ops(t.ops, t.inputs)


def test_plain_chain_frees_its_input():
    """conv1: x and t1 alive (2 maps) -> x has no later reader, freed: 1 map held;
    conv2: t1 and t2 alive (2 maps) -> t1 freed: 1 map held. The plain block's "1x" in that figure."""
    p = _chain(residual=False)
    assert [c.live_bytes for c in p.ops] == [2 * MAP, 2 * MAP]
    assert [c.resident_bytes for c in p.ops] == [MAP, MAP]
    assert p.peak_activation_bytes == 2 * MAP and p.peak_resident_bytes == MAP
    # traffic: each conv reads a map and its weights and writes a map: 2 * (128 + 144 + 128) = 800
    assert p.traffic_bytes == 800
    assert (p.op_count, p.macs, p.weight_bytes, p.params) == (2, 2 * MACS, 2 * W, 2 * 36)


def test_residual_keeps_its_input_alive_until_the_add():
    """conv1: x, t1 (2 maps), both held after; conv2: x, t1, t2 (3 maps) -> t1 freed, x and t2
    held (2 maps); add: x, t2, y (3 maps) -> y held. The residual block's "2x" there is the held figure."""
    p = _chain(residual=True)
    assert [c.live_bytes for c in p.ops] == [2 * MAP, 3 * MAP, 3 * MAP]
    assert [c.resident_bytes for c in p.ops] == [2 * MAP, 2 * MAP, MAP]
    assert p.peak_activation_bytes == 3 * MAP and p.peak_resident_bytes == 2 * MAP
    # traffic: 800 for the convs + the add reads two maps and writes one: 800 + 384 = 1184
    assert p.traffic_bytes == 1184
    assert p.op_types() == {"Conv": 2, "Add": 1}


def test_repvgg_block_hand_computed():
    """RepVGG block, C = 4, 8x8, identity branch. One map M = 4*8*8*4 = 1024 bytes.

    Train ops (branches one after another, each added into the running sum):
      Conv a(x), BN b(a), Conv c(x), BN d(c), Add e(b, d), BN f(x), Add g(e, f), Relu y(g).
    Alive while running: a: x,a = 2M; b: x,a,b = 3M; c: x,b,c = 3M; d: x,b,c,d = 4M;
      e: x,b,d,e = 4M; f: x,e,f = 3M; g: e,f,g = 3M; y: g,y = 2M  -> peak 4M.
    Held after each: 2M, 2M, 3M, 3M, 2M, 2M (x freed after its last reader f), 1M, 1M -> peak 3M.
    Traffic: 3x3 weights 4*4*9*4 = 576 B, 1x1 weights 64 B, a BN 4 vectors * 4 * 4 = 64 B:
      a 2M + 576 = 2624; b, c, d, f 2M + 64 = 2112 each; e, g 3M = 3072 each; y 2M = 2048
      -> 2624 + 4*2112 + 2*3072 + 2048 = 19264.
    Deploy: Conv (weights 576 + bias 16) 2M + 592 = 2640, Relu 2048 -> 4688; alive 2M; held 1M.
    Params: train 144 + 8 + 16 + 8 + 8 = 184 (BN gamma, beta only); deploy 144 + 4 = 148.
    MACs: 3x3 4*8*8*4*9 = 9216, 1x1 4*8*8*4 = 1024.
    """
    m = 1024
    block = RepVGGBlock.random(0, 4, 4)
    p = cost.profile(block, (1, 4, 8, 8))
    assert [c.op.op_type for c in p.ops] == ["Conv", "BatchNormalization", "Conv", "BatchNormalization",
                                             "Add", "BatchNormalization", "Add", "Relu"]
    assert [c.live_bytes for c in p.ops] == [2 * m, 3 * m, 3 * m, 4 * m, 4 * m, 3 * m, 3 * m, 2 * m]
    assert [c.resident_bytes for c in p.ops] == [2 * m, 2 * m, 3 * m, 3 * m, 2 * m, 2 * m, m, m]
    assert p.traffic_bytes == 19264
    lines = p.breakdown().splitlines()
    assert len(lines) == 9 and "BatchNormalization" in lines[2] and "4,096" in lines[4]
    assert (p.params, p.macs, p.op_count) == (184, 9216 + 1024, 8)
    d = cost.profile(block.reparameterize(), (1, 4, 8, 8))
    assert d.traffic_bytes == 4688
    assert (d.peak_activation_bytes, d.peak_resident_bytes) == (2 * m, m)
    assert (d.params, d.macs, d.op_count) == (148, 9216, 2)
    table = str(cost.compare(block, block.reparameterize(), (1, 4, 8, 8)))
    for words in ("parameters", "184", "148", "operators", "4.00x", "memory traffic", "4.11x",
                  "peak live", "2.00x", "peak resident", "3.00x"):
        assert words in table


def test_count_params_excludes_running_statistics():
    block = RepVGGBlock.random(0, 4, 4)
    stored = sum(v.size for v in block.params().values())
    assert stored == 144 + 16 + 3 * 16        # three BNs of 4 vectors of 4
    assert cost.count_params(block) == 144 + 16 + 3 * 8


def test_profile_ops_accepts_name_shape_pairs_and_checks_names():
    ops = [OpRecord("Relu", ("in",), "out", ((1, 3, 2, 2),), (1, 3, 2, 2))]
    p = cost.profile_ops(ops, [("in", (1, 3, 2, 2))])
    assert p.traffic_bytes == 2 * 48 and p.peak_activation_bytes == 96 and p.params == 0
    bad = [OpRecord("Relu", ("nowhere",), "out", ((1, 3, 2, 2),), (1, 3, 2, 2))]
    with pytest.raises(ValueError, match="'nowhere'"):
        cost.profile_ops(bad, [("in", (1, 3, 2, 2))])


def test_silu_keeps_its_input_for_the_mul():
    """silu = x * sigmoid(x): Sigmoid(x) -> s, Mul(s, x): x stays alive through both ops."""
    conv = ConvAct(Conv2d(np.ones((2, 2, 1, 1))), Activation("silu"))
    p = cost.profile(conv, (1, 2, 4, 4))
    assert [c.op.op_type for c in p.ops] == ["Conv", "Sigmoid", "Mul"]
    # conv: x, c (2 maps); sigmoid: c, s; mul: c, s, y -> 3 maps
    assert [c.live_bytes for c in p.ops] == [2 * MAP, 2 * MAP, 3 * MAP]


def test_networks_deploy_is_cheaper_on_every_figure():
    net = models.mobileone_s0(seed=0)
    cmp = cost.compare(net, net.reparameterize(), (1, 3, 64, 64))
    t, d = cmp.train, cmp.deploy
    assert d.params < t.params and d.macs < t.macs and d.op_count < t.op_count
    assert d.traffic_bytes < t.traffic_bytes and d.peak_resident_bytes < t.peak_resident_bytes
    assert "MACs" in str(cmp) and "(1, 3, 64, 64)" in str(cmp)


def test_profile_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="input_shape"):
        cost.profile(RepVGGBlock.random(0, 4, 4), (4, 8, 8))


def test_average_pool_counts_one_mac_per_window_tap():
    """The docstring's convention: AveragePool = the depthwise conv it equals, kh*kw MACs per output.

    DBB's depthwise layout pools x (1, 2, 4, 4) with 3x3, stride 1, padding 1: output (1, 2, 4, 4),
    32 outputs * 9 taps = 288 MACs (border windows too). ShuffleNet's stride-2 shortcut pools
    (1, 6, 4, 4) to (1, 6, 2, 2): 24 * 9 = 216. A global pool counts 0.
    """
    from repnp.blocks.dbb import DiverseBranchBlock
    from repnp.blocks.shufflenet import ShuffleNetUnit

    dbb = cost.profile(DiverseBranchBlock.random(0, 2, 2, groups=2), (1, 2, 4, 4))
    assert [c.op.macs for c in dbb.ops if c.op.op_type == "AveragePool"] == [288]
    unit = cost.profile(ShuffleNetUnit.random(0, 6, 12, groups=3, stride=2), (1, 6, 4, 4))
    assert [c.op.macs for c in unit.ops if c.op.op_type == "AveragePool"] == [216]
    head = cost.profile(models.repvgg_a0(num_classes=10).layers[-1], (1, 1280, 2, 2))
    assert [c.op.macs for c in head.ops if c.op.op_type == "GlobalAveragePool"] == [0]


def _tiny_network():
    """stem (RepVGG 4 -> 4), one stage of one RepVGG block, GAP + linear to 10 classes."""
    from repnp.blocks.common import ClassifierHead, Sequential

    layers = Sequential((RepVGGBlock.random(0, 4, 4), Sequential((RepVGGBlock.random(1, 4, 4),)),
                         ClassifierHead.random(2, 4, 10)), ("stem", "stage1", "linear"))
    return models.Network("tiny", layers)


def test_profile_layers_hand_computed():
    """Each RepVGG block on 1x4x8x8 has the figures of test_repvgg_block_hand_computed.

    The head on (1, 4, 8, 8): GlobalAveragePool reads 1024 B, writes 16; Flatten 16 + 16;
    Gemm reads 16 + (40 + 10) * 4 = 216, writes 40 -> traffic 1040 + 32 + 256 = 1328.
    Alive while running: 1040, 32, 56 -> peak 1040; held after: 16 (x freed), 16, 40 -> peak 40.
    """
    m = 1024
    net = _tiny_network()
    rows = cost.profile_layers(net, (1, 4, 8, 8))
    assert [r.name for r in rows] == ["stem", "stage1.0", "linear"]
    assert [r.input_shape for r in rows] == [(1, 4, 8, 8)] * 3
    assert [r.output_shape for r in rows] == [(1, 4, 8, 8), (1, 4, 8, 8), (1, 10)]
    assert rows[1].module is net.layers[1][0]
    for r in rows[:2]:
        t, d = r.train, r.deploy
        assert (t.traffic_bytes, t.peak_activation_bytes, t.peak_resident_bytes) == (19264, 4 * m, 3 * m)
        assert (t.params, t.macs, t.op_count) == (184, 10240, 8)
        assert (d.traffic_bytes, d.peak_activation_bytes, d.peak_resident_bytes) == (4688, 2 * m, m)
        assert (d.params, d.macs, d.op_count) == (148, 9216, 2)
    head = rows[2]
    for p in (head.train, head.deploy):
        assert (p.traffic_bytes, p.peak_activation_bytes, p.peak_resident_bytes) == (1328, 1040, 40)
        assert (p.params, p.macs, p.op_count) == (50, 40, 3)
    whole = cost.profile(net, (1, 4, 8, 8))
    assert whole.traffic_bytes == 2 * 19264 + 1328
    assert [r.name for r in cost.profile_layers(net, (1, 4, 8, 8), depth=1)] == ["stem", "stage1", "linear"]


def test_profile_layers_adds_up_to_the_network():
    """Additive figures of the layers sum to the whole network's, train and deploy (MobileNetV2:
    containers inside stages, residual and non-residual blocks, a head)."""
    net = models.mobilenet_v2(seed=0)
    deploy = net.reparameterize()
    rows = cost.profile_layers(net, (1, 3, 32, 32), deploy=deploy)
    assert rows[0].name == "stem.0" and rows[-1].name == "classifier" and rows[-1].output_shape == (1, 1000)
    for form, module in (("train", net), ("deploy", deploy)):
        whole = cost.profile(module, (1, 3, 32, 32))
        for figure in ("macs", "params", "traffic_bytes", "op_count", "weight_bytes"):
            assert sum(getattr(getattr(r, form), figure) for r in rows) == getattr(whole, figure), figure
        assert max(getattr(r, form).peak_activation_bytes for r in rows) <= whole.peak_activation_bytes


def test_profile_layers_rejects_mismatched_forms_and_bad_arguments():
    net = _tiny_network()
    with pytest.raises(ValueError, match="deploy must have the layers"):
        cost.profile_layers(net, (1, 4, 8, 8), deploy=models.repvgg_a0(num_classes=10))
    with pytest.raises(ValueError, match="depth"):
        cost.profile_layers(net, (1, 4, 8, 8), depth=0)
    with pytest.raises(ValueError, match="input_shape"):
        cost.profile_layers(net, (4, 8, 8))
