"""Train and deploy forms of the re-parameterizable block families, one module per family.

See :mod:`repnp.blocks.base` for the protocol every block follows and
:mod:`repnp.blocks.common` for the shared network pieces (activation,
containers, classifier head).
"""

from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.common import Activation, ClassifierHead, ConvAct, Sequential
from repnp.blocks.mobilenetv2 import InvertedResidual
from repnp.blocks.mobileone import MobileOneBlock, MobileOneUnit
from repnp.blocks.repvgg import RepVGGBlock
from repnp.blocks.se import SqueezeExcite

# FastViT (Vasu et al., ICCV 2023): RepMixer, large-kernel conv, conditional positional encoding.
from repnp.blocks.fastvit import RepConditionalPosEnc, ReparamLargeKernelConv, RepMixer

# Seed 004's families: ACNet, DBB, ResRep, RepMLP.
from repnp.blocks.acnet import ACBlock
from repnp.blocks.dbb import DiverseBranchBlock
from repnp.blocks.repmlp import RepMLPBlock
from repnp.blocks.resrep import CompactorConv, ResRepNet

# Seed 002's efficient-block lineage: MobileNetV1/V2 steps, ShuffleNet, NASNet.
from repnp.blocks.nasnet import NASNetNormalCell
from repnp.blocks.separable import DepthwiseSeparableBlock, LinearBottleneckBlock, RegularConvBlock
from repnp.blocks.shufflenet import ShuffleNetUnit

__all__ = [
    "Activation", "BatchNorm", "ClassifierHead", "Conv2d", "ConvAct", "ConvBN", "InvertedResidual",
    "MobileOneBlock", "MobileOneUnit", "RepVGGBlock", "Sequential", "SqueezeExcite",
    "ACBlock", "CompactorConv", "DiverseBranchBlock", "RepMLPBlock", "ResRepNet",
    "RepConditionalPosEnc", "ReparamLargeKernelConv", "RepMixer",
    "DepthwiseSeparableBlock", "LinearBottleneckBlock", "NASNetNormalCell", "RegularConvBlock", "ShuffleNetUnit",
]
