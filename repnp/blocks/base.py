"""Building pieces shared by every block family: a conv, a BN, a conv-BN.

Blocks are frozen dataclasses of arrays and configuration (``eq=False``:
array ``==`` is element-wise, so a generated ``__eq__`` would be wrong). Each
block writes

* ``describe(d, x, prefix)`` — its train-form dataflow, once, as operator nodes
  over its own arrays (:mod:`repnp.dataflow`). From it the block gets
  ``forward(x)`` (inference semantics, BN with running statistics), ``trace(t, x)``
  (the cost model's op records) and ``params()`` (a flat ``{name: array}`` dict
  named as the block names them: golden files and porters use these names), and
  :func:`repnp.io.export_onnx` its ONNX graph;
* ``reparameterize()`` — a new deploy-form object, built by explicit calls into
  :mod:`repnp.fusion` (the family's algebra, readable top to bottom);
* a seeded random constructor (``random(...)``) that draws conv weights
  N(0, 1/fan_in) and random BN statistics (mean != 0, var != 1, gamma != 1,
  beta != 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion, ops
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError
from repnp.ops import pair

__all__ = ["Conv2d", "BatchNorm", "ConvBN", "random_conv_weight", "random_bn", "pair"]



def random_conv_weight(rng: np.random.Generator, out_channels: int, in_per_group: int,
                       kernel_size, *, dtype=np.float64) -> np.ndarray:
    """A conv kernel drawn N(0, 1/fan_in), ``fan_in = in_per_group * kh * kw``."""
    kh, kw = pair(kernel_size, name="kernel_size")
    fan_in = in_per_group * kh * kw
    return (rng.standard_normal((out_channels, in_per_group, kh, kw)) / np.sqrt(fan_in)).astype(dtype)


def random_bn(rng: np.random.Generator, channels: int, *, eps: float = 1e-5, dtype=np.float64) -> "BatchNorm":
    """A BN with random statistics: mean ~ N(0, 0.5), var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5)."""
    return BatchNorm(
        mean=(0.5 * rng.standard_normal(channels)).astype(dtype),
        var=rng.uniform(0.5, 2.0, channels).astype(dtype),
        gamma=rng.uniform(0.5, 1.5, channels).astype(dtype),
        beta=(0.5 * rng.standard_normal(channels)).astype(dtype),
        eps=eps,
    )


@dataclass(frozen=True, eq=False)
class BatchNorm(Described):
    """Inference BatchNorm over channel axis 1, with running statistics.

    Notes
    -----
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` per channel (inference
    BatchNorm, Ioffe & Szegedy, ICML 2015, with the running statistics; ``eps``
    is a parameter, see ``docs/sources.md``): an affine map ``y = t * x + c``,
    ``t = gamma / sqrt(var + eps)``, ``c = beta - mean * t``
    (:func:`repnp.fusion.bn_scale_shift`; RepVGG, Ding et al., CVPR 2021, eq. (3)).
    ``eps`` is this BN's own, never a hidden constant.
    """

    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float = 1e-5

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def check_input(self, x):
        x = np.asarray(x)
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ShapeError(f"x must have {self.channels} channels on axis 1, got shape {x.shape}")
        return (x,)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        # Parameters in the order params() has always listed them; ONNX's input order.
        mean, var = d.param(f"{prefix}mean", self.mean), d.param(f"{prefix}var", self.var)
        gamma, beta = d.param(f"{prefix}gamma", self.gamma), d.param(f"{prefix}beta", self.beta)
        return d.node("BatchNormalization", [x, gamma, beta, mean, var], prefix, epsilon=float(self.eps))

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """``(t, c)`` with ``BN(x) = t * x + c`` per channel (:func:`repnp.fusion.bn_scale_shift`)."""
        return fusion.bn_scale_shift(self.mean, self.var, self.gamma, self.beta, eps=self.eps)

    def fold(self, kernel: np.ndarray, bias: np.ndarray | None = None) -> fusion.KernelBias:
        """This BN after the conv ``(kernel, bias)``, as one conv (rule 1, :func:`repnp.fusion.fuse_bn`)."""
        return fusion.fuse_bn(kernel, bias, self.mean, self.var, self.gamma, self.beta, eps=self.eps)

    def as_identity_conv(self, *, groups: int = 1, kernel_size=1) -> fusion.KernelBias:
        """This BN applied to the identity: a conv kernel (rules 4 and 1)."""
        return self.fold(fusion.identity_kernel(self.channels, groups=groups, kernel_size=kernel_size,
                                                dtype=self.mean.dtype))

    @classmethod
    def from_params(cls, params, *, eps: float = 1e-5) -> "BatchNorm":
        """The inverse of :meth:`params`: keys ``mean, var, gamma, beta`` (all (C,)); ``eps`` is not stored."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.bn_keys(""), what="BatchNorm")
        return fp.bn_from(params, eps=eps)


@dataclass(frozen=True, eq=False)
class Conv2d(Described):
    """A plain convolution with optional bias (the deploy form of most blocks)."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: int | tuple[int, int] = 1
    padding: int | tuple = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1] * self.groups)

    def check_input(self, x):
        return (np.asarray(x),)       # repnp.ops.conv2d names the shapes that do not fit

    def output_shape(self, input_shape) -> tuple[int, int, int, int]:
        """The (N, O, H_out, W_out) this conv gives for an NCHW ``input_shape``."""
        n, c, h, w = input_shape
        kh, kw = self.weight.shape[2:]
        sh, sw = pair(self.stride, name="stride")
        dh, dw = pair(self.dilation, name="dilation")
        top, left, bottom, right = ops.normalize_padding(self.padding)
        return (n, self.out_channels,
                ops.conv_output_size(h, kh, stride=sh, pad_begin=top, pad_end=bottom, dilation=dh),
                ops.conv_output_size(w, kw, stride=sw, pad_begin=left, pad_end=right, dilation=dw))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        weight = d.param(f"{prefix}weight", self.weight)
        bias = None if self.bias is None else d.param(f"{prefix}bias", self.bias)
        return d.conv(x, weight, bias, prefix, kernel_shape=self.weight.shape[2:], stride=self.stride,
                      padding=self.padding, dilation=self.dilation, groups=self.groups)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=0, dilation=1, groups: int = 1) -> "Conv2d":
        """The inverse of :meth:`params`: ``weight`` (OIHW) and an optional ``bias``.

        The geometry is not in the arrays: keywords, defaults those of the constructor
        (``padding=None`` means the centred ``dilation * (K//2)``).
        """
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.conv_keys(params, ""), what="Conv2d")
        return fp.conv_from(params, stride=stride, padding=padding, dilation=dilation, groups=groups)


@dataclass(frozen=True, eq=False)
class ConvBN(Described):
    """A convolution (usually without bias) followed by an inference BatchNorm.

    Notes
    -----
    Deploy form (rule 1; RepVGG, Ding et al., CVPR 2021, eq. (3); DBB transform I): with
    ``t = gamma / sqrt(var + eps)``, ``BN(W * x + b)`` is the conv
    ``W' = W * t[:, None, None, None]``, ``b' = beta + (b - mean) * t``
    (:meth:`BatchNorm.fold`).
    """

    conv: Conv2d
    bn: BatchNorm

    def __post_init__(self) -> None:
        if self.bn.channels != self.conv.out_channels:
            raise ShapeError(
                f"bn has {self.bn.channels} channels but conv.weight {self.conv.weight.shape} "
                f"has {self.conv.out_channels} output channels"
            )

    @classmethod
    def random(cls, rng: np.random.Generator, in_channels: int, out_channels: int, kernel_size, *,
               stride=1, padding=0, dilation=1, groups: int = 1, eps: float = 1e-5,
               dtype=np.float64) -> "ConvBN":
        """A conv (no bias) drawn N(0, 1/fan_in) and a BN with random statistics, both from ``rng``."""
        if in_channels % groups or out_channels % groups:
            raise ShapeError(
                f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        weight = random_conv_weight(rng, out_channels, in_channels // groups, kernel_size, dtype=dtype)
        conv = Conv2d(weight, None, stride=stride, padding=padding, dilation=dilation, groups=groups)
        return cls(conv, random_bn(rng, out_channels, eps=eps, dtype=dtype))

    def check_input(self, x):
        return self.conv.check_input(x)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return self.bn.describe(d, self.conv.describe(d, x, f"{prefix}conv."), f"{prefix}bn.")

    def fused(self) -> fusion.KernelBias:
        """Rule 1: the conv with the BN folded in."""
        return self.bn.fold(self.conv.weight, self.conv.bias)

    def reparameterize(self) -> Conv2d:
        kernel, bias = self.fused()
        c = self.conv
        return Conv2d(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int = 1,
                    eps: float = 1e-5) -> "ConvBN":
        """The inverse of :meth:`params`: ``conv.weight`` [``conv.bias``], ``bn.mean, var, gamma, beta``.

        ``padding=None`` is the centred ``dilation * (K//2)``; the geometry and ``eps`` are
        keywords (not in the arrays).
        """
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.conv_bn_keys(params, ""), what="ConvBN")
        return fp.conv_bn_from(params, stride=stride, padding=padding, dilation=dilation, groups=groups, eps=eps)

