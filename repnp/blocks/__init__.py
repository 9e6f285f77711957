"""Train and deploy forms of the re-parameterizable block families, one module per family.

See :mod:`repnp.blocks.base` for the protocol every block follows and
:mod:`repnp.blocks.common` for the shared network pieces (activation,
containers, classifier head).
"""

# Ding et al.'s other families: ACNet (ICCV 2019), DBB (CVPR 2021), ResRep (ICCV 2021),
# RepMLP (arXiv 2105.01883; RepMLPNet, CVPR 2022).
from repnp.blocks.acnet import ACBlock
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.common import Activation, ClassifierHead, ConvAct, Sequential
from repnp.blocks.dbb import DiverseBranchBlock

# FastViT (Vasu et al., ICCV 2023): RepMixer, large-kernel conv, conditional positional encoding.
from repnp.blocks.fastvit import ReparamLargeKernelConv, RepConditionalPosEnc, RepMixer
from repnp.blocks.mobilenetv2 import InvertedResidual
from repnp.blocks.mobileone import MobileOneBlock, MobileOneUnit

# Efficient blocks without re-parameterization beyond BN folding (Sandler et al., MobileNetV2,
# CVPR 2018, and the blocks it compares with): MobileNetV1/V2 steps, ShuffleNet, NASNet.
from repnp.blocks.nasnet import NASNetNormalCell
from repnp.blocks.repmlp import RepMLPBlock
from repnp.blocks.repvgg import RepVGGBlock
from repnp.blocks.resrep import CompactorConv, ResRepNet
from repnp.blocks.se import SqueezeExcite
from repnp.blocks.separable import DepthwiseSeparableBlock, LinearBottleneckBlock, RegularConvBlock
from repnp.blocks.shufflenet import ShuffleNetUnit

__all__ = [
    "Activation", "BatchNorm", "ClassifierHead", "Conv2d", "ConvAct", "ConvBN", "InvertedResidual",
    "MobileOneBlock", "MobileOneUnit", "RepVGGBlock", "Sequential", "SqueezeExcite",
    "ACBlock", "CompactorConv", "DiverseBranchBlock", "RepMLPBlock", "ResRepNet",
    "RepConditionalPosEnc", "ReparamLargeKernelConv", "RepMixer",
    "DepthwiseSeparableBlock", "LinearBottleneckBlock", "NASNetNormalCell", "RegularConvBlock", "ShuffleNetUnit",
]
