"""Whole networks: published parameter counts, train == deploy on a small input, structure."""

import numpy as np
import pytest

from repnp import models
from repnp.blocks.base import ConvBN
from repnp.blocks.common import ConvAct
from repnp.blocks.mobileone import MobileOneUnit
from repnp.blocks.repvgg import RepVGGBlock
from repnp.cost import count_params
from repnp.testing import relative_error as _err  # max|a - b| / max|b|, b the reference
from repnp.trace import Trace

# -- parameter counts ---------------------------------------------------------------------------
# Trainable parameters: conv weights and biases, BN gamma and beta, FC; running statistics excluded.

#: Exact published counts (train, deploy). RepVGG-A0 and MobileOne-S0: issue 5 (the counts of the
#: official implementations, DingXiaoH/RepVGG and apple/ml-mobileone, with 1000 classes; they
#: round to the papers' 9.11M -> 8.31M and 2.1M). MobileNetV2: torchvision's
#: ``MobileNet_V2_Weights`` meta ``num_params = 3504872`` (train form; no deploy figure published).
EXACT = {
    "repvgg_a0": (9_108_968, 8_309_384),
    "mobileone_s0": (5_293_272, 2_078_504),
    "mobilenet_v2": (3_504_872, None),
}

#: Published in millions, two decimals, "train | deploy": open-mmlab/mmclassification,
#: configs/repvgg/README.md ("Params(M)" column; A2's deploy figure is printed as 25.5).
REPVGG_MILLIONS = {
    "repvgg_a0": (9.11, 8.31),
    "repvgg_a1": (14.09, 12.79),
    "repvgg_a2": (28.21, 25.50),
    "repvgg_b0": (15.82, 14.34),
}

#: MobileOne paper (Vasu et al., CVPR 2023), ImageNet results as listed on paperswithcode
#: ("Number of params"): deploy parameters in millions, one decimal.
MOBILEONE_DEPLOY_MILLIONS = {
    "mobileone_s0": 2.1, "mobileone_s1": 4.8, "mobileone_s2": 7.8, "mobileone_s3": 10.1,
    "mobileone_s4": 14.8,
}


@pytest.fixture(scope="module")
def built():
    """Every network once (float32, ``seed=0``) with its deploy form: ~3 s in all."""
    out = {}
    for name in models.MODELS:
        net = models.create(name)
        out[name] = (net, net.reparameterize())
    return out


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_published_parameter_counts(built, name):
    net, deploy = built[name]
    train_count, deploy_count = EXACT[name]
    assert count_params(net) == train_count
    if deploy_count is not None:
        assert count_params(deploy) == deploy_count


@pytest.mark.parametrize("name", sorted(REPVGG_MILLIONS))
def test_repvgg_counts_round_to_the_published_millions(built, name):
    net, deploy = built[name]
    train_m, deploy_m = REPVGG_MILLIONS[name]
    assert round(count_params(net) / 1e6, 2) == train_m
    assert round(count_params(deploy) / 1e6, 2) == deploy_m


@pytest.mark.parametrize("name", sorted(MOBILEONE_DEPLOY_MILLIONS))
def test_mobileone_deploy_counts_round_to_the_published_millions(built, name):
    _, deploy = built[name]
    assert round(count_params(deploy) / 1e6, 1) == MOBILEONE_DEPLOY_MILLIONS[name]


def test_mobilenet_v2_deploy_count_is_train_minus_one_per_bn_channel(built):
    """Folding a BN (gamma, beta: 2C) into a bias-free conv leaves a bias (C): one parameter saved
    per BN channel. MobileNetV2 1.0 has 17,056 BN channels."""
    net, deploy = built["mobilenet_v2"]
    bn_channels = sum(v.size for k, v in net.params().items() if k.endswith("bn.gamma"))
    assert bn_channels == 17_056
    assert count_params(deploy) == count_params(net) - bn_channels


def test_repvgg_a0_deploy_is_a_plain_stack_of_convs(built):
    net, deploy = built["repvgg_a0"]
    stages = deploy.layers.layers[:-1]
    convs = [stages[0]] + [b for s in stages[1:] for b in s.layers]
    assert len(convs) == 22 and all(isinstance(c, ConvAct) for c in convs)   # 1 + 2 + 4 + 14 + 1
    assert all(c.conv.weight.shape[2:] == (3, 3) for c in convs)
    widths = [c.conv.weight.shape[0] for c in convs]
    assert widths[0] == 48 and widths[-1] == 1280 and max(widths) == 1280


def test_mobileone_s0_and_s4_structure(built):
    s0, _ = built["mobileone_s0"]
    unit = s0.layers[1][0]
    assert unit.dw.num_branches == 4 and unit.pw.num_branches == 4     # k = 4 in S0
    assert s0.layers[0].num_branches == 1                              # the stem has one branch
    s4, _ = built["mobileone_s4"]
    se_flags = [[u.dw.se is not None for u in s4.layers[i].layers] for i in (1, 2, 3, 4)]
    assert se_flags[0] == [False] * 2 and se_flags[1] == [False] * 8
    assert se_flags[2] == [False] * 5 + [True] * 5 and se_flags[3] == [True]


# -- train == deploy on a small input -----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_network_train_equals_deploy_float32(built, name):
    net, deploy = built[name]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = net.forward(x)
    assert y.shape == (1, 1000) and y.dtype == np.float32
    assert _err(deploy.forward(x), y) <= 1e-4


def test_network_train_equals_deploy_float64():
    net = models.mobileone_s4(seed=1, num_classes=10, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    y = net.forward(x)
    assert y.dtype == np.float64
    # 40+ fused blocks in a row: each within ~1e-15, the network well within 1e-12
    assert _err(net.reparameterize().forward(x), y) <= 1e-12


def test_random_networks_keep_their_activations_o1():
    """models.balance scales the summed branches' BN by 1/sqrt(B): without it the logits of a
    random MobileOne-S0 reach ~1e11 (and float32 rounding in S4's SE gates alone exceeds the
    network tolerance)."""
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    for name in ("mobileone_s0", "mobileone_s4", "repvgg_b0"):
        net = models.create(name, dtype=np.float64)
        assert np.max(np.abs(net.forward(x))) < 100
        h = x
        for layer in net.layers.layers[:-1]:
            h = layer.forward(h)
            assert np.max(np.abs(h)) < 1000


def test_balance_scales_each_branch_bn_by_one_over_sqrt_branches():
    block = RepVGGBlock.random(0, 4, 4)                      # 3 branches: gamma, beta / sqrt(3)
    scaled = models.balance(block)
    for before, after in ((block.conv_kxk.bn, scaled.conv_kxk.bn), (block.identity, scaled.identity)):
        np.testing.assert_allclose(after.gamma, before.gamma / np.sqrt(3), rtol=1e-15)
        np.testing.assert_allclose(after.beta, before.beta / np.sqrt(3), rtol=1e-15)
        np.testing.assert_array_equal(after.mean, before.mean)
        np.testing.assert_array_equal(after.var, before.var)
    unit = MobileOneUnit.random(0, 8, 8, num_branches=4)    # dw: 4 + scale + skip, pw: 4 + skip
    scaled_unit = models.balance(unit)
    np.testing.assert_allclose(scaled_unit.dw.skip.gamma, unit.dw.skip.gamma / np.sqrt(6), rtol=1e-15)
    np.testing.assert_allclose(scaled_unit.pw.skip.gamma, unit.pw.skip.gamma / np.sqrt(5), rtol=1e-15)
    x = np.random.default_rng(2).standard_normal((1, 8, 5, 5))
    assert _err(scaled_unit.reparameterize().forward(x), scaled_unit.forward(x)) <= 1e-12


def test_batch_and_size_are_free(built):
    net, deploy = built["mobilenet_v2"]
    x = np.random.default_rng(1).standard_normal((2, 3, 40, 24)).astype(np.float32)
    y = net.forward(x)
    assert y.shape == (2, 1000)
    assert _err(deploy.forward(x), y) <= 1e-4


# -- create, seeds, trace -----------------------------------------------------------------------

def test_create_by_name_and_seed():
    a = models.create("RepVGG-A0", num_classes=10, seed=3)
    b = models.repvgg_a0(seed=3, num_classes=10)
    assert a.num_classes == 10 and a.name == "repvgg_a0"
    for key, value in a.params().items():
        np.testing.assert_array_equal(value, b.params()[key])
    c = models.create("repvgg_a0", num_classes=10, seed=4)
    assert not np.array_equal(c.params()["linear.weight"], a.params()["linear.weight"])
    assert a.params()["stage0.conv_kxk.conv.weight"].dtype == np.float32


def test_create_rejects_unknown_names_and_bad_class_counts():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        models.create("resnet50")
    with pytest.raises(ValueError, match="num_classes"):
        models.create("repvgg_a0", num_classes=0)


def test_trace_shapes_and_op_counts(built):
    net, deploy = built["repvgg_a0"]
    for form, convs in ((net, 44), (deploy, 22)):
        t = Trace()
        out = form.trace(t, t.input((1, 3, 224, 224)))
        assert out.shape == (1, 1000)
        types = [op.op_type for op in t.ops]
        assert types.count("Conv") == convs
        assert types[-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]
    assert isinstance(net.layers[0].conv_kxk, ConvBN)
