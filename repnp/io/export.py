"""Export a repnp block or network as ONNX, in either style of PyTorch's exporter.

:func:`export_onnx` walks a module (a block of any family supported below, a
:class:`repnp.blocks.common.Sequential` or a :class:`repnp.models.Network`)
and writes the ONNX graph that computes its ``forward``. Porters get ONNX of
every block; the converter (:func:`repnp.io.convert_onnx`) gets whole
networks as test data.

Two styles, as PyTorch's TorchScript exporter produces them (facts read from
the exports in ``shared/onnx-examples``, e.g. ``off_repvgg_ident_c10``):

* ``fold_bn=False`` (``do_constant_folding=False`` / ``training=PRESERVE``
  style): every BN is a ``BatchNormalization`` node and every initializer is
  named by the block's :meth:`params` name (``conv_kxk.conv.weight``,
  ``identity.var`` ...);
* ``fold_bn=True`` (the exporter's default constant folding): a BN right after
  a conv is folded into it (rule 1, :func:`repnp.fusion.fuse_bn`) and the
  folded tensors get anonymous names ``onnx::Conv_<n>``; BNs without a conv
  before them (an identity branch, the BN after DBB's average pooling) stay
  ``BatchNormalization`` nodes.

Nodes are named like PyTorch names them (``/stage1/0/conv_kxk/conv/Conv``,
output ``<node>_output_0``); the graph input is ``input`` and the output
``output``; the input shape is static (``input_shape``). Everything is
exported in float32 (the dtype ONNX runtimes run convolutions in).
DBB's BN-and-pad (the intermediate map padded with the BN's own value at
zero input) is a zero ``Pad`` followed by one ``ScatterND`` writing the
per-channel value into the border, the lowering PyTorch uses (it computes
the indices with a shape subgraph; here they are constants).
Activations come from the blocks' :class:`repnp.blocks.common.Activation`
objects and launch the operators ``Activation.trace`` records (ReLU6 as
``Clip``, SiLU as ``Sigmoid`` and ``Mul`` ...); GELU is one ``Gelu`` node from
opset 20 and the exporters' ``Div``-``Erf``-``Add``-``Mul``-``Mul`` chain below.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from repnp import fusion, ops
from repnp.blocks.acnet import ACBlock
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.base import pair as _pair
from repnp.blocks.common import RELU, RELU6, SIGMOID, Activation, ClassifierHead, ConvAct, Sequential
from repnp.blocks.dbb import DiverseBranchBlock
from repnp.blocks.mobilenetv2 import InvertedResidual
from repnp.blocks.mobileone import MobileOneBlock, MobileOneUnit
from repnp.blocks.repmlp import RepMLPBlock, SharedFC
from repnp.blocks.repvgg import RepVGGBlock
from repnp.blocks.resrep import CompactorConv, Linear, ResRepNet, ResRepNetDeploy
from repnp.blocks.se import SqueezeExcite
from repnp.blocks.separable import DepthwiseSeparableBlock, LinearBottleneckBlock, RegularConvBlock
from repnp.blocks.shufflenet import ShuffleNetUnit
from repnp.errors import ShapeError
from repnp.io.atomic import check_output_path
from repnp.io.onnx.graph import check_model_full
from repnp.io.onnx.write import save_onnx

__all__ = ["export_onnx", "build_onnx", "SUPPORTED"]

_DTYPE = np.float32


class _Builder:
    """Accumulates nodes and initializers in topological order, tracking static shapes."""

    def __init__(self, *, fold_bn: bool, opset: int) -> None:
        self.fold_bn = fold_bn
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._names: set[str] = set()
        self._anon = 0

    # -- naming ---------------------------------------------------------------
    def _unique(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def init(self, name: str | None, array, *, dtype=_DTYPE) -> str:
        """An initializer; ``name=None`` gives PyTorch's anonymous ``onnx::Conv_<n>`` style."""
        if name is None:
            self._anon += 1
            name = f"onnx::Conv_{self._anon}"
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def node(self, op_type: str, inputs, scope: str, shape, **attrs) -> str:
        """Append one node; returns its (single) output name."""
        path = "/" + scope.strip(".").replace(".", "/") if scope.strip(".") else ""
        name = self._unique(f"{path}/{op_type}")
        out = f"{name}_output_0"
        self._names.add(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        self.shapes[out] = tuple(int(s) for s in shape)
        return out

    def const(self, array, scope: str, *, dtype=None) -> str:
        """A ``Constant`` node (as PyTorch emits for literals inside ``forward``)."""
        arr = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
        out = self.node("Constant", [], scope, arr.shape, value=numpy_helper.from_array(arr))
        return out


# ----------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------

def _conv_attrs(conv: Conv2d) -> dict:
    sh, sw = _pair(conv.stride)
    dh, dw = _pair(conv.dilation)
    top, left, bottom, right = ops.normalize_padding(conv.padding)
    return dict(kernel_shape=list(conv.weight.shape[2:]), strides=[sh, sw], dilations=[dh, dw],
                pads=[top, left, bottom, right], group=int(conv.groups))


def _conv(b: _Builder, x: str, conv: Conv2d, prefix: str, *, weight_name=None, kernel=None,
          bias=None, named=True) -> str:
    """A Conv node; ``kernel``/``bias`` override the conv's own arrays (folded BN, actual kernel)."""
    w = conv.weight if kernel is None else kernel
    bvec = conv.bias if kernel is None else bias
    if weight_name is None:
        weight_name = b.init(f"{prefix}weight" if named else None, w)
    inputs = [x, weight_name]
    if bvec is not None:
        inputs.append(b.init(f"{prefix}bias" if named else None, bvec))
    shape = Conv2d(np.empty((w.shape[0], 1, *w.shape[2:])), None, stride=conv.stride,
                   padding=conv.padding, dilation=conv.dilation).output_shape(b.shapes[x])
    return b.node("Conv", inputs, f"{prefix}", shape, **_conv_attrs(conv))


def _bn(b: _Builder, x: str, bn: BatchNorm, prefix: str) -> str:
    if b.shapes[x][1] != bn.channels:
        raise ShapeError(f"BN {prefix!r} has {bn.channels} channels, its input has shape {b.shapes[x]}")
    inputs = [x, b.init(f"{prefix}gamma", bn.gamma), b.init(f"{prefix}beta", bn.beta),
              b.init(f"{prefix}mean", bn.mean), b.init(f"{prefix}var", bn.var)]
    return b.node("BatchNormalization", inputs, prefix, b.shapes[x], epsilon=float(bn.eps))


def _conv_bn(b: _Builder, x: str, layer: ConvBN, prefix: str) -> str:
    if b.fold_bn:
        kernel, bias = layer.fused()
        return _conv(b, x, layer.conv, f"{prefix}conv.", kernel=kernel, bias=bias, named=False)
    return _bn(b, _conv(b, x, layer.conv, f"{prefix}conv."), layer.bn, f"{prefix}bn.")


def _conv_or_conv_bn(b: _Builder, x: str, layer, prefix: str) -> str:
    if isinstance(layer, ConvBN):
        return _conv_bn(b, x, layer, prefix)
    return _conv(b, x, layer, prefix)


#: Bounds of the ``Clip`` that an activation launches (ReLU6 is Clip(x, 0, 6)).
_CLIP_BOUNDS = {"relu6": (0.0, 6.0)}


def _activation(b: _Builder, x: str, act: Activation, prefix: str) -> str:
    """The nodes of ``act`` after ``x``: exactly the op types :meth:`Activation.trace` records,
    in its order (``act.op_types``), except GELU below opset 20 (no ``Gelu`` operator there)."""
    scope, shape = f"{prefix}act", b.shapes[x]
    if act.name == "gelu" and b.opset < 20:
        # Exact GELU x * (1 + erf(x / sqrt 2)) / 2 as the Div -> Erf -> Add -> Mul chain that
        # exporters emit below opset 20 (the pattern onnxruntime's GeluFusion matches,
        # microsoft/onnxruntime test data onnxruntime/test/testdata/transform/fusion/gelu_add_gen.py).
        s = b.node("Div", [x, b.const(np.array(np.sqrt(2.0), _DTYPE), scope)], scope, shape)
        e = b.node("Add", [b.node("Erf", [s], scope, shape), b.const(np.array(1.0, _DTYPE), scope)],
                   scope, shape)
        return b.node("Mul", [b.node("Mul", [x, e], scope, shape), b.const(np.array(0.5, _DTYPE), scope)],
                      scope, shape)
    out = x
    for op_type in act.op_types:
        if op_type == "Clip":            # bounds are inputs since opset 11
            lo, hi = _CLIP_BOUNDS[act.name]
            inputs = [out, b.const(np.array(lo, _DTYPE), scope), b.const(np.array(hi, _DTYPE), scope)]
        elif op_type == "Mul":           # silu: x * sigmoid(x)
            inputs = [x, out]
        else:
            inputs = [out]
        out = b.node(op_type, inputs, scope, shape)
    return out


def _sum(b: _Builder, branches, scope: str) -> str:
    """Run the branches (callables returning a tensor) one after another, each followed by an
    ``Add`` into the running sum: the order the blocks trace (``trace_branch_sum``), with the
    fewest live tensors."""
    total = branches[0]()
    for branch in branches[1:]:
        part = branch()
        total = b.node("Add", [total, part], scope, b.shapes[total])
    return total


def _branch(b: _Builder, x: str, branch, prefix: str) -> str:
    if isinstance(branch, BatchNorm):
        return _bn(b, x, branch, prefix)
    return _conv_bn(b, x, branch, prefix)


# ----------------------------------------------------------------------------
# families
# ----------------------------------------------------------------------------

def _export_sequential(b, x, m: Sequential, prefix):
    for name, layer in zip(m.names, m.layers):
        x = _export(b, x, layer, f"{prefix}{name}.")
    return x


def _export_head(b, x, m: ClassifierHead, prefix):
    n, c = b.shapes[x][:2]
    pooled = b.node("GlobalAveragePool", [x], prefix, (n, c, 1, 1))
    flat = b.node("Flatten", [pooled], prefix, (n, c), axis=1)
    return b.node("Gemm", [flat, b.init(f"{prefix}weight", m.weight), b.init(f"{prefix}bias", m.bias)],
                  prefix, (n, m.weight.shape[0]), transB=1)


def _export_se(b, x, m: SqueezeExcite, prefix):
    n, c = b.shapes[x][:2]
    s = b.node("GlobalAveragePool", [x], prefix, (n, c, 1, 1))
    s = _activation(b, _conv(b, s, m.reduce, f"{prefix}reduce."), RELU, f"{prefix}reduce.")
    s = _activation(b, _conv(b, s, m.expand, f"{prefix}expand."), SIGMOID, f"{prefix}expand.")
    return b.node("Mul", [x, s], prefix, b.shapes[x])


def _export_conv_act(b, x, m: ConvAct, prefix):
    y = _conv(b, x, m.conv, f"{prefix}conv.")
    if m.se is not None:
        y = _export_se(b, y, m.se, f"{prefix}se.")
    return _activation(b, y, m.activation, prefix)


def _export_repvgg(b, x, m: RepVGGBlock, prefix):
    names = ("conv_kxk.", "conv_1x1.", "identity.")
    parts = [lambda br=br, nm=nm: _branch(b, x, br, prefix + nm) for br, nm in zip(m.branches, names)]
    return _activation(b, _sum(b, parts, prefix), m.activation, prefix)


def _export_mobileone(b, x, m: MobileOneBlock, prefix):
    names = [f"conv_kxk.{i}." for i in range(m.num_branches)]
    if m.conv_scale is not None:
        names.append("conv_scale.")
    if m.skip is not None:
        names.append("skip.")
    y = _sum(b, [lambda br=br, nm=nm: _branch(b, x, br, prefix + nm) for br, nm in zip(m.branches, names)],
             prefix)
    if m.se is not None:
        y = _export_se(b, y, m.se, f"{prefix}se.")
    return _activation(b, y, m.activation, prefix)


def _export_mobileone_unit(b, x, m: MobileOneUnit, prefix):
    return _export_mobileone(b, _export_mobileone(b, x, m.dw, f"{prefix}dw."), m.pw, f"{prefix}pw.")


def _export_inverted_residual(b, x, m: InvertedResidual, prefix):
    h = x
    if m.expand is not None:
        h = _activation(b, _conv_or_conv_bn(b, h, m.expand, f"{prefix}expand."), RELU6, f"{prefix}expand.")
    h = _activation(b, _conv_or_conv_bn(b, h, m.depthwise, f"{prefix}depthwise."), RELU6, f"{prefix}depthwise.")
    y = _conv_or_conv_bn(b, h, m.project, f"{prefix}project.")
    return b.node("Add", [y, x], prefix, b.shapes[y]) if m.use_residual else y


def _slice(b, x, axis: int, crop: int, scope: str) -> str:
    """Crop ``crop`` pixels from both ends of ``axis`` (ACNet's negative padding)."""
    shape = list(b.shapes[x])
    shape[axis] -= 2 * crop
    starts = b.const(np.array([crop], np.int64), scope)
    ends = b.const(np.array([-crop], np.int64), scope)
    axes = b.const(np.array([axis], np.int64), scope)
    return b.node("Slice", [x, starts, ends, axes], scope, shape)


def _export_acnet(b, x, m: ACBlock, prefix):
    geo = m.geometry
    def branch(name, axis, crop):
        src = _slice(b, x, axis, crop, f"{prefix}{name}.") if crop else x
        return _conv_bn(b, src, getattr(m, name), f"{prefix}{name}.")

    return _sum(b, [lambda: _conv_bn(b, x, m.square, f"{prefix}square."),
                    lambda: branch("ver", 3, geo["ver_crop"]), lambda: branch("hor", 2, geo["hor_crop"])], prefix)


def _bn_and_pad(b, h, value: np.ndarray, pad: int, scope: str) -> str:
    """Pad ``h`` by ``pad`` with the per-channel ``value``: a zero ``Pad`` then a ``ScatterND``
    writing ``value`` into the border (ONNX ``Pad`` takes one scalar)."""
    if pad == 0:
        return h
    n, c, hh, ww = b.shapes[h]
    shape = (n, c, hh + 2 * pad, ww + 2 * pad)
    pads = b.const(np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64), scope)
    padded = b.node("Pad", [h, pads], scope, shape, mode="constant")
    border = np.ones(shape[2:], dtype=bool)
    border[pad:pad + hh, pad:pad + ww] = False
    iy, ix = np.nonzero(border)
    ni, ci, pi = np.meshgrid(np.arange(n), np.arange(c), np.arange(iy.size), indexing="ij")
    indices = np.stack([ni, ci, iy[pi], ix[pi]], axis=-1).astype(np.int64)
    updates = np.broadcast_to(np.asarray(value, _DTYPE)[None, :, None], ni.shape)
    return b.node("ScatterND", [padded, b.init(f"{scope}border_indices", indices, dtype=np.int64),
                                b.init(f"{scope}border_values", updates)], scope, shape)


def _export_dbb(b, x, m: DiverseBranchBlock, prefix):
    k, p, g = m.kernel_size, m.padding, m.groups
    sh, sw = _pair(m.stride)

    def pool(h, padding, scope):
        n, c, hh, ww = b.shapes[h]
        shape = (n, c, ops.conv_output_size(hh, k, stride=sh, pad_begin=padding, pad_end=padding),
                 ops.conv_output_size(ww, k, stride=sw, pad_begin=padding, pad_end=padding))
        return b.node("AveragePool", [h], scope, shape, kernel_shape=[k, k], strides=[sh, sw],
                      pads=[padding] * 4, count_include_pad=1)

    def pad_value(bn: BatchNorm) -> np.ndarray:
        return fusion.bn_scale_shift(bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)[1]

    def avg_branch():
        if m.avg_conv is None:
            h = pool(x, p, f"{prefix}avg.avg.")
        else:
            h = _conv_bn(b, x, m.avg_conv, f"{prefix}avg.")
            h = pool(_bn_and_pad(b, h, pad_value(m.avg_conv.bn), p, f"{prefix}avg.bn."), 0, f"{prefix}avg.avg.")
        return _bn(b, h, m.avg_bn, f"{prefix}avg.avgbn.")

    def seq_branch():
        # 1x1 -> KxK: the identity-based 1x1 stores a delta; the kernel is delta + identity, computed
        # in the graph (an Add of the delta and a Constant) as PyTorch exports IdentityBasedConv1x1.
        c1 = Conv2d(m.seq_conv1.weight, None, groups=g)
        seq = f"{prefix}seq."
        if b.fold_bn:
            first = fusion.fuse_bn(m.seq_kernel1, None, m.seq_bn1.mean, m.seq_bn1.var, m.seq_bn1.gamma,
                                   m.seq_bn1.beta, eps=m.seq_bn1.eps)
            h = _conv(b, x, c1, f"{seq}conv1.", kernel=first.kernel, bias=first.bias, named=False)
        else:
            if m.seq_identity_based:
                ident = fusion.identity_kernel(m.in_channels, groups=g, dtype=np.float64)
                scope = f"{seq}idconv1."
                kernel = b.node("Add", [b.init(f"{scope}weight", m.seq_conv1.weight),
                                        b.const(ident.astype(_DTYPE), scope)], scope, ident.shape)
                h = _conv(b, x, c1, scope, weight_name=kernel)
            else:
                h = _conv(b, x, c1, f"{seq}conv1.")
            h = _bn(b, h, m.seq_bn1, f"{seq}bn1.")
        h = _bn_and_pad(b, h, pad_value(m.seq_bn1), p, f"{seq}bn1.")
        if b.fold_bn:
            return _conv_bn(b, h, ConvBN(m.seq_conv2, m.seq_bn2), seq)
        return _bn(b, _conv(b, h, m.seq_conv2, f"{seq}conv2."), m.seq_bn2, f"{seq}bn2.")

    branches = [lambda: _conv_bn(b, x, m.origin, f"{prefix}origin.")]
    if m.one is not None:
        branches.append(lambda: _conv_bn(b, x, m.one, f"{prefix}one."))
    return _sum(b, branches + [avg_branch, seq_branch], prefix)


def _export_compactor(b, x, m: CompactorConv, prefix):
    # Q * BN(conv(x)): the compactor is a bias-free 1x1 conv (ResRep, seed 004).
    return _conv(b, _conv_bn(b, x, m.conv_bn, prefix), m.compactor, f"{prefix}compactor.")


def _export_linear(b, x, m: Linear, prefix):
    inputs = [x, b.init(f"{prefix}weight", m.weight)]
    if m.bias is not None:
        inputs.append(b.init(f"{prefix}bias", m.bias))
    return b.node("Gemm", inputs, prefix, (b.shapes[x][0], m.weight.shape[0]), transB=1)


def _export_resrep_head(b, h, next_conv, linear, prefix):
    if next_conv is not None:
        return _conv_or_conv_bn(b, h, next_conv, f"{prefix}next.")
    # NCHW flattens channel-first: (N, C*H*W), as the pruned Linear expects.
    n = b.shapes[h][0]
    flat = b.node("Flatten", [h], f"{prefix}linear.", (n, int(np.prod(b.shapes[h][1:]))), axis=1)
    return _export_linear(b, flat, linear, f"{prefix}linear.")


def _export_resrep_net(b, x, m: ResRepNet, prefix):
    h = _activation(b, _export_compactor(b, x, m.layer, f"{prefix}layer."), m.activation, f"{prefix}layer.")
    return _export_resrep_head(b, h, m.next_conv, m.linear, prefix)


def _export_resrep_deploy(b, x, m: ResRepNetDeploy, prefix):
    h = _activation(b, _conv(b, x, m.conv, f"{prefix}conv."), m.activation, f"{prefix}conv.")
    return _export_resrep_head(b, h, m.next_conv, m.linear, prefix)


def _reshape(b, x, shape, scope):
    return b.node("Reshape", [x, b.const(np.array(shape, np.int64), scope)], scope, shape)


def _shared_fc(b, x, weight, bias, sets, prefix, scope):
    """RepMLP's S shared FCs as the official code runs them: reshape to (N*C/S, S*H*W, 1, 1),
    grouped 1x1 conv (groups S), reshape to the (N*C/S, S, H, W) view."""
    n, c, h, w = b.shapes[x]
    hw = h * w
    rows = n * c // sets
    flat = _reshape(b, x, (rows, sets * hw, 1, 1), scope)
    fc = Conv2d(weight.reshape(sets * hw, hw, 1, 1), bias, groups=sets)
    y = _conv(b, flat, fc, prefix)
    return _reshape(b, y, (rows, sets, h, w), scope)


def _export_repmlp(b, x, m: RepMLPBlock, prefix):
    n = b.shapes[x][0]
    s, h, w = m.sets, m.height, m.width
    if b.shapes[x][1:] != (m.channels, h, w):
        raise ShapeError(f"RepMLP block {prefix!r} needs input (N, {m.channels}, {h}, {w}), got {b.shapes[x]}")
    y = _bn(b, _shared_fc(b, x, m.fc_weight, None, s, f"{prefix}fc.", prefix), m.fc_bn, f"{prefix}fc_bn.")
    if m.local:
        view = _reshape(b, x, (n * m.channels // s, s, h, w), prefix)
        for branch in m.local:
            part = _conv_bn(b, view, branch, f"{prefix}repconv{branch.conv.weight.shape[2]}.")
            y = b.node("Add", [y, part], prefix, b.shapes[y])
    return _reshape(b, y, b.shapes[x], prefix)


def _export_shared_fc(b, x, m: SharedFC, prefix):
    y = _shared_fc(b, x, m.weight, m.bias, m.sets, prefix, prefix)
    return _reshape(b, y, b.shapes[x], prefix)


def _export_regular(b, x, m: RegularConvBlock, prefix):
    return _activation(b, _conv_or_conv_bn(b, x, m.conv, f"{prefix}conv."), m.activation, prefix)


def _export_dw_separable(b, x, m: DepthwiseSeparableBlock, prefix):
    h = _activation(b, _conv_or_conv_bn(b, x, m.depthwise, f"{prefix}depthwise."), m.activation,
                    f"{prefix}depthwise.")
    return _activation(b, _conv_or_conv_bn(b, h, m.pointwise, f"{prefix}pointwise."), m.activation,
                       f"{prefix}pointwise.")


def _export_linear_bottleneck(b, x, m: LinearBottleneckBlock, prefix):
    h = _activation(b, _conv_or_conv_bn(b, x, m.reduce, f"{prefix}reduce."), m.activation, f"{prefix}reduce.")
    if m.depthwise is not None:
        h = _conv_or_conv_bn(b, h, m.depthwise, f"{prefix}depthwise.")
    return _conv_or_conv_bn(b, h, m.expand, f"{prefix}expand.")


def _export_shufflenet(b, x, m: ShuffleNetUnit, prefix):
    h = _conv_or_conv_bn(b, x, m.conv1, f"{prefix}conv1.")
    h = _activation(b, h, RELU, f"{prefix}conv1.")
    if m.groups > 1:
        # channel shuffle as exporters emit it: Reshape to (N, g, C/g, H, W), Transpose, Reshape back
        n, c, hh, ww = b.shapes[h]
        scope = f"{prefix}shuffle."
        five = _reshape(b, h, (n, m.groups, c // m.groups, hh, ww), scope)
        moved = b.node("Transpose", [five], scope, (n, c // m.groups, m.groups, hh, ww), perm=[0, 2, 1, 3, 4])
        h = _reshape(b, moved, (n, c, hh, ww), scope)
    if m.depthwise is not None:
        h = _conv_or_conv_bn(b, h, m.depthwise, f"{prefix}depthwise.")
    y = _conv_or_conv_bn(b, h, m.conv2, f"{prefix}conv2.")
    if m.stride == 1:
        y = b.node("Add", [x, y], prefix, b.shapes[y])
    else:
        n, c, hh, ww = b.shapes[x]
        pooled = b.node("AveragePool", [x], f"{prefix}pool.", (n, c) + b.shapes[y][2:], kernel_shape=[3, 3],
                        strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
        y = b.node("Concat", [pooled, y], prefix, (n, c + b.shapes[y][1]) + b.shapes[y][2:], axis=1)
    return _activation(b, y, RELU, prefix)


def _export_network(b, x, m, prefix):
    return _export_sequential(b, x, m.layers, prefix)


#: Module type -> exporter. Networks (``repnp.models.Network``) are matched by duck typing
#: (``layers`` being a Sequential) so that this module need not import the network layer.
SUPPORTED = {
    Conv2d: lambda b, x, m, p: _conv(b, x, m, p),
    BatchNorm: lambda b, x, m, p: _bn(b, x, m, p),
    ConvBN: lambda b, x, m, p: _conv_bn(b, x, m, p),
    Activation: _activation,
    ConvAct: _export_conv_act,
    Sequential: _export_sequential,
    ClassifierHead: _export_head,
    SqueezeExcite: _export_se,
    RepVGGBlock: _export_repvgg,
    MobileOneBlock: _export_mobileone,
    MobileOneUnit: _export_mobileone_unit,
    InvertedResidual: _export_inverted_residual,
    ACBlock: _export_acnet,
    DiverseBranchBlock: _export_dbb,
    CompactorConv: _export_compactor,
    Linear: _export_linear,
    ResRepNet: _export_resrep_net,
    ResRepNetDeploy: _export_resrep_deploy,
    RepMLPBlock: _export_repmlp,
    SharedFC: _export_shared_fc,
    RegularConvBlock: _export_regular,
    DepthwiseSeparableBlock: _export_dw_separable,
    LinearBottleneckBlock: _export_linear_bottleneck,
    ShuffleNetUnit: _export_shufflenet,
}


def _export(b: _Builder, x: str, module, prefix: str) -> str:
    fn = SUPPORTED.get(type(module))
    if fn is None and isinstance(getattr(module, "layers", None), Sequential):
        fn = _export_network
    if fn is None:
        known = ", ".join(sorted(t.__name__ for t in SUPPORTED))
        raise TypeError(f"cannot export a {type(module).__name__} ({prefix.rstrip('.') or 'top level'}); "
                        f"supported: {known} and networks")
    return fn(b, x, module, prefix)


def _in_channels(module) -> int:
    """The input channel count of a module, from its first conv / BN."""
    for attr in ("in_channels",):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if isinstance(module, Conv2d):
        return int(module.weight.shape[1] * module.groups)
    if isinstance(module, ConvBN):
        return _in_channels(module.conv)
    if isinstance(module, (BatchNorm, SqueezeExcite)):
        return int(module.channels)
    if isinstance(module, ConvAct):
        return _in_channels(module.conv)
    if isinstance(module, ClassifierHead):
        return int(module.weight.shape[1])
    if isinstance(module, Sequential):
        return _in_channels(module.layers[0])
    if isinstance(getattr(module, "layers", None), Sequential):
        return _in_channels(module.layers)
    if isinstance(module, ResRepNetDeploy):
        return _in_channels(module.conv)
    raise ValueError(f"cannot tell the input channels of a {type(module).__name__}: pass input_shape")


def build_onnx(module, *, fold_bn: bool = False, input_shape=None, opset: int = 17) -> onnx.ModelProto:
    """The ONNX model of ``module`` (see :func:`export_onnx`), not written anywhere."""
    if input_shape is None:
        if isinstance(module, (RepMLPBlock, SharedFC)):     # fixed-size maps
            input_shape = (1, module.channels, module.height, module.width)
        elif isinstance(module, Linear):
            input_shape = (1, module.weight.shape[1])
        else:
            input_shape = (1, _in_channels(module), 224, 224)
    shape = tuple(int(s) for s in input_shape)
    rank = 2 if isinstance(module, Linear) else 4
    if len(shape) != rank or min(shape) < 1:
        want = "(N, features)" if rank == 2 else "(N, C, H, W)"
        raise ShapeError(f"input_shape must be {want} with positive sizes, got {input_shape!r}")
    if int(opset) < 14:
        # HardSwish needs 14; BatchNormalization's opset-14 form is the one the reference
        # evaluator runs correctly (design brief).
        raise ValueError(f"opset must be >= 14, got {opset}")
    b = _Builder(fold_bn=bool(fold_bn), opset=int(opset))
    b.shapes["input"] = shape
    b._names.add("input")
    y = _export(b, "input", module, "")
    out_shape = b.shapes[y]
    if y == "input" or any(y in n.input for n in b.nodes):
        y = b.node("Identity", [y], "", out_shape)
    # The last node writes the graph output directly, as PyTorch names it.
    for node in b.nodes:
        if y in node.output:
            node.output[list(node.output).index(y)] = "output"
    graph = helper.make_graph(
        b.nodes, type(module).__name__,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))],
        initializer=b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="repnp")
    model.ir_version = 8
    # Every initializer comes from numpy_helper.from_array: the full check need not
    # serialize the weights again (check_model_full checks the graph on a light copy).
    check_model_full(model, trusted={t.name for t in model.graph.initializer})
    return model


def export_onnx(module, path, *, fold_bn: bool = False, input_shape=None, opset: int = 17,
                force: bool = False) -> Path:
    """Write a repnp block or network (train or deploy form) as an ONNX model.

    Parameters
    ----------
    module
        A block (RepVGG, MobileOne block/unit, ACNet, DBB, ResRep compactor
        conv and net, RepMLP block and its shared FC, MobileNetV2 inverted
        residual, regular / depthwise-separable / linear-bottleneck blocks,
        ShuffleNet unit, conv, conv-BN, BN, SE, activation, classifier head,
        Linear), a ``Sequential`` of them or a network of
        :mod:`repnp.models`; train or deploy form (the deploy forms are built
        from the same pieces). Not the two-input NASNet cell.
    path : str or os.PathLike
        Output file, written through a temporary file and a rename.
    fold_bn : bool, keyword-only
        ``False``: every BN a ``BatchNormalization`` node, initializers named
        by ``module.params()``. ``True``: BNs that follow a conv folded into it
        (``onnx::Conv_<n>`` initializers), the others kept.
    input_shape : (N, C, H, W), keyword-only
        Static input shape; default ``(1, C_in, 224, 224)`` (RepMLP: its fixed
        ``(1, C, H, W)``; a Linear: ``(1, in_features)``).
    opset : int, keyword-only
        ONNX opset (default 17; at least 14). From opset 20 a GELU is one
        ``Gelu`` node; below, the Div-Erf-Add-Mul-Mul chain exporters emit.
    force : bool, keyword-only
        Replace an existing ``path``.

    Returns
    -------
    pathlib.Path

    Notes
    -----
    The folded style applies RepVGG eq. (3) (seed 001/003),
    ``W' = W gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) gamma / sqrt(var + eps)``,
    as the exporter's constant folding does. The model passes
    ``onnx.checker.check_model(full_check=True)``; its nodes are in
    topological order (they are appended as ``forward`` runs).
    """
    target = check_output_path(os.fspath(path), force=force)   # refuse before building anything
    model = build_onnx(module, fold_bn=fold_bn, input_shape=input_shape, opset=opset)
    return save_onnx(model, target, force=force)
