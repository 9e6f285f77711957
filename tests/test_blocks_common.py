"""One activation type across block families (repnp.blocks.common.Activation).

Every block with a configurable activation stores an ``Activation`` (a name
given to its constructor or ``random`` is converted); the families whose papers
fix the activation use the ``RELU``, ``RELU6``, ``SIGMOID`` constants. Either
way ``forward`` and ``trace`` go through the one object, so a block records its
activation exactly as ``Activation.trace`` does (ONNX operator names).
"""

import dataclasses
from collections import Counter

import numpy as np
import pytest

from repnp import ops
from repnp.blocks.base import Conv2d, random_conv_weight
from repnp.blocks.common import RELU, RELU6, SIGMOID, Activation, ConvAct, as_activation
from repnp.blocks.mobilenetv2 import InvertedResidual
from repnp.blocks.mobileone import MobileOneBlock, MobileOneUnit
from repnp.blocks.nasnet import NASNetNormalCell
from repnp.blocks.repvgg import RepVGGBlock
from repnp.blocks.resrep import PRUNABLE_ACTIVATIONS, ResRepNet
from repnp.blocks.se import SqueezeExcite
from repnp.blocks.separable import DepthwiseSeparableBlock, LinearBottleneckBlock, RegularConvBlock
from repnp.blocks.shufflenet import ShuffleNetUnit
from repnp.testing import random_input
from repnp.trace import Trace

#: Hand-typed: the ONNX operators a runtime launches for each activation (ReLU6 is Clip(0, 6);
#: SiLU is x * sigmoid(x), no SiLU operator before opset 24).
EXPECTED_OPS = {
    "identity": [],
    "relu": ["Relu"],
    "relu6": ["Clip"],
    "sigmoid": ["Sigmoid"],
    "gelu": ["Gelu"],
    "hardswish": ["HardSwish"],
    "silu": ["Sigmoid", "Mul"],
}

#: The op types that are activations (one input, same shape out).
ACTIVATION_OP_TYPES = {"Relu", "Clip", "Sigmoid", "Gelu", "HardSwish"}


def _conv_act(seed, activation):
    rng = np.random.default_rng(seed)
    conv = Conv2d(random_conv_weight(rng, 5, 4, 3), rng.standard_normal(5), padding=1)
    return ConvAct(conv, activation)


#: family -> (factory(seed, activation), input shape, activations applied per forward, whether the one
#: activation is the last thing forward does)
CONFIGURABLE = {
    "repvgg": (lambda s, a: RepVGGBlock.random(s, 4, 4, activation=a), (2, 4, 6, 7), 1, True),
    "mobileone": (lambda s, a: MobileOneBlock.random(s, 4, 4, num_branches=2, activation=a), (2, 4, 6, 7), 1,
                  True),
    "mobileone_unit": (lambda s, a: MobileOneUnit.random(s, 4, 6, stride=2, activation=a), (2, 4, 7, 6), 2,
                       False),
    "regular": (lambda s, a: RegularConvBlock.random(s, 3, 5, activation=a), (2, 3, 6, 5), 1, True),
    "depthwise_separable": (lambda s, a: DepthwiseSeparableBlock.random(s, 4, 6, activation=a), (2, 4, 6, 5),
                            2, False),
    "linear_bottleneck": (lambda s, a: LinearBottleneckBlock.random(s, 8, 8, bottleneck_channels=4,
                                                                    activation=a), (2, 8, 5, 6), 1, False),
    "resrep": (lambda s, a: ResRepNet.random(s, 3, 6, 4, activation=a), (2, 3, 6, 5), 1, False),
    "conv_act": (_conv_act, (2, 4, 5, 6), 1, True),
}


def _allowed(family):
    return sorted(PRUNABLE_ACTIVATIONS) if family == "resrep" else sorted(EXPECTED_OPS)


CASES = [(family, name) for family in sorted(CONFIGURABLE) for name in _allowed(family)]


def _ops(module, shape):
    t = Trace()
    module.trace(t, t.input(shape))
    return t.ops


def _activations_of(module):
    """Every Activation a block holds (a MobileOne unit holds one per block; its deploy form too)."""
    if hasattr(module, "activation"):
        return [module.activation]
    if hasattr(module, "dw"):
        return [module.dw.activation, module.pw.activation]
    return [a for layer in module.layers for a in _activations_of(layer)]


# ----------------------------------------------------------------------------
# Activation itself: hand-typed op lists, value semantics, conversion
# ----------------------------------------------------------------------------

def test_every_activation_has_its_operators():
    assert set(EXPECTED_OPS) == set(ops.ACTIVATIONS)
    for name, expected in EXPECTED_OPS.items():
        act = Activation(name)
        assert list(act.op_types) == expected
        t = Trace()
        x = t.input((1, 3, 4, 5))
        y = act.trace(t, x)
        assert [op.op_type for op in t.ops] == expected
        assert y.shape == x.shape and all(op.output_shape == x.shape for op in t.ops)
        assert y == x if not expected else y.name == t.ops[-1].output


def test_silu_trace_keeps_x_alive_until_the_mul():
    t = Trace()
    x = t.input((1, 2, 3, 3))
    Activation("silu").trace(t, x)
    sig, mul = t.ops
    assert sig.inputs == (x.name,) and set(mul.inputs) == {sig.output, x.name}


def test_activation_compares_by_name():
    assert Activation("relu") == RELU and hash(Activation("relu")) == hash(RELU)
    assert Activation("relu") != RELU6 and RELU != "relu"
    assert {Activation("sigmoid"), SIGMOID} == {SIGMOID}


def test_as_activation_converts_names_and_keeps_objects():
    act = Activation("gelu")
    assert as_activation(act) is act
    assert as_activation("hardswish") == Activation("hardswish")
    assert isinstance(as_activation("relu6"), Activation)


@pytest.mark.parametrize("bad", [None, 3, ops.relu, ["relu"]])
def test_as_activation_rejects_other_types(bad):
    with pytest.raises(TypeError, match="activation must be an Activation or one of"):
        as_activation(bad)
    with pytest.raises(TypeError, match="act_layer"):
        as_activation(bad, name="act_layer")


def test_unknown_activation_names_the_known_ones():
    with pytest.raises(ValueError, match=r"activation must be one of .*'relu6'.*got 'tanh'"):
        as_activation("tanh")
    with pytest.raises(TypeError, match="Activation name must be a str"):
        Activation(6)


# ----------------------------------------------------------------------------
# every family: one representation, one way to compute and record it
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("family, name", CASES)
def test_family_stores_an_activation_and_traces_it_as_activation_does(family, name):
    make, shape, count, last = CONFIGURABLE[family]
    block, plain = make(3, name), make(3, "identity")
    deploy = block.reparameterize()
    # one representation, kept by re-parameterization
    for form in (block, deploy):
        held = _activations_of(form)
        assert held and all(isinstance(a, Activation) and a == Activation(name) for a in held)
    # the trace differs from the identity block's by exactly the activation's operators
    for form, plain_form in ((block, plain), (deploy, plain.reparameterize())):
        with_act, without = _ops(form, shape), _ops(plain_form, shape)
        added = Counter(op.op_type for op in with_act) - Counter(op.op_type for op in without)
        removed = Counter(op.op_type for op in without) - Counter(op.op_type for op in with_act)
        assert added == Counter(EXPECTED_OPS[name] * count) and not removed
        assert len(with_act) == len(without) + count * len(EXPECTED_OPS[name])
    # forward applies the same activation (same seed: same weights)
    x = random_input(shape, seed=5)
    if last:
        np.testing.assert_array_equal(block.forward(x), ops.ACTIVATIONS[name](plain.forward(x)))
    if name != "identity":
        assert not np.array_equal(block.forward(x), plain.forward(x))


@pytest.mark.parametrize("family", sorted(CONFIGURABLE))
def test_a_name_and_an_activation_build_the_same_block(family):
    make, shape, _, _ = CONFIGURABLE[family]
    x = random_input(shape, seed=1)
    by_name, by_object = make(7, "relu6"), make(7, RELU6)
    np.testing.assert_array_equal(by_name.forward(x), by_object.forward(x))
    assert _activations_of(by_name) == _activations_of(by_object)


def test_constructors_and_replace_convert_names():
    block = RegularConvBlock.random(0, 3, 4)
    assert block.activation == RELU
    again = RegularConvBlock(block.conv, "silu")
    assert again.activation == Activation("silu")
    swapped = dataclasses.replace(block, activation="relu6")
    assert isinstance(swapped.activation, Activation) and swapped.activation == RELU6
    rep = RepVGGBlock.random(0, 4, 4)
    assert RepVGGBlock(rep.conv_kxk, rep.conv_1x1, rep.identity, "hardswish").activation.name == "hardswish"
    assert LinearBottleneckBlock.random(0, 8, 8).activation == RELU6       # MobileNetV2's default


@pytest.mark.parametrize("make", [
    lambda a: RepVGGBlock.random(0, 4, 4, activation=a),
    lambda a: MobileOneBlock.random(0, 4, 4, activation=a),
    lambda a: DepthwiseSeparableBlock.random(0, 4, 4, activation=a),
    lambda a: ResRepNet.random(0, 3, 6, 4, activation=a),
    lambda a: ConvAct(Conv2d(np.ones((2, 2, 1, 1))), a),
])
def test_bad_activations_are_refused_with_the_argument_named(make):
    with pytest.raises(TypeError, match="activation must be"):
        make(None)
    with pytest.raises(ValueError, match="activation must be one of"):
        make("tanh")


def test_resrep_refuses_activations_that_do_not_keep_zero():
    # sigmoid(0) = 1/2: a removed channel would not stay 0 through it (as a name or an object)
    for act in ("sigmoid", Activation("silu"), Activation("gelu")):
        with pytest.raises(ValueError, match="removed channel must stay 0"):
            ResRepNet.random(0, 3, 6, 4, activation=act)
    net = ResRepNet.random(0, 3, 6, 4)
    with pytest.raises(ValueError, match="removed channel must stay 0"):
        dataclasses.replace(net, activation="hardswish")
    assert dataclasses.replace(net, activation="relu6").reparameterize().activation == RELU6


# ----------------------------------------------------------------------------
# families whose papers fix the activation, and every op record's shape
# ----------------------------------------------------------------------------

FIXED = {
    # name: (block, input shape, the activation ops in trace order)
    "shufflenet_s1": (ShuffleNetUnit.random(0, 12, 12, groups=3), (1, 12, 5, 5), ["Relu"] * 2),
    "shufflenet_s2": (ShuffleNetUnit.random(1, 12, 24, groups=3, stride=2), (1, 12, 6, 6), ["Relu"] * 2),
    "inverted_residual": (InvertedResidual.random(2, 4, 4), (1, 4, 5, 5), ["Clip"] * 2),
    "inverted_residual_t1": (InvertedResidual.random(3, 4, 6, expand_ratio=1), (1, 4, 5, 5), ["Clip"]),
    "se": (SqueezeExcite.random(4, 16), (1, 16, 3, 3), ["Relu", "Sigmoid"]),
    # 1 + 1 projections, then 5 stacked separables of 2 layers, each starting with a ReLU
    "nasnet": (NASNetNormalCell.random(5, 6, 4, 4), None, ["Relu"] * 12),
    "mobileone_se_silu": (MobileOneBlock.random(6, 16, 16, groups=16, use_se=True, activation="silu"),
                          (1, 16, 4, 4), ["Relu", "Sigmoid", "Sigmoid"]),
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_activations_are_recorded_as_activation_records_them(name):
    block, shape, expected = FIXED[name]
    for form in (block, block.reparameterize()):
        t = Trace()
        if name == "nasnet":
            form.trace(t, t.input((1, 6, 5, 5), name="x_prev"), t.input((1, 4, 5, 5)))
        else:
            form.trace(t, t.input(shape))
        acts = [op for op in t.ops if op.op_type in ACTIVATION_OP_TYPES]
        assert [op.op_type for op in acts] == expected
        # recorded exactly as Activation.trace records one: one input, same shape out
        assert all(len(op.inputs) == 1 and op.input_shapes == (op.output_shape,) for op in acts)
        assert all(op.weight_bytes == 0 and op.macs == 0 for op in acts)


@pytest.mark.parametrize("family, name", [(f, "relu6") for f in sorted(CONFIGURABLE)] +
                         [(f, "gelu") for f in sorted(CONFIGURABLE) if f != "resrep"])
def test_configurable_activation_records_are_uniform(family, name):
    make, shape, count, _ = CONFIGURABLE[family]
    for form in (make(0, name), make(0, name).reparameterize()):
        acts = [op for op in _ops(form, shape) if op.op_type in ACTIVATION_OP_TYPES]
        assert [op.op_type for op in acts] == EXPECTED_OPS[name] * count
        assert all(len(op.inputs) == 1 and op.input_shapes == (op.output_shape,) and op.macs == 0
                   for op in acts)
