"""Fuse the re-parameterizable subgraphs of an ONNX model into single Convs.

The method is the design brief's *affine regions* ("A suggested shape for the
ONNX converter"): walking the graph in topological order, every tensor that is
an affine, translation-equivariant function of one tensor ``x`` is described
as a convolution on ``x`` (:class:`_Region`: kernel, bias, stride, dilation,
groups, padding — negative padding being a crop; a Conv's or AveragePool's
``auto_pad=SAME_*`` becomes the explicit padding it implies, which needs a
static height/width unless the stride is 1, else the node is a near-match
naming ``auto_pad``). A region grows by exact rules only, all computed by :mod:`repnp.fusion` (one algebra for the blocks and
the converter):

* a sum or difference of regions on the same ``x`` with compatible geometry
  (rule 2: ``add_branches`` with the kernels placed by their paddings through
  its ``offsets``, in one float64 accumulator per sum);
* a per-channel affine op after a region — BatchNormalization
  (``bn_scale_shift``), ``Mul``/``Div``/``Add``/``Sub`` by a per-channel constant,
  ``Neg``, ``Identity`` (rule 1, ``scale_channels``; :func:`_affine` only records
  the kernel's factor, which ``add_branches(scales=...)`` or ``scale_channels``
  multiply in when the values are needed, so that a conv-BN chain makes no
  float64 copy of its kernel);
* a Conv or an AveragePool (``count_include_pad=1``) after a 1x1, stride-1
  region (rule 5, ``merge_sequential``); with a padded intermediate only when
  it was padded with the region's own value at zero input — DBB's BN-and-pad,
  exported as a zero ``Pad`` plus ``ScatterND`` writes of the bias;
* a ``Slice`` crop of ``x`` before a Conv (ACNet with padding < K//2);
* a conv on a fixed-size map ``(M, C, H, W)`` summed, through ``Reshape``, with a
  1x1 conv on the flat view ``(M, C*H*W, 1, 1)`` of the same rows becomes part of
  that FC (rule 8, ``conv_to_fc``; RepMLP's local branches and partition FC).

Anything else ends the region; the region's last tensor then becomes one
Conv. A region is cast to the model's dtype as soon as no later node can extend
it, and its arrays are dropped once written into the output model, so that the
peak memory stays near the input model plus the fused weights. The shape-only subgraphs around ``ScatterND`` are constant-folded first
(:func:`repnp.io.onnx_graph.fold_constants`); nodes the rewrite leaves dead go,
nodes dead before stay, and a kept node's input computed from constants only is
written as an initializer. After rewriting, the new model is checked against
the old one on seeded random inputs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from repnp import fusion
from repnp.errors import CheckFailed, ConversionError
from repnp.io import onnx_graph as og
from repnp.io.onnx_check import compare_models, effective_tol, make_inputs

__all__ = ["convert_onnx", "ConversionReport", "FusedRegion", "NearMatch"]

_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
            "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"}
_SPATIAL_OPS = {"Conv", "AveragePool"}


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

@dataclass
class FusedRegion:
    """One subgraph replaced by one Conv."""

    output: str
    source: str
    conv_name: str
    nodes: list
    op_types: dict
    kernel_shape: list
    groups: int
    strides: list
    pads: list
    dilations: list


@dataclass
class NearMatch:
    """A would-be pattern left untouched, and why."""

    nodes: list
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert_onnx` did: ``str(report)`` is the before/after table, ``to_dict()`` JSON.

    Attributes
    ----------
    ops_before, ops_after : dict
        Node count per op type.
    params_before, params_after : int
        Floating-point constant elements (initializers and ``Constant`` nodes).
    fused : list of FusedRegion
    near_matches : list of NearMatch
    messages : list of str
    check : dict or None
        ``engine``, ``max_abs``, ``max_rel``, ``tol``, ``passed``, ``input_shapes``, ``seed``.
    """

    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    fused: list = field(default_factory=list)
    near_matches: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    check: dict | None = None

    @property
    def nodes_before(self) -> int:
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.ops_after.values())

    def to_dict(self) -> dict:
        return {
            "ops_before": dict(self.ops_before),
            "ops_after": dict(self.ops_after),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "params_before": int(self.params_before),
            "params_after": int(self.params_after),
            "fused": [vars(f).copy() for f in self.fused],
            "near_matches": [vars(n).copy() for n in self.near_matches],
            "messages": list(self.messages),
            "check": None if self.check is None else dict(self.check),
        }

    def __str__(self) -> str:
        lines = []
        ops = sorted(set(self.ops_before) | set(self.ops_after),
                     key=lambda k: (-self.ops_before.get(k, 0), k))
        width = max([len("operator")] + [len(k) for k in ops])
        lines.append(f"{'operator':<{width}}  {'before':>8}  {'after':>8}")
        for k in ops:
            lines.append(f"{k:<{width}}  {self.ops_before.get(k, 0):>8}  {self.ops_after.get(k, 0):>8}")
        lines.append(f"{'nodes':<{width}}  {self.nodes_before:>8}  {self.nodes_after:>8}")
        lines.append(f"{'parameters':<{width}}  {self.params_before:>8}  {self.params_after:>8}")
        lines.append("")
        lines.append(f"fused regions: {len(self.fused)}")
        for f in self.fused:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(f.op_types.items()))
            lines.append(f"  {f.output} <- Conv {'x'.join(map(str, f.kernel_shape))} groups={f.groups} "
                         f"strides={f.strides} pads={f.pads} on {f.source!r}  [{kinds}]")
            lines.append(f"      nodes: {', '.join(f.nodes)}")
        if self.near_matches:
            lines.append(f"left untouched: {len(self.near_matches)}")
            for n in self.near_matches:
                lines.append(f"  {', '.join(n.nodes)}: {n.reason}")
        for m in self.messages:
            lines.append(f"note: {m}")
        if self.check is None:
            lines.append("numeric check: not run")
        else:
            c = self.check
            verdict = "passed" if c["passed"] else "FAILED"
            lines.append(f"numeric check ({c['engine']}, inputs {c['input_shapes']}, seed {c['seed']}): "
                         f"max abs {c['max_abs']:.3g}, max rel {c['max_rel']:.3g} (tol {c['tol']:.3g}) "
                         f"{verdict}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------
# regions
# ----------------------------------------------------------------------------

class _NoFuse(Exception):
    """A rule does not apply exactly; the message says why (for the report)."""


@dataclass(eq=False)
class _Region:
    """``tensor = conv(source, kernel * scale[:, None, None, None], bias, stride, dilation, groups, pads)``.

    ``identity``: kernel is the identity, bias 0, stride 1 (pads may be negative:
    a crop). ``kernel is None`` for an identity whose channel count is not known yet.

    ``kernel`` is float64, or a model's own weight array as read (any float dtype, exact,
    never written to); ``scale`` (float64, per output channel, ``None`` for ones) is the
    factor of rule 1 not yet multiplied into the kernel: BN and ``Mul`` only update this
    vector and ``bias`` (:func:`_affine`), and :mod:`repnp.fusion` multiplies the kernel
    once, when its values are needed (``add_branches(scales=...)`` in a sum,
    ``scale_channels`` in :func:`_kernel`), instead of a new float64 kernel at every op.
    ``bias`` is always the region's own, final (float64).
    """

    source: str
    kernel: np.ndarray | None
    bias: np.ndarray | None
    groups: int
    stride: tuple = (1, 1)
    dilation: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)
    nodes: tuple = ()
    identity: bool = False
    dtype: object = None
    weights: int = 0      # weight elements of the original convs in the region
    merges: tuple = ()    # conv nodes merged after a 1x1 region (rule 5)
    scale: np.ndarray | None = None

    @property
    def in_channels(self):
        return None if self.kernel is None else self.kernel.shape[1] * self.groups

    @property
    def out_channels(self):
        return None if self.kernel is None else self.kernel.shape[0]

    @property
    def plain_identity(self) -> bool:
        return self.identity and self.pads == (0, 0, 0, 0)

    @property
    def pointwise(self) -> bool:
        return self.kernel is not None and self.kernel.shape[2:] == (1, 1) and self.stride == (1, 1)


@dataclass(eq=False)
class _Padded:
    """A pointwise region padded by ``Pad`` (+ ``ScatterND`` writes): ``border`` holds the
    padded map's values outside the region (NaN inside)."""

    base: _Region
    base_tensor: str
    pads: tuple
    border: np.ndarray
    nodes: tuple


@dataclass(eq=False)
class _View:
    """A region's output seen through ``Reshape`` as ``shape`` (RepMLP's partition views).

    ``region`` is on its own source and includes what was applied to the view (a BN
    over its channels); ``base`` is the region as it was at ``base_tensor``, before
    the reshapes (what stays fused if the view goes no further). ``merged``: the
    region is a fully connected map (1x1 conv) on a flat ``(M, K, 1, 1)`` tensor,
    the sum of views of different sources (rule 8).
    """

    region: _Region
    base_tensor: str
    shape: tuple
    nodes: tuple
    merged: bool = False
    base: _Region | None = None


def _identity_region(source: str, channels, nodes=(), dtype=None) -> _Region:
    if channels is None:
        return _Region(source, None, None, 1, nodes=tuple(nodes), identity=True, dtype=dtype)
    c = int(channels)
    return _Region(source, fusion.identity_kernel(c, groups=c), np.zeros(c), c, nodes=tuple(nodes),
                   identity=True, dtype=dtype)


def _with_channels(region: _Region, channels) -> _Region:
    if region.kernel is not None or channels is None:
        return region
    return replace(region, kernel=fusion.identity_kernel(int(channels), groups=int(channels)),
                   bias=np.zeros(int(channels)), groups=int(channels))


def _regroup(kernel: np.ndarray, groups_from: int, groups_to: int) -> np.ndarray:
    """Express a kernel of ``groups_from`` groups as one of ``groups_to`` (a divisor):
    each coarser group is the block-diagonal of the finer groups it contains."""
    if groups_from == groups_to:
        return kernel
    ratio = groups_from // groups_to
    og_ = kernel.shape[0] // groups_to
    return np.concatenate([fusion.ungroup_kernel(kernel[s * og_:(s + 1) * og_], groups=ratio)
                           for s in range(groups_to)], axis=0)


def _affine(region: _Region, scale, shift) -> _Region:
    """Per-channel ``y = scale * region + shift`` (rule 1, :func:`repnp.fusion.scale_channels`:
    ``W' = W t``, ``b' = b t + s``; a BN's ``t, s`` from :func:`repnp.fusion.bn_scale_shift`).

    The kernel's part is deferred: ``t`` joins the region's pending ``scale`` (two maps in a
    row compose to ``(t2 t1, t2 s1 + s2)``, the composition ``scale_channels`` documents),
    and the new bias is ``scale_channels`` of the 0-tap kernel, i.e. of the bias alone."""
    o = region.out_channels
    t = np.broadcast_to(np.asarray(scale, dtype=np.float64), (o,))
    bias_only = (np.empty((o, 0, 1, 1)), region.bias)  # a conv without taps: just its bias
    _, bias = fusion.scale_channels(bias_only, t, shift, dtype=np.float64)
    total = t.copy() if region.scale is None else region.scale * t
    return replace(region, scale=total, bias=bias, identity=False)


def _kernel(region: _Region, dtype=np.float64) -> np.ndarray:
    """The region's kernel with its pending scale multiplied in (rule 1,
    :func:`repnp.fusion.scale_channels`), in ``dtype``: one pass, rounded once, no copy
    when there is no scale and the kernel has that dtype already."""
    if region.scale is None:
        return np.asarray(region.kernel, dtype=dtype)
    return fusion.scale_channels((region.kernel, None), region.scale, dtype=dtype).kernel


def _out_size(n, pads, k, d, s, ax):
    return (n + pads[ax] + pads[ax + 2] - d * (k - 1) - 1) // s + 1


def _add_regions(a: _Region, b: _Region, spatial) -> _Region:
    """Rule 2: ``a + b`` for two regions on one source, kernels aligned by their paddings."""
    if a.source != b.source:
        raise _NoFuse(f"operands are affine in different tensors ({a.source!r}, {b.source!r})")
    a = _with_channels(a, b.in_channels)
    b = _with_channels(b, a.in_channels)
    if a.kernel is None or b.kernel is None:
        raise _NoFuse(f"channel count of {a.source!r} unknown")
    if a.in_channels != b.in_channels or a.out_channels != b.out_channels:
        raise _NoFuse(f"channels differ: {a.in_channels}->{a.out_channels} vs {b.in_channels}->{b.out_channels}")
    if a.stride != b.stride:
        raise _NoFuse(f"strides differ: {list(a.stride)} vs {list(b.stride)}")
    size, begin, end, dil, offsets = [], [], [], [], ([], [])
    for ax in (0, 1):
        ka, kb = a.kernel.shape[2 + ax], b.kernel.shape[2 + ax]
        dils = {r.dilation[ax] for r, k in ((a, ka), (b, kb)) if k > 1}
        if len(dils) > 1:
            raise _NoFuse(f"dilations differ: {list(a.dilation)} vs {list(b.dilation)}")
        d = dils.pop() if dils else 1
        starts = (-a.pads[ax], -b.pads[ax])
        s0 = min(starts)
        if any((st - s0) % d for st in starts):
            raise _NoFuse(f"kernels do not fall on one dilation-{d} grid (paddings {list(a.pads)}, {list(b.pads)})")
        offs = [(st - s0) // d for st in starts]
        k = max(offs[0] + ka, offs[1] + kb)
        ext = [r.pads[ax] + r.pads[ax + 2] - r.dilation[ax] * (kr - 1) for r, kr in ((a, ka), (b, kb))]
        n = None if spatial is None else spatial[ax]
        s = a.stride[ax]
        if n is not None:
            na = _out_size(n, a.pads, ka, a.dilation[ax], s, ax)
            nb = _out_size(n, b.pads, kb, b.dilation[ax], s, ax)
            if na != nb:
                raise _NoFuse(f"output sizes differ ({na} vs {nb} along axis {ax + 2})")
        elif ext[0] != ext[1]:
            raise _NoFuse("output sizes may differ (input size unknown)")
        size.append(k)
        begin.append(-s0)
        end.append(ext[0] + d * (k - 1) + s0)
        dil.append(d)
        offsets[0].append(offs[0])
        offsets[1].append(offs[1])
    g = math.gcd(a.groups, b.groups)
    # Regrouping keeps the output-channel order, so each region's pending scale still applies.
    kernel, bias = fusion.add_branches(
        (_regroup(a.kernel, a.groups, g), a.bias), (_regroup(b.kernel, b.groups, g), b.bias),
        kernel_size=tuple(size), offsets=[tuple(offsets[0]), tuple(offsets[1])], scales=[a.scale, b.scale],
        dtype=np.float64)
    return _Region(a.source, kernel, bias, g, a.stride, tuple(dil), (begin[0], begin[1], end[0], end[1]),
                   a.nodes + b.nodes, identity=False, dtype=a.dtype or b.dtype, weights=a.weights + b.weights,
                   merges=a.merges + b.merges)


def _then_conv(region: _Region, kernel, bias, *, groups, stride, dilation, pads, node) -> _Region:
    """Rule 5: a conv (or average pool) after a 1x1, stride-1 region. ``kernel`` is kept as
    given (a model's weight, read-only) when the region is the identity."""
    o = kernel.shape[0]
    bias = np.zeros(o) if bias is None else np.asarray(bias, dtype=np.float64)
    if region.identity:
        channels = kernel.shape[1] * groups
        if region.kernel is not None and region.in_channels != channels:
            raise ConversionError(f"node {node.name!r} reads {channels} channels, its input has "
                                  f"{region.in_channels}")
    else:
        m = region.out_channels
        if kernel.shape[1] * groups != m:
            raise ConversionError(f"node {node.name!r}: kernel {kernel.shape} with group={groups} reads "
                                  f"{kernel.shape[1] * groups} channels, its input has {m}")
    if not region.pointwise and not region.identity:
        raise _NoFuse("a spatial op after a spatial region is not one conv at the borders")
    bias_zero = region.identity or not np.any(region.bias)
    for side in range(4):
        if pads[side] and not (region.pads[side] >= 0 and bias_zero):
            if region.pads[side] < 0:
                raise _NoFuse("zero padding after a crop reads zeros where the input has values")
            raise _NoFuse("zero padding of a biased 1x1 output is exact only in the interior "
                          "(it would have to be padded with the bias, as DBB's BN-and-pad does)")
    new_pads = tuple(region.pads[i] + int(pads[i]) for i in range(4))
    if region.identity:
        merged_k, merged_b, g = kernel, bias, groups
    else:
        g = math.gcd(region.groups, groups)
        first = (_regroup(_kernel(region), region.groups, g), region.bias)
        second = (_regroup(np.asarray(kernel, dtype=np.float64), groups, g), bias)
        merged = fusion.merge_sequential(first, second, groups=g)
        merged_k, merged_b = merged.kernel, merged.bias
    return _Region(region.source, merged_k, merged_b, g, tuple(stride), tuple(dilation), new_pads,
                   region.nodes, identity=False, dtype=region.dtype, weights=region.weights,
                   merges=region.merges)


def _compact_groups(kernel: np.ndarray, groups: int) -> tuple[np.ndarray, int]:
    """The kernel in the largest grouping (a multiple of ``groups``) in which it is
    block-diagonal: a dense sum of grouped parts (RepMLP's FC plus its depthwise
    local convs) keeps the groups of its parts."""
    o, cg = kernel.shape[:2]
    c = cg * groups
    candidates = [g for g in range(math.gcd(o, c), groups, -1) if o % g == 0 and c % g == 0 and g % groups == 0]
    if not candidates:
        return kernel, groups
    dense = fusion.ungroup_kernel(kernel, groups=groups) if groups > 1 else kernel
    nonzero = np.any(dense.reshape(o, c, -1) != 0, axis=2)
    for g in candidates:
        og_, cg_ = o // g, c // g
        # block-diagonal: output group k reads only input group k
        if not np.any(nonzero.reshape(g, og_, g, cg_).transpose(0, 2, 1, 3)[~np.eye(g, dtype=bool)]):
            return np.concatenate([dense[k * og_:(k + 1) * og_, k * cg_:(k + 1) * cg_] for k in range(g)]), g
    return kernel, groups


def _per_channel(const: np.ndarray, channels: int):
    """A constant that broadcasts as (1, C, 1, 1) against an NCHW tensor, as a (C,) vector."""
    c = np.asarray(const)
    if c.ndim > 4 or not np.issubdtype(c.dtype, np.floating):
        return None
    c4 = c.reshape((1,) * (4 - c.ndim) + c.shape)
    if c4.shape[0] != 1 or c4.shape[2] != 1 or c4.shape[3] != 1 or c4.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c4[0, :, 0, 0].astype(np.float64), (channels,))


def _pair_attr(attrs, name, default):
    v = attrs.get(name)
    return tuple(int(x) for x in v) if v else default


def _auto_pads(mode, spatial, kernel, stride, dilation):
    """Explicit ONNX pads (top, left, bottom, right) for an ``auto_pad`` mode, or ``None``
    when they depend on an input height/width that is not static.

    Notes
    -----
    ONNX operator spec (Conv, AveragePool): ``SAME_*`` gives ``out = ceil(in / s)``
    with total padding ``max(0, (out - 1)*s + d*(k - 1) + 1 - in)`` along an axis;
    an odd total puts the extra pixel at the end for ``SAME_UPPER``, at the start
    for ``SAME_LOWER``. ``VALID`` means no padding (any ``pads`` attribute is then
    ignored, as onnxruntime does). At stride 1 the total is ``d*(k - 1)`` whatever
    the input size, so a dynamic height/width is fine there.
    """
    if mode == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for axis in range(2):
        s, extent = stride[axis], dilation[axis] * (kernel[axis] - 1) + 1
        if s == 1:
            total = extent - 1
        elif spatial is None:
            return None
        else:
            n = spatial[axis]
            total = max(0, (-(-n // s) - 1) * s + extent - n)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


# ----------------------------------------------------------------------------
# the converter
# ----------------------------------------------------------------------------

class _Converter:
    """One walk over a model: constants folded, then a state per tensor (a :class:`_Region`,
    a :class:`_Padded` map or a :class:`_View`), grown node by node by the ``op_<Type>``
    handlers. A handler returns ``(state, absorbed input names)`` or ``None`` (the node
    ends every region that reaches it)."""

    def __init__(self, model: onnx.ModelProto, *, input_shape=None):
        self.graph = model.graph
        self.opset = og.opset_version(model)
        og.validate_graph(self.graph)
        self.order = og.topological_order(self.graph)
        self.nodes = list(self.graph.node)
        self.outputs = {o.name for o in self.graph.output}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.shapes = og.static_shapes(model)
        self.static = og.inputs_are_static(model)
        shape_nodes = [n for n in self.nodes if n.op_type in ("Shape", "Size")]
        if shape_nodes and self.static:
            feeds = make_inputs(model, input_shape=input_shape)
            self.shapes.update(og.probe_shapes(model, [n.input[0] for n in shape_nodes], feeds, order=self.order))
        self.consts = og.fold_constants(model, self.order, shapes=self.shapes)
        # Readers that only compute constants (Shape of an intermediate for
        # ScatterND indices) do not keep a tensor alive: count data readers only.
        self.users = og.consumers_of(self.graph, og.live_nodes(self.graph, self.consts))
        # RepMLP: a map (M, C, H, W) and a flat (M, C*H*W, 1, 1) reshaped from one tensor
        # are two views of the same rows; a conv on the first is an FC on the second.
        self.flat_of: dict[tuple, str] = {}
        self.view_key: dict[str, tuple] = {}
        for node in self.nodes:
            if node.op_type != "Reshape" or self.const(node.input[1]) is None:
                continue
            shape = self.shapes.get(node.output[0])
            if shape is None or len(shape) != 4 or any(d is None for d in shape):
                continue
            m, c, h, w = shape
            key = (node.input[0], m, c * h * w)
            self.view_key[node.output[0]] = key
            if h == w == 1:
                self.flat_of[key] = node.output[0]
        self.forbid: set[int] = set()  # convs whose rule-5 merge made a region bigger than its parts
        # A region is final once the last node reading its tensor has been walked: it is
        # then cast to the model's dtype at once, so that the float64 kernels of all the
        # regions are never held together (peak memory).
        position = {idx: pos for pos, idx in enumerate(self.order)}
        self.final_after: dict[int, list[str]] = {}
        self.last_use: dict[str, int] = {}
        for name, readers in self.users.items():
            last = max(position[i] for i in readers)
            self.last_use[name] = last
            self.final_after.setdefault(last, []).append(name)
        self.declared = _declared_types(model)
        self.progress = None

    # -- helpers --------------------------------------------------------------
    def const(self, name):
        return self.consts.get(name) if name else None

    def channels(self, name):
        shape = self.shapes.get(name)
        if shape is not None and len(shape) == 4 and shape[1] is not None:
            return shape[1]
        return None

    def rank4(self, name):
        shape = self.shapes.get(name)
        return shape is not None and len(shape) == 4

    def spatial(self, name):
        shape = self.shapes.get(name)
        if shape is None or len(shape) != 4:
            return None
        return shape[2:] if shape[2] is not None and shape[3] is not None else None

    def eff(self, name, dtype=None):
        """The region of ``name`` as a single consumer may extend it, or the identity on it;
        second value: whether using it absorbs the tensor's state."""
        st = self.states.get(name)
        if st is not None and len(self.users.get(name, ())) == 1 and name not in self.outputs:
            return st, True
        return _identity_region(name, self.channels(name), dtype=dtype), False

    def note(self, idx, reason, extra=()):
        names = [self.nodes[i].name or f"#{i}" for i in sorted(set(extra) | {idx})]
        self.near.append(NearMatch(names, reason))

    # -- walk -----------------------------------------------------------------
    def run(self):
        """Regions to emit, ``[(tensor name, region)]``.

        Rule 5 can make a kernel larger than the convs it replaces (a dense 1x1
        then a depthwise 3x3 becomes a dense 3x3). That is right inside a DBB,
        where the sum with a dense 3x3 branch pays for it, and wrong in a plain
        chain: a region that ends up larger than its original weights is walked
        again with those merges forbidden.
        """
        for _ in range(8):
            regions = self._walk()
            plain = [st.region if isinstance(st, _View) else st for _, st in regions]
            bloated = {m for st in plain if st.merges and st.kernel.size > st.weights for m in st.merges}
            if not bloated:
                return regions
            self.forbid.update(bloated)
        return regions

    def _walk(self):
        self.states: dict[str, object] = {}
        self.absorbed: set[str] = set()
        self.near: list[NearMatch] = []
        total = len(self.order)
        step = max(1, total // 100)
        for pos, idx in enumerate(self.order):
            self._step(idx)
            for name in self.final_after.get(pos, ()):
                self._finalize(name)
            if self.progress is not None and (pos + 1 == total or (pos + 1) % step == 0):
                self.progress(pos + 1, total)
        return self.frontier()

    def _step(self, idx):
        node = self.nodes[idx]
        if node.domain not in ("", "ai.onnx") or not node.output or node.output[0] in self.consts:
            return
        handler = getattr(self, f"op_{node.op_type}", None)
        if handler is None:
            return
        result = handler(idx, node)
        if result is None:
            return
        state, taken = result
        out = node.output[0]
        self.states[out] = state
        self.absorbed.update(taken)
        for name in taken:  # an absorbed state lives on inside the new one
            self.states.pop(name, None)
        if out not in self.last_use:  # nothing reads it: final already
            self._finalize(out)

    def out_dtype(self, name, st) -> np.dtype:
        """The dtype the fused conv of region ``st`` ending at ``name`` is written in."""
        dtype = _tensor_dtype(self.declared, [name, st.source], st.dtype if st.dtype is not None else np.float32)
        return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)

    def _finalize(self, name):
        """Cast the region at ``name`` (no reader left to extend it) to its output dtype."""
        st = self.states.get(name)
        if not isinstance(st, _Region) or st.kernel is None or name in self.absorbed:
            return
        dtype = self.out_dtype(name, st)
        st.kernel, st.scale = _kernel(st, dtype), None
        st.bias = st.bias.astype(dtype, copy=False)

    def frontier(self):
        """Regions that no consumer extended: each becomes one Conv (when worth it)."""
        out = []
        for name, st in self.states.items():
            if name in self.absorbed:
                continue
            if isinstance(st, _View) and st.merged:
                if self.worth(st.region):
                    out.append((name, st))
                continue
            if isinstance(st, (_Padded, _View)):
                if st.base_tensor not in self.absorbed:
                    continue
                name, st = st.base_tensor, st.base
            if self.worth(st):
                if min(st.pads) < 0:
                    self.near.append(NearMatch([self.nodes[i].name for i in st.nodes],
                                               f"the fused conv would need negative padding {list(st.pads)}"))
                    continue
                out.append((name, st))
        return out

    def worth(self, st):
        if not isinstance(st, _Region) or st.kernel is None or len(st.nodes) < 2:
            return False
        return any(self.nodes[i].op_type in _SPATIAL_OPS for i in st.nodes)

    # -- spatial ops ----------------------------------------------------------
    def _conv_like(self, idx, node, kernel, bias, groups, stride, dilation, pads, dtype=None):
        x = node.input[0]
        r, took = self.eff(x, dtype=dtype)
        taken = [x] if took else []
        if isinstance(r, _Padded):
            try:
                r = self._unpad(r, node)
            except _NoFuse as exc:
                self.note(idx, str(exc), r.nodes)
                r, taken = _identity_region(x, kernel.shape[1] * groups), []
        try:
            if idx in self.forbid and not r.identity:
                raise _NoFuse("merging would make the conv larger than the original ones")
            new = _then_conv(r, kernel, bias, groups=groups, stride=stride, dilation=dilation,
                             pads=pads, node=node)
        except _NoFuse as exc:
            if r.nodes and not r.identity:
                self.note(idx, f"not merged with the region before it: {exc}", r.nodes)
            r, taken = _identity_region(x, kernel.shape[1] * groups), []
            new = _then_conv(r, kernel, bias, groups=groups, stride=stride, dilation=dilation,
                             pads=pads, node=node)
        new.nodes = r.nodes + (idx,)
        new.dtype = new.dtype or dtype
        new.weights = r.weights + (kernel.size if node.op_type == "Conv" else 0)
        if not r.identity:
            new.merges = r.merges + (idx,)
        return new, taken

    def _unpad(self, padded: _Padded, node) -> _Region:
        base = padded.base
        border = padded.border
        bias = base.bias.reshape(1, -1, 1, 1)
        mask = ~np.isnan(border)
        diff = np.where(mask, np.abs(border - bias), 0.0)
        scale = max(float(np.max(np.abs(base.bias))), np.finfo(np.float32).tiny)
        dtype = np.dtype(base.dtype) if base.dtype is not None else np.dtype(np.float32)
        tol = {2: 1e-3, 4: 1e-5, 8: 1e-12}.get(dtype.itemsize, 1e-5)
        err = float(diff.max()) / scale if diff.size else 0.0
        if err > tol:
            raise _NoFuse(f"the map before {node.op_type} {node.name!r} is padded with values that are not "
                          f"the region's value at zero input (relative difference {err:.3g}): exact only "
                          f"in the interior")
        return replace(base, pads=padded.pads, nodes=padded.nodes)

    def op_Conv(self, idx, node):
        w = self.const(node.input[1])
        b = self.const(node.input[2]) if len(node.input) > 2 else None
        if w is None or w.ndim != 4 or (len(node.input) > 2 and node.input[2] and b is None):
            return None
        attrs = og.node_attributes(node)
        groups = int(attrs.get("group", 1))
        stride, dilation = _pair_attr(attrs, "strides", (1, 1)), _pair_attr(attrs, "dilations", (1, 1))
        pads = self._explicit_pads(idx, node, attrs, w.shape[2:], stride, dilation)
        if pads is None:
            return None
        return self._conv_like(idx, node, np.asarray(w), b, groups, stride, dilation, pads,
                               dtype=np.asarray(w).dtype)

    def _explicit_pads(self, idx, node, attrs, kernel, stride, dilation):
        """The node's pads as (top, left, bottom, right), ``auto_pad`` resolved; ``None``
        (and a near-match naming ``auto_pad``) when that needs an unknown input size."""
        mode = attrs.get("auto_pad", "NOTSET")
        if mode == "NOTSET":
            return _pair_attr(attrs, "pads", (0, 0, 0, 0))
        if mode not in ("VALID", "SAME_UPPER", "SAME_LOWER"):
            self.note(idx, f"{node.op_type} {node.name!r} has an unknown auto_pad={mode!r}: left as it is")
            return None
        pads = _auto_pads(mode, self.spatial(node.input[0]), tuple(kernel), stride, dilation)
        if pads is None:
            self.note(idx, f"{node.op_type} {node.name!r} has auto_pad={mode} with stride {list(stride)} and "
                           f"its input {node.input[0]!r} has no static height/width: the padding it implies "
                           f"depends on the input size, so no fixed-pad conv replaces it")
        return pads

    def op_AveragePool(self, idx, node):
        attrs = og.node_attributes(node)
        k = _pair_attr(attrs, "kernel_shape", None)
        if k is None or len(k) != 2:
            return None
        pads = self._explicit_pads(idx, node, attrs, k, _pair_attr(attrs, "strides", (1, 1)), (1, 1))
        if pads is None:
            return None
        if attrs.get("ceil_mode", 0) or any(d != 1 for d in _pair_attr(attrs, "dilations", (1, 1))):
            return None
        x = node.input[0]
        if any(pads) and not attrs.get("count_include_pad", 0):
            st = self.states.get(x)
            if st is not None and getattr(st, "nodes", ()):
                self.note(idx, "AveragePool with count_include_pad=0 and padding divides border windows by "
                               "fewer pixels: not a convolution at the borders")
            return None
        st = self.states.get(x)
        c = self.channels(x)
        if c is None and isinstance(st, _Region):
            c = st.out_channels
        if c is None and isinstance(st, _Padded):
            c = st.base.out_channels
        if c is None:
            return None
        kernel = fusion.avgpool_kernel(c, k, groups=c)
        return self._conv_like(idx, node, kernel, None, c, _pair_attr(attrs, "strides", (1, 1)), (1, 1), pads)

    # -- per-channel affine ops -----------------------------------------------
    def op_BatchNormalization(self, idx, node):
        attrs = og.node_attributes(node)
        if attrs.get("training_mode", 0) or any(o for o in node.output[1:]):
            raise ConversionError(f"BatchNormalization {node.name!r} is in training mode "
                                  f"(training_mode=1 or statistics outputs): refused")
        if attrs.get("spatial", 1) == 0:
            return None
        params = [self.const(n) for n in node.input[1:5]]
        if any(p is None for p in params):
            return None
        scale, beta, mean, var = (np.asarray(p) for p in params)
        c = scale.shape[0] if scale.ndim == 1 else None
        if c is None or any(p.shape != (c,) for p in (beta, mean, var)):
            raise ConversionError(f"BatchNormalization {node.name!r}: parameters must all have one shape (C,), "
                                  f"got {[tuple(p.shape) for p in (scale, beta, mean, var)]}")
        x = node.input[0]
        r, took = self.eff(x, dtype=scale.dtype)
        if isinstance(r, _View):
            t, s_ = fusion.bn_scale_shift(mean, var, scale, beta, eps=float(attrs.get("epsilon", 1e-5)))
            if r.shape[1] != c:
                return None
            res = self._bn_view(idx, node, r, t, s_)
            return None if res is None else (res, [x])
        if isinstance(r, _Padded):
            return None
        have = r.out_channels if r.kernel is not None else self.channels(x)
        if have is not None and have != c:
            raise ConversionError(f"BatchNormalization {node.name!r} has {c} channels but its input "
                                  f"{x!r} has {have}")
        if r.kernel is None:
            if not self.rank4(x):
                return None
            r = _with_channels(r, c)
        elif r.plain_identity and not self.rank4(x):
            return None
        eps = float(attrs.get("epsilon", 1e-5))
        t, shift = fusion.bn_scale_shift(mean, var, scale, beta, eps=eps)
        new = replace(_affine(r, t, shift), nodes=r.nodes + (idx,), dtype=r.dtype or scale.dtype)
        return new, ([x] if took else [])

    def _binary_affine(self, idx, node, op):
        """Mul/Div/Add/Sub with one constant operand."""
        a, b = node.input[0], node.input[1]
        ca, cb = self.const(a), self.const(b)
        if (ca is None) == (cb is None):
            return None
        data, const, const_first = (b, ca, True) if ca is not None else (a, cb, False)
        r, took = self.eff(data, dtype=np.asarray(const).dtype)
        if not isinstance(r, _Region):
            return None
        if r.kernel is None or (r.plain_identity and not r.nodes):
            if not self.rank4(data):
                return None
            r = _with_channels(r, self.channels(data))
            if r.kernel is None:
                return None
        vec = _per_channel(const, r.out_channels)
        out_shape = self.shapes.get(node.output[0])
        if vec is None or (out_shape is not None and len(out_shape) != 4):
            return None
        if op == "Mul":
            new = _affine(r, vec, 0.0)
        elif op == "Div":
            if const_first or np.any(vec == 0):
                return None
            new = _affine(r, 1.0 / vec, 0.0)
        elif op == "Add":
            new = _affine(r, 1.0, vec)
        else:  # Sub
            new = _affine(r, -1.0, vec) if const_first else _affine(r, 1.0, -vec)
        new.nodes = r.nodes + (idx,)
        return new, ([data] if took else [])

    def op_Mul(self, idx, node):
        return self._binary_affine(idx, node, "Mul")

    def op_Div(self, idx, node):
        return self._binary_affine(idx, node, "Div")

    # -- RepMLP: reshaped views and conv-into-FC -----------------------------------
    _FC_LIMIT = 1 << 24  # elements of a conv_to_fc matrix; larger maps are not merged

    def op_Reshape(self, idx, node):
        x = node.input[0]
        target = self.shapes.get(node.output[0])
        if self.const(node.input[1]) is None or target is None or any(d is None for d in target):
            return None
        st = self.states.get(x)
        if st is None or len(self.users.get(x, ())) != 1 or x in self.outputs:
            return None
        if isinstance(st, _View):
            return replace(st, shape=tuple(target), nodes=st.nodes + (idx,)), [x]
        if not isinstance(st, _Region) or st.kernel is None or st.identity:
            return None
        if self.shapes.get(x) is None or len(self.shapes[x]) != 4 or any(d is None for d in self.shapes[x]):
            return None
        return _View(st, x, tuple(target), st.nodes + (idx,), base=st), [x]

    def _flat(self, view: _View) -> _Region:
        """The view's region as a 1x1 conv on the flat tensor of its rows (rule 8)."""
        r = view.region
        src_shape = self.shapes.get(r.source)
        if src_shape is None or len(src_shape) != 4 or any(d is None for d in src_shape):
            raise _NoFuse(f"shape of {r.source!r} unknown")
        if src_shape[2:] == (1, 1) and r.pointwise:
            return r
        key = self.view_key.get(r.source)
        flat = self.flat_of.get(key) if key else None
        if flat is None:
            raise _NoFuse(f"no flat (M, C*H*W, 1, 1) view of {r.source!r} to carry the FC")
        if min(r.pads) < 0:
            raise _NoFuse("a cropping conv cannot become an FC here")
        c, h, w = src_shape[1:]
        out_shape = self.shapes.get(view.base_tensor)
        f = int(np.prod(out_shape[1:])) if out_shape else None
        if f is None or f * c * h * w > self._FC_LIMIT:
            raise _NoFuse("the FC matrix would be too large")
        fc = fusion.conv_to_fc(_kernel(r), r.bias, input_shape=(c, h, w), stride=r.stride, padding=r.pads,
                               dilation=r.dilation, groups=r.groups)
        return _Region(flat, fc.kernel[:, :, None, None], fc.bias, 1, nodes=r.nodes, dtype=r.dtype,
                       weights=r.weights)

    def _as_view(self, name, region):
        shape = self.shapes.get(name)
        if not isinstance(region, _Region) or region.kernel is None or region.identity or shape is None \
                or any(d is None for d in shape):
            return None
        return _View(region, name, tuple(shape), region.nodes, base=region)

    def _add_views(self, idx, node, a: _View, b: _View, sign: float):
        if a.shape != b.shape:
            raise _NoFuse(f"views differ: {list(a.shape)} vs {list(b.shape)}")
        fa, fb = self._flat(a), self._flat(b)
        if sign < 0:
            fb = _affine(fb, -1.0, 0.0)
        total = _add_regions(fa, fb, (1, 1))
        total.nodes = a.nodes + b.nodes + (idx,)
        return _View(total, a.base_tensor, a.shape, total.nodes, merged=True)

    def _bn_view(self, idx, node, view: _View, scale, shift):
        """A per-channel affine on a view (M, c, ...) whose rows are the region's rows."""
        r = view.region
        out_shape = self.shapes.get(view.base_tensor)
        if out_shape is None or view.shape[0] != out_shape[0] or len(view.shape) < 2:
            return None
        c = view.shape[1]
        o = r.out_channels
        if o % c:
            return None
        per = o // c
        new = _affine(r, np.repeat(scale, per), np.repeat(shift, per))
        new.nodes = r.nodes + (idx,)
        return replace(view, region=new, nodes=view.nodes + (idx,))

    def op_Identity(self, idx, node):
        r, took = self.eff(node.input[0])
        if not isinstance(r, _Region):
            return None
        return replace(r, nodes=r.nodes + (idx,)), ([node.input[0]] if took else [])

    def op_Neg(self, idx, node):
        r, took = self.eff(node.input[0])
        if not isinstance(r, _Region):
            return None
        r = _with_channels(r, self.channels(node.input[0]))
        if r.kernel is None or (r.plain_identity and not self.rank4(node.input[0])):
            return None
        new = _affine(r, -1.0, 0.0)
        new.nodes = r.nodes + (idx,)
        return new, ([node.input[0]] if took else [])

    # -- sums -----------------------------------------------------------------
    def _sum(self, idx, node, signs):
        names = list(node.input)
        datas = [(n, s) for n, s in zip(names, signs) if self.const(n) is None]
        consts = [(self.const(n), s) for n, s in zip(names, signs) if self.const(n) is not None]
        if len(datas) < 2:
            if len(datas) == 1 and len(names) == 2:
                return self._binary_affine(idx, node, "Add" if node.op_type == "Sum" else node.op_type)
            return None
        regions, taken = [], []
        if len(datas) == 2 and not consts:
            views = [self.eff(n) for n, _ in datas]
            if any(isinstance(v, _View) for v, _ in views):
                # a region next to a view: itself seen through its own (static) shape
                views = [(v, t) if isinstance(v, _View) else (self._as_view(n, v), t)
                         for (n, _), (v, t) in zip(datas, views)]
            if all(isinstance(v, _View) for v, _ in views) and all(t for _, t in views):
                try:
                    return self._add_views(idx, node, views[0][0], views[1][0], datas[1][1]), [n for n, _ in datas]
                except _NoFuse as exc:
                    self.note(idx, f"views not fused: {exc}", views[0][0].nodes + views[1][0].nodes)
                    return None
        for n, s in datas:
            r, took = self.eff(n)
            if not isinstance(r, _Region):
                return None
            regions.append((r, s))
            if took:
                taken.append(n)
        if len({n for n, _ in datas}) != len(datas):
            taken = []  # a tensor added to itself: do not absorb it
        total = None
        try:
            for r, s in regions:
                if s < 0:
                    r = _with_channels(r, next((q.in_channels for q, _ in regions if q.kernel is not None), None))
                    if r.kernel is None:
                        raise _NoFuse("channel count unknown")
                    r = _affine(r, -1.0, 0.0)
                total = r if total is None else _add_regions(total, r, self.spatial(r.source))
        except _NoFuse as exc:
            self._explain_sum(idx, regions, str(exc))
            return None
        if total.kernel is None:
            return None
        out_shape = self.shapes.get(node.output[0])
        if out_shape is not None and len(out_shape) == 4 and out_shape[1] not in (None, total.out_channels):
            return None
        for c, s in consts:
            vec = _per_channel(c, total.out_channels)
            if vec is None:
                return None
            total = _affine(total, 1.0, s * vec)
        total.nodes = tuple(i for r, _ in regions for i in r.nodes) + (idx,)
        return total, taken

    def _explain_sum(self, idx, regions, reason):
        """Report a sum that looks like a rep block but is not one (only when it is close)."""
        if not any(r.nodes for r, _ in regions):
            return
        sources = {r.source for r, _ in regions}
        if len(sources) == 1:
            self.note(idx, f"branches not fused: {reason}", [i for r, _ in regions for i in r.nodes])
            return
        for r, _ in regions:
            prod = self.producer.get(r.source)
            if prod is None:
                continue
            pnode = self.nodes[prod]
            if hasattr(self, f"op_{pnode.op_type}"):
                continue  # an affine op that did not fuse for its own reason, reported there
            for inp in pnode.input:
                st = self.states.get(inp)
                src = st.source if isinstance(st, _Region) else inp
                if src in sources - {r.source}:
                    self.note(idx, f"branches not fused: {pnode.op_type} {pnode.name!r} between "
                                   f"{src!r} and the sum is not affine", [prod])
                    return

    def op_Add(self, idx, node):
        return self._sum(idx, node, [1, 1])

    def op_Sub(self, idx, node):
        return self._sum(idx, node, [1, -1])

    def op_Sum(self, idx, node):
        return self._sum(idx, node, [1] * len(node.input))

    # -- crops and BN-and-pad ---------------------------------------------------
    def op_Slice(self, idx, node):
        x = node.input[0]
        r, took = self.eff(x)
        shape = self.shapes.get(x)
        if not isinstance(r, _Region) or not r.plain_identity or shape is None or len(shape) != 4:
            return None
        if shape[2] is None or shape[3] is None or shape[1] is None:
            return None
        if self.opset >= 10:
            vals = [self.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
            starts, ends, axes, steps = vals
            if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) or \
                    (len(node.input) > 4 and node.input[4] and steps is None):
                return None
        else:
            attrs = og.node_attributes(node)
            starts, ends, axes, steps = attrs.get("starts"), attrs.get("ends"), attrs.get("axes"), None
        starts, ends = np.asarray(starts).tolist(), np.asarray(ends).tolist()
        axes = list(range(len(starts))) if axes is None else [int(a) % 4 for a in np.asarray(axes).tolist()]
        steps = [1] * len(starts) if steps is None else np.asarray(steps).tolist()
        crop = [0, 0, 0, 0]
        for a, s, e, st in zip(axes, starts, ends, steps):
            n = shape[a]
            if st != 1:
                return None
            s = min(max(s + n if s < 0 else s, 0), n)
            e = min(max(e + n if e < 0 else e, 0), n)
            if a in (0, 1):
                if s != 0 or e != n:
                    return None
                continue
            if e <= s:
                return None
            crop[a - 2], crop[a] = -s, -(n - e)
        r = _identity_region(x, shape[1], nodes=r.nodes + (idx,))
        r.pads = tuple(crop)
        return r, ([x] if took else [])

    def op_Pad(self, idx, node):
        x = node.input[0]
        r, took = self.eff(x)
        if not isinstance(r, _Region) or r.kernel is None or not r.pointwise or r.pads != (0, 0, 0, 0):
            return None
        attrs = og.node_attributes(node)
        if attrs.get("mode", "constant") != "constant":
            return None
        if self.opset >= 11:
            pads = self.const(node.input[1]) if len(node.input) > 1 else None
            value = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
            axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if pads is None or value is None or (len(node.input) > 3 and node.input[3] and axes is None):
                return None
        else:
            pads, value, axes = attrs.get("pads"), np.asarray(attrs.get("value", 0.0)), None
        pads = np.asarray(pads).astype(np.int64).tolist()
        axes = list(range(len(pads) // 2)) if axes is None else [int(a) % 4 for a in np.asarray(axes).tolist()]
        full = [0] * 8
        for k, a in enumerate(axes):
            full[a], full[a + 4] = pads[k], pads[k + len(axes)]
        if full[0] or full[1] or full[4] or full[5] or min(full) < 0 or np.asarray(value).size != 1:
            return None
        shape = self.shapes.get(r.source)
        if shape is None or len(shape) != 4 or any(d is None for d in (shape[0], shape[2], shape[3])):
            return None
        top, left, bottom, right = full[2], full[3], full[6], full[7]
        n, c, h, w = shape[0], r.out_channels, shape[2], shape[3]
        border = np.full((n, c, h + top + bottom, w + left + right), float(np.asarray(value)))
        border[:, :, top:top + h, left:left + w] = np.nan
        state = _Padded(r, x, (top, left, bottom, right), border, r.nodes + (idx,))
        return state, ([x] if took else [])

    def op_ScatterND(self, idx, node):
        data = node.input[0]
        st = self.states.get(data)
        if not isinstance(st, _Padded) or len(self.users.get(data, ())) != 1 or data in self.outputs:
            return None
        indices, updates = self.const(node.input[1]), self.const(node.input[2])
        if indices is None or updates is None or og.node_attributes(node).get("reduction", "none") != "none":
            return None
        indices = np.asarray(indices).astype(np.int64)
        k = indices.shape[-1]
        border = st.border.copy()
        try:
            index = tuple(indices[..., j] for j in range(k))
            if np.any(np.isnan(border[index])):
                self.note(idx, "ScatterND writes inside the padded map, not only its border", st.nodes)
                return None
            border[index] = np.asarray(updates, dtype=np.float64)
        except (IndexError, ValueError):
            return None
        return _Padded(st.base, st.base_tensor, st.pads, border, st.nodes + (idx,)), [data]


def _op_counts(graph) -> dict:
    return dict(Counter(n.op_type for n in graph.node))


def _param_count(graph) -> int:
    total = 0
    for t in graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                           onnx.TensorProto.BFLOAT16):
            total += math.prod(t.dims)
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                           onnx.TensorProto.FLOAT16):
                    total += math.prod(a.t.dims)
    return total


def _unique(base: str, taken: set) -> str:
    name, k = base, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


def _declared_types(model) -> dict:
    return {vi.name: vi.type.tensor_type.elem_type
            for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}


def _tensor_dtype(declared, names, fallback):
    """The element type of the first of ``names`` the model declares, else ``fallback``."""
    for name in names:
        if declared.get(name):
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(declared[name]))
    return np.dtype(fallback)


def _rewrite(model: onnx.ModelProto, conv: _Converter, regions, report: ConversionReport) -> onnx.ModelProto:
    graph = model.graph
    nodes = conv.nodes
    names = {o for n in nodes for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer} | {n.name for n in nodes}
    removed, anchors, new_inits = set(), {}, []
    position = {idx: pos for pos, idx in enumerate(conv.order)}
    for out_name, st in regions:
        view = st if isinstance(st, _View) else None
        if view is not None:
            st = view.region
            kernel, groups = _compact_groups(_kernel(st), st.groups)
            st = replace(st, kernel=kernel, groups=groups, nodes=view.nodes, scale=None)
        anchor = max(st.nodes, key=position.__getitem__)
        dtype = conv.out_dtype(out_name, st)
        w_name = _unique(f"{out_name}.repnp_weight", names)
        b_name = _unique(f"{out_name}.repnp_bias", names)
        # The arrays become TensorProtos only when the output is assembled, one at a
        # time, each released as soon as it is written (see _add_used_initializers).
        st.kernel, st.scale, st.bias = _kernel(st, dtype), None, st.bias.astype(dtype, copy=False)
        new_inits += [_NewInit(w_name, st, "kernel"), _NewInit(b_name, st, "bias")]
        base = nodes[anchor].name or out_name
        conv_name = _unique(f"{base}/repnp_fused", names)
        kh, kw = st.kernel.shape[2:]
        conv_out = out_name if view is None else _unique(f"{out_name}.repnp_fc", names)
        new = onnx.helper.make_node(
            "Conv", [st.source, w_name, b_name], [conv_out], name=conv_name,
            kernel_shape=[int(kh), int(kw)], strides=[int(s) for s in st.stride],
            dilations=[int(d) for d in st.dilation], pads=[int(p) for p in st.pads], group=int(st.groups))
        anchors[anchor] = [new]
        if view is not None:
            # The FC's output rows go back into the shape the sum had (batch axis -1).
            shape_name = _unique(f"{out_name}.repnp_shape", names)
            new_inits.append(numpy_helper.from_array(np.array((-1,) + tuple(view.shape[1:]), np.int64),
                                                     shape_name))
            anchors[anchor].append(onnx.helper.make_node("Reshape", [conv_out, shape_name], [out_name],
                                                         name=_unique(f"{conv_name}/reshape", names)))
        removed.update(st.nodes)
        report.fused.append(FusedRegion(
            output=out_name, source=st.source, conv_name=conv_name,
            nodes=[nodes[i].name or f"#{i}" for i in sorted(st.nodes, key=position.__getitem__)],
            op_types=dict(Counter(nodes[i].op_type for i in st.nodes)), kernel_shape=[int(kh), int(kw)],
            groups=int(st.groups), strides=list(map(int, st.stride)), pads=list(map(int, st.pads)),
            dilations=list(map(int, st.dilation))))
    was_live = og.live_nodes(graph)
    kept = []
    for idx in conv.order:
        if idx in anchors:
            kept.extend(anchors[idx])
        elif idx not in removed:
            kept.append((idx, nodes[idx]))
    outputs = [o.name for o in graph.output]

    def live_positions(items):
        return og.live_indices([n if isinstance(n, onnx.NodeProto) else n[1] for n in items], outputs)

    if regions:
        kept = _fold_computed_inputs(kept, live_positions(kept), conv, names, new_inits, report)
    out = _skeleton(model)
    live = live_positions(kept)
    final = []
    for pos, item in enumerate(kept):
        if isinstance(item, onnx.NodeProto):
            final.append((True, item))
        else:
            idx, node = item
            # Drop only what the rewrite made dead (e.g. DBB's shape chains);
            # nodes that were already dead pass through untouched.
            if pos in live or idx not in was_live:
                final.append((pos in live, node))
    out.graph.node.extend(_repair_readers(final, graph, new_inits, conv.consts))
    _add_used_initializers(out, list(graph.initializer) + new_inits, report)
    used = {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input} | \
        {t.name for t in out.graph.initializer}
    keep_vi = [vi for vi in out.graph.value_info if vi.name in used]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep_vi)
    og.sort_nodes(out)
    return out, {t.name for t in new_inits if isinstance(t, _NewInit)}


class _NewInit:
    """An initializer the rewrite adds: written into the output model from the region's
    array, which is then dropped (the region keeps only its geometry)."""

    def __init__(self, name: str, region: _Region, attr: str) -> None:
        self.name, self.region, self.attr = name, region, attr

    def write_into(self, graph: onnx.GraphProto) -> None:
        array = np.ascontiguousarray(getattr(self.region, self.attr))
        setattr(self.region, self.attr, None)
        self.region = None
        if array.dtype in (np.float16, np.float32, np.float64):
            t = graph.initializer.add()
            t.name = self.name
            t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            t.dims.extend(array.shape)
            t.raw_data = numpy_helper.tobytes_little_endian(array)
        else:
            graph.initializer.append(numpy_helper.from_array(array, self.name))


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its nodes and initializers (copying the weights
    only to drop most of them would double the peak memory)."""
    return og.model_without(model)


def _fold_computed_inputs(kept, live, conv, names, new_inits, report):
    """A data node's input computed from constants only (a Reshape target built by
    Shape/Gather/Unsqueeze/Concat on static shapes, or by Constant/Unsqueeze/Concat
    when the exporter did not fold) is written as an initializer, as the exporter's
    constant folding does, so that the chain computing it can go."""
    derived = {o for idx in conv.order for o in conv.nodes[idx].output
               if o in conv.consts and conv.nodes[idx].op_type != "Constant"}
    out, count = [], 0
    for pos, item in enumerate(kept):
        if isinstance(item, onnx.NodeProto):
            out.append(item)
            continue
        idx, node = item
        if pos not in live or all(o in conv.consts for o in node.output if o) or \
                not any(i in derived for i in node.input):
            out.append(item)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, name in enumerate(new.input):
            if name in derived:
                init = _unique(f"{name}.repnp_const", names)
                new_inits.append(numpy_helper.from_array(np.asarray(conv.consts[name]), init))
                new.input[k] = init
                count += 1
        out.append((idx, new))
    if count:
        report.messages.append(f"constant folding: {count} computed inputs of kept nodes written as initializers")
    return out


def _repair_readers(final, graph, new_inits, consts):
    """Nodes left reading a tensor the rewrite removed: a dead one goes, a live one
    whose outputs are all folded constants (a ``Shape`` of a fused intermediate)
    becomes ``Constant`` nodes."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {t.name for t in new_inits}
    out = []
    for live, node in final:
        if all(i in available for i in node.input if i):
            out.append(node)
            available.update(o for o in node.output if o)
        elif live and all(o in consts for o in node.output if o):
            for o in node.output:
                if o:
                    out.append(onnx.helper.make_node("Constant", [], [o], name=f"{node.name}/repnp_folded",
                                                     value=numpy_helper.from_array(np.asarray(consts[o]), o)))
                    available.add(o)
        elif live:
            raise ConversionError(f"internal error: node {node.name!r} would read a removed tensor")
    return out


def _add_used_initializers(model: onnx.ModelProto, initializers, report: ConversionReport) -> None:
    """Give ``model`` (nodes in place, no initializers yet) those of ``initializers`` it uses."""
    graph = model.graph
    used = set()
    for n in graph.node:
        used.update(i for i in n.input if i)
        used.update(og.subgraph_inputs(n))
    used.update(o.name for o in graph.output)
    input_names = {i.name for i in graph.input}
    legacy = model.ir_version < 4
    keep, dropped = [], []
    for t in initializers:
        # IR >= 4: an initializer listed as a graph input is an overridable default;
        # removing it would turn it into a required input, so it stays.
        if t.name in used or (t.name in input_names and not legacy):
            keep.append(t)
        else:
            dropped.append(t.name)
    for t in keep:
        if isinstance(t, _NewInit):
            t.write_into(graph)
        else:
            graph.initializer.append(t)
    keep = graph.initializer
    if legacy:
        # IR < 3/4 lists every initializer as a graph input (the checker requires it):
        # removed ones leave the inputs, new ones join at the end.
        gone = set(dropped)
        inputs = [i for i in graph.input if i.name not in gone]
        listed = {i.name for i in inputs}
        for t in keep:
            if t.name not in listed:
                inputs.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del graph.input[:]
        graph.input.extend(inputs)
        left = [n for n in dropped if n in input_names]
        if left:
            report.messages.append(f"IR {model.ir_version} model: {len(left)} removed initializers also left "
                                   f"the graph inputs")


def _check_input(model: onnx.ModelProto) -> None:
    """Raise a ConversionError naming what is wrong with an input the ONNX checker rejects.

    Run only when something failed: checking every input up front would serialize the
    whole model once more for nothing (the output is checked in full anyway)."""
    try:
        onnx.checker.check_model(og.sorted_model(model))
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"input model is not valid ONNX: {str(exc).splitlines()[0]}") from None


def convert_onnx(model, *, check: bool = True, tol: float = 1e-4, input_shape=None, progress=None):
    """Fuse every re-parameterizable subgraph of an ONNX model into one Conv.

    Parameters
    ----------
    model : onnx.ModelProto, str or os.PathLike
        The model or its path (external data only from the model's folder). Never modified.
    check : bool, keyword-only
        Run both models on seeded random inputs and raise :class:`~repnp.errors.CheckFailed`
        when ``max|a - b| / max|b| > tol``.
    tol : float, keyword-only
        Tolerance of the check (tolerance rule: 1e-4 for float32 conversions).
        float16 models are checked at ``max(tol, 1e-2)`` (their rounding step is
        about 1e-3), which the report says (:func:`repnp.io.onnx_check.effective_tol`).
    input_shape : tuple or dict, keyword-only
        Shape for the first input (or name -> shape) used by the check; dynamic
        dimensions default to 1.
    progress : callable, keyword-only, optional
        ``progress(done, total)``, called as the walk over the graph's nodes advances
        (at most about 100 times per walk; ``done == total`` at the end of each walk).

    Returns
    -------
    (onnx.ModelProto, ConversionReport)

    Raises
    ------
    CheckFailed
        The numeric check failed (a :class:`ConversionError`); its ``report`` attribute
        holds the report with the measured errors.
    ConversionError
        Bad input (unreadable file, missing initializer, cycle, external data
        outside the folder, BN in training mode, BN of the wrong length).

    Notes
    -----
    Design brief, "A suggested shape for the ONNX converter"; the algebra is
    rules 1-6 and 8 of the brief, from seeds 000, 001, 003, 004 (RepVGG eq. (3),
    DBB transforms I-V, RepMLP's conv-into-FC), all computed by :mod:`repnp.fusion`.
    Exporter facts (BN folding, ``Add`` with a ``Constant`` 0, DBB's ``Pad`` +
    ``ScatterND``, RepMLP's partition reshapes) from the real PyTorch exports in
    ``shared/onnx-examples`` (copied to ``tests/data/onnx``).

    A QuantizeLinear/DequantizeLinear graph is returned unchanged (nodes sorted)
    with a message: fuse before quantizing. The input model is checked by
    ``onnx.checker`` only when something fails (to say whether the input is to
    blame); the output always passes ``check_model(full_check=True)`` (run by
    :func:`repnp.io.onnx_graph.check_model_full`, which does not serialize the weights).

    Memory: a ModelProto argument is read, not copied; the output is built from the
    input's initializers (only those it keeps are copied) and the fused kernels, each
    cast to the model's dtype as soon as no later node can extend it.

    Examples
    --------
    >>> model, report = convert_onnx("train.onnx")          # doctest: +SKIP
    >>> print(report)                                        # doctest: +SKIP
    >>> repnp.io.onnx_write.save_model_atomic(model, "deploy.onnx")  # doctest: +SKIP
    """
    original = og.load_model(model, copy=False)
    report = ConversionReport()
    report.ops_before = _op_counts(original.graph)
    report.params_before = _param_count(original.graph)
    trusted = ()
    if any(n.op_type in _QDQ_OPS for n in original.graph.node):
        report.messages.append("quantized (QuantizeLinear/DequantizeLinear) graph: left unchanged; fuse "
                               "before quantizing")
        og.validate_graph(original.graph)
        result = og.sorted_model(original)
        regions_found = False
    else:
        try:
            conv = _Converter(original, input_shape=input_shape)
            conv.progress = progress
            regions = conv.run()
            report.near_matches.extend(conv.near)
            result, trusted = _rewrite(original, conv, regions, report)
        except ConversionError:
            raise
        except Exception as exc:
            _check_input(original)  # an invalid input explains it; else it is our bug
            raise ConversionError(f"internal error while converting (please report): {exc!r}") from exc
        regions_found = bool(regions)
        del conv, regions
    report.ops_after = _op_counts(result.graph)
    report.params_after = _param_count(result.graph)
    try:
        og.check_model_full(result, trusted=trusted)
    except Exception as exc:
        _check_input(original)
        raise ConversionError(f"the converted model fails onnx.checker (please report): {exc}") from None
    if check:
        order = og.topological_order(original.graph)
        reference = original if order == list(range(len(order))) else og.sorted_model(original)
        used_tol, note = effective_tol(original, tol)
        if note:
            report.messages.append(note)
        res = compare_models(reference, result, tol=used_tol, input_shape=input_shape)
        report.check = res.to_dict()
        if not res.passed:
            raise CheckFailed(
                f"converted model differs from the original: max rel error {res.max_rel:.3g} > tol "
                f"{used_tol:g} (max abs {res.max_abs:.3g}, {res.engine})", report=report)
    if not regions_found and not report.messages:
        report.messages.append("no re-parameterizable subgraph found: model unchanged")
    return result, report
