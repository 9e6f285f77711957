"""``Block.from_params``: the inverse of ``params()`` for every block family.

For each family, ``from_params(b.params(), **config)`` must give a block with identical
``params()`` (same keys, same order, equal arrays) and the same ``forward``, in the train
form and, where it has another class or layout, the deploy form. Then the errors: a missing
or unexpected key is a ``ValueError`` naming the keys, a shape mismatch a ``ShapeError``
naming the keys and shapes.
"""

import numpy as np
import pytest

from repnp.blocks import (
    ACBlock,
    Activation,
    BatchNorm,
    ClassifierHead,
    CompactorConv,
    Conv2d,
    ConvAct,
    ConvBN,
    DepthwiseSeparableBlock,
    DiverseBranchBlock,
    InvertedResidual,
    LinearBottleneckBlock,
    MobileOneBlock,
    MobileOneIdentity,
    MobileOneUnit,
    NASNetNormalCell,
    RegularConvBlock,
    ReparamLargeKernelConv,
    RepConditionalPosEnc,
    RepGhostCheap,
    RepMixer,
    RepMLPBlock,
    RepVGGBlock,
    RepVggDw,
    RepVitClassifier,
    ResRepNet,
    Sequential,
    ShuffleNetUnit,
    SqueezeExcite,
)
from repnp.blocks.ecb import ECB, ECBSR, PReLU
from repnp.blocks.nasnet import ReLUConvBN, SeparableConv, StackedSeparable
from repnp.blocks.orepa import OREPA
from repnp.blocks.qarepvgg import QARepVGGBlock
from repnp.blocks.resrep import Linear, ResRepNetDeploy
from repnp.blocks.ultralytics import ConvTransposeBN, ParallelConvBN
from repnp.blocks.unireplknet import DilatedReparamBlock, UniRepLKNetBlock
from repnp.errors import ShapeError


def rng(seed=0):
    return np.random.default_rng(seed)


def x_of(*shape, seed=1):
    return rng(seed).standard_normal(shape)


def _base_cases():
    r = rng(0)
    conv = Conv2d(r.standard_normal((6, 2, 3, 3)), r.standard_normal(6), stride=2, padding=1, groups=2)
    return [
        ("Conv2d", conv, dict(stride=2, padding=1, groups=2), (2, 4, 7, 6)),
        ("Conv2d no bias", Conv2d(r.standard_normal((5, 4, 1, 3)), padding=(0, 1)), dict(padding=(0, 1)),
         (2, 4, 7, 6)),
        ("BatchNorm", ConvBN.random(r, 3, 5, 1).bn, dict(eps=1e-5), (2, 5, 4, 3)),
        ("ConvBN", ConvBN.random(r, 4, 6, 3, stride=2, padding=1, dilation=1, groups=2, eps=1e-3),
         dict(stride=2, padding=1, groups=2, eps=1e-3), (2, 4, 7, 6)),
        ("ConvAct", ConvAct(conv, "relu6"), dict(stride=2, padding=1, groups=2, activation="relu6"), (2, 4, 7, 6)),
        ("ConvAct se", MobileOneBlock.random(0, 16, 16, use_se=True).reparameterize(),
         dict(padding=1, groups=1), (2, 16, 5, 5)),
        ("ClassifierHead", ClassifierHead.random(0, 6, 4), {}, (2, 6, 3, 3)),
        ("SqueezeExcite", SqueezeExcite.random(0, 32), {}, (2, 32, 3, 3)),
    ]


def _family_cases():
    return [
        ("RepVGGBlock", RepVGGBlock.random(0, 6, 6, groups=3), {}, (2, 6, 7, 6)),
        ("RepVGGBlock s2", RepVGGBlock.random(1, 4, 8, stride=2, kernel_size=5, activation="silu", eps=1e-3),
         dict(stride=2, activation="silu", eps=1e-3), (2, 4, 9, 8)),
        ("RepVGGBlock deploy", RepVGGBlock.random(2, 4, 4).reparameterize(), dict(padding=1), (2, 4, 7, 6)),
        ("MobileOneBlock", MobileOneBlock.random(0, 6, 6, groups=6, num_branches=3), {}, (2, 6, 7, 6)),
        ("MobileOneBlock s2", MobileOneBlock.random(1, 4, 8, stride=2, num_branches=2),
         dict(stride=2), (2, 4, 9, 8)),
        ("MobileOneBlock 1x1 se", MobileOneBlock.random(2, 16, 16, kernel_size=1, use_se=True), {}, (2, 16, 5, 4)),
        ("MobileOneUnit", MobileOneUnit.random(0, 4, 8, stride=2, num_branches=2), dict(stride=2), (2, 4, 9, 8)),
        ("ACBlock", ACBlock.random(0, 4, 6, kernel_size=5, padding=1, stride=2), dict(padding=1, stride=2),
         (2, 4, 11, 10)),
        ("ACBlock dilated", ACBlock.random(1, 4, 4, dilation=2), dict(dilation=2), (2, 4, 11, 10)),
        ("DiverseBranchBlock", DiverseBranchBlock.random(0, 4, 6, groups=2, stride=2), dict(stride=2),
         (2, 4, 9, 8)),
        ("DiverseBranchBlock dw", DiverseBranchBlock.random(1, 6, 6, groups=6), {}, (2, 6, 9, 8)),
        ("DiverseBranchBlock plain 1x1", DiverseBranchBlock.random(2, 4, 4, internal_channels=8), {}, (2, 4, 7, 6)),
        ("RepMLPBlock", RepMLPBlock.random(0, 6, 3, 4, share_sets=3), dict(partition=(3, 4), channels=6),
         (2, 6, 3, 4)),
        ("RepMLPBlock 1x1", RepMLPBlock.random(1, 4, 2, 3, kernels=(1,)), dict(partition=(2, 3)), (2, 4, 2, 3)),
        ("SharedFC", RepMLPBlock.random(0, 6, 3, 4, share_sets=3).reparameterize(),
         dict(channels=6, height=3, width=4), (2, 6, 3, 4)),
        ("InvertedResidual", InvertedResidual.random(0, 8, 8), {}, (2, 8, 7, 6)),
        ("InvertedResidual s2", InvertedResidual.random(1, 4, 6, stride=2, expand_ratio=1), dict(stride=2),
         (2, 4, 7, 6)),
        ("InvertedResidual deploy", InvertedResidual.random(2, 4, 4).reparameterize(), {}, (2, 4, 7, 6)),
        ("RegularConvBlock", RegularConvBlock.random(0, 4, 6, stride=2), dict(stride=2), (2, 4, 7, 6)),
        ("RegularConvBlock deploy", RegularConvBlock.random(0, 4, 6).reparameterize(), {}, (2, 4, 7, 6)),
        ("DepthwiseSeparableBlock", DepthwiseSeparableBlock.random(0, 4, 6, stride=2), dict(stride=2),
         (2, 4, 7, 6)),
        ("LinearBottleneckBlock", LinearBottleneckBlock.random(0, 8, 8, stride=2), dict(stride=2), (2, 8, 7, 6)),
        ("LinearBottleneckBlock merged", LinearBottleneckBlock.random(1, 8, 8).reparameterize(merge_pointwise=True),
         {}, (2, 8, 7, 6)),
        ("ShuffleNetUnit", ShuffleNetUnit.random(0, 12, 12, groups=3), dict(groups=3), (2, 12, 7, 6)),
        ("ShuffleNetUnit s2", ShuffleNetUnit.random(1, 12, 24, groups=3, stride=2, first_groups=1),
         dict(groups=3, first_groups=1, stride=2), (2, 12, 8, 6)),
        ("ShuffleNetUnit merged", ShuffleNetUnit.random(2, 12, 12, groups=3).reparameterize(merge_pointwise=True),
         dict(groups=3), (2, 12, 7, 6)),
        ("CompactorConv", CompactorConv.random(0, 4, 6, stride=2, groups=2), dict(stride=2, groups=2),
         (2, 4, 7, 6)),
        ("ResRepNet conv", ResRepNet.random(0, 3, 6, 5), {}, (2, 3, 6, 5)),
        ("ResRepNet linear", ResRepNet.random(1, 3, 6, 5, head="linear", input_size=(6, 5)), {}, (2, 3, 6, 5)),
        ("RepMixer", RepMixer.random(0, 6, num_branches=2), {}, (2, 6, 7, 6)),
        ("RepMixer no scale", RepMixer.random(1, 4, kernel_size=5, layer_scale=False), {}, (2, 4, 7, 6)),
        ("ReparamLargeKernelConv", ReparamLargeKernelConv.random(0, 4, 6, stride=2, activation="gelu"),
         dict(stride=2, activation="gelu"), (2, 4, 11, 9)),
        ("ReparamLargeKernelConv dw", ReparamLargeKernelConv.random(1, 4, 4, groups=4, small_kernel=None),
         dict(groups=4), (2, 4, 9, 9)),
        ("RepConditionalPosEnc", RepConditionalPosEnc.random(0, 5, kernel_size=3), {}, (2, 5, 6, 7)),
        ("RepVggDw", RepVggDw.random(0, 6), {}, (2, 6, 7, 6)),
        ("RepVggDw legacy", RepVggDw.random(1, 4, kernel_size=5, legacy=True), {}, (2, 4, 7, 6)),
        ("RepVitClassifier", RepVitClassifier.random(0, 8, 5), {}, (3, 8)),
        ("RepVitClassifier one head", RepVitClassifier.random(1, 8, 5, distillation=False), {}, (3, 8)),
        ("RepGhostCheap", RepGhostCheap.random(0, 6), {}, (2, 6, 7, 6)),
        ("RepGhostCheap k5", RepGhostCheap.random(1, 4, kernel_size=5, eps=1e-3), dict(eps=1e-3), (2, 4, 7, 6)),
        ("MobileOneIdentity", MobileOneIdentity.random(0, 5), {}, (2, 5, 7, 6)),
        ("MobileOneIdentity k5", MobileOneIdentity.random(1, 4, kernel_size=5), dict(kernel_size=5), (2, 4, 7, 6)),
        # large kernels (UniRepLKNet; RepLKNet is ReparamLargeKernelConv above)
        ("DilatedReparamBlock", DilatedReparamBlock.random(0, 3, kernel_size=9), {}, (2, 3, 11, 10)),
        ("DilatedReparamBlock grouped s2", DilatedReparamBlock.random(1, 4, kernel_size=5, groups=2, stride=2),
         dict(groups=2, stride=2), (2, 4, 9, 8)),
        ("UniRepLKNetBlock", UniRepLKNetBlock.random(0, 4, kernel_size=7), {}, (2, 4, 9, 8)),
        ("UniRepLKNetBlock k3", UniRepLKNetBlock.random(1, 4, kernel_size=3, layer_scale=False), {}, (2, 4, 6, 5)),
        ("UniRepLKNetBlock k0", UniRepLKNetBlock.random(2, 4, kernel_size=0), {}, (2, 4, 6, 5)),
        ("UniRepLKNetBlockDeploy", UniRepLKNetBlock.random(3, 4, kernel_size=7).reparameterize(), {}, (2, 4, 9, 8)),
        # ECB (ECBSR), OREPA
        ("ECB", ECB.random(0, 3, 5), {}, (2, 3, 7, 6)),
        ("ECB identity", ECB.random(1, 4, 4, with_idt=True, depth_multiplier=1.5), dict(with_idt=True), (2, 4, 7, 6)),
        ("OREPA", OREPA.random(0, 4, 6, stride=2), dict(stride=2), (2, 4, 9, 8)),
        ("PReLU", PReLU.random(0, 5), {}, (2, 5, 6, 7)),
        ("ECBSR", ECBSR.random(0, module_nums=2, channel_nums=4, scale=2), {}, (1, 1, 6, 7)),
        ("ECBSR relu identity", ECBSR.random(1, module_nums=1, channel_nums=4, scale=3, act_type="relu", with_idt=True),
         dict(act_type="relu", with_idt=True), (1, 1, 5, 6)),
        ("PlainSR", ECBSR.random(2, module_nums=1, channel_nums=4, scale=2).reparameterize(), {}, (1, 1, 6, 7)),
        ("OREPA groups 8", OREPA.random(1, 8, 8, groups=8, eps=1e-3), dict(eps=1e-3), (2, 8, 7, 6)),
        # QARepVGG v1 / v2 (YOLOv6) and its official deploy form (BN kept)
        ("QARepVGGBlock", QARepVGGBlock.random(0, 6, 6, groups=3), dict(groups=3), (2, 6, 7, 6)),
        ("QARepVGGBlockV2", QARepVGGBlock.random(1, 6, 6, version=2, eps=1e-3), dict(version=2, eps=1e-3),
         (2, 6, 7, 6)),
        ("QARepVGGBlock s2", QARepVGGBlock.random(2, 4, 8, stride=2, keep_bn=True), dict(stride=2, keep_bn=True),
         (2, 4, 9, 8)),
        ("ConvBNAct", QARepVGGBlock.random(3, 4, 4, groups=2, keep_bn=True).reparameterize(), dict(groups=2),
         (2, 4, 7, 6)),
        # ultralytics' Conv2 and ConvTranspose (+ BN), and the latter's deploy form
        ("ParallelConvBN", ParallelConvBN.random(0, 4, 6, stride=2, groups=2, eps=1e-3),
         dict(stride=2, groups=2, eps=1e-3), (2, 4, 9, 8)),
        ("ParallelConvBN 3x5 dilated", ParallelConvBN.random(1, 4, 4, kernel_size=(3, 5), dilation=2),
         dict(dilation=2), (2, 4, 9, 10)),
        ("ConvTransposeBN", ConvTransposeBN.random(0, 4, 6), dict(stride=2), (2, 4, 5, 4)),
        ("ConvTransposeBN grouped k4", ConvTransposeBN.random(1, 4, 6, kernel_size=4, padding=1, groups=2, bias=True),
         dict(stride=2, padding=1), (2, 4, 5, 4)),
        ("ConvTranspose2d", ConvTransposeBN.random(2, 4, 6, groups=2, output_padding=1, stride=3).reparameterize(),
         dict(stride=3, output_padding=1, groups=2), (2, 4, 5, 4)),
    ]


def _container_cases():
    r = rng(3)
    seq = Sequential((RegularConvBlock.random(0, 3, 4), RepVGGBlock.random(1, 4, 4)), ("stem", "block"))
    layers = [("stem", RegularConvBlock, {}), ("block", RepVGGBlock, {})]
    act = Sequential((ConvBN.random(r, 3, 4, 3, padding=1), Activation("relu")))
    return [
        ("Sequential", seq, dict(layers=layers), (2, 3, 7, 6)),
        ("Sequential activation", act, dict(layers=[("0", ConvBN, {}), ("1", Activation, {"name": "relu"})]),
         (2, 3, 7, 6)),
        ("Linear", Linear(r.standard_normal((4, 6)), r.standard_normal(4)), {}, (3, 6)),
        ("ReLUConvBN", ReLUConvBN(ConvBN.random(r, 4, 6, 1, eps=1e-3)), {}, (2, 4, 5, 5)),
        ("SeparableConv", SeparableConv.random(r, 4, 6, 3, stride=2), dict(stride=2), (2, 4, 7, 6)),
        ("SeparableConv merged", SeparableConv.random(r, 4, 6, 5).reparameterize(merge_pointwise=True), {},
         (2, 4, 7, 6)),
        ("StackedSeparable", StackedSeparable.random(r, 4, 5), {}, (2, 4, 7, 6)),
    ]


CASES = _base_cases() + _family_cases() + _container_cases()


def assert_same_params(a, b):
    pa, pb = a.params(), b.params()
    assert list(pa) == list(pb)
    for k in pa:
        assert pa[k].shape == pb[k].shape and np.array_equal(pa[k], pb[k]), k


@pytest.mark.parametrize("name, block, config, shape", CASES, ids=[c[0] for c in CASES])
def test_round_trip(name, block, config, shape):
    rebuilt = type(block).from_params(block.params(), **config)
    assert type(rebuilt) is type(block)
    assert_same_params(block, rebuilt)
    x = x_of(*shape)
    np.testing.assert_array_equal(rebuilt.forward(x), block.forward(x))


def test_round_trip_covers_every_family():
    # every class with params() in repnp.blocks (and the helpers' classes) has from_params and a
    # round trip: in CASES, or below (the NASNet cell's forward takes two inputs; ResRepNetDeploy)
    import repnp.blocks as blocks
    from repnp.blocks import nasnet, repmlp, resrep

    covered = {type(c[1]).__name__ for c in CASES} | {"NASNetNormalCell", "ResRepNetDeploy", "Activation"}
    classes = [getattr(blocks, n) for n in blocks.__all__]
    classes += [nasnet.ReLUConvBN, nasnet.SeparableConv, nasnet.StackedSeparable, repmlp.SharedFC,
                resrep.Linear, resrep.ResRepNetDeploy]
    with_params = {c.__name__ for c in classes if hasattr(c, "params")}
    assert all(hasattr(c, "from_params") for c in classes if hasattr(c, "params"))
    assert with_params - covered == set()
    assert Activation.from_params({}, name="gelu") == Activation("gelu")


def test_nasnet_cell_and_resrep_deploy_round_trip():
    cell = NASNetNormalCell.random(0, 6, 8, 4)
    rebuilt = NASNetNormalCell.from_params(cell.params())
    assert_same_params(cell, rebuilt)
    x_prev, x = x_of(2, 6, 5, 5), x_of(2, 8, 5, 5, seed=2)
    np.testing.assert_array_equal(rebuilt.forward(x_prev, x), cell.forward(x_prev, x))
    cell = NASNetNormalCell.random(1, 4, 4, 4, count_include_pad=True)
    assert_same_params(cell, NASNetNormalCell.from_params(cell.params(), count_include_pad=True))

    for net in (ResRepNet.random(0, 3, 6, 5), ResRepNet.random(1, 3, 6, 5, head="linear", input_size=(6, 5))):
        deploy = net.reparameterize()
        rebuilt = ResRepNetDeploy.from_params(deploy.params())
        assert_same_params(deploy, rebuilt)
        x = x_of(2, 3, 6, 5)
        np.testing.assert_array_equal(rebuilt.forward(x), deploy.forward(x))


def test_fastvit_deploy_round_trip():
    # the deploy forms are Conv2d / ConvAct: from_params with the geometry of reparameterize()
    mixer = RepMixer.random(0, 6).reparameterize()
    rebuilt = Conv2d.from_params(mixer.params(), padding=1, groups=6)
    x = x_of(2, 6, 5, 5)
    np.testing.assert_array_equal(rebuilt.forward(x), mixer.forward(x))


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------

def test_missing_and_unexpected_keys_are_named():
    params = RepVGGBlock.random(0, 4, 4).params()
    del params["conv_kxk.bn.var"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['conv_kxk.bn.var'\]"):
        RepVGGBlock.from_params(params)
    params = RepVGGBlock.random(0, 4, 4).params()
    params["conv_kxk.conv.weight_orig"] = params["conv_kxk.conv.weight"]
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['conv_kxk.conv.weight_orig'\]"):
        RepVGGBlock.from_params(params)
    with pytest.raises(ValueError, match=r"missing key\(s\).*'weight'"):
        Conv2d.from_params({"bias": np.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['gamma2'\]"):
        BatchNorm.from_params({**ConvBN.random(rng(), 2, 3, 1).bn.params(), "gamma2": np.ones(3)})
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['other.weight'\]"):
        Sequential.from_params({"other.weight": np.ones((1, 1, 1, 1))}, layers=[("0", Conv2d, {})])


def test_shape_mismatches_name_keys_and_shapes():
    params = RepVGGBlock.random(0, 4, 4).params()
    params["conv_1x1.conv.weight"] = np.ones((4, 2, 1, 1))
    with pytest.raises(ShapeError, match=r"conv_1x1\.conv\.weight has shape \(4, 2, 1, 1\).*\(4, 4, 3, 3\)"):
        RepVGGBlock.from_params(params)
    params = RepVGGBlock.random(0, 4, 4).params()
    params["conv_kxk.bn.beta"] = np.ones(3)
    with pytest.raises(ShapeError, match=r"'conv_kxk\.bn\.beta': \(3,\)"):
        RepVGGBlock.from_params(params)
    params = MobileOneBlock.random(0, 4, 4, num_branches=2).params()
    params["conv_kxk.1.conv.weight"] = np.ones((4, 4, 5, 5))
    with pytest.raises(ShapeError, match=r"conv_kxk\.1\.conv\.weight has shape \(4, 4, 5, 5\)"):
        MobileOneBlock.from_params(params)
    params = ACBlock.random(0, 4, 4).params()
    params["ver.conv.weight"] = np.ones((4, 4, 1, 3))
    with pytest.raises(ShapeError, match=r"ver\.conv\.weight has shape \(4, 4, 1, 3\)"):
        ACBlock.from_params(params)
    params = RepConditionalPosEnc.random(0, 4).params()
    params["pos_enc.weight"] = np.ones((4, 2, 3, 3))
    with pytest.raises(ShapeError, match=r"pos_enc\.weight has shape \(4, 2, 3, 3\).*depthwise"):
        RepConditionalPosEnc.from_params(params)
    params = RepMixer.random(0, 4).params()
    params["layer_scale.gamma"] = np.ones(3)
    with pytest.raises(ShapeError, match=r"layer_scale\.gamma has shape \(3,\)"):
        RepMixer.from_params(params)


def test_repmlp_partition_is_needed_and_checked():
    from repnp.blocks.fromparams import NeedsOption

    params = RepMLPBlock.random(0, 6, 3, 4, share_sets=3).params()
    with pytest.raises(NeedsOption, match=r"partition=\(h, w\).*h\*w = 12"):
        RepMLPBlock.from_params(params)
    with pytest.raises(ShapeError, match=r"partition \(2, 5\) has h\*w = 10"):
        RepMLPBlock.from_params(params, partition=(2, 5))


def test_dbb_needs_exactly_one_first_1x1():
    params = DiverseBranchBlock.random(0, 4, 4).params()
    params["seq.conv1.weight"] = params["seq.idconv1.weight"]
    with pytest.raises(ValueError, match="exactly one of 'seq.idconv1.weight' and 'seq.conv1.weight'"):
        DiverseBranchBlock.from_params(params)
