"""UniRepLKNet (Ding et al., CVPR 2024, arXiv 2311.15599): the Dilated Reparam Block and the block around it.

As the official code has them (github.com/AILab-CVC/UniRepLKNet ``unireplknet.py``, read at
commit b5677d8):

* :class:`DilatedReparamBlock` — a large KxK depthwise conv-BN (``lk_origin`` + ``origin_bn``)
  plus small depthwise conv-BNs with dilations (``dil_conv_k{k}_{r}`` + ``dil_bn_k{k}_{r}``),
  all centred, summed; deploy (``merge_dilated_branches``): one KxK conv with bias. Each
  dilated kernel becomes a dense ``r(k-1)+1`` kernel (:func:`repnp.fusion.dilate_kernel`),
  centred (rule 3) and added (rule 2), after its BN is folded (rule 1). Which (k, r) a
  large kernel K trains with is the table :data:`DILATED_BRANCHES` (the official
  ``__init__``; K = 5..17).
* :class:`UniRepLKNetBlock` — ``x + gamma * BN2(W2 GRN(GELU(W1 SE(BN1(dwconv(x))))))`` with
  the two Linears over channels (NHWC in the official code), GRN from ConvNeXt V2; deploy
  (``UniRepLKNetBlock.reparameterize``): BN1 folded into the dwconv (rule 1), GRN's ``beta``
  projected through W2 into its bias, BN2 and the layer scale ``gamma`` folded into W2
  (rule 1 for a linear layer). GRN's ``gamma`` part, ``gamma_g * N(x)_c * x`` with ``N``
  the per-sample, per-channel L2 norm over the pixels divided by its channel mean, depends on
  the input: it stays (the deploy GRN has no beta). SE and GELU stay. Both forms are
  :class:`~repnp.dataflow.Described`: each Linear over channels is a 1x1 ``Conv`` whose
  kernel is a weight-only ``Reshape`` of the (O, I) matrix, GRN is ``ReduceL2``,
  ``ReduceMean``, ``Add``, ``Div``, ``Mul``, ``Add``, ``Mul`` [, ``Add``], the layer scale
  a ``Mul``; the parameters keep the official names and shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from repnp import fusion, ops
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, random_bn, random_conv_weight
from repnp.blocks.common import check_groups, check_odd_kernel
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError
from repnp.ops import pair

__all__ = ["DILATED_BRANCHES", "DilatedReparamBlock", "UniRepLKNetBlock", "UniRepLKNetBlockDeploy",
           "GRN_EPS"]

#: The official table (``DilatedReparamBlock.__init__``): large kernel K -> ((k, r), ...) of its
#: dilated branches, in the official order (the order of the sum).
DILATED_BRANCHES = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}

#: GRN's constant in ``N = G / (mean_c G + 1e-6)`` (official ``GRNwithNHWC.forward``).
GRN_EPS = 1e-6

_BRANCH = re.compile(r"^dilated_k(\d+)_r(\d+)\.")


def _branch_name(k: int, r: int) -> str:
    return f"dilated_k{k}_r{r}"


@dataclass(frozen=True, eq=False)
class DilatedReparamBlock(Described):
    """Train form of UniRepLKNet's Dilated Reparam Block: ``BN(W_K * x) + sum_b BN_b(W_b *_{r_b} x)``.

    Attributes
    ----------
    origin : ConvBN
        The large KxK conv-BN, K odd, dilation 1, padding ``K//2`` (official ``lk_origin``,
        ``origin_bn``).
    dilated : tuple of ConvBN
        The dilated branches: kernel k odd, dilation r, ``r (k - 1) + 1 <= K``, padding
        ``r (k//2)`` (centred, official ``(r(k-1)+1)//2``), same stride and groups as
        ``origin``. ``params()`` names them ``dilated_k{k}_r{r}.*``.

    Notes
    -----
    UniRepLKNet, Sec. 3.2 and Fig. 2; official ``merge_dilated_branches`` /
    ``merge_dilated_into_large_kernel`` / ``convert_dilated_to_nondilated``. Each branch:
    rule 1 (``fuse_bn``), then the dilated kernel as a dense one
    (:func:`repnp.fusion.dilate_kernel`), centred in KxK (rule 3) and summed (rule 2):

    .. math:: W = t_0 W_K + \\sum_b \\mathrm{pad}(\\mathrm{dil}_{r_b}(t_b W_b)), \\qquad
              b = \\sum_b (\\beta_b - \\mu_b t_b)

    The official block is depthwise with stride 1; the algebra holds for any groups and
    stride shared by all branches, which this class allows.
    """

    origin: ConvBN
    dilated: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilated", tuple(self.dilated))
        big = self.origin.conv
        o, i, kh, kw = big.weight.shape
        if kh != kw or kh % 2 == 0:
            raise ShapeError(f"origin.conv.weight must be square with an odd size, got {big.weight.shape}")
        if pair(big.dilation, name="dilation") != (1, 1):
            raise ValueError(f"origin.conv must not be dilated, got dilation {big.dilation}")
        if ops.normalize_padding(big.padding) != (kh // 2,) * 4:
            raise ValueError(f"origin.conv padding must be K//2 = {kh // 2}, got {big.padding}")
        names = set()
        for n, branch in enumerate(self.dilated):
            c = branch.conv
            k, r = int(c.weight.shape[2]), pair(c.dilation, name="dilation")[0]
            where = f"dilated[{n}] (kernel {c.weight.shape}, dilation {c.dilation})"
            if c.weight.shape != (o, i, k, k) or k % 2 == 0 or pair(c.dilation) != (r, r):
                raise ShapeError(f"{where}: needs a square odd kernel {(o, i)} + (k, k) and one dilation r")
            if r * (k - 1) + 1 > kh:
                raise ShapeError(f"{where}: its dilated extent r(k-1)+1 = {r * (k - 1) + 1} exceeds K = {kh}")
            if pair(c.stride) != pair(big.stride) or c.groups != big.groups:
                raise ValueError(f"{where}: must share origin's stride {big.stride} and groups {big.groups}")
            if ops.normalize_padding(c.padding) != (r * (k // 2),) * 4:
                raise ValueError(f"{where}: padding must be r*(k//2) = {r * (k // 2)} to sit at the centre, "
                                 f"got {c.padding}")
            if (k, r) in names:
                raise ValueError(f"{where}: two branches with kernel {k} and dilation {r}")
            names.add((k, r))

    @property
    def in_channels(self) -> int:
        c = self.origin.conv
        return int(c.weight.shape[1] * c.groups)

    @property
    def out_channels(self) -> int:
        return self.origin.conv.out_channels

    @property
    def kernel_size(self) -> int:
        return int(self.origin.conv.weight.shape[2])

    @property
    def table(self) -> tuple:
        """``((k, r), ...)`` of the dilated branches, in order."""
        return tuple((int(b.conv.weight.shape[2]), pair(b.conv.dilation)[0]) for b in self.dilated)

    @classmethod
    def random(cls, seed, channels: int, *, kernel_size: int = 7, branches=None, groups: int | None = None,
               stride=1, eps: float = 1e-5, dtype=np.float64) -> "DilatedReparamBlock":
        """Random conv-BNs (N(0, 1/fan_in) kernels, random BN statistics).

        ``branches`` is ``((k, r), ...)``, default the official table for ``kernel_size``
        (:data:`DILATED_BRANCHES`); ``groups=None`` is depthwise, as the official block.
        """
        k = check_odd_kernel(kernel_size)
        groups = channels if groups is None else int(groups)
        check_groups(channels, channels, groups)
        table = DILATED_BRANCHES.get(k) if branches is None else tuple(branches)
        if table is None:
            raise ValueError(f"no official dilated branches for kernel_size {k} (have {sorted(DILATED_BRANCHES)}); "
                             f"pass branches=((k, r), ...)")
        rng = np.random.default_rng(seed)
        origin = ConvBN.random(rng, channels, channels, k, stride=stride, padding=k // 2, groups=groups,
                               eps=eps, dtype=dtype)
        dilated = tuple(ConvBN.random(rng, channels, channels, kk, stride=stride, padding=r * (kk // 2),
                                      dilation=r, groups=groups, eps=eps, dtype=dtype) for kk, r in table)
        return cls(origin, dilated)

    @classmethod
    def from_params(cls, params, *, stride=1, groups: int | None = None,
                    eps: float = 1e-5) -> "DilatedReparamBlock":
        """The inverse of :meth:`params`: ``origin.*`` and ``dilated_k{k}_r{r}.*`` (k and r from the name).

        ``groups=None`` is depthwise when the kernels are (C, 1, ...) (the official block),
        else 1; every branch's padding is the centred one.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together, or a kernel that is not the ``k`` of its name.
        """
        from repnp.blocks import fromparams as fp

        names = []
        for key in params:
            m = _BRANCH.match(key)
            if m and (int(m.group(1)), int(m.group(2))) not in names:
                names.append((int(m.group(1)), int(m.group(2))))
        expected = fp.conv_bn_keys(params, "origin.")
        for k, r in names:
            expected += fp.conv_bn_keys(params, f"{_branch_name(k, r)}.")
        fp.check_keys(params, expected, what="DilatedReparamBlock")
        big = fp.array(params, "origin.conv.weight", ndim=4)
        official = DILATED_BRANCHES.get(big.shape[2], ())
        if set(names) == set(official):     # the official order: the order of its sum
            names = list(official)
        if groups is None:
            groups = big.shape[0] if big.shape[1] == 1 else 1
        origin = fp.conv_bn_from(params, "origin.", stride=stride, padding=big.shape[2] // 2, groups=groups, eps=eps)
        dilated = []
        for k, r in names:
            prefix = f"{_branch_name(k, r)}."
            w = fp.array(params, f"{prefix}conv.weight", ndim=4)
            if w.shape[2:] != (k, k):
                raise ShapeError(f"'{prefix}conv.weight' has shape {w.shape}, its name says a {k}x{k} kernel")
            dilated.append(fp.conv_bn_from(params, prefix, stride=stride, padding=r * (k // 2), dilation=r,
                                           groups=groups, eps=eps))
        return cls(origin, tuple(dilated))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``BN(lk(x))`` then ``+ BN_b(conv_b(x))`` branch by branch, as the official ``forward``."""
        y = self.origin.describe(d, x, f"{prefix}origin.")
        for (k, r), branch in zip(self.table, self.dilated):
            y = d.add(y, branch.describe(d, x, f"{prefix}{_branch_name(k, r)}."), prefix)
        return y

    def fused(self) -> fusion.KernelBias:
        """The KxK kernel and bias of the deploy conv (rules 1, dilation, 3, 2)."""
        parts = [self.origin.fused()]
        for branch in self.dilated:
            kernel, bias = branch.fused()
            parts.append(fusion.KernelBias(fusion.dilate_kernel(kernel, dilation=branch.conv.dilation), bias))
        return fusion.add_branches(*parts, kernel_size=self.kernel_size)

    def reparameterize(self) -> Conv2d:
        """One KxK conv with bias: the official ``lk_origin`` after ``merge_dilated_branches``."""
        kernel, bias = self.fused()
        c = self.origin.conv
        return Conv2d(kernel, bias, stride=c.stride, padding=c.padding, groups=c.groups)


# --- UniRepLKNetBlock ------------------------------------------------------------------------------

def _channel_linear(d: Dataflow, x: str, weight: np.ndarray, bias: np.ndarray | None, prefix: str) -> str:
    """The official NHWC ``nn.Linear`` over channels, on NCHW: a 1x1 ``Conv`` whose kernel is the
    (O, I) matrix reshaped to (O, I, 1, 1) (a weight-only ``Reshape``: the parameter keeps its
    official name and shape)."""
    kernel = d.node("Reshape", [d.param(f"{prefix}weight", weight)], prefix, shape=[0, 0, 1, 1])
    b = None if bias is None else d.param(f"{prefix}bias", bias)
    return d.conv(x, kernel, b, prefix, kernel_shape=(1, 1))


def _per_channel(d: Dataflow, name: str, array: np.ndarray, prefix: str) -> str:
    """A per-channel vector (any shape with C elements: GRN's (1, 1, 1, C)) as (1, C, 1, 1)."""
    return d.node("Reshape", [d.param(name, array)], prefix, shape=[1, -1, 1, 1])


def _describe_se(d: Dataflow, x: str, se: tuple, prefix: str) -> str:
    """The official ``SEBlock``: ``x * sigmoid(up(relu(down(avgpool(x)))))``, 1x1 convs with bias."""
    down_w, down_b, up_w, up_b = (d.param(f"{prefix}{k}", a) for k, a in zip(("down.weight", "down.bias",
                                                                              "up.weight", "up.bias"), se))
    s = d.node("GlobalAveragePool", [x], prefix)
    s = d.node("Relu", [d.conv(s, down_w, down_b, f"{prefix}down.", kernel_shape=(1, 1))], f"{prefix}down.")
    s = d.node("Sigmoid", [d.conv(s, up_w, up_b, f"{prefix}up.", kernel_shape=(1, 1))], f"{prefix}up.")
    return d.node("Mul", [x, s], prefix)


def _describe_grn(d: Dataflow, x: str, gamma: np.ndarray, beta: np.ndarray | None, prefix: str) -> str:
    """ConvNeXt V2's GRN on NCHW, as the official ``GRNwithNHWC.forward`` orders it:
    ``G = ||x||_2`` over H, W; ``N = G / (mean_c G + 1e-6)``; ``(gamma N + 1) x [+ beta]``."""
    g = d.node("ReduceL2", [x], prefix, axes=[2, 3], keepdims=1)
    mean = d.node("ReduceMean", [g], prefix, axes=[1], keepdims=1)
    n = d.node("Div", [g, d.node("Add", [mean, d.const(np.array(GRN_EPS), prefix, "eps")], prefix)], prefix)
    scale = d.node("Add", [d.node("Mul", [_per_channel(d, f"{prefix}gamma", gamma, prefix), n], prefix),
                           d.const(np.array(1.0), prefix, "one")], prefix)
    y = d.node("Mul", [scale, x], prefix)
    return y if beta is None else d.node("Add", [y, _per_channel(d, f"{prefix}beta", beta, prefix)], prefix)


_SE_KEYS = ("se.down.weight", "se.down.bias", "se.up.weight", "se.up.bias")


@dataclass(frozen=True, eq=False)
class UniRepLKNetBlock(Described):
    """Train form of UniRepLKNet's block (official ``UniRepLKNetBlock``, ``deploy=False``).

    ``y = x + gamma * BN2(W2 GRN(GELU(W1 SE(BN1(dwconv(x))) + b1)))``.

    Attributes
    ----------
    dwconv : DilatedReparamBlock, Conv2d or None
        The depthwise token mixer: a Dilated Reparam Block (K >= 7), a plain depthwise
        conv without bias (K = 3, 5) or none (K = 0, official ``nn.Identity``; then no ``norm``).
    norm : BatchNorm or None
        BN1.
    se : tuple of 4 arrays
        ``(down.weight, down.bias, up.weight, up.bias)``: the SE block (1x1 convs, ReLU, sigmoid).
    pwconv1_weight, pwconv1_bias : ndarray, (F, C) and (F,)
    grn_gamma, grn_beta : ndarray
        GRN's parameters, F elements each (official shape (1, 1, 1, F), kept as given).
    pwconv2_weight : ndarray, (C, F)
        Without bias.
    pwconv2_bn : BatchNorm
        BN2.
    gamma : ndarray (C,) or None
        The layer scale.

    Notes
    -----
    Deploy (official ``UniRepLKNetBlock.reparameterize``), all exact:

    * BN1 into the dwconv (rule 1, :func:`repnp.fusion.fuse_bn`), after the Dilated Reparam
      Block's own merge;
    * GRN's ``beta`` after GRN and before W2: ``W2 (u + beta) = W2 u + W2 beta``, a bias of W2
      (:func:`repnp.fusion.scale_linear` with ``before=True``, scale 1, shift beta);
    * BN2 then the layer scale after W2: per-channel affine maps of its output
      (:func:`repnp.fusion.fuse_bn_linear`, then :func:`repnp.fusion.scale_linear`).

    Not folded (not linear in the input): GRN's ``gamma * N(x) * x`` term (N is computed from
    the input), SE's gate and GELU. Drop path is the identity at inference.
    """

    dwconv: DilatedReparamBlock | Conv2d | None
    norm: BatchNorm | None
    se: tuple
    pwconv1_weight: np.ndarray
    pwconv1_bias: np.ndarray
    grn_gamma: np.ndarray
    grn_beta: np.ndarray
    pwconv2_weight: np.ndarray
    pwconv2_bn: BatchNorm
    gamma: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "se", tuple(self.se))
        c, f = np.shape(self.pwconv2_weight)[0], np.shape(self.pwconv1_weight)[0]
        shapes = {"pwconv1.weight": np.shape(self.pwconv1_weight), "pwconv1.bias": np.shape(self.pwconv1_bias),
                  "pwconv2.weight": np.shape(self.pwconv2_weight)}
        if shapes != {"pwconv1.weight": (f, c), "pwconv1.bias": (f,), "pwconv2.weight": (c, f)}:
            raise ShapeError(f"UniRepLKNetBlock: the Linears must be (F, C), (F,) and (C, F), got {shapes}")
        if np.size(self.grn_gamma) != f or np.size(self.grn_beta) != f:
            raise ShapeError(f"UniRepLKNetBlock: GRN gamma/beta need F = {f} elements, got "
                             f"{np.shape(self.grn_gamma)}, {np.shape(self.grn_beta)}")
        if self.pwconv2_bn.channels != c or (self.norm is not None and self.norm.channels != c):
            raise ShapeError(f"UniRepLKNetBlock: the BNs need C = {c} channels")
        if self.gamma is not None and np.shape(self.gamma) != (c,):
            raise ShapeError(f"UniRepLKNetBlock: gamma must have shape ({c},), got {np.shape(self.gamma)}")
        if (self.dwconv is None) != (self.norm is None):
            raise ValueError("UniRepLKNetBlock: norm is there exactly when dwconv is (official kernel_size 0: "
                             "neither)")
        if self.dwconv is not None and (self.dwconv.in_channels, self.dwconv.out_channels) != (c, c):
            raise ShapeError(f"UniRepLKNetBlock: dwconv must map {c} channels to {c}")
        _check_se(self.se, c)

    @property
    def in_channels(self) -> int:
        return int(np.shape(self.pwconv2_weight)[0])

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """The official ``forward`` (inference: BNs with running statistics, exact GELU, drop path
        the identity): dwconv, BN1, SE, Linear, GELU, GRN, Linear, BN2, layer scale, ``x + y``.
        Parameters are named as the official state dict (``params()``)."""
        y = x if self.dwconv is None else self.dwconv.describe(d, x, f"{prefix}dwconv.")
        if self.norm is not None:
            y = self.norm.describe(d, y, f"{prefix}norm.")
        y = _describe_se(d, y, self.se, f"{prefix}se.")
        y = _channel_linear(d, y, self.pwconv1_weight, self.pwconv1_bias, f"{prefix}pwconv1.")
        y = d.node("Gelu", [y], f"{prefix}act.")
        y = _describe_grn(d, y, self.grn_gamma, self.grn_beta, f"{prefix}grn.")
        y = _channel_linear(d, y, self.pwconv2_weight, None, f"{prefix}pwconv2.")
        y = self.pwconv2_bn.describe(d, y, f"{prefix}pwconv2_bn.")
        if self.gamma is not None:
            y = d.node("Mul", [_per_channel(d, f"{prefix}gamma", self.gamma, prefix), y], prefix)
        return d.add(x, y, prefix)

    @classmethod
    def random(cls, seed, channels: int, *, kernel_size: int = 7, ffn_factor: int = 4, layer_scale: bool = True,
               eps: float = 1e-5, dtype=np.float64) -> "UniRepLKNetBlock":
        """Random weights, random BN statistics, GRN and layer scale far from their zero / 1e-6 inits."""
        rng = np.random.default_rng(seed)
        c, f = channels, int(ffn_factor * channels)
        if kernel_size >= 7:
            dwconv = DilatedReparamBlock.random(rng.integers(2**31), c, kernel_size=kernel_size, eps=eps, dtype=dtype)
        elif kernel_size in (3, 5):
            dwconv = Conv2d(random_conv_weight(rng, c, 1, kernel_size, dtype=dtype), None,
                            padding=kernel_size // 2, groups=c)
        elif kernel_size == 0:
            dwconv = None
        else:
            raise ValueError(f"kernel_size must be 0, 3, 5 or >= 7 (official UniRepLKNetBlock), got {kernel_size}")
        rd = max(c // 4, 1)
        vec = lambda n, s=0.5: (s * rng.standard_normal(n)).astype(dtype)  # noqa: E731
        se = (random_conv_weight(rng, rd, c, 1, dtype=dtype), vec(rd), random_conv_weight(rng, c, rd, 1, dtype=dtype),
              vec(c))
        return cls(dwconv, None if dwconv is None else random_bn(rng, c, eps=eps, dtype=dtype), se,
                   (rng.standard_normal((f, c)) / np.sqrt(c)).astype(dtype), vec(f),
                   vec(f).reshape(1, 1, 1, f), vec(f).reshape(1, 1, 1, f),
                   (rng.standard_normal((c, f)) / np.sqrt(f)).astype(dtype), random_bn(rng, c, eps=eps, dtype=dtype),
                   rng.uniform(0.5, 1.5, c).astype(dtype) if layer_scale else None)

    @classmethod
    def from_params(cls, params, *, eps: float = 1e-5) -> "UniRepLKNetBlock":
        """The inverse of :meth:`params` (the dwconv's kind from its keys: ``dwconv.origin.*``
        a Dilated Reparam Block, ``dwconv.weight`` a plain depthwise conv, none: no dwconv).

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together.
        """
        from repnp.blocks import fromparams as fp

        expected = list(_SE_KEYS) + ["pwconv1.weight", "pwconv1.bias", "grn.gamma", "grn.beta", "pwconv2.weight"]
        expected += fp.bn_keys("pwconv2_bn.")
        dwconv = None
        if fp.has(params, "dwconv.origin."):
            sub = fp.sub(params, "dwconv.")
            expected += [f"dwconv.{k}" for k in sub]
            dwconv = DilatedReparamBlock.from_params(sub, eps=eps)
        elif "dwconv.weight" in params:
            expected.append("dwconv.weight")
            w = fp.array(params, "dwconv.weight", ndim=4)
            dwconv = Conv2d(w, None, padding=w.shape[2] // 2, groups=w.shape[0])
        norm = None
        if fp.has(params, "norm."):
            expected += fp.bn_keys("norm.")
            norm = fp.bn_from(params, "norm.", eps=eps)
        if "gamma" in params:
            expected.append("gamma")
        fp.check_keys(params, expected, what="UniRepLKNetBlock")
        arrays = {k: np.asarray(params[k]) for k in expected if not k.startswith(("dwconv.", "norm."))}
        return cls(dwconv, norm, tuple(arrays[k] for k in _SE_KEYS), arrays["pwconv1.weight"],
                   arrays["pwconv1.bias"], arrays["grn.gamma"], arrays["grn.beta"], arrays["pwconv2.weight"],
                   fp.bn_from(params, "pwconv2_bn.", eps=eps), arrays.get("gamma"))

    def reparameterize(self) -> "UniRepLKNetBlockDeploy":
        """The official deploy block: BN1 in the dwconv, GRN's beta, BN2 and gamma in W2."""
        dwconv = None
        if self.dwconv is not None:
            conv = self.dwconv.reparameterize() if isinstance(self.dwconv, DilatedReparamBlock) else self.dwconv
            kernel, bias = self.norm.fold(conv.weight, conv.bias)
            dwconv = Conv2d(kernel, bias, stride=conv.stride, padding=conv.padding, groups=conv.groups)
        w2 = self.pwconv2_weight
        # GRN's beta before W2: W2 (u + beta) = W2 u + W2 beta (float64 throughout, rounded once)
        w, b = fusion.scale_linear(np.asarray(w2, np.float64), None, 1.0, np.reshape(self.grn_beta, -1),
                                   before=True)
        bn = self.pwconv2_bn
        w, b = fusion.fuse_bn_linear(w, b, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
        if self.gamma is not None:
            w, b = fusion.scale_linear(w, b, self.gamma)
        dtype = w2.dtype if np.issubdtype(w2.dtype, np.floating) else np.float64
        return UniRepLKNetBlockDeploy(dwconv, self.se, self.pwconv1_weight, self.pwconv1_bias, self.grn_gamma,
                                      w.astype(dtype), b.astype(dtype))


def _check_se(se: tuple, c: int) -> None:
    if len(se) != 4:
        raise ShapeError(f"se must be (down.weight, down.bias, up.weight, up.bias), got {len(se)} arrays")
    dw, db, uw, ub = (np.shape(a) for a in se)
    rd = dw[0] if dw else 0
    if dw != (rd, c, 1, 1) or db != (rd,) or uw != (c, rd, 1, 1) or ub != (c,):
        raise ShapeError(f"se: need (R, {c}, 1, 1), (R,), ({c}, R, 1, 1), ({c},), got {[dw, db, uw, ub]}")


@dataclass(frozen=True, eq=False)
class UniRepLKNetBlockDeploy(Described):
    """Deploy form of :class:`UniRepLKNetBlock` (official ``deploy=True``):
    ``y = x + W2 GRN_0(GELU(W1 SE(dwconv(x)) + b1)) + b2``, ``GRN_0`` without beta.

    ``params()`` names: ``dwconv.weight``, ``dwconv.bias`` (absent without a dwconv),
    ``se.*``, ``pwconv1.*``, ``grn.gamma``, ``pwconv2.weight``, ``pwconv2.bias``.
    """

    dwconv: Conv2d | None
    se: tuple
    pwconv1_weight: np.ndarray
    pwconv1_bias: np.ndarray
    grn_gamma: np.ndarray
    pwconv2_weight: np.ndarray
    pwconv2_bias: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "se", tuple(self.se))
        c, f = np.shape(self.pwconv2_weight)[0], np.shape(self.pwconv1_weight)[0]
        if (np.shape(self.pwconv1_weight) != (f, c) or np.shape(self.pwconv2_weight) != (c, f)
                or np.shape(self.pwconv2_bias) != (c,) or np.size(self.grn_gamma) != f):
            raise ShapeError("UniRepLKNetBlockDeploy: Linears (F, C) and (C, F) with a (C,) bias, GRN gamma of F")
        _check_se(self.se, c)

    @property
    def in_channels(self) -> int:
        return int(np.shape(self.pwconv2_weight)[0])

    @property
    def groups(self) -> int:
        """The dwconv's groups (reports); 1 without a dwconv."""
        return 1 if self.dwconv is None else int(self.dwconv.groups)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """The official deploy ``forward``: dwconv (with bias), SE, Linear, GELU, GRN without beta,
        Linear with bias, ``x + y``."""
        y = x if self.dwconv is None else self.dwconv.describe(d, x, f"{prefix}dwconv.")
        y = _describe_se(d, y, self.se, f"{prefix}se.")
        y = _channel_linear(d, y, self.pwconv1_weight, self.pwconv1_bias, f"{prefix}pwconv1.")
        y = d.node("Gelu", [y], f"{prefix}act.")
        y = _describe_grn(d, y, self.grn_gamma, None, f"{prefix}grn.")
        y = _channel_linear(d, y, self.pwconv2_weight, self.pwconv2_bias, f"{prefix}pwconv2.")
        return d.add(x, y, prefix)

    @classmethod
    def from_params(cls, params) -> "UniRepLKNetBlockDeploy":
        """The inverse of :meth:`params`."""
        from repnp.blocks import fromparams as fp

        expected = list(_SE_KEYS) + ["pwconv1.weight", "pwconv1.bias", "grn.gamma", "pwconv2.weight",
                                     "pwconv2.bias"]
        dwconv = None
        if "dwconv.weight" in params:
            expected += fp.conv_keys(params, "dwconv.")
            w = fp.array(params, "dwconv.weight", ndim=4)
            dwconv = fp.conv_from(params, "dwconv.", padding=w.shape[2] // 2, groups=w.shape[0])
        fp.check_keys(params, expected, what="UniRepLKNetBlockDeploy")
        a = {k: np.asarray(params[k]) for k in expected if not k.startswith("dwconv.")}
        return cls(dwconv, tuple(a[k] for k in _SE_KEYS), a["pwconv1.weight"], a["pwconv1.bias"], a["grn.gamma"],
                   a["pwconv2.weight"], a["pwconv2.bias"])
