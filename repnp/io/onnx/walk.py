"""The walk over an ONNX graph that finds its re-parameterizable subgraphs.

The method tracks *affine regions*: walking the graph in topological order, every tensor that is
an affine, translation-equivariant function of one tensor ``x`` is described
as a convolution on ``x`` (:class:`_Region`: kernel, bias, stride, dilation,
groups, padding — negative padding being a crop; a Conv's or AveragePool's
``auto_pad=SAME_*`` becomes the explicit padding it implies, which needs a
static height/width unless the stride is 1, else the node is a near-match
naming ``auto_pad``). A region grows by exact rules only, all computed by
:mod:`repnp.fusion` through :mod:`repnp.io.onnx.regions` (one algebra for the
blocks and the converter):

* a sum or difference of regions on the same ``x`` with compatible geometry
  (rule 2: ``add_branches`` with the kernels placed by their paddings through
  its ``offsets``, in one float64 accumulator per sum);
* a sum of regions whose dilations differ, re-expressed at their common dilation
  (``dilate_kernel``; UniRepLKNet's Dilated Reparam Block, :mod:`repnp.io.onnx.dilated`) when one
  operand's kernel holds the other, so that the one conv is never costlier;
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
* a 1x1, stride-1, unpadded Conv after any region (ResRep's compactor: a KxK conv-BN
  then a 1x1, nothing between; ``merge_pointwise``);
* a ``Slice`` crop of ``x`` before a Conv (ACNet with padding < K//2);
* a conv on a fixed-size map ``(M, C, H, W)`` summed, through ``Reshape``, with a
  1x1 conv on the flat view ``(M, C*H*W, 1, 1)`` of the same rows becomes part of
  that FC (rule 8, ``conv_to_fc``; RepMLP's local branches and partition FC).

Never slower: the nodes of the patterns runtimes fuse into one kernel (GELU, SiLU/Swish,
HardSwish, LayerNorm, RMSNorm; :mod:`repnp.io.onnx.patterns`) end every region, so that
no Conv absorbs their constant ``Mul``/``Add``; and a merge (rules 5 and the compactor's)
whose one Conv would cost more MACs or parameters than the convs it replaces
(:meth:`_Converter.costlier`, :mod:`repnp.cost`) is undone by walking again with it
forbidden. ``aggressive=True`` lifts both.

Anything else ends the region; the region's last tensor then becomes one
Conv. A region is cast to the model's dtype as soon as no later node can extend
it, and its arrays are dropped once written into the output model, so that the
peak memory stays near the input model plus the fused weights. The shape-only
subgraphs around ``ScatterND`` are constant-folded first
(:func:`repnp.io.onnx.fold.fold_constants`).

This module only decides: :class:`_Converter` returns the regions to emit and the
near-matches left alone; :mod:`repnp.io.onnx.rewrite` builds the new graph and
:mod:`repnp.io.onnx.convert` checks it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from repnp import cost, fusion
from repnp.errors import ConversionError
from repnp.io.onnx import graph as og
from repnp.io.onnx.borders import _BorderRules
from repnp.io.onnx.check import make_inputs
from repnp.io.onnx.fold import fold_constants, probe_shapes, unknown_shapes
from repnp.io.onnx.patterns import protected_nodes
from repnp.io.onnx.regions import (
    _add_regions,
    _affine,
    _identity_region,
    _kernel,
    _NoFuse,
    _Padded,
    _per_channel,
    _Region,
    _then_conv,
    _View,
    _with_channels,
)
from repnp.io.onnx.views import _ViewRules
from repnp.tolerance import FLOAT32, FLOAT64
from repnp.trace import OpRecord

_SPATIAL_OPS = {"Conv", "AveragePool"}
#: ONNX BatchNormalization's default ``epsilon``.
_BN_EPSILON = 1e-5
#: How far a padded map's border may be from the region's value at zero input (relative
#: to the largest bias) and still be BN-and-pad: the stored pad values are that value
#: rounded to the model's dtype once (float16's rounding step is about 1e-3; float32 and
#: float64 use the one-fusion tolerances of :mod:`repnp.tolerance`). Keyed by item size, so
#: that bfloat16 counts as a 2-byte type.
_BORDER_TOL = {2: 1e-3, 4: FLOAT32, 8: FLOAT64}


def _left(names, reason: str) -> dict:
    """A near-match for :attr:`repnp.io.report.ConversionReport.left`: the nodes and why they stay."""
    return {"where": ", ".join(names), "reason": reason}


def _conv_record(out_name, out_shape, kernel_shape) -> OpRecord:
    """A Conv's :class:`repnp.cost.OpRecord` (MACs and weights; activations not needed here)."""
    o = int(kernel_shape[0])
    weights = int(np.prod(kernel_shape, dtype=np.int64))
    macs = int(np.prod(out_shape, dtype=np.int64)) * (weights // max(o, 1))
    return OpRecord("Conv", (out_name + "/in",), out_name, ((),), tuple(int(d) for d in out_shape),
                         weights * cost.BYTES_PER_ELEMENT, macs)


class _Converter(_BorderRules, _ViewRules):
    """One walk over a model: constants folded, then a state per tensor (a :class:`_Region`,
    a :class:`_Padded` map or a :class:`_View`), grown node by node by the ``op_<Type>``
    handlers. A handler returns ``(state, absorbed input names)`` or ``None`` (the node
    ends every region that reaches it)."""

    def __init__(self, model: onnx.ModelProto, *, input_shape=None, fold_input_initializers=False,
                 aggressive=False):
        self.graph = model.graph
        self.aggressive = bool(aggressive)
        self.opset = og.opset_version(model)
        og.validate_graph(self.graph)
        self.order = og.topological_order(self.graph)
        self.nodes = list(self.graph.node)
        self.outputs = {o.name for o in self.graph.output}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        # Only the nodes some output depends on are walked: an unused node is never
        # evaluated nor fused, whatever it would cost (a 6000-pixel Pad's border map).
        self.live = og.live_nodes(self.graph)
        # Initializers that are also graph inputs (IR >= 4) can be overridden at run time:
        # not constants, unless the caller says they are (fold_input_initializers=True).
        self.fold_input_initializers = bool(fold_input_initializers)
        self.overridable = set() if fold_input_initializers else og.overridable_initializers(model)
        self.input_initializers = og.overridable_initializers(model)
        self.shapes = og.static_shapes(model)
        self.static = og.inputs_are_static(model)
        shape_nodes = [n for i, n in enumerate(self.nodes) if n.op_type in ("Shape", "Size") and i in self.live]
        if shape_nodes and self.static:
            feeds = make_inputs(model, input_shape=input_shape)
            self.shapes.update(probe_shapes(model, [n.input[0] for n in shape_nodes], feeds, order=self.order))
        unknown = unknown_shapes(self.nodes, self.live, self.shapes) if self.static else []
        if unknown:
            # Shape inference stops at a Pad whose pads are computed (PyTorch's F.pad in
            # training-mode exports, ECBSR's bias padding): nothing after it has a shape.
            # With static inputs one run tells them. Best effort: a model the runtime
            # cannot run keeps its unknown shapes here and is refused further on, by the
            # check that names what is wrong with it.
            try:
                feeds = make_inputs(model, input_shape=input_shape)
                self.shapes.update(probe_shapes(model, unknown, feeds, order=self.order))
            except Exception:  # noqa: BLE001 - a hint, as static_shapes is
                pass
        self.consts = fold_constants(model, self.order, shapes=self.shapes, exclude=self.overridable,
                                     among=self.live)
        # Never slower: the nodes of the patterns runtimes fuse into one kernel (GELU,
        # SiLU, HardSwish, LayerNorm, RMSNorm) end every region, so that no Conv absorbs
        # their constant Mul/Add (repnp.io.onnx.patterns). aggressive=True folds them.
        self.protected = set() if self.aggressive else protected_nodes(self.nodes, self.consts)
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
        self.declared = og.declared_types(model)
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

    def name(self, idx) -> str:
        """Node ``idx``'s name as text (:func:`repnp.io.onnx.graph.text`), ``#idx`` when it has none."""
        return og.text(self.nodes[idx].name) or f"#{idx}"

    def note(self, idx, reason, extra=()):
        names = [self.name(i) for i in sorted(set(extra) | {idx})]
        self.near.append(_left(names, reason))

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
            plain = [(n, st.region) if isinstance(st, _View) else (n, st) for n, st in regions]
            bloated = {m for n, st in plain if st.merges and self.costlier(n, st) for m in st.merges}
            if not bloated:
                return regions
            self.forbid.update(bloated)
        return regions

    def _walk(self):
        self.states: dict[str, object] = {}
        self.absorbed: set[str] = set()
        self.near: list[dict] = []
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
        if idx not in self.live or node.domain not in ("", "ai.onnx") or not node.output or \
                node.output[0] in self.consts:
            return
        handler = getattr(self, f"op_{node.op_type}", None)
        if handler is None or idx in self.protected:
            return
        weights = [n for n in node.input if n in self.overridable]
        if weights:
            self.note(idx, f"{node.op_type} {og.text(node.name)!r} reads {[og.text(n) for n in weights]}, "
                           f"initializers that are also graph inputs (overridable at run time): not folded "
                           f"(fold_input_initializers=True folds them and removes those inputs)")
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
        dtype = og.tensor_dtype(self.declared, [name, st.source], st.dtype if st.dtype is not None else np.float32)
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
                    self.near.append(_left([self.name(i) for i in st.nodes],
                                               f"the fused conv would need negative padding {list(st.pads)}"))
                    continue
                out.append((name, st))
        return out

    def costlier(self, name, st) -> bool:
        """Whether the one Conv of region ``st`` (ending at ``name``) would cost more MACs or
        parameters than the convs it replaces (:func:`repnp.cost.profile_ops`).

        With static shapes both forms are profiled; otherwise only the parameters are
        compared, which is conservative for the merges the walk makes: a 1x1 before a KxK
        (rule 5) runs at the KxK's input resolution or more, and a 1x1 after a KxK
        (ResRep's compactor) at the same, so fewer weights also means fewer MACs.
        ``aggressive=True`` accepts every exact merge."""
        if self.aggressive:
            return False
        if st.kernel.size > st.weights:
            return True
        before = []
        for i in st.nodes:
            node = self.nodes[i]
            if node.op_type != "Conv":
                continue
            w = self.const(node.input[1])
            out = self.shapes.get(node.output[0])
            if w is None or out is None or any(d is None for d in out):
                return False
            before.append(_conv_record(node.output[0], out, w.shape))
        out = self.shapes.get(name)
        if out is None or any(d is None for d in out) or len(out) != 4:
            return False
        after = [_conv_record(name, out, st.kernel.shape)]
        a = cost.profile_ops(before, [(r.inputs[0], ()) for r in before])
        b = cost.profile_ops(after, [(name + "/in", ())])
        return b.macs > a.macs or b.params > a.params

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
                raise _NoFuse("merging would make the conv larger than the original ones (more MACs or "
                              "parameters, repnp.cost; aggressive=True merges anyway)")
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

    def op_Conv(self, idx, node):
        w = self.const(node.input[1])
        b = self.const(node.input[2]) if len(node.input) > 2 else None
        if w is None or w.ndim != 4 or (len(node.input) > 2 and node.input[2] and b is None):
            return None
        attrs = og.node_attributes(node)
        groups = int(attrs.get("group", 1))
        stride, dilation = og.pair_attribute(node, attrs, "strides"), og.pair_attribute(node, attrs, "dilations")
        declared = attrs.get("kernel_shape")
        if declared and tuple(int(k) for k in declared) != tuple(w.shape[2:]):
            raise ConversionError(f"Conv {og.text(node.name)!r}: kernel_shape {list(declared)} does not match "
                                  f"its weight {node.input[1]!r} of shape {list(w.shape)}")
        if groups < 1:
            raise ConversionError(f"Conv {og.text(node.name)!r}: group must be at least 1, got {groups}")
        pads = self._explicit_pads(idx, node, attrs, w.shape[2:], stride, dilation)
        if pads is None:
            return None
        return self._conv_like(idx, node, np.asarray(w), b, groups, stride, dilation, pads,
                               dtype=np.asarray(w).dtype)

    def _explicit_pads(self, idx, node, attrs, kernel, stride, dilation):
        """The node's pads as (top, left, bottom, right), ``auto_pad`` resolved; ``None``
        (and a near-match naming ``auto_pad``) when that needs an unknown input size."""
        what = f"{node.op_type} {og.text(node.name)!r}"
        for label, pair in (("strides", stride), ("dilations", dilation), ("kernel_shape", kernel)):
            if min(int(v) for v in pair) < 1:
                raise ConversionError(f"{what}: {label} must be positive, got {[int(v) for v in pair]}")
        mode = attrs.get("auto_pad", "NOTSET")
        if mode == "NOTSET":
            pads = tuple(int(p) for p in attrs.get("pads") or (0, 0, 0, 0))
            if len(pads) != 4 or min(pads) < 0:
                raise ConversionError(f"{what}: pads must be 4 non-negative values (top, left, bottom, "
                                      f"right) for a 2-D op, got {list(pads)}")
            return pads
        if mode not in ("VALID", "SAME_UPPER", "SAME_LOWER"):
            self.note(idx, f"{node.op_type} {node.name!r} has an unknown auto_pad={mode!r}: left as it is")
            return None
        pads = og.explicit_pads(mode, self.spatial(node.input[0]), tuple(kernel), stride, dilation)
        if pads is None:
            self.note(idx, f"{node.op_type} {node.name!r} has auto_pad={mode} with stride {list(stride)} and "
                           f"its input {node.input[0]!r} has no static height/width: the padding it implies "
                           f"depends on the input size, so no fixed-pad conv replaces it")
        return pads

    def op_AveragePool(self, idx, node):
        attrs = og.node_attributes(node)
        if len(attrs.get("kernel_shape") or ()) != 2:
            return None
        k, stride = og.pair_attribute(node, attrs, "kernel_shape"), og.pair_attribute(node, attrs, "strides")
        pads = self._explicit_pads(idx, node, attrs, k, stride, (1, 1))
        if pads is None:
            return None
        if attrs.get("ceil_mode", 0) or og.pair_attribute(node, attrs, "dilations") != (1, 1):
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
        return self._conv_like(idx, node, kernel, None, c, stride, (1, 1), pads)

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
        eps = float(attrs.get("epsilon", _BN_EPSILON))
        try:
            denom = var.astype(np.float64) + eps
        except (TypeError, ValueError):
            raise ConversionError(f"BatchNormalization {node.name!r}: variance {node.input[4]!r} is not "
                                  f"numeric ({var.dtype})") from None
        if not np.all(denom > 0):  # written this way so that NaN fails too
            ch = int(np.flatnonzero(~(denom > 0))[0])
            raise ConversionError(f"BatchNormalization {node.name!r}: variance + epsilon must be positive, "
                                  f"channel {ch} has var {float(var[ch]):g} + epsilon {eps:g} (variance "
                                  f"{node.input[4]!r}): the BN is undefined there")
        x = node.input[0]
        r, took = self.eff(x, dtype=scale.dtype)
        if isinstance(r, _View):
            t, s_ = fusion.bn_scale_shift(mean, var, scale, beta, eps=eps)
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




