"""The affine-region algebra of the ONNX converter.

A *region* describes a tensor that is an affine, translation-equivariant function of
one tensor ``x`` as a convolution on ``x`` (:class:`_Region`: kernel, bias, stride,
dilation, groups, padding; negative padding is a crop). The functions here grow a
region by the exact rules of structural re-parameterization, each computed by
:mod:`repnp.fusion` (one algebra for the blocks and the converter):

* :func:`_affine` — a per-channel affine map after a region (rule 1: BN, ``Mul``,
  ``Add`` of a per-channel constant; Ding et al., "RepVGG", CVPR 2021, eq. (3));
* :func:`_add_regions` — the sum of two regions on one source (rule 2: kernels
  placed by their paddings; Ding et al., "Diverse Branch Block", CVPR 2021,
  transform II);
* :func:`_then_conv` — a conv or average pool after a 1x1, stride-1 region
  (rule 5: DBB transforms III and V);
* :func:`_compact_groups` — the grouping a summed kernel still has.

Nothing here reads an ONNX graph: :mod:`repnp.io.onnx.walk` decides which rule
applies to which node, and raises or catches :class:`_NoFuse` when none does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from repnp import fusion
from repnp.errors import ConversionError
from repnp.io.onnx.dilated import align_dilations, check_not_costlier
from repnp.ops import conv_output_size


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
    a, b, kept = align_dilations(a, b, _NoFuse)     # dilated branches (UniRepLKNet): at one dilation
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
            na = conv_output_size(n, ka, stride=s, pad_begin=a.pads[ax], pad_end=a.pads[ax + 2],
                                  dilation=a.dilation[ax])
            nb = conv_output_size(n, kb, stride=s, pad_begin=b.pads[ax], pad_end=b.pads[ax + 2],
                                  dilation=b.dilation[ax])
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
    check_not_costlier(kernel, kept, _NoFuse)
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
        if kernel.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and not any(pads):
            return _then_pointwise(region, kernel, bias, groups)
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


def _then_pointwise(region: _Region, kernel, bias, groups) -> _Region:
    """A 1x1, stride-1, unpadded conv after any region (ResRep's compactor: Ding et al.,
    ICCV 2021; :func:`repnp.fusion.merge_pointwise`): ``Q (W x + b) + c = (Q W) x + (Q b + c)``
    at every pixel, so the region keeps its stride, padding and dilation, exactly. Whether
    the merged conv is worth it (a dense 1x1 after a depthwise KxK makes a dense KxK) is
    the walk's cost check (:meth:`repnp.io.onnx.walk._Converter.costlier`)."""
    merged = fusion.merge_pointwise((_kernel(region), region.bias), (np.asarray(kernel, dtype=np.float64), bias),
                                    groups=region.groups, second_groups=groups)
    g = math.gcd(region.groups, groups)
    return _Region(region.source, merged.kernel, merged.bias, g, region.stride, region.dilation, region.pads,
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
