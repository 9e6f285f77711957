"""ShuffleNetV1 unit and the channel shuffle (Zhang et al., CVPR 2018, arXiv 1707.01083; Fig. 4 (c) of MobileNetV2).

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices" (CVPR 2018), Fig. 2 (b) and (c): 1x1 group conv-BN-ReLU,
channel shuffle, 3x3 depthwise conv-BN (stride 1 or 2, no ReLU after it), 1x1
group conv-BN; stride 1 adds the input, stride 2 concatenates the main branch
with a 3x3 average pooling (stride 2) of the input; then ReLU. The pointwise
group convs are what make the unit cheap: they divide the 1x1 MACs by ``g``,
and the shuffle lets information cross the groups.

Reference implementation consulted for facts (not code): megvii-model's
``ShuffleNet-Series/ShuffleNetV1/blocks.py`` (the authors' release). It pools
with ``AvgPool2d(3, stride=2, padding=1)`` (PyTorch's default
``count_include_pad=True``), uses ``mid_channels = out_channels // 4``, gives
the stride-2 main branch ``out - in`` channels, leaves the stage's first 1x1
ungrouped (``first_group``), and applies the shuffle *after* the depthwise conv
with the inverse permutation of the paper's. Since a depthwise conv acts per
channel, shuffling before it (the paper's Fig. 2, followed here) or after it
(megvii) are the same function up to renaming the depthwise channels; the
weights of one are a permutation of the other's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp.blocks.base import Conv2d, ConvBN, pair
from repnp.blocks.common import (
    RELU,
    check_odd_kernel,
    deploy_layer,
    layer_conv,
    layer_in_channels,
    layer_out_channels,
)
from repnp.blocks.separable import merge_separable_conv
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError
from repnp.ops import channel_shuffle, shuffle_permutation  # re-exported: the op lives in ops

__all__ = ["channel_shuffle", "shuffle_permutation", "ShuffleNetUnit"]


@dataclass(frozen=True, eq=False)
class ShuffleNetUnit(Described):
    """ShuffleNetV1 unit; train form (``ConvBN``) or deploy form (``Conv2d`` with bias).

    ``h = shuffle(relu(conv1(x)), groups)``, ``h = depthwise(h)``,
    ``y = conv2(h)``; stride 1: ``relu(x + y)``; stride 2:
    ``relu(concat(avgpool3x3_s2(x), y))``.

    ``conv1`` is a 1x1 conv with ``first_groups`` groups (1 for the first unit
    of stage 2, whose 24 input channels are too few to split, ShuffleNet
    Sec. 3.3), ``conv2`` a 1x1 conv with ``groups`` groups. In the merged
    deploy form (``reparameterize(merge_pointwise=True)``) ``depthwise`` is
    ``None`` and ``conv2`` is a KxK conv with ``groups`` groups (see
    :func:`repnp.blocks.separable.merge_depthwise_pointwise`): exact because the
    unit has no ReLU between the depthwise conv and ``conv2``, but it carries
    ``O*M*K*K/g`` weights instead of ``M*K*K + O*M/g``.

    The pool uses ``count_include_pad=True`` (the authors' PyTorch release);
    the ReLU after the concat leaves the pooled half unchanged when ``x >= 0``
    (the output of a previous unit), which is why that release can apply the
    ReLU to the main branch only.
    """

    conv1: ConvBN | Conv2d
    depthwise: ConvBN | Conv2d | None
    conv2: ConvBN | Conv2d
    groups: int

    def __post_init__(self) -> None:
        c1, c2 = layer_conv(self.conv1), layer_conv(self.conv2)
        m = c1.out_channels
        if c1.weight.shape[2:] != (1, 1):
            raise ShapeError(f"conv1.weight must be 1x1, got {c1.weight.shape}")
        if self.groups < 1 or m % self.groups:
            raise ShapeError(f"groups={self.groups} (the shuffle's) must divide conv1's {m} output channels")
        if self.depthwise is not None:
            dw = layer_conv(self.depthwise)
            if dw.out_channels != m or dw.groups != m or dw.weight.shape[1] != 1:
                raise ShapeError(f"depthwise.weight {dw.weight.shape} (groups={dw.groups}) must be depthwise "
                                 f"on the {m} channels of conv1")
            if c2.weight.shape[2:] != (1, 1):
                raise ShapeError(f"conv2.weight must be 1x1, got {c2.weight.shape}")
        if c2.groups != self.groups or layer_in_channels(self.conv2) != m:
            raise ShapeError(f"conv2.weight {c2.weight.shape} (groups={c2.groups}) must read the {m} channels "
                             f"with groups={self.groups}")
        stride = self.stride
        if stride == 1 and c2.out_channels != self.in_channels:
            raise ShapeError(f"stride 1 adds the input: conv2 must give in_channels = {self.in_channels} "
                             f"channels, got {c2.out_channels}")

    @property
    def stride(self) -> int:
        s = layer_conv(self.depthwise if self.depthwise is not None else self.conv2).stride
        sh, sw = pair(s, name="stride")
        if sh != sw or sh not in (1, 2):
            raise ValueError(f"ShuffleNet units have stride 1 or 2, got {s}")
        return int(sh)

    @property
    def in_channels(self) -> int:
        return layer_in_channels(self.conv1)

    @property
    def bottleneck_channels(self) -> int:
        return layer_out_channels(self.conv1)

    @property
    def out_channels(self) -> int:
        main = layer_out_channels(self.conv2)
        return main if self.stride == 1 else main + self.in_channels

    @classmethod
    def from_params(cls, params, *, groups: int, first_groups: int | None = None, stride=1,
                    eps: float = 1e-5) -> "ShuffleNetUnit":
        """The inverse of :meth:`params`: ``conv1.*`` (1x1), ``depthwise.*`` (KxK, padding ``K//2``,
        ``stride``; absent in the merged deploy form, whose ``conv2`` is then KxK with the
        stride) and ``conv2.*``, each a conv-BN or a conv with bias.

        ``groups`` (the shuffle's and ``conv2``'s) cannot be read from the arrays: a keyword;
        ``first_groups`` (``conv1``'s) defaults to ``groups``.
        """
        from repnp.blocks import fromparams as fp

        has_dw = fp.has(params, "depthwise.")
        expected = fp.layer_keys(params, "conv1.") + (fp.layer_keys(params, "depthwise.") if has_dw else [])
        fp.check_keys(params, expected + fp.layer_keys(params, "conv2."), what="ShuffleNetUnit")
        g1 = groups if first_groups is None else first_groups
        conv1 = fp.layer_from(params, "conv1.", padding=0, groups=g1, eps=eps)
        if not has_dw:
            return cls(conv1, None, fp.layer_from(params, "conv2.", stride=stride, groups=groups, eps=eps), groups)
        dw_key = "depthwise.conv.weight" if fp.has(params, "depthwise.bn.") else "depthwise.weight"
        m = int(fp.array(params, dw_key, ndim=4).shape[0])
        depthwise = fp.layer_from(params, "depthwise.", stride=stride, groups=m, eps=eps)
        return cls(conv1, depthwise, fp.layer_from(params, "conv2.", padding=0, groups=groups, eps=eps), groups)

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, groups: int = 3, stride: int = 1,
               first_groups: int | None = None, bottleneck_channels: int | None = None,
               kernel_size: int = 3, dtype=np.float64, eps: float = 1e-5) -> "ShuffleNetUnit":
        """N(0, 1/fan_in) weights, random BN statistics.

        ``bottleneck_channels`` defaults to ``out_channels // 4`` (ShuffleNet
        Sec. 3.3); with stride 2 the main branch gives ``out_channels -
        in_channels`` channels, concatenated after the pooled input.
        """
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        k = check_odd_kernel(kernel_size)
        first_groups = groups if first_groups is None else int(first_groups)
        m = out_channels // 4 if bottleneck_channels is None else int(bottleneck_channels)
        main = out_channels if stride == 1 else out_channels - in_channels
        if stride == 1 and in_channels != out_channels:
            raise ShapeError(f"stride 1 adds the input: in_channels={in_channels} must equal "
                             f"out_channels={out_channels}")
        if m < 1 or main < 1:
            raise ShapeError(f"in_channels={in_channels}, out_channels={out_channels}, stride={stride} give "
                             f"{m} bottleneck and {main} main-branch channels; both must be >= 1")
        for name, value, g in (("in_channels", in_channels, first_groups), ("bottleneck_channels", m, groups),
                               ("main-branch channels", main, groups)):
            if value % g:
                raise ShapeError(f"{name} = {value} is not divisible by its conv's groups = {g}")
        rng = np.random.default_rng(seed)
        conv1 = ConvBN.random(rng, in_channels, m, 1, groups=first_groups, eps=eps, dtype=dtype)
        dw = ConvBN.random(rng, m, m, k, stride=stride, padding=k // 2, groups=m, eps=eps, dtype=dtype)
        conv2 = ConvBN.random(rng, m, main, 1, groups=groups, eps=eps, dtype=dtype)
        return cls(conv1, dw, conv2, groups)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``relu(x + conv2(dw(shuffle(relu(conv1(x))))))``, or with stride 2
        ``relu(concat(avgpool3x3_s2(x), conv2(...)))``."""
        h = RELU.describe(d, self.conv1.describe(d, x, f"{prefix}conv1."), f"{prefix}conv1.")
        if self.groups > 1:  # a shuffle of one group is the identity; exporters emit nothing
            # A runtime launches Reshape (5-D), Transpose, Reshape back for it.
            h = d.node("ChannelShuffle", [h], f"{prefix}shuffle.", groups=self.groups)
        if self.depthwise is not None:
            h = self.depthwise.describe(d, h, f"{prefix}depthwise.")
        y = self.conv2.describe(d, h, f"{prefix}conv2.")
        if self.stride == 1:
            y = d.add(x, y, prefix)
        else:
            pooled = d.avg_pool(x, f"{prefix}pool.", kernel_size=3, stride=2, padding=1)
            y = d.node("Concat", [pooled, y], prefix, axis=1)
        return RELU.describe(d, y, prefix)

    def reparameterize(self, *, merge_pointwise: bool = False) -> "ShuffleNetUnit":
        """Fold every BN (rule 1); with ``merge_pointwise`` also merge depthwise -> conv2 (grouped KxK)."""
        if merge_pointwise and self.depthwise is not None:
            return ShuffleNetUnit(deploy_layer(self.conv1), None, merge_separable_conv(self.depthwise, self.conv2),
                                  self.groups)
        return ShuffleNetUnit(deploy_layer(self.conv1), deploy_layer(self.depthwise), deploy_layer(self.conv2),
                              self.groups)
