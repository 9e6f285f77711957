"""Naming schemes of re-parameterizable blocks in framework state dicts.

A *scheme* is the way one framework names the parameters of its
re-parameterizable blocks in a ``state_dict()`` and the name it gives the
fused conv after its own reparameterization. Each is described here as data
(no code): :mod:`repnp.io.state` finds, groups and fuses blocks from these
descriptions with :mod:`repnp.fusion`.

Every name below was checked against the project's own source; the file and
the commit read are cited next to each scheme. Facts a state dict cannot tell
(BN epsilon, and which of two schemes with identical key names it is) are
per-scheme defaults, overridable by the caller.

Block families
--------------
``branches``
    A sum of conv-BN branches on one input (kernels centred in the largest
    one), plus optionally a BN-only identity branch; RepVGG, MobileOne, ACNet
    and ultralytics' RepConv are all this. Templates containing ``{i}`` name a
    ModuleList (MobileOne's k conv branches).
``repmixer``
    timm FastViT's ``x + gamma * (mixer(x) - norm(x))``, mixer and norm being
    MobileOne blocks.
``residual_conv``
    ``x + conv(x)`` with a depthwise conv (timm FastViT's RepConditionalPosEnc).
``dbb``
    Diverse Branch Block: KxK, 1x1, 1x1 -> avg-pool and 1x1 -> KxK branches.
``repmlp``
    RepMLP block: local conv-BN branches merged into the partition FC.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BranchSpec", "BlockSpec", "Scheme", "SCHEMES", "scheme_names"]


@dataclass(frozen=True)
class BranchSpec:
    """One conv-BN branch: the module names of its conv and of its BN.

    ``conv`` and ``bn`` are relative to the block prefix; ``{i}`` in both marks
    a ModuleList index. ``required`` branches must be present for the block to
    be recognised; optional ones are used when their keys are there.
    """

    conv: str
    bn: str
    required: bool = False


@dataclass(frozen=True)
class BlockSpec:
    """How one block type is laid out in a state dict.

    Attributes
    ----------
    family : str
        ``"branches"``, ``"repmixer"``, ``"dbb"`` or ``"repmlp"``.
    name : str
        The framework's class name (for reports).
    marker : str
        A key, relative to the block prefix, that every such block has: a key
        ``<prefix><marker>`` (prefix empty or ending in ``.``) places a block.
    deploy : str
        The module name of the fused conv after the framework's own
        reparameterization (its ``.weight`` and ``.bias`` are written).
    branches : tuple of BranchSpec
        The conv-BN branches (``branches`` family).
    identity : str or None
        The BN-only identity branch, if the block type has one.
    activation : str
        The class's default activation after the fused conv (a key of
        :data:`repnp.ops.ACTIVATIONS`); informational: a model may configure
        another (timm's MobileOneBlock is ReLU in byobnet, GELU in FastViT).
    """

    family: str
    name: str
    marker: str
    deploy: str
    branches: tuple = ()
    identity: str | None = None
    activation: str = "identity"


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
    blocks : tuple of BlockSpec
        Looked for in this order; a key claimed by an earlier block (an outer
        one, e.g. RepMixer around its MobileOne ``mixer``) is not reused.
    detect : bool
        Whether automatic detection may pick this scheme. ``False`` when its
        key names are those of another scheme (YOLOv6 = RepVGG names) or too
        generic to be told from non-re-parameterizable blocks (ultralytics'
        ``conv1`` / ``conv2``): pass ``scheme=`` for those.
    """

    name: str
    description: str
    source: str
    eps: float
    blocks: tuple
    detect: bool = True


def _repvgg_like(name: str, kxk: str, one: str, identity: str, deploy: str, *, conv: str = "conv",
                 bn: str = "bn", activation: str = "relu") -> BlockSpec:
    return BlockSpec(
        family="branches", name=name, marker=f"{kxk}.{conv}.weight", deploy=deploy,
        branches=(BranchSpec(f"{kxk}.{conv}", f"{kxk}.{bn}", required=True),
                  BranchSpec(f"{one}.{conv}", f"{one}.{bn}", required=True)),
        identity=identity, activation=activation)


def _mobileone_like(name: str, convs: str, scale: str, identity: str, deploy: str, *,
                    conv: str = "conv", bn: str = "bn", activation: str = "relu") -> BlockSpec:
    return BlockSpec(
        family="branches", name=name, marker=f"{convs}.0.{conv}.weight", deploy=deploy,
        branches=(BranchSpec(f"{convs}.{{i}}.{conv}", f"{convs}.{{i}}.{bn}", required=True),
                  BranchSpec(f"{scale}.{conv}", f"{scale}.{bn}")),
        identity=identity, activation=activation)


_REPVGG_BLOCK = _repvgg_like("RepVGGBlock", "rbr_dense", "rbr_1x1", "rbr_identity", "rbr_reparam")

SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme(
        name="repvgg",
        description="official RepVGG (RepVGGBlock: rbr_dense + rbr_1x1 + rbr_identity -> rbr_reparam)",
        # DingXiaoH/RepVGG repvgg.py (commit eae7c52, the one shared/onnx-examples were made with):
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
        description="timm byobnet RepVggBlock / MobileOneBlock, fastvit MobileOneBlock / RepMixer "
                    "(-> reparam_conv)",
        # huggingface/pytorch-image-models timm/models/byobnet.py RepVggBlock (conv_kxk, conv_1x1,
        # identity = a BN when in == out and stride 1), MobileOneBlock (conv_kxk ModuleList, conv_scale,
        # identity); timm/models/fastvit.py MobileOneBlock (same names) and RepMixer (norm, mixer,
        # optional layer_scale.gamma; reparameterize(): w = id + gamma * (mixer - norm)),
        # ReparamLargeKernelConv (large_conv + optional small_conv, ConvNormAct .conv/.bn) and
        # RepConditionalPosEnc (pos_enc: depthwise conv with bias, x + pos_enc(x)), all -> reparam_conv.
        # Commit aa4b585.
        source="huggingface/pytorch-image-models timm/models/byobnet.py, timm/models/fastvit.py @aa4b5850",
        eps=1e-5,
        blocks=(
            BlockSpec(family="repmixer", name="RepMixer", marker="mixer.identity.running_var",
                      deploy="reparam_conv",
                      branches=(BranchSpec("mixer.conv_kxk.{i}.conv", "mixer.conv_kxk.{i}.bn"),
                                BranchSpec("mixer.conv_scale.conv", "mixer.conv_scale.bn")),
                      identity="mixer.identity"),
            _repvgg_like("RepVggBlock", "conv_kxk", "conv_1x1", "identity", "reparam_conv"),
            _mobileone_like("MobileOneBlock", "conv_kxk", "conv_scale", "identity", "reparam_conv"),
            BlockSpec(family="branches", name="ReparamLargeKernelConv", marker="large_conv.conv.weight",
                      deploy="reparam_conv",
                      branches=(BranchSpec("large_conv.conv", "large_conv.bn", required=True),
                                BranchSpec("small_conv.conv", "small_conv.bn")),
                      activation="gelu"),   # FastViT's PatchEmbed passes act_layer=GELU
            BlockSpec(family="residual_conv", name="RepConditionalPosEnc", marker="pos_enc.weight",
                      deploy="reparam_conv"),
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
            _repvgg_like("RepVGGBlock", "branch_3x3", "branch_1x1", "branch_norm", "branch_reparam",
                         bn="norm"),
            _mobileone_like("MobileOneBlock", "branch_conv_list", "branch_scale", "branch_norm",
                            "branch_reparam", bn="norm"),
        )),
    Scheme(
        name="ultralytics",
        description="ultralytics RepConv (conv1 + conv2 + bn -> conv; BN eps 1e-3)",
        # ultralytics/ultralytics ultralytics/nn/modules/conv.py (commit 007216d) RepConv: conv1 = Conv
        # (k=3, .conv/.bn), conv2 = Conv (1x1), bn = BatchNorm2d identity (optional), fuse_convs() ->
        # self.conv with bias; ultralytics/utils/torch_utils.py initialize_weights sets BN eps 1e-3.
        # Never auto-detected: conv1/conv2 each holding conv+bn is also mmcv ConvModule's layout in
        # many plain (sequential) bottlenecks.
        source="ultralytics/ultralytics ultralytics/nn/modules/conv.py @007216d4, ultralytics/utils/torch_utils.py",
        eps=1e-3,
        blocks=(_repvgg_like("RepConv", "conv1", "conv2", "bn", "conv", activation="silu"),),
        detect=False),
    Scheme(
        name="acnet",
        description="official ACNet (ACBlock: square + ver + hor conv-BN -> fused_conv)",
        # DingXiaoH/ACNet acnet/acb.py (read at commit 8a93375; the shared examples were made at 748fb0c):
        # square_conv/square_bn,
        # ver_conv (Kx1)/ver_bn, hor_conv (1xK)/hor_bn, fused_conv; _add_to_square_kernel centres the
        # asymmetric kernels (the crop used when padding < K//2 keeps that alignment in forward).
        # BNs may be affine=False (use_affine): then they have no weight/bias keys.
        source="DingXiaoH/ACNet acnet/acb.py @748fb0c7",
        eps=1e-5,
        blocks=(BlockSpec(family="branches", name="ACBlock", marker="square_conv.weight",
                          deploy="fused_conv",
                          branches=(BranchSpec("square_conv", "square_bn", required=True),
                                    BranchSpec("ver_conv", "ver_bn", required=True),
                                    BranchSpec("hor_conv", "hor_bn", required=True))),)),
    Scheme(
        name="dbb",
        description="official Diverse Branch Block (dbb_origin, dbb_1x1, dbb_avg, dbb_1x1_kxk -> dbb_reparam)",
        # DingXiaoH/DiverseBranchBlock diversebranchblock.py (read at commit 2d27b03; the shared examples
        # were made at 8d2b16b) + dbb_transforms.py: get_equivalent_kernel_bias;
        # IdentityBasedConv1x1.get_actual_kernel = weight + identity; conv1 instead of idconv1 when the
        # internal width differs from C_in (default 2*C_in when groups >= out_channels, i.e. depthwise).
        source="DingXiaoH/DiverseBranchBlock diversebranchblock.py, dbb_transforms.py @8d2b16b6",
        eps=1e-5,
        blocks=(BlockSpec(family="dbb", name="DiverseBranchBlock", marker="dbb_origin.conv.weight",
                          deploy="dbb_reparam"),)),
    Scheme(
        name="repmlp",
        description="official RepMLP block (fc3 + fc3_bn + repconv{k} -> fc3 with bias)",
        # DingXiaoH/RepMLP repmlpnet.py (commit 3eff13f; get_equivalent_fc3 / local_inject read in the
        # repository and in copies of it) RepMLPBlock: fc3 is a grouped 1x1 conv
        # (groups = S) without bias, fc3_bn a BN over the S share-sets, repconv{k} conv-BN (S, 1, k, k);
        # local_inject() -> fc3 with bias, fc3_bn and repconv{k} deleted.
        source="DingXiaoH/RepMLP repmlpnet.py @3eff13fa",
        eps=1e-5,
        blocks=(BlockSpec(family="repmlp", name="RepMLPBlock", marker="fc3_bn.running_var", deploy="fc3"),)),
)}


def scheme_names() -> list[str]:
    """The names ``scheme=`` accepts."""
    return sorted(SCHEMES)
