"""Network pieces shared by the block families: activation, containers, classifier head.

Also the small helpers every family uses: the conv of a layer that is a
``ConvBN`` (train form) or a ``Conv2d`` (deploy form), its channels, its
deploy form (:func:`layer_conv`, :func:`layer_in_channels`,
:func:`deploy_layer` ...), and input / configuration checks.

These are not re-parameterizable by themselves; they carry the non-linear and
structural parts of a network (an activation, a sequence of layers, a global
average pool followed by a fully connected layer) so that whole networks have
the same protocol as blocks (``describe``, hence ``forward``, ``trace`` and
``params``, and ``reparameterize``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion, ops
from repnp.blocks.base import Conv2d, ConvBN, pair
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["Activation", "RELU", "RELU6", "SIGMOID", "as_activation", "ConvAct", "Sequential",
           "ClassifierHead", "check_odd_kernel", "check_square_kernel", "check_groups",
           "same_padding", "resolve_skip", "check_1x1_aligned", "check_skip_geometry",
           "layer_conv", "deploy_layer", "layer_kernel_bias", "layer_in_channels", "layer_out_channels",
           "check_activation", "check_input"]


# ----------------------------------------------------------------------------
# layers that are a ConvBN (train form) or a Conv2d (deploy form)
# ----------------------------------------------------------------------------

def layer_conv(layer: ConvBN | Conv2d) -> Conv2d:
    """The conv of a train-form ``ConvBN``, or a deploy-form ``Conv2d`` itself."""
    return layer.conv if isinstance(layer, ConvBN) else layer


def deploy_layer(layer: ConvBN | Conv2d | None) -> Conv2d | None:
    """A ``ConvBN`` folded into a ``Conv2d`` (rule 1); a ``Conv2d`` or ``None`` unchanged."""
    return layer.reparameterize() if isinstance(layer, ConvBN) else layer


def layer_kernel_bias(layer: ConvBN | Conv2d) -> fusion.KernelBias:
    """A layer's conv as (kernel, bias) with its BN folded in; a missing bias is zeros."""
    if isinstance(layer, ConvBN):
        return layer.fused()
    bias = layer.bias if layer.bias is not None else np.zeros(layer.out_channels, dtype=layer.weight.dtype)
    return fusion.KernelBias(layer.weight, bias)


def layer_in_channels(layer: ConvBN | Conv2d) -> int:
    """Input channels of a layer's conv: ``I * groups`` of its OIHW weight."""
    conv = layer_conv(layer)
    return int(conv.weight.shape[1] * conv.groups)


def layer_out_channels(layer: ConvBN | Conv2d) -> int:
    """Output channels of a layer's conv: ``O`` of its OIHW weight."""
    return layer_conv(layer).out_channels


# ----------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------

def check_activation(name: str) -> str:
    """``name`` if it is a key of :data:`repnp.ops.ACTIVATIONS`, else ``ValueError``."""
    if name not in ops.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ops.ACTIVATIONS)}, got {name!r}")
    return name


def check_input(x, channels: int, *, name: str = "x") -> np.ndarray:
    """``x`` as an array, checked to be NCHW with ``channels`` channels (``ShapeError`` if not)."""
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] != channels:
        raise ShapeError(f"{name} must be NCHW with C = {channels}, got shape {x.shape}")
    return x


# ----------------------------------------------------------------------------
# activation, containers, classifier head
# ----------------------------------------------------------------------------

#: Operator types of each activation (ONNX spelling); ``identity`` launches none.
_ACTIVATION_OPS = {
    "identity": (),
    "relu": ("Relu",),
    "relu6": ("Clip",),
    "sigmoid": ("Sigmoid",),
    "gelu": ("Gelu",),
    "hardswish": ("HardSwish",),
    "silu": ("Sigmoid", "Mul"),  # x * sigmoid(x): ONNX has no SiLU operator before opset 24
}


# eq=True (unlike the blocks): an Activation holds no array, only its name, so the generated
# __eq__/__hash__ compare names and ``block.activation == RELU`` means what it says.
@dataclass(frozen=True)
class Activation(Described):
    """An element-wise activation by name (a key of :data:`repnp.ops.ACTIVATIONS`).

    The one representation of an activation in every block family: a block
    with a configurable activation (RepVGG, MobileOne, the separable blocks,
    ResRep nets, ``ConvAct``) stores an ``Activation`` in its ``activation``
    field; the families whose papers fix the activation (MobileNetV2's ReLU6,
    ShuffleNet's and NASNet's ReLU, the squeeze-excite gate) use the constants
    :data:`RELU`, :data:`RELU6`, :data:`SIGMOID`. Computing (``forward``),
    recording (``trace``) and exporting (:mod:`repnp.io.onnx.export`) an activation
    therefore go through its one :meth:`describe`. Block constructors and ``random`` also
    accept the name and convert it with :func:`as_activation`.
    """

    name: str = "relu"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Activation name must be a str, got {type(self.name).__name__} {self.name!r}")
        check_activation(self.name)

    @property
    def op_types(self) -> tuple[str, ...]:
        """ONNX operator types a runtime launches for it, in order (none for ``identity``)."""
        return _ACTIVATION_OPS[self.name]

    def check_input(self, x):
        return (np.asarray(x),)

    def reparameterize(self) -> "Activation":
        return self

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        scope = f"{prefix}act"
        if self.name == "relu6":
            return d.node("Clip", [x], scope, min=0.0, max=6.0)
        if self.name == "silu":          # x * sigmoid(x): ONNX has no SiLU operator before opset 24
            return d.node("Mul", [x, d.node("Sigmoid", [x], scope)], scope)
        out = x
        for op_type in self.op_types:
            out = d.node(op_type, [out], scope)
        return out

    @classmethod
    def from_params(cls, params, *, name: str = "relu") -> "Activation":
        """The inverse of :meth:`params` (no array): the activation is the keyword ``name``."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, [], what="Activation")
        return cls(name)


#: The activations that papers fix: ShuffleNet's and NASNet's ReLU, MobileNetV2's ReLU6, the SE gate.
RELU = Activation("relu")
RELU6 = Activation("relu6")
SIGMOID = Activation("sigmoid")


def as_activation(activation: Activation | str, *, name: str = "activation") -> Activation:
    """``activation`` as an :class:`Activation`: an ``Activation`` is kept, a name converted.

    Blocks call it in ``__post_init__`` (``object.__setattr__`` on the frozen
    field), so that ``RegularConvBlock(conv, "relu6")`` and
    ``RegularConvBlock(conv, Activation("relu6"))`` build the same block.

    Raises
    ------
    ValueError
        If the name is not a key of :data:`repnp.ops.ACTIVATIONS`.
    TypeError
        If ``activation`` is neither a str nor an ``Activation`` (the message
        names the argument ``name``).
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        return Activation(activation)
    raise TypeError(f"{name} must be an Activation or one of {sorted(ops.ACTIVATIONS)}, got "
                    f"{type(activation).__name__} {activation!r}")


@dataclass(frozen=True, eq=False)
class ConvAct(Described):
    """A conv with bias, an optional squeeze-excite, then an activation: ``act(se(conv(x)))``.

    The deploy form of RepVGG and MobileOne blocks (MobileOne-S4 keeps its SE
    after re-parameterization: the SE's global pooling is not linear in x).
    """

    conv: Conv2d
    activation: Activation = RELU
    se: object | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))

    def check_input(self, x):
        return self.conv.check_input(x)

    def reparameterize(self) -> "ConvAct":
        return self

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        y = self.conv.describe(d, x, f"{prefix}conv.")
        if self.se is not None:
            y = self.se.describe(d, y, f"{prefix}se.")
        return self.activation.describe(d, y, prefix)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int = 1,
                    activation: Activation | str = "relu") -> "ConvAct":
        """The inverse of :meth:`params`: ``conv.weight`` [``conv.bias``] and, if present, ``se.*``
        (:meth:`repnp.blocks.SqueezeExcite.from_params`). ``padding=None`` is the centred
        ``dilation * (K//2)``; geometry and activation are keywords."""
        from repnp.blocks import fromparams as fp
        from repnp.blocks.se import SqueezeExcite

        se_keys = [k for k in params if k.startswith("se.")]
        fp.check_keys(params, fp.conv_keys(params, "conv.") + se_keys, what="ConvAct")
        conv = fp.conv_from(params, "conv.", stride=stride, padding=padding, dilation=dilation, groups=groups)
        se = SqueezeExcite.from_params(fp.sub(params, "se.")) if se_keys else None
        return cls(conv, activation, se)


def _reparameterize(module):
    """A module's deploy form; modules without one (an activation, a plain conv) are their own."""
    rep = getattr(module, "reparameterize", None)
    return rep() if rep is not None else module


@dataclass(frozen=True, eq=False)
class Sequential(Described):
    """Layers applied one after another; ``names`` prefix their parameter names.

    ``names`` defaults to the indices ``"0", "1", ...`` (as PyTorch's
    ``nn.Sequential`` names its children).
    """

    layers: tuple
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.names is None:
            object.__setattr__(self, "names", tuple(str(i) for i in range(len(self.layers))))
        else:
            object.__setattr__(self, "names", tuple(self.names))
        if len(self.names) != len(self.layers):
            raise ValueError(f"names has {len(self.names)} entries for {len(self.layers)} layers")

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def check_input(self, x):
        return self.layers[0].check_input(x) if self.layers else (np.asarray(x),)

    def reparameterize(self) -> "Sequential":
        return Sequential(tuple(_reparameterize(layer) for layer in self.layers), self.names)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        for name, layer in zip(self.names, self.layers):
            x = layer.describe(d, x, f"{prefix}{name}.")
        return x

    @classmethod
    def from_params(cls, params, *, layers) -> "Sequential":
        """The inverse of :meth:`params`. The layer types are not in the arrays: ``layers`` gives
        them, a sequence of ``(name, class, config)`` (``config`` a dict of that class's
        ``from_params`` keywords); each layer is built from the keys under ``<name>.``.

        Raises
        ------
        ValueError
            Keys under no layer's name (named), or a layer's own key errors.
        """
        from repnp.blocks import fromparams as fp

        layers = [tuple(entry) for entry in layers]
        names = [str(name) for name, _, _ in layers]
        stray = [k for k in params if not any(k.startswith(f"{n}.") for n in names)]
        if stray:
            raise ValueError(f"Sequential: unexpected key(s) {stray}; the layers are {names}")
        built = tuple(kind.from_params(fp.sub(params, f"{name}."), **dict(config)) for name, kind, config in layers)
        return cls(built, tuple(names))


@dataclass(frozen=True, eq=False)
class ClassifierHead(Described):
    """Global average pooling, flatten, fully connected: ``linear(mean_hw(x), W, b)``."""

    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def random(cls, seed, in_features: int, num_classes: int, *, dtype=np.float64) -> "ClassifierHead":
        """Weight N(0, 1/in_features), bias N(0, 0.1^2)."""
        rng = np.random.default_rng(seed)
        weight = rng.standard_normal((num_classes, in_features)) / np.sqrt(in_features)
        bias = 0.1 * rng.standard_normal(num_classes)
        return cls(weight.astype(dtype), bias.astype(dtype))

    def check_input(self, x):
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1] != self.weight.shape[1]:
            raise ShapeError(
                f"x must be NCHW with C = {self.weight.shape[1]} (weight {self.weight.shape}), got {x.shape}"
            )
        return (x,)

    def reparameterize(self) -> "ClassifierHead":
        return self

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        weight, bias = d.param(f"{prefix}weight", self.weight), d.param(f"{prefix}bias", self.bias)
        flat = d.node("Flatten", [d.node("GlobalAveragePool", [x], prefix)], prefix, axis=1)
        return d.node("Gemm", [flat, weight, bias], prefix, transB=1)

    @classmethod
    def from_params(cls, params) -> "ClassifierHead":
        """The inverse of :meth:`params`: ``weight`` (classes, features), ``bias`` (classes,)."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, ["weight", "bias"], what="ClassifierHead")
        weight, bias = fp.array(params, "weight", ndim=2), fp.array(params, "bias", ndim=1)
        if bias.shape != weight.shape[:1]:
            raise ShapeError(f"'bias' has shape {bias.shape}, 'weight' {weight.shape} needs ({weight.shape[0]},)")
        return cls(weight, bias)


# ----------------------------------------------------------------------------
# validation and the shared branch fusion
# ----------------------------------------------------------------------------

def check_odd_kernel(kernel_size: int) -> int:
    """``kernel_size`` as an int; even sizes have no centre tap to align the branches on."""
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd and >= 1 so that the 1x1 and identity branches can sit at "
            f"its centre, got {kernel_size}"
        )
    return k


def check_square_kernel(weight, *, name: str) -> int:
    """The kernel size K of an (O, I, K, K) ``weight``: ``ValueError`` if K is even
    (:func:`check_odd_kernel`), ``ShapeError`` naming ``name`` if the kernel is not square."""
    k = check_odd_kernel(weight.shape[2])
    if weight.shape[3] != k:
        raise ShapeError(f"{name} must be square (K, K), got {weight.shape}")
    return k


def check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    """``ShapeError`` unless ``groups >= 1`` divides both channel counts."""
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ShapeError(
            f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
        )


def same_padding(kernel_size: int, dilation: int, padding) -> int:
    """The KxK branch's padding: ``d * (K // 2)`` (output size ``ceil(H / s)``) unless given.

    A padding below ``d * (K // 2)`` would need a negative padding for the
    centred 1x1 branch (``p - d * (K // 2)``, see :meth:`repnp.blocks.RepVGGBlock.reparameterize`).
    """
    centre = dilation * (kernel_size // 2)
    p = centre if padding is None else int(padding)
    if p < centre:
        raise ValueError(
            f"padding={p} is below dilation*(kernel_size//2) = {centre}: the 1x1 branch would need "
            f"padding {p - centre} < 0 to stay aligned with the centre tap"
        )
    return p


def resolve_skip(requested: bool | None, *, name: str, in_channels: int, out_channels: int,
                 stride: int, padding: int, kernel_size: int, dilation: int) -> bool:
    """Whether a block gets its BN-only skip: ``None`` means "when possible".

    Possible when the KxK branch keeps the input size and channels: stride 1,
    ``in_channels == out_channels`` and padding ``dilation * (kernel_size // 2)``.
    Asking for it (``True``) where it is impossible raises ``ValueError``.
    """
    centre = dilation * (kernel_size // 2)
    possible = stride == 1 and in_channels == out_channels and padding == centre
    if requested is None:
        return possible
    if requested and not possible:
        raise ValueError(
            f"{name}=True needs stride 1, in_channels == out_channels and padding "
            f"dilation*(kernel_size//2) = {centre}, got stride={stride}, in_channels={in_channels}, "
            f"out_channels={out_channels}, padding={padding}"
        )
    return bool(requested)


def check_1x1_aligned(kxk: Conv2d, one: Conv2d, *, name: str) -> None:
    """A 1x1 branch must share the KxK conv's stride and groups and sit at its centre tap.

    Its padding must be the KxK padding minus ``d * (K // 2)`` on every side
    (see :meth:`repnp.blocks.RepVGGBlock.reparameterize`), else the summed kernels are misaligned.
    """
    k = kxk.weight.shape[2:]
    if one.weight.shape != kxk.weight.shape[:2] + (1, 1):
        raise ShapeError(f"{name}.conv.weight must have shape {kxk.weight.shape[:2] + (1, 1)} to pair "
                         f"with the KxK weight {kxk.weight.shape}, got {one.weight.shape}")
    if pair(one.stride) != pair(kxk.stride) or one.groups != kxk.groups:
        raise ValueError(f"{name} must share the KxK conv's stride and groups, got stride {one.stride} "
                         f"vs {kxk.stride}, groups {one.groups} vs {kxk.groups}")
    dh, dw = pair(kxk.dilation)
    centre = (dh * (k[0] // 2), dw * (k[1] // 2))
    expected = tuple(p - centre[i % 2] for i, p in enumerate(ops.normalize_padding(kxk.padding)))
    if ops.normalize_padding(one.padding) != expected:
        raise ValueError(
            f"{name} padding must be the KxK padding minus dilation*(K//2) = {expected} "
            f"(top, left, bottom, right) to stay aligned with the centre tap, got {one.padding}"
        )


def check_skip_geometry(kxk: Conv2d, *, name: str) -> None:
    """A BN-only branch needs a KxK conv that keeps size and channels (stride 1, 'same' padding)."""
    k = kxk.weight.shape[2:]
    dh, dw = pair(kxk.dilation)
    same = (dh * (k[0] // 2), dw * (k[1] // 2)) * 2
    c_in, c_out = kxk.weight.shape[1] * kxk.groups, kxk.weight.shape[0]
    if pair(kxk.stride) != (1, 1) or c_in != c_out or ops.normalize_padding(kxk.padding) != same:
        raise ValueError(
            f"the {name} branch needs stride 1, in_channels == out_channels and padding {same} "
            f"(output size = input size), got stride={kxk.stride}, in_channels={c_in}, "
            f"out_channels={c_out}, padding={kxk.padding}"
        )
