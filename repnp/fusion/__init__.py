"""The fusion algebra: one pure function per re-parameterization rule.

Every rule turns a composition of linear operators (convolutions, inference
BatchNorm, identity, average pooling, concatenation) into one convolution, or
one fully connected layer, that computes the same thing up to floating-point
rounding. Blocks (``repnp.blocks``) and the ONNX converter (``repnp.io``) both
do their math here: one algebra, two front doors.

Conventions: kernels are OIHW with ``I = C_in / groups``; a conv is described
by a :class:`KernelBias`; geometry (stride, padding, dilation, groups) is not
part of it and stays the caller's business, except where a rule needs it.
The functions compute in float64 and return the dtype of the kernel they were
given (float64 for integer input); they never modify their inputs.

Rules (repnp's numbering) and where they come from (details, equations and the
official functions: ``docs/sources.md``):

1. conv + BN: :func:`fuse_bn`, :func:`bn_scale_shift` (RepVGG eq. (3), DBB transform I);
   in general, any per-output-channel affine map after a conv (a BN, a layer
   scale, a ``Mul``/``Add`` by a per-channel constant): :func:`scale_channels`;
2. branch addition: :func:`add_branches` (RepVGG, ACNet, DBB transform II);
3. kernel alignment: :func:`pad_kernel`, :func:`kernel_offset` (RepVGG, ACNet, DBB
   transform VI "multi-scale");
4. identity as a kernel: :func:`identity_kernel` (RepVGG, MobileOne);
5. sequential convs: :func:`merge_sequential` (1x1 then KxK, DBB transform III),
   :func:`merge_pointwise` (KxK then 1x1: ResRep's compactor, depthwise then
   pointwise);
6. average pooling as a conv: :func:`avgpool_kernel` (DBB transform V);
7. depth concatenation: :func:`concat_branches` (DBB transform IV), with
   :func:`ungroup_kernel` for grouped convs;
8. conv into FC: :func:`conv_to_fc` (RepMLP).

Dilated kernels (UniRepLKNet's dilated branches): :func:`dilate_kernel` (a KxK kernel
with dilation r as a dense (r(K-1)+1)-square one, then rule 3 and rule 2),
:func:`dilated_size`; module ``repnp/fusion/dilation.py``.
Masked kernels (``masked.py``): :func:`masked_kernel` (a per-channel scale times a fixed mask,
:func:`edge_mask`: ECB's Sobel / Laplacian), :func:`merge_depthwise` (1x1 then depthwise KxK:
ECB's edge branches, OREPA's prior branch).

Rules 1 and 2 for fully connected layers (matrices (O, I)): :func:`fuse_bn_linear`
(RepViT's ``BN_Linear``), :func:`scale_linear`, :func:`add_linear` (parallel heads);
rule 1 for transposed convs (kernels (C_in, C_out/groups, kh, kw)): :func:`fuse_bn_transposed`.

Sources (full references in ``docs/sources.md``): RepVGG (Ding et al., CVPR
2021, arXiv 2101.03697: BN fusion, 1x1 and identity as 3x3 kernels, branch
addition; github.com/DingXiaoH/RepVGG ``repvgg.py``), Diverse Branch Block
(Ding et al., CVPR 2021, arXiv 2103.13425: transforms I-VI, named
``transI_fusebn`` ... ``transVI_multiscale`` in ``dbb_transforms.py`` of
github.com/DingXiaoH/DiverseBranchBlock), ACNet (Ding et al., ICCV 2019,
arXiv 1908.03930), ResRep (Ding et al., ICCV 2021, arXiv 2007.03260: the
compactor merge), RepMLP (Ding et al., arXiv 2105.01883; RepMLPNet, CVPR 2022:
conv into FC), MobileOne (Vasu et al., CVPR 2023, arXiv 2206.04040).

The rules live in six modules: ``repnp/fusion/kernels.py`` (rules 1-4 and 7: all that
summed branches need), ``sequential.py`` (5), ``pooling.py`` (6), ``fc.py`` (8), ``linear.py``
(1 and 2 for FC layers); import them from ``repnp.fusion``.
"""

from repnp.fusion._common import KernelBias
from repnp.fusion.dilation import dilate_kernel, dilated_size
from repnp.fusion.fc import conv_to_fc
from repnp.fusion.kernels import (
                                  add_branches,
                                  bn_scale_shift,
                                  concat_branches,
                                  fuse_bn,
                                  identity_kernel,
                                  kernel_offset,
                                  pad_kernel,
                                  scale_channels,
                                  ungroup_kernel,
)
from repnp.fusion.linear import add_linear, fuse_bn_linear, scale_linear
from repnp.fusion.masked import edge_mask, masked_kernel, merge_depthwise
from repnp.fusion.pooling import avgpool_kernel
from repnp.fusion.sequential import merge_pointwise, merge_sequential
from repnp.fusion.transposed import fuse_bn_transposed

__all__ = [
    "KernelBias",
    "bn_scale_shift",
    "fuse_bn",
    "fuse_bn_transposed",
    "scale_channels",
    "identity_kernel",
    "pad_kernel",
    "kernel_offset",
    "add_branches",
    "concat_branches",
    "ungroup_kernel",
    "merge_sequential",
    "merge_pointwise",
    "avgpool_kernel",
    "conv_to_fc",
    "fuse_bn_linear",
    "scale_linear",
    "add_linear",
    "dilate_kernel",
    "dilated_size",
    # masked / fixed depthwise kernels after a 1x1 (ECB, OREPA's prior): fusion/masked.py
    "edge_mask",
    "masked_kernel",
    "merge_depthwise",
]

