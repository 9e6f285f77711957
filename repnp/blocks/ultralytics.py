"""The two modules ultralytics' ``BaseModel.fuse()`` folds besides its Conv, RepConv and RepVGGDW.

* ``Conv2`` (ultralytics 8.4.190 ``ultralytics/nn/modules/conv.py`` ``Conv2``): a KxK conv and
  a 1x1 conv on the same input, same stride, groups and dilation, the 1x1 padded so that it
  sits at the KxK's centre tap (``autopad``), *summed before one BN*, then SiLU.
  ``Conv2.fuse_convs()`` adds the 1x1 weight into the centre of the KxK weight and deletes
  ``cv2``; ``fuse()`` (``ultralytics/nn/tasks.py`` ``BaseModel.fuse``) then folds the BN into
  the conv (``fuse_conv_and_bn``, ``ultralytics/utils/torch_utils.py``). Here
  :class:`ParallelConvBN`.
* ``ConvTranspose`` (same file, ``ConvTranspose``): ``nn.ConvTranspose2d`` (bias only without
  BN), BN, SiLU; ``fuse()`` folds the BN into the transposed conv (``fuse_deconv_and_bn``,
  ``ultralytics/utils/torch_utils.py``). Here :class:`ConvTransposeBN`, deploy form
  :class:`ConvTranspose2d`.

The activation after either does not change the fused weights and is not part of these blocks
(as for :class:`repnp.blocks.ConvBN`, ultralytics' ``Conv``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion
from repnp.blocks.base import BatchNorm, Conv2d, random_bn, random_conv_weight
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError
from repnp.ops import pair

__all__ = ["ConvTranspose2d", "ConvTransposeBN", "ParallelConvBN"]


# ----------------------------------------------------------------------------
# transposed convolution (+ BN)
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ConvTranspose2d(Described):
    """A transposed convolution with optional bias (:func:`repnp.ops.conv_transpose2d`).

    Attributes
    ----------
    weight : ndarray, shape (C_in, C_out / groups, kh, kw)
        PyTorch's ``ConvTranspose2d.weight`` layout (input channels first).
    bias : ndarray, shape (C_out,), or None
    stride, padding, output_padding, dilation, groups
        As :func:`repnp.ops.conv_transpose2d` (ONNX ``ConvTranspose``) takes them.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: int | tuple[int, int] = 1
    padding: int | tuple = 0
    output_padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1

    def __post_init__(self) -> None:
        w = self.weight
        if w.ndim != 4 or self.groups < 1 or w.shape[0] % self.groups:
            raise ShapeError(f"ConvTranspose2d: weight {w.shape} must be (C_in, C_out/groups, kh, kw) with C_in "
                             f"divisible by groups={self.groups}")
        if self.bias is not None and self.bias.shape != (self.out_channels,):
            raise ShapeError(f"ConvTranspose2d: bias {self.bias.shape} must be ({self.out_channels},) for weight "
                             f"{w.shape} with groups={self.groups}")

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[1] * self.groups)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        weight = d.param(f"{prefix}weight", self.weight)
        bias = None if self.bias is None else d.param(f"{prefix}bias", self.bias)
        return d.conv_transpose(x, weight, bias, prefix, kernel_shape=self.weight.shape[2:], stride=self.stride,
                                padding=self.padding, output_padding=self.output_padding, dilation=self.dilation,
                                groups=self.groups)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=0, output_padding=0, dilation=1,
                    groups: int = 1) -> "ConvTranspose2d":
        """The inverse of :meth:`params`: ``weight`` (C_in, C_out/groups, kh, kw) and an optional ``bias``.

        The geometry is not in the arrays: keywords, defaults PyTorch's ``nn.ConvTranspose2d``'s.
        """
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.conv_keys(params, ""), what="ConvTranspose2d")
        weight = _transposed_weight(params, "weight")
        bias = params.get("bias")
        if bias is not None and np.shape(bias) != (weight.shape[1] * groups,):
            raise ShapeError(f"'bias' has shape {np.shape(bias)}, but 'weight' {weight.shape} with groups={groups} "
                             f"needs ({weight.shape[1] * groups},)")
        return cls(weight, None if bias is None else np.asarray(bias), stride=stride, padding=padding,
                   output_padding=output_padding, dilation=dilation, groups=groups)


def _transposed_weight(params, key: str) -> np.ndarray:
    from repnp.blocks import fromparams as fp

    weight = fp.array(params, key, ndim=4)
    if weight.size == 0:
        raise ShapeError(f"'{key}' has shape {weight.shape}, with a dimension of size 0")
    return weight


@dataclass(frozen=True, eq=False)
class ConvTransposeBN(Described):
    """A transposed convolution followed by an inference BatchNorm (ultralytics' ``ConvTranspose``).

    Notes
    -----
    Deploy form (rule 1 for transposed convs, :func:`repnp.fusion.fuse_bn_transposed`; RepVGG,
    Ding et al., CVPR 2021, eq. (3), on the output-channel axis of the transposed layout): with
    ``t = gamma / sqrt(var + eps)``, output channel ``o = g O_g + j`` of group ``g``,

    .. math:: W'[g C_g + c, j] = t_o W[g C_g + c, j], \\qquad b'_o = \\beta_o + (b_o - \\mu_o) t_o

    ultralytics 8.4.190 ``ultralytics/utils/torch_utils.py`` ``fuse_deconv_and_bn`` computes the
    same by viewing the weight in the conv layout and calling ``fuse_conv_bn_weights``;
    ``ultralytics/nn/tasks.py`` ``BaseModel.fuse`` stores it as ``conv_transpose`` (weight and
    bias) and deletes ``bn``. Exact at every stride, padding, output padding and dilation.
    """

    conv_transpose: ConvTranspose2d
    bn: BatchNorm

    def __post_init__(self) -> None:
        if self.bn.channels != self.conv_transpose.out_channels:
            raise ShapeError(f"bn has {self.bn.channels} channels but conv_transpose.weight "
                             f"{self.conv_transpose.weight.shape} with groups={self.conv_transpose.groups} has "
                             f"{self.conv_transpose.out_channels} output channels")

    @property
    def in_channels(self) -> int:
        return self.conv_transpose.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv_transpose.out_channels

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size=2, stride=2, padding=0,
               output_padding=0, dilation=1, groups: int = 1, bias: bool = False, eps: float = 1e-5,
               dtype=np.float64) -> "ConvTransposeBN":
        """Weights N(0, 1/fan_in) (``fan_in = C_in/groups * kh * kw``), random BN statistics.

        Defaults: ultralytics' ``ConvTranspose(c1, c2)`` (k=2, s=2, p=0, no bias with the BN).
        """
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ShapeError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        rng = np.random.default_rng(seed)
        kh, kw = pair(kernel_size, name="kernel_size", minimum=1)
        weight = (rng.standard_normal((in_channels, out_channels // groups, kh, kw))
                  / np.sqrt(in_channels // groups * kh * kw)).astype(dtype)
        b = (0.1 * rng.standard_normal(out_channels)).astype(dtype) if bias else None
        conv = ConvTranspose2d(weight, b, stride=stride, padding=padding, output_padding=output_padding,
                               dilation=dilation, groups=groups)
        return cls(conv, random_bn(rng, out_channels, eps=eps, dtype=dtype))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return self.bn.describe(d, self.conv_transpose.describe(d, x, f"{prefix}conv_transpose."), f"{prefix}bn.")

    def reparameterize(self) -> ConvTranspose2d:
        """One transposed conv with bias, same geometry (ultralytics' fused ``conv_transpose``)."""
        c, bn = self.conv_transpose, self.bn
        kernel, bias = fusion.fuse_bn_transposed(c.weight, c.bias, bn.mean, bn.var, bn.gamma, bn.beta,
                                                 groups=c.groups, eps=bn.eps)
        return ConvTranspose2d(kernel, bias, stride=c.stride, padding=c.padding, output_padding=c.output_padding,
                               dilation=c.dilation, groups=c.groups)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=0, output_padding=0, dilation=1, groups: int | None = None,
                    eps: float = 1e-5) -> "ConvTransposeBN":
        """The inverse of :meth:`params`: ``conv_transpose.weight`` [``conv_transpose.bias``], ``bn.*``.

        ``groups=None`` reads it from the arrays: the BN's ``C_out`` over the weight's
        ``C_out / groups`` (axis 1). The geometry is not in the arrays: keywords (PyTorch's
        defaults); the fused weights do not depend on it.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            A BN whose width is no multiple of the weight's axis 1, or ``groups`` not dividing
            ``C_in`` (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        keys = fp.conv_keys(params, "conv_transpose.") + fp.bn_keys("bn.")
        fp.check_keys(params, keys, what="ConvTransposeBN")
        weight = _transposed_weight(params, "conv_transpose.weight")
        bn = fp.bn_from(params, "bn.", eps=eps)
        per_group = weight.shape[1]
        if groups is None:
            groups = bn.channels // per_group
        if bn.channels != per_group * groups or weight.shape[0] % groups:
            raise ShapeError(f"BN 'bn' has {bn.channels} channels ('bn.mean' shape ({bn.channels},)) but "
                             f"'conv_transpose.weight' {weight.shape} (C_in, C_out/groups, kh, kw) has "
                             f"{per_group} output channels per group: C_out must be a multiple of it, with "
                             f"groups = C_out / {per_group} dividing C_in = {weight.shape[0]}")
        sub = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("conv_transpose.")}
        conv = ConvTranspose2d.from_params(sub, stride=stride, padding=padding, output_padding=output_padding,
                                           dilation=dilation, groups=groups)
        return cls(conv, bn)


# ----------------------------------------------------------------------------
# Conv2: a KxK and a centred 1x1 conv summed before one BN
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ParallelConvBN(Described):
    """A KxK conv and a centred 1x1 conv on one input, summed, then one BN (ultralytics' ``Conv2``).

    Attributes
    ----------
    conv_kxk : Conv2d
        (O, C/groups, kh, kw), kh and kw odd, centred padding ``dilation * (k // 2)``.
    conv_1x1 : Conv2d
        (O, C/groups, 1, 1), the same stride, dilation and groups, padding 0: it reads the
        input pixel under the KxK's centre tap.
    bn : BatchNorm
        O channels, applied to the sum.

    Notes
    -----
    Rule 3 then rule 2 then rule 1 (RepVGG, Ding et al., CVPR 2021, Sec. 3.3 and eq. (3)): the
    1x1 is the KxK kernel that is zero but at its centre tap, the two convs add into one
    (:func:`repnp.fusion.add_branches`), and the BN folds into it (:meth:`BatchNorm.fold`):

    .. math:: W = t\\,(W_K + \\mathrm{pad}_K(W_1)), \\qquad b = \\beta + (b_K + b_1 - \\mu)\\,t,
              \\qquad t = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}

    ultralytics 8.4.190 ``ultralytics/nn/modules/conv.py`` ``Conv2.fuse_convs`` writes the
    1x1 weight into index ``k // 2`` of each spatial axis and adds it to ``conv``'s weight;
    ``ultralytics/nn/tasks.py`` ``BaseModel.fuse`` then folds ``bn`` into ``conv``
    (``fuse_conv_and_bn``). ultralytics' ``Conv2`` has no conv bias; a bias is accepted here and
    added before the BN.
    """

    conv_kxk: Conv2d
    conv_1x1: Conv2d
    bn: BatchNorm

    def __post_init__(self) -> None:
        kxk, one = self.conv_kxk, self.conv_1x1
        w = kxk.weight
        if w.shape[2] % 2 == 0 or w.shape[3] % 2 == 0:
            raise ValueError(f"ParallelConvBN: conv_kxk.weight {w.shape} has an even kernel: no centre tap for "
                             f"the 1x1 (ultralytics' Conv2 itself runs only with odd K: with p=None its cv2 "
                             f"gets padding 0, conv K//2, and the two outputs differ in size for even K)")
        if one.weight.shape != w.shape[:2] + (1, 1):
            raise ShapeError(f"ParallelConvBN: conv_1x1.weight has shape {one.weight.shape}, it must be "
                             f"{w.shape[:2] + (1, 1)} to pair with conv_kxk.weight {w.shape}")
        if (pair(one.stride), pair(one.dilation), one.groups) != (pair(kxk.stride), pair(kxk.dilation), kxk.groups):
            raise ValueError(f"ParallelConvBN: conv_1x1 must share conv_kxk's stride, dilation and groups, got "
                             f"{(one.stride, one.dilation, one.groups)} vs {(kxk.stride, kxk.dilation, kxk.groups)}")
        if self.bn.channels != kxk.out_channels:
            raise ShapeError(f"ParallelConvBN: bn has {self.bn.channels} channels, conv_kxk.weight {w.shape} "
                             f"has {kxk.out_channels} output channels")

    @property
    def in_channels(self) -> int:
        return self.conv_kxk.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv_kxk.out_channels

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size=3, stride=1, dilation=1,
               groups: int = 1, eps: float = 1e-5, dtype=np.float64) -> "ParallelConvBN":
        """Weights N(0, 1/fan_in), random BN statistics; ultralytics' ``Conv2(c1, c2, k, s, g=g, d=d)``."""
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ShapeError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        rng = np.random.default_rng(seed)
        kh, kw = pair(kernel_size, name="kernel_size", minimum=1)
        dh, dw = pair(dilation, name="dilation", minimum=1)
        cg = in_channels // groups
        kxk = Conv2d(random_conv_weight(rng, out_channels, cg, (kh, kw), dtype=dtype), stride=stride,
                     padding=(dh * (kh // 2), dw * (kw // 2)), dilation=dilation, groups=groups)
        one = Conv2d(random_conv_weight(rng, out_channels, cg, 1, dtype=dtype), stride=stride, padding=0,
                     dilation=dilation, groups=groups)
        return cls(kxk, one, random_bn(rng, out_channels, eps=eps, dtype=dtype))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        total = d.sum([lambda: self.conv_kxk.describe(d, x, f"{prefix}conv_kxk."),
                       lambda: self.conv_1x1.describe(d, x, f"{prefix}conv_1x1.")], prefix)
        return self.bn.describe(d, total, f"{prefix}bn.")

    def reparameterize(self) -> Conv2d:
        """One KxK conv with bias (ultralytics' fused ``conv``): the 1x1 at the centre, the BN folded."""
        kxk = self.conv_kxk
        summed = fusion.add_branches((kxk.weight, kxk.bias), (self.conv_1x1.weight, self.conv_1x1.bias),
                                     kernel_size=kxk.weight.shape[2:])
        kernel, bias = self.bn.fold(*summed)
        return Conv2d(kernel, bias, stride=kxk.stride, padding=kxk.padding, dilation=kxk.dilation, groups=kxk.groups)

    @classmethod
    def from_params(cls, params, *, stride=1, dilation=1, groups: int = 1, eps: float = 1e-5) -> "ParallelConvBN":
        """The inverse of :meth:`params`: ``conv_kxk.weight``, ``conv_1x1.weight`` (optional biases), ``bn.*``.

        The padding is the centred one (``dilation * (k // 2)``, 0 for the 1x1), as ultralytics'
        ``autopad`` gives ``Conv2``; stride, dilation and groups are keywords (not in the arrays,
        and they do not change the fused weights).

        Raises
        ------
        ValueError
            Missing or unexpected keys (named); an even kernel.
        ShapeError
            A 1x1 weight or a BN that does not fit the KxK weight (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        keys = fp.conv_keys(params, "conv_kxk.") + fp.conv_keys(params, "conv_1x1.") + fp.bn_keys("bn.")
        fp.check_keys(params, keys, what="ParallelConvBN")
        kxk = fp.conv_from(params, "conv_kxk.", stride=stride, dilation=dilation, groups=groups)
        one = fp.conv_from(params, "conv_1x1.", stride=stride, padding=0, dilation=dilation, groups=groups)
        if one.weight.shape != kxk.weight.shape[:2] + (1, 1):
            raise ShapeError(f"'conv_1x1.weight' has shape {one.weight.shape}, 'conv_kxk.weight' "
                             f"{kxk.weight.shape} needs {kxk.weight.shape[:2] + (1, 1)}")
        bn = fp.bn_from(params, "bn.", eps=eps)
        if bn.channels != kxk.out_channels:
            raise ShapeError(f"BN 'bn' has {bn.channels} channels ('bn.mean' shape ({bn.channels},)) but "
                             f"'conv_kxk.weight' has shape {kxk.weight.shape}, O = {kxk.out_channels}")
        return cls(kxk, one, bn)
