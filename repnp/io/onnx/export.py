"""Export a repnp block or network as ONNX, in either style of PyTorch's exporter.

:func:`export_onnx` writes the ONNX graph of a module's dataflow (any block,
:class:`repnp.blocks.common.Sequential` or :class:`repnp.models.Network`: the
description its ``describe`` states once, :mod:`repnp.dataflow`), the graph that
computes its ``forward``. This module is the third interpreter of that
description, beside :func:`repnp.dataflow.run` and the cost model's trace; it
knows no block family. Porters get ONNX of every block; the converter
(:func:`repnp.io.convert_onnx`) gets whole networks as test data.

Two styles, as PyTorch's TorchScript exporter produces them (facts read from
real PyTorch exports of the official RepVGG and DBB blocks, ``tests/data/onnx``):

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
Activations are the nodes :class:`repnp.blocks.common.Activation` describes
(ReLU6 as ``Clip``, SiLU as ``Sigmoid`` and ``Mul`` ...); GELU is one ``Gelu``
node from opset 20 and the exporters' ``Div``-``Erf``-``Add``-``Mul``-``Mul``
chain below. ShuffleNet's channel shuffle is ``Reshape``, ``Transpose``, ``Reshape``.
``PRelu`` and ``DepthToSpace`` (ECBSR's PixelShuffle, mode "CRD") are the ONNX operators;
``ReduceL2`` / ``ReduceMean`` (UniRepLKNet's GRN) take ``axes`` as an attribute up to
opset 17 and as a ``Constant`` input from 18.
Weights computed from weights (DBB's identity-based 1x1, ``delta + I``) are
emitted as the nodes that compute them, or folded with ``fold_bn=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from repnp import fusion
from repnp.blocks.repmlp import RepMLPBlock, SharedFC
from repnp.dataflow import Dataflow, Described, evaluate, infer_shapes, weight_only
from repnp.errors import ShapeError
from repnp.io.atomic import check_output_path
from repnp.io.onnx import graph as og
from repnp.io.onnx.graph import check_model_full
from repnp.io.onnx.write import save_onnx

__all__ = ["export_onnx", "build_onnx", "emit_dataflow"]

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
        return og.unique_name(base, self._names)

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
# the interpreter: one dataflow node -> ONNX nodes
# ----------------------------------------------------------------------------

def _bn_and_pad(b: _Builder, h: str, value: np.ndarray, pads, scope: str) -> str:
    """Pad ``h`` with the per-channel ``value``: a zero ``Pad`` then a ``ScatterND`` writing
    ``value`` into the border (ONNX ``Pad`` takes one scalar), PyTorch's lowering of DBB's
    ``BNAndPadLayer`` (it computes the indices with a shape subgraph; here they are constants)."""
    top, left, bottom, right = pads
    n, c, hh, ww = b.shapes[h]
    shape = (n, c, hh + top + bottom, ww + left + right)
    pad_input = b.const(np.array([0, 0, top, left, 0, 0, bottom, right], np.int64), scope)
    padded = b.node("Pad", [h, pad_input], scope, shape, mode="constant")
    border = np.ones(shape[2:], dtype=bool)
    border[top:top + hh, left:left + ww] = False
    iy, ix = np.nonzero(border)
    ni, ci, pi = np.meshgrid(np.arange(n), np.arange(c), np.arange(iy.size), indexing="ij")
    indices = np.stack([ni, ci, iy[pi], ix[pi]], axis=-1).astype(np.int64)
    updates = np.broadcast_to(np.asarray(value, _DTYPE)[None, :, None], ni.shape)
    return b.node("ScatterND", [padded, b.init(f"{scope}border_indices", indices, dtype=np.int64),
                                b.init(f"{scope}border_values", updates)], scope, shape)


def _gelu_chain(b: _Builder, x: str, scope: str) -> str:
    """Exact GELU ``x (1 + erf(x / sqrt 2)) / 2`` as the Div -> Erf -> Add -> Mul -> Mul chain that
    exporters emit below opset 20 (the pattern onnxruntime's GeluFusion matches,
    microsoft/onnxruntime ``onnxruntime/test/testdata/transform/fusion/gelu_add_gen.py``)."""
    shape = b.shapes[x]
    s = b.node("Div", [x, b.const(np.array(np.sqrt(2.0), _DTYPE), scope)], scope, shape)
    e = b.node("Add", [b.node("Erf", [s], scope, shape), b.const(np.array(1.0, _DTYPE), scope)], scope, shape)
    return b.node("Mul", [b.node("Mul", [x, e], scope, shape), b.const(np.array(0.5, _DTYPE), scope)],
                  scope, shape)


def _channel_shuffle(b: _Builder, x: str, groups: int, scope: str) -> str:
    """ShuffleNet's shuffle as exporters emit it: Reshape to (N, g, C/g, H, W), Transpose, Reshape back."""
    n, c, hh, ww = b.shapes[x]
    five = _reshape(b, x, (n, groups, c // groups, hh, ww), scope)
    moved = b.node("Transpose", [five], scope, (n, c // groups, groups, hh, ww), perm=[0, 2, 1, 3, 4])
    return _reshape(b, moved, (n, c, hh, ww), scope)


def _reshape(b: _Builder, x: str, shape, scope: str, target=None) -> str:
    target = shape if target is None else target
    return b.node("Reshape", [x, b.const(np.array(target, np.int64), scope)], scope, shape)


def _folded_bn(flow: Dataflow, consumers: dict, static: set) -> dict:
    """Conv output -> the BatchNormalization node that alone reads it (PyTorch's constant
    folding merges such a pair; a BN after anything else stays a BatchNormalization node)."""
    producer = {n.output: n for n in flow.nodes}
    out = {}
    for node in flow.nodes:
        if node.op != "BatchNormalization" or node.output in static:
            continue
        src = node.inputs[0]
        if len(consumers.get(src, ())) == 1 and src not in flow.outputs:
            if src in producer and producer[src].op == "Conv":
                out[src] = node
    return out


def emit_dataflow(b: _Builder, flow: Dataflow, inputs) -> list[str]:
    """Append the ONNX nodes of ``flow`` to ``b``, its inputs bound to the tensors ``inputs``.

    Parameters become initializers under their own names (``fold_bn=False``) or, for a
    conv with its BN folded (``fold_bn=True``), anonymous ``onnx::Conv_<n>`` ones;
    composite nodes become the operators exporters emit for them. Returns the output tensors.
    """
    shapes = infer_shapes(flow, *(b.shapes[x] for x in inputs))
    static = weight_only(flow)
    consumers: dict[str, list] = {}
    for node in flow.nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    if b.fold_bn:
        # Constant folding, as the exporter's default does: weights computed from weights
        # become initializers, and a BN right after a conv folds into it.
        fold = _folded_bn(flow, consumers, static)
        values = _static_values(flow, static)
    else:
        fold, values = {}, {}
    names: dict[str, str] = dict(zip(flow.inputs, inputs))

    def tensor(name: str) -> str:
        """The ONNX name of a dataflow tensor, making its initializer on first use."""
        if name not in names:
            if name in values:
                names[name] = b.init(None, values[name])
            elif name in flow.params:
                names[name] = b.init(name, flow.params[name])
            else:   # a constant a block introduced (an identity kernel ...)
                names[name] = b.init(name.split("#")[0], flow.consts[name])
        return names[name]

    skipped = set()
    for node in flow.nodes:
        if node.output in skipped or (node.output in static and b.fold_bn):
            continue
        a, scope = node.attrs, node.scope
        shape = shapes[node.output]
        op = node.op
        if op == "Conv" and node.output in fold:
            bn = fold[node.output]

            def value(name):
                return values[name] if name in values else flow.tensor(name)

            weight = value(node.inputs[1])
            bias = value(node.inputs[2]) if len(node.inputs) > 2 else None
            _, gamma, beta, mean, var = (value(n) for n in bn.inputs)
            kernel, kbias = fusion.fuse_bn(weight, bias, mean, var, gamma, beta, eps=bn.attrs["epsilon"])
            out = b.node("Conv", [tensor(node.inputs[0]), b.init(None, kernel), b.init(None, kbias)], scope,
                         shape, **a)
            names[bn.output] = out
            skipped.add(bn.output)
        elif op == "PadChannels":
            out = _bn_and_pad(b, tensor(node.inputs[0]), flow.tensor(node.inputs[1]), a["pads"], scope)
        elif op == "ChannelShuffle":
            out = _channel_shuffle(b, tensor(node.inputs[0]), a["groups"], scope)
        elif op == "Gelu" and b.opset < 20:
            out = _gelu_chain(b, tensor(node.inputs[0]), scope)
        elif op == "Clip":           # bounds are inputs since opset 11
            out = b.node("Clip", [tensor(node.inputs[0]), b.const(np.array(a["min"], _DTYPE), scope),
                                  b.const(np.array(a["max"], _DTYPE), scope)], scope, shape)
        elif op == "Reshape":
            out = _reshape(b, tensor(node.inputs[0]), shape, scope, target=a["shape"])
        elif op in ("ReduceL2", "ReduceMean") and b.opset >= 18:   # axes is an input from opset 18
            axes = b.const(np.array(a["axes"], np.int64), scope)
            out = b.node(op, [tensor(node.inputs[0]), axes], scope, shape, keepdims=a.get("keepdims", 1))
        elif op == "Slice":
            ints = [b.const(np.array(a[k], np.int64), scope) for k in ("starts", "ends", "axes")]
            out = b.node("Slice", [tensor(node.inputs[0]), *ints], scope, shape)
        else:                        # the ONNX operator itself, attributes as they are
            out = b.node(op, [tensor(n) for n in node.inputs], scope, shape, **a)
        names[node.output] = out
    return [names[name] for name in flow.outputs]


def _static_values(flow: Dataflow, static: set) -> dict:
    """The values of the weight-only nodes, computed in float64 as constant folding would."""
    env = {n: np.asarray(flow.tensor(n), np.float64) for n in (*flow.params, *flow.consts)}
    for node in flow.nodes:
        if node.output in static:
            env[node.output] = evaluate(node, [env[i] for i in node.inputs])
    return {name: env[name] for name in static}


def _in_channels(module) -> int:
    """The input channel count of a module, from its first conv / BN."""
    channels = getattr(module, "in_channels", None)
    if channels is None:
        channels = getattr(module, "channels", None)
    if channels is None and hasattr(module, "weight"):
        channels = module.weight.shape[1]
    if channels is None and hasattr(module, "layers"):
        first = module.layers[0] if not hasattr(module.layers, "layers") else module.layers.layers[0]
        return _in_channels(first)
    if channels is None:
        raise ValueError(f"cannot tell the input channels of a {type(module).__name__}: pass input_shape")
    return int(channels)


def build_onnx(module, *, fold_bn: bool = False, input_shape=None, opset: int = 17) -> onnx.ModelProto:
    """The ONNX model of ``module`` (see :func:`export_onnx`), not written anywhere."""
    if input_shape is None:
        if isinstance(module, (RepMLPBlock, SharedFC)):     # fixed-size maps
            input_shape = (1, module.channels, module.height, module.width)
        elif getattr(module, "vector_input", False):
            # Blocks that read (N, features) vectors: a Linear, RepViT's BN-Linear heads.
            input_shape = (1, int(module.in_features))
        else:
            input_shape = (1, _in_channels(module), 224, 224)
    shape = tuple(int(s) for s in input_shape)
    rank = 2 if getattr(module, "vector_input", False) else 4
    if len(shape) != rank or min(shape) < 1:
        want = "(N, features)" if rank == 2 else "(N, C, H, W)"
        raise ShapeError(f"input_shape must be {want} with positive sizes, got {input_shape!r}")
    if int(opset) < 14:
        # HardSwish needs 14; and onnx.reference.ReferenceEvaluator (onnx 1.23) computes
        # BatchNormalization wrongly at opset <= 13 (measured: 0.19 off on a random 1x3x4x4
        # case where opset 14 agrees to 2e-7), and it is one of the converter's check engines.
        raise ValueError(f"opset must be >= 14, got {opset}")
    if not isinstance(module, Described):
        raise TypeError(f"cannot export a {type(module).__name__}: not a repnp block or network")
    if module.num_inputs != 1:
        raise TypeError(f"cannot export a {type(module).__name__}: it reads {module.num_inputs} inputs "
                        f"(export_onnx writes single-input models)")
    b = _Builder(fold_bn=bool(fold_bn), opset=int(opset))
    b.shapes["input"] = shape
    b._names.add("input")
    (y,) = emit_dataflow(b, module.dataflow, ["input"])
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
        Linear, UniRepLKNet block, ECB ...), a ``Sequential`` of them, the
        ECBSR / PlainSR network or a network of
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
    The folded style applies RepVGG eq. (3) (Ding et al., CVPR 2021; :func:`repnp.fusion.fuse_bn`),
    ``W' = W gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) gamma / sqrt(var + eps)``,
    as the exporter's constant folding does. The model passes
    ``onnx.checker.check_model(full_check=True)``; its nodes are in
    topological order (they are appended as ``forward`` runs).
    """
    target = check_output_path(os.fspath(path), force=force)   # refuse before building anything
    model = build_onnx(module, fold_bn=fold_bn, input_shape=input_shape, opset=opset)
    return save_onnx(model, target, force=force)
