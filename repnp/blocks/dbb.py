"""Diverse Branch Block (DBB): four branches of different shapes, deployed as one KxK conv.

A KxK conv is trained as the sum of KxK-BN, 1x1-BN, 1x1-BN -> KxK-BN and 1x1-BN
-> KxK average pooling -> BN, merged at inference into one KxK conv with the
paper's transforms I (conv-BN), II (branch addition), III (1x1 then KxK), V
(average pooling as a conv) and VI (multi-scale: a 1x1 as a KxK). Paper: Ding et
al., *Diverse Branch Block: Building a Convolution as an Inception-like Unit*,
CVPR 2021 (arXiv 2103.13425).

Facts read from the official ``diversebranchblock.py`` and ``dbb_transforms.py``
(github.com/DingXiaoH/DiverseBranchBlock, read at commits 2d27b03 and da92c40;
the examples ``off_dbb_k3_c12`` and ``off_dbb_dw3_c14``, made at 8d2b16b, load
into this block and reproduce PyTorch's output, see ``tests/test_blocks_dbb.py``):

* padding is always ``K//2`` (the official constructor asserts it); the
  non-KxK branches have no dilation, so neither does this block;
* the 1x1 convs that feed a KxK operator are followed by a BN whose output is
  padded with the BN's own value at zero input, ``beta - mean*gamma/sqrt(var+eps)``
  (``BNAndPadLayer``); the KxK conv / pooling after it then runs with padding 0.
  That is what makes transform III exact at the borders (rule 5 of
  :mod:`repnp.fusion`, ``merge_sequential``);
* when ``groups == out_channels`` (depthwise), there is no 1x1 branch and the
  average branch pools the input directly (padding ``K//2``,
  ``count_include_pad``), then BN; this needs ``in_channels == out_channels``;
* the 1x1 -> KxK branch has ``internal_channels`` intermediate channels, by
  default ``in_channels`` (dense/grouped) or ``2 * in_channels`` (depthwise).
  When it equals ``in_channels`` the 1x1 is "identity based"
  (``IdentityBasedConv1x1``): its stored weight is a *delta* and the kernel
  used is ``delta + identity_kernel(C, groups)``; the identity is not in the
  state dict. This block stores it the same way (``seq.idconv1.weight`` is the
  delta) so that an official state dict maps one to one.

Parameter names (``params()``) and the official state dict (BN: ``mean, var,
gamma, beta`` = ``running_mean, running_var, weight, bias``):
``origin.*`` = ``dbb_origin.*``; ``one.*`` = ``dbb_1x1.*``; ``avg.conv.weight`` =
``dbb_avg.conv.weight``, ``avg.bn.*`` = ``dbb_avg.bn.bn.*``, ``avg.avgbn.*`` =
``dbb_avg.avgbn.*``; ``seq.idconv1.weight`` / ``seq.conv1.weight`` =
``dbb_1x1_kxk.idconv1.weight`` / ``.conv1.weight``, ``seq.bn1.*`` =
``dbb_1x1_kxk.bn1.bn.*``, ``seq.conv2.weight``, ``seq.bn2.*`` = ``dbb_1x1_kxk.conv2``,
``.bn2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion, ops
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, random_bn, random_conv_weight
from repnp.blocks.common import check_groups, check_odd_kernel
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["DiverseBranchBlock"]


@dataclass(frozen=True, eq=False)
class DiverseBranchBlock(Described):
    """Train form of DBB: four branches summed, no activation.

    Attributes
    ----------
    origin : ConvBN
        KxK conv-BN, stride ``s``, padding ``K//2``, ``groups``.
    one : ConvBN or None
        1x1 conv-BN with stride ``s`` (None in the depthwise layout).
    avg_conv : ConvBN or None
        1x1 conv (C_out outputs, ``groups``) and the BN whose output is padded
        with its own zero-input value (None in the depthwise layout: pool the input).
    avg_bn : BatchNorm
        BN after the KxK average pooling (stride ``s``, ``count_include_pad``).
    seq_conv1 : Conv2d
        The 1x1 (M, C_in/groups) of the 1x1 -> KxK branch.
    seq_identity_based : bool
        True: ``seq_conv1.weight`` is a delta on the identity (``idconv1``).
    seq_bn1 : BatchNorm
        BN on the M intermediate channels, output padded with its zero-input value.
    seq_conv2 : Conv2d
        KxK (C_out, M/groups), stride ``s``, padding 0 (reads the padded map).
    seq_bn2 : BatchNorm

    Notes
    -----
    Deploy (:meth:`reparameterize`), per branch then summed (rule 2):

    * origin: rule 1;  1x1: rule 1, centred in KxK (rule 3);
    * 1x1 -> KxK: ``merge_sequential(fuse_bn(W1, bn1), fuse_bn(W2, bn2))`` (rule 5),
      exact at the borders because the intermediate map is padded with ``b1``;
    * 1x1 -> avg: the pooling is the conv :func:`repnp.fusion.avgpool_kernel`
      (rule 6), BN folded in, then merged like the previous branch; the
      depthwise layout pools the input directly: the pooling kernel itself.
    """

    origin: ConvBN
    one: ConvBN | None
    avg_conv: ConvBN | None
    avg_bn: BatchNorm
    seq_conv1: Conv2d
    seq_identity_based: bool
    seq_bn1: BatchNorm
    seq_conv2: Conv2d
    seq_bn2: BatchNorm

    def __post_init__(self) -> None:
        w = self.origin.conv.weight
        o, cg, k, kw = w.shape
        g = self.groups
        if k != kw or k % 2 == 0:
            raise ValueError(f"origin.conv.weight must be KxK with K odd (padding K//2), got shape {w.shape}")
        if ops.normalize_padding(self.origin.conv.padding) != (k // 2,) * 4:
            raise ValueError(f"origin.conv.padding must be K//2 = {k // 2}, got {self.origin.conv.padding!r}")
        if self.origin.conv.dilation not in (1, (1, 1)):
            raise ValueError("DBB has no dilation (its pooling and 1x1 -> KxK branches are not dilated)")
        depthwise = self.one is None
        if depthwise != (self.avg_conv is None):
            raise ValueError("one and avg_conv must both be present (dense/grouped) or both None (depthwise)")
        if depthwise and not (g == o == cg * g):
            raise ShapeError(
                f"the depthwise layout (no 1x1 branch) needs groups == in_channels == out_channels, got "
                f"groups={g}, origin.conv.weight {w.shape}"
            )
        if self.one is not None and self.one.conv.weight.shape != (o, cg, 1, 1):
            raise ShapeError(f"one.conv.weight must have shape {(o, cg, 1, 1)}, got {self.one.conv.weight.shape}")
        if self.avg_conv is not None and self.avg_conv.conv.weight.shape != (o, cg, 1, 1):
            raise ShapeError(
                f"avg_conv.conv.weight must have shape {(o, cg, 1, 1)}, got {self.avg_conv.conv.weight.shape}"
            )
        if self.avg_bn.channels != o:
            raise ShapeError(f"avg_bn has {self.avg_bn.channels} channels, out_channels is {o}")
        m = self.seq_conv1.weight.shape[0]
        if self.seq_conv1.weight.shape != (m, cg, 1, 1) or m % g:
            raise ShapeError(
                f"seq_conv1.weight must be (M, {cg}, 1, 1) with groups={g} dividing M, got "
                f"{self.seq_conv1.weight.shape}"
            )
        if self.seq_identity_based and m != cg * g:
            raise ShapeError(
                f"an identity-based 1x1 needs M == in_channels = {cg * g}, got seq_conv1.weight "
                f"{self.seq_conv1.weight.shape}"
            )
        if self.seq_bn1.channels != m:
            raise ShapeError(f"seq_bn1 has {self.seq_bn1.channels} channels, seq_conv1 gives M = {m}")
        if self.seq_conv2.weight.shape != (o, m // g, k, k):
            raise ShapeError(
                f"seq_conv2.weight must have shape {(o, m // g, k, k)}, got {self.seq_conv2.weight.shape}"
            )
        if self.seq_bn2.channels != o:
            raise ShapeError(f"seq_bn2 has {self.seq_bn2.channels} channels, out_channels is {o}")

    # -- configuration ---------------------------------------------------------
    @property
    def kernel_size(self) -> int:
        return int(self.origin.conv.weight.shape[2])

    @property
    def groups(self) -> int:
        return int(self.origin.conv.groups)

    @property
    def in_channels(self) -> int:
        return int(self.origin.conv.weight.shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        return self.origin.conv.out_channels

    @property
    def stride(self):
        return self.origin.conv.stride

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    @property
    def internal_channels(self) -> int:
        return int(self.seq_conv1.weight.shape[0])

    @property
    def seq_kernel1(self) -> np.ndarray:
        """The 1x1 kernel the 1x1 -> KxK branch applies (delta + identity when identity based)."""
        w = self.seq_conv1.weight
        if not self.seq_identity_based:
            return w
        return w + fusion.identity_kernel(self.in_channels, groups=self.groups, dtype=w.dtype)

    # -- construction ----------------------------------------------------------
    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride=1,
               groups: int = 1, internal_channels: int | None = None, eps: float = 1e-5,
               dtype=np.float64) -> "DiverseBranchBlock":
        """A block with N(0, 1/fan_in) kernels and random BN statistics.

        The layout follows the official constructor: depthwise when
        ``groups == out_channels``; ``internal_channels`` defaults to
        ``in_channels`` (identity-based 1x1, its delta drawn at random here so
        that the test is not trivial) or ``2 * in_channels`` when depthwise.
        """
        rng = np.random.default_rng(seed)
        k = check_odd_kernel(kernel_size)
        check_groups(in_channels, out_channels, groups)
        depthwise = groups == out_channels
        if depthwise and in_channels != out_channels:
            raise ShapeError(
                f"groups == out_channels ({groups}) selects the depthwise layout, which needs "
                f"in_channels == out_channels, got {in_channels} -> {out_channels}"
            )
        if internal_channels is None:
            internal_channels = 2 * in_channels if depthwise else in_channels
        m = int(internal_channels)
        if m < 1 or m % groups:
            raise ShapeError(f"groups={groups} must divide internal_channels={m}")
        p = k // 2
        cg = in_channels // groups
        kw = dict(groups=groups, eps=eps, dtype=dtype)
        origin = ConvBN.random(rng, in_channels, out_channels, k, stride=stride, padding=p, **kw)
        if depthwise:
            one = avg_conv = None
        else:
            one = ConvBN.random(rng, in_channels, out_channels, 1, stride=stride, padding=0, **kw)
            avg_conv = ConvBN.random(rng, in_channels, out_channels, 1, stride=1, padding=0, **kw)
        avg_bn = random_bn(rng, out_channels, eps=eps, dtype=dtype)
        seq_conv1 = Conv2d(random_conv_weight(rng, m, cg, 1, dtype=dtype), groups=groups)
        seq_bn1 = random_bn(rng, m, eps=eps, dtype=dtype)
        seq_conv2 = Conv2d(random_conv_weight(rng, out_channels, m // groups, k, dtype=dtype),
                           stride=stride, padding=0, groups=groups)
        seq_bn2 = random_bn(rng, out_channels, eps=eps, dtype=dtype)
        return cls(origin, one, avg_conv, avg_bn, seq_conv1, m == in_channels, seq_bn1, seq_conv2, seq_bn2)

    # -- the one description of the train form ---------------------------------
    def _bn_and_pad(self, d: Dataflow, h: str, bn: BatchNorm, prefix: str) -> str:
        """BN, then pad by ``K//2`` with the BN's own output at zero input (``BNAndPadLayer``):
        the padded border then holds what a BN after a zero-padded conv would hold, which
        keeps the later merge exact at the borders."""
        h = bn.describe(d, h, prefix)
        p = self.padding
        if p == 0:       # K = 1: nothing to pad
            return h
        value = d.const(bn.scale_shift()[1], prefix, "pad_value")
        return d.node("PadChannels", [h, value], prefix, pads=[p, p, p, p])

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``origin(x) + one(x) + avgbn(avg(bn_and_pad(avg_conv(x)))) + bn2(conv2(bn_and_pad(conv1(x))))``."""
        k, p, g = self.kernel_size, self.padding, self.groups

        def avg_branch() -> str:
            if self.avg_conv is None:      # depthwise layout: pool the input itself
                h = d.avg_pool(x, f"{prefix}avg.avg.", kernel_size=k, stride=self.stride, padding=p)
            else:
                h = self.avg_conv.conv.describe(d, x, f"{prefix}avg.conv.")
                h = self._bn_and_pad(d, h, self.avg_conv.bn, f"{prefix}avg.bn.")
                h = d.avg_pool(h, f"{prefix}avg.avg.", kernel_size=k, stride=self.stride, padding=0)
            return self.avg_bn.describe(d, h, f"{prefix}avg.avgbn.")

        def seq_branch() -> str:
            seq = f"{prefix}seq."
            if self.seq_identity_based:
                # IdentityBasedConv1x1 stores a delta; the kernel it applies is delta + I.
                delta = d.param(f"{seq}idconv1.weight", self.seq_conv1.weight)
                eye = fusion.identity_kernel(self.in_channels, groups=g, dtype=self.seq_conv1.weight.dtype)
                kernel = d.node("Add", [delta, d.const(eye, f"{seq}idconv1.", "identity")], f"{seq}idconv1.")
            else:
                kernel = d.param(f"{seq}conv1.weight", self.seq_conv1.weight)
            h = d.conv(x, kernel, None, f"{seq}conv1.", kernel_shape=(1, 1), groups=g)
            h = self._bn_and_pad(d, h, self.seq_bn1, f"{seq}bn1.")
            h = self.seq_conv2.describe(d, h, f"{seq}conv2.")
            return self.seq_bn2.describe(d, h, f"{seq}bn2.")

        branches = [lambda: self.origin.describe(d, x, f"{prefix}origin.")]
        if self.one is not None:
            branches.append(lambda: self.one.describe(d, x, f"{prefix}one."))
        return d.sum(branches + [avg_branch, seq_branch], prefix)

    # -- the algebra -----------------------------------------------------------
    def branch_kernels(self) -> list[fusion.KernelBias]:
        """Each branch as one KxK conv on the block input (padding K//2), in forward order."""
        k, g, o = self.kernel_size, self.groups, self.out_channels
        dtype = self.origin.conv.weight.dtype
        out = [self.origin.fused()]
        if self.one is not None:
            w1, b1 = self.one.fused()
            out.append(fusion.KernelBias(fusion.pad_kernel(w1, k), b1))
        pool = self.avg_bn.fold(fusion.avgpool_kernel(o, k, groups=g, dtype=dtype))
        out.append(pool if self.avg_conv is None
                   else fusion.merge_sequential(self.avg_conv.fused(), pool, groups=g))
        first = self.seq_bn1.fold(self.seq_kernel1)
        second = self.seq_bn2.fold(self.seq_conv2.weight)
        out.append(fusion.merge_sequential(first, second, groups=g))
        return out

    def reparameterize(self) -> Conv2d:
        """One KxK conv with bias: stride ``s``, padding ``K//2``, ``groups``."""
        kernel, bias = fusion.add_branches(*self.branch_kernels())
        return Conv2d(kernel, bias, stride=self.stride, padding=self.padding, groups=self.groups)

    @classmethod
    def from_params(cls, params, *, stride=1, groups: int | None = None, eps: float = 1e-5
                    ) -> "DiverseBranchBlock":
        """The inverse of :meth:`params`.

        Keys: ``origin.*``; ``one.*`` and ``avg.conv.weight`` + ``avg.bn.*`` (both present,
        or both absent: the depthwise layout); ``avg.avgbn.*``; ``seq.idconv1.weight``
        (identity-based 1x1, the weight a delta) or ``seq.conv1.weight``; ``seq.bn1.*``,
        ``seq.conv2.weight``, ``seq.bn2.*``. Padding is always ``K//2`` and there is no
        dilation (the official block's constraints). ``groups=None`` is read from the
        1x1 -> KxK pair: ``M / (M/groups)`` with ``M`` the intermediate width.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named), both or neither of the two 1x1 kernels.
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        identity_based = "seq.idconv1.weight" in params
        if identity_based == ("seq.conv1.weight" in params):
            raise ValueError("DiverseBranchBlock: exactly one of 'seq.idconv1.weight' and 'seq.conv1.weight' "
                             f"is needed, got keys {[k for k in params if k.startswith('seq.')]}")
        first = "seq.idconv1." if identity_based else "seq.conv1."
        expected = fp.conv_bn_keys(params, "origin.")
        if fp.has(params, "one."):
            expected += fp.conv_bn_keys(params, "one.")
        if fp.has(params, "avg.conv.") or fp.has(params, "avg.bn."):
            expected += fp.conv_bn_keys(params, "avg.")
        expected += fp.bn_keys("avg.avgbn.") + [f"{first}weight"] + fp.bn_keys("seq.bn1.")
        expected += ["seq.conv2.weight"] + fp.bn_keys("seq.bn2.")
        fp.check_keys(params, expected, what="DiverseBranchBlock")
        origin = fp.array(params, "origin.conv.weight", ndim=4)
        w1 = fp.array(params, f"{first}weight", ndim=4)
        w2 = fp.array(params, "seq.conv2.weight", ndim=4)
        k, m = origin.shape[2], w1.shape[0]
        if groups is None:
            if w1.shape[2:] != (1, 1) or w2.shape[0] != origin.shape[0] or w2.shape[1] < 1 or m % w2.shape[1]:
                raise ShapeError(f"{first}weight {w1.shape} then seq.conv2.weight {w2.shape} is not a 1x1 -> KxK "
                                 f"pair ending in the O = {origin.shape[0]} channels of origin.conv.weight")
            groups = m // w2.shape[1]
        common = dict(groups=groups, eps=eps)
        one = avg_conv = None
        if fp.has(params, "one."):
            one = fp.conv_bn_from(params, "one.", stride=stride, padding=0, **common)
        if fp.has(params, "avg.conv."):
            avg_conv = fp.conv_bn_from(params, "avg.", padding=0, **common)
        return cls(origin=fp.conv_bn_from(params, "origin.", stride=stride, padding=k // 2, **common),
                   one=one, avg_conv=avg_conv, avg_bn=fp.bn_from(params, "avg.avgbn.", eps=eps),
                   seq_conv1=fp.conv_from(params, first, padding=0, groups=groups),
                   seq_identity_based=identity_based, seq_bn1=fp.bn_from(params, "seq.bn1.", eps=eps),
                   seq_conv2=fp.conv_from(params, "seq.conv2.", stride=stride, padding=0, groups=groups),
                   seq_bn2=fp.bn_from(params, "seq.bn2.", eps=eps))
