"""The separable-convolution lineage of MobileNetV2: (a) regular, (b) depthwise separable, (c) linear bottleneck.

Fig. 2 of Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks" (CVPR 2018) walks through it: (a) a regular 3x3 conv filters space
and mixes channels in one step; (b) MobileNetV1's depthwise separable conv
(Howard et al., 2017, Fig. 3 right: 3x3 depthwise-BN-ReLU, 1x1
pointwise-BN-ReLU) splits the two jobs; (c) puts the separable conv inside a
wide -> narrow -> wide bottleneck; (d) is MobileNetV2's inverted residual,
:class:`repnp.blocks.mobilenetv2.InvertedResidual`.

Re-parameterization of these blocks folds every conv-BN (rule 1,
:meth:`repnp.blocks.base.ConvBN.reparameterize`). The nonlinearities keep the
convs apart, except where a depthwise conv feeds a pointwise conv with nothing
non-linear between them (block (c) here, ShuffleNet's unit, NASNet's separable
convs): there :func:`merge_depthwise_pointwise` merges the pair exactly, but into
a dense KxK conv (grouped only as much as the pointwise was). The cost tables of
:mod:`repnp.efficient` show that this trades ``M*K*K + O*M/g`` weights for
``O*M*K*K/g`` and multiplies the MACs accordingly: exact, but a bad trade.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion
from repnp.blocks.base import Conv2d, ConvBN
from repnp.blocks.common import (
    RELU,
    RELU6,
    Activation,
    as_activation,
    check_odd_kernel,
    deploy_layer,
    layer_conv,
    layer_in_channels,
    layer_kernel_bias,
    layer_out_channels,
)
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["RegularConvBlock", "DepthwiseSeparableBlock", "LinearBottleneckBlock",
           "merge_depthwise_pointwise", "merge_separable_conv"]


def merge_depthwise_pointwise(depthwise, pointwise, *, groups: int = 1) -> fusion.KernelBias:
    """Merge a depthwise KxK conv and the (grouped) 1x1 conv after it into one grouped KxK conv.

    Parameters
    ----------
    depthwise : KernelBias or (kernel, bias)
        Kernel (M, 1, kh, kw): a depthwise conv (groups = M), any stride,
        padding, dilation (kept by the merged conv).
    pointwise : KernelBias or (kernel, bias)
        Kernel (O, M/groups, 1, 1): a 1x1 conv, stride 1, no padding, with
        ``groups`` groups (1: dense, as in MobileNet; g: ShuffleNet's GConv).
    groups : int, keyword-only
        The pointwise conv's groups; the merged conv has these groups.

    Returns
    -------
    KernelBias
        Kernel (O, M/groups, kh, kw) for a conv with ``groups`` groups and the
        depthwise conv's geometry; bias (O,).

    Raises
    ------
    ShapeError
        If ``depthwise`` is not (M, 1, kh, kw), or ``pointwise`` is not a 1x1
        kernel reading M/groups channels per group with ``groups`` dividing M
        and O.

    Notes
    -----
    :func:`repnp.fusion.merge_pointwise` with ``groups=M`` (depthwise) and
    ``second_groups=groups``: ``gcd(M, groups) = groups``, so the merged conv
    keeps the pointwise's groups,

    .. math::

        W[o, m', u, v] = Q[o, m']\\, D[G M_g + m', 0, u, v], \\qquad
        b[o] = \\sum_{m'} Q[o, m']\\, d[G M_g + m'] + q[o]

    with ``M_g = M / groups`` and ``G`` the group of output channel ``o``.
    Weights go from ``M*kh*kw + O*M/groups`` to ``O*M*kh*kw/groups`` and MACs
    grow by the same factor: the merge is exact but expensive. The separable
    factorisation is what makes these blocks cheap (MobileNetV1, Howard et al.
    2017, Sec. 3.1: about ``1/O + 1/(kh*kw)`` of a standard conv's MACs).
    """
    dk = np.asarray(depthwise[0])  # the kernel of a KernelBias or a (kernel, bias) pair
    if dk.ndim != 4 or dk.shape[1] != 1:
        raise ShapeError(f"depthwise.kernel must be (M, 1, kh, kw), got shape {dk.shape}")
    return fusion.merge_pointwise(depthwise, pointwise, groups=dk.shape[0], second_groups=groups)


def merge_separable_conv(depthwise, pointwise) -> Conv2d:
    """The deploy ``Conv2d`` of a depthwise layer then a pointwise layer (train or deploy form)."""
    dw, pw = layer_conv(depthwise), layer_conv(pointwise)
    kernel, bias = merge_depthwise_pointwise(layer_kernel_bias(depthwise), layer_kernel_bias(pointwise),
                                             groups=pw.groups)
    return Conv2d(kernel, bias, stride=dw.stride, padding=dw.padding, dilation=dw.dilation,
                  groups=pw.groups)


# ----------------------------------------------------------------------------
# (a) regular conv
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class RegularConvBlock(Described):
    """Block (a) of MobileNetV2's Fig. 2: a KxK conv-BN and an activation, ``act(bn(conv(x)))``.

    Filters space and mixes all channels in one step: ``H*W*C_in*C_out*K*K``
    MACs (the standard-conv cost of MobileNetV1, Howard et al. 2017, Sec. 3.1).
    Train form holds a ``ConvBN``; :meth:`reparameterize` returns the same
    class holding the folded ``Conv2d`` (rule 1).
    ``activation`` is an :class:`repnp.blocks.common.Activation`; a name given
    here or to :meth:`random` is converted (as in every block of this module).
    """

    conv: ConvBN | Conv2d
    activation: Activation = RELU

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))

    @property
    def in_channels(self) -> int:
        return layer_in_channels(self.conv)

    @property
    def out_channels(self) -> int:
        return layer_out_channels(self.conv)

    @property
    def stride(self):
        return layer_conv(self.conv).stride

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
               activation: Activation | str = "relu", dtype=np.float64, eps: float = 1e-5
               ) -> "RegularConvBlock":
        """N(0, 1/fan_in) weights, random BN statistics; padding ``K // 2``."""
        k = check_odd_kernel(kernel_size)
        rng = np.random.default_rng(seed)
        conv = ConvBN.random(rng, in_channels, out_channels, k, stride=stride, padding=k // 2,
                             eps=eps, dtype=dtype)
        return cls(conv, activation)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return self.activation.describe(d, self.conv.describe(d, x, f"{prefix}conv."), prefix)

    def reparameterize(self) -> "RegularConvBlock":
        return RegularConvBlock(deploy_layer(self.conv), self.activation)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, groups: int = 1, eps: float = 1e-5,
                    activation: Activation | str = "relu") -> "RegularConvBlock":
        """The inverse of :meth:`params`: ``conv.*``, a conv-BN (``conv.conv.*``, ``conv.bn.*``) or a
        conv with bias (``conv.weight``, ``conv.bias``); ``padding=None`` is ``K//2``."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.layer_keys(params, "conv."), what="RegularConvBlock")
        return cls(fp.layer_from(params, "conv.", stride=stride, padding=padding, groups=groups, eps=eps), activation)



# ----------------------------------------------------------------------------
# (b) depthwise separable (MobileNetV1)
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DepthwiseSeparableBlock(Described):
    """Block (b) of MobileNetV2's Fig. 2, MobileNetV1's separable conv: ``act(pw(act(dw(x))))``, BN after each conv.

    Howard et al., "MobileNets" (2017), Fig. 3 (right): 3x3 depthwise conv,
    BN, ReLU, then 1x1 conv, BN, ReLU. Its MACs are
    ``H*W*C*K*K + H*W*C*C_out``; divided by the regular conv's
    ``H*W*C*C_out*K*K`` that is ``1/C_out + 1/K^2`` (MobileNetV1, Sec. 3.1).

    Re-parameterization folds the two BNs; the activation between the convs
    keeps them apart (merging them would not be exact).
    """

    depthwise: ConvBN | Conv2d
    pointwise: ConvBN | Conv2d
    activation: Activation = RELU

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))
        dw = layer_conv(self.depthwise)
        c = dw.out_channels
        if dw.groups != c or dw.weight.shape[1] != 1:
            raise ShapeError(f"depthwise must have groups == channels = {c}, got groups={dw.groups}, "
                             f"weight {dw.weight.shape}")
        if layer_in_channels(self.pointwise) != c or layer_conv(self.pointwise).weight.shape[2:] != (1, 1):
            raise ShapeError(f"pointwise.weight {layer_conv(self.pointwise).weight.shape} must be 1x1 and read "
                             f"the {c} depthwise channels")

    @property
    def in_channels(self) -> int:
        return layer_out_channels(self.depthwise)

    @property
    def out_channels(self) -> int:
        return layer_out_channels(self.pointwise)

    @property
    def stride(self):
        return layer_conv(self.depthwise).stride

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
               activation: Activation | str = "relu", dtype=np.float64, eps: float = 1e-5
               ) -> "DepthwiseSeparableBlock":
        """N(0, 1/fan_in) weights, random BN statistics; depthwise padding ``K // 2``."""
        k = check_odd_kernel(kernel_size)
        rng = np.random.default_rng(seed)
        dw = ConvBN.random(rng, in_channels, in_channels, k, stride=stride, padding=k // 2,
                           groups=in_channels, eps=eps, dtype=dtype)
        pw = ConvBN.random(rng, in_channels, out_channels, 1, eps=eps, dtype=dtype)
        return cls(dw, pw, activation)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        act = self.activation
        h = act.describe(d, self.depthwise.describe(d, x, f"{prefix}depthwise."), f"{prefix}depthwise.")
        return act.describe(d, self.pointwise.describe(d, h, f"{prefix}pointwise."), f"{prefix}pointwise.")

    def reparameterize(self) -> "DepthwiseSeparableBlock":
        return DepthwiseSeparableBlock(deploy_layer(self.depthwise), deploy_layer(self.pointwise), self.activation)

    @classmethod
    def from_params(cls, params, *, stride=1, eps: float = 1e-5,
                    activation: Activation | str = "relu") -> "DepthwiseSeparableBlock":
        """The inverse of :meth:`params`: ``depthwise.*`` (KxK, ``groups`` = its channels, padding
        ``K//2``, ``stride``) and ``pointwise.*`` (1x1), each a conv-BN or a conv with bias."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.layer_keys(params, "depthwise.") + fp.layer_keys(params, "pointwise."),
                      what="DepthwiseSeparableBlock")
        dw_key = "depthwise.conv.weight" if fp.has(params, "depthwise.bn.") else "depthwise.weight"
        channels = int(fp.array(params, dw_key, ndim=4).shape[0])
        return cls(fp.layer_from(params, "depthwise.", stride=stride, groups=channels, eps=eps),
                   fp.layer_from(params, "pointwise.", padding=0, eps=eps), activation)



# ----------------------------------------------------------------------------
# (c) separable with linear bottleneck
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LinearBottleneckBlock(Described):
    """Block (c) of MobileNetV2's Fig. 2: wide -> narrow -> wide, ``expand(dw(act(reduce(x))))``, each conv with BN.

    1x1 reduce-BN-act (C_in -> M), KxK depthwise-BN on the narrow map (M, the
    stride sits here), 1x1 expand-BN (M -> C_out) with no activation after it.

    Where the nonlinearity is, and why. MobileNetV2's Fig. 2 hatches the
    layers that have no non-linearity and says in its caption that (c) and (d)
    "are equivalent blocks when stacked": the paper's point is that the layer
    whose output is the narrow bottleneck stays linear. Here (c) is read as
    reduce -> depthwise in the narrow map -> expand, and issue 8 fixes that
    structure and asks for no activation after the expand. We keep exactly one
    activation, after the reduce (ReLU6 by default, as MobileNetV2), and leave
    the depthwise and the expand linear; ShuffleNetV1's unit (Zhang et al.,
    CVPR 2018), itself a wide -> narrow -> wide bottleneck, places them the same
    way (no ReLU after its depthwise conv, citing Xception). A stack of these
    blocks therefore alternates act(reduce) with a linear dw -> expand pair:
    one activation per block, where (d) has two (after its expand and after
    its depthwise conv).

    Because nothing non-linear sits between the depthwise and the expand,
    ``reparameterize(merge_pointwise=True)`` merges them into one dense KxK
    conv (:func:`merge_depthwise_pointwise`); that deploy form has
    ``depthwise=None`` and ``expand`` is the KxK conv.
    """

    reduce: ConvBN | Conv2d
    depthwise: ConvBN | Conv2d | None
    expand: ConvBN | Conv2d
    activation: Activation = RELU6

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))
        if layer_conv(self.reduce).weight.shape[2:] != (1, 1):
            raise ShapeError(f"reduce.weight must be 1x1, got {layer_conv(self.reduce).weight.shape}")
        m = layer_out_channels(self.reduce)
        if self.depthwise is not None:
            dw = layer_conv(self.depthwise)
            if dw.out_channels != m or dw.groups != m or dw.weight.shape[1] != 1:
                raise ShapeError(f"depthwise.weight {dw.weight.shape} (groups={dw.groups}) must be depthwise "
                                 f"on the {m} channels of reduce")
            if layer_conv(self.expand).weight.shape[2:] != (1, 1):
                raise ShapeError(f"expand.weight must be 1x1, got {layer_conv(self.expand).weight.shape}")
        if layer_in_channels(self.expand) != m:
            raise ShapeError(f"expand.weight {layer_conv(self.expand).weight.shape} must read the {m} bottleneck "
                             f"channels")

    @property
    def in_channels(self) -> int:
        return layer_in_channels(self.reduce)

    @property
    def bottleneck_channels(self) -> int:
        return layer_out_channels(self.reduce)

    @property
    def out_channels(self) -> int:
        return layer_out_channels(self.expand)

    @property
    def stride(self):
        return layer_conv(self.depthwise if self.depthwise is not None else self.expand).stride

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, bottleneck_channels: int | None = None,
               kernel_size: int = 3, stride: int = 1, activation: Activation | str = "relu6",
               dtype=np.float64, eps: float = 1e-5) -> "LinearBottleneckBlock":
        """N(0, 1/fan_in) weights, random BN statistics.

        ``bottleneck_channels`` defaults to ``max(1, out_channels // 4)``, the
        ResNet / ShuffleNet bottleneck ratio.
        """
        k = check_odd_kernel(kernel_size)
        m = max(1, out_channels // 4) if bottleneck_channels is None else int(bottleneck_channels)
        if m < 1:
            raise ValueError(f"bottleneck_channels must be >= 1, got {bottleneck_channels}")
        rng = np.random.default_rng(seed)
        reduce = ConvBN.random(rng, in_channels, m, 1, eps=eps, dtype=dtype)
        dw = ConvBN.random(rng, m, m, k, stride=stride, padding=k // 2, groups=m, eps=eps, dtype=dtype)
        expand = ConvBN.random(rng, m, out_channels, 1, eps=eps, dtype=dtype)
        return cls(reduce, dw, expand, activation)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``expand(depthwise(act(reduce(x))))``: no activation after the depthwise or the expand."""
        h = self.activation.describe(d, self.reduce.describe(d, x, f"{prefix}reduce."), f"{prefix}reduce.")
        if self.depthwise is not None:
            h = self.depthwise.describe(d, h, f"{prefix}depthwise.")
        return self.expand.describe(d, h, f"{prefix}expand.")

    def reparameterize(self, *, merge_pointwise: bool = False) -> "LinearBottleneckBlock":
        """Fold every BN (rule 1); with ``merge_pointwise`` also merge depthwise -> expand (dense KxK)."""
        if merge_pointwise and self.depthwise is not None:
            merged = merge_separable_conv(self.depthwise, self.expand)
            return LinearBottleneckBlock(deploy_layer(self.reduce), None, merged, self.activation)
        return LinearBottleneckBlock(deploy_layer(self.reduce), deploy_layer(self.depthwise), deploy_layer(self.expand),
                                     self.activation)

    @classmethod
    def from_params(cls, params, *, stride=1, eps: float = 1e-5,
                    activation: Activation | str = "relu6") -> "LinearBottleneckBlock":
        """The inverse of :meth:`params`: ``reduce.*`` (1x1), ``depthwise.*`` (KxK, ``groups`` = its
        channels, padding ``K//2``, ``stride``; absent in the merged deploy form, whose
        ``expand`` is then the dense KxK conv carrying the stride) and ``expand.*``, each a
        conv-BN or a conv with bias."""
        from repnp.blocks import fromparams as fp

        has_dw = fp.has(params, "depthwise.")
        expected = fp.layer_keys(params, "reduce.") + (fp.layer_keys(params, "depthwise.") if has_dw else [])
        fp.check_keys(params, expected + fp.layer_keys(params, "expand."), what="LinearBottleneckBlock")
        reduce = fp.layer_from(params, "reduce.", padding=0, eps=eps)
        if not has_dw:
            return cls(reduce, None, fp.layer_from(params, "expand.", stride=stride, eps=eps), activation)
        dw_key = "depthwise.conv.weight" if fp.has(params, "depthwise.bn.") else "depthwise.weight"
        channels = int(fp.array(params, dw_key, ndim=4).shape[0])
        return cls(reduce, fp.layer_from(params, "depthwise.", stride=stride, groups=channels, eps=eps),
                   fp.layer_from(params, "expand.", padding=0, eps=eps), activation)
