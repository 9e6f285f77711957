"""Helpers of the ``from_params`` constructors: the inverse of every block's ``params()``.

``Block.from_params(params, **config)`` rebuilds a block from the flat
``{name: array}`` mapping its ``params()`` returns (prefix ``""``); what the
arrays cannot tell (stride, padding, dilation, an activation, a BN epsilon, a
structure such as a ``Sequential``'s layer types) comes as keywords. The
helpers here read one piece (a conv, a BN, a conv-BN, a layer that is either)
and check that the keys are exactly the expected ones:

* a missing or unexpected key raises :class:`ValueError` naming the keys;
* arrays whose shapes do not fit raise :class:`repnp.errors.ShapeError`
  naming the keys (quoted) and their shapes.

Names in messages are quoted (``'conv_kxk.bn.var'``) so that a caller who
renamed the keys (the ``.npz`` converter, :mod:`repnp.io.npz`) can map them
back to its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.errors import ShapeError
from repnp.ops import pair

__all__ = ["NeedsOption", "check_keys", "sub", "has", "array", "bn_from", "conv_from", "conv_bn_from", "layer_from",
           "centred_padding", "indices", "conv_keys", "conv_bn_keys", "layer_keys", "bn_keys"]

_BN_KEYS = ("mean", "var", "gamma", "beta")


class NeedsOption(ValueError):
    """A block needs a configuration keyword the arrays cannot tell and none was given
    (RepMLP's ``partition`` when a local branch is larger than 1x1)."""


def check_keys(params: Mapping, expected, *, what: str) -> None:
    """``ValueError`` naming the missing and unexpected keys unless ``set(params) == set(expected)``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{what}: params must be a mapping of names to arrays, got {type(params).__name__}")
    expected = list(expected)
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected}")
        raise ValueError(f"{what}: {' and '.join(parts)}; expected exactly {expected}")


def sub(params: Mapping, prefix: str) -> dict:
    """The entries of ``params`` under ``prefix`` (``"conv_kxk."``), the prefix removed, in order."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def has(params: Mapping, prefix: str) -> bool:
    """Whether any key starts with ``prefix``."""
    return any(k.startswith(prefix) for k in params)


def indices(params: Mapping, head: str) -> list[int]:
    """The sorted ``i`` of keys ``<head><i>.…`` (a ModuleList such as ``conv_kxk.0.``)."""
    found = set()
    for key in params:
        if key.startswith(head):
            first = key[len(head):].split(".", 1)[0]
            if first.isdigit():
                found.add(int(first))
    return sorted(found)


def array(params: Mapping, key: str, *, ndim: int, prefix: str = "") -> np.ndarray:
    """``params[key]`` as an array of ``ndim`` dimensions (``ShapeError`` naming ``prefix + key`` if not)."""
    value = np.asarray(params[key])
    if value.ndim != ndim:
        raise ShapeError(f"'{prefix}{key}' must be {ndim}-D, got shape {value.shape}")
    return value


def bn_from(params: Mapping, prefix: str = "", *, eps: float = 1e-5) -> BatchNorm:
    """A :class:`BatchNorm` from ``<prefix>mean, var, gamma, beta``, all of one shape (C,)."""
    keys = [f"{prefix}{k}" for k in _BN_KEYS]
    shapes = {k: np.shape(params[k]) for k in keys}
    if len(set(shapes.values())) != 1 or len(shapes[keys[0]]) != 1:
        raise ShapeError(f"BN '{prefix.rstrip('.')}': the vectors must all have one shape (C,), got {shapes}")
    if shapes[keys[0]] == (0,):
        raise ShapeError(f"BN '{prefix.rstrip('.')}': the vectors have shape (0,), a BN over no channel")
    return BatchNorm(*(np.asarray(params[k]) for k in keys), eps=eps)


def centred_padding(kernel_shape, padding, dilation):
    """``padding`` if given, else ``dilation * (K//2)`` per axis (the output keeps the input size)."""
    if padding is not None:
        return padding
    dh, dw = pair(dilation, name="dilation")
    ph, pw = dh * (kernel_shape[0] // 2), dw * (kernel_shape[1] // 2)
    return ph if ph == pw else (ph, pw)


def conv_from(params: Mapping, prefix: str = "", *, stride=1, padding=None, dilation=1,
              groups: int = 1) -> Conv2d:
    """A :class:`Conv2d` from ``<prefix>weight`` (OIHW) and an optional ``<prefix>bias`` (O,).

    ``padding=None`` is the centred default ``dilation * (K//2)``.
    """
    weight = array(params, f"{prefix}weight", ndim=4)
    if weight.size == 0:        # no output channel, no input channel or no tap: nothing to fuse, and
        # channel counts divide (groups = O / (C/groups)) further on
        raise ShapeError(f"'{prefix}weight' has shape {weight.shape}, with a dimension of size 0")
    bias = params.get(f"{prefix}bias")
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (weight.shape[0],):
            raise ShapeError(f"'{prefix}bias' has shape {bias.shape}, but '{prefix}weight' {weight.shape} "
                             f"needs ({weight.shape[0]},)")
    return Conv2d(weight, bias, stride=stride, padding=centred_padding(weight.shape[2:], padding, dilation),
                  dilation=dilation, groups=groups)


def conv_bn_from(params: Mapping, prefix: str = "", *, stride=1, padding=None, dilation=1, groups: int = 1,
                 eps: float = 1e-5) -> ConvBN:
    """A :class:`ConvBN` from ``<prefix>conv.weight`` [``conv.bias``] and ``<prefix>bn.*``."""
    conv = conv_from(params, f"{prefix}conv.", stride=stride, padding=padding, dilation=dilation, groups=groups)
    bn = bn_from(params, f"{prefix}bn.", eps=eps)
    if bn.channels != conv.out_channels:
        raise ShapeError(f"BN '{prefix}bn' has {bn.channels} channels ('{prefix}bn.mean' shape ({bn.channels},)) "
                         f"but '{prefix}conv.weight' has shape {conv.weight.shape}, O = {conv.out_channels}")
    return ConvBN(conv, bn)


def conv_keys(params: Mapping, prefix: str) -> list[str]:
    """The keys a conv under ``prefix`` may have: ``weight`` and, when present, ``bias``."""
    return [f"{prefix}weight"] + ([f"{prefix}bias"] if f"{prefix}bias" in params else [])


def conv_bn_keys(params: Mapping, prefix: str) -> list[str]:
    """The keys of a conv-BN under ``prefix``."""
    return conv_keys(params, f"{prefix}conv.") + [f"{prefix}bn.{k}" for k in _BN_KEYS]


def layer_keys(params: Mapping, prefix: str) -> list[str]:
    """The keys of a layer that is a conv-BN (``conv.``/``bn.`` keys) or a plain conv (``weight``)."""
    return conv_bn_keys(params, prefix) if has(params, f"{prefix}bn.") else conv_keys(params, prefix)


def layer_from(params: Mapping, prefix: str = "", *, stride=1, padding=None, dilation=1, groups: int = 1,
               eps: float = 1e-5) -> ConvBN | Conv2d:
    """A train-form :class:`ConvBN` (``<prefix>bn.*`` present) or a deploy-form :class:`Conv2d`.

    The layers of the separable, ShuffleNet, MobileNetV2 and NASNet blocks
    are either (train form / deploy form): ``params()`` of a ``ConvBN`` is
    ``conv.* + bn.*``, of a ``Conv2d`` ``weight [+ bias]``.
    """
    if has(params, f"{prefix}bn."):
        return conv_bn_from(params, prefix, stride=stride, padding=padding, dilation=dilation, groups=groups,
                            eps=eps)
    return conv_from(params, prefix, stride=stride, padding=padding, dilation=dilation, groups=groups)


def bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}{k}" for k in _BN_KEYS]


def groups_from_identity(identity: BatchNorm | None, kernel_shape, *, name: str, key: str) -> int:
    """``groups`` of a block whose branches are summed, read from its identity branch if it has one.

    An identity branch needs ``C_in == C_out == O``, so a kernel (O, C/groups, ...) tells
    ``groups = O / (C/groups)``; without one the arrays do not tell, and 1 is as good as any
    (summed kernels add element-wise whatever the grouping).

    Raises
    ------
    ShapeError
        The identity BN's channel count does not fit the kernel ``key`` (both named).
    """
    if identity is None:
        return 1
    o, i = kernel_shape[:2]
    if i == 0 or identity.channels != o or o % i:
        raise ShapeError(f"identity BN {name!r} has {identity.channels} channels, {key} has (O, C/groups) = "
                         f"{(o, i)}: an identity branch needs C_in == C_out == O and O divisible by C/groups")
    return o // i

