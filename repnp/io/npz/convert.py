"""State-dict converter: a framework's trained weights in, its deploy-form weights out, through the blocks.

For every block of the state dict's naming scheme (:mod:`repnp.io.npz.schemes`,
found by key prefix, :func:`find_blocks`), the keys are renamed to the block's
parameter names, the block is built with its ``from_params``
(:mod:`repnp.blocks`), fused with its own ``reparameterize()``, and the deploy
form's arrays are written under the names the framework itself gives them
after its own reparameterization, in the input's dtype
(:func:`convert_state`). The numeric check runs each block's train form
against the written deploy weights (:func:`check_state`).

Keys of no re-parameterizable block (stems that are not rep blocks, SE modules,
heads, classifiers) pass through unchanged and in order; a fused BN's
bookkeeping (``num_batches_tracked``) disappears with it, as it does in the
frameworks.

What the arrays tell and what they do not
-----------------------------------------
Kernel sizes, channel counts and which branches exist are read from the
arrays. ``groups`` is derived where the arrays tell it (an identity branch
needs ``C_in == C_out``, so ``groups = O / (C/groups)``; DBB's 1x1 -> KxK pair;
depthwise FastViT blocks) and is 1 otherwise, which does not change the fused
weights: every branch has the ``(O, C/groups, K, K)`` layout of the fused
kernel and they add element-wise. Stride, padding and dilation are not in a
state dict and not needed: the blocks are built with stride 1, dilation 1 and
the centred padding ``K//2``; every framework here pads its smaller branches so
that kernels align at their centres, and a fused kernel that is right at
stride 1 is right at any stride (striding samples the same map). What cannot be
derived is an option: the BN epsilon (``eps``; per-scheme default, 1e-5 except
YOLOv6 and ultralytics, which train with 1e-3), the scheme when two share key
names (YOLOv6 = RepVGG names: pass ``scheme="yolov6"``), and a RepMLP block's
partition ``(h, w)`` (the weights only tell ``h*w``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import numpy as np

from repnp import tolerance
from repnp.blocks.fromparams import NeedsOption
from repnp.errors import CheckFailed, ConversionError, ShapeError
from repnp.io.npz.layout import StateBlock, check_state_dict, find, framework_names, get_scheme
from repnp.io.npz.schemes import SCHEMES, scheme_names
from repnp.io.report import ConversionReport, Fused

__all__ = ["detect_scheme", "find_blocks", "convert_state", "check_state", "trainable_params", "effective_tol"]

#: BN buffers: not trainable parameters (:mod:`repnp.io.report`).
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
#: The spatial size of the check's random input, for blocks that take any size.
_CHECK_SIZE = (7, 6)


#: What detection tried, for messages: the flag as the CLI spells it (the Python keyword beside it).
_TRIED = ("schemes tried: " + ", ".join(s for s in scheme_names() if SCHEMES[s].detect)
          + "; the others must be named with --scheme (scheme= in Python): "
          + ", ".join(s for s in scheme_names() if not SCHEMES[s].detect))


def detect_scheme(state: Mapping) -> str:
    """The naming scheme of a state dict.

    Returns
    -------
    str
        The only auto-detectable scheme (``detect`` in
        :data:`repnp.io.npz.schemes.SCHEMES`) with at least one block in
        ``state``. Official RepVGG and YOLOv6 share key names: such dicts are
        reported as ``"repvgg"`` (BN eps 1e-5); a YOLOv6 checkpoint needs
        ``scheme="yolov6"`` (or ``eps=1e-3``). ultralytics is never guessed
        (``scheme="ultralytics"``).

    Raises
    ------
    ConversionError
        No scheme matches, or several do (the message lists them).
    """
    return _detect(check_state_dict(state))[0]


def _detect(state, *, strict: bool = True):
    """``(scheme name, (its blocks, candidates left alone))``: detection finds them anyway,
    conversion reuses them. With ``strict=False``, a dict in which no scheme finds a block is
    ``(None, ([], []))`` (nothing to re-parameterize) instead of an error."""
    found = {}
    for scheme in SCHEMES.values():
        if scheme.detect:
            left = []
            blocks = find(state, scheme, left)
            if blocks:
                found[scheme.name] = blocks, left
    if not found:
        if not strict:
            return None, ([], [])
        raise ConversionError(f"no re-parameterizable block found in the state dict ({len(state)} keys); "
                              f"{_TRIED}")
    if len(found) > 1:
        listed = ", ".join(f"{k} ({len(v[0])} blocks)" for k, v in found.items())
        raise ConversionError(f"several naming schemes match: {listed}; choose one with --scheme "
                              f"(scheme= in Python)")
    return next(iter(found.items()))


def find_blocks(state: Mapping, scheme: str | None = None) -> list[StateBlock]:
    """The re-parameterizable blocks of a state dict, in the dict's order.

    Parameters
    ----------
    state : mapping of str to ndarray
    scheme : str, optional
        A name of :func:`repnp.io.npz.schemes.scheme_names`; default :func:`detect_scheme`.

    Returns
    -------
    list of StateBlock
        Grouped by key prefix, their keys renamed to the blocks' parameter names
        (:class:`repnp.io.npz.layout.StateBlock`). Keys are checked here (present,
        no unexpected ones, BN vectors); shapes when the block is built.

    Raises
    ------
    ConversionError
        Unknown scheme, a missing key of a block (named), unexpected keys in a
        block's modules.
    """
    state = check_state_dict(state)
    return _detect(state)[1][0] if scheme is None else find(state, get_scheme(scheme))


def _blocks_of(state: Mapping, scheme, eps):
    """``(indexed state, scheme name, eps, blocks, detected, left)`` with the defaults resolved."""
    indexed = check_state_dict(state)
    detected = scheme is None
    if detected:
        scheme, (blocks, left) = _detect(indexed, strict=False)
    else:
        left = []
        blocks = find(indexed, get_scheme(scheme), left)
    # No block: eps is moot; the default is reported as the one that would have been used.
    default = get_scheme(scheme).eps if scheme is not None else 1e-5
    eps = default if eps is None else float(eps)
    return indexed, scheme, eps, blocks, detected, left


def _nothing(scheme, detected: bool, n_keys: int) -> str:
    """The message of a state dict without a block: nothing to re-parameterize, and why."""
    if scheme is None:
        why = f"no re-parameterizable block found in the state dict ({n_keys} keys); {_TRIED}"
    else:
        why = f"no {scheme} block found in the state dict ({n_keys} keys)"
    return f"nothing to re-parameterize: {why}; the output equals the input"


def _partition_for(partition, block: StateBlock, used: set):
    """The partition ``(h, w)`` of ``block``: ``partition`` itself, or its entry for the block's
    prefix (``where``) in a mapping, else the mapping's default (key ``None`` or ``""``)."""
    if not isinstance(partition, Mapping):
        return partition
    for key in (block.where, block.prefix, None, ""):
        if key in partition:
            used.add(key)
            return partition[key]
    return None


def _check_partition_keys(partition, blocks, used: set) -> None:
    """A per-block partition naming no block with a partition (a typo) is refused, with the blocks."""
    if not isinstance(partition, Mapping):
        return
    stray = [k for k in partition if k not in used and k not in (None, "")]
    if stray:
        takers = [b.where for b in blocks if "partition" in b.kind.options]
        raise ConversionError(f"--partition PREFIX=H,W names {stray}, which is no RepMLP block of the state dict; "
                              f"its RepMLP blocks: {takers or 'none'}")


def _build(block: StateBlock, eps: float, partition):
    """The repnp block from the renamed parameters; errors name the framework's keys."""
    kind = block.kind
    options = {}
    if "eps" in kind.options:
        options["eps"] = eps
    if "partition" in kind.options:
        options["partition"] = partition
    hint = ("; give it with --partition H,W or --partition PREFIX=H,W (partition= in Python)"
            if "partition" in kind.options else "")
    label = f"{block.name} block {block.where!r}"
    try:
        model = kind.block.from_params(block.params, **kind.config, **options)
        return model, model.reparameterize()
    except ConversionError:
        raise
    except NeedsOption as exc:
        raise NeedsOption(f"{exc}{hint}") from exc
    except ShapeError as exc:
        raise ShapeError(f"{label}: {framework_names(str(exc), block.names)}{hint}") from exc
    except ValueError as exc:     # e.g. kernels whose centres cannot coincide (even size inside odd)
        raise ConversionError(f"{label} cannot be fused: {framework_names(str(exc), block.names)}") from exc


def _written(block: StateBlock, deploy, dtype) -> dict:
    """The deploy form's arrays under the framework's deploy keys, in ``dtype``."""
    arrays = deploy.params()
    out = {}
    for name, key, kind in block.kind.deploy:
        value = arrays[name]
        if kind == "fc" and value.ndim == 2:    # the block's (O, I) matrix is the framework's 1x1 conv weight
            value = value[:, :, None, None]
        out[block.prefix + key] = value.astype(dtype, copy=False)
    return out


def _replace_arrays(obj, by_id: dict):
    """``obj`` (a block: nested frozen dataclasses) with the arrays in ``by_id`` (by ``id``) replaced."""
    if isinstance(obj, np.ndarray):
        return by_id.get(id(obj), obj)
    if isinstance(obj, tuple):
        return tuple(_replace_arrays(v, by_id) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _replace_arrays(getattr(obj, f.name), by_id)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _check_block(block: StateBlock, model, deploy, converted: Mapping, rng) -> float:
    """``max|a - b| / max|b|`` of the deploy form holding ``converted``'s arrays against the train form.

    The input is random float64 noise from ``rng``, (2, C, 7, 6) (blocks of a fixed input size,
    RepMLP: its (C, h, w)); any non-finite value is an error of ``inf``.
    """
    arrays = deploy.params()
    by_id = {}
    for name, key, kind in block.kind.deploy:
        full = block.prefix + key
        if full not in converted:
            raise ConversionError(f"converted state dict has no {full!r} (block {block.where!r})")
        value = np.asarray(converted[full], dtype=np.float64)
        if kind == "fc" and value.ndim == 4:
            value = value[:, :, 0, 0]
        if value.shape != arrays[name].shape:
            raise ShapeError(f"converted {full!r} has shape {np.shape(converted[full])}, block {block.where!r} "
                             f"fuses to {arrays[name].shape}")
        by_id[id(arrays[name])] = value
    fused = _replace_arrays(deploy, by_id)
    if getattr(model, "vector_input", False):       # a BN-Linear head reads (N, C) vectors
        x = rng.standard_normal((2, model.in_features))
    else:
        size = (model.height, model.width) if hasattr(model, "height") else _CHECK_SIZE
        # A plain ConvBN (ultralytics' Conv) names its channels on its conv.
        channels = model.in_channels if hasattr(model, "in_channels") else model.conv.in_channels
        x = rng.standard_normal((2, channels) + tuple(size))
    with np.errstate(all="ignore"):        # non-finite weights give non-finite outputs: reported as inf
        return tolerance.relative_error(fused.forward(x), model.forward(x))


def effective_tol(dtypes, tol: float) -> tuple[float, str | None]:
    """The tolerance to check fused weights stored in ``dtypes`` at, and a note when it is not ``tol``.

    The rule of the ONNX converter (:func:`repnp.io.onnx.check.effective_tol`): float16
    weights round at about 1e-3 (eps 9.8e-4), so when any written weight is float16 the check
    runs at ``max(tol, repnp.tolerance.FLOAT16)``; :data:`repnp.tolerance.NETWORK` is for float32.
    """
    float16 = any(np.dtype(d) == np.float16 for d in dtypes)
    used = max(tol, tolerance.FLOAT16) if float16 else tol
    if used != tol:
        return used, f"float16 weights: checked at tol {used:g} instead of {tol:g}"
    return used, None


def _non_finite(block: StateBlock, written: Mapping) -> list[str]:
    """The keys of ``block`` (its train-form arrays, then ``written``) holding a NaN or an infinity."""
    bad = [k for k in block.keys
           if np.asarray(block.state[k]).dtype.kind == "f" and not np.all(np.isfinite(block.state[k]))]
    for key, value in written.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            bad.append(key)
    return bad


def _failure(per_block: Mapping, tol: float, non_finite: Mapping) -> str:
    """The message of a failed check: the blocks over ``tol``, and for each block whose error is not
    finite, the keys holding non-finite values."""
    worst = max(per_block.values())
    bad = [k for k, v in per_block.items() if not v <= tol]
    parts = []
    for where_ in bad:
        keys = non_finite.get(where_)
        if keys:
            parts.append(f"{where_} (non-finite value (NaN or inf) in {', '.join(repr(k) for k in keys)})")
        elif not np.isfinite(per_block[where_]):
            parts.append(f"{where_} (non-finite output)")
        else:
            parts.append(f"{where_} ({per_block[where_]:.3g})")
    return (f"fused blocks differ from their train form: max rel error {worst:.3g} > tol {tol:g} "
            f"in {', '.join(parts)}")


def trainable_params(state: Mapping) -> int:
    """Trainable parameters of a state dict: the elements of every array but the BN buffers (keys
    ending in ``running_mean``, ``running_var``, ``num_batches_tracked``; :mod:`repnp.io.report`)."""
    return int(sum(np.size(v) for k, v in state.items() if k.rsplit(".", 1)[-1] not in _BUFFERS))


def _groups(block: StateBlock, deploy):
    """The fused conv's groups when the arrays tell it (an identity path, or the block type always does)."""
    if not (block.identity or block.kind.tells_groups):
        return None
    conv = getattr(deploy, "conv", deploy)
    groups = getattr(conv, "groups", None)
    return int(groups if groups is not None else conv.sets)


def convert_state(state: Mapping, *, scheme: str | None = None, eps: float | None = None, partition=None,
                  check: bool = True, tol: float = tolerance.NETWORK, progress=None):
    """The deploy-form state dict: every re-parameterizable block fused into one conv.

    Parameters
    ----------
    state : mapping of str to ndarray
        A training-form state dict (e.g. from :func:`repnp.io.load_state`).
    scheme : str, optional, keyword-only
        The naming scheme (:func:`repnp.io.scheme_names`); default :func:`detect_scheme`.
    eps : float, optional, keyword-only
        The BN epsilon of every BN. Default: the scheme's (1e-5; ``yolov6`` and
        ``ultralytics`` 1e-3, the value their training code sets). An explicit
        value always wins.
    partition : (h, w) or mapping, optional, keyword-only
        RepMLP blocks only: the partition size, which the weights do not tell
        (they tell ``h*w``); needed when a local branch is larger than 1x1. A
        mapping gives one per block: block prefix (without its dot) -> ``(h, w)``,
        key ``None`` for every other block; a prefix naming no RepMLP block is refused.
    check : bool, keyword-only
        Run every block's train form against the written deploy weights
        (:func:`check_state`'s computation) and raise if it fails. Default true.
    tol : float, keyword-only
        The check's tolerance on ``max|a - b| / max|b|`` (default
        :data:`repnp.tolerance.NETWORK`: the written weights are in the input's
        dtype, float32 for most checkpoints). When a written weight is float16 the
        check runs at ``max(tol, repnp.tolerance.FLOAT16)``, as the ONNX converter
        does, and ``report.messages`` says so (:func:`effective_tol`).
    progress : callable, optional, keyword-only
        ``progress(done, total)`` after each checked block.

    Returns
    -------
    state : dict of str to ndarray
        In the input's order, each block's keys replaced (where its first key
        was) by the deploy keys of its scheme (``<deploy>.weight`` and
        ``<deploy>.bias``), in the dtype of the block's weights. Other keys pass
        through: the values are the input's own arrays, not copies. Keys the framework's
        own reparameterization deletes unfused (``Scheme.drop``: ultralytics' unused
        detection branch) are left out, listed in ``report.info["dropped"]``.
    report : repnp.io.report.ConversionReport
        ``format="npz"``; one :class:`repnp.io.report.Fused` per block; ``check``
        with ``engine``, ``max_error``, ``tol``, ``passed`` and ``per_block``
        (``None`` with ``check=False``).

    A state dict without any block of the scheme (or, detected, of any scheme) is not an
    error: it is returned as it is (the same arrays), ``report.messages`` says "nothing to
    re-parameterize" and why, ``report.info["nothing_to_fuse"]`` is true.

    Raises
    ------
    ConversionError
        Unknown scheme, a missing key (named), a fused name
        already present in ``state``, a RepMLP block that needs ``partition``.
    ShapeError
        Shapes that do not fit together (the framework's keys and shapes named).
    CheckFailed
        The check failed (a block over ``tol``, or any non-finite value: the message
        names the block and the keys holding NaN or inf, also in
        ``report.check["non_finite"]``); ``exc.report`` holds the report, and
        nothing is returned.

    Notes
    -----
    Each block's ``reparameterize()`` does the algebra (every BN folded first,
    RepVGG eq. (3): ``W' = W t``, ``b' = beta + (b - mean) t``,
    ``t = gamma / sqrt(var + eps)``):

    * RepVGG / MobileOne / ACNet / RepConv / FastViT's large-kernel conv:
      ``w = sum_b pad(W'_b) + W'_id``, the identity a kernel with a one at the
      centre tap of channel ``i``'s group slot, 1x1 and 1xK/Kx1 kernels centred;
    * FastViT RepMixer: ``w = I + gamma (W_mixer - W_norm)``; RepCPE ``w = I + W``;
    * ultralytics' Conv2 (one BN after the KxK + centred 1x1 sum): ``w = t (W_K + pad(W_1))``;
      its ConvTranspose + BN: ``t`` on the transposed kernel's output axis
      (:func:`repnp.fusion.fuse_bn_transposed`), checked with :func:`repnp.ops.conv_transpose2d`;
    * DBB (Ding et al., CVPR 2021, transforms I-VI): KxK + 1x1 + (1x1 -> KxK) + (1x1 -> avg);
    * RepMLP (Ding et al., CVPR 2022): local convs as an FC added to the partition FC.

    The blocks hold the input's float32 / float64 arrays as they are (other dtypes as
    float64 copies); :mod:`repnp.fusion` takes every product and sum in float64 and rounds
    once per folded branch and once for the sum. Blocks are fused largest first (fewer fresh
    pages for the allocator), the output keeps the input's order.
    """
    dropped = _dropped_keys(state, scheme)
    if dropped:
        # Keys the framework's own fuse() deletes (ultralytics' unused detection branch): they are not
        # fused, they are left out, as the fused model's state_dict() leaves them out.
        kept = {k: v for k, v in state.items() if k not in dropped}
        out, report = convert_state(kept, scheme=scheme, eps=eps, partition=partition, check=check, tol=tol,
                                    progress=progress)
        report.params_before = trainable_params(state)
        report.counts_before["keys"] = len(state)
        report.info["dropped"] = list(dropped)
        report.messages.append(f"{len(dropped)} keys of modules inference does not use dropped, as the "
                               f"framework's own fuse() does ({scheme} scheme): {_prefixes(dropped)}")
        return out, report
    original = state
    state, scheme, eps, blocks, detected, left = _blocks_of(state, scheme, eps)
    if not blocks:
        return _unchanged(state, scheme, eps, detected, left, check=check, tol=tol)
    owner = {k: b for b in blocks for k in b.keys}
    used = set()
    report = ConversionReport(
        format="npz", params_before=trainable_params(state),
        counts_before={"keys": len(state), **Counter(b.name for b in blocks)}, left=left,
        messages=[f"{scheme} naming scheme ({'detected' if detected else 'given'}), BN eps {eps:g}"],
        info={"scheme": scheme, "scheme_detected": bool(detected), "eps": float(eps)})
    fused, written_by, per_block, non_finite = {}, {}, {}, {}
    number = {id(b): n for n, b in enumerate(blocks)}
    # Largest blocks first: the allocator's heap then grows once and is reused by the smaller
    # blocks (glibc raises its mmap threshold after the first large free); in dict order a
    # network's last, largest blocks would each map fresh pages. The output keeps the dict order.
    for block in sorted(blocks, key=lambda b: -sum(np.size(state[k]) for k in b.keys)):
        try:
            model, deploy = _build(block, eps, _partition_for(partition, block, used))
        except NeedsOption as exc:
            raise ConversionError(f"{block.name} block {block.where!r} cannot be fused: {exc}") from exc
        dtype = state[next(k for k in block.keys if k.endswith("weight"))].dtype
        written = _written(block, deploy, dtype)
        for name in written:
            if name in original and name not in owner:
                raise ConversionError(f"the fused conv's key {name!r} already exists in the state dict "
                                      f"(is it already in deploy form?)")
        written_by[id(block)] = written
        first = next(iter(written.values()))
        fused[id(block)] = Fused(
            where=block.prefix.rstrip("."), kind=block.name, merged=list(block.keys), written=list(written),
            detail={"kernel_shape": list(first.shape), "groups": _groups(block, deploy), "identity": block.identity,
                    "family": block.family, "deploy": block.deploy, "branches": list(block.branches)})
        if check:
            # Checked right away, while the block is at hand: holding every block of a network
            # until the end would multiply the memory.
            per_block[block.where] = _check_block(block, model, deploy, written,
                                                  np.random.default_rng((0, number[id(block)])))
            if not np.isfinite(per_block[block.where]):
                non_finite[block.where] = _non_finite(block, written)
            if progress is not None:
                progress(len(per_block), len(blocks))
        del model, deploy
    _check_partition_keys(partition, blocks, used)
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        block = owner.get(key)
        if block is None:
            out[key] = value
        elif id(block) in written_by:
            out.update(written_by.pop(id(block)))      # where the block's first key was
    report.fused = [fused[id(b)] for b in blocks]
    report.params_after = trainable_params(out)
    report.counts_after = {"keys": len(out), **{b.name: 0 for b in blocks}}
    if not check:
        return out, report
    per_block = {b.where: per_block[b.where] for b in blocks}
    worst = max(per_block.values())
    tol, note = effective_tol({out[k].dtype for f in report.fused for k in f.written}, tol)
    if note:
        report.messages.append(note)
    passed = bool(worst <= tol)          # inf (a non-finite value anywhere) never passes
    report.check = {"engine": "repnp.ops", "max_error": float(worst), "tol": float(tol), "passed": passed,
                    "per_block": per_block}
    if non_finite:
        report.check["non_finite"] = non_finite      # block -> keys holding NaN / inf
    if not passed:
        raise CheckFailed(_failure(per_block, tol, non_finite), report=report)
    return out, report


def _dropped_keys(state: Mapping, scheme) -> list[str]:
    """The keys the scheme's framework removes on its own reparameterization (``Scheme.drop``)."""
    if scheme is None or scheme not in SCHEMES or SCHEMES[scheme].drop is None:
        return []
    return SCHEMES[scheme].drop(state.keys())


def _prefixes(keys) -> str:
    """The modules of ``keys`` for a message: ``model.23.cv2.0.0.conv.weight`` -> ``model.23.cv2``
    (the key up to its first named part after the first one)."""
    seen = []
    for key in keys:
        parts = key.split(".")
        short = ".".join(parts[:next((i + 1 for i, p in enumerate(parts) if i and not p.isdigit()), len(parts))])
        if short not in seen:
            seen.append(short)
    return ", ".join(seen)


def _unchanged(state, scheme, eps, detected: bool, left, *, check: bool, tol: float):
    """``(the input's keys and arrays, report)`` of a state dict with no block to fuse."""
    out = dict(state.items())
    params = trainable_params(out)
    report = ConversionReport(
        format="npz", params_before=params, params_after=params, counts_before={"keys": len(out)},
        counts_after={"keys": len(out)}, left=left, messages=[_nothing(scheme, detected, len(out))],
        info={"scheme": scheme, "scheme_detected": bool(detected), "eps": float(eps), "nothing_to_fuse": True})
    if check:
        # Nothing was changed, so there is nothing that could differ: the check passes trivially.
        report.check = {"engine": "repnp.ops", "max_error": 0.0, "tol": float(tol), "passed": True, "per_block": {}}
    return out, report


def check_state(state: Mapping, converted: Mapping, *, scheme: str | None = None, eps: float | None = None,
                partition=None, seed: int = 0, tol: float = tolerance.NETWORK, progress=None) -> dict:
    """Check a converted state dict block by block against the train-form blocks.

    Each block of ``state`` is built (``from_params``) and *run* (its ``forward``:
    conv, BN, pad, average pool of :mod:`repnp.ops`) on a seeded random float64
    input, and compared with its deploy form holding the arrays read from
    ``converted``. An error in the fusion (wrong eps, misplaced kernel, wrong
    identity) or in the written dict shows.

    Parameters
    ----------
    state, converted : mapping of str to ndarray
        The training-form state dict and the deploy-form one made from it.
    scheme, eps, partition : keyword-only
        As for :func:`convert_state` (default: detected scheme, the scheme's eps).
    seed : int, keyword-only
        Seed of the random inputs (block ``n`` of the dict draws from ``default_rng((seed, n))``,
        as :func:`convert_state`'s check does with seed 0).
    tol : float, keyword-only
        The tolerance ``passed`` is judged against; ``max(tol, repnp.tolerance.FLOAT16)`` when a
        converted weight is float16 (:func:`effective_tol`; the returned ``tol`` is the one used).
    progress : callable, keyword-only, optional
        ``progress(done, total)`` after each block.

    Returns
    -------
    dict
        ``engine``, ``scheme``, ``eps``, ``tol``; ``per_block``: block (prefix
        without its dot, ``"(top level)"``) -> ``max|a - b| / max|b|``, ``None``
        when it cannot be checked (a RepMLP block with local branches larger than
        1x1 and no ``partition``); ``unchecked``: those blocks; ``max_error``: the
        largest checked error (``None`` if none); ``passed``: every checked block
        within ``tol`` (true when none could be checked); ``non_finite``: block -> the keys
        (train form or converted) holding a NaN or an infinity, for blocks whose error is not
        finite; ``messages``: notes (the float16 tolerance, :func:`effective_tol`).

    Raises
    ------
    ConversionError
        A fused key missing from ``converted``, unknown scheme, no block.
    ShapeError
        ``partition`` that does not match a RepMLP block.
    """
    dropped = set(_dropped_keys(state, scheme))
    if dropped:         # not in the converted dict either (convert_state)
        state = {k: v for k, v in state.items() if k not in dropped}
    _, scheme, eps, blocks, detected, _ = _blocks_of(state, scheme, eps)
    per_block, non_finite, dtypes, used = {}, {}, set(), set()
    for n, block in enumerate(blocks):
        try:
            model, deploy = _build(block, eps, _partition_for(partition, block, used))
        except NeedsOption:
            per_block[block.where] = None
        else:
            error = per_block[block.where] = _check_block(block, model, deploy, converted,
                                                          np.random.default_rng((seed, n)))
            written = {block.prefix + key: converted[block.prefix + key] for _, key, _ in block.kind.deploy}
            dtypes.update(np.asarray(v).dtype for v in written.values())
            if not np.isfinite(error):
                non_finite[block.where] = _non_finite(block, written)
        if progress is not None:
            progress(n + 1, len(blocks))
    _check_partition_keys(partition, blocks, used)
    tol, note = effective_tol(dtypes, tol)
    checked = [e for e in per_block.values() if e is not None]
    worst = max(checked) if checked else None
    messages = [note] if note else []
    if not blocks:
        messages.append(_nothing(scheme, detected, len(state)))
    return {"engine": "repnp.ops", "scheme": scheme, "eps": eps, "tol": float(tol), "max_error": worst,
            "passed": worst is None or bool(worst <= tol), "per_block": per_block,
            "unchecked": [k for k, v in per_block.items() if v is None], "non_finite": non_finite,
            "messages": messages}
