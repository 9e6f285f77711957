"""Edge-oriented Convolution Block (ECB): a 3x3 conv trained as five branches, deployed as one.

Paper: Zhang, Zeng and Zhang, *Edge-oriented Convolution Block for Real-time Super Resolution
on Mobile Devices*, ACM MM 2021. Facts read from the official ``models/ecb.py`` and
``models/ecbsr.py`` / ``models/plainsr.py`` / ``convert.py`` (github.com/xindongzhang/ECBSR,
commit c60b1d2712af4ed4a615c2b7afa3980222c44a31; the examples ``tests/data/ecb_orepa/*/off_ecb*``
were made there and load into this block, see ``tests/test_blocks_ecb.py``):

* ``ECB`` sums ``conv3x3`` (3x3, padding 1, bias) and four ``SeqConv3x3``: ``conv1x1_3x3`` (a
  1x1 ``k0, b0`` to ``M = int(out * depth_multiplier)`` channels, then a 3x3 ``k1, b1``) and
  ``conv1x1_sbx`` / ``conv1x1_sby`` / ``conv1x1_lpl`` (a 1x1 ``k0, b0`` to ``out`` channels, then
  a depthwise 3x3 with kernel ``scale * mask``, ``scale`` (out, 1, 1, 1) learned, ``mask`` a
  fixed Sobel-x / Sobel-y / Laplacian (out, 1, 3, 3) stored in the state dict, and bias
  ``bias``); plus ``x`` when ``with_idt`` and ``in == out``;
* every ``SeqConv3x3`` pads its 1x1 output with zeros, then writes ``b0`` on the 1-pixel
  border, and runs its 3x3 without padding: the 1x1's output is padded with its own value at
  zero input, which makes the merge exact at the borders (:func:`repnp.fusion.merge_sequential`,
  :func:`repnp.fusion.merge_depthwise`);
* the activation (``prelu`` with ``act.weight``, ``relu``, ``linear`` ...) follows the sum and
  is kept as it is by the deploy form (``PlainSR``'s ``Conv3X3``: ``conv3x3`` then ``act``); it
  is not part of this block. Stride is always 1.

Parameter names (``params()``) are the official state dict's keys of one ECB:
``conv3x3.weight``, ``conv3x3.bias``, ``conv1x1_3x3.k0, b0, k1, b1``, ``conv1x1_{sbx,sby,lpl}.k0,
b0, scale, bias, mask``.

The whole network is :class:`ECBSR` (official ``models/ecbsr.py``): ``backbone`` = a head ECB
(``colors`` -> ``channel_nums``), ``module_nums`` body ECBs, each followed by the activation
(``backbone.{i}.act``), and a tail ECB to ``colors * scale**2`` channels without activation;
then ``y = backbone(x) + x`` (broadcast over the channels: the official code runs only with
``colors == 1`` or ``scale == 1``) and ``PixelShuffle(scale)`` (ONNX ``DepthToSpace``, mode
"CRD", as PyTorch exports it). Its deploy form is :class:`PlainSR` (official
``models/plainsr.py``, filled by ``convert.py``: each ECB's ``rep_params()`` into a
``conv3x3``, the PReLU slopes copied).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion
from repnp.blocks.base import Conv2d, random_conv_weight
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["ECB", "SeqConv3x3", "PReLU", "ECBSR", "PlainSR", "SR_ACTIVATIONS"]

#: The three masked branches of ECB: module name -> :func:`repnp.fusion.edge_mask` kind.
EDGE_BRANCHES = {"conv1x1_sbx": "sobelx", "conv1x1_sby": "sobely", "conv1x1_lpl": "laplacian"}


@dataclass(frozen=True, eq=False)
class SeqConv3x3(Described):
    """ECB's ``SeqConv3x3``: a 1x1 conv, its output padded by 1 with ``b0``, then a 3x3 conv.

    Attributes
    ----------
    k0, b0 : ndarray
        The 1x1 conv, (M, C, 1, 1) and (M,).
    k1, b1 : ndarray or None
        ``conv1x1-conv3x3``: the dense 3x3 conv (O, M, 3, 3) and (O,); None for a masked one.
    scale, bias, mask : ndarray or None
        Masked types: the depthwise 3x3 kernel is ``scale * mask`` ((M, 1, 1, 1) times
        (M, 1, 3, 3)), its bias ``bias`` (M,); ``O = M``. None for ``conv1x1-conv3x3``.
    """

    k0: np.ndarray
    b0: np.ndarray
    k1: np.ndarray | None = None
    b1: np.ndarray | None = None
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        m = self.k0.shape[0]
        if self.k0.ndim != 4 or self.k0.shape[2:] != (1, 1) or self.b0.shape != (m,):
            raise ShapeError(f"SeqConv3x3: k0 {self.k0.shape} must be (M, C, 1, 1) and b0 {self.b0.shape} (M,)")
        if self.masked:
            if self.k1 is not None or self.b1 is not None or self.bias is None or self.mask is None:
                raise ShapeError("SeqConv3x3: a masked branch has scale, bias and mask, and no k1 / b1")
            if self.scale.shape != (m, 1, 1, 1) or self.mask.shape != (m, 1, 3, 3) or self.bias.shape != (m,):
                raise ShapeError(f"SeqConv3x3: scale {self.scale.shape}, mask {self.mask.shape}, bias "
                                 f"{self.bias.shape} must be ({m}, 1, 1, 1), ({m}, 1, 3, 3), ({m},) for k0 "
                                 f"{self.k0.shape}")
        else:
            if self.k1 is None or self.k1.ndim != 4 or self.k1.shape[1:] != (m, 3, 3) or self.b1 is None \
                    or self.b1.shape != (self.k1.shape[0],) or self.bias is not None or self.mask is not None:
                raise ShapeError(f"SeqConv3x3: conv1x1-conv3x3 needs k1 (O, {m}, 3, 3) and b1 (O,) after k0 "
                                 f"{self.k0.shape}, got k1 {None if self.k1 is None else self.k1.shape}")

    @property
    def masked(self) -> bool:
        return self.scale is not None

    @property
    def in_channels(self) -> int:
        return int(self.k0.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.k0.shape[0] if self.masked else self.k1.shape[0])

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        # Parameters declared in the official state dict's order (k0, b0, then k1, b1 or scale,
        # bias, mask): params() lists them so.
        k0, b0 = d.param(f"{prefix}k0", self.k0), d.param(f"{prefix}b0", self.b0)
        if self.masked:
            scale, bias, mask = (d.param(f"{prefix}{k}", getattr(self, k)) for k in ("scale", "bias", "mask"))
        else:
            k1, b1 = d.param(f"{prefix}k1", self.k1), d.param(f"{prefix}b1", self.b1)
        h = d.conv(x, k0, b0, prefix, kernel_shape=(1, 1))
        # F.pad with zeros, then b0 written on the 1-pixel border: a pad with b0 per channel
        h = d.node("PadChannels", [h, b0], prefix, pads=[1, 1, 1, 1])
        if not self.masked:
            return d.conv(h, k1, b1, prefix, kernel_shape=(3, 3))
        kernel = d.node("Mul", [scale, mask], prefix)
        return d.conv(h, kernel, bias, prefix, kernel_shape=(3, 3), groups=self.out_channels)

    def fused(self) -> fusion.KernelBias:
        """The branch as one 3x3 conv with padding 1 on the block input (exact, borders included)."""
        if self.masked:
            return fusion.merge_depthwise((self.k0, self.b0), (fusion.masked_kernel(self.scale, self.mask),
                                                                self.bias))
        return fusion.merge_sequential((self.k0, self.b0), (self.k1, self.b1))

    @classmethod
    def random(cls, rng, in_channels: int, out_channels: int, *, kind: str = "conv1x1-conv3x3",
               depth_multiplier: float = 2.0, dtype=np.float64) -> "SeqConv3x3":
        """N(0, 1/fan_in) kernels, N(0, 0.5) biases and scales; the mask :func:`repnp.fusion.edge_mask`."""
        half = lambda n: (0.5 * rng.standard_normal(n)).astype(dtype)  # noqa: E731
        if kind == "conv1x1-conv3x3":
            m = int(out_channels * depth_multiplier)
            return cls(random_conv_weight(rng, m, in_channels, 1, dtype=dtype), half(m),
                       random_conv_weight(rng, out_channels, m, 3, dtype=dtype), half(out_channels))
        mask = np.broadcast_to(fusion.edge_mask(kind.split("-")[1], dtype=dtype), (out_channels, 1, 3, 3)).copy()
        return cls(random_conv_weight(rng, out_channels, in_channels, 1, dtype=dtype), half(out_channels),
                   scale=half(out_channels).reshape(-1, 1, 1, 1), bias=half(out_channels), mask=mask)


@dataclass(frozen=True, eq=False)
class ECB(Described):
    """Train form of ECB: ``conv3x3(x) + conv1x1_3x3(x) + sbx(x) + sby(x) + lpl(x) [+ x]``.

    Attributes
    ----------
    conv3x3 : Conv2d
        3x3, padding 1, with bias.
    conv1x1_3x3 : SeqConv3x3
        The 1x1 -> 3x3 branch (``M`` intermediate channels).
    conv1x1_sbx, conv1x1_sby, conv1x1_lpl : SeqConv3x3
        The masked branches (Sobel-x, Sobel-y, Laplacian masks).
    with_idt : bool
        The identity branch (official: ``with_idt`` and ``in == out``).

    Notes
    -----
    Deploy (:meth:`reparameterize`; official ``ECB.rep_params``), every branch a 3x3 conv with
    padding 1, then summed (rule 2):

    * ``conv1x1_3x3``: :func:`repnp.fusion.merge_sequential` (DBB transform III), exact at
      the borders because the 1x1 output is padded with ``b0``;
    * masked: :func:`repnp.fusion.masked_kernel` then :func:`repnp.fusion.merge_depthwise`:
      ``W[o, c] = s_o M_o W_0[o, c]``, ``b = bias + b_0 * sum(s_o M_o)`` -- the Sobel masks sum
      to 0, so their ``b0`` drops out; the Laplacian's too;
    * identity: :func:`repnp.fusion.identity_kernel` (3x3).
    """

    conv3x3: Conv2d
    conv1x1_3x3: SeqConv3x3
    conv1x1_sbx: SeqConv3x3
    conv1x1_sby: SeqConv3x3
    conv1x1_lpl: SeqConv3x3
    with_idt: bool = False

    def __post_init__(self) -> None:
        w = self.conv3x3.weight
        if w.shape[2:] != (3, 3) or self.conv3x3.groups != 1 or self.conv3x3.stride not in (1, (1, 1)) \
                or self.conv3x3.bias is None:
            raise ShapeError(f"ECB: conv3x3.weight {w.shape} must be a dense 3x3 conv with bias, stride 1")
        o, c = w.shape[:2]
        for name in ("conv1x1_3x3", *EDGE_BRANCHES):
            branch = getattr(self, name)
            if branch.in_channels != c or branch.out_channels != o:
                raise ShapeError(f"ECB: {name} maps {branch.in_channels} -> {branch.out_channels} channels, "
                                 f"conv3x3.weight {w.shape} maps {c} -> {o}")
            if branch.masked == (name == "conv1x1_3x3"):
                raise ShapeError(f"ECB: {name} must be {'a masked' if name != 'conv1x1_3x3' else 'the 1x1-3x3'} "
                                 f"branch")
        if self.with_idt and c != o:
            raise ShapeError(f"ECB: the identity branch needs in == out channels, conv3x3.weight is {w.shape}")

    @property
    def in_channels(self) -> int:
        return int(self.conv3x3.weight.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.conv3x3.weight.shape[0])

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, depth_multiplier: float = 2.0,
               with_idt: bool = False, eps: float | None = None, dtype=np.float64) -> "ECB":
        """A block with random weights (scales N(0, 0.5), not the official 1e-3, so that the edge
        branches matter). ``eps`` is accepted and ignored: ECB has no BN (callers that build every
        family the same way pass one)."""
        rng = np.random.default_rng(seed)
        conv = Conv2d(random_conv_weight(rng, out_channels, in_channels, 3, dtype=dtype),
                      (0.5 * rng.standard_normal(out_channels)).astype(dtype), padding=1)
        seq = SeqConv3x3.random(rng, in_channels, out_channels, depth_multiplier=depth_multiplier, dtype=dtype)
        edges = [SeqConv3x3.random(rng, in_channels, out_channels, kind=f"conv1x1-{k}", dtype=dtype)
                 for k in EDGE_BRANCHES.values()]
        return cls(conv, seq, *edges, with_idt=bool(with_idt) and in_channels == out_channels)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        branches = [lambda: self.conv3x3.describe(d, x, f"{prefix}conv3x3.")]
        for name in ("conv1x1_3x3", *EDGE_BRANCHES):
            branches.append(lambda name=name: getattr(self, name).describe(d, x, f"{prefix}{name}."))
        if self.with_idt:
            branches.append(lambda: x)
        return d.sum(branches, prefix)

    def branch_kernels(self) -> list[fusion.KernelBias]:
        """Each branch as one 3x3 conv (padding 1) on the block input, in forward order."""
        out = [fusion.KernelBias(self.conv3x3.weight, self.conv3x3.bias)]
        out += [getattr(self, name).fused() for name in ("conv1x1_3x3", *EDGE_BRANCHES)]
        if self.with_idt:
            w = self.conv3x3.weight
            out.append(fusion.KernelBias(fusion.identity_kernel(self.in_channels, kernel_size=3, dtype=w.dtype),
                                         None))
        return out

    def reparameterize(self) -> Conv2d:
        """One 3x3 conv with bias, padding 1 (PlainSR's ``conv3x3``)."""
        kernel, bias = fusion.add_branches(*self.branch_kernels())
        return Conv2d(kernel, bias, padding=1)

    @classmethod
    def from_params(cls, params, *, with_idt: bool = False) -> "ECB":
        """The inverse of :meth:`params` (the official names of one ECB's state dict).

        ``with_idt`` is not in the arrays (ECBSR's ``--idt_ecbsr``, default 0): a keyword; it is
        ignored when in != out, as the official constructor does.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        seq = [f"conv1x1_3x3.{k}" for k in ("k0", "b0", "k1", "b1")]
        edges = [f"{n}.{k}" for n in EDGE_BRANCHES for k in ("k0", "b0", "scale", "bias", "mask")]
        fp.check_keys(params, ["conv3x3.weight", "conv3x3.bias", *seq, *edges], what="ECB")

        def arr(key, ndim):
            return fp.array(params, key, ndim=ndim)

        conv = fp.conv_from(params, "conv3x3.", padding=1)
        try:
            branches = [SeqConv3x3(arr(seq[0], 4), arr(seq[1], 1), arr(seq[2], 4), arr(seq[3], 1))]
            for n in EDGE_BRANCHES:
                branches.append(SeqConv3x3(arr(f"{n}.k0", 4), arr(f"{n}.b0", 1), scale=arr(f"{n}.scale", 4),
                                           bias=arr(f"{n}.bias", 1), mask=arr(f"{n}.mask", 4)))
        except ShapeError as exc:
            shapes = {k: tuple(np.shape(params[k])) for k in seq + edges}
            raise ShapeError(f"{exc}; shapes {shapes}") from None
        idt = bool(with_idt) and conv.weight.shape[0] == conv.weight.shape[1]
        return cls(conv, *branches, with_idt=idt)


# --- the whole network: ECBSR and its deploy form PlainSR ----------------------------------------

#: Activations of the official ECBSR that its ``convert.py`` carries to PlainSR (it refuses the others).
SR_ACTIVATIONS = ("prelu", "relu", "linear")


@dataclass(frozen=True, eq=False)
class PReLU(Described):
    """``nn.PReLU(num_parameters=C)``: ``x`` where ``x >= 0``, else ``weight[c] * x``.

    Attributes
    ----------
    weight : ndarray, (C,)
        The slopes (``params()``: ``weight``, the official key).
    """

    weight: np.ndarray

    def __post_init__(self) -> None:
        if np.ndim(self.weight) != 1:
            raise ShapeError(f"PReLU: weight must be (C,), got shape {np.shape(self.weight)}")

    @property
    def in_channels(self) -> int:
        return int(np.shape(self.weight)[0])

    def reparameterize(self) -> "PReLU":
        return self

    @classmethod
    def random(cls, seed, channels: int, *, dtype=np.float64) -> "PReLU":
        """Slopes drawn U(0, 0.5) (PyTorch initialises them at 0.25), seeded."""
        return cls(np.random.default_rng(seed).uniform(0.0, 0.5, channels).astype(dtype))

    @classmethod
    def from_params(cls, params) -> "PReLU":
        """The inverse of :meth:`params`: ``{"weight": (C,)}`` (``ValueError`` / ``ShapeError`` naming the key)."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, ["weight"], what="PReLU")
        return cls(fp.array(params, "weight", ndim=1))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        # ONNX PRelu broadcasts the slope against NCHW from the right: (C,) as (C, 1, 1), the
        # initializer shape PyTorch exports (an Unsqueeze of the (C,) weight before folding).
        slope = d.node("Reshape", [d.param(f"{prefix}weight", self.weight)], prefix, shape=[-1, 1, 1])
        return d.node("PRelu", [x, slope], prefix)


def _check_sr_activation(act_type: str) -> str:
    if act_type not in SR_ACTIVATIONS:
        raise ValueError(f"act_type must be one of {SR_ACTIVATIONS} (the ones the official convert.py carries "
                         f"to PlainSR), got {act_type!r}")
    return act_type


@dataclass(frozen=True, eq=False)
class _SuperResolution(Described):
    """Shared structure of ECBSR and PlainSR: ``PixelShuffle(backbone(x) + x)``."""

    backbone: tuple
    activations: tuple
    scale: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone", tuple(self.backbone))
        object.__setattr__(self, "activations", tuple(self.activations))
        object.__setattr__(self, "scale", int(self.scale))
        name = type(self).__name__
        if len(self.backbone) < 2 or len(self.activations) != len(self.backbone):
            raise ValueError(f"{name}: need a head and a tail layer and one activation entry per layer, got "
                             f"{len(self.backbone)} layers and {len(self.activations)} activations")
        if self.activations[-1] != "linear":
            raise ValueError(f"{name}: the tail layer has no activation (official act_type='linear'), "
                             f"got {self.activations[-1]!r}")
        for i, (layer, act) in enumerate(zip(self.backbone, self.activations)):
            if i and layer.in_channels != self.backbone[i - 1].out_channels:
                raise ShapeError(f"{name}: backbone.{i} reads {layer.in_channels} channels, backbone.{i - 1} "
                                 f"writes {self.backbone[i - 1].out_channels}")
            if isinstance(act, PReLU):
                if act.in_channels != layer.out_channels:
                    raise ShapeError(f"{name}: backbone.{i}.act.weight has {act.in_channels} slopes for "
                                     f"{layer.out_channels} channels")
            elif act not in ("relu", "linear"):
                raise ValueError(f"{name}: backbone.{i}'s activation must be a PReLU, 'relu' or 'linear', got {act!r}")
        if self.scale < 1:
            raise ValueError(f"{name}: scale must be >= 1, got {self.scale}")
        colors, out = self.colors, self.backbone[-1].out_channels
        if out != colors * self.scale ** 2:
            raise ShapeError(f"{name}: the tail writes {out} channels, PixelShuffle({self.scale}) of {colors} "
                             f"colour(s) needs colors * scale**2 = {colors * self.scale ** 2}")
        if colors != 1 and self.scale != 1:
            # backbone(x) + x broadcasts x's channels: PyTorch refuses (colors*s^2) + (colors) for colors > 1.
            raise ShapeError(f"{name}: the official forward adds x ({colors} channels) to the tail's {out} "
                             f"channels by broadcasting, which needs colors == 1 (or scale == 1)")

    @property
    def in_channels(self) -> int:
        return int(self.backbone[0].in_channels)

    @property
    def colors(self) -> int:
        return self.in_channels

    def _describe_layer(self, d: Dataflow, layer, x: str, prefix: str) -> str:   # pragma: no cover
        raise NotImplementedError

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """The official ``forward``: each layer then its activation, ``+ x``, ``PixelShuffle``."""
        y = x
        for i, (layer, act) in enumerate(zip(self.backbone, self.activations)):
            where = f"{prefix}backbone.{i}."
            y = self._describe_layer(d, layer, y, where)
            if isinstance(act, PReLU):
                y = act.describe(d, y, f"{where}act.")
            elif act == "relu":
                y = d.node("Relu", [y], f"{where}act.")
        y = d.add(y, x, prefix)
        return d.node("DepthToSpace", [y], f"{prefix}upsampler.", blocksize=self.scale, mode="CRD")


def _sr_activations(params, layers: int, act_type: str) -> tuple:
    """One activation per layer from the state dict: ``backbone.{i}.act.weight`` a PReLU; the
    tail ``linear``; a body layer without slopes ``act_type`` (``relu`` / ``linear``)."""
    out = []
    for i in range(layers):
        key = f"backbone.{i}.act.weight"
        if i == layers - 1:
            if key in params:
                raise ValueError(f"{key!r}: the tail layer has no activation (official act_type='linear')")
            out.append("linear")
        elif key in params:
            if act_type != "prelu":
                raise ValueError(f"{key!r} is a PReLU slope, but act_type={act_type!r}")
            out.append(PReLU(np.asarray(params[key])))
        elif act_type == "prelu":
            raise ValueError(f"missing key {key!r} (act_type='prelu'; pass act_type='relu' or 'linear' for a "
                             f"network without slopes)")
        else:
            out.append(act_type)
    return tuple(out)


def _sr_from_params(params, what: str, act_type: str, layer) -> tuple:
    """``(layers, activations, scale)`` of an ECBSR / PlainSR state dict: ``layer(i, sub)`` builds
    layer ``i`` from its ``backbone.{i}.*`` arrays (the PReLU slopes taken out)."""
    from repnp.blocks import fromparams as fp

    _check_sr_activation(act_type)
    n = _layer_count(params, what)
    acts = _sr_activations(params, n, act_type)
    layers = [layer(i, {k: v for k, v in fp.sub(params, f"backbone.{i}.").items() if k != "act.weight"})
              for i in range(n)]
    return tuple(layers), acts, _scale_of(layers[-1].out_channels, layers[0].in_channels, what)


def _layer_count(params, what: str) -> int:
    indices = set()
    for key in params:
        parts = str(key).split(".")
        if len(parts) < 3 or parts[0] != "backbone" or not parts[1].isdigit():
            raise ValueError(f"{what}: unexpected key {key!r} (every key is backbone.<i>.<name>)")
        indices.add(int(parts[1]))
    if not indices or indices != set(range(max(indices) + 1)):
        raise ValueError(f"{what}: backbone indices must be 0..n-1, got {sorted(indices)}")
    return max(indices) + 1


def _scale_of(out: int, colors: int, what: str) -> int:
    scale = int(round(np.sqrt(out / colors))) if colors else 0
    if scale < 1 or colors * scale * scale != out:
        raise ShapeError(f"{what}: the tail writes {out} channels, not colors * scale**2 for {colors} colour(s)")
    return scale


@dataclass(frozen=True, eq=False)
class ECBSR(_SuperResolution):
    """Train form of the ECBSR network (official ``models.ecbsr.ECBSR``).

    ``y = PixelShuffle_s(L_{m+1}(a(L_m(... a(L_0(x))))) + x)``, every ``L_i`` an :class:`ECB`.

    Attributes
    ----------
    backbone : tuple of ECB
        Head (``colors`` -> ``C``), ``module_nums`` body ECBs (``C`` -> ``C``), tail (``C`` ->
        ``colors * scale**2``); official ``depth_multiplier=2.0``.
    activations : tuple
        Per layer: a :class:`PReLU` (official ``prelu``, its slopes ``backbone.{i}.act.weight``),
        ``"relu"`` or ``"linear"``; the tail's is ``"linear"``.
    scale : int
        The upscaling factor (``PixelShuffle``).

    Notes
    -----
    Deploy (:meth:`reparameterize`, official ``convert.py``): each ECB becomes one 3x3 conv
    (:meth:`ECB.reparameterize`), the activations, the residual and the PixelShuffle stay:
    :class:`PlainSR`. ``params()`` are the official state dict's keys (``backbone.{i}.conv3x3.weight``,
    ``backbone.{i}.conv1x1_sbx.mask`` ..., ``backbone.{i}.act.weight``).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, layer in enumerate(self.backbone):
            if not isinstance(layer, ECB):
                raise TypeError(f"ECBSR: backbone.{i} must be an ECB, got {type(layer).__name__}")

    def _describe_layer(self, d: Dataflow, layer, x: str, prefix: str) -> str:
        return layer.describe(d, x, prefix)

    @classmethod
    def random(cls, seed, *, module_nums: int = 1, channel_nums: int = 4, scale: int = 2, colors: int = 1,
               act_type: str = "prelu", with_idt: bool = False, dtype=np.float64) -> "ECBSR":
        """Random ECBs (:meth:`ECB.random`) scaled by 1/2 so that activations keep their size
        through the five summed branches; PReLU slopes U(0, 0.5)."""
        _check_sr_activation(act_type)
        rng = np.random.default_rng(seed)
        widths = [colors] + [channel_nums] * (module_nums + 1) + [colors * scale * scale]
        layers, acts = [], []
        for i in range(len(widths) - 1):
            ecb = ECB.random(rng.integers(2**31), widths[i], widths[i + 1], with_idt=with_idt, dtype=dtype)
            layers.append(_halved(ecb))
            last = i == len(widths) - 2
            act = "linear" if last else act_type
            acts.append(PReLU(rng.uniform(0, 0.5, widths[i + 1]).astype(dtype)) if act == "prelu" else act)
        return cls(tuple(layers), tuple(acts), scale)

    @classmethod
    def from_params(cls, params, *, act_type: str = "prelu", with_idt: bool = False) -> "ECBSR":
        """The inverse of :meth:`params`: the official ECBSR state dict.

        The layer count, colours and scale come from the arrays (``colors`` the head's input
        channels, ``scale`` from the tail's ``colors * scale**2`` outputs); ``act_type`` (official
        ``--act_type``, default ``prelu``: slopes ``backbone.{i}.act.weight``) and ``with_idt``
        (``--idt_ecbsr``) are not in the arrays.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together.
        """
        def layer(i, sub):
            try:
                return ECB.from_params(sub, with_idt=with_idt)
            except ValueError as exc:
                raise type(exc)(f"backbone.{i}: {exc}") from None
        return cls(*_sr_from_params(params, "ECBSR", act_type, layer))

    def reparameterize(self) -> "PlainSR":
        """The official PlainSR: each ECB's one 3x3 conv, the same activations (``convert.py``)."""
        return PlainSR(tuple(layer.reparameterize() for layer in self.backbone), self.activations, self.scale)


def _halved(ecb: ECB) -> ECB:
    """``ecb`` with every branch's last conv halved (the sum of ~5 branches keeps its input's size)."""
    from dataclasses import replace

    def half(a):
        return (a * 0.5).astype(a.dtype)

    conv = Conv2d(half(ecb.conv3x3.weight), half(ecb.conv3x3.bias), padding=1)
    seq = replace(ecb.conv1x1_3x3, k1=half(ecb.conv1x1_3x3.k1), b1=half(ecb.conv1x1_3x3.b1))
    edges = [replace(getattr(ecb, n), scale=half(getattr(ecb, n).scale), bias=half(getattr(ecb, n).bias))
             for n in EDGE_BRANCHES]
    return ECB(conv, seq, *edges, with_idt=ecb.with_idt)


@dataclass(frozen=True, eq=False)
class PlainSR(_SuperResolution):
    """Deploy form of :class:`ECBSR` (official ``models.plainsr.PlainSR``): per layer one 3x3
    conv with bias (``backbone.{i}.conv3x3``) and the activation, ``+ x``, ``PixelShuffle``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, layer in enumerate(self.backbone):
            if not isinstance(layer, Conv2d) or layer.weight.shape[2:] != (3, 3) or layer.bias is None:
                raise TypeError(f"PlainSR: backbone.{i} must be a 3x3 Conv2d with bias")

    def _describe_layer(self, d: Dataflow, layer, x: str, prefix: str) -> str:
        return layer.describe(d, x, f"{prefix}conv3x3.")

    def reparameterize(self) -> "PlainSR":
        return self

    @classmethod
    def from_params(cls, params, *, act_type: str = "prelu") -> "PlainSR":
        """The inverse of :meth:`params`: the official PlainSR state dict (``convert.py``'s)."""
        from repnp.blocks import fromparams as fp

        def layer(i, sub):
            fp.check_keys(sub, ["conv3x3.weight", "conv3x3.bias"], what=f"PlainSR backbone.{i}")
            return fp.conv_from(sub, "conv3x3.", padding=1)
        return cls(*_sr_from_params(params, "PlainSR", act_type, layer))
