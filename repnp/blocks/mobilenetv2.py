"""MobileNetV2 inverted residual: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR
2018 (arXiv 1801.04381), Table 1. The expansion is skipped when the expand ratio
is 1; the residual is added when stride is 1 and ``C_in == C_out`` (the "linear
bottleneck": no activation after the projection).

Re-parameterization folds each BN into its conv (rule 1) and nothing more:
the ReLU6 between the convs is not linear, so the three convs stay three
(merging a 1x1 into the next conv is only exact when nothing non-linear sits
between them; ``tests/test_blocks_mobilenetv2.py`` shows how wrong it is
across a ReLU6). The residual add stays too: folding it into the projection
would need the projection to read ``x``, which it does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp.blocks.base import Conv2d, ConvBN, pair
from repnp.blocks.common import RELU6, deploy_layer, layer_conv, layer_in_channels, layer_out_channels
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["InvertedResidual"]


@dataclass(frozen=True, eq=False)
class InvertedResidual(Described):
    """MobileNetV2 block, train form (``ConvBN`` layers) or deploy form (``Conv2d`` with bias).

    ``h = relu6(expand(x))`` (skipped when ``expand`` is None),
    ``h = relu6(depthwise(h))``, ``y = project(h) (+ x when use_residual)``.
    :meth:`reparameterize` returns the same class with every ``ConvBN``
    folded into a ``Conv2d``: the structure (three convs, two ReLU6, the add)
    is unchanged.

    Notes
    -----
    Each ``BN(W * h)`` becomes the conv ``W' = t W``, ``b' = beta - mean t``
    with ``t = gamma / sqrt(var + eps)`` (rule 1, :meth:`repnp.blocks.base.ConvBN.reparameterize`).
    ``relu6(a + b) != relu6(a) + relu6(b)``, so no two convs merge across a
    ReLU6: the activations are what make the block non-linear (the projection
    is linear, MobileNetV2's "linear bottleneck").
    """

    expand: ConvBN | Conv2d | None
    depthwise: ConvBN | Conv2d
    project: ConvBN | Conv2d
    use_residual: bool = False

    def __post_init__(self) -> None:
        dw = layer_conv(self.depthwise)
        hidden = layer_out_channels(self.depthwise)
        if dw.groups != hidden or dw.weight.shape[1] != 1:
            raise ShapeError(f"depthwise must have groups == channels = {hidden}, got groups={dw.groups}, "
                             f"weight {dw.weight.shape}")
        if self.expand is not None and layer_out_channels(self.expand) != hidden:
            raise ShapeError(f"expand gives {layer_out_channels(self.expand)} channels, depthwise reads {hidden}")
        if layer_conv(self.project).weight.shape[1] != hidden:
            raise ShapeError(f"project.weight {layer_conv(self.project).weight.shape} must read {hidden} channels")
        if self.use_residual:
            if pair(dw.stride) != (1, 1) or self.in_channels != self.out_channels:
                raise ValueError(
                    f"a residual needs stride 1 and in_channels == out_channels, got stride={dw.stride}, "
                    f"in_channels={self.in_channels}, out_channels={self.out_channels}"
                )

    @property
    def in_channels(self) -> int:
        return layer_in_channels(self.expand if self.expand is not None else self.depthwise)

    @property
    def out_channels(self) -> int:
        return layer_out_channels(self.project)

    @property
    def hidden_channels(self) -> int:
        return layer_out_channels(self.depthwise)

    @property
    def stride(self):
        return layer_conv(self.depthwise).stride

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, stride: int = 1, expand_ratio: float = 6,
               dtype=np.float64, eps: float = 1e-5) -> "InvertedResidual":
        """A block with N(0, 1/fan_in) weights and random BN statistics.

        ``hidden = round(in_channels * expand_ratio)`` (torchvision's rule); the
        residual is used exactly when stride is 1 and ``in_channels == out_channels``.
        """
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2 (MobileNetV2), got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        if hidden < 1 or expand_ratio <= 0:
            raise ValueError(f"expand_ratio={expand_ratio} gives {hidden} hidden channels")
        rng = np.random.default_rng(seed)
        expand = (ConvBN.random(rng, in_channels, hidden, 1, eps=eps, dtype=dtype)
                  if expand_ratio != 1 else None)
        if expand is None and hidden != in_channels:
            raise ShapeError("expand_ratio 1 needs hidden == in_channels")
        depthwise = ConvBN.random(rng, hidden, hidden, 3, stride=stride, padding=1, groups=hidden,
                                  eps=eps, dtype=dtype)
        project = ConvBN.random(rng, hidden, out_channels, 1, eps=eps, dtype=dtype)
        return cls(expand, depthwise, project, stride == 1 and in_channels == out_channels)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``project(relu6(depthwise(relu6(expand(x))))) [+ x]``; the projection is linear."""
        h = x
        if self.expand is not None:
            h = RELU6.describe(d, self.expand.describe(d, h, f"{prefix}expand."), f"{prefix}expand.")
        h = RELU6.describe(d, self.depthwise.describe(d, h, f"{prefix}depthwise."), f"{prefix}depthwise.")
        y = self.project.describe(d, h, f"{prefix}project.")
        return d.add(y, x, prefix) if self.use_residual else y

    def reparameterize(self) -> "InvertedResidual":
        """Each conv-BN folded into one conv with bias; the three convs stay apart."""
        return InvertedResidual(deploy_layer(self.expand), deploy_layer(self.depthwise),
                                deploy_layer(self.project), self.use_residual)

    @classmethod
    def from_params(cls, params, *, stride=1, use_residual: bool | None = None,
                    eps: float = 1e-5) -> "InvertedResidual":
        """The inverse of :meth:`params`: ``expand.*`` (optional), ``depthwise.*``, ``project.*``,
        each a conv-BN (train form: ``<layer>.conv.*``, ``<layer>.bn.*``) or a conv with bias
        (deploy form: ``<layer>.weight``, ``.bias``).

        ``stride`` is the depthwise conv's (padding ``K//2``, ``groups`` = its channels);
        ``use_residual=None`` means "when possible" (stride 1, ``C_in == C_out``), as
        MobileNetV2 uses it.
        """
        from repnp.blocks import fromparams as fp

        has_expand = fp.has(params, "expand.")
        expected = (fp.layer_keys(params, "expand.") if has_expand else []) + fp.layer_keys(params, "depthwise.")
        fp.check_keys(params, expected + fp.layer_keys(params, "project."), what="InvertedResidual")
        dw_key = "depthwise.conv.weight" if fp.has(params, "depthwise.bn.") else "depthwise.weight"
        hidden = int(fp.array(params, dw_key, ndim=4).shape[0])
        expand = fp.layer_from(params, "expand.", padding=0, eps=eps) if has_expand else None
        depthwise = fp.layer_from(params, "depthwise.", stride=stride, groups=hidden, eps=eps)
        project = fp.layer_from(params, "project.", padding=0, eps=eps)
        if use_residual is None:
            c_in = layer_in_channels(expand if expand is not None else depthwise)
            use_residual = pair(stride) == (1, 1) and c_in == layer_out_channels(project)
        return cls(expand, depthwise, project, use_residual)
