"""One description per block: its dataflow as a list of operator nodes over its own arrays.

A block says once what it computes, in :meth:`describe`, by appending nodes to a
:class:`Dataflow`: ``Conv``, ``BatchNormalization``, ``Add`` ... (ONNX operator names
and attribute names, NCHW / OIHW as ONNX has them), reading the block's input, the
outputs of earlier nodes and the block's named parameters. Three interpreters read
that one description:

* :func:`run` computes it with :mod:`repnp.ops` (a block's ``forward``);
* :func:`trace_dataflow` records one :class:`repnp.trace.OpRecord` per kernel
  launch for the cost model (a block's ``trace``);
* :mod:`repnp.io.onnx.export` writes it as ONNX nodes (``export_onnx``).

So the structure of a family is written in one place; the algebra that turns the
train form into the deploy form (``reparameterize``) stays the family's own, as
explicit calls into :mod:`repnp.fusion`.

The vocabulary is ONNX's, plus three composite nodes that ONNX spells with several
operators (the exporter expands them, the cost model records what a runtime
launches for them):

* ``PadChannels`` — pad the spatial axes with a *per-channel* value (DBB's
  BN-and-pad; ONNX ``Pad`` takes one scalar, exporters emit ``Pad`` + ``ScatterND``);
* ``ChannelShuffle`` — ShuffleNet's shuffle (``Reshape``, ``Transpose``, ``Reshape``);
* ``Gelu`` below opset 20 (``Div``, ``Erf``, ``Add``, ``Mul``, ``Mul``).

Besides the convolution family the vocabulary has the element-wise ``Add``, ``Sub``,
``Mul``, ``Div`` (NumPy broadcasting, as ONNX's), the reductions ``ReduceL2`` and
``ReduceMean`` (``axes`` and ``keepdims`` attributes, as up to opset 17; the exporter
moves ``axes`` to an input from opset 18), ``PRelu`` (slope broadcast against the
input, ONNX's unidirectional broadcasting) and ``DepthToSpace`` (``blocksize``,
``mode`` "CRD", PyTorch's ``PixelShuffle``, or "DCR").

Nodes whose inputs are all parameters or constants (e.g. DBB's identity-based 1x1,
whose kernel is ``delta + I``) compute *weights*, not activations: :func:`run`
evaluates them once, the cost model does not count them, the exporter emits them
as PyTorch does (or folds them with ``fold_bn=True``).

This module imports only :mod:`repnp.ops`, :mod:`repnp.trace` and :mod:`repnp.errors`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from repnp import ops
from repnp.errors import ShapeError
from repnp.trace import FLOAT32_BYTES, TensorRef, Trace

__all__ = ["Node", "Dataflow", "Described", "run", "evaluate", "infer_shapes", "weight_only", "trace_dataflow",
           "describe_module"]


class Node(NamedTuple):
    """One operator of a dataflow.

    Attributes
    ----------
    op : str
        ONNX operator type (``Conv``, ``BatchNormalization``, ``Add``, ``Relu`` ...) or
        one of the composites of the module docstring.
    inputs : tuple of str
        Tensor names: the dataflow's inputs, earlier nodes' outputs, parameters or
        constants, in ONNX's input order (``Conv``: x, W, B).
    output : str
    scope : str
        The module path it belongs to (``stage1.0.conv_kxk.conv.``): names the ONNX node.
    attrs : dict
        ONNX attributes (``strides``, ``pads`` as ``[top, left, bottom, right]``,
        ``dilations``, ``group``, ``epsilon`` ...).
    """

    op: str
    inputs: tuple
    output: str
    scope: str
    attrs: dict


class Dataflow:
    """A block's computation under construction: inputs, named parameters, constants, nodes.

    Parameters are the block's trained arrays under their ``params()`` names;
    constants are fixed arrays a block introduces (an identity kernel, a pad value).
    Both are tensors the nodes read by name.
    """

    def __init__(self) -> None:
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.params: dict[str, np.ndarray] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self._count = 0

    # -- building -----------------------------------------------------------------------
    def input(self, name: str = "input") -> str:
        """Declare an input tensor."""
        self.inputs.append(name)
        return name

    def param(self, name: str, array: np.ndarray) -> str:
        """A named parameter of the block (a key of its ``params()``)."""
        if name in self.params:
            raise ValueError(f"parameter {name!r} declared twice")
        self.params[name] = array
        return name

    def const(self, array, scope: str, role: str) -> str:
        """A fixed array the block introduces (not a trained parameter)."""
        self._count += 1
        name = f"{scope}{role}#{self._count}"
        self.consts[name] = np.asarray(array)
        return name

    def node(self, op: str, inputs: Sequence[str], scope: str, **attrs) -> str:
        """Append one operator; return the name of the tensor it writes."""
        self._count += 1
        out = f"{scope}{op}#{self._count}"
        self.nodes.append(Node(op, tuple(inputs), out, scope, attrs))
        return out

    # -- the usual operators, spelled once ----------------------------------------------
    def conv(self, x: str, weight: str, bias: str | None, scope: str, *, kernel_shape, stride=1,
             padding=0, dilation=1, groups: int = 1) -> str:
        """``Conv`` with ONNX attributes from repnp's stride / padding / dilation conventions."""
        sh, sw = ops.pair(stride, name="stride", minimum=1)
        dh, dw = ops.pair(dilation, name="dilation", minimum=1)
        inputs = [x, weight] + ([bias] if bias is not None else [])
        return self.node("Conv", inputs, scope, kernel_shape=[int(k) for k in kernel_shape],
                         strides=[sh, sw], pads=list(ops.normalize_padding(padding)),
                         dilations=[dh, dw], group=int(groups))

    def conv_transpose(self, x: str, weight: str, bias: str | None, scope: str, *, kernel_shape, stride=1,
                       padding=0, output_padding=0, dilation=1, groups: int = 1) -> str:
        """``ConvTranspose`` (weight (C_in, C_out/groups, kh, kw)) with ONNX attributes, as :meth:`conv`."""
        sh, sw = ops.pair(stride, name="stride", minimum=1)
        dh, dw = ops.pair(dilation, name="dilation", minimum=1)
        inputs = [x, weight] + ([bias] if bias is not None else [])
        return self.node("ConvTranspose", inputs, scope, kernel_shape=[int(k) for k in kernel_shape],
                         strides=[sh, sw], pads=list(ops.normalize_padding(padding)),
                         output_padding=list(ops.pair(output_padding, name="output_padding", minimum=0)),
                         dilations=[dh, dw], group=int(groups))

    def add(self, a: str, b: str, scope: str) -> str:
        return self.node("Add", [a, b], scope)

    def sum(self, branches: Sequence, scope: str) -> str:
        """Run ``branches`` (callables returning a tensor) in order, each added into the running
        sum right after it: the order that keeps the fewest tensors alive."""
        total = branches[0]()
        for branch in branches[1:]:
            total = self.add(total, branch(), scope)
        return total

    def avg_pool(self, x: str, scope: str, *, kernel_size: int, stride=1, padding: int = 0,
                 count_include_pad: bool = True) -> str:
        sh, sw = ops.pair(stride, name="stride", minimum=1)
        return self.node("AveragePool", [x], scope, kernel_shape=[kernel_size, kernel_size], strides=[sh, sw],
                         pads=[padding] * 4, count_include_pad=int(count_include_pad))

    # -- reading ------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray | None:
        """The array of a parameter or constant, ``None`` for an activation."""
        if name in self.params:
            return self.params[name]
        return self.consts.get(name)

    def __repr__(self) -> str:
        lines = [f"Dataflow(inputs={self.inputs}, outputs={self.outputs}, {len(self.params)} parameters)"]
        for n in self.nodes:
            attrs = ", ".join(f"{k}={v}" for k, v in n.attrs.items())
            lines.append(f"  {n.output} = {n.op}({', '.join(n.inputs)}{'; ' + attrs if attrs else ''})")
        return "\n".join(lines)


def describe_module(module, *, inputs: int = 1) -> Dataflow:
    """The complete dataflow of a block or network: its inputs, nodes and output."""
    d = Dataflow()
    xs = [d.input("input" if inputs == 1 else f"input{i}") for i in range(inputs)]
    d.outputs.append(module.describe(d, *xs))
    return d


# ----------------------------------------------------------------------------
# interpreter 1: run with repnp.ops
# ----------------------------------------------------------------------------

def _clip(x, lo, hi):
    return np.clip(x, lo, hi).astype(x.dtype, copy=False)


def evaluate(node: Node, args: list) -> np.ndarray:
    """One node computed with :mod:`repnp.ops` on its input arrays (in ``node.inputs`` order)."""
    a = node.attrs
    op = node.op
    if op == "Conv":
        return ops.conv2d(args[0], args[1], args[2] if len(args) > 2 else None, stride=a["strides"],
                          padding=a["pads"], dilation=a["dilations"], groups=a["group"])
    if op == "ConvTranspose":
        return ops.conv_transpose2d(args[0], args[1], args[2] if len(args) > 2 else None, stride=a["strides"],
                                    padding=a["pads"], output_padding=a["output_padding"],
                                    dilation=a["dilations"], groups=a["group"])
    if op == "BatchNormalization":
        x, gamma, beta, mean, var = args
        return ops.batch_norm(x, mean, var, gamma, beta, eps=a["epsilon"])
    if op == "Relu":
        return ops.relu(args[0])
    if op == "Clip":
        return ops.relu6(args[0]) if (a["min"], a["max"]) == (0.0, 6.0) else _clip(args[0], a["min"], a["max"])
    if op == "Sigmoid":
        return ops.sigmoid(args[0])
    if op == "Gelu":
        return ops.gelu(args[0])
    if op == "HardSwish":
        return ops.hardswish(args[0])
    if op in ("Add", "Sub", "Mul", "Div"):
        x, y = args
        out = x + y if op == "Add" else x - y if op == "Sub" else x * y if op == "Mul" else x / y
        dtype = np.result_type(x.dtype, y.dtype) if x.ndim == y.ndim == 0 else (x if x.ndim >= y.ndim else y).dtype
        return out.astype(dtype, copy=False)
    if op == "PadChannels":
        return ops.pad2d(args[0], a["pads"], value=args[1].astype(args[0].dtype))
    if op == "AveragePool":
        return ops.avg_pool2d(args[0], a["kernel_shape"], stride=a["strides"], padding=a["pads"],
                              count_include_pad=bool(a["count_include_pad"]))
    if op == "GlobalAveragePool":
        return args[0].mean(axis=(2, 3), keepdims=True)
    if op == "Flatten":
        return args[0].reshape(args[0].shape[0], -1)
    if op == "Gemm":
        return ops.linear(args[0], args[1], args[2] if len(args) > 2 else None)
    if op == "Reshape":
        return args[0].reshape(_reshape_target(args[0].shape, a["shape"]))
    if op == "Slice":
        index = [slice(None)] * args[0].ndim
        for axis, start, end in zip(a["axes"], a["starts"], a["ends"]):
            index[axis] = slice(start, end)
        return args[0][tuple(index)]
    if op == "Concat":
        return np.concatenate(args, axis=a["axis"])
    if op == "ChannelShuffle":
        return ops.channel_shuffle(args[0], a["groups"])
    if op == "Identity":
        return args[0]
    if op in ("ReduceL2", "ReduceMean"):
        axes, keep = tuple(a["axes"]), bool(a.get("keepdims", 1))
        x = args[0]
        out = np.sqrt(np.sum(x * x, axis=axes, keepdims=keep)) if op == "ReduceL2" else x.mean(axis=axes,
                                                                                                keepdims=keep)
        return out.astype(x.dtype, copy=False)
    if op == "PRelu":
        return ops.prelu(args[0], args[1])
    if op == "DepthToSpace":
        return ops.depth_to_space(args[0], a["blocksize"], mode=a.get("mode", "DCR"))
    raise ValueError(f"no evaluator for operator {op!r}")


def _reshape_target(shape, target) -> tuple:
    """ONNX ``Reshape`` semantics for a target with ``0`` (copy that dimension) and ``-1``."""
    dims = [shape[i] if t == 0 else int(t) for i, t in enumerate(target)]
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = int(np.prod(shape)) // known
    return tuple(dims)


#: Operators whose output is always a new array (never a view of an input): their outputs
#: may be overwritten by their only reader.
_FRESH = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "Relu", "Clip", "Add", "Sub", "Mul", "Sigmoid",
                    "Gelu", "HardSwish", "PadChannels", "AveragePool", "GlobalAveragePool", "Gemm"})


def _fused_activation(node: Node) -> str | None:
    """``relu`` / ``relu6`` for the activations ``ops.conv2d(activation=...)`` applies in place."""
    if node.op == "Relu":
        return "relu"
    if node.op == "Clip" and (node.attrs["min"], node.attrs["max"]) == (0.0, 6.0):
        return "relu6"
    return None


def _writable(name: str, owned: set, x, other=None) -> bool:
    """Whether ``x`` (tensor ``name``) may take the result in place: an owned float array, and
    for an ``Add`` already of the result's shape and of ``other``'s dtype."""
    if name not in owned or not (isinstance(x, np.ndarray) and x.flags.writeable
                                 and np.issubdtype(x.dtype, np.floating)):
        return False
    return other is None or (isinstance(other, np.ndarray) and other.dtype == x.dtype
                             and other.ndim <= x.ndim and np.broadcast_shapes(x.shape, other.shape) == x.shape)


def _free(env: dict, names, i: int, last: dict, keep: set) -> None:
    """Drop the tensors whose last reader is node ``i``."""
    for name in names:
        if last[name] == i and name not in keep:
            env.pop(name, None)


def run(flow: Dataflow, *inputs: np.ndarray):
    """Compute a dataflow on arrays with :mod:`repnp.ops`.

    Parameters
    ----------
    flow : Dataflow
    *inputs : ndarray
        One array per ``flow.inputs``; float inputs keep their dtype and the
        parameters are computed in it (as every :mod:`repnp.ops` operator does).

    Returns
    -------
    ndarray, or a tuple of them when the dataflow has several outputs.

    Notes
    -----
    A tensor is freed after its last reader, so a network's forward holds about
    the live set the cost model counts, not every intermediate map.
    """
    if len(inputs) != len(flow.inputs):
        raise ValueError(f"the dataflow takes {len(flow.inputs)} input(s), got {len(inputs)}")
    dtype = np.asarray(inputs[0]).dtype
    dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)
    env: dict[str, np.ndarray] = {}
    for name in (*flow.params, *flow.consts):
        value = flow.tensor(name)
        env[name] = value.astype(dtype, copy=False) if np.issubdtype(value.dtype, np.floating) else value
    env.update(zip(flow.inputs, (np.asarray(x) for x in inputs)))
    last, readers = {}, {}
    for i, node in enumerate(flow.nodes):
        for name in node.inputs:
            last[name] = i
            readers[name] = readers.get(name, 0) + 1
    keep = set(flow.outputs) | set(flow.params) | set(flow.consts)
    # Tensors run() may overwrite (speed only, the numbers are the same): made by a node that
    # always returns a new array, read by one node only, not an output.
    owned = {n.output for n in flow.nodes if n.op in _FRESH and readers.get(n.output) == 1} - keep
    nodes = flow.nodes
    i = 0
    while i < len(nodes):
        node = nodes[i]
        args = [env[n] for n in node.inputs]
        act = _fused_activation(nodes[i + 1]) if i + 1 < len(nodes) else None
        if node.op == "Conv" and act and nodes[i + 1].inputs == (node.output,) and node.output in owned:
            # Conv followed by its only reader Relu / Clip(0, 6): the activation is applied to
            # the conv's output in place, while it is still in cache.
            a = node.attrs
            env[nodes[i + 1].output] = ops.conv2d(
                args[0], args[1], args[2] if len(args) > 2 else None, stride=a["strides"],
                padding=a["pads"], dilation=a["dilations"], groups=a["group"], activation=act)
            _free(env, node.inputs, i, last, keep)
            i += 1
        elif _fused_activation(node) and _writable(node.inputs[0], owned, args[0]):
            env[node.output] = ops._epilogue(args[0], None, _fused_activation(node))
        elif node.op == "BatchNormalization" and _writable(node.inputs[0], owned, args[0]):
            x, gamma, beta, mean, var = args
            env[node.output] = ops.batch_norm(x, mean, var, gamma, beta, eps=node.attrs["epsilon"], out=x)
        elif node.op == "Add" and _writable(node.inputs[0], owned, args[0], args[1]):
            env[node.output] = np.add(args[0], args[1], out=args[0])
        elif node.op == "Add" and _writable(node.inputs[1], owned, args[1], args[0]):
            env[node.output] = np.add(args[1], args[0], out=args[1])
        else:
            env[node.output] = evaluate(node, args)
        _free(env, node.inputs, i, last, keep)
        i += 1
    out = tuple(env[name] for name in flow.outputs)
    return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------
# shapes (for the cost model and the exporter)
# ----------------------------------------------------------------------------

def _node_shape(node: Node, shapes: list[tuple]) -> tuple:
    a = node.attrs
    op = node.op
    x = shapes[0]
    where = node.scope.rstrip(".") or "(top level)"
    if op == "BatchNormalization" and (len(x) < 2 or x[1] != shapes[1][0]):
        raise ShapeError(f"BN {where!r} has {shapes[1][0]} channels, its input has shape {x}")
    if op == "Conv" and (len(x) != 4 or x[1] != shapes[1][1] * node.attrs["group"]):
        raise ShapeError(f"conv {where!r}: weight {shapes[1]} with group={node.attrs['group']} reads "
                         f"{shapes[1][1] * node.attrs['group']} channels, its input has shape {x}")
    if op == "ConvTranspose":
        if len(x) != 4 or x[1] != shapes[1][0] or x[1] % a["group"]:
            raise ShapeError(f"ConvTranspose {where!r}: weight {shapes[1]} reads {shapes[1][0]} channels (axis 0) in "
                             f"{a['group']} group(s), its input has shape {x}")
        size = [ops.conv_transpose_output_size(x[2 + i], a["kernel_shape"][i], stride=a["strides"][i],
                                               pad_begin=a["pads"][i], pad_end=a["pads"][2 + i],
                                               output_padding=a["output_padding"][i], dilation=a["dilations"][i])
                for i in (0, 1)]
        return (x[0], shapes[1][1] * a["group"], *size)
    if op == "Gemm" and (len(x) != 2 or x[1] != shapes[1][1]):
        raise ShapeError(f"Gemm {where!r}: weight {shapes[1]} needs (N, {shapes[1][1]}), got input {x}")
    if op in ("Conv", "AveragePool"):
        n, c, h, w = x
        kh, kw = a["kernel_shape"]
        top, left, bottom, right = a["pads"]
        dh, dw = a.get("dilations", [1, 1])
        sh, sw = a["strides"]
        channels = shapes[1][0] if op == "Conv" else c
        return (n, channels, ops.conv_output_size(h, kh, stride=sh, pad_begin=top, pad_end=bottom, dilation=dh),
                ops.conv_output_size(w, kw, stride=sw, pad_begin=left, pad_end=right, dilation=dw))
    if op in ("Add", "Sub", "Mul", "Div", "PRelu"):
        try:
            return tuple(np.broadcast_shapes(x, shapes[1]))
        except ValueError:
            raise ShapeError(f"{op} {where!r}: shapes {x} and {shapes[1]} do not broadcast") from None
    if op in ("ReduceL2", "ReduceMean"):
        axes = {ax % len(x) for ax in a["axes"]}
        if a.get("keepdims", 1):
            return tuple(1 if i in axes else s for i, s in enumerate(x))
        return tuple(s for i, s in enumerate(x) if i not in axes)
    if op == "DepthToSpace":
        r = int(a["blocksize"])
        if len(x) != 4 or x[1] % (r * r):
            raise ShapeError(f"DepthToSpace {where!r}: input {x} needs NCHW with C a multiple of "
                             f"blocksize^2 = {r * r}")
        return (x[0], x[1] // (r * r), x[2] * r, x[3] * r)
    if op == "PadChannels":
        n, c, h, w = x
        top, left, bottom, right = a["pads"]
        return (n, c, h + top + bottom, w + left + right)
    if op == "GlobalAveragePool":
        return x[:2] + (1,) * (len(x) - 2)
    if op == "Flatten":
        return (x[0], int(np.prod(x[1:])))
    if op == "Gemm":
        return (x[0], shapes[1][0])
    if op == "Reshape":
        return _reshape_target(x, a["shape"])
    if op == "Slice":
        out = list(x)
        for axis, start, end in zip(a["axes"], a["starts"], a["ends"]):
            out[axis] = len(range(*slice(start, end).indices(x[axis])))
        return tuple(out)
    if op == "Concat":
        axis = a["axis"]
        return x[:axis] + (sum(s[axis] for s in shapes),) + x[axis + 1:]
    return x     # element-wise: BatchNormalization, activations, ChannelShuffle, Identity


def infer_shapes(flow: Dataflow, *input_shapes) -> dict[str, tuple]:
    """The shape of every tensor of ``flow`` for the given input shapes."""
    shapes = {name: tuple(np.shape(flow.tensor(name))) for name in (*flow.params, *flow.consts)}
    shapes.update(zip(flow.inputs, (tuple(int(s) for s in sh) for sh in input_shapes)))
    for node in flow.nodes:
        shapes[node.output] = tuple(int(s) for s in _node_shape(node, [shapes[i] for i in node.inputs]))
    return shapes


def weight_only(flow: Dataflow) -> set[str]:
    """Outputs of nodes that read only parameters and constants (weights computed from weights)."""
    static = set(flow.params) | set(flow.consts)
    out = set()
    for node in flow.nodes:
        if all(i in static for i in node.inputs):
            static.add(node.output)
            out.add(node.output)
    return out


# ----------------------------------------------------------------------------
# interpreter 2: the cost model's op records
# ----------------------------------------------------------------------------

#: What a runtime launches for a composite node (ONNX spelling).
_LAUNCHES = {"PadChannels": ("Pad",), "ChannelShuffle": ("Reshape", "Transpose", "Reshape")}


def _macs(node: Node, in_shapes, out_shape) -> int:
    if node.op == "Conv":
        o, cg, kh, kw = in_shapes[1]
        n, _, ho, wo = out_shape
        return int(n * o * ho * wo * cg * kh * kw)
    if node.op == "ConvTranspose":      # every input pixel times every weight of its group
        n, _, h, w = in_shapes[0]
        return int(n * h * w * np.prod(in_shapes[1]))
    if node.op == "Gemm":
        return int(out_shape[0] * np.prod(in_shapes[1]))
    if node.op == "AveragePool":   # one accumulate per window tap
        kh, kw = node.attrs["kernel_shape"]
        return int(np.prod(out_shape)) * kh * kw
    return 0


def trace_dataflow(flow: Dataflow, t: Trace, *xs: TensorRef) -> TensorRef:
    """Record ``flow`` in the trace ``t``, reading the activations ``xs``; return its output.

    One :class:`repnp.trace.OpRecord` per operator a runtime launches; its weight
    bytes are the parameters and constants it reads (float32), its MACs those of
    ``Conv``, ``Gemm`` and ``AveragePool``. Weight-only nodes launch nothing.
    """
    shapes = infer_shapes(flow, *(x.shape for x in xs))
    static = weight_only(flow)
    refs: dict[str, TensorRef] = dict(zip(flow.inputs, xs))
    for node in flow.nodes:
        if node.output in static:
            continue
        acts = [refs[i] for i in node.inputs if i in refs]
        weights = sum(int(np.prod(shapes[i])) for i in node.inputs if i not in refs)
        out_shape = shapes[node.output]
        launches = _LAUNCHES.get(node.op, (node.op,))
        ref = None
        for k, op_type in enumerate(launches):
            first = k == 0
            ref = t.add(op_type, acts if first else [ref], out_shape,
                        weight_bytes=weights * FLOAT32_BYTES if first else 0,
                        macs=_macs(node, [shapes[i] for i in node.inputs], out_shape) if first else 0)
        refs[node.output] = ref
    out = tuple(refs[name] for name in flow.outputs)
    return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------
# the protocol every block gets from its one description
# ----------------------------------------------------------------------------

class Described:
    """Mixin: ``forward``, ``trace`` and ``params`` from the block's :meth:`describe`.

    A block (a frozen ``eq=False`` dataclass) implements ``describe(d, x, prefix="")``
    — append its nodes to ``d`` reading tensor ``x``, return its output tensor — and
    gets the rest of the protocol from this mixin. Blocks with several inputs (NASNet's
    cell) set ``num_inputs``.
    """

    num_inputs = 1

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:   # pragma: no cover - interface
        """Append the block's nodes to ``d`` reading tensor ``x``; return the output tensor.

        ``prefix`` is the block's path in an enclosing network (``"stage1.0."``): it
        prefixes every parameter name and node scope.
        """
        raise NotImplementedError

    @property
    def dataflow(self) -> Dataflow:
        """The block's complete dataflow (built once: blocks are immutable)."""
        cached = self.__dict__.get("_dataflow")
        if cached is None:
            cached = describe_module(self, inputs=self.num_inputs)
            object.__setattr__(self, "_dataflow", cached)
        return cached

    def check_input(self, *xs: np.ndarray) -> tuple:
        """Hook: check and convert the inputs of ``forward`` (default: NCHW with ``in_channels``)."""
        channels = getattr(self, "in_channels", None)
        out = []
        for x in xs:
            x = np.asarray(x)
            if channels is not None and (x.ndim != 4 or x.shape[1] != channels):
                raise ShapeError(f"x must be NCHW with C = {channels}, got shape {x.shape}")
            out.append(x)
        return tuple(out)

    def forward(self, *xs: np.ndarray) -> np.ndarray:
        """Inference (BN with running statistics): the dataflow run with :mod:`repnp.ops`."""
        return run(self.dataflow, *self.check_input(*xs))

    def trace(self, t: Trace, *xs: TensorRef) -> TensorRef:
        """Record the block's operators in ``t`` (the cost model's input)."""
        return trace_dataflow(self.dataflow, t, *xs)

    def params(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The block's parameters by name, in the order its dataflow reads them."""
        return {f"{prefix}{k}": v for k, v in self.dataflow.params.items()}
