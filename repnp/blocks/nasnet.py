"""NASNet-A normal cell (Zoph et al., CVPR 2018, arXiv 1707.07012; Fig. 4 (a) of MobileNetV2).

Zoph et al., "Learning Transferable Architectures for Scalable Image
Recognition" (CVPR 2018), Fig. 4 (left): the normal cell found by the
architecture search. Facts taken from the authors' TensorFlow release,
``tensorflow/models`` ``research/slim/nets/nasnet/nasnet_utils.py``
(``NasNetANormalCell``, ``NasNetABaseCell``), and checked against timm's
``timm/models/nasnet.py`` (``NormalCell``, ported from Cadene's
pretrained-models). Its cell-level names are ours (``conv_prev_1x1``,
``conv_1x1``, ``comb_iter_<k>_left/right``); inside a separable branch timm's
``separable_1.depthwise_conv2d``, ``separable_1.pointwise_conv2d``, ``bn_sep_1``
are ours ``separable_1.depthwise``, ``separable_1.pointwise.conv``,
``separable_1.pointwise.bn`` (and ``_2`` likewise); BN ``running_mean`` /
``running_var`` are ``mean`` / ``var``. The cell:

* inputs: ``h_i`` (``x``) and ``h_{i-1}`` (``x_prev``); ``h_i`` goes through
  ReLU -> 1x1 conv -> BN (``conv_1x1``); ``h_{i-1}`` too (``conv_prev_1x1``)
  when its channel count differs from the cell's ``F`` (TF's
  ``_reduce_prev_layer``; timm always has it). Both must have the cell's
  spatial size here: TF's factorized reduction of an ``h_{i-1}`` twice as
  large (the cell after a reduction cell) is not implemented. Note the
  argument order: ``forward(x_prev, x)`` here, ``forward(x, x_prev)`` in timm;
* operations ``['separable_5x5_2', 'separable_3x3_2', 'separable_5x5_2',
  'separable_3x3_2', 'avg_pool_3x3', 'none', 'avg_pool_3x3', 'avg_pool_3x3',
  'separable_3x3_2', 'none']`` on hidden states ``[0, 1, 1, 1, 0, 1, 1, 1, 0,
  0]`` (0 = projected ``h_i``, 1 = projected ``h_{i-1}``), pairs summed:

  - comb 0 = sep5x5(h) + sep3x3(h_prev)
  - comb 1 = sep5x5(h_prev) + sep3x3(h_prev)
  - comb 2 = avgpool3x3(h) + h_prev
  - comb 3 = avgpool3x3(h_prev) + avgpool3x3(h_prev)
  - comb 4 = sep3x3(h) + h

* output: the unused states concatenated, ``[h_prev, comb0, ..., comb4]``
  (``used_hiddenstates = [1, 0, 0, 0, 0, 0, 0]``): ``6 F`` channels;
* ``separable_KxK_2`` is twice ReLU -> depthwise KxK -> pointwise 1x1 -> BN
  (``_stacked_separable_conv``; slim's ``separable_conv2d`` has nothing
  between its depthwise and pointwise parts), convs without bias
  (``biases_initializer=None``), BN epsilon 1e-3 (``nasnet_*_arg_scope``);
* pooling is ``avg_pool2d(3, stride=1, padding='SAME')``: TensorFlow's SAME
  average pooling divides each window by the number of real pixels, i.e.
  ``count_include_pad=False`` (timm's port sets that too). At the borders that
  is not a convolution, so the pools do not fold (rule 6 needs
  ``count_include_pad=True``).

Drop-path is training-only and absent at inference.

What is folded, and what else could be: :meth:`NASNetNormalCell.reparameterize`
folds every BN into the conv before it (rule 1: the two 1x1 projections and the
pointwise conv of each of the ten separable convs). Further exact rewrites exist
but none pays:

* each separable conv's depthwise -> pointwise pair has no nonlinearity
  between, so it merges into one dense KxK conv
  (``reparameterize(merge_pointwise=True)``,
  :func:`repnp.blocks.separable.merge_depthwise_pointwise`): ``F*K^2 + F^2``
  weights become ``F^2 K^2`` and the MACs grow by ``K^2 F / (K^2 + F)`` -- the
  cost table in :mod:`repnp.efficient` shows it;
* the branches that share an input (comb 1 on ``h_prev``) cannot be summed into
  one conv: each starts with a ReLU and has a ReLU in the middle;
* comb 3 adds the same pooling of the same tensor twice: ``2 *
  avgpool(h_prev)`` is one pool and a scale, an exact common-subexpression
  rewrite that saves one pool and one Add but needs a Mul, unless the 2 is
  pushed into the next cell's 1x1 conv (``relu(2a) = 2 relu(a)``): that crosses
  the cell boundary, and the pool was cheap anyway;
* comb 2 and comb 4 add tensors computed from different inputs or through a
  ReLU, so no branch addition applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp.blocks.base import Conv2d, ConvBN, random_conv_weight
from repnp.blocks.common import (
    RELU,
    check_input,
    check_odd_kernel,
    deploy_layer,
    layer_conv,
    layer_in_channels,
    layer_out_channels,
)
from repnp.blocks.separable import merge_separable_conv
from repnp.dataflow import Dataflow, Described, trace_dataflow
from repnp.errors import ShapeError
from repnp.trace import TensorRef, Trace

__all__ = ["ReLUConvBN", "SeparableConv", "StackedSeparable", "NASNetNormalCell"]

#: The TF release's BN epsilon for NASNet (``nasnet_*_arg_scope(batch_norm_epsilon=1e-3)``).
NASNET_BN_EPS = 1e-3


@dataclass(frozen=True, eq=False)
class ReLUConvBN(Described):
    """``bn(conv(relu(x)))`` (timm's ``ActConvBn``): NASNet's 1x1 input projections."""

    conv: ConvBN | Conv2d

    @property
    def in_channels(self) -> int:
        return layer_in_channels(self.conv)

    @property
    def out_channels(self) -> int:
        return layer_out_channels(self.conv)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return self.conv.describe(d, RELU.describe(d, x, prefix), prefix)

    def reparameterize(self) -> "ReLUConvBN":
        return ReLUConvBN(deploy_layer(self.conv))

    @classmethod
    def from_params(cls, params, *, eps: float = NASNET_BN_EPS) -> "ReLUConvBN":
        """The inverse of :meth:`params`: a 1x1 conv-BN (``conv.*``, ``bn.*``) or conv with bias."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.layer_keys(params, ""), what="ReLUConvBN")
        return cls(fp.layer_from(params, "", padding=0, eps=eps))



@dataclass(frozen=True, eq=False)
class SeparableConv(Described):
    """``bn(pw(dw(relu(x))))``: one layer of NASNet's ``separable_KxK_2``.

    ``depthwise`` is a ``Conv2d`` without bias (groups = C), ``pointwise`` a
    1x1 ``ConvBN`` (train) or ``Conv2d`` with the BN folded (deploy). In the
    merged deploy form ``depthwise`` is ``None`` and ``pointwise`` is the dense
    KxK conv.
    """

    depthwise: Conv2d | None
    pointwise: ConvBN | Conv2d

    def __post_init__(self) -> None:
        if self.depthwise is not None:
            dw = self.depthwise
            c = dw.out_channels
            if dw.groups != c or dw.weight.shape[1] != 1:
                raise ShapeError(f"depthwise must have groups == channels = {c}, got groups={dw.groups}, "
                                 f"weight {dw.weight.shape}")
            if layer_conv(self.pointwise).weight.shape[2:] != (1, 1) or layer_in_channels(self.pointwise) != c:
                raise ShapeError(f"pointwise.weight {layer_conv(self.pointwise).weight.shape} must be 1x1 on the "
                                 f"{c} depthwise channels")

    @property
    def in_channels(self) -> int:
        return self.depthwise.out_channels if self.depthwise is not None else layer_in_channels(self.pointwise)

    @property
    def out_channels(self) -> int:
        return layer_out_channels(self.pointwise)

    @classmethod
    def random(cls, rng: np.random.Generator, in_channels: int, out_channels: int, kernel_size: int, *,
               stride: int = 1, eps: float = NASNET_BN_EPS, dtype=np.float64) -> "SeparableConv":
        """Depthwise KxK (padding K//2, no bias) and pointwise 1x1 conv-BN, drawn from ``rng``."""
        k = check_odd_kernel(kernel_size)
        dw = Conv2d(random_conv_weight(rng, in_channels, 1, k, dtype=dtype), None, stride=stride,
                    padding=k // 2, groups=in_channels)
        return cls(dw, ConvBN.random(rng, in_channels, out_channels, 1, eps=eps, dtype=dtype))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        h = RELU.describe(d, x, prefix)
        if self.depthwise is not None:
            h = self.depthwise.describe(d, h, f"{prefix}depthwise.")
        return self.pointwise.describe(d, h, f"{prefix}pointwise.")

    def reparameterize(self, *, merge_pointwise: bool = False) -> "SeparableConv":
        if merge_pointwise and self.depthwise is not None:
            return SeparableConv(None, merge_separable_conv(self.depthwise, self.pointwise))
        return SeparableConv(self.depthwise, deploy_layer(self.pointwise))

    @classmethod
    def from_params(cls, params, *, stride=1, eps: float = NASNET_BN_EPS) -> "SeparableConv":
        """The inverse of :meth:`params`: ``depthwise.weight`` (KxK, no bias, ``groups`` = its channels,
        padding ``K//2``, ``stride``; absent in the merged deploy form, whose ``pointwise`` is then
        the dense KxK conv) and ``pointwise.*`` (conv-BN or conv with bias)."""
        from repnp.blocks import fromparams as fp

        has_dw = fp.has(params, "depthwise.")
        expected = (fp.conv_keys(params, "depthwise.") if has_dw else []) + fp.layer_keys(params, "pointwise.")
        fp.check_keys(params, expected, what="SeparableConv")
        if not has_dw:
            return cls(None, fp.layer_from(params, "pointwise.", stride=stride, eps=eps))
        channels = int(fp.array(params, "depthwise.weight", ndim=4).shape[0])
        return cls(fp.conv_from(params, "depthwise.", stride=stride, groups=channels),
                   fp.layer_from(params, "pointwise.", padding=0, eps=eps))



@dataclass(frozen=True, eq=False)
class StackedSeparable(Described):
    """NASNet's ``separable_KxK_2``: two :class:`SeparableConv` layers (timm's ``BranchSeparables``)."""

    first: SeparableConv
    second: SeparableConv

    def __post_init__(self) -> None:
        if self.first.out_channels != self.second.in_channels:
            raise ShapeError(f"first gives {self.first.out_channels} channels, second reads "
                             f"{self.second.in_channels}")

    @property
    def in_channels(self) -> int:
        return self.first.in_channels

    @property
    def out_channels(self) -> int:
        return self.second.out_channels

    @classmethod
    def random(cls, rng: np.random.Generator, channels: int, kernel_size: int, *,
               eps: float = NASNET_BN_EPS, dtype=np.float64) -> "StackedSeparable":
        """Two random :class:`SeparableConv` layers, ``channels -> channels``."""
        return cls(SeparableConv.random(rng, channels, channels, kernel_size, eps=eps, dtype=dtype),
                   SeparableConv.random(rng, channels, channels, kernel_size, eps=eps, dtype=dtype))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return self.second.describe(d, self.first.describe(d, x, f"{prefix}separable_1."), f"{prefix}separable_2.")

    def reparameterize(self, *, merge_pointwise: bool = False) -> "StackedSeparable":
        return StackedSeparable(self.first.reparameterize(merge_pointwise=merge_pointwise),
                                self.second.reparameterize(merge_pointwise=merge_pointwise))

    @classmethod
    def from_params(cls, params, *, eps: float = NASNET_BN_EPS) -> "StackedSeparable":
        """The inverse of :meth:`params`: ``separable_1.*`` and ``separable_2.*``
        (:meth:`SeparableConv.from_params`)."""
        from repnp.blocks import fromparams as fp

        stray = [k for k in params if not k.startswith(("separable_1.", "separable_2."))]
        if stray:
            raise ValueError(f"StackedSeparable: unexpected key(s) {stray}; expected separable_1.*, separable_2.*")
        return cls(SeparableConv.from_params(fp.sub(params, "separable_1."), eps=eps),
                   SeparableConv.from_params(fp.sub(params, "separable_2."), eps=eps))



_SEPARABLES = ("comb_iter_0_left", "comb_iter_0_right", "comb_iter_1_left", "comb_iter_1_right",
               "comb_iter_4_left")


@dataclass(frozen=True, eq=False)
class NASNetNormalCell(Described):
    """NASNet-A normal cell: ``forward(x_prev, x)`` -> ``6 F`` channels (module docstring).

    ``conv_prev_1x1`` is ``None`` when ``h_{i-1}`` already has ``F`` channels
    (TF passes it through unchanged). ``count_include_pad=False`` is the TF
    original's pooling; ``True`` gives the variant some PyTorch ports use.
    """

    conv_prev_1x1: ReLUConvBN | None
    conv_1x1: ReLUConvBN
    comb_iter_0_left: StackedSeparable    # 5x5 on h
    comb_iter_0_right: StackedSeparable   # 3x3 on h_prev
    comb_iter_1_left: StackedSeparable    # 5x5 on h_prev
    comb_iter_1_right: StackedSeparable   # 3x3 on h_prev
    comb_iter_4_left: StackedSeparable    # 3x3 on h
    count_include_pad: bool = False

    def __post_init__(self) -> None:
        f = self.channels
        for name in _SEPARABLES:
            sep = getattr(self, name)
            if sep.in_channels != f or sep.out_channels != f:
                raise ShapeError(f"{name} maps {sep.in_channels} -> {sep.out_channels} channels; the cell "
                                 f"has F = {f}")
        if self.conv_prev_1x1 is not None and self.conv_prev_1x1.out_channels != f:
            raise ShapeError(f"conv_prev_1x1 gives {self.conv_prev_1x1.out_channels} channels, F = {f}")

    @property
    def channels(self) -> int:
        """F, the channels of every operation (the output has ``6 F``)."""
        return self.conv_1x1.out_channels

    @property
    def in_channels(self) -> int:
        return self.conv_1x1.in_channels

    @property
    def in_channels_prev(self) -> int:
        return self.channels if self.conv_prev_1x1 is None else self.conv_prev_1x1.in_channels

    @property
    def out_channels(self) -> int:
        return 6 * self.channels

    @classmethod
    def random(cls, seed, in_channels_prev: int, in_channels: int, channels: int, *,
               count_include_pad: bool = False, dtype=np.float64, eps: float = NASNET_BN_EPS
               ) -> "NASNetNormalCell":
        """N(0, 1/fan_in) weights, random BN statistics (eps 1e-3 as the TF release)."""
        rng = np.random.default_rng(seed)

        def project(c_in):
            return ReLUConvBN(ConvBN.random(rng, c_in, channels, 1, eps=eps, dtype=dtype))

        prev = None if in_channels_prev == channels else project(in_channels_prev)
        this = project(in_channels)
        kernels = dict(zip(_SEPARABLES, (5, 3, 5, 3, 3)))
        seps = {name: StackedSeparable.random(rng, channels, k, eps=eps, dtype=dtype)
                for name, k in kernels.items()}
        return cls(prev, this, **seps, count_include_pad=count_include_pad)

    num_inputs = 2

    def check_input(self, x_prev, x) -> tuple[np.ndarray, np.ndarray]:
        x = check_input(x, self.in_channels)
        x_prev = check_input(x_prev, self.in_channels_prev, name="x_prev")
        if x_prev.shape[0] != x.shape[0] or x_prev.shape[2:] != x.shape[2:]:
            raise ShapeError(f"x_prev {x_prev.shape} and x {x.shape} must share N, H, W (the factorized "
                             f"reduction of a larger h_(i-1) is not implemented)")
        return x_prev, x

    def describe(self, d: Dataflow, x_prev: str, x: str, prefix: str = "") -> str:
        """The five combinations in TF order (left, right, Add), then the Concat of the unused states."""
        hp = x_prev if self.conv_prev_1x1 is None else self.conv_prev_1x1.describe(d, x_prev,
                                                                                 f"{prefix}conv_prev_1x1.")
        h = self.conv_1x1.describe(d, x, f"{prefix}conv_1x1.")

        def sep(name: str, src: str) -> str:
            return getattr(self, name).describe(d, src, f"{prefix}{name}.")

        def pool(src: str, name: str) -> str:
            # TF's SAME average pooling divides by the real pixels: count_include_pad False
            return d.avg_pool(src, f"{prefix}{name}.", kernel_size=3, stride=1, padding=1,
                              count_include_pad=self.count_include_pad)

        comb0 = d.add(sep("comb_iter_0_left", h), sep("comb_iter_0_right", hp), f"{prefix}comb_iter_0.")
        comb1 = d.add(sep("comb_iter_1_left", hp), sep("comb_iter_1_right", hp), f"{prefix}comb_iter_1.")
        comb2 = d.add(pool(h, "comb_iter_2_left"), hp, f"{prefix}comb_iter_2.")
        # the published cell pools h_prev twice
        comb3 = d.add(pool(hp, "comb_iter_3_left"), pool(hp, "comb_iter_3_right"), f"{prefix}comb_iter_3.")
        comb4 = d.add(sep("comb_iter_4_left", h), h, f"{prefix}comb_iter_4.")
        return d.node("Concat", [hp, comb0, comb1, comb2, comb3, comb4], prefix, axis=1)

    def reparameterize(self, *, merge_pointwise: bool = False) -> "NASNetNormalCell":
        """Every BN folded (rule 1); ``merge_pointwise`` also merges each dw -> pw pair (dense KxK)."""
        seps = {name: getattr(self, name).reparameterize(merge_pointwise=merge_pointwise)
                for name in _SEPARABLES}
        prev = None if self.conv_prev_1x1 is None else self.conv_prev_1x1.reparameterize()
        return NASNetNormalCell(prev, self.conv_1x1.reparameterize(), **seps,
                                count_include_pad=self.count_include_pad)

    def trace(self, t: Trace, x_prev: TensorRef, x: TensorRef | None = None) -> TensorRef:
        """Record the cell reading ``x_prev`` (h_{i-1}) and ``x`` (h_i).

        With ``x`` omitted the one tensor feeds both inputs (so that a cost
        model that calls ``trace(t, input)`` can profile the cell; it then needs
        ``in_channels_prev == in_channels``).
        """
        if x is None:
            x = x_prev
        if x.shape[1] != self.in_channels or x_prev.shape[1] != self.in_channels_prev or \
                x_prev.shape[0] != x.shape[0] or x_prev.shape[2:] != x.shape[2:]:
            raise ShapeError(f"trace inputs x_prev {x_prev.shape} and x {x.shape} do not fit the cell "
                             f"(C_prev = {self.in_channels_prev}, C = {self.in_channels})")
        return trace_dataflow(self.dataflow, t, x_prev, x)

    @classmethod
    def from_params(cls, params, *, count_include_pad: bool = False, eps: float = NASNET_BN_EPS
                    ) -> "NASNetNormalCell":
        """The inverse of :meth:`params`: ``conv_prev_1x1.*`` (optional), ``conv_1x1.*`` and the five
        ``comb_iter_*`` stacked separables (:meth:`StackedSeparable.from_params`). The pooling
        mode ``count_include_pad`` is not in the arrays: a keyword."""
        from repnp.blocks import fromparams as fp

        heads = ("conv_prev_1x1.", "conv_1x1.") + tuple(f"{n}." for n in _SEPARABLES)
        stray = [k for k in params if not k.startswith(heads)]
        if stray:
            raise ValueError(f"NASNetNormalCell: unexpected key(s) {stray}; expected keys under {list(heads)}")
        prev = (ReLUConvBN.from_params(fp.sub(params, "conv_prev_1x1."), eps=eps)
                if fp.has(params, "conv_prev_1x1.") else None)
        seps = {name: StackedSeparable.from_params(fp.sub(params, f"{name}."), eps=eps) for name in _SEPARABLES}
        return cls(prev, ReLUConvBN.from_params(fp.sub(params, "conv_1x1."), eps=eps), **seps,
                   count_include_pad=count_include_pad)
