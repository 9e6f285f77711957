"""Squeeze-and-excitation: ``x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2)``.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018. MobileOne-S4 puts one
after the branch sum of its last blocks (apple/ml-mobileone, ``mobileone.py``,
``SEBlock``: reduction ratio 1/16, 1x1 convs with bias named ``reduce`` and
``expand``, ReLU between, sigmoid gate). The gate depends on a global average
of ``x``, so it is not a convolution of ``x``: re-parameterization keeps it as
it is, after the fused conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp.blocks.base import Conv2d, random_conv_weight
from repnp.blocks.common import RELU, SIGMOID
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["SqueezeExcite"]


@dataclass(frozen=True, eq=False)
class SqueezeExcite(Described):
    """Squeeze-and-excitation gate on channel axis 1.

    Attributes
    ----------
    reduce : Conv2d
        1x1 conv C -> R with bias.
    expand : Conv2d
        1x1 conv R -> C with bias.
    """

    reduce: Conv2d
    expand: Conv2d

    def __post_init__(self) -> None:
        r, e = self.reduce.weight.shape, self.expand.weight.shape
        if r[2:] != (1, 1) or e[2:] != (1, 1) or e[1] != r[0] or e[0] != r[1]:
            raise ShapeError(f"reduce {r} and expand {e} must be 1x1 kernels (R, C) and (C, R)")

    @property
    def channels(self) -> int:
        return int(self.expand.weight.shape[0])

    @classmethod
    def random(cls, seed, channels: int, *, rd_ratio: float = 0.0625, dtype=np.float64) -> "SqueezeExcite":
        """Weights N(0, 1/fan_in), biases N(0, 0.5^2); ``R = int(channels * rd_ratio)`` as MobileOne."""
        rd = int(channels * rd_ratio)
        if rd < 1:
            raise ValueError(f"channels * rd_ratio = {channels} * {rd_ratio} leaves no reduced channel")
        rng = np.random.default_rng(seed)
        reduce = Conv2d(random_conv_weight(rng, rd, channels, 1, dtype=dtype),
                        (0.5 * rng.standard_normal(rd)).astype(dtype))
        expand = Conv2d(random_conv_weight(rng, channels, rd, 1, dtype=dtype),
                        (0.5 * rng.standard_normal(channels)).astype(dtype))
        return cls(reduce, expand)

    @classmethod
    def from_params(cls, params) -> "SqueezeExcite":
        """The inverse of :meth:`params`: ``reduce.weight`` [``.bias``], ``expand.weight`` [``.bias``]."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.conv_keys(params, "reduce.") + fp.conv_keys(params, "expand."),
                      what="SqueezeExcite")
        return cls(fp.conv_from(params, "reduce.", padding=0), fp.conv_from(params, "expand.", padding=0))

    def gate(self, x: np.ndarray) -> np.ndarray:
        """The per-channel scale, shape (N, C, 1, 1)."""
        s = np.asarray(x).mean(axis=(2, 3), keepdims=True)
        return SIGMOID.forward(self.expand.forward(RELU.forward(self.reduce.forward(s))))

    @property
    def in_channels(self) -> int:
        return self.channels

    def reparameterize(self) -> "SqueezeExcite":
        return self

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        s = d.node("GlobalAveragePool", [x], prefix)
        s = RELU.describe(d, self.reduce.describe(d, s, f"{prefix}reduce."), f"{prefix}reduce.")
        s = SIGMOID.describe(d, self.expand.describe(d, s, f"{prefix}expand."), f"{prefix}expand.")
        return d.node("Mul", [x, s], prefix)
