"""Naming schemes of the later re-parameterizable families, as data (see :mod:`repnp.io.npz.schemes`).

YOLOv6's QARepVGG blocks (``qarepvgg``, ``qarepvggv2``), yolov7's RepConv (``yolov7``), official
RepViT (``repvit``; its ``Classfier`` also joins the ``timm`` scheme), RepLKNet (``replknet``) and
UniRepLKNet (``unireplknet``). :func:`add_later_schemes` registers them in
:data:`repnp.io.npz.schemes.SCHEMES`; the official files and commits are cited next to each.
"""

from __future__ import annotations

import dataclasses

from repnp.blocks import ReparamLargeKernelConv, RepVGGBlock
from repnp.blocks.qarepvgg import QARepVGGBlock
from repnp.blocks.repvit import RepVitClassifier
from repnp.io.npz.schemes import (
    _TIMM_CONVNORM,
    _TIMM_REPVGGDW,
    BlockType,
    Branch,
    Module,
    Scheme,
    _conv_bn,
    _deploy_conv,
    _deploy_conv_act,
    _deploy_own,
)

__all__ = ["add_later_schemes"]


# --- large kernels: RepLKNet and UniRepLKNet ----------------------------------------------

def _large_kernel_schemes() -> dict:
    """The ``replknet`` and ``unireplknet`` schemes (built in a function: its names stay local)."""
    from repnp.blocks.unireplknet import DILATED_BRANCHES, DilatedReparamBlock, UniRepLKNetBlock

    # DingXiaoH/RepLKNet-pytorch replknet.py (commit b76808a) ReparamLargeKernelConv: lkb_origin and
    # small_conv are conv_bn Sequentials (.conv, .bn; nn.BatchNorm2d, eps 1e-5), small_conv centred
    # (padding small_kernel//2 next to kernel_size//2), the sum not activated; merge_kernel() ->
    # lkb_reparam with bias (get_equivalent_kernel_bias: small kernel padded by (K - k)//2 each side).
    replknet = BlockType(
        name="ReparamLargeKernelConv", block=ReparamLargeKernelConv, marker="lkb_origin.conv.weight",
        branches=(Branch("lkb_origin", _conv_bn("lkb_origin", "large_conv"), required=True),
                  Branch("small_conv", _conv_bn("small_conv", "small_conv"))),
        deploy=_deploy_conv_act("lkb_reparam"))

    # AILab-CVC/UniRepLKNet unireplknet.py (commit b5677d8) DilatedReparamBlock: lk_origin (depthwise
    # KxK, no bias) + origin_bn, and per (k, r) of its table dil_conv_k{k}_{r} (depthwise, dilation r,
    # padding (r(k-1)+1)//2, no bias) + dil_bn_k{k}_{r}; merge_dilated_branches() -> lk_origin with
    # bias, origin_bn and the branches deleted. Every (k, r) of the table is listed (names tell k, r).
    pairs = sorted({kr for table in DILATED_BRANCHES.values() for kr in table})

    def dilated(where: str) -> tuple:
        return tuple(Branch(f"{where}dil_conv_k{k}_{r}", (Module(f"{where}dil_conv_k{k}_{r}",
                                                                 f"{where}dilated_k{k}_r{r}.conv", "conv"),
                                                          Module(f"{where}dil_bn_k{k}_{r}",
                                                                 f"{where}dilated_k{k}_r{r}.bn", "bn")))
                     for k, r in pairs)

    def drb(where: str) -> tuple:
        return (Branch(f"{where}lk_origin", (Module(f"{where}lk_origin", f"{where}origin.conv", "conv"),
                                             Module(f"{where}origin_bn", f"{where}origin.bn", "bn")),
                       required=True),) + dilated(where)

    drb_type = BlockType(
        name="DilatedReparamBlock", block=DilatedReparamBlock, marker="origin_bn.running_var",
        branches=drb(""), deploy=_deploy_conv("lk_origin"), tells_groups=True)

    # UniRepLKNetBlock (same file): dwconv (a DilatedReparamBlock for K >= 7, a depthwise conv without
    # bias for K = 3, 5, nn.Identity for K = 0), norm (BN; Identity when K = 0), se (SEBlock: down, up
    # 1x1 convs with bias), pwconv1 = (NCHWtoNHWC, Linear) -> pwconv1.1, act = (GELU, GRNwithNHWC:
    # gamma, beta of shape (1, 1, 1, F)), pwconv2 = (Linear without bias, NHWCtoNCHW, BN) -> pwconv2.0,
    # pwconv2.2, gamma (layer scale, optional). reparameterize(): merge_dilated_branches, norm into
    # the dwconv (lk_origin, or a new dwconv with bias), GRN beta, BN and gamma into pwconv2.0 (with
    # bias); act.1.beta, norm, pwconv2.2, gamma deleted. Deploy keys in the deploy model's order.
    def block(name: str, marker: str, dwconv: tuple, dw_deploy: str | None, requires: tuple = (),
              excludes: tuple = ()) -> BlockType:
        tail = (Branch("se", (Module("se.down", "se.down", "conv"), Module("se.up", "se.up", "conv")), required=True),
                Branch("pwconv1", (Module("pwconv1.1", "pwconv1", "conv"),), required=True),
                Branch("act", (Module("act.1.gamma", "grn.gamma", "tensor"),
                               Module("act.1.beta", "grn.beta", "tensor")), required=True),
                Branch("pwconv2", (Module("pwconv2.0.weight", "pwconv2.weight", "tensor"),
                                   Module("pwconv2.2", "pwconv2_bn", "bn")), required=True),
                Branch("gamma", (Module("gamma", "gamma", "tensor"),)))
        deploy = () if dw_deploy is None else _deploy_conv(dw_deploy)
        deploy = tuple(("dwconv." + n, k, kind) for n, k, kind in deploy) + (
            ("se.down.weight", "se.down.weight", "conv"), ("se.down.bias", "se.down.bias", "conv"),
            ("se.up.weight", "se.up.weight", "conv"), ("se.up.bias", "se.up.bias", "conv"),
            ("pwconv1.weight", "pwconv1.1.weight", "conv"), ("pwconv1.bias", "pwconv1.1.bias", "conv"),
            ("grn.gamma", "act.1.gamma", "conv"),
            ("pwconv2.weight", "pwconv2.0.weight", "conv"), ("pwconv2.bias", "pwconv2.0.bias", "conv"))
        return BlockType(name=name, block=UniRepLKNetBlock, marker=marker, branches=dwconv + tail, deploy=deploy,
                         identity=True, requires=requires, excludes=excludes)

    norm = (Branch("norm", (Module("norm", "norm", "bn"),), required=True),)
    uni = (
        block("UniRepLKNetBlock", "dwconv.origin_bn.running_var", drb("dwconv.") + norm, "dwconv.lk_origin"),
        block("UniRepLKNetBlock (plain dwconv)", "pwconv2.2.running_var",
              (Branch("dwconv", (Module("dwconv.weight", "dwconv.weight", "tensor"),), required=True),) + norm,
              "dwconv", requires=("dwconv.weight", "norm.running_var")),
        block("UniRepLKNetBlock (no dwconv)", "pwconv2.2.running_var", (), None,
              excludes=("dwconv.weight", "norm.running_var", "dwconv.lk_origin.weight")),
    )
    return {
        "replknet": Scheme(
            name="replknet",
            description="official RepLKNet (ReparamLargeKernelConv: lkb_origin + small_conv -> lkb_reparam)",
            source="DingXiaoH/RepLKNet-pytorch replknet.py @b76808ac",
            eps=1e-5, blocks=(replknet,)),
        "unireplknet": Scheme(
            name="unireplknet",
            description="official UniRepLKNet (UniRepLKNetBlock.reparameterize: DilatedReparamBlock lk_origin + "
                        "origin_bn + dil_conv_k{k}_{r}/dil_bn_k{k}_{r} -> lk_origin with bias, norm folded into it, "
                        "GRN beta + pwconv2 BN + layer scale gamma -> pwconv2.0 with bias; a lone "
                        "DilatedReparamBlock -> lk_origin)",
            # nn.BatchNorm2d everywhere (get_bn; SyncBatchNorm with use_sync_bn), eps 1e-5.
            source="AILab-CVC/UniRepLKNet unireplknet.py @b5677d8f",
            eps=1e-5, blocks=uni + (drb_type,)),
    }


# --- QARepVGG (YOLOv6), yolov7 RepConv, official RepViT ---------------------------

def _qarepvgg(version: int) -> BlockType:
    """YOLOv6 ``QARepVGGBlock`` (v1) / ``QARepVGGBlockV2``: rbr_dense = ConvModule (.conv, .bn), rbr_1x1 a
    plain conv (no BN, no bias), rbr_identity = nn.Identity and (v2) rbr_avg = AvgPool2d, both without
    parameters (present when C_in == C_out and stride 1: the arrays cannot tell a stride-2 block with
    C_in == C_out), bn after the sum. switch_to_deploy() writes rbr_reparam (with bias) and KEEPS bn
    ("keep post bn for QAT"): the deploy dict is rbr_reparam.* + bn.*, the BN's num_batches_tracked
    dropped (BatchNorm2d loads without it)."""
    return BlockType(
        name="QARepVGGBlock" if version == 1 else "QARepVGGBlockV2", block=QARepVGGBlock,
        marker="rbr_dense.conv.weight", requires=("rbr_1x1.weight", "bn.running_var"),
        branches=(Branch("rbr_dense", _conv_bn("rbr_dense", "conv_kxk"), required=True),
                  Branch("rbr_1x1", (Module("rbr_1x1", "conv_1x1", "conv"),), required=True),
                  Branch("bn", (Module("bn", "bn", "bn"),), required=True)),
        deploy=(
            ("conv.weight", "rbr_reparam.weight", "conv"), ("conv.bias", "rbr_reparam.bias", "conv"),
            ("bn.gamma", "bn.weight", "tensor"), ("bn.beta", "bn.bias", "tensor"),
            ("bn.mean", "bn.running_mean", "tensor"), ("bn.var", "bn.running_var", "tensor")),
        config={"activation": "relu", "version": version, "keep_bn": True}, identity=None)


# WongKinYiu/yolov7 models/common.py (commit a207844) RepConv: rbr_dense = Sequential(Conv2d, BatchNorm2d)
# (keys rbr_dense.0.weight, rbr_dense.1.*), rbr_1x1 the same with a 1x1, rbr_identity a BatchNorm2d when
# c1 == c2 and s == 1; act SiLU (act=True). Model.fuse() (models/yolo.py) calls fuse_repvgg_block(),
# which writes rbr_reparam (weight, bias) -- but fills the identity of a grouped RepConv only at [i, i]
# of the squeezed (C, C/g) weight (channels >= C/g lose it) and cannot fuse a depthwise one (a 1-D
# fill_diagonal_); get_equivalent_kernel_bias() is right, and so is this (RepVGGBlock's algebra).
_YOLOV7_REPCONV = BlockType(
    name="RepConv", block=RepVGGBlock, marker="rbr_dense.0.weight",
    branches=(Branch("rbr_dense", (Module("rbr_dense.0", "conv_kxk.conv", "conv"),
                                   Module("rbr_dense.1", "conv_kxk.bn", "bn")), required=True),
              Branch("rbr_1x1", (Module("rbr_1x1.0", "conv_1x1.conv", "conv"),
                                 Module("rbr_1x1.1", "conv_1x1.bn", "bn")), required=True),
              Branch("rbr_identity", (Module("rbr_identity", "identity", "bn"),))),
    deploy=_deploy_conv_act("rbr_reparam"), config={"activation": "silu"}, identity="rbr_identity")

# THU-MIG/RepViT model/repvit.py (commit 298f420) Classfier: classifier (and classifier_dist with
# distillation) = BN_Linear (bn: BatchNorm1d, l: nn.Linear); fuse() -> one nn.Linear, the two heads
# averaged; utils.py replace_batchnorm puts it at the Classfier's path (model.classifier).
_REPVIT_CLASSFIER = BlockType(
    name="Classfier", block=RepVitClassifier, marker="classifier.l.weight",
    branches=(Branch("classifier", (Module("classifier.bn", "head.bn", "bn"),
                                    Module("classifier.l", "head.l", "conv")), required=True),
              Branch("classifier_dist", (Module("classifier_dist.bn", "head_dist.bn", "bn"),
                                         Module("classifier_dist.l", "head_dist.l", "conv")))),
    deploy=_deploy_own())

_LATER = (
    Scheme(
        name="qarepvgg",
        description="YOLOv6 QARepVGGBlock (rbr_dense + rbr_1x1 + identity, bn after the sum -> rbr_reparam, "
                    "bn kept as YOLOv6 keeps it); BN eps 1e-3",
        # meituan/YOLOv6 yolov6/layers/common.py (commit e86a483) QARepVGGBlock; training_mode='qarepvgg'
        # (get_block); yolov6/utils/torch_utils.py initialize_weights sets every BatchNorm2d's eps to 1e-3.
        source="meituan/YOLOv6 yolov6/layers/common.py, yolov6/utils/torch_utils.py @e86a483f",
        eps=1e-3, blocks=(_qarepvgg(1),), detect=False),
    Scheme(
        name="qarepvggv2",
        description="YOLOv6 QARepVGGBlockV2 (QARepVGG + an avg-pool branch; the same keys as v1: never "
                    "auto-detected); BN eps 1e-3",
        # meituan/YOLOv6 yolov6/layers/common.py (commit e86a483) QARepVGGBlockV2; training_mode='qarepvggv2'
        # (configs/qarepvgg/*.py).
        source="meituan/YOLOv6 yolov6/layers/common.py, yolov6/utils/torch_utils.py @e86a483f",
        eps=1e-3, blocks=(_qarepvgg(2),), detect=False),
    Scheme(
        name="yolov7",
        description="yolov7 RepConv (rbr_dense.0/.1 + rbr_1x1.0/.1 + rbr_identity -> rbr_reparam, SiLU); "
                    "exact for grouped and depthwise RepConv; BN eps 1e-3",
        # WongKinYiu/yolov7 models/common.py RepConv, models/yolo.py Model.fuse, utils/torch_utils.py
        # initialize_weights (BatchNorm2d eps 1e-3, momentum 0.03), commit a207844.
        source="WongKinYiu/yolov7 models/common.py, models/yolo.py, utils/torch_utils.py @a207844b",
        eps=1e-3, blocks=(_YOLOV7_REPCONV,)),
    Scheme(
        name="repvit",
        description="official RepViT (RepVGGDW, Conv2d_BN -> the module itself; Classfier: classifier + "
                    "classifier_dist averaged -> one Linear), as utils.replace_batchnorm writes them",
        # THU-MIG/RepViT model/repvit.py (commit 298f420): RepVGGDW (conv = Conv2d_BN (c, bn), conv1 a
        # depthwise 1x1 conv with bias, bn after the sum) and Conv2d_BN have timm's names (timm took them
        # from here); Classfier is the official head. utils.py replace_batchnorm: child.fuse() at the
        # child's path. Never auto-detected: its RepVGGDW / Conv2d_BN keys are timm's too.
        source="THU-MIG/RepViT model/repvit.py, utils.py @298f4207",
        eps=1e-5, blocks=(_TIMM_REPVGGDW, _REPVIT_CLASSFIER, _TIMM_CONVNORM), detect=False),
)

# Official RepViT models are timm models (model/repvit.py registers them with timm's register_model) and
# their RepVGGDW / Conv2d_BN keys are timm's: detection picks "timm" for them, which then also takes the
# official Classfier (its keys, classifier.bn / classifier.l, are no timm module's), so that an official
# RepViT state dict converts in full without --scheme.
def add_later_schemes(schemes: dict) -> None:
    """Add the schemes of this module to ``schemes`` (``SCHEMES``), and the official RepViT head to
    its ``timm`` scheme."""
    schemes.update({s.name: s for s in _LATER})
    schemes.update(_large_kernel_schemes())
    schemes["timm"] = dataclasses.replace(
        schemes["timm"], blocks=schemes["timm"].blocks + (_REPVIT_CLASSFIER,),
        description=schemes["timm"].description + "; official RepViT Classfier (-> one Linear)",
        source=schemes["timm"].source + ", THU-MIG/RepViT model/repvit.py @298f4207")
