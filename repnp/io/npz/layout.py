"""Finding a scheme's blocks in a state dict and renaming their keys to the blocks' parameter names.

Generic over :mod:`repnp.io.npz.schemes`: a module is read by its kind (conv,
BN, 1x1 conv as a matrix, single tensor), never by its family. Blocks are found
by key *prefix* (``stages.0.blocks.1.``), never by the order of the dict, and a
prefix is a whole module path: ``blocks.1.`` does not capture ``blocks.10.``.

The checks here are about keys (present, expected, numeric, BN vectors of one
length); shapes that do not fit together are the block's ``from_params`` to
report, in its parameter names, which :func:`framework_names` maps back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from repnp.errors import ConversionError, ShapeError
from repnp.io.npz.schemes import BN_LEAVES, CONV_LEAVES, SCHEMES, BlockType, Scheme, scheme_names

__all__ = ["StateBlock", "Indexed", "find", "check_state_dict", "get_scheme", "framework_names", "where"]

#: Arrays in these dtypes are used as they are (the fusions take their products in float64 and
#: round once); others (float16, integers) are computed in float64.
_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_REQUIRED = {"bn": ("running_mean", "running_var"), "conv": ("weight",), "fc": ("weight",)}


class Indexed(Mapping):
    """A read-only view of a state dict with its keys indexed by module (the part before the last
    dot) and each module path by its children: finding a block's keys is a dict look-up instead
    of a scan of the whole dict (a network has thousands of keys and hundreds of blocks)."""

    def __init__(self, state: Mapping):
        self.state = state
        self.modules: dict[str, list[str]] = {}
        self.children: dict[str, set[str]] = {}
        self._tails: dict[int, dict[str, list[str]]] = {}
        for key in state:
            module = key.rsplit(".", 1)[0] if "." in key else ""
            if module not in self.modules:
                self.modules[module] = []
                path = module
                while path:
                    parent, _, child = path.rpartition(".")
                    self.children.setdefault(parent, set()).add(child)
                    path = parent
            self.modules[module].append(key)

    def prefixes(self, marker: str) -> list[str]:
        """The prefixes ``p`` (``""`` or ending in ``.``) of the keys ``p + marker``, in the dict's order.

        Keys are indexed once per marker depth (number of dotted parts), so that trying every
        block type of every scheme does not scan the dict once per marker.
        """
        depth = marker.count(".") + 1
        tails = self._tails.get(depth)
        if tails is None:
            tails = self._tails[depth] = {}
            for key in self.state:
                parts = key.rsplit(".", depth)
                if len(parts) == depth + 1:
                    tails.setdefault(".".join(parts[1:]), []).append(parts[0] + ".")
                elif len(parts) == depth:
                    tails.setdefault(key, []).append("")
        return tails.get(marker, [])

    def __getitem__(self, key):
        return self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)

    def __contains__(self, key):
        return key in self.state


@dataclass(frozen=True, eq=False)
class StateBlock:
    """A re-parameterizable block found in a state dict, its keys renamed to the block's parameter names.

    Attributes
    ----------
    prefix : str
        Its key prefix (``""`` or ending in ``.``).
    scheme, name : str
        Scheme name, the framework's class name.
    family : str
        The repnp block class that computes it (``type.__name__``).
    deploy : str
        Full module name of the fused conv (its keys are written).
    branches : tuple of str
        Full module names of its branches, in the scheme's order.
    identity : bool
        Whether it has an identity path (a BN-only branch, or a residual).
    keys : tuple of str
        Every key the block consumes (they leave the converted dict), in the dict's order.
    params : dict of str to ndarray
        The block's parameters (``params()`` names), read from the state dict on each
        access: float32 and float64 arrays as they are, others as float64 copies; an
        ``affine=False`` BN gets gamma 1, beta 0.
    names : dict of str to str
        Parameter names and module prefixes -> the framework's full key / module name
        (for messages).
    kind : BlockType
        The scheme's description.
    """

    prefix: str
    scheme: str
    name: str
    family: str
    deploy: str
    branches: tuple
    identity: bool
    keys: tuple
    sources: tuple = field(repr=False)
    names: dict = field(repr=False)
    kind: BlockType = field(repr=False)
    state: Mapping = field(repr=False)

    @property
    def params(self) -> dict:
        out = {}
        for name, key, kind in self.sources:
            if key is None:         # affine=False BN: gamma 1, beta 0 (kind holds its mean's key)
                shape = np.shape(self.state[kind])
                out[name] = np.ones(shape) if name.endswith("gamma") else np.zeros(shape)
                continue
            value = np.asarray(self.state[key])
            if value.dtype not in _COMPUTE_DTYPES:
                value = value.astype(np.float64)
            out[name] = value[:, :, 0, 0] if kind == "fc" and name.endswith("weight") else value
        return out

    @property
    def where(self) -> str:
        """The prefix without its dot, ``"(top level)"`` for ``""``."""
        return where(self.prefix)

    @property
    def activation(self) -> str:
        """The framework class's default activation after the fused conv (informational)."""
        return str(self.kind.config.get("activation", "identity"))


def where(prefix: str) -> str:
    return prefix.rstrip(".") or "(top level)"


def check_state_dict(state) -> Indexed:
    """``state`` as an :class:`Indexed` view, checked to be a mapping with string keys."""
    if isinstance(state, Indexed):
        return state
    if not isinstance(state, Mapping):
        raise ConversionError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
    for key in state:
        if not isinstance(key, str):
            raise ConversionError(f"state keys must be strings, got {key!r}")
    return Indexed(state)


def get_scheme(name) -> Scheme:
    if name not in SCHEMES:
        raise ConversionError(f"unknown scheme {name!r}; known: {', '.join(scheme_names())}")
    return SCHEMES[name]


def _indices(state: Indexed, prefix: str, template: str) -> list[str]:
    """The values of ``{i}`` for which module ``prefix + template`` exists, in numeric order."""
    head, tail = (prefix + template).split("{i}")
    parent, _, start = head.rpartition(".")
    found = []
    for child in state.children.get(parent, ()):
        digits = child[len(start):]
        if child.startswith(start) and digits.isdigit():
            path = f"{head}{digits}{tail}"
            if state.modules.get(path) or path in state.children:
                found.append(digits)
    return sorted(found, key=int)


def _module_keys(state: Indexed, full: str, kind: str) -> list[str]:
    if kind == "tensor":
        return [full] if full in state else []
    return state.modules.get(full, [])


def _read_module(state: Indexed, full: str, target: str, kind: str, what: str, sources: list, names: dict) -> list:
    """Check one module's keys and record where each block parameter comes from; return the keys it consumes.

    ``sources`` gets ``(parameter name, key or None, kind)``: ``None`` is an ``affine=False``
    BN's gamma (1) or beta (0). Arrays are read later (:attr:`StateBlock.params`), so that
    finding blocks (scheme detection tries every scheme) copies nothing.
    """
    keys = _module_keys(state, full, kind)
    names[target] = full
    if kind == "tensor":
        value = state[full]
        if isinstance(value, np.ndarray) and value.size == 0:
            raise ShapeError(f"{what}: {full!r} has shape {value.shape}, with a dimension of size 0")
        sources.append((target, full, kind))
        return keys
    leaves = BN_LEAVES if kind == "bn" else CONV_LEAVES
    unknown = [k for k in keys if k.rsplit(".", 1)[1] not in leaves]
    if unknown:
        what_module = "BatchNorm" if kind == "bn" else "conv"
        raise ConversionError(f"{what}: unexpected key(s) {unknown} in {what_module} {full!r}")
    for leaf in _REQUIRED[kind]:
        if f"{full}.{leaf}" not in state:
            raise ConversionError(f"{what}: key '{full}.{leaf}' is missing")
    if kind == "bn":
        has_w, has_b = f"{full}.weight" in state, f"{full}.bias" in state
        if has_w != has_b:
            missing = f"{full}.bias" if has_w else f"{full}.weight"
            raise ConversionError(f"{what}: key {missing!r} is missing (a BN has both weight and bias, or "
                                  f"neither when affine=False)")
    for key in keys:
        value = state[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            raise ConversionError(f"{what}: {key!r} must be a numeric array (bool, int or float)")
        name = leaves[key.rsplit(".", 1)[1]]
        if name is None:            # num_batches_tracked: bookkeeping, consumed
            continue
        if value.size == 0:
            # A conv with no channels (or no taps) or a BN over no channels is no block: refused
            # here, by key and shape, before any fusion divides by a channel count.
            raise ShapeError(f"{what}: {key!r} has shape {value.shape}, with a dimension of size 0")
        if kind == "fc" and name == "weight" and (value.ndim != 4 or value.shape[2:] != (1, 1)):
            raise ShapeError(f"{what}: {key} must be a 1x1 conv weight (O, I, 1, 1), got shape {value.shape}")
        sources.append((f"{target}.{name}", key, kind))
        names[f"{target}.{name}"] = key
    if kind == "bn" and f"{full}.weight" not in state:
        # affine=False: the BN has no gamma / beta, i.e. gamma = 1, beta = 0.
        for name, leaf in (("gamma", "weight"), ("beta", "bias")):
            sources.append((f"{target}.{name}", None, f"{full}.running_mean"))
            names[f"{target}.{name}"] = f"{full}.{leaf}"
    return keys


def _collect(state: Indexed, prefix: str, kind: BlockType, what: str):
    """``(keys, sources, names, branches)`` of a candidate block, or ``None`` when it is not this type."""
    if any(prefix + key not in state for key in kind.requires):
        return None
    if any(prefix + key in state for key in kind.excludes):
        return None
    keys, sources, names, branches = [], [], {}, []
    for branch in kind.branches:
        instances = [""]
        if "{i}" in branch.name:
            instances = _indices(state, prefix, branch.modules[0].source.split("{i}")[0] + "{i}")
        present = []
        for i in instances:
            modules = [(prefix + m.source.replace("{i}", i), m.target.replace("{i}", i), m.kind)
                       for m in branch.modules]
            if any(_module_keys(state, full, k) for full, _, k in modules):
                present.append((i, modules))
        if branch.required and not present:
            return None
        for i, modules in present:
            for full, target, k in modules:
                keys += _read_module(state, full, target, k, what, sources, names)
            branches.append(prefix + branch.name.replace("{i}", i))
    return keys, sources, names, tuple(dict.fromkeys(branches))


def find(state: Indexed, scheme: Scheme, left: list | None = None) -> list[StateBlock]:
    """The blocks of ``scheme`` in ``state``, ordered by their first key in the dict.

    Candidates of a tentative block type whose arrays do not build the block are appended to
    ``left`` (when given) as ``{"where", "reason"}``.
    """
    blocks, claimed, misfits = [], set(), []
    position = None
    for kind in scheme.blocks:
        marker = kind.marker
        for prefix in state.prefixes(marker):
            if prefix + marker in claimed:
                continue
            what = f"{kind.name} block {where(prefix)!r} ({scheme.name} scheme)"
            found = _collect(state, prefix, kind, what)
            if found is None:
                continue
            keys, sources, names, branches = found
            if claimed.intersection(keys):
                continue   # inside a block already found (an outer block type is looked for first)
            if kind.tentative:
                reason = _misfit(kind, sources, state)
                if reason is not None:    # a module of that name that is not this block (a grouped pos_enc)
                    misfits.append((keys, {"where": where(prefix), "reason": f"not a {kind.name}: "
                                                                            f"{framework_names(reason, names)}"}))
                    continue
            claimed.update(keys)
            if position is None:
                position = {k: n for n, k in enumerate(state)}
            keys.sort(key=position.__getitem__)
            for module in {t.rsplit(".", 1)[0] for t in names if "." in t}:
                names.setdefault(module, prefix + module)
            identity = kind.identity is True or (isinstance(kind.identity, str)
                                                 and prefix + kind.identity in branches)
            first = kind.deploy[0][1]
            # A deploy key without a module part (timm's ConvNorm becomes the nn.Conv2d at its own
            # path: ``weight``) names the block's own module.
            deploy = prefix + first.rsplit(".", 1)[0] if "." in first else where(prefix)
            blocks.append(StateBlock(prefix=prefix, scheme=scheme.name, name=kind.name, family=kind.block.__name__,
                                     deploy=deploy, branches=branches, identity=identity, keys=tuple(keys),
                                     sources=tuple(sources), names=names, kind=kind, state=state))
    if left is not None:
        # A candidate that is not this block type but whose keys a later type took (ultralytics'
        # LightConv, a 1x1 Conv then a depthwise Conv, is no RepConv: its two Conv+BN pairs are
        # folded one by one) was not left alone: only the others are reported.
        left.extend(entry for keys, entry in misfits if not claimed.intersection(keys))
    if position is None:
        return blocks
    blocks.sort(key=lambda b: position[b.keys[0]])
    return blocks


def _misfit(kind: BlockType, sources, state) -> str | None:
    """Why the arrays do not build the block type, or ``None`` when they do (for block types
    whose marker alone is ambiguous)."""
    params = StateBlock("", "", "", "", "", (), False, (), tuple(sources), {}, kind, state).params
    try:
        kind.block.from_params(params, **kind.config)
    except ValueError as exc:          # ShapeError included
        return str(exc)
    return None


_TOKEN = re.compile(r"(')?([A-Za-z_]\w*(?:\.\w+)*)")


def framework_names(message: str, names: Mapping) -> str:
    """``message`` with the block's parameter names replaced by the framework's keys.

    Full parameter keys (``conv_1x1.conv.weight``) are replaced wherever they stand; module
    names (``identity``) only when quoted, so that plain words stay words.
    """
    def swap(match):
        quote, token = match.group(1) or "", match.group(2)
        if token in names and ("." in token or quote):
            return quote + names[token]
        return match.group(0)

    return _TOKEN.sub(swap, message)
