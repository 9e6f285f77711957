"""MobileOne block and unit: k KxK conv-BN branches + 1x1 conv-BN scale + BN skip -> one conv.

Vasu et al., "MobileOne: An Improved One Millisecond Mobile Backbone", CVPR 2023
(arXiv 2206.04040), Fig. 3. The official code (apple/ml-mobileone,
``mobileone.py``, ``MobileOneBlock``) names the branches ``rbr_conv`` /
``conv``, ``rbr_scale`` / ``scale`` and ``rbr_skip`` / ``skip``; here they are
``conv_kxk.<i>``, ``conv_scale`` and ``skip``. The scale branch exists only when
K > 1 (for K = 1 it would duplicate a conv branch); the skip only when stride is
1 and ``C_in == C_out``. An optional squeeze-excite sits between the branch sum
and the ReLU (MobileOne-S4).

A MobileOne *unit* is a depthwise block (K = 3, groups = C) followed by a
pointwise block (K = 1): the MobileNet-V1 layout made re-parameterizable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion, ops
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, pair, random_bn
from repnp.blocks.common import (
    RELU,
    Activation,
    ConvAct,
    Sequential,
    as_activation,
    check_1x1_aligned,
    check_groups,
    check_odd_kernel,
    check_skip_geometry,
    resolve_skip,
    same_padding,
)
from repnp.blocks.se import SqueezeExcite
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["MobileOneBlock", "MobileOneIdentity", "MobileOneUnit"]


@dataclass(frozen=True, eq=False)
class MobileOneBlock(Described):
    """Train form of a MobileOne block.

    ``y = act(se(sum_i BN_i(conv_KxK_i(x)) + BN_s(conv_1x1(x)) + BN_skip(x)))``.

    Attributes
    ----------
    conv_kxk : tuple of ConvBN
        The k over-parameterized KxK branches (same stride, padding, dilation, groups).
    conv_scale : ConvBN or None
        1x1 branch, padding ``p - d*(K//2)``; None when K == 1 or not wanted.
    skip : BatchNorm or None
        BN on ``x`` (stride 1 and ``C_in == C_out`` only).
    se : SqueezeExcite or None
    activation : Activation
        A name given here is converted by :func:`repnp.blocks.common.as_activation`.

    Notes
    -----
    Deploy (:meth:`reparameterize`; MobileOne, Vasu et al., CVPR 2023; official
    ``mobileone.py``, ``MobileOneBlock.reparameterize`` and ``_get_kernel_bias``):
    as RepVGG with k KxK branches,

    .. math:: W = \\sum_{i=1}^{k} W_i' + \\mathrm{pad}_K(W_s') + W_{skip}', \\qquad
        b = \\sum_{i=1}^{k} b_i' + b_s' + b_{skip}'

    The SE gate (MobileOne-S4) stays after the fused conv: it is not linear in ``x``.
    """

    conv_kxk: tuple
    conv_scale: ConvBN | None = None
    skip: BatchNorm | None = None
    se: SqueezeExcite | None = None
    activation: Activation = RELU

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))
        object.__setattr__(self, "conv_kxk", tuple(self.conv_kxk))
        if not self.conv_kxk:
            raise ValueError("a MobileOne block needs at least one conv_kxk branch (num_branches >= 1)")
        first = self.conv_kxk[0].conv
        check_odd_kernel(first.weight.shape[2])
        for i, branch in enumerate(self.conv_kxk):
            c = branch.conv
            if (c.weight.shape != first.weight.shape or pair(c.stride) != pair(first.stride)
                    or ops.normalize_padding(c.padding) != ops.normalize_padding(first.padding)
                    or pair(c.dilation) != pair(first.dilation) or c.groups != first.groups):
                raise ShapeError(f"conv_kxk[{i}] (weight {c.weight.shape}) must have the geometry of "
                                 f"conv_kxk[0] (weight {first.weight.shape})")
        if self.conv_scale is not None:
            check_1x1_aligned(first, self.conv_scale.conv, name="conv_scale")
        if self.skip is not None:
            check_skip_geometry(first, name="skip")
            if self.skip.channels != self.out_channels:
                raise ShapeError(f"skip BN has {self.skip.channels} channels, block has {self.out_channels}")
        if self.se is not None and self.se.channels != self.out_channels:
            raise ShapeError(f"se has {self.se.channels} channels, block has {self.out_channels}")

    # -- configuration ---------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        c = self.conv_kxk[0].conv
        return int(c.weight.shape[1] * c.groups)

    @property
    def out_channels(self) -> int:
        return int(self.conv_kxk[0].conv.weight.shape[0])

    @property
    def kernel_size(self) -> int:
        return int(self.conv_kxk[0].conv.weight.shape[2])

    @property
    def stride(self):
        return self.conv_kxk[0].conv.stride

    @property
    def groups(self) -> int:
        return int(self.conv_kxk[0].conv.groups)

    @property
    def num_branches(self) -> int:
        return len(self.conv_kxk)

    @property
    def branches(self) -> tuple:
        """The summed branches, in the order they are computed and traced."""
        out = self.conv_kxk
        if self.conv_scale is not None:
            out = out + (self.conv_scale,)
        if self.skip is not None:
            out = out + (self.skip,)
        return out

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
               padding: int | None = None, dilation: int = 1, groups: int = 1, num_branches: int = 1,
               use_scale: bool | None = None, use_skip: bool | None = None, use_se: bool = False,
               activation: Activation | str = "relu", dtype=np.float64, eps: float = 1e-5
               ) -> "MobileOneBlock":
        """A block with conv weights N(0, 1/fan_in) and random BN statistics.

        ``use_scale`` defaults to ``kernel_size > 1``; ``use_skip`` to "when possible"
        (stride 1 and ``in_channels == out_channels``); asking for either where it
        is impossible raises ``ValueError``.
        """
        activation = as_activation(activation)
        k = check_odd_kernel(kernel_size)
        check_groups(in_channels, out_channels, groups)
        p = same_padding(k, dilation, padding)
        if int(num_branches) < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        if use_scale is None:
            use_scale = k > 1
        use_skip = resolve_skip(use_skip, name="use_skip", in_channels=in_channels,
                                out_channels=out_channels, stride=stride, padding=p, kernel_size=k,
                                dilation=dilation)
        rng = np.random.default_rng(seed)
        convs = tuple(ConvBN.random(rng, in_channels, out_channels, k, stride=stride, padding=p,
                                    dilation=dilation, groups=groups, eps=eps, dtype=dtype)
                      for _ in range(int(num_branches)))
        scale = (ConvBN.random(rng, in_channels, out_channels, 1, stride=stride,
                               padding=p - dilation * (k // 2), groups=groups, eps=eps, dtype=dtype)
                 if use_scale else None)
        skip = random_bn(rng, out_channels, eps=eps, dtype=dtype) if use_skip else None
        se = SqueezeExcite.random(rng, out_channels, dtype=dtype) if use_se else None
        return cls(convs, scale, skip, se, activation)

    # -- the one description of the train form ---------------------------------------------
    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``act(se(sum_i BN_i(conv_KxK_i(x)) + BN_s(conv_1x1(x)) + BN_skip(x)))``."""
        branches = [lambda i=i, b=b: b.describe(d, x, f"{prefix}conv_kxk.{i}.")
                    for i, b in enumerate(self.conv_kxk)]
        if self.conv_scale is not None:
            branches.append(lambda: self.conv_scale.describe(d, x, f"{prefix}conv_scale."))
        if self.skip is not None:
            branches.append(lambda: self.skip.describe(d, x, f"{prefix}skip."))
        y = d.sum(branches, prefix)
        if self.se is not None:
            y = self.se.describe(d, y, f"{prefix}se.")
        return self.activation.describe(d, y, prefix)

    # -- the algebra -----------------------------------------------------------------------
    def reparameterize(self) -> ConvAct:
        """One conv with bias (all branches summed), then SE (if any) and the activation.

        MobileOne (Vasu et al., CVPR 2023), Sec. 3.1: each conv-BN branch is folded
        (RepVGG eq. (3)), the 1x1 "scale" kernel is centred in the KxK one, the skip BN
        is an identity kernel with its BN folded in, and all kernels and biases add up.
        The SE after the sum is not linear in ``x`` and stays.
        """
        k = self.kernel_size
        branches = [b.bn.fold(b.conv.weight, b.conv.bias) for b in self.conv_kxk]
        if self.conv_scale is not None:
            scale = self.conv_scale.bn.fold(self.conv_scale.conv.weight, self.conv_scale.conv.bias)
            branches.append(fusion.KernelBias(fusion.pad_kernel(scale.kernel, k), scale.bias))
        if self.skip is not None:
            eye = fusion.identity_kernel(self.out_channels, groups=self.groups, kernel_size=k,
                                         dtype=branches[0].kernel.dtype)
            branches.append(self.skip.fold(eye))
        kernel, bias = fusion.add_branches(*branches)
        c = self.conv_kxk[0].conv
        conv = Conv2d(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                      groups=c.groups)
        return ConvAct(conv, self.activation, self.se)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int | None = None,
                    eps: float = 1e-5, activation: Activation | str = "relu") -> "MobileOneBlock":
        """The inverse of :meth:`params`: ``conv_kxk.<i>.*`` and, if present, ``conv_scale.*``,
        ``skip.*`` and ``se.*``.

        Keywords as :meth:`RepVGGBlock.from_params`: ``padding=None`` is the centred
        ``dilation * (K//2)``; ``groups=None`` is ``O / (C/groups)`` with a skip branch (it
        needs ``C_in == C_out``), else 1 (the fused kernel does not depend on it).

        Raises
        ------
        ValueError
            No ``conv_kxk.0.`` branch, missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        numbers = fp.indices(params, "conv_kxk.")
        if numbers != list(range(len(numbers))) or not numbers:
            raise ValueError(f"MobileOneBlock: the conv_kxk branches must be numbered 0, 1, ..., got {numbers}")
        expected = sum((fp.conv_bn_keys(params, f"conv_kxk.{n}.") for n in numbers), [])
        if fp.has(params, "conv_scale."):
            expected += fp.conv_bn_keys(params, "conv_scale.")
        if fp.has(params, "skip."):
            expected += fp.bn_keys("skip.")
        if fp.has(params, "se."):
            expected += [k for k in params if k.startswith("se.")]
        fp.check_keys(params, expected, what="MobileOneBlock")
        first = fp.array(params, "conv_kxk.0.conv.weight", ndim=4)
        o, i, k = first.shape[0], first.shape[1], first.shape[2]
        for n in numbers[1:]:
            w = fp.array(params, f"conv_kxk.{n}.conv.weight", ndim=4)
            if w.shape != first.shape:
                raise ShapeError(f"conv_kxk.{n}.conv.weight has shape {w.shape}, but conv_kxk.0.conv.weight "
                                 f"has {first.shape}: the KxK branches of one block need one shape")
        if "conv_scale.conv.weight" in params:
            w = fp.array(params, "conv_scale.conv.weight", ndim=4)
            if w.shape != (o, i, 1, 1):
                raise ShapeError(f"conv_scale.conv.weight has shape {w.shape}, but conv_kxk.0.conv.weight has "
                                 f"{first.shape}: the scale branch must be {(o, i, 1, 1)} to sit at the KxK centre")
        skip = fp.bn_from(params, "skip.", eps=eps) if fp.has(params, "skip.") else None
        if groups is None:
            groups = fp.groups_from_identity(skip, first.shape, name="skip", key="conv_kxk.0.conv.weight")
        p = fp.centred_padding((k, k), padding, dilation)
        geometry = dict(stride=stride, dilation=dilation, groups=groups, eps=eps)
        convs = tuple(fp.conv_bn_from(params, f"conv_kxk.{n}.", padding=p, **geometry) for n in numbers)
        scale = None
        if "conv_scale.conv.weight" in params:
            centre = pair(dilation, name="dilation")[0] * (k // 2)
            scale_padding = p - centre if isinstance(p, int) else tuple(v - centre for v in pair(p))
            scale = fp.conv_bn_from(params, "conv_scale.", padding=scale_padding, **geometry)
        se = SqueezeExcite.from_params(fp.sub(params, "se.")) if fp.has(params, "se.") else None
        return cls(convs, scale, skip, se, activation)


@dataclass(frozen=True, eq=False)
class MobileOneUnit(Described):
    """A depthwise MobileOne block (KxK, groups = C_in) then a pointwise one (1x1): ``pw(dw(x))``.

    The unit MobileOne stacks in every stage (apple/ml-mobileone, ``_make_stage``):
    the depthwise block carries the stride, the pointwise block changes the width.
    """

    dw: MobileOneBlock
    pw: MobileOneBlock

    def __post_init__(self) -> None:
        if self.dw.groups != self.dw.in_channels or self.dw.out_channels != self.dw.in_channels:
            raise ShapeError(f"dw must be depthwise (groups == in_channels == out_channels), got groups="
                             f"{self.dw.groups}, channels {self.dw.in_channels} -> {self.dw.out_channels}")
        if self.pw.kernel_size != 1 or self.pw.in_channels != self.dw.out_channels:
            raise ShapeError(f"pw must be a 1x1 block reading dw's {self.dw.out_channels} channels, got "
                             f"K={self.pw.kernel_size}, in_channels={self.pw.in_channels}")

    @property
    def in_channels(self) -> int:
        return self.dw.in_channels

    @property
    def out_channels(self) -> int:
        return self.pw.out_channels

    @property
    def stride(self):
        return self.dw.stride

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, stride: int = 1, kernel_size: int = 3,
               num_branches: int = 1, use_se: bool = False, activation: Activation | str = "relu",
               dtype=np.float64, eps: float = 1e-5) -> "MobileOneUnit":
        """A depthwise KxK block (stride, skip when possible) then a 1x1 block, both random."""
        rng = np.random.default_rng(seed)
        dw = MobileOneBlock.random(rng, in_channels, in_channels, kernel_size=kernel_size, stride=stride,
                                   groups=in_channels, num_branches=num_branches, use_se=use_se,
                                   activation=activation, dtype=dtype, eps=eps)
        pw = MobileOneBlock.random(rng, in_channels, out_channels, kernel_size=1, num_branches=num_branches,
                                   use_se=use_se, activation=activation, dtype=dtype, eps=eps)
        return cls(dw, pw)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return self.pw.describe(d, self.dw.describe(d, x, f"{prefix}dw."), f"{prefix}pw.")

    def reparameterize(self) -> Sequential:
        """Two convs (depthwise then pointwise), each with its activation: not merged across the ReLU."""
        return Sequential((self.dw.reparameterize(), self.pw.reparameterize()), ("dw", "pw"))

    @classmethod
    def from_params(cls, params, *, stride=1, eps: float = 1e-5,
                    activation: Activation | str = "relu") -> "MobileOneUnit":
        """The inverse of :meth:`params`: ``dw.*`` (depthwise, ``groups`` = its channels, carries
        ``stride``) and ``pw.*`` (1x1); see :meth:`MobileOneBlock.from_params`."""
        from repnp.blocks import fromparams as fp

        bad = [k for k in params if not k.startswith(("dw.", "pw."))]
        if bad:
            raise ValueError(f"MobileOneUnit: unexpected key(s) {bad}; expected dw.* and pw.*")
        dw_params = fp.sub(params, "dw.")
        if "conv_kxk.0.conv.weight" not in dw_params:
            raise ValueError("MobileOneUnit: missing key(s) ['dw.conv_kxk.0.conv.weight']")
        channels = int(np.shape(dw_params["conv_kxk.0.conv.weight"])[0])
        dw = MobileOneBlock.from_params(dw_params, stride=stride, groups=channels, eps=eps, activation=activation)
        pw = MobileOneBlock.from_params(fp.sub(params, "pw."), groups=1, eps=eps, activation=activation)
        return cls(dw, pw)



@dataclass(frozen=True, eq=False)
class MobileOneIdentity(Described):
    """A MobileOne block with no conv branch and no scale branch: its identity BN alone.

    timm's FastViT builds one (``MobileOneBlock(dim, dim, kernel_size, group_size=1,
    use_act=False, use_scale_branch=False, num_conv_branches=0)``, RepMixer's ``norm``);
    its ``reparameterize()`` writes the BN applied to the identity kernel of the block's
    own ``kernel_size``, depthwise (``group_size=1``): a (C, 1, K, K) kernel with
    ``t = gamma / sqrt(var + eps)`` at the centre tap and ``beta - mean * t`` as bias.

    Attributes
    ----------
    skip : BatchNorm
        The identity branch's BN (timm's ``identity``).
    kernel_size : int
        K of the deploy kernel (odd). A BN does not tell it; FastViT's is 3
        (``repmixer_kernel_size``).
    """

    skip: BatchNorm
    kernel_size: int = 3

    def __post_init__(self) -> None:
        k = self.kernel_size
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 or k % 2 == 0:
            raise ShapeError(f"MobileOneIdentity: kernel_size must be a positive odd int, got {k!r}")

    @property
    def in_channels(self) -> int:
        return self.skip.channels

    out_channels = in_channels

    @classmethod
    def random(cls, seed, channels: int, *, kernel_size: int = 3, eps: float = 1e-5,
               dtype=np.float64) -> "MobileOneIdentity":
        """Random BN statistics (:func:`repnp.blocks.base.random_bn`)."""
        return cls(random_bn(np.random.default_rng(seed), channels, eps=eps, dtype=dtype), kernel_size)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return self.skip.describe(d, x, f"{prefix}skip.")

    def reparameterize(self) -> Conv2d:
        """One depthwise KxK conv with bias (timm writes ``reparam_conv.weight`` / ``.bias``)."""
        c, k = self.skip.channels, int(self.kernel_size)
        kernel, bias = self.skip.as_identity_conv(groups=c, kernel_size=k)
        return Conv2d(kernel, bias, padding=k // 2, groups=c)

    @classmethod
    def from_params(cls, params, *, kernel_size: int = 3, eps: float = 1e-5) -> "MobileOneIdentity":
        """The inverse of :meth:`params`: ``skip.mean``, ``skip.var``, ``skip.gamma``, ``skip.beta``.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            BN arrays of different shapes, or a ``kernel_size`` that is not a positive odd int.
        """
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.bn_keys("skip."), what="MobileOneIdentity")
        return cls(fp.bn_from(params, "skip.", eps=eps), kernel_size)
