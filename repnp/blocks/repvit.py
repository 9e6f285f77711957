"""RepViT (Wang et al., CVPR 2024, arXiv 2307.09283): the token mixer RepVggDw and the BN-Linear head.

As timm has them (``timm/models/repvit.py``, read at commit 1bcbc1c):

* ``RepVggDw``: ``BN(conv_KxK_dw(x) + conv_1x1_dw(x) + x)``, the KxK a depthwise conv-BN
  (``ConvNorm``), the 1x1 a depthwise conv *with bias* and no BN, one BN after the sum
  (``legacy=True``: the 1x1 is a conv-BN too and there is no BN after the sum);
* ``RepVitClassifier``: ``NormLinear`` heads, a BN over the pooled vector then a Linear;
  with distillation two of them on one input, averaged: ``(head(x) + head_dist(x)) / 2``.

Both re-parameterize into one layer, exactly: the token mixer into one depthwise KxK conv
with bias, the classifier into one Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, random_bn, random_conv_weight
from repnp.blocks.resrep import Linear as _FC
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["RepVggDw", "Linear", "NormLinear", "RepVitClassifier"]


@dataclass(frozen=True, eq=False)
class RepVggDw(Described):
    """Train form of RepViT's token mixer: ``BN(conv(x) + conv1(x) + x)``.

    Attributes
    ----------
    conv : ConvBN
        Depthwise (C, 1, K, K) conv-BN, K odd, padding ``K//2``.
    conv1 : Conv2d or ConvBN
        Depthwise 1x1 conv with bias (timm's default), or a conv-BN (``legacy``).
    bn : BatchNorm or None
        The BN after the sum (``None`` in the legacy form).

    Notes
    -----
    timm ``RepVggDw.fuse``: each conv-BN folded (rule 1), the 1x1 padded to KxK at the
    centre, the identity a one at the centre tap of each channel (rule 4), summed (rule 2),
    then the BN after the sum folded into the sum (rule 1 again):

    .. math:: W = t\\,(W_{K} + \\mathrm{pad}(W_1) + I), \\qquad b = \\beta + (b_K + b_1 - \\mu)\\,t
    """

    conv: ConvBN
    conv1: Conv2d | ConvBN
    bn: BatchNorm | None = None

    def __post_init__(self) -> None:
        w = self.conv.conv.weight
        c = w.shape[0]
        one = self.conv1.conv if isinstance(self.conv1, ConvBN) else self.conv1
        if w.shape[1] != 1 or one.weight.shape != (c, 1, 1, 1) or w.shape[2] % 2 == 0 or w.shape[3] % 2 == 0:
            raise ShapeError(f"RepVggDw: conv.weight {w.shape} must be depthwise (C, 1, K, K) with K odd and "
                             f"conv1.weight {one.weight.shape} depthwise 1x1 (C, 1, 1, 1)")
        if isinstance(self.conv1, Conv2d) and self.conv1.bias is None:
            raise ShapeError("RepVggDw: conv1 (no BN) must have a bias")
        if self.bn is not None and self.bn.channels != c:
            raise ShapeError(f"RepVggDw: bn has {self.bn.channels} channels, conv.weight {w.shape} has {c}")

    @property
    def in_channels(self) -> int:
        return int(self.conv.conv.weight.shape[0])

    out_channels = in_channels

    @classmethod
    def random(cls, seed, channels: int, *, kernel_size: int = 3, legacy: bool = False,
               eps: float = 1e-5, dtype=np.float64) -> "RepVggDw":
        """Weights N(0, 1/fan_in), random BN statistics, the 1x1's bias N(0, 0.5^2)."""
        rng = np.random.default_rng(seed)
        k = kernel_size
        conv = ConvBN.random(rng, channels, channels, k, padding=k // 2, groups=channels, eps=eps, dtype=dtype)
        if legacy:
            return cls(conv, ConvBN.random(rng, channels, channels, 1, groups=channels, eps=eps, dtype=dtype))
        w1 = random_conv_weight(rng, channels, 1, 1, dtype=dtype)
        conv1 = Conv2d(w1, (0.5 * rng.standard_normal(channels)).astype(dtype), groups=channels)
        return cls(conv, conv1, random_bn(rng, channels, eps=eps, dtype=dtype))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        y = d.sum([lambda: self.conv.describe(d, x, f"{prefix}conv."),
                   lambda: self.conv1.describe(d, x, f"{prefix}conv1."),
                   lambda: x], prefix)
        return y if self.bn is None else self.bn.describe(d, y, f"{prefix}bn.")

    def reparameterize(self) -> Conv2d:
        """One depthwise KxK conv with bias."""
        kernel = self.conv.conv.weight
        c, size = kernel.shape[0], kernel.shape[2:]
        one = self.conv1.fused() if isinstance(self.conv1, ConvBN) else (self.conv1.weight, self.conv1.bias)
        ident = fusion.identity_kernel(c, groups=c, kernel_size=size, dtype=kernel.dtype)
        total = fusion.add_branches(self.conv.fused(), one, (ident, None), kernel_size=size,
                                    dtype=None if self.bn is None else np.float64)
        if self.bn is not None:
            total = self.bn.fold(*total)
            total = (total[0].astype(kernel.dtype, copy=False), total[1].astype(kernel.dtype, copy=False))
        return Conv2d(total[0], total[1], padding=(size[0] // 2, size[1] // 2), groups=c)

    @classmethod
    def from_params(cls, params, *, eps: float = 1e-5) -> "RepVggDw":
        """The inverse of :meth:`params`: ``conv.conv.weight``, ``conv.bn.*``, ``conv1.weight`` and
        ``conv1.bias`` and ``bn.*``, or (legacy) ``conv1.conv.weight`` and ``conv1.bn.*`` without ``bn``.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Kernels that are not depthwise KxK / 1x1 of one channel count (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        legacy = fp.has(params, "conv1.conv.")
        expected = fp.conv_bn_keys(params, "conv.") + fp.layer_keys(params, "conv1.")
        expected += [] if legacy else fp.bn_keys("bn.")
        fp.check_keys(params, expected, what="RepVggDw")
        w = fp.array(params, "conv.conv.weight", ndim=4)
        c = w.shape[0]
        conv = fp.conv_bn_from(params, "conv.", groups=c, eps=eps) if w.shape[1] == 1 else None
        if conv is None:
            raise ShapeError(f"'conv.conv.weight' has shape {w.shape}: RepVggDw's conv is depthwise (C, 1, K, K)")
        conv1 = fp.layer_from(params, "conv1.", groups=c, eps=eps)
        bn = None if legacy else fp.bn_from(params, "bn.", eps=eps)
        return cls(conv, conv1, bn)


@dataclass(frozen=True, eq=False)
class Linear(_FC):
    """A fully connected layer on (N, C) vectors: ``x W^T + b`` (ONNX ``Gemm``, ``transB=1``).

    The repnp Linear (:class:`repnp.blocks.resrep.Linear`, whose ``from_params`` it inherits) with the
    input checked as a vector of ``in_features``; being one, it is what ``export_onnx`` exports as a
    Gemm on an (N, features) input (the deploy form of :class:`RepVitClassifier`).
    """

    weight: np.ndarray
    bias: np.ndarray | None = None

    def check_input(self, x):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ShapeError(f"x must be (N, {self.in_features}), got shape {x.shape}")
        return (x,)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        inputs = [x, d.param(f"{prefix}weight", self.weight)]
        if self.bias is not None:
            inputs.append(d.param(f"{prefix}bias", self.bias))
        return d.node("Gemm", inputs, prefix, transB=1)

    def reparameterize(self) -> "Linear":
        return self


@dataclass(frozen=True, eq=False)
class NormLinear(Described):
    """timm's ``NormLinear``: a BN over the vector's features, then a Linear (``bn``, ``l``)."""

    bn: BatchNorm
    l: Linear  # noqa: E741 - timm's name

    def __post_init__(self) -> None:
        if self.bn.channels != self.l.in_features:
            raise ShapeError(f"NormLinear: bn has {self.bn.channels} features, l.weight {self.l.weight.shape} "
                             f"reads {self.l.in_features}")

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return self.l.describe(d, self.bn.describe(d, x, f"{prefix}bn."), f"{prefix}l.")

    def fused(self) -> fusion.KernelBias:
        """``l(BN(x)) = (W t) x + (W c + b)``, ``BN(x) = t x + c``: the BN folded into the Linear's input side."""
        t, c = self.bn.scale_shift()
        w = np.asarray(self.l.weight, np.float64)
        bias = w @ c + (0.0 if self.l.bias is None else np.asarray(self.l.bias, np.float64))
        dtype = self.l.weight.dtype
        return fusion.KernelBias((w * t[None, :]).astype(dtype), bias.astype(dtype))


@dataclass(frozen=True, eq=False)
class RepVitClassifier(Described):
    """RepViT's classifier on the pooled vector: one ``NormLinear`` head, or two averaged (distillation).

    Notes
    -----
    timm ``RepVitClassifier.fuse``: each head's BN folded into its Linear, then with a
    distillation head the two Linears averaged, ``W = (W_1 + W_2) / 2``, ``b = (b_1 + b_2) / 2``
    (a sum of parallel linear maps on one input is one linear map).
    """

    head: NormLinear
    head_dist: NormLinear | None = None
    vector_input = True

    def __post_init__(self) -> None:
        if self.head_dist is not None and self.head_dist.l.weight.shape != self.head.l.weight.shape:
            raise ShapeError(f"RepVitClassifier: head.l.weight {self.head.l.weight.shape} and head_dist.l.weight "
                             f"{self.head_dist.l.weight.shape} differ")

    @property
    def in_features(self) -> int:
        return self.head.l.in_features

    #: The width of the vector it reads, under the name the conv blocks use for it.
    in_channels = in_features

    def check_input(self, x):
        return self.head.l.check_input(x)

    @classmethod
    def random(cls, seed, features: int, classes: int, *, distillation: bool = True, eps: float = 1e-5,
               dtype=np.float64) -> "RepVitClassifier":
        rng = np.random.default_rng(seed)

        def one():
            w = (rng.standard_normal((classes, features)) / np.sqrt(features)).astype(dtype)
            return NormLinear(random_bn(rng, features, eps=eps, dtype=dtype),
                              Linear(w, (0.1 * rng.standard_normal(classes)).astype(dtype)))

        return cls(one(), one() if distillation else None)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        y = self.head.describe(d, x, f"{prefix}head.")
        if self.head_dist is None:
            return y
        y = d.add(y, self.head_dist.describe(d, x, f"{prefix}head_dist."), prefix)
        return d.node("Mul", [y, d.const(np.asarray(0.5, y_dtype(self)), prefix, "half")], prefix)

    def reparameterize(self) -> Linear:
        """One Linear (``weight``, ``bias``)."""
        w, b = self.head.fused()
        if self.head_dist is not None:
            w2, b2 = self.head_dist.fused()
            dtype = w.dtype
            w = ((np.asarray(w, np.float64) + w2) / 2).astype(dtype)
            b = ((np.asarray(b, np.float64) + b2) / 2).astype(dtype)
        return Linear(w, b)

    @classmethod
    def from_params(cls, params, *, eps: float = 1e-5) -> "RepVitClassifier":
        """The inverse of :meth:`params`: ``head.bn.*``, ``head.l.weight`` [``head.l.bias``], and the
        same under ``head_dist.`` when there is a distillation head.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            A weight that is not (classes, features) or a BN of another width (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        names = ["head"] + (["head_dist"] if fp.has(params, "head_dist.") else [])
        expected = []
        for n in names:
            expected += fp.bn_keys(f"{n}.bn.") + fp.conv_keys(params, f"{n}.l.")
        fp.check_keys(params, expected, what="RepVitClassifier")

        def build(n):
            w = fp.array(params, f"{n}.l.weight", ndim=2)
            bias = params.get(f"{n}.l.bias")
            if bias is not None and np.shape(bias) != (w.shape[0],):
                raise ShapeError(f"'{n}.l.bias' has shape {np.shape(bias)}, '{n}.l.weight' {w.shape} needs "
                                 f"({w.shape[0]},)")
            bn = fp.bn_from(params, f"{n}.bn.", eps=eps)
            if bn.channels != w.shape[1]:
                raise ShapeError(f"'{n}.bn.mean' has shape ({bn.channels},), '{n}.l.weight' {w.shape} reads "
                                 f"{w.shape[1]} features")
            return NormLinear(bn, Linear(w, None if bias is None else np.asarray(bias)))

        heads = [build(n) for n in names]
        return cls(heads[0], heads[1] if len(heads) > 1 else None)


def y_dtype(block: RepVitClassifier) -> np.dtype:
    return np.asarray(block.head.l.weight).dtype
