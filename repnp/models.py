"""Whole networks built from the blocks: RepVGG-A0/A1/A2/B0, MobileOne-S0...S4, MobileNetV2 1.0.

Every network is a :class:`Network` (a named :class:`repnp.blocks.common.Sequential`
of stem, stages and classifier head) with the block protocol: ``forward(x)``,
``reparameterize()`` (a new network with every block in deploy form),
``trace(t, x)`` and ``params()``. Weights are random (seeded): conv weights
N(0, 1/fan_in), random BN statistics, the BN gamma and beta of summed branches
scaled by ``1 / sqrt(branches)`` so that activations keep their scale at any
depth (:func:`balance`); no pretrained weights are involved.

Configurations and where they come from:

* RepVGG (Ding et al., CVPR 2021, Sec. 3.4; DingXiaoH/RepVGG ``repvgg.py``,
  ``create_RepVGG_*``): a 3x3 stride-2 stem block with ``min(64, 64a)``
  channels, four stages of ``[2, 4, 14, 1]`` (A) or ``[4, 6, 16, 1]`` (B)
  blocks with ``64a, 128a, 256a, 512b`` channels, each stage starting with
  stride 2; global average pool and a linear layer. Width multipliers
  ``(a, b)``: A0 (0.75, 2.5), A1 (1, 2.5), A2 (1.5, 2.75), B0 (1, 2.5).
* MobileOne (Vasu et al., CVPR 2023; apple/ml-mobileone
  ``mobileone.py``, ``PARAMS`` and ``MobileOne``): a MobileOne block stem
  (3x3, stride 2, ``min(64, 64 w1)`` channels, one conv branch), four stages of
  ``[2, 8, 10, 1]`` units (depthwise 3x3 block then pointwise 1x1 block, the
  first unit of each stage with stride 2) with ``64 w1, 128 w2, 256 w3, 512 w4``
  channels. Width multipliers: S0 (0.75, 1, 1, 2) with k = 4 conv branches,
  S1 (1.5, 1.5, 2, 2.5), S2 (1.5, 2, 2.5, 4), S3 (2, 2.5, 3, 4), S4 (3, 3.5, 3.5, 4)
  with squeeze-excite in the last 5 units of stage 3 and the unit of stage 4;
  S1-S4 have k = 1.
* MobileNetV2 1.0 (Sandler et al., CVPR 2018, Table 2; torchvision's
  ``mobilenet_v2`` layout): 3x3 stride-2 conv-BN-ReLU6 stem with 32
  channels, inverted residuals ``(t, c, n, s)`` = (1, 16, 1, 1), (6, 24, 2, 2),
  (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1), a
  1x1 conv-BN-ReLU6 to 1280 channels, global average pool and a linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from repnp.blocks.base import BatchNorm, ConvBN
from repnp.blocks.common import RELU6, ClassifierHead, Sequential
from repnp.blocks.mobilenetv2 import InvertedResidual
from repnp.blocks.mobileone import MobileOneBlock, MobileOneUnit
from repnp.blocks.repvgg import RepVGGBlock
from repnp.dataflow import Dataflow, Described

__all__ = ["Network", "create", "MODELS", "repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0",
           "mobileone_s0", "mobileone_s1", "mobileone_s2", "mobileone_s3", "mobileone_s4",
           "mobilenet_v2"]


@dataclass(frozen=True, eq=False)
class Network(Described):
    """A named stack of layers (stem, stages, head) with the block protocol."""

    name: str
    layers: Sequential

    @property
    def num_classes(self) -> int:
        return int(self.layers[-1].weight.shape[0])

    def check_input(self, x):
        return self.layers.check_input(x)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """Logits, shape (N, num_classes), in the dtype of ``x``."""
        return self.layers.describe(d, x, prefix)

    def reparameterize(self) -> "Network":
        return Network(self.name, self.layers.reparameterize())


# ----------------------------------------------------------------------------
# scale-preserving random networks
# ----------------------------------------------------------------------------

def _scaled_bn(bn: BatchNorm, scale: float) -> BatchNorm:
    dtype = bn.gamma.dtype
    return BatchNorm(bn.mean, bn.var, (bn.gamma * scale).astype(dtype), (bn.beta * scale).astype(dtype),
                     eps=bn.eps)


def _scaled_convbn(layer: ConvBN, scale: float) -> ConvBN:
    return ConvBN(layer.conv, _scaled_bn(layer.bn, scale))


def balance(layer):
    """``layer`` with the BN gamma and beta of each summing block scaled by ``1 / sqrt(B)``.

    ``B`` is the block's number of summed branches. With N(0, 1/fan_in) convs
    and random BN statistics each branch keeps roughly the second moment of
    its input, and ``B`` branches add up: unscaled, a random network's
    activations grow by a constant factor per block (measured: logits ~1e11
    for MobileOne-S0, B = 6 and 5; ~1e4 inside MobileOne-S4, where float32
    rounding in the squeeze-excite gates then put the train and deploy forms
    7e-4 apart, each ~3e-4 away from float64). Scaling every branch by ``1 / sqrt(B)`` makes the sum
    keep the second moment of one branch (the ReLU only removes), so the
    activations stay O(1) through any depth, as they do in a trained network.
    gamma != 1 and beta != 0 stay random; running statistics are untouched.
    Layers without summed branches are returned unchanged.
    """
    if isinstance(layer, Sequential):
        return Sequential(tuple(balance(sub) for sub in layer.layers), layer.names)
    if isinstance(layer, MobileOneUnit):
        return MobileOneUnit(balance(layer.dw), balance(layer.pw))
    if isinstance(layer, RepVGGBlock):
        s = float(np.sqrt(1.0 / len(layer.branches)))
        return replace(layer, conv_kxk=_scaled_convbn(layer.conv_kxk, s),
                       conv_1x1=_scaled_convbn(layer.conv_1x1, s),
                       identity=None if layer.identity is None else _scaled_bn(layer.identity, s))
    if isinstance(layer, MobileOneBlock):
        s = float(np.sqrt(1.0 / len(layer.branches)))
        return replace(layer, conv_kxk=tuple(_scaled_convbn(b, s) for b in layer.conv_kxk),
                       conv_scale=None if layer.conv_scale is None else _scaled_convbn(layer.conv_scale, s),
                       skip=None if layer.skip is None else _scaled_bn(layer.skip, s))
    return layer


def _finish(name: str, layers: list, names: list) -> Network:
    return Network(name, balance(Sequential(tuple(layers), tuple(names))))


# ----------------------------------------------------------------------------
# RepVGG
# ----------------------------------------------------------------------------

#: name -> (blocks per stage, (a, b) width multipliers); DingXiaoH/RepVGG ``create_RepVGG_*``.
REPVGG_CONFIGS = {
    "repvgg_a0": ((2, 4, 14, 1), (0.75, 2.5)),
    "repvgg_a1": ((2, 4, 14, 1), (1.0, 2.5)),
    "repvgg_a2": ((2, 4, 14, 1), (1.5, 2.75)),
    "repvgg_b0": ((4, 6, 16, 1), (1.0, 2.5)),
}


def _staged(name: str, rng, stem, in_planes: int, depths, widths, make, *, num_classes: int,
            dtype) -> Network:
    """Stem, four stages of ``depths[s]`` blocks (the first with stride 2), GAP + linear head.

    The layout RepVGG and MobileOne share (``stage0`` ... ``stage4``, ``linear``);
    ``make(rng, c_in, c_out, stride, stage, index)`` draws one block.
    """
    layers, names = [stem], ["stage0"]
    for s, (depth, planes) in enumerate(zip(depths, widths), start=1):
        blocks = []
        for i in range(depth):
            blocks.append(make(rng, in_planes, planes, 2 if i == 0 else 1, s, i))
            in_planes = planes
        layers.append(Sequential(tuple(blocks)))
        names.append(f"stage{s}")
    layers.append(ClassifierHead.random(rng, in_planes, num_classes, dtype=dtype))
    names.append("linear")
    return _finish(name, layers, names)


def _repvgg(name: str, *, num_classes: int, seed, dtype) -> Network:
    depths, (a, b) = REPVGG_CONFIGS[name]
    rng = np.random.default_rng(seed)
    widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    in_planes = min(64, int(64 * a))
    stem = RepVGGBlock.random(rng, 3, in_planes, stride=2, dtype=dtype)

    def make(rng, c_in, c_out, stride, stage, index):
        return RepVGGBlock.random(rng, c_in, c_out, stride=stride, dtype=dtype)

    return _staged(name, rng, stem, in_planes, depths, widths, make, num_classes=num_classes, dtype=dtype)


def repvgg_a0(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """RepVGG-A0: 9,108,968 trainable parameters in train form, 8,309,384 deployed."""
    return _repvgg("repvgg_a0", num_classes=num_classes, seed=seed, dtype=dtype)


def repvgg_a1(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """RepVGG-A1 (a = 1, b = 2.5)."""
    return _repvgg("repvgg_a1", num_classes=num_classes, seed=seed, dtype=dtype)


def repvgg_a2(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """RepVGG-A2 (a = 1.5, b = 2.75)."""
    return _repvgg("repvgg_a2", num_classes=num_classes, seed=seed, dtype=dtype)


def repvgg_b0(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """RepVGG-B0 (depths 4, 6, 16, 1; a = 1, b = 2.5)."""
    return _repvgg("repvgg_b0", num_classes=num_classes, seed=seed, dtype=dtype)


# ----------------------------------------------------------------------------
# MobileOne
# ----------------------------------------------------------------------------

#: name -> (width multipliers, conv branches k, use SE); apple/ml-mobileone ``PARAMS``.
MOBILEONE_CONFIGS = {
    "mobileone_s0": ((0.75, 1.0, 1.0, 2.0), 4, False),
    "mobileone_s1": ((1.5, 1.5, 2.0, 2.5), 1, False),
    "mobileone_s2": ((1.5, 2.0, 2.5, 4.0), 1, False),
    "mobileone_s3": ((2.0, 2.5, 3.0, 4.0), 1, False),
    "mobileone_s4": ((3.0, 3.5, 3.5, 4.0), 1, True),
}
MOBILEONE_DEPTHS = (2, 8, 10, 1)


def _mobileone(name: str, *, num_classes: int, seed, dtype) -> Network:
    mult, k, use_se = MOBILEONE_CONFIGS[name]
    rng = np.random.default_rng(seed)
    widths = (int(64 * mult[0]), int(128 * mult[1]), int(256 * mult[2]), int(512 * mult[3]))
    # SE in the last half of stage 3 and all of stage 4 (``num_se_blocks`` in the official code).
    se_units = (0, 0, MOBILEONE_DEPTHS[2] // 2, MOBILEONE_DEPTHS[3]) if use_se else (0, 0, 0, 0)
    in_planes = min(64, int(64 * mult[0]))
    # The official stem does not pass num_conv_branches: it has one conv branch in every variant.
    stem = MobileOneBlock.random(rng, 3, in_planes, kernel_size=3, stride=2, num_branches=1, dtype=dtype)

    def make(rng, c_in, c_out, stride, stage, index):
        depth = MOBILEONE_DEPTHS[stage - 1]
        return MobileOneUnit.random(rng, c_in, c_out, stride=stride, num_branches=k,
                                    use_se=index >= depth - se_units[stage - 1], dtype=dtype)

    return _staged(name, rng, stem, in_planes, MOBILEONE_DEPTHS, widths, make, num_classes=num_classes,
                   dtype=dtype)


def mobileone_s0(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """MobileOne-S0 (k = 4): 5,293,272 trainable parameters in train form, 2,078,504 deployed."""
    return _mobileone("mobileone_s0", num_classes=num_classes, seed=seed, dtype=dtype)


def mobileone_s1(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """MobileOne-S1."""
    return _mobileone("mobileone_s1", num_classes=num_classes, seed=seed, dtype=dtype)


def mobileone_s2(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """MobileOne-S2."""
    return _mobileone("mobileone_s2", num_classes=num_classes, seed=seed, dtype=dtype)


def mobileone_s3(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """MobileOne-S3."""
    return _mobileone("mobileone_s3", num_classes=num_classes, seed=seed, dtype=dtype)


def mobileone_s4(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """MobileOne-S4 (squeeze-excite in its last six units)."""
    return _mobileone("mobileone_s4", num_classes=num_classes, seed=seed, dtype=dtype)


# ----------------------------------------------------------------------------
# MobileNetV2
# ----------------------------------------------------------------------------

#: (expand ratio t, output channels c, repeats n, first stride s); MobileNetV2 paper Table 2.
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu6(rng, c_in: int, c_out: int, kernel_size: int, *, stride: int, dtype) -> Sequential:
    conv = ConvBN.random(rng, c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, dtype=dtype)
    return Sequential((conv, RELU6))


def mobilenet_v2(seed=0, *, num_classes: int = 1000, dtype=np.float32) -> Network:
    """MobileNetV2 1.0 (width multiplier 1, 224x224): 3,504,872 trainable parameters."""
    rng = np.random.default_rng(seed)
    layers, names = [_conv_bn_relu6(rng, 3, 32, 3, stride=2, dtype=dtype)], ["stem"]
    in_planes = 32
    blocks = []
    for t, c, n, s in MOBILENETV2_SETTINGS:
        for i in range(n):
            blocks.append(InvertedResidual.random(rng, in_planes, c, stride=s if i == 0 else 1,
                                                  expand_ratio=t, dtype=dtype))
            in_planes = c
    layers.append(Sequential(tuple(blocks)))
    names.append("blocks")
    layers.append(_conv_bn_relu6(rng, in_planes, 1280, 1, stride=1, dtype=dtype))
    names.append("last_conv")
    layers.append(ClassifierHead.random(rng, 1280, num_classes, dtype=dtype))
    names.append("classifier")
    return _finish("mobilenet_v2", layers, names)


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------

MODELS = {
    "repvgg_a0": repvgg_a0, "repvgg_a1": repvgg_a1, "repvgg_a2": repvgg_a2, "repvgg_b0": repvgg_b0,
    "mobileone_s0": mobileone_s0, "mobileone_s1": mobileone_s1, "mobileone_s2": mobileone_s2,
    "mobileone_s3": mobileone_s3, "mobileone_s4": mobileone_s4, "mobilenet_v2": mobilenet_v2,
}


def create(name: str, *, num_classes: int = 1000, seed=0, dtype=np.float32) -> Network:
    """Build a network by name (``"repvgg_a0"``, ``"RepVGG-A0"``, ``"mobileone_s0"``, ...).

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`; case and ``-``/``_`` do not matter.
    num_classes : int, keyword-only
    seed : int or numpy.random.Generator, keyword-only
    dtype : keyword-only
        Parameter dtype (float32 by default, the dtype whole-network tests use).
    """
    key = str(name).lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[key](seed, num_classes=int(num_classes), dtype=dtype)
