"""Train and deploy forms of the re-parameterizable block families, one module per family.

See :mod:`repnp.blocks.base` for the protocol every block follows and
:mod:`repnp.blocks.common` for the shared network pieces (activation,
containers, classifier head).
"""

from repnp.blocks.acnet import ACBlock
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.common import Activation, ClassifierHead, ConvAct, Sequential
from repnp.blocks.dbb import DiverseBranchBlock
from repnp.blocks.ecb import ECB, ECBSR, PlainSR, PReLU
from repnp.blocks.fastvit import ReparamLargeKernelConv, RepConditionalPosEnc, RepMixer
from repnp.blocks.mobilenetv2 import InvertedResidual
from repnp.blocks.mobileone import MobileOneBlock, MobileOneIdentity, MobileOneUnit
from repnp.blocks.nasnet import NASNetNormalCell
from repnp.blocks.orepa import OREPA
from repnp.blocks.qarepvgg import ConvBNAct, QARepVGGBlock
from repnp.blocks.repghost import RepGhostCheap
from repnp.blocks.repmlp import RepMLPBlock
from repnp.blocks.repvgg import RepVGGBlock
from repnp.blocks.repvit import RepVggDw, RepVitClassifier
from repnp.blocks.resrep import CompactorConv, ResRepNet
from repnp.blocks.se import SqueezeExcite
from repnp.blocks.separable import DepthwiseSeparableBlock, LinearBottleneckBlock, RegularConvBlock
from repnp.blocks.shufflenet import ShuffleNetUnit
from repnp.blocks.ultralytics import ConvTranspose2d, ConvTransposeBN, ParallelConvBN
from repnp.blocks.unireplknet import DilatedReparamBlock, UniRepLKNetBlock, UniRepLKNetBlockDeploy

__all__ = [
    # shared pieces
    "Activation", "BatchNorm", "ClassifierHead", "Conv2d", "ConvAct", "ConvBN", "Sequential", "SqueezeExcite",
    # RepVGG (Ding et al., CVPR 2021) and MobileOne (Vasu et al., CVPR 2023)
    "RepVGGBlock", "MobileOneBlock", "MobileOneIdentity", "MobileOneUnit",
    # Ding et al.'s other families: ACNet (ICCV 2019), DBB (CVPR 2021), ResRep (ICCV 2021),
    # RepMLP (arXiv 2105.01883; RepMLPNet, CVPR 2022)
    "ACBlock", "CompactorConv", "DiverseBranchBlock", "RepMLPBlock", "ResRepNet",
    # FastViT (Vasu et al., ICCV 2023) and RepViT (Wang et al., CVPR 2024), as timm writes them
    "RepConditionalPosEnc", "ReparamLargeKernelConv", "RepMixer", "RepVggDw", "RepVitClassifier",
    # RepGhost (Chen et al., arXiv 2211.06088), as timm writes it
    "RepGhostCheap",
    # ECB and the ECBSR network (Zhang et al., ACM MM 2021; deploy form PlainSR) and OREPA (Hu et al., CVPR 2022)
    "ECB", "ECBSR", "PlainSR", "PReLU", "OREPA",
    # blocks without re-parameterization beyond BN folding (MobileNetV1/V2, ShuffleNet, NASNet)
    "InvertedResidual", "DepthwiseSeparableBlock", "LinearBottleneckBlock", "NASNetNormalCell",
    "RegularConvBlock", "ShuffleNetUnit",
    # QARepVGG v1/v2 (Chu et al., AAAI 2024), as YOLOv6 writes it; its official deploy form (BN kept)
    "QARepVGGBlock", "ConvBNAct",
    # UniRepLKNet (Ding et al., CVPR 2024); RepLKNet's (CVPR 2022) block is ReparamLargeKernelConv
    "DilatedReparamBlock", "UniRepLKNetBlock", "UniRepLKNetBlockDeploy",
    # ultralytics' Conv2 (KxK + 1x1 before one BN) and ConvTranspose (+ BN), as BaseModel.fuse() folds them
    "ParallelConvBN", "ConvTransposeBN", "ConvTranspose2d",
]
