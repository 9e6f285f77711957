"""QARepVGG (v1 and v2): RepVGG with one BN after the sum instead of one per branch.

Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024 (arXiv
2212.01593), Sec. 4 (the changes to RepVGG that keep the fused kernel's per-channel weight
ranges quantization-friendly). Official code: meituan/YOLOv6 ``yolov6/layers/common.py``
(commit e86a483), classes ``QARepVGGBlock`` and ``QARepVGGBlockV2``:

* ``rbr_dense``: the KxK conv-BN (a ``ConvModule``: ``.conv``, ``.bn``);
* ``rbr_1x1``: a plain 1x1 conv, no BN and no bias (the paper's change: the 1x1 BN goes);
* ``rbr_identity``: ``nn.Identity`` (no BN), when ``C_in == C_out`` and stride 1;
* v2 only, ``rbr_avg``: ``nn.AvgPool2d(K, stride, padding)`` (``count_include_pad=True``), on the
  same condition;
* ``bn``: one BN after the sum, then the activation (ReLU, ``RepVGGBlock.nonlinearity``).

The official ``switch_to_deploy`` keeps ``bn`` ("keep post bn for QAT"): its deploy form is
``act(bn(rbr_reparam(x)))``. :meth:`QARepVGGBlock.reparameterize` gives that form with
``keep_bn=True`` (what the ``.npz`` converter writes, so that the official deploy model loads
it) and one conv with the BN folded in otherwise (the inference form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, random_bn, random_conv_weight
from repnp.blocks.common import (
    RELU,
    Activation,
    ConvAct,
    as_activation,
    check_1x1_aligned,
    check_odd_kernel,
    check_skip_geometry,
    check_square_kernel,
)
from repnp.blocks.repvgg import KxkGeometry
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError
from repnp.ops import pair

__all__ = ["QARepVGGBlock", "ConvBNAct"]


@dataclass(frozen=True, eq=False)
class ConvBNAct(Described):
    """``act(bn(conv(x)))`` with a conv *with bias*: QARepVGG's official deploy form (``rbr_reparam``
    then the kept ``bn``). :meth:`reparameterize` folds the BN: one conv."""

    conv: Conv2d
    bn: BatchNorm
    activation: Activation = RELU

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))
        if self.bn.channels != self.conv.out_channels:
            raise ShapeError(f"ConvBNAct: bn has {self.bn.channels} channels, conv.weight {self.conv.weight.shape} "
                             f"has {self.conv.out_channels} output channels")

    def check_input(self, x):
        return self.conv.check_input(x)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        y = self.bn.describe(d, self.conv.describe(d, x, f"{prefix}conv."), f"{prefix}bn.")
        return self.activation.describe(d, y, prefix)

    def reparameterize(self) -> ConvAct:
        """Rule 1: the BN folded into the conv."""
        kernel, bias = self.bn.fold(self.conv.weight, self.conv.bias)
        c = self.conv
        return ConvAct(Conv2d(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                              groups=c.groups), self.activation)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int = 1, eps: float = 1e-5,
                    activation: Activation | str = "relu") -> "ConvBNAct":
        """The inverse of :meth:`params`: ``conv.weight`` [``conv.bias``] and ``bn.*``. ``padding=None``
        is the centred ``dilation * (K//2)``; geometry, ``eps`` and activation are keywords.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            A BN of another width than the conv's output (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.conv_bn_keys(params, ""), what="ConvBNAct")
        layer = fp.conv_bn_from(params, stride=stride, padding=padding, dilation=dilation, groups=groups, eps=eps)
        return cls(layer.conv, layer.bn, activation)


@dataclass(frozen=True, eq=False)
class QARepVGGBlock(KxkGeometry, Described):
    """Train form of a QARepVGG block (v1; v2 with ``avg=True``).

    ``y = act(BN(BN_k(conv_KxK(x)) + conv_1x1(x) [+ x] [+ avgpool_KxK(x)]))``.

    Attributes
    ----------
    conv_kxk : ConvBN
        KxK conv (stride s, padding p, groups g; dilation 1 as the official class builds it) and its BN.
    conv_1x1 : Conv2d
        1x1 conv without BN and without bias, same stride and groups, padding ``p - K//2``.
    bn : BatchNorm
        The BN after the sum.
    identity : bool
        ``rbr_identity`` (``nn.Identity``): needs ``C_in == C_out`` and stride 1.
    avg : bool
        v2's ``rbr_avg``: ``AvgPool2d(K, s, p)`` with ``count_include_pad=True``; needs ``C_in == C_out``.
    activation : Activation
        ReLU in YOLOv6.
    keep_bn : bool
        The deploy form :meth:`reparameterize` returns: ``True``, YOLOv6's (``rbr_reparam`` then
        ``bn``, :class:`ConvBNAct`); ``False``, one conv (:class:`~repnp.blocks.common.ConvAct`).

    Notes
    -----
    Deploy (YOLOv6 ``QARepVGGBlock.get_equivalent_kernel_bias``; RepVGG eq. (3) without the 1x1
    and identity BNs): the dense conv-BN folded (rule 1), the 1x1 centred in KxK (rule 3), the
    identity a centre one at ``[i, i mod C/g]`` (rule 4), the pooling ``1/K^2`` at ``[i, i mod
    C/g]`` (rule 6), summed (rule 2); the BN after the sum then folds into the sum (rule 1):

    .. math:: W = t\\,(W_K' + \\mathrm{pad}_K(W_1) + I + A), \\qquad b = \\beta + (b_K' - \\mu)\\,t,
              \\qquad t = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}
    """

    conv_kxk: ConvBN
    conv_1x1: Conv2d
    bn: BatchNorm
    identity: bool = False
    avg: bool = False
    activation: Activation = RELU
    keep_bn: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))
        k = self.conv_kxk.conv
        check_square_kernel(k.weight, name="conv_kxk.conv.weight")
        if self.conv_1x1.bias is not None:
            raise ShapeError("conv_1x1 of a QARepVGG block has no bias (YOLOv6: bias=False)")
        check_1x1_aligned(k, self.conv_1x1, name="conv_1x1")
        if self.bn.channels != self.out_channels:
            raise ShapeError(f"bn has {self.bn.channels} channels, conv_kxk.conv.weight {k.weight.shape} has "
                             f"{self.out_channels} output channels")
        if self.identity:
            check_skip_geometry(k, name="identity")
        if self.avg and self.in_channels != self.out_channels:
            raise ShapeError(f"avg: the pooling branch needs C_in == C_out, got {self.in_channels} -> "
                             f"{self.out_channels}")
        if self.avg and pair(k.dilation, name="dilation") != (1, 1):
            raise ShapeError(f"avg: the pooling branch needs dilation 1, got {k.dilation}")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
               groups: int = 1, version: int = 1, use_identity: bool | None = None,
               activation: Activation | str = "relu", keep_bn: bool = False, eps: float = 1e-5,
               dtype=np.float64) -> "QARepVGGBlock":
        """A block with conv weights N(0, 1/fan_in) and random BN statistics.

        ``use_identity`` (and, ``version=2``, the pooling branch) default to YOLOv6's rule:
        present when ``in_channels == out_channels`` and stride 1.
        """
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        rng = np.random.default_rng(seed)
        k = check_odd_kernel(kernel_size)
        possible = in_channels == out_channels and stride == 1
        identity = possible if use_identity is None else bool(use_identity)
        conv_kxk = ConvBN.random(rng, in_channels, out_channels, k, stride=stride, padding=k // 2, groups=groups,
                                 eps=eps, dtype=dtype)
        w1 = random_conv_weight(rng, out_channels, in_channels // groups, 1, dtype=dtype)
        conv_1x1 = Conv2d(w1, None, stride=stride, padding=0, groups=groups)
        return cls(conv_kxk, conv_1x1, random_bn(rng, out_channels, eps=eps, dtype=dtype), identity,
                   version == 2 and possible, activation, keep_bn)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``act(bn(conv_kxk(x) + conv_1x1(x) [+ x] [+ avgpool(x)]))``, summed in YOLOv6's order."""
        branches = [lambda: self.conv_kxk.describe(d, x, f"{prefix}conv_kxk."),
                    lambda: self.conv_1x1.describe(d, x, f"{prefix}conv_1x1.")]
        if self.identity:
            branches.append(lambda: x)
        if self.avg:
            c = self.conv_kxk.conv
            pad = pair(c.padding, name="padding")[0] if not isinstance(c.padding, int) else c.padding
            branches.append(lambda: d.avg_pool(x, f"{prefix}avg.", kernel_size=self.kernel_size,
                                               stride=c.stride, padding=pad))
        y = self.bn.describe(d, d.sum(branches, prefix), f"{prefix}bn.")
        return self.activation.describe(d, y, prefix)

    # -- the algebra -----------------------------------------------------------------------
    def fused_sum(self) -> fusion.KernelBias:
        """The sum of the branches as one KxK conv, before the BN (float64)."""
        k, g, c = self.kernel_size, self.groups, self.out_channels
        dense = self.conv_kxk.fused()
        branches = [dense, (self.conv_1x1.weight, None)]
        if self.identity:
            branches.append((fusion.identity_kernel(c, groups=g, kernel_size=k, dtype=np.float64), None))
        if self.avg:
            branches.append((fusion.avgpool_kernel(c, k, groups=g), None))
        return fusion.add_branches(*branches, kernel_size=k, dtype=np.float64)

    def reparameterize(self) -> ConvAct | ConvBNAct:
        """One KxK conv with bias then the activation; with ``keep_bn``, YOLOv6's deploy form
        (the same conv before the BN, then the BN, then the activation)."""
        kernel, bias = self.fused_sum()
        dtype = self.conv_kxk.conv.weight.dtype
        c = self.conv_kxk.conv
        geometry = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
        if self.keep_bn:
            conv = Conv2d(kernel.astype(dtype), bias.astype(dtype), **geometry)
            return ConvBNAct(conv, self.bn, self.activation)
        kernel, bias = self.bn.fold(kernel, bias)
        return ConvAct(Conv2d(kernel.astype(dtype), bias.astype(dtype), **geometry), self.activation)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, groups: int = 1, identity: bool | None = None,
                    avg: bool | None = None, version: int = 1, keep_bn: bool = False, eps: float = 1e-5,
                    activation: Activation | str = "relu") -> "QARepVGGBlock":
        """The inverse of :meth:`params`: ``conv_kxk.*``, ``conv_1x1.weight`` and ``bn.*``.

        Parameters
        ----------
        params : mapping of str to ndarray
        stride, padding, groups : keyword-only
            Of the KxK conv (``padding=None``: ``K//2``); the arrays do not tell them.
        identity, avg : bool or None, keyword-only
            The parameter-free branches; ``None`` is YOLOv6's rule: present when ``C_in ==
            C_out`` and stride 1 (``avg`` only with ``version=2``). A stride-2 block with
            ``C_in == C_out`` needs ``stride=2`` to be told.
        version : 1 or 2, keyword-only
            ``QARepVGGBlock`` or ``QARepVGGBlockV2`` (the same keys: a state dict does not tell).
        keep_bn, eps, activation : keyword-only

        Raises
        ------
        ValueError
            Missing or unexpected keys (named), a ``version`` other than 1 or 2.
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        expected = fp.conv_bn_keys(params, "conv_kxk.") + ["conv_1x1.weight"] + fp.bn_keys("bn.")
        fp.check_keys(params, expected, what="QARepVGGBlock")
        kxk = fp.array(params, "conv_kxk.conv.weight", ndim=4)
        one = fp.array(params, "conv_1x1.weight", ndim=4)
        o, i, k = kxk.shape[0], kxk.shape[1], kxk.shape[2]
        if one.shape != (o, i, 1, 1):
            raise ShapeError(f"conv_1x1.weight has shape {one.shape}, but conv_kxk.conv.weight has {kxk.shape}: "
                             f"the 1x1 branch must be {(o, i, 1, 1)} to sit at the KxK centre")
        possible = i * groups == o and pair(stride, name="stride") == (1, 1)
        p = fp.centred_padding((k, k), padding, 1)
        conv_kxk = fp.conv_bn_from(params, "conv_kxk.", stride=stride, padding=p, groups=groups, eps=eps)
        one_padding = p - k // 2 if isinstance(p, int) else tuple(v - k // 2 for v in pair(p))
        conv_1x1 = fp.conv_from(params, "conv_1x1.", stride=stride, padding=one_padding, groups=groups)
        bn = fp.bn_from(params, "bn.", eps=eps)
        identity = possible if identity is None else bool(identity)
        avg = (possible and version == 2) if avg is None else bool(avg)
        return cls(conv_kxk, conv_1x1, bn, identity, avg, activation, keep_bn)
