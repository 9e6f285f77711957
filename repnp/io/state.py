"""State-dict converter: a framework's trained ``.npz`` weights in, its deploy-form weights out.

Read a state dict saved as ``.npz`` (:func:`load_state`), find its
re-parameterizable blocks by the naming scheme of the framework that trained
it (:func:`detect_scheme`, :func:`find_blocks`; the schemes are data in
:mod:`repnp.io.schemes`), fuse each block with :mod:`repnp.fusion`
(:func:`convert_state`) and write the result under the names the framework
itself uses after its own reparameterization (:func:`save_state`).

Keys of no re-parameterizable block (stems that are not rep blocks, SE modules,
heads, classifiers) pass through unchanged; a fused BN's bookkeeping
(``num_batches_tracked``) disappears with it, as it does in the frameworks.
Blocks are found by key *prefix* (``stages.0.blocks.1.``), never by the order
of the dict.

What the shapes tell and what they do not
-----------------------------------------
Kernel sizes, channel counts and which branches exist are read from the
arrays. ``groups`` is not needed to add branches (every branch has the same
``(O, C/groups, K, K)`` layout as the fused kernel) and is derived where it is
needed: for an identity BN ``C_in == C_out == O`` so ``groups = O / I``; for
DBB from its 1x1 -> KxK pair. Stride, padding and dilation are not in a state
dict and not needed: the fused conv keeps the geometry of the block's KxK conv,
every framework here pads its 1x1 branch with ``p - K//2`` so that kernels
align at their centres. What cannot be derived is an option: the BN epsilon
(``eps``; per-scheme default, 1e-5 except YOLOv6 and ultralytics, which train
with 1e-3), the scheme when two share key names (YOLOv6 = RepVGG names: pass
``scheme="yolov6"``), and a RepMLP block's partition ``(h, w)`` (the weights
only tell ``h*w``).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repnp import fusion
from repnp.errors import ConversionError, ShapeError
from repnp.io.atomic import check_output_path, write_atomically
from repnp.io.schemes import SCHEMES, BlockSpec, Scheme, scheme_names

__all__ = ["Block", "load_state", "save_state", "detect_scheme", "find_blocks", "convert_state", "check_state",
           "StateCheck"]

_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_CONV_PARAMS = ("weight", "bias")


# ----------------------------------------------------------------------------
# reading and writing .npz
# ----------------------------------------------------------------------------

def _check_array(key, value, where: str) -> None:
    if not isinstance(key, str):
        raise ConversionError(f"{where}: keys must be strings, got {key!r}")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = type(value).__name__ if not isinstance(value, np.ndarray) else f"dtype {value.dtype}"
        raise ConversionError(f"{where}: {key!r} must be a numeric array (bool, int or float), got {kind}")


def load_state(path) -> dict[str, np.ndarray]:
    """Read a state dict from an ``.npz`` archive, refusing pickled objects.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict of str to ndarray
        In the archive's order.

    Raises
    ------
    ConversionError
        Naming the file, if it is missing, truncated, not an ``.npz`` archive,
        holds object arrays (pickles; never loaded: ``allow_pickle=False``) or
        non-numeric arrays.
    """
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises OSError, ValueError, EOFError, BadZipFile... by format
        raise ConversionError(f"cannot read {path!r} as an .npz state dict: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConversionError(f"{path!r} holds a single array (.npy), not an .npz state dict")
    state = {}
    try:
        with archive:
            for key in archive.files:
                try:
                    state[key] = archive[key]
                except ValueError as exc:
                    if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
                        raise ConversionError(
                            f"{path!r}: {key!r} is an object array (pickled Python objects); refused: "
                            f"state dicts are read with allow_pickle=False") from exc
                    raise
    except ConversionError:
        raise
    except Exception as exc:  # a truncated member surfaces only when it is read
        raise ConversionError(f"cannot read {path!r} as an .npz state dict: {exc}") from exc
    for key, value in state.items():
        _check_array(key, value, repr(path))
    return state


def save_state(state: Mapping, path, *, force: bool = False, source=None) -> Path:
    """Write a state dict to an ``.npz`` archive, atomically.

    Parameters
    ----------
    state : mapping of str to ndarray
        Numeric arrays only (no pickles are ever written).
    path : str or os.PathLike
        The archive to write (written as given, no suffix added).
    force : bool, keyword-only
        Replace ``path`` if it exists. Default: refuse.
    source : str or os.PathLike, optional, keyword-only
        The file the state came from: writing over it is refused even with
        ``force`` (a failed conversion must never cost the user their input).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConversionError
        ``path`` is ``source``, ``path`` exists and ``force`` is false, or a
        value is not a numeric array.

    Notes
    -----
    Written to a temporary file in the target's folder, flushed, then renamed
    over ``path`` (:func:`repnp.io.atomic.write_atomically`): a reader sees the
    old file or the complete new one, and a failure leaves no partial file.
    """
    if not isinstance(state, Mapping):
        raise ConversionError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
    for key, value in state.items():
        _check_array(key, value, "state")
    path = check_output_path(path, force=force, source=source)

    def write(handle):
        # Member by member rather than np.savez, whose own keyword arguments (file,
        # allow_pickle) would collide with state-dict keys of those names.
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, value in state.items():
                with archive.open(key + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    return write_atomically(path, write)


# ----------------------------------------------------------------------------
# reading the pieces of a block
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _BN:
    """The keys of one BatchNorm (``affine=False`` BNs have no weight / bias)."""

    name: str                    # full module name, e.g. "stages.0.rbr_dense.bn"
    keys: tuple                  # every key of the module (consumed with it)
    channels: int


@dataclass(frozen=True)
class _ConvBN:
    conv: str                    # full module name of the conv
    bn: _BN
    keys: tuple
    shape: tuple                 # conv weight shape


class _Indexed(Mapping):
    """A read-only view of a state dict with its keys indexed by module (the part before the last dot).

    Finding a block's keys is then a dict look-up instead of a scan of the whole dict: a
    network's state dict has thousands of keys and hundreds of blocks.
    """

    def __init__(self, state: Mapping):
        self.state = state
        self.modules: dict[str, list[str]] = {}
        for key in state:
            self.modules.setdefault(key.rsplit(".", 1)[0] if "." in key else "", []).append(key)

    def __getitem__(self, key):
        return self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)

    def __contains__(self, key):
        return key in self.state


def _module_keys(state: _Indexed, module: str) -> list[str]:
    return state.modules.get(module, [])


def _require(state: Mapping, key: str, what: str) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"{what}: key {key!r} is missing")
    return state[key]


def _read_bn(state: Mapping, module: str, what: str) -> _BN:
    keys = _module_keys(state, module)
    unknown = [k for k in keys if k.rsplit(".", 1)[1] not in _BN_PARAMS]
    if unknown:
        raise ConversionError(f"{what}: unexpected key(s) {unknown} in BatchNorm {module!r}")
    mean = _require(state, f"{module}.running_mean", what)
    var = _require(state, f"{module}.running_var", what)
    has_w, has_b = f"{module}.weight" in state, f"{module}.bias" in state
    if has_w != has_b:
        missing = f"{module}.bias" if has_w else f"{module}.weight"
        raise ConversionError(f"{what}: key {missing!r} is missing (a BN has both weight and bias, or neither "
                              f"when affine=False)")
    vectors = {f"{module}.running_mean": mean, f"{module}.running_var": var}
    if has_w:
        vectors[f"{module}.weight"] = state[f"{module}.weight"]
        vectors[f"{module}.bias"] = state[f"{module}.bias"]
    shapes = {k: np.shape(v) for k, v in vectors.items()}
    if len(set(shapes.values())) != 1 or np.ndim(mean) != 1:
        raise ShapeError(f"{what}: the BN vectors must all have one shape (C,), got {shapes}")
    return _BN(module, tuple(keys), int(np.shape(mean)[0]))


def _bn_arrays(state: Mapping, bn: _BN):
    """mean, var, gamma, beta in float64 (gamma = 1, beta = 0 for an affine=False BN)."""
    mean = np.asarray(state[f"{bn.name}.running_mean"], dtype=np.float64)
    var = np.asarray(state[f"{bn.name}.running_var"], dtype=np.float64)
    if f"{bn.name}.weight" in state:
        gamma = np.asarray(state[f"{bn.name}.weight"], dtype=np.float64)
        beta = np.asarray(state[f"{bn.name}.bias"], dtype=np.float64)
    else:
        gamma, beta = np.ones_like(mean), np.zeros_like(mean)
    return mean, var, gamma, beta


def _read_conv(state: Mapping, module: str, what: str) -> tuple[tuple, tuple]:
    keys = _module_keys(state, module)
    unknown = [k for k in keys if k.rsplit(".", 1)[1] not in _CONV_PARAMS]
    if unknown:
        raise ConversionError(f"{what}: unexpected key(s) {unknown} in conv {module!r}")
    weight = _require(state, f"{module}.weight", what)
    if np.ndim(weight) != 4:
        raise ShapeError(f"{what}: {module}.weight must be OIHW (4-D), got shape {np.shape(weight)}")
    bias_key = f"{module}.bias"
    if bias_key in state and np.shape(state[bias_key]) != (np.shape(weight)[0],):
        raise ShapeError(f"{what}: {bias_key} has shape {np.shape(state[bias_key])}, but {module}.weight "
                         f"{np.shape(weight)} needs ({np.shape(weight)[0]},)")
    return tuple(keys), tuple(np.shape(weight))


def _read_conv_bn(state: Mapping, conv: str, bn: str, what: str) -> _ConvBN:
    conv_keys, shape = _read_conv(state, conv, what)
    norm = _read_bn(state, bn, what)
    if norm.channels != shape[0]:
        raise ShapeError(f"{what}: BN {bn!r} has {norm.channels} channels ({bn}.running_mean shape "
                         f"({norm.channels},)) but conv {conv}.weight has shape {shape}, O = {shape[0]}")
    return _ConvBN(conv, norm, conv_keys + norm.keys, shape)


def _fused_conv_bn(state: Mapping, cb: _ConvBN, eps: float) -> fusion.KernelBias:
    weight = np.asarray(state[f"{cb.conv}.weight"], dtype=np.float64)
    bias = state.get(f"{cb.conv}.bias")
    bias = None if bias is None else np.asarray(bias, dtype=np.float64)
    return fusion.fuse_bn(weight, bias, *_bn_arrays(state, cb.bn), eps=eps)


def _present(state: Mapping, *modules: str) -> bool:
    return any(_module_keys(state, m) for m in modules)


# ----------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Block:
    """A re-parameterizable block found in a state dict.

    Attributes
    ----------
    prefix : str
        Its key prefix (``""`` or ending in ``.``).
    scheme, name, family : str
        Scheme name, the framework's class name, the fusion family.
    deploy : str
        Full module name of the fused conv (its ``.weight`` / ``.bias`` are written).
    branches : tuple of str
        Full module names of its branches, identity BN included.
    identity : bool
        Whether it has a BN-only identity branch.
    kernel_shape : tuple of int
        Shape of the fused kernel (O, C/groups, KH, KW).
    groups : int or None
        When the state dict tells (identity branch, DBB); ``None`` otherwise
        (not needed: the fused kernel has the branches' grouped layout).
    activation : str
        The class's default activation after the fused conv (informational:
        a model may configure another; see :class:`repnp.io.schemes.BlockSpec`).
    keys : tuple of str
        Every key the block consumes (they leave the converted dict).
    """

    prefix: str
    scheme: str
    name: str
    family: str
    deploy: str
    branches: tuple
    identity: bool
    kernel_shape: tuple
    groups: int | None
    activation: str
    keys: tuple
    parts: dict = field(repr=False, default_factory=dict)   # parsed pieces, for the fusion step


def _prefixes(state: Mapping, marker: str) -> list[str]:
    return [k[:-len(marker)] for k in state if k == marker or k.endswith("." + marker)]


def _indices(state: Mapping, prefix: str, template: str) -> list[int]:
    head, tail = template.split("{i}")
    pattern = re.compile(re.escape(prefix + head) + r"(\d+)" + re.escape(tail) + r"\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return sorted(found)


def _branch_list(state: Mapping, prefix: str, spec: BlockSpec, what: str) -> list[_ConvBN] | None:
    """The block's conv-BN branches; ``None`` when a required one is absent (not this block type)."""
    out = []
    for branch in spec.branches:
        if "{i}" in branch.conv:
            names = [(branch.conv.format(i=i), branch.bn.format(i=i))
                     for i in _indices(state, prefix, branch.conv)]
        else:
            names = [(branch.conv, branch.bn)] if _present(state, prefix + branch.conv, prefix + branch.bn) else []
        if branch.required and not names:
            return None
        out += [_read_conv_bn(state, prefix + conv, prefix + bn, what) for conv, bn in names]
    return out


def _kernel_size(shapes) -> tuple[int, int]:
    return max(s[2] for s in shapes), max(s[3] for s in shapes)


def _check_same_io(convs: list[_ConvBN], what: str) -> None:
    first = convs[0]
    for cb in convs[1:]:
        if cb.shape[:2] != first.shape[:2]:
            raise ShapeError(f"{what}: {cb.conv}.weight has shape {cb.shape}, but {first.conv}.weight has "
                             f"{first.shape}: the branches of one block need one (O, C/groups)")


def _identity_groups(o: int, i: int, bn: _BN, reference: str, what: str) -> int:
    if bn.channels != o or o % i:
        raise ShapeError(f"{what}: identity BN {bn.name!r} has {bn.channels} channels, {reference} has "
                         f"(O, C/groups) = {(o, i)}: an identity branch needs C_in == C_out == O and O "
                         f"divisible by C/groups")
    return o // i


def _find_branches(state, prefix, spec, what):
    convs = _branch_list(state, prefix, spec, what)
    if convs is None:
        return None
    identity = None
    if spec.identity and _present(state, prefix + spec.identity):
        identity = _read_bn(state, prefix + spec.identity, what)
    if not convs:
        raise ConversionError(f"{what}: no conv branch, so the kernel size is unknown")
    _check_same_io(convs, what)
    o, i = convs[0].shape[:2]
    kh, kw = _kernel_size([c.shape for c in convs])
    groups = _identity_groups(o, i, identity, f"{convs[0].conv}.weight", what) if identity else None
    keys = sum((c.keys for c in convs), ()) + (identity.keys if identity else ())
    branches = tuple(c.conv.rsplit(".", 1)[0] if c.conv.endswith(".conv") else c.conv for c in convs)
    branches += (identity.name,) if identity else ()
    return dict(keys=keys, branches=branches, identity=identity is not None, kernel_shape=(o, i, kh, kw),
                groups=groups, parts={"convs": convs, "identity": identity})


def _find_repmixer(state, prefix, spec, what):
    if not _present(state, prefix + "norm.identity"):
        return None       # a MobileOne block that happens to be called "mixer": found as such
    found = _find_branches(state, prefix, spec, what)
    if found is None:
        return None
    norm = _read_bn(state, prefix + "norm.identity", what)
    o, i = found["kernel_shape"][:2]
    if norm.channels != o:
        raise ShapeError(f"{what}: {norm.name!r} has {norm.channels} channels, the mixer has O = {o}")
    keys = found["keys"] + norm.keys
    gamma_key = prefix + "layer_scale.gamma"
    if gamma_key in state:
        if np.size(state[gamma_key]) != o:
            raise ShapeError(f"{what}: {gamma_key} has shape {np.shape(state[gamma_key])}, needs {o} values")
        keys += (gamma_key,)
    found.update(keys=keys, branches=found["branches"] + (norm.name,))
    found["parts"].update(norm=norm, gamma=gamma_key if gamma_key in state else None)
    return found


def _find_dbb(state, prefix, spec, what):
    p = prefix
    origin = _read_conv_bn(state, p + "dbb_origin.conv", p + "dbb_origin.bn", what)
    o, i, kh, kw = origin.shape
    one = None
    if _present(state, p + "dbb_1x1.conv", p + "dbb_1x1.bn"):
        one = _read_conv_bn(state, p + "dbb_1x1.conv", p + "dbb_1x1.bn", what)
    # The 1x1 -> KxK branch: IdentityBasedConv1x1 ('idconv1', its weight a delta on the identity)
    # when its internal width equals C_in, a plain conv1 otherwise (diversebranchblock.py).
    first_name = p + "dbb_1x1_kxk.idconv1" if f"{p}dbb_1x1_kxk.idconv1.weight" in state else p + "dbb_1x1_kxk.conv1"
    first = _read_conv_bn(state, first_name, p + "dbb_1x1_kxk.bn1.bn", what)
    second = _read_conv_bn(state, p + "dbb_1x1_kxk.conv2", p + "dbb_1x1_kxk.bn2", what)
    m = first.shape[0]
    if first.shape[2:] != (1, 1) or second.shape[0] != o or m % second.shape[1]:
        raise ShapeError(f"{what}: {first.conv}.weight {first.shape} then {second.conv}.weight {second.shape} "
                         f"is not a 1x1 -> KxK pair ending in O = {o} channels")
    groups = m // second.shape[1]      # conv2 reads M/groups channels per group
    if first_name.endswith("idconv1") and first.shape[0] != first.shape[1] * groups:
        raise ShapeError(f"{what}: {first.conv}.weight {first.shape} is not (C, C/groups) with groups = {groups}")
    avgbn = _read_bn(state, p + "dbb_avg.avgbn", what)
    avg_conv = None
    if _present(state, p + "dbb_avg.conv", p + "dbb_avg.bn.bn"):
        avg_conv = _read_conv_bn(state, p + "dbb_avg.conv", p + "dbb_avg.bn.bn", what)
    if avgbn.channels != o:
        raise ShapeError(f"{what}: {avgbn.name!r} has {avgbn.channels} channels, {origin.conv}.weight has "
                         f"shape {origin.shape}")
    convs = [c for c in (origin, one, first, second, avg_conv) if c is not None]
    keys = sum((c.keys for c in convs), ()) + avgbn.keys
    branches = tuple(n for n, c in (("dbb_origin", origin), ("dbb_1x1", one), ("dbb_1x1_kxk", first),
                                    ("dbb_avg", avgbn)) if c is not None)
    return dict(keys=keys, branches=tuple(p + b for b in branches), identity=False,
                kernel_shape=(o, i, kh, kw), groups=groups,
                parts=dict(origin=origin, one=one, first=first, second=second, avg_conv=avg_conv,
                           avgbn=avgbn, identity_based=first_name.endswith("idconv1")))


def _find_repmlp(state, prefix, spec, what):
    p = prefix
    bn = _read_bn(state, p + "fc3_bn", what)
    conv_keys, shape = _read_conv(state, p + "fc3", what)
    s = bn.channels
    if shape[2:] != (1, 1) or shape[0] % s or shape[0] != s * shape[1]:
        raise ShapeError(f"{what}: {p}fc3.weight {shape} is not the grouped partition FC (S*h*w, h*w, 1, 1) "
                         f"with S = {s} from {p}fc3_bn")
    local = [_read_conv_bn(state, f"{p}repconv{k}.conv", f"{p}repconv{k}.bn", what)
             for k in _indices(state, p, "repconv{i}.conv")]
    for cb in local:
        if cb.shape[:2] != (s, 1):
            raise ShapeError(f"{what}: {cb.conv}.weight has shape {cb.shape}, a local branch needs (S, 1, k, k) "
                             f"with S = {s}")
    keys = conv_keys + bn.keys + sum((c.keys for c in local), ())
    return dict(keys=keys, branches=(p + "fc3",) + tuple(c.conv.rsplit(".", 1)[0] for c in local),
                identity=False, kernel_shape=shape, groups=s,
                parts=dict(bn=bn, local=local, fc=p + "fc3"))


def _find_residual_conv(state, prefix, spec, what):
    # RepConditionalPosEnc: x + pos_enc(x), pos_enc depthwise (groups = dim) with a bias. Anything
    # else under that name is not this block (left alone).
    module = prefix + spec.marker.rsplit(".", 1)[0]
    keys, shape = _read_conv(state, module, what)
    o, i, kh, kw = shape
    if i != 1 or kh % 2 == 0 or kw % 2 == 0 or f"{module}.bias" not in state:
        return None
    return dict(keys=keys, branches=(module, "identity"), identity=True, kernel_shape=shape, groups=o,
                parts={"conv": module})


_FINDERS = {"branches": _find_branches, "repmixer": _find_repmixer, "dbb": _find_dbb, "repmlp": _find_repmlp,
            "residual_conv": _find_residual_conv}


def _check_state(state) -> _Indexed:
    if not isinstance(state, Mapping):
        raise ConversionError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
    for key in state:
        if not isinstance(key, str):
            raise ConversionError(f"state keys must be strings, got {key!r}")
    return state if isinstance(state, _Indexed) else _Indexed(state)


def _scheme(scheme) -> Scheme:
    if scheme not in SCHEMES:
        raise ConversionError(f"unknown scheme {scheme!r}; known: {', '.join(scheme_names())}")
    return SCHEMES[scheme]


def _find(state: Mapping, scheme: Scheme) -> list[Block]:
    blocks, claimed = [], set()
    for spec in scheme.blocks:
        for prefix in _prefixes(state, spec.marker):
            if prefix + spec.marker in claimed:
                continue
            what = f"{spec.name} block {prefix.rstrip('.') or '(top level)'!r} ({scheme.name} scheme)"
            found = _FINDERS[spec.family](state, prefix, spec, what)
            if found is None:
                continue
            clash = claimed.intersection(found["keys"])
            if clash:
                continue   # inside a block already found (an outer block type is looked for first)
            claimed.update(found["keys"])
            blocks.append(Block(prefix=prefix, scheme=scheme.name, name=spec.name, family=spec.family,
                                deploy=prefix + spec.deploy, activation=spec.activation, **found))
    order = {k: n for n, k in enumerate(state)}
    return sorted(blocks, key=lambda b: min(order[k] for k in b.keys))


def detect_scheme(state: Mapping) -> str:
    """The naming scheme of a state dict.

    Returns
    -------
    str
        The only auto-detectable scheme (see :data:`repnp.io.schemes.SCHEMES`,
        ``detect``) with at least one block in ``state``. Official RepVGG and
        YOLOv6 share key names: such dicts are reported as ``"repvgg"`` (BN
        eps 1e-5); a YOLOv6 checkpoint needs ``scheme="yolov6"`` (or
        ``eps=1e-3``). ultralytics is never guessed (``scheme="ultralytics"``).

    Raises
    ------
    ConversionError
        No scheme matches, or several do (the message lists them).
    """
    state = _check_state(state)
    counts = {}
    for scheme in SCHEMES.values():
        if scheme.detect:
            n = len(_find(state, scheme))
            if n:
                counts[scheme.name] = n
    if not counts:
        tried = ", ".join(s for s in scheme_names() if SCHEMES[s].detect)
        raise ConversionError(f"no re-parameterizable block found in the state dict ({len(state)} keys); "
                              f"schemes tried: {tried}; the others must be named with scheme=")
    if len(counts) > 1:
        listed = ", ".join(f"{k} ({v} blocks)" for k, v in counts.items())
        raise ConversionError(f"several naming schemes match: {listed}; choose one with scheme=")
    return next(iter(counts))


def find_blocks(state: Mapping, scheme: str | None = None) -> list[Block]:
    """The re-parameterizable blocks of a state dict, in the dict's order.

    Parameters
    ----------
    state : mapping of str to ndarray
    scheme : str, optional
        A name of :data:`repnp.io.schemes.SCHEMES`; default :func:`detect_scheme`.

    Returns
    -------
    list of Block
        Grouped by key prefix; a block's keys are all checked (present,
        shapes consistent) here, so :func:`convert_state` only does arithmetic.

    Raises
    ------
    ConversionError
        Unknown scheme, a missing key of a block (named), unexpected keys in a
        block's modules.
    ShapeError
        Branch shapes that do not fit together (the keys and shapes are named).
    """
    state = _check_state(state)
    return _find(state, _scheme(detect_scheme(state) if scheme is None else scheme))


# ----------------------------------------------------------------------------
# fusion, per family
# ----------------------------------------------------------------------------

def _f64(state, key) -> np.ndarray:
    return np.asarray(state[key], dtype=np.float64)


def _fuse_branch_family(state, parts, eps) -> fusion.KernelBias:
    convs, identity = parts["convs"], parts["identity"]
    branches = [_fused_conv_bn(state, cb, eps) for cb in convs]
    if identity is not None:
        o, i = convs[0].shape[:2]
        kernel = fusion.identity_kernel(o, groups=o // i, kernel_size=_kernel_size([c.shape for c in convs]))
        branches.append(fusion.fuse_bn(kernel, None, *_bn_arrays(state, identity), eps=eps))
    return fusion.add_branches(*branches)


def _fuse_repmixer(state, parts, eps) -> fusion.KernelBias:
    # timm fastvit RepMixer.reparameterize(): x + gamma * (mixer(x) - norm(x)) is one conv whose
    # kernel is id + gamma * (W_mixer - W_norm), bias gamma * (b_mixer - b_norm); gamma = 1 without
    # a layer scale. mixer and norm are MobileOne blocks (norm: its identity BN only).
    mixer = _fuse_branch_family(state, parts, eps)
    o, i, kh, kw = mixer.kernel.shape
    ident = fusion.identity_kernel(o, groups=o // i, kernel_size=(kh, kw))
    norm = fusion.fuse_bn(ident, None, *_bn_arrays(state, parts["norm"]), eps=eps)
    gamma = np.ones(o) if parts["gamma"] is None else _f64(state, parts["gamma"]).reshape(o)
    return fusion.add_branches((ident, None), fusion.scale_channels(mixer, gamma),
                                fusion.scale_channels(norm, -gamma))


def _fuse_dbb(state, parts, eps) -> fusion.KernelBias:
    # DiverseBranchBlock.get_equivalent_kernel_bias (diversebranchblock.py): transforms I (conv-BN),
    # VI (1x1 centred), III (1x1 -> KxK, exact thanks to BNAndPadLayer), V (avg-pool as conv), II (sum).
    origin = parts["origin"]
    o, _, kh, kw = origin.shape
    groups = parts["first"].shape[0] // parts["second"].shape[1]
    branches = [_fused_conv_bn(state, origin, eps)]
    if parts["one"] is not None:
        branches.append(_fused_conv_bn(state, parts["one"], eps))
    first = parts["first"]
    w1 = _f64(state, f"{first.conv}.weight")
    if parts["identity_based"]:
        # IdentityBasedConv1x1.get_actual_kernel(): the stored weight is a delta on the identity.
        w1 = w1 + fusion.identity_kernel(w1.shape[0], groups=groups, kernel_size=1)
    b1 = state.get(f"{first.conv}.bias")
    k1 = fusion.fuse_bn(w1, None if b1 is None else np.asarray(b1, np.float64),
                        *_bn_arrays(state, first.bn), eps=eps)
    k2 = _fused_conv_bn(state, parts["second"], eps)
    branches.append(fusion.merge_sequential(k1, k2, groups=groups))
    avg = fusion.fuse_bn(fusion.avgpool_kernel(o, (kh, kw), groups=groups), None,
                         *_bn_arrays(state, parts["avgbn"]), eps=eps)
    if parts["avg_conv"] is not None:
        avg = fusion.merge_sequential(_fused_conv_bn(state, parts["avg_conv"], eps), avg, groups=groups)
    if avg.kernel.shape[:2] != origin.shape[:2]:
        raise ShapeError(f"{parts['avgbn'].name}: the average branch has kernel shape {avg.kernel.shape}, "
                         f"{origin.conv}.weight {origin.shape}")
    return fusion.add_branches(*branches, avg)


def _fuse_repmlp(state, parts, eps, partition) -> fusion.KernelBias:
    # RepMLPBlock.get_equivalent_fc3 (repmlpnet.py): fc3_bn (S channels, applied after a reshape to
    # (N, S, h, w)) folds into fc3 with its statistics repeated h*w times per share-set; the local
    # conv-BN branches (S, 1, k, k), padding k//2, groups S, are summed and turned into the FC that
    # equals them on an h x w partition (rule 8), one (h*w, h*w) block per share-set.
    bn, fc = parts["bn"], parts["fc"]
    weight = _f64(state, f"{fc}.weight")
    hw = weight.shape[1]
    s = bn.channels
    bias = state.get(f"{fc}.bias")
    repeated = [np.repeat(v, hw) for v in _bn_arrays(state, bn)]
    fc_fused = fusion.fuse_bn(weight, None if bias is None else np.asarray(bias, np.float64), *repeated, eps=eps)
    if not parts["local"]:
        return fc_fused
    local = fusion.add_branches(*(_fused_conv_bn(state, cb, eps) for cb in parts["local"]))
    kh, kw = local.kernel.shape[2:]
    if (kh, kw) == (1, 1):
        h, w = hw, 1          # a 1x1 depthwise conv is the same diagonal FC for any (h, w)
    elif partition is None:
        raise ConversionError(f"RepMLP block {fc.rsplit('.', 1)[0] or '(top level)'!r} has {kh}x{kw} local "
                              f"branches: pass partition=(h, w); the weights only tell h*w = {hw}")
    else:
        h, w = (int(v) for v in partition)
        if h * w != hw:
            raise ShapeError(f"partition {(h, w)} has h*w = {h * w}, but {fc}.weight {weight.shape} needs {hw}")
    matrix = fusion.conv_to_fc(local.kernel, local.bias, input_shape=(s, h, w),
                               padding=(kh // 2, kw // 2), groups=s)
    blocks = [matrix.kernel[g * hw:(g + 1) * hw, g * hw:(g + 1) * hw] for g in range(s)]
    fc_local = np.concatenate(blocks, axis=0)[:, :, None, None]
    return fusion.KernelBias(fc_fused.kernel + fc_local, fc_fused.bias + matrix.bias)


def _fuse_residual_conv(state, parts) -> fusion.KernelBias:
    # RepConditionalPosEnc.reparameterize(): w = id + W, b unchanged (rule 4 + rule 2).
    weight = _f64(state, f"{parts['conv']}.weight")
    o, i, kh, kw = weight.shape
    ident = fusion.identity_kernel(o, groups=o // i, kernel_size=(kh, kw))
    return fusion.add_branches((ident, None), (weight, _f64(state, f"{parts['conv']}.bias")))


def _fuse(state, block: Block, eps, partition) -> fusion.KernelBias:
    if block.family == "residual_conv":
        return _fuse_residual_conv(state, block.parts)
    if block.family == "branches":
        return _fuse_branch_family(state, block.parts, eps)
    if block.family == "repmixer":
        return _fuse_repmixer(state, block.parts, eps)
    if block.family == "dbb":
        return _fuse_dbb(state, block.parts, eps)
    return _fuse_repmlp(state, block.parts, eps, partition)


def _blocks_of(state: Mapping, scheme, eps):
    """``(indexed state, scheme name, eps, blocks)`` with the defaults resolved; raises
    ConversionError when no block of the scheme is found."""
    indexed = _check_state(state)
    scheme = detect_scheme(indexed) if scheme is None else scheme
    spec = _scheme(scheme)
    eps = spec.eps if eps is None else float(eps)
    blocks = _find(indexed, spec)
    if not blocks:
        raise ConversionError(f"no {scheme} block found in the state dict ({len(state)} keys)")
    return indexed, scheme, eps, blocks


def convert_state(state: Mapping, *, scheme: str | None = None, eps: float | None = None,
                  partition=None) -> dict[str, np.ndarray]:
    """The deploy-form state dict: every re-parameterizable block fused into one conv.

    Parameters
    ----------
    state : mapping of str to ndarray
        A training-form state dict (e.g. from :func:`load_state`).
    scheme : str, optional, keyword-only
        The naming scheme (:func:`repnp.io.schemes.scheme_names`); default:
        :func:`detect_scheme`.
    eps : float, optional, keyword-only
        The BN epsilon of every BN. Default: the scheme's (1e-5; ``yolov6`` and
        ``ultralytics`` 1e-3, the value their training code sets). An explicit
        value always wins.
    partition : (h, w), optional, keyword-only
        RepMLP blocks only: the partition size, which the weights do not tell
        (they tell ``h*w``); needed when a local branch is larger than 1x1.

    Returns
    -------
    dict of str to ndarray
        In the input's order, each block's keys replaced (where its first key
        was) by ``<deploy>.weight`` and ``<deploy>.bias``, the names the
        framework's own reparameterization gives them, in the dtype of the
        block's weights. Other keys pass through: the values are the input's
        own arrays, not copies.

    Raises
    ------
    ConversionError
        No block found, unknown scheme, a missing key (named), a fused name
        already present in ``state``.
    ShapeError
        Shapes that do not fit together (keys and shapes named).

    Notes
    -----
    Per block (``w, b`` fused conv; every BN folded first by RepVGG eq. (3),
    seed 001/003: ``W' = W t``, ``b' = beta + (b - mean) t``,
    ``t = gamma / sqrt(var + eps)``):

    * RepVGG / MobileOne / ACNet / RepConv: ``w = sum_b pad(W'_b) + W'_id``
      with the identity as a kernel ``I[i, i % (C/g), K//2, K//2] = 1``
      (seed 001), 1x1 and 1xK/Kx1 kernels centred (seed 004, ACNet);
    * FastViT RepMixer: ``w = I + gamma (W_mixer - W_norm)``;
    * DBB (seed 004, transforms I-VI): KxK + 1x1 + (1x1 -> KxK) + (1x1 -> avg);
    * RepMLP (seed 004): local convs as an FC added to the partition FC.

    Everything is computed in float64 and cast back once.
    """
    original = state
    state, scheme, eps, blocks = _blocks_of(state, scheme, eps)
    owner = {k: b for b in blocks for k in b.keys}
    out: dict[str, np.ndarray] = {}
    done = set()
    for key, value in state.items():
        block = owner.get(key)
        if block is None:
            out[key] = value
            continue
        if id(block) in done:
            continue
        done.add(id(block))
        try:
            fused = _fuse(state, block, eps, partition)
        except ConversionError:
            raise
        except ShapeError as exc:
            raise ShapeError(f"{block.name} block {block.prefix.rstrip('.') or '(top level)'!r}: {exc}") from exc
        except ValueError as exc:     # e.g. kernels whose centres cannot coincide (even size inside odd)
            raise ConversionError(f"{block.name} block {block.prefix.rstrip('.') or '(top level)'!r} cannot be "
                                  f"fused: {exc}") from exc
        dtype = state[[k for k in block.keys if k.endswith(".weight")][0]].dtype
        for name, array in ((f"{block.deploy}.weight", fused.kernel), (f"{block.deploy}.bias", fused.bias)):
            if name in original and name not in owner:
                raise ConversionError(f"the fused conv's key {name!r} already exists in the state dict "
                                      f"(is it already in deploy form?)")
            out[name] = array.astype(dtype)
    return out


# ----------------------------------------------------------------------------
# independent check of a converted state dict
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class StateCheck:
    """Outcome of :func:`check_state`.

    Attributes
    ----------
    errors : dict of str to float or None
        Block (key prefix without the trailing dot, ``"(top level)"`` for ``""``) ->
        ``max|a - b| / max|b|`` with ``b`` the branches' sum, or ``None`` when the block
        cannot be checked (a RepMLP block with local branches larger than 1x1 and no
        ``partition``).
    scheme : str
    eps : float
        The BN epsilon the branches were run with.
    """

    errors: dict
    scheme: str
    eps: float
    engine: str = "repnp.ops"

    @property
    def max_rel(self) -> float | None:
        """The largest error over the checked blocks (``None`` if none was checked)."""
        checked = [e for e in self.errors.values() if e is not None]
        return max(checked) if checked else None

    @property
    def unchecked(self) -> list[str]:
        return [k for k, v in self.errors.items() if v is None]

    def passed(self, tol: float) -> bool:
        """Whether every checked block is within ``tol`` (true when none could be checked)."""
        return self.max_rel is None or self.max_rel <= tol


def check_state(state: Mapping, converted: Mapping, *, scheme: str | None = None, eps: float | None = None,
                partition=None, seed: int = 0, progress=None) -> StateCheck:
    """Check a converted state dict block by block, independently of :func:`convert_state`.

    Each block's train-form branches are *run* with :mod:`repnp.ops` (conv, BN, pad,
    average pool) from the input ``state`` on a seeded random float64 input, and
    compared with the fused conv read from ``converted``. No fusion formula is used on
    the reference side, so an error in the fusion (wrong eps, misplaced kernel, wrong
    identity) shows.

    Parameters
    ----------
    state, converted : mapping of str to ndarray
        The training-form state dict and the deploy-form one made from it.
    scheme, eps, partition : keyword-only
        As for :func:`convert_state` (default: detected scheme, the scheme's eps).
    seed : int, keyword-only
        Seed of the random inputs.
    progress : callable, keyword-only, optional
        ``progress(done, total)`` after each block.

    Returns
    -------
    StateCheck
        The error per block (tolerance rule: ``max|a - b| / max|b|``).

    Raises
    ------
    ConversionError
        A fused key missing from ``converted``, unknown scheme, no block.
    ShapeError
        ``partition`` that does not match a RepMLP block.

    Notes
    -----
    Stride and dilation are 1 here (they are not in a state dict): the sum of branches
    and the fused conv agree at any stride iff they agree at stride 1 (striding samples
    the same map), and dilation spaces the taps of every branch alike. ``groups`` is the
    block's when the state dict tells it, else 1 (a kernel sum is the same algebra for any
    grouping: ``(O, C/groups, K, K)`` arrays add element-wise). DBB's BN-and-pad pads with
    the BN's output at zero input (seed 004, design brief rule 5).
    """
    _, scheme, eps, blocks = _blocks_of(state, scheme, eps)
    rng = np.random.default_rng(seed)
    errors = {}
    for n, block in enumerate(blocks):
        for key in (f"{block.deploy}.weight", f"{block.deploy}.bias"):
            if key not in converted:
                raise ConversionError(f"converted state dict has no {key!r} (block {block.prefix!r})")
        errors[block.prefix.rstrip(".") or "(top level)"] = _check_block(state, converted, block, eps, rng,
                                                                          partition)
        if progress is not None:
            progress(n + 1, len(blocks))
    return StateCheck(errors, scheme, eps)


def _relative_error(fused: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(fused - ref))) / scale if scale else float(np.max(np.abs(fused)))


def _check_block(state, converted, block: Block, eps: float, rng, partition) -> float | None:
    """Run a block's train-form branches with :mod:`repnp.ops` and compare with the fused conv."""
    from repnp import ops

    def bn(x, b: _BN):
        mean, var = _f64(state, f"{b.name}.running_mean"), _f64(state, f"{b.name}.running_var")
        if f"{b.name}.weight" in state:
            gamma, beta = _f64(state, f"{b.name}.weight"), _f64(state, f"{b.name}.bias")
        else:
            gamma, beta = np.ones_like(mean), np.zeros_like(mean)
        return ops.batch_norm(x, mean, var, gamma, beta, eps=eps)

    def bn_zero(b: _BN):      # a BN's output at zero input: BNAndPadLayer's pad value (DBB)
        return bn(np.zeros((1, b.channels, 1, 1)), b).reshape(-1)

    def conv(x, module, groups, padding, weight=None):
        w = _f64(state, f"{module}.weight") if weight is None else weight
        bias = state.get(f"{module}.bias")
        return ops.conv2d(x, w, None if bias is None else np.asarray(bias, np.float64), stride=1,
                          padding=padding, dilation=1, groups=groups)

    def conv_bn(x, cb: _ConvBN, groups):
        kh, kw = cb.shape[2:]
        return bn(conv(x, cb.conv, groups, (kh // 2, kw // 2)), cb.bn)

    fam, parts = block.family, block.parts
    if fam == "repmlp":
        return _check_repmlp(state, converted, block, bn, conv_bn, rng, partition)
    o, i, kh, kw = block.kernel_shape
    groups = block.groups or 1
    x = rng.standard_normal((2, i * groups, 7, 6))
    if fam in ("branches", "repmixer"):
        ref = sum(conv_bn(x, cb, groups) for cb in parts["convs"])
        if parts["identity"] is not None:
            ref = ref + bn(x, parts["identity"])
        if fam == "repmixer":
            gamma = np.ones(o) if parts["gamma"] is None else _f64(state, parts["gamma"]).reshape(o)
            ref = x + gamma.reshape(1, -1, 1, 1) * (ref - bn(x, parts["norm"]))
    elif fam == "residual_conv":
        ref = x + conv(x, parts["conv"], groups, (kh // 2, kw // 2))
    elif fam == "dbb":
        p = kh // 2
        ref = conv_bn(x, parts["origin"], groups)
        if parts["one"] is not None:
            ref = ref + conv_bn(x, parts["one"], groups)
        if parts["avg_conv"] is not None:
            h = conv_bn(x, parts["avg_conv"], groups)
            h = ops.pad2d(h, p, value=bn_zero(parts["avg_conv"].bn))
            h = ops.avg_pool2d(h, kh, stride=1, padding=0)
        else:
            h = ops.avg_pool2d(x, kh, stride=1, padding=p, count_include_pad=True)
        ref = ref + bn(h, parts["avgbn"])
        first, second = parts["first"], parts["second"]
        w1 = _f64(state, f"{first.conv}.weight")
        if parts["identity_based"]:
            # official DBB: idconv1's weight is a delta added to the identity kernel
            eye = np.zeros_like(w1)
            eye[np.arange(w1.shape[0]), np.arange(w1.shape[0]) % w1.shape[1], 0, 0] = 1.0
            w1 = w1 + eye
        h = bn(conv(x, first.conv, groups, 0, weight=w1), first.bn)
        h = ops.pad2d(h, p, value=bn_zero(first.bn))
        ref = ref + bn(conv(h, second.conv, groups, 0), second.bn)
    else:
        return None
    w = np.asarray(converted[f"{block.deploy}.weight"], np.float64)
    b = np.asarray(converted[f"{block.deploy}.bias"], np.float64)
    fused = ops.conv2d(x, w, b, stride=1, padding=(kh // 2, kw // 2), dilation=1, groups=groups)
    return _relative_error(fused, ref)


def _check_repmlp(state, converted, block: Block, bn, conv_bn, rng, partition) -> float | None:
    """RepMLP (official ``RepMLPBlock``): ``BN_S(FC(x)) + sum_k BN_S(dwconv_k(x))`` on the
    (N', S, h, w) view, the FC being S shared (h*w, h*w) matrices (a grouped 1x1 conv on the
    (N', S*h*w, 1, 1) view), against the fused ``fc3`` alone."""
    from repnp import ops

    parts = block.parts
    s = parts["bn"].channels
    hw = block.kernel_shape[1]
    if all(np.shape(state[f"{cb.conv}.weight"])[2:] == (1, 1) for cb in parts["local"]):
        h, w = (hw, 1) if partition is None else partition
    elif partition is None:
        return None
    else:
        h, w = partition
    if h * w != hw:
        raise ShapeError(f"partition {(h, w)} has h*w = {h * w}, the FC of block {block.prefix!r} needs {hw}")
    x = rng.standard_normal((3, s, h, w))

    def fc(weight, bias):
        y = ops.conv2d(x.reshape(3, s * hw, 1, 1), np.asarray(weight, np.float64),
                       None if bias is None else np.asarray(bias, np.float64), stride=1, padding=0,
                       dilation=1, groups=s)
        return y.reshape(x.shape)

    ref = bn(fc(state[f"{parts['fc']}.weight"], state.get(f"{parts['fc']}.bias")), parts["bn"])
    for cb in parts["local"]:
        ref = ref + conv_bn(x, cb, s)
    fused = fc(converted[f"{block.deploy}.weight"], converted[f"{block.deploy}.bias"])
    return _relative_error(fused, ref)
