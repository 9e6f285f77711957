"""Naming schemes of re-parameterizable blocks in framework state dicts, as data.

A *scheme* is the way one framework names the parameters of its
re-parameterizable blocks in a ``state_dict()`` and the names it gives the
fused conv after its own reparameterization. For every block type it lists

* the repnp block class that computes it (:mod:`repnp.blocks`);
* its modules: the framework's module name, the block's parameter name
  (``params()`` prefix) and the kind (conv, BN, 1x1 conv read as a matrix,
  single tensor), grouped into branches (a branch is there when any of its
  keys is; a required branch missing means "not this block type");
* the deploy names: each parameter of the block's deploy form
  (``reparameterize().params()``) and the framework key it is written under;
* the configuration facts the arrays do not tell (the class's default
  activation, the ``from_params`` keywords the converter passes).

Nothing here is code: :mod:`repnp.io.npz.convert` finds, renames, builds and
fuses blocks from these descriptions. BN keys are renamed leaf by leaf
(:data:`BN_LEAVES`: ``running_mean -> mean``, ``running_var -> var``,
``weight -> gamma``, ``bias -> beta``; ``num_batches_tracked`` is consumed and
dropped, as the frameworks' own reparameterization drops it). An
``affine=False`` BN (ACNet's ``use_affine=False``) has no ``weight`` /
``bias``: gamma 1, beta 0.

Every name below was checked against the project's own source; the file and
the commit read are cited next to each scheme. Facts a state dict cannot tell
(BN epsilon, and which of two schemes with identical key names it is) are
per-scheme defaults, overridable by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from repnp.blocks import (
    ACBlock,
    ConvBN,
    ConvTransposeBN,
    DiverseBranchBlock,
    MobileOneBlock,
    MobileOneIdentity,
    ParallelConvBN,
    ReparamLargeKernelConv,
    RepConditionalPosEnc,
    RepGhostCheap,
    RepMixer,
    RepMLPBlock,
    RepVGGBlock,
)
from repnp.blocks.ecb import ECB
from repnp.blocks.orepa import OREPA
from repnp.blocks.repvit import RepVggDw, RepVitClassifier

__all__ = ["BN_LEAVES", "CONV_LEAVES", "Module", "Branch", "BlockType", "Scheme", "SCHEMES", "scheme_names"]

#: A BN module's leaves: framework name -> the block's BN parameter name (``None``: bookkeeping, dropped).
BN_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "mean", "running_var": "var",
             "num_batches_tracked": None}
#: A conv module's leaves (the same names on both sides).
CONV_LEAVES = {"weight": "weight", "bias": "bias"}

#: Module kinds: ``conv`` (OIHW ``weight``, optional ``bias``), ``bn`` (:data:`BN_LEAVES`), ``fc``
#: (a 1x1 conv ``weight`` (O, I, 1, 1) that the block holds as an (O, I) matrix, optional ``bias``),
#: ``tensor`` (one key, the same array).
KINDS = ("conv", "bn", "fc", "tensor")


@dataclass(frozen=True)
class Module:
    """One framework module of a block and the block's name for it.

    ``source`` is relative to the block prefix (``rbr_dense.conv``) and ``target``
    is the ``params()`` prefix without its dot (``conv_kxk.conv``); for ``kind ==
    "tensor"`` both are whole keys. ``{i}`` in both marks a ModuleList index.
    """

    source: str
    target: str
    kind: str


@dataclass(frozen=True)
class Branch:
    """Modules present or absent together; ``name`` (relative, may hold ``{i}``) is the
    framework's name of the branch, for reports."""

    name: str
    modules: tuple
    required: bool = False


@dataclass(frozen=True)
class BlockType:
    """How one framework block type is laid out in a state dict, and which repnp block it is.

    Attributes
    ----------
    name : str
        The framework's class name (reports).
    block : type
        The repnp class; built with ``block.from_params(params, **config, <options>)``.
    marker : str
        A key, relative to the block prefix, that every such block has: a key
        ``<prefix><marker>`` (prefix empty or ending in ``.``) places a candidate.
    branches : tuple of Branch
    deploy : tuple of (str, str, str)
        ``(deploy parameter, framework key, kind)`` for each array of
        ``block.reparameterize().params()``, in the order the framework's
        ``state_dict()`` lists them after its own reparameterization.
    config : dict
        ``from_params`` keywords that are facts of the framework class (its default
        activation ...). A model may configure another activation (timm's
        MobileOneBlock is ReLU in byobnet, GELU in FastViT): it does not change
        the fused weights.
    options : tuple of str
        The converter's options passed on to ``from_params``: ``"eps"`` (every
        block with a BN), ``"partition"`` (RepMLP).
    identity : str or bool
        The branch whose presence means an identity path (reports); ``True`` when
        the block always has one (a residual).
    tells_groups : bool
        Whether the arrays always tell ``groups`` (else only an identity branch does).
    requires : tuple of str
        Keys (relative) without which a marker does not place this block type.
    tentative : bool
        A marker alone is ambiguous (``pos_enc.weight``): arrays that do not fit the
        block leave the keys alone (reported under ``left``, unless a later block
        type takes them) instead of failing.
    excludes : tuple of str
        Keys (relative) whose presence means another module with the same names
        (ultralytics' ``Conv`` is not a ``Conv2``, whose ``cv2`` is added before the BN).
    """

    name: str
    block: type
    marker: str
    branches: tuple
    deploy: tuple
    config: dict = field(default_factory=dict)
    options: tuple = ("eps",)
    identity: str | bool | None = None
    tells_groups: bool = False
    requires: tuple = ()
    tentative: bool = False
    excludes: tuple = ()


@dataclass(frozen=True)
class Scheme:
    """A framework's naming scheme: its block types and its defaults.

    Attributes
    ----------
    name : str
        What ``scheme=`` takes.
    description, source : str
        What it is, and where the names were read (repository, file, commit).
    eps : float
        The BN epsilon the framework trains with, used unless ``eps=`` is given.
    blocks : tuple of BlockType
        Looked for in this order; a key claimed by an earlier block (an outer
        one, e.g. RepMixer around its MobileOne ``mixer``) is not reused.
    detect : bool
        Whether automatic detection may pick this scheme. ``False`` when its
        key names are those of another scheme (YOLOv6 = RepVGG names) or too
        generic to be told from non-re-parameterizable blocks (ultralytics'
        ``conv1`` / ``conv2``): pass ``scheme=`` for those.
    drop : callable or None
        ``drop(keys) -> list of keys`` that the framework's own reparameterization deletes
        without fusing them (ultralytics' unused detection branch,
        :func:`ultralytics_unused_head`); the converter leaves them out of its output.
    """

    name: str
    description: str
    source: str
    eps: float
    blocks: tuple
    detect: bool = True
    drop: object = None


def ultralytics_unused_head(keys, *, end2end: bool = False) -> list[str]:
    """The keys ultralytics' ``Detect.fuse()`` removes: the detection branch inference does not use.

    A detection head with a one-to-one branch (YOLOv10's ``v10Detect``, YOLO26's heads: module
    children ``one2one_cv2``, ``one2one_cv3`` beside ``cv2``, ``cv3``) trains both; ``fuse()``
    keeps the one inference uses and sets its twin to ``None``, so the twin's keys leave the
    fused model's ``state_dict()`` (``ultralytics/nn/modules/head.py`` ``Detect.fuse``,
    ultralytics 8.4.190: ``setattr(self, name[8:] if end2end else name, None)`` for every child
    ``name`` starting with ``one2one_``). Which one is kept is not in the state dict: in
    ultralytics 8.4 ``end2end`` is chosen at run time (``model.end2end = True``, or ``nms=False``
    when exporting or predicting; default ``False``, the one-to-many head with NMS). Scheme
    ``ultralytics`` follows the default, ``ultralytics-end2end`` the NMS-free choice.

    Parameters
    ----------
    keys : iterable of str
    end2end : bool, keyword-only
        ``True``: drop the one-to-many children (``cv2``, ``cv3`` ... of a head that has
        ``one2one_cv2`` ...); ``False``: drop the ``one2one_*`` children.

    Returns
    -------
    list of str
        The keys to drop, in input order (empty when no key has a ``one2one_`` module).
    """
    keys = list(keys)
    dropped = set()
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.startswith("one2one_") and len(part) > len("one2one_"):
                twin = part[len("one2one_"):] if end2end else part
                dropped.add(".".join(parts[:i] + [twin]) + ".")
    return [k for k in keys if any(k.startswith(t) for t in dropped)] if dropped else []


def _conv_bn(source: str, target: str, *, conv: str = "conv", bn: str = "bn") -> tuple:
    return (Module(f"{source}.{conv}", f"{target}.conv", "conv"), Module(f"{source}.{bn}", f"{target}.bn", "bn"))


def _deploy_conv_act(module: str) -> tuple:
    """A ConvAct deploy form (``conv.weight`` / ``conv.bias``) written as ``<module>.weight`` / ``.bias``."""
    return (("conv.weight", f"{module}.weight", "conv"), ("conv.bias", f"{module}.bias", "conv"))


def _deploy_conv(module: str) -> tuple:
    """A Conv2d deploy form (``weight`` / ``bias``) written as ``<module>.weight`` / ``.bias``."""
    return (("weight", f"{module}.weight", "conv"), ("bias", f"{module}.bias", "conv"))


def _repvgg_like(name: str, kxk: str, one: str, identity: str, deploy: str, *, bn: str = "bn",
                 activation: str = "relu") -> BlockType:
    return BlockType(
        name=name, block=RepVGGBlock, marker=f"{kxk}.conv.weight",
        branches=(Branch(kxk, _conv_bn(kxk, "conv_kxk", bn=bn), required=True),
                  Branch(one, _conv_bn(one, "conv_1x1", bn=bn), required=True),
                  Branch(identity, (Module(identity, "identity", "bn"),))),
        deploy=_deploy_conv_act(deploy), config={"activation": activation}, identity=identity)


def _mobileone_like(name: str, convs: str, scale: str, identity: str, deploy: str, *, bn: str = "bn",
                    activation: str = "relu") -> BlockType:
    return BlockType(
        name=name, block=MobileOneBlock, marker=f"{convs}.0.conv.weight",
        branches=(Branch(f"{convs}.{{i}}", _conv_bn(f"{convs}.{{i}}", "conv_kxk.{i}", bn=bn), required=True),
                  Branch(scale, _conv_bn(scale, "conv_scale", bn=bn)),
                  Branch(identity, (Module(identity, "skip", "bn"),))),
        deploy=_deploy_conv_act(deploy), config={"activation": activation}, identity=identity)


_REPVGG_BLOCK = _repvgg_like("RepVGGBlock", "rbr_dense", "rbr_1x1", "rbr_identity", "rbr_reparam")

# timm fastvit.py RepMixer: norm and mixer are MobileOneBlocks (norm: its identity BN only), the
# layer scale a (dim, 1, 1) gamma; reparameterize() writes reparam_conv.
_TIMM_REPMIXER = BlockType(
    name="RepMixer", block=RepMixer, marker="mixer.identity.running_var",
    branches=(Branch("mixer.conv_kxk.{i}", _conv_bn("mixer.conv_kxk.{i}", "mixer.conv_kxk.{i}")),
              Branch("mixer.conv_scale", _conv_bn("mixer.conv_scale", "mixer.conv_scale")),
              Branch("mixer.identity", (Module("mixer.identity", "mixer.skip", "bn"),), required=True),
              Branch("norm.identity", (Module("norm.identity", "norm", "bn"),), required=True),
              Branch("layer_scale", (Module("layer_scale.gamma", "layer_scale.gamma", "tensor"),))),
    deploy=_deploy_conv("reparam_conv"), identity=True, tells_groups=True)

# timm fastvit.py ReparamLargeKernelConv: large_conv / small_conv are ConvNormAct (.conv, .bn).
_TIMM_LARGE_KERNEL = BlockType(
    name="ReparamLargeKernelConv", block=ReparamLargeKernelConv, marker="large_conv.conv.weight",
    branches=(Branch("large_conv", _conv_bn("large_conv", "large_conv"), required=True),
              Branch("small_conv", _conv_bn("small_conv", "small_conv"))),
    deploy=_deploy_conv_act("reparam_conv"),
    config={"activation": "gelu"})          # FastViT's PatchEmbed passes act_layer=GELU

# timm fastvit.py RepConditionalPosEnc: x + pos_enc(x), pos_enc a depthwise conv with bias. The
# marker is a common name: without a bias, or not depthwise, it is some other module (left alone).
_TIMM_POS_ENC = BlockType(
    name="RepConditionalPosEnc", block=RepConditionalPosEnc, marker="pos_enc.weight",
    branches=(Branch("pos_enc", (Module("pos_enc", "pos_enc", "conv"),), required=True),),
    deploy=_deploy_conv("reparam_conv"), options=(), identity=True, tells_groups=True,
    requires=("pos_enc.bias",), tentative=True)

def _deploy_own() -> tuple:
    """A deploy form that replaces the block's own module (timm ``reparameterize_model``:
    ``setattr(parent, name, child.fuse())``): ``weight`` / ``bias`` at the block's path."""
    return (("weight", "weight", "conv"), ("bias", "bias", "conv"))


# timm repvit.py (commit 1bcbc1c) RepVggDw: conv = ConvNorm (c, bn; depthwise KxK), conv1 = a
# depthwise 1x1 nn.Conv2d with bias, bn after the sum (legacy=True: conv1 a ConvNorm, no bn);
# fuse() returns one nn.Conv2d that reparameterize_model (timm/utils/model.py) puts at the
# block's path. The marker conv.c.weight is not RepViT's alone: arrays that do not fit are left.
_TIMM_REPVGGDW = BlockType(
    name="RepVggDw", block=RepVggDw, marker="conv.c.weight",
    branches=(Branch("conv", (Module("conv.c", "conv.conv", "conv"), Module("conv.bn", "conv.bn", "bn")),
                     required=True),
              Branch("conv1", (Module("conv1", "conv1", "conv"),)),
              Branch("conv1", (Module("conv1.c", "conv1.conv", "conv"), Module("conv1.bn", "conv1.bn", "bn"))),
              Branch("bn", (Module("bn", "bn", "bn"),))),
    deploy=_deploy_own(), identity=True, tells_groups=True, tentative=True)

# timm repvit.py RepVitClassifier: head (and head_dist with distillation) = NormLinear (bn: a
# BatchNorm1d, l: nn.Linear); fuse() -> one nn.Linear at the classifier's path, the two heads averaged.
_TIMM_REPVIT_HEAD = BlockType(
    name="RepVitClassifier", block=RepVitClassifier, marker="head.l.weight",
    branches=(Branch("head", (Module("head.bn", "head.bn", "bn"), Module("head.l", "head.l", "conv")), required=True),
              Branch("head_dist", (Module("head_dist.bn", "head_dist.bn", "bn"),
                                   Module("head_dist.l", "head_dist.l", "conv")))),
    deploy=_deploy_own())

# timm repvit.py ConvNorm (and efficientvit_msra.py's, same names): c (conv, no bias) + bn; fuse() ->
# one nn.Conv2d with bias at the module's path (stem convs, spatial / channel downsample, the MLP).
_TIMM_CONVNORM = BlockType(
    name="ConvNorm", block=ConvBN, marker="c.weight",
    branches=(Branch("c", (Module("c", "conv", "conv"),), required=True),
              Branch("bn", (Module("bn", "bn", "bn"),), required=True)),
    deploy=_deploy_own())

# timm fastvit.py (commit aa4b585) MobileOneBlock with num_conv_branches=0 and use_scale_branch=False
# (RepMixer's norm: group_size=1, kernel_size = repmixer_kernel_size, 3 in every FastViT): only
# `identity`, a BN; reparameterize() writes reparam_conv = the BN on the depthwise KxK identity
# kernel. A BN does not tell K: 3, FastViT's. Looked for after the blocks that own an `identity`
# of their own (RepMixer's norm, RepVggBlock, MobileOneBlock), so it only takes a lone one.
_TIMM_MOBILEONE_IDENTITY = BlockType(
    name="MobileOneBlock (identity only)", block=MobileOneIdentity, marker="identity.running_var",
    branches=(Branch("identity", (Module("identity", "skip", "bn"),), required=True),),
    deploy=_deploy_conv("reparam_conv"), config={"kernel_size": 3}, identity="identity", tells_groups=True,
    excludes=("conv_kxk.0.conv.weight", "conv_1x1.conv.weight", "conv_scale.conv.weight"))

# timm repghost.py (commit 03fa149) RepGhostModule: primary_conv = Sequential(conv, bn, act),
# cheap_operation = Sequential(depthwise KxK conv, bn), fusion_conv = (nn.Identity,), fusion_bn =
# (BatchNorm2d,) on x1; switch_to_deploy() (called by repghost_model_convert and timm's
# reparameterize_model) writes cheap_operation as one nn.Conv2d with bias (keys
# cheap_operation.weight / .bias) and deletes fusion_conv / fusion_bn; primary_conv (and the
# bottleneck's conv_dw / bn_dw, se, shortcut) pass through. reparam=False (no fusion_bn): left alone.
_TIMM_REPGHOST = BlockType(
    name="RepGhostModule", block=RepGhostCheap, marker="fusion_bn.0.running_var",
    branches=(Branch("cheap_operation", (Module("cheap_operation.0", "cheap.conv", "conv"),
                                         Module("cheap_operation.1", "cheap.bn", "bn")), required=True),
              Branch("fusion_bn", (Module("fusion_bn.0", "fusion_bn", "bn"),), required=True)),
    deploy=_deploy_conv("cheap_operation"), identity="fusion_bn", tells_groups=True)

# xindongzhang/ECBSR models/ecb.py (commit c60b1d27) ECB: conv3x3 (nn.Conv2d, bias) and four SeqConv3x3
# whose tensors are attributes, not modules: conv1x1_3x3.k0/b0/k1/b1, conv1x1_{sbx,sby,lpl}.k0/b0/scale/
# bias and the fixed mask (an nn.Parameter with requires_grad=False: in the state dict). convert.py
# copies rep_params() into models/plainsr.py's Conv3X3, whose conv is named conv3x3 too; the activation
# (act.weight for PReLU) passes through. No BN. with_idt is not in the arrays: ecb (ECBSR's default
# --idt_ecbsr 0) or ecb_idt.
_ECB_TENSORS = {"conv1x1_3x3": ("k0", "b0", "k1", "b1"),
                **{n: ("k0", "b0", "scale", "bias", "mask") for n in ("conv1x1_sbx", "conv1x1_sby", "conv1x1_lpl")}}


def _ecb(with_idt: bool) -> BlockType:
    return BlockType(
        name="ECB", block=ECB, marker="conv1x1_sbx.mask",
        branches=(Branch("conv3x3", (Module("conv3x3", "conv3x3", "conv"),), required=True),
                  *(Branch(n, tuple(Module(f"{n}.{k}", f"{n}.{k}", "tensor") for k in keys), required=True)
                    for n, keys in _ECB_TENSORS.items())),
        deploy=_deploy_conv("conv3x3"), config={"with_idt": with_idt}, options=(), tells_groups=True,
        identity=True if with_idt else None)


# JUGGHM/OREPA_CVPR2022 blocks.py (commit 3ed037be) OREPA: the weight_orepa_* parameters, vector, the
# buffers weight_orepa_avg_avg / id_tensor / weight_orepa_prior (in the state dict), bn (nn.BatchNorm2d,
# eps 1e-5); switch_to_deploy() -> orepa_reparam (weight, bias), everything else deleted.
# weight_orepa_1x1 is optional (weight_gen() checks hasattr).
_OREPA_TENSORS = ("weight_orepa_origin", "weight_orepa_avg_conv", "weight_orepa_pfir_conv", "weight_orepa_avg_avg",
                  "weight_orepa_1x1_kxk_idconv1", "id_tensor", "weight_orepa_1x1_kxk_conv2", "weight_orepa_gconv_dw",
                  "weight_orepa_gconv_pw", "vector", "weight_orepa_prior")
_OREPA = BlockType(
    name="OREPA", block=OREPA, marker="weight_orepa_origin",
    branches=(Branch("weight_orepa", tuple(Module(n, n, "tensor") for n in _OREPA_TENSORS)
                     + (Module("bn", "bn", "bn"),), required=True),
              Branch("weight_orepa_1x1", (Module("weight_orepa_1x1", "weight_orepa_1x1", "tensor"),))),
    deploy=_deploy_conv("orepa_reparam"), tells_groups=True)

SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme(
        name="repvgg",
        description="official RepVGG (RepVGGBlock: rbr_dense + rbr_1x1 + rbr_identity -> rbr_reparam)",
        # DingXiaoH/RepVGG repvgg.py (commit eae7c52, the one the examples of tests/data/state were made with):
        # RepVGGBlock.__init__ / switch_to_deploy; BN eps is nn.BatchNorm2d's default 1e-5.
        source="DingXiaoH/RepVGG repvgg.py @eae7c520",
        eps=1e-5,
        blocks=(_REPVGG_BLOCK,)),
    Scheme(
        name="yolov6",
        description="YOLOv6 RepVGGBlock (official RepVGG names; BN eps 1e-3)",
        # meituan/YOLOv6 yolov6/layers/common.py (commit e86a483) RepVGGBlock: rbr_dense/rbr_1x1 are
        # ConvModule (.conv, .bn), rbr_identity a BatchNorm2d, deploy rbr_reparam; and
        # yolov6/utils/torch_utils.py initialize_weights sets every BatchNorm2d's eps to 1e-3.
        source="meituan/YOLOv6 yolov6/layers/common.py, yolov6/utils/torch_utils.py @e86a483f",
        eps=1e-3,
        blocks=(_REPVGG_BLOCK,),
        detect=False),
    Scheme(
        name="mobileone",
        description="apple MobileOne (MobileOneBlock: rbr_conv.{i} + rbr_scale + rbr_skip -> reparam_conv)",
        # apple/ml-mobileone mobileone.py (commit b7f4e6d): MobileOneBlock.__init__ / reparameterize.
        source="apple/ml-mobileone mobileone.py @b7f4e6d4",
        eps=1e-5,
        blocks=(_mobileone_like("MobileOneBlock", "rbr_conv", "rbr_scale", "rbr_skip", "reparam_conv"),)),
    Scheme(
        name="timm",
        description="timm byobnet RepVggBlock / MobileOneBlock, fastvit MobileOneBlock / RepMixer / "
                    "ReparamLargeKernelConv / RepConditionalPosEnc (-> reparam_conv); repvit RepVggDw / "
                    "RepVitClassifier / ConvNorm (-> the module itself, as reparameterize_model); repghost "
                    "RepGhostModule (cheap_operation + fusion_bn -> cheap_operation); fastvit MobileOneBlock "
                    "with its identity BN only (-> reparam_conv, 3x3 depthwise)",
        # huggingface/pytorch-image-models timm/models/byobnet.py RepVggBlock (conv_kxk, conv_1x1,
        # identity = a BN when in == out and stride 1), MobileOneBlock (conv_kxk ModuleList, conv_scale,
        # identity); timm/models/fastvit.py MobileOneBlock (same names) and RepMixer (norm, mixer,
        # optional layer_scale.gamma; reparameterize(): w = id + gamma * (mixer - norm)),
        # ReparamLargeKernelConv (large_conv + optional small_conv, ConvNormAct .conv/.bn) and
        # RepConditionalPosEnc (pos_enc: depthwise conv with bias, x + pos_enc(x)), all -> reparam_conv.
        # Commit aa4b585.
        source="huggingface/pytorch-image-models timm/models/byobnet.py, timm/models/fastvit.py @aa4b5850, "
               "timm/models/repvit.py @1bcbc1cf, timm/models/repghost.py @03fa1491",
        eps=1e-5,
        blocks=(
            _TIMM_REPMIXER,
            _repvgg_like("RepVggBlock", "conv_kxk", "conv_1x1", "identity", "reparam_conv"),
            _mobileone_like("MobileOneBlock", "conv_kxk", "conv_scale", "identity", "reparam_conv"),
            _TIMM_LARGE_KERNEL,
            _TIMM_POS_ENC,
            _TIMM_REPVGGDW,
            _TIMM_REPVIT_HEAD,
            _TIMM_CONVNORM,
            _TIMM_REPGHOST,
            _TIMM_MOBILEONE_IDENTITY,
        )),
    Scheme(
        name="mmpretrain",
        description="mmpretrain RepVGGBlock / MobileOneBlock (branch_* -> branch_reparam)",
        # open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py (commit 0979e78): create_conv_bn
        # builds Sequential(conv, norm); branch_norm is the identity BN; deploy branch_reparam.
        # mobileone.py (commit 9fe593e): branch_conv_list ModuleList, branch_scale, branch_norm.
        source="open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py @0979e785, mobileone.py @9fe593e3",
        eps=1e-5,
        blocks=(
            _repvgg_like("RepVGGBlock", "branch_3x3", "branch_1x1", "branch_norm", "branch_reparam", bn="norm"),
            _mobileone_like("MobileOneBlock", "branch_conv_list", "branch_scale", "branch_norm",
                            "branch_reparam", bn="norm"),
        )),
    Scheme(
        name="ultralytics",
        description="ultralytics BaseModel.fuse(): RepConv (conv1 + conv2 + bn -> conv), RepVGGDW "
                    "(conv + conv1 -> conv), Conv2 (conv + cv2 + bn -> conv), every Conv / DWConv (conv + bn -> "
                    "conv with bias), ConvTranspose (conv_transpose + bn -> conv_transpose with bias); BN eps 1e-3",
        # ultralytics/ultralytics ultralytics/nn/tasks.py (commit 002217d) BaseModel.fuse(): over
        # model.modules() (a parent before its children), Conv / DWConv with a bn: conv =
        # fuse_conv_and_bn(conv, bn), bn deleted (keys conv.weight, conv.bias); RepConv.fuse_convs();
        # RepVGGDW.fuse(). ultralytics/nn/modules/conv.py (commit 007216d) RepConv: conv1 = Conv (k=3,
        # .conv/.bn), conv2 = Conv (1x1), bn = BatchNorm2d identity (optional), fuse_convs() -> self.conv
        # with bias; LightConv: conv1 = Conv(c1, c2, 1, act=False) then conv2 = DWConv(c2, c2, k): a
        # sequence, not a RepConv, whose two Conv+BN pairs fuse() folds one by one. ultralytics/nn/modules/
        # block.py RepVGGDW (YOLOv10's CIB): conv = Conv(ed, ed, 7, g=ed, act=False), conv1 = Conv(ed, ed,
        # 3, g=ed, act=False), act(conv(x) + conv1(x)); fuse() -> self.conv (7x7 depthwise with bias), conv1
        # deleted. ultralytics/utils/torch_utils.py initialize_weights sets BN eps 1e-3.
        # ultralytics 8.4.190 ultralytics/nn/modules/conv.py Conv2: conv (KxK, no bias) + cv2 (1x1, no
        # bias, same stride / groups / dilation, autopad(1) = 0: centred) summed, then bn; fuse() calls
        # Conv2.fuse_convs() (cv2 added at the centre tap of conv, cv2 deleted), then fuse_conv_and_bn:
        # keys conv.weight, conv.bias. ConvTranspose (same file): conv_transpose = nn.ConvTranspose2d
        # (bias only when bn=False), bn; fuse() -> fuse_deconv_and_bn (ultralytics/utils/torch_utils.py):
        # keys conv_transpose.weight, conv_transpose.bias, bn deleted. ConvTranspose(bn=False) has no bn
        # keys and nothing to fold: it passes through, as Proto's plain nn.ConvTranspose2d upsample does.
        # Never auto-detected: conv1/conv2 each holding conv+bn is also mmcv ConvModule's layout in many
        # plain (sequential) bottlenecks.
        source="ultralytics/ultralytics ultralytics/nn/tasks.py @002217d4, ultralytics/nn/modules/conv.py "
               "@007216d4, ultralytics/nn/modules/block.py, ultralytics/utils/torch_utils.py; Conv2, "
               "ConvTranspose (8.4.190); "
               "ultralytics/nn/modules/head.py Detect.fuse (8.4.190): the one2one branch dropped (end2end=False)",
        eps=1e-3,
        drop=ultralytics_unused_head,
        blocks=(
            # Tentative: LightConv has the same names (conv1, conv2) with a 1x1 then a depthwise KxK.
            dataclasses.replace(_repvgg_like("RepConv", "conv1", "conv2", "bn", "conv", activation="silu"),
                                tentative=True),
            BlockType(
                name="RepVGGDW", block=ReparamLargeKernelConv, marker="conv1.conv.weight",
                branches=(Branch("conv", _conv_bn("conv", "large_conv"), required=True),
                          Branch("conv1", _conv_bn("conv1", "small_conv"), required=True)),
                deploy=_deploy_conv_act("conv"), config={"activation": "silu"}, tentative=True),
            # Conv2 before Conv: the same conv / bn names, plus cv2 (a bare 1x1 nn.Conv2d) beside them.
            # BottleneckCSP's cv2 is a bare conv too, beside cv1 / cv3 / bn but no conv: not a Conv2.
            BlockType(
                name="Conv2", block=ParallelConvBN, marker="cv2.weight",
                branches=(Branch("conv", (Module("conv", "conv_kxk", "conv"),), required=True),
                          Branch("cv2", (Module("cv2", "conv_1x1", "conv"),), required=True),
                          Branch("bn", (Module("bn", "bn", "bn"),), required=True)),
                deploy=_deploy_conv("conv"), requires=("conv.weight", "bn.running_var")),
            BlockType(
                name="Conv", block=ConvBN, marker="bn.running_var",
                branches=(Branch("conv", (Module("conv", "conv", "conv"),), required=True),
                          Branch("bn", (Module("bn", "bn", "bn"),), required=True)),
                deploy=_deploy_conv("conv"), excludes=("cv2.weight",)),
            # The arrays tell groups (C_out of the BN over the weight's C_out / groups); stride 2 is the
            # module's default (k=2, s=2), the check's geometry: the fold itself holds at any.
            BlockType(
                name="ConvTranspose", block=ConvTransposeBN, marker="bn.running_var",
                branches=(Branch("conv_transpose", (Module("conv_transpose", "conv_transpose", "conv"),),
                                 required=True),
                          Branch("bn", (Module("bn", "bn", "bn"),), required=True)),
                deploy=_deploy_conv("conv_transpose"), config={"stride": 2}, tells_groups=True),
        ),
        detect=False),
    Scheme(
        name="acnet",
        description="official ACNet (ACBlock: square + ver + hor conv-BN -> fused_conv)",
        # DingXiaoH/ACNet acnet/acb.py (read at commit 8a93375; the examples of tests/data/state were made at 748fb0c):
        # square_conv/square_bn, ver_conv (Kx1)/ver_bn, hor_conv (1xK)/hor_bn, fused_conv;
        # _add_to_square_kernel centres the asymmetric kernels (the crop used when padding < K//2
        # keeps that alignment in forward). BNs may be affine=False (use_affine): no weight/bias keys.
        source="DingXiaoH/ACNet acnet/acb.py @748fb0c7",
        eps=1e-5,
        blocks=(BlockType(
            name="ACBlock", block=ACBlock, marker="square_conv.weight",
            branches=tuple(Branch(f"{n}_conv", (Module(f"{n}_conv", f"{n}.conv", "conv"),
                                                Module(f"{n}_bn", f"{n}.bn", "bn")), required=True)
                           for n in ("square", "ver", "hor")),
            deploy=_deploy_conv("fused_conv")),)),
    Scheme(
        name="dbb",
        description="official Diverse Branch Block (dbb_origin, dbb_1x1, dbb_avg, dbb_1x1_kxk -> dbb_reparam)",
        # DingXiaoH/DiverseBranchBlock diversebranchblock.py (read at commit 2d27b03; the examples of
        # tests/data/state were made at 8d2b16b) + dbb_transforms.py: get_equivalent_kernel_bias;
        # IdentityBasedConv1x1.get_actual_kernel = weight + identity, its module named idconv1; a plain
        # conv1 instead when the internal width differs from C_in (default 2*C_in when groups >=
        # out_channels, i.e. depthwise). The name alone tells which: idconv1 -> seq.idconv1.
        source="DingXiaoH/DiverseBranchBlock diversebranchblock.py, dbb_transforms.py @8d2b16b6",
        eps=1e-5,
        blocks=(BlockType(
            name="DiverseBranchBlock", block=DiverseBranchBlock, marker="dbb_origin.conv.weight",
            branches=(Branch("dbb_origin", _conv_bn("dbb_origin", "origin"), required=True),
                      Branch("dbb_1x1", _conv_bn("dbb_1x1", "one")),
                      Branch("dbb_1x1_kxk", (Module("dbb_1x1_kxk.idconv1", "seq.idconv1", "conv"),)),
                      Branch("dbb_1x1_kxk", (Module("dbb_1x1_kxk.conv1", "seq.conv1", "conv"),)),
                      Branch("dbb_1x1_kxk", (Module("dbb_1x1_kxk.bn1.bn", "seq.bn1", "bn"),
                                             Module("dbb_1x1_kxk.conv2", "seq.conv2", "conv"),
                                             Module("dbb_1x1_kxk.bn2", "seq.bn2", "bn")), required=True),
                      Branch("dbb_avg", (Module("dbb_avg.conv", "avg.conv", "conv"),
                                         Module("dbb_avg.bn.bn", "avg.bn", "bn"))),
                      Branch("dbb_avg", (Module("dbb_avg.avgbn", "avg.avgbn", "bn"),), required=True)),
            deploy=_deploy_conv("dbb_reparam"), tells_groups=True),)),
    Scheme(
        name="repmlp",
        description="official RepMLP block (fc3 + fc3_bn + repconv{k} -> fc3 with bias)",
        # DingXiaoH/RepMLP repmlpnet.py (commit 3eff13f; get_equivalent_fc3 / local_inject read in the
        # repository and in copies of it) RepMLPBlock: fc3 is a grouped 1x1 conv
        # (groups = S) without bias, fc3_bn a BN over the S share-sets, repconv{k} conv-BN (S, 1, k, k);
        # local_inject() -> fc3 with bias, fc3_bn and repconv{k} deleted. The global perceptron (gp.*)
        # is not re-parameterized: it passes through.
        source="DingXiaoH/RepMLP repmlpnet.py @3eff13fa",
        eps=1e-5,
        blocks=(BlockType(
            name="RepMLPBlock", block=RepMLPBlock, marker="fc3_bn.running_var",
            branches=(Branch("fc3", (Module("fc3", "fc", "fc"), Module("fc3_bn", "fc_bn", "bn")), required=True),
                      Branch("repconv{i}", _conv_bn("repconv{i}", "repconv{i}"))),
            deploy=(("weight", "fc3.weight", "fc"), ("bias", "fc3.bias", "fc")),
            options=("eps", "partition"), tells_groups=True),)),
    Scheme(
        name="ecb",
        description="ECBSR ECB (conv3x3 + conv1x1_3x3 + conv1x1_sbx/sby/lpl -> conv3x3, as convert.py's "
                    "PlainSR), no identity (--idt_ecbsr 0, the official configs)",
        source="xindongzhang/ECBSR models/ecb.py, models/plainsr.py, convert.py @c60b1d27",
        eps=1e-5,        # no BN
        blocks=(_ecb(False),)),
    Scheme(
        name="ecb_idt",
        description="ECBSR ECB with its identity branch (with_idt=1; only where in == out)",
        source="xindongzhang/ECBSR models/ecb.py, models/plainsr.py, convert.py @c60b1d27",
        eps=1e-5,
        blocks=(_ecb(True),),
        detect=False),
    Scheme(
        name="orepa",
        description="official OREPA (weight_orepa_* + vector + bn -> orepa_reparam)",
        source="JUGGHM/OREPA_CVPR2022 blocks.py @3ed037be",
        eps=1e-5,
        blocks=(_OREPA,)),
)}


# ultralytics with the NMS-free head chosen before fuse() (YOLOv10 / YOLO26 exported with nms=False):
# the one-to-many branch is dropped instead (ultralytics_unused_head).
SCHEMES["ultralytics-end2end"] = dataclasses.replace(
    SCHEMES["ultralytics"], name="ultralytics-end2end",
    description="as ultralytics, with the NMS-free head (end2end=True): Detect.fuse() drops the one-to-many "
                "branch (cv2, cv3) instead of one2one_*",
    drop=functools.partial(ultralytics_unused_head, end2end=True))


def scheme_names() -> list[str]:
    """The names ``scheme=`` accepts."""
    return sorted(SCHEMES)


# The schemes of the later families (YOLOv6 QARepVGG, yolov7, official RepViT, RepLKNet,
# UniRepLKNet) are in schemes_later.py: it builds on the helpers above, and one module of
# tables this long would be hard to read.
from repnp.io.npz.schemes_later import add_later_schemes  # noqa: E402  (needs the helpers above)

add_later_schemes(SCHEMES)
