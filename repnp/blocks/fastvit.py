"""FastViT's re-parameterizable blocks: RepMixer, the large-kernel conv and the conditional positional encoding.

Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization", ICCV 2023 (Sec. 3.2.1 RepMixer, Sec. 3.2.3 large kernel
convolutions, Sec. 3.2.2 conditional positional encodings); the reference code
is timm's ``timm/models/fastvit.py`` (``RepMixer``, ``ReparamLargeKernelConv``,
``RepConditionalPosEnc``), whose ``state_dict()`` names these blocks' parameters
mirror (``mixer.conv_kxk.<i>.conv.weight``, ``norm.identity.*``,
``layer_scale.gamma``; ``large_conv.conv.weight``, ``small_conv.bn.*``;
``pos_enc.weight``, ``pos_enc.bias``), apart from the MobileOne identity BN,
which :class:`repnp.blocks.MobileOneBlock` calls ``skip``.

* :class:`RepMixer` — ``x + gamma * (mixer(x) - norm(x))``, ``mixer`` a
  depthwise MobileOne block without activation and ``norm`` a BN (timm's
  ``norm`` is a MobileOne block with its identity BN only); deploy: one
  depthwise conv ``I + gamma (W_mixer - W_norm)``.
* :class:`ReparamLargeKernelConv` — a KxK conv-BN plus an optional small
  kxk conv-BN, centred, summed, then an activation; deploy: one KxK conv.
* :class:`RepConditionalPosEnc` — ``x + dwconv(x)`` (with bias); deploy: one
  depthwise conv ``I + W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion, ops
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, random_bn, random_conv_weight
from repnp.blocks.common import (
    Activation,
    ConvAct,
    as_activation,
    check_groups,
    check_odd_kernel,
    check_skip_geometry,
    check_square_kernel,
    same_padding,
)
from repnp.blocks.mobileone import MobileOneBlock
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError
from repnp.ops import pair

__all__ = ["RepMixer", "ReparamLargeKernelConv", "RepConditionalPosEnc"]


def _centred_small_padding(padding, dilation, big: int, small: int):
    """The padding of a ``small`` kernel whose taps sit at the centre of a ``big`` one."""
    shift = pair(dilation, name="dilation")[0] * (big // 2 - small // 2)
    return padding - shift if isinstance(padding, (int, np.integer)) else tuple(p - shift for p in pair(padding))


@dataclass(frozen=True, eq=False)
class RepMixer(Described):
    """Train form of FastViT's RepMixer token mixer.

    ``y = x + gamma * (mixer(x) - norm(x))``, ``gamma = 1`` without a layer scale.

    Attributes
    ----------
    mixer : MobileOneBlock
        KxK, stride 1, centred padding, ``C_in == C_out`` (depthwise in FastViT), no
        activation, no squeeze-excite.
    norm : BatchNorm
        On ``x`` itself (timm: a MobileOne block with only its identity BN).
    layer_scale : ndarray or None
        ``gamma``, C values (timm stores (C, 1, 1)); ``None``: no layer scale.

    Notes
    -----
    timm ``fastvit.py`` ``RepMixer.reparameterize`` (FastViT, ICCV 2023, Sec. 3.2.1):
    with ``W_m, b_m`` the mixer's fused conv (MobileOne rules), ``W_n, b_n`` the norm BN
    as a conv on the identity kernel ``I`` (rules 4 and 1),

    .. math:: W = I + \\gamma (W_m - W_n), \\qquad b = \\gamma (b_m - b_n)

    (:func:`repnp.fusion.scale_channels` scales output channels by ``gamma``).
    """

    mixer: MobileOneBlock
    norm: BatchNorm
    layer_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        m = self.mixer
        if m.se is not None or m.activation.name != "identity":
            raise ValueError("the RepMixer's mixer must have no squeeze-excite and the identity activation")
        check_skip_geometry(m.conv_kxk[0].conv, name="RepMixer")
        if self.norm.channels != m.out_channels:
            raise ShapeError(f"norm has {self.norm.channels} channels, the mixer has {m.out_channels}")
        if self.layer_scale is not None and np.size(self.layer_scale) != m.out_channels:
            raise ShapeError(f"layer_scale has shape {np.shape(self.layer_scale)}, needs {m.out_channels} values")

    @property
    def in_channels(self) -> int:
        return self.mixer.in_channels

    @property
    def out_channels(self) -> int:
        return self.mixer.out_channels

    @property
    def groups(self) -> int:
        return self.mixer.groups

    @property
    def kernel_size(self) -> int:
        return self.mixer.kernel_size

    def _gamma(self, dtype) -> np.ndarray:
        c = self.out_channels
        return np.ones(c, dtype) if self.layer_scale is None else np.asarray(self.layer_scale).reshape(c)

    @classmethod
    def random(cls, seed, channels: int, *, kernel_size: int = 3, num_branches: int = 1, layer_scale: bool = True,
               eps: float = 1e-5, dtype=np.float64) -> "RepMixer":
        """A depthwise mixer with ``num_branches`` KxK branches, a 1x1 scale branch and a skip,
        a norm BN, all with random statistics, and ``gamma ~ U(0.5, 1.5)`` if ``layer_scale``."""
        rng = np.random.default_rng(seed)
        mixer = MobileOneBlock.random(rng, channels, channels, kernel_size=kernel_size, groups=channels,
                                      num_branches=num_branches, use_skip=True, activation="identity",
                                      dtype=dtype, eps=eps)
        norm = random_bn(rng, channels, eps=eps, dtype=dtype)
        gamma = rng.uniform(0.5, 1.5, channels).astype(dtype) if layer_scale else None
        return cls(mixer, norm, gamma)

    @classmethod
    def from_params(cls, params, *, groups: int | None = None, eps: float = 1e-5) -> "RepMixer":
        """The inverse of :meth:`params`: ``mixer.*`` (:meth:`MobileOneBlock.from_params` names),
        ``norm.*`` (BN) and, if present, ``layer_scale.gamma``.

        ``groups=None`` is ``O / (C/groups)`` of the mixer's kernel (a RepMixer keeps its
        channels: ``C_in == C_out``). Stride 1 and the centred padding are the block's.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        bad = [k for k in params if not k.startswith(("mixer.", "norm.")) and k != "layer_scale.gamma"]
        missing = [k for k in ["mixer.conv_kxk.0.conv.weight"] + fp.bn_keys("norm.") if k not in params]
        if bad or missing:
            raise ValueError(f"RepMixer: missing key(s) {missing}, unexpected key(s) {bad}; expected mixer.*, "
                             f"norm.mean, norm.var, norm.gamma, norm.beta and optionally layer_scale.gamma")
        w = fp.array(params, "mixer.conv_kxk.0.conv.weight", ndim=4)
        if groups is None:
            if w.shape[0] % w.shape[1]:
                raise ShapeError(f"mixer.conv_kxk.0.conv.weight has shape {w.shape}: O must be a multiple of "
                                 f"C/groups (a RepMixer keeps its channels)")
            groups = w.shape[0] // w.shape[1]
        mixer = MobileOneBlock.from_params(fp.sub(params, "mixer."), groups=groups, eps=eps, activation="identity")
        norm = fp.bn_from(params, "norm.", eps=eps)
        if norm.channels != w.shape[0]:
            raise ShapeError(f"BN 'norm' has {norm.channels} channels, mixer.conv_kxk.0.conv.weight has shape "
                             f"{w.shape}, O = {w.shape[0]}")
        gamma = params.get("layer_scale.gamma")
        if gamma is not None and np.size(gamma) != w.shape[0]:
            raise ShapeError(f"layer_scale.gamma has shape {np.shape(gamma)}, needs {w.shape[0]} values")
        return cls(mixer, norm, None if gamma is None else np.asarray(gamma))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``x + gamma * (mixer(x) - norm(x))``: ``Sub``, ``Mul`` by gamma (with a layer scale), ``Add``."""
        y = d.node("Sub", [self.mixer.describe(d, x, f"{prefix}mixer."), self.norm.describe(d, x, f"{prefix}norm.")],
                   prefix)
        if self.layer_scale is not None:
            # gamma is stored as given ((C,) or timm's (C, 1, 1)); it multiplies NCHW as (C, 1, 1)
            gamma = d.param(f"{prefix}layer_scale.gamma", self.layer_scale)
            y = d.node("Mul", [y, d.node("Reshape", [gamma], f"{prefix}layer_scale.", shape=[-1, 1, 1])], prefix)
        return d.add(x, y, prefix)

    def reparameterize(self) -> Conv2d:
        """One depthwise (``groups``) KxK conv with bias: ``I + gamma (W_mixer - W_norm)``."""
        c, g, k = self.out_channels, self.groups, self.kernel_size
        mixer = self.mixer.reparameterize().conv
        dtype = mixer.weight.dtype
        norm = self.norm.as_identity_conv(groups=g, kernel_size=k)
        gamma = self._gamma(np.float64)
        ident = fusion.identity_kernel(c, groups=g, kernel_size=k, dtype=dtype)
        kernel, bias = fusion.add_branches((ident, None), fusion.scale_channels((mixer.weight, mixer.bias), gamma),
                                           fusion.scale_channels(norm, -gamma))
        return Conv2d(kernel.astype(dtype), bias.astype(dtype), stride=1, padding=mixer.padding,
                      dilation=mixer.dilation, groups=g)



@dataclass(frozen=True, eq=False)
class ReparamLargeKernelConv(Described):
    """Train form of FastViT's large-kernel conv: ``act(BN(conv_KxK(x)) + BN(conv_kxk(x)))``.

    Attributes
    ----------
    large_conv : ConvBN
        KxK (K odd), the block's stride, padding, groups.
    small_conv : ConvBN or None
        k x k (k odd, k <= K), same stride and groups, padding centring its taps in
        the large kernel's (``p - d (K//2 - k//2)``).
    activation : Activation
        timm's default is none (``identity``); FastViT's patch embedding passes GELU.

    Notes
    -----
    timm ``fastvit.py`` ``ReparamLargeKernelConv.reparameterize`` (FastViT, ICCV 2023,
    Sec. 3.2.3): both conv-BNs folded (rule 1), the small kernel zero-padded to KxK
    at the centre (rule 3), summed (rule 2):

    .. math:: W = W_K' + \\mathrm{pad}_K(W_k'), \\qquad b = b_K' + b_k'
    """

    large_conv: ConvBN
    small_conv: ConvBN | None = None
    activation: Activation = Activation("identity")

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))
        big = self.large_conv.conv
        k = check_square_kernel(big.weight, name="large_conv.conv.weight")
        if self.small_conv is not None:
            small = self.small_conv.conv
            s = small.weight.shape[2]
            if small.weight.shape != big.weight.shape[:2] + (s, s) or s % 2 == 0 or s > k:
                raise ShapeError(f"small_conv.conv.weight must be {big.weight.shape[:2]} + (k, k), k odd <= {k}, "
                                 f"got {small.weight.shape}")
            if (pair(small.stride) != pair(big.stride) or small.groups != big.groups
                    or pair(small.dilation) != pair(big.dilation)):
                raise ValueError("small_conv must share the large conv's stride, dilation and groups")
            expected = _centred_small_padding(big.padding, big.dilation, k, s)
            if ops.normalize_padding(small.padding) != ops.normalize_padding(expected):
                raise ValueError(f"small_conv padding must be {expected} to sit at the large kernel's centre, "
                                 f"got {small.padding}")

    @property
    def in_channels(self) -> int:
        c = self.large_conv.conv
        return int(c.weight.shape[1] * c.groups)

    @property
    def out_channels(self) -> int:
        return self.large_conv.conv.out_channels

    @property
    def kernel_size(self) -> int:
        return int(self.large_conv.conv.weight.shape[2])

    @property
    def branches(self) -> tuple:
        return (self.large_conv,) + ((self.small_conv,) if self.small_conv is not None else ())

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 7, small_kernel: int | None = 3,
               stride=1, padding=None, groups: int = 1, activation: Activation | str = "identity",
               eps: float = 1e-5, dtype=np.float64) -> "ReparamLargeKernelConv":
        """Random conv-BNs (N(0, 1/fan_in) kernels, random BN statistics); ``padding=None`` is ``K//2``."""
        k = check_odd_kernel(kernel_size)
        check_groups(in_channels, out_channels, groups)
        p = same_padding(k, 1, padding)
        rng = np.random.default_rng(seed)
        large = ConvBN.random(rng, in_channels, out_channels, k, stride=stride, padding=p, groups=groups,
                              eps=eps, dtype=dtype)
        small = None
        if small_kernel is not None:
            s = check_odd_kernel(small_kernel)
            small = ConvBN.random(rng, in_channels, out_channels, s, stride=stride,
                                  padding=_centred_small_padding(p, 1, k, s), groups=groups, eps=eps, dtype=dtype)
        return cls(large, small, activation)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int = 1, eps: float = 1e-5,
                    activation: Activation | str = "identity") -> "ReparamLargeKernelConv":
        """The inverse of :meth:`params`: ``large_conv.*`` and, if present, ``small_conv.*``.

        ``padding=None`` is the centred ``dilation * (K//2)``; ``groups`` cannot be read
        from the arrays (no branch needs ``C_in == C_out``) and does not change the fused
        kernel: default 1.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        expected = fp.conv_bn_keys(params, "large_conv.")
        if fp.has(params, "small_conv."):
            expected += fp.conv_bn_keys(params, "small_conv.")
        fp.check_keys(params, expected, what="ReparamLargeKernelConv")
        big = fp.array(params, "large_conv.conv.weight", ndim=4)
        p = fp.centred_padding(big.shape[2:], padding, dilation)
        common = dict(stride=stride, dilation=dilation, groups=groups, eps=eps)
        small = None
        if fp.has(params, "small_conv."):
            w = fp.array(params, "small_conv.conv.weight", ndim=4)
            if w.shape[:2] != big.shape[:2] or w.shape[2] > big.shape[2] or w.shape[2] % 2 == 0:
                raise ShapeError(f"small_conv.conv.weight has shape {w.shape}, but large_conv.conv.weight has "
                                 f"{big.shape}: a small kernel needs (O, C/groups) of the large one and an odd "
                                 f"size that fits at its centre")
            small = fp.conv_bn_from(params, "small_conv.",
                                    padding=_centred_small_padding(p, dilation, big.shape[2], w.shape[2]), **common)
        return cls(fp.conv_bn_from(params, "large_conv.", padding=p, **common), small, activation)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``act(BN(conv_KxK(x)) [+ BN(conv_kxk(x))])``."""
        y = self.large_conv.describe(d, x, f"{prefix}large_conv.")
        if self.small_conv is not None:
            y = d.add(y, self.small_conv.describe(d, x, f"{prefix}small_conv."), prefix)
        return self.activation.describe(d, y, prefix)

    def reparameterize(self) -> ConvAct:
        """One KxK conv with bias (both branches folded, the small one centred, summed), then the activation."""
        conv, bn = self.large_conv.conv, self.large_conv.bn
        branches = [fusion.fuse_bn(conv.weight, conv.bias, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)]
        if self.small_conv is not None:
            conv, bn = self.small_conv.conv, self.small_conv.bn
            small = fusion.fuse_bn(conv.weight, conv.bias, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
            branches.append(fusion.KernelBias(fusion.pad_kernel(small.kernel, self.kernel_size), small.bias))
        kernel, bias = fusion.add_branches(*branches)
        c = self.large_conv.conv
        return ConvAct(Conv2d(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                              groups=c.groups), self.activation)


@dataclass(frozen=True, eq=False)
class RepConditionalPosEnc(Described):
    """Train form of FastViT's conditional positional encoding: ``y = x + pos_enc(x)``.

    Attributes
    ----------
    pos_enc : Conv2d
        Depthwise (``groups = C``) KxK conv with bias, K odd, stride 1, padding ``K//2``.

    Notes
    -----
    timm ``fastvit.py`` ``RepConditionalPosEnc.reparameterize`` (FastViT, ICCV 2023,
    Sec. 3.2.2): the skip is the identity kernel ``I`` (rule 4), added to the conv
    (rule 2); the bias is the conv's:

    .. math:: W = I + W_{pe}, \\qquad b = b_{pe}
    """

    pos_enc: Conv2d

    def __post_init__(self) -> None:
        w = self.pos_enc.weight
        c, k = w.shape[0], w.shape[2]
        if w.shape != (c, 1, k, w.shape[3]) or self.pos_enc.groups != c or self.pos_enc.bias is None:
            raise ShapeError(f"pos_enc must be a depthwise conv (C, 1, K, K), groups = C, with a bias; got weight "
                             f"{w.shape}, groups={self.pos_enc.groups}, bias "
                             f"{'set' if self.pos_enc.bias is not None else None}")
        check_skip_geometry(self.pos_enc, name="RepConditionalPosEnc")

    @property
    def in_channels(self) -> int:
        return self.pos_enc.out_channels

    @property
    def out_channels(self) -> int:
        return self.pos_enc.out_channels

    @classmethod
    def random(cls, seed, channels: int, *, kernel_size=7, dtype=np.float64) -> "RepConditionalPosEnc":
        """A depthwise KxK conv, weights N(0, 1/fan_in), bias N(0, 0.5^2)."""
        kh, kw = pair(kernel_size, name="kernel_size")
        check_odd_kernel(kh), check_odd_kernel(kw)
        rng = np.random.default_rng(seed)
        weight = random_conv_weight(rng, channels, 1, (kh, kw), dtype=dtype)
        bias = (0.5 * rng.standard_normal(channels)).astype(dtype)
        return cls(Conv2d(weight, bias, padding=(kh // 2, kw // 2), groups=channels))

    @classmethod
    def from_params(cls, params) -> "RepConditionalPosEnc":
        """The inverse of :meth:`params`: ``pos_enc.weight`` (C, 1, K, K) and ``pos_enc.bias`` (C,).

        Depthwise, stride 1 and padding ``K//2`` are the block's definition.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            A kernel that is not depthwise (C, 1, K, K) with K odd (key and shape named).
        """
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, ["pos_enc.weight", "pos_enc.bias"], what="RepConditionalPosEnc")
        w = fp.array(params, "pos_enc.weight", ndim=4)
        if w.shape[1] != 1 or w.shape[2] % 2 == 0 or w.shape[3] % 2 == 0:
            raise ShapeError(f"pos_enc.weight has shape {w.shape}: a positional encoding is a depthwise conv "
                             f"(C, 1, K, K) with K odd")
        return cls(fp.conv_from(params, "pos_enc.", groups=w.shape[0]))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return d.add(x, self.pos_enc.describe(d, x, f"{prefix}pos_enc."), prefix)

    def reparameterize(self) -> Conv2d:
        """One depthwise conv with bias: ``I + W``, bias unchanged."""
        c = self.pos_enc
        ident = fusion.identity_kernel(c.out_channels, groups=c.groups, kernel_size=c.weight.shape[2:],
                                       dtype=c.weight.dtype)
        kernel, bias = fusion.add_branches((ident, None), (c.weight, c.bias))
        return Conv2d(kernel, bias, stride=1, padding=c.padding, groups=c.groups)

