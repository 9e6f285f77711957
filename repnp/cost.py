"""Cost model: parameters, MACs, memory traffic, operator count and peak activation memory.

The model reads only op lists (:class:`repnp.trace.OpRecord`: op type, the
activation tensors read and written with their shapes, weight bytes, MACs),
so blocks, networks (through their ``trace``) and ONNX graphs (the
converter's ``inspect`` builds op lists and calls :func:`profile_ops`) are
profiled the same way. It explains *why* a deploy form is faster even though
its MACs barely change (RepVGG, Ding et al., CVPR 2021; see
``docs/sources.md``): fewer operators, less memory traffic, fewer feature
maps alive at once.

Entry points: :func:`profile` (one block or network on an input shape),
:func:`compare` (train vs deploy, a printable table), :func:`profile_layers`
(a network layer by layer, train and deploy side by side) and
:func:`profile_ops` (any op list, e.g. an ONNX graph's).

Definitions (every tensor counted as float32, 4 bytes per element):

* **MACs**: multiply-accumulates. ``Conv``: ``N*O*H_out*W_out*(C/groups)*kh*kw``;
  ``Gemm`` (fully connected): ``N*out*in``; ``AveragePool``: **one MAC per
  window tap**, ``N*C*H_out*W_out*kh*kw``, padded taps included and whatever
  ``count_include_pad`` says (a KxK average pool is the depthwise conv
  :func:`repnp.fusion.avgpool_kernel`, rule 6, and is counted as that conv;
  used by DBB's pooling branch and by the ShuffleNet and NASNet-A pools);
  ``GlobalAveragePool``, element-wise operators (``Add``, ``Mul``,
  activations, ``BatchNormalization``), ``Pad``, ``Concat`` and reshapes
  count 0, as the papers' FLOP counts leave them out. The blocks' ``trace``
  methods record these figures; this module only sums them.
* **memory traffic** of an operator: bytes of every activation it reads, plus
  the bytes of its weights, plus the bytes of the activation it writes; a
  network's traffic is the sum over its operators (no cache is assumed: each
  operator reads its inputs from and writes its output to memory).
* **operator count**: kernels launched (one per :class:`OpRecord`).
* **sequential schedule**: operators run one at a time in list order;
  branches of a block run one after another (blocks trace them that way).
  A tensor is allocated when its producer starts and freed right after its
  last reader finishes; a graph input is alive from the start until its last
  reader finishes; a tensor nobody reads (a graph output) stays alive to the end.
* **peak live activation memory** (``peak_activation_bytes``): the maximum
  over operators of the bytes alive *while the operator runs*: its inputs,
  its output and every earlier tensor still awaiting a later reader.
* **peak resident memory** (``peak_resident_bytes``): the maximum over
  operators of the bytes still alive *after* the operator finishes and its
  dead inputs are freed: what must be held between two operators. This is
  RepVGG's "1x vs 2x" peak-memory figure (Ding et al., CVPR 2021): in a plain
  chain only the latest feature map is held (1x); a residual block holds its
  input until the add (2x).

Parameters (:func:`count_params`) are trainable ones, as papers count them:
conv weights and biases, BN gamma and beta, FC weights and biases; BN running
statistics (named ``mean``/``var`` by every block) are excluded. The weight
bytes of the op list include them (a runtime does read them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

from repnp.trace import OpRecord, TensorRef, Trace

__all__ = ["BYTES_PER_ELEMENT", "OpCost", "Profile", "Comparison", "LayerProfile", "count_params",
           "profile", "profile_ops", "profile_layers", "compare"]

#: Every tensor is counted as float32, whatever dtype the NumPy code computes in.
BYTES_PER_ELEMENT = 4

#: Leaf parameter names that are BN running statistics, not trainable parameters.
_RUNNING_STATS = frozenset({"mean", "var", "running_mean", "running_var"})


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _nbytes(shape: Sequence[int]) -> int:
    return _numel(shape) * BYTES_PER_ELEMENT


@dataclass(frozen=True)
class OpCost:
    """One operator's share: its record and what it costs under the schedule."""

    op: OpRecord
    bytes_read: int        # activations read + weights
    bytes_written: int     # the output activations (every output of a multi-output op)
    live_bytes: int        # activation bytes alive while it runs
    resident_bytes: int    # activation bytes alive after it, dead inputs freed

    @property
    def traffic(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True)
class Profile:
    """Totals of an op list (see the module docstring for the definitions).

    ``params`` is the trainable parameter count when profiled from a module
    (:func:`profile`); from an op list alone (:func:`profile_ops`) it is the
    stored weight element count ``weight_bytes / 4`` unless given.
    """

    macs: int
    params: int
    weight_bytes: int
    traffic_bytes: int
    op_count: int
    peak_activation_bytes: int
    peak_resident_bytes: int
    input_bytes: int
    ops: tuple[OpCost, ...] = field(repr=False, default=())

    def op_types(self) -> dict[str, int]:
        """Operator counts by type, e.g. ``{"Conv": 2, "BatchNormalization": 3, ...}``."""
        out: dict[str, int] = {}
        for c in self.ops:
            out[c.op.op_type] = out.get(c.op.op_type, 0) + 1
        return out

    def breakdown(self) -> str:
        """A per-operator table: type, output shape, MACs, traffic, bytes alive during and after it."""
        lines = [f"{'#':>4} {'op':<20} {'output':<22} {'MACs':>14} {'traffic B':>12} {'live B':>12} "
                 f"{'held B':>12}"]
        for i, c in enumerate(self.ops):
            lines.append(f"{i:>4} {c.op.op_type:<20} {str(c.op.output_shape):<22} {c.op.macs:>14,} "
                         f"{c.traffic:>12,} {c.live_bytes:>12,} {c.resident_bytes:>12,}")
        return "\n".join(lines)


def count_params(module) -> int:
    """Trainable parameters of a block or network: its ``params()`` minus BN running statistics."""
    return int(sum(v.size for k, v in module.params().items()
                   if k.rsplit(".", 1)[-1] not in _RUNNING_STATS))


def profile_ops(op_list: Iterable[OpRecord], inputs: Iterable, *, params: int | None = None) -> Profile:
    """Profile an op list under the sequential schedule of the module docstring.

    Parameters
    ----------
    op_list : iterable of OpRecord
        In execution order; every input name must be a graph input or an
        output (``output`` or one of ``extra_outputs``) of an earlier op.
    inputs : iterable of TensorRef or (name, shape)
        The graph inputs.
    params : int, keyword-only, optional
        The trainable parameter count to report (default: ``weight_bytes / 4``).

    Raises
    ------
    ValueError
        If an op reads a tensor that is neither a graph input nor produced earlier.
    """
    ops = list(op_list)
    sizes: dict[str, int] = {}
    for ref in inputs:
        name, shape = (ref.name, ref.shape) if isinstance(ref, TensorRef) else ref
        sizes[name] = _nbytes(shape)
    input_bytes = sum(sizes.values())
    last_read: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            last_read[name] = i
    alive: dict[str, int] = dict(sizes)  # graph inputs are alive from the start
    costs = []
    for i, op in enumerate(ops):
        for name in op.inputs:
            if name not in alive:
                raise ValueError(f"op {i} ({op.op_type}) reads {name!r}, which is neither a graph input "
                                 f"nor the output of an earlier op (or was already freed)")
        outputs = op.outputs
        out_bytes = 0
        for name, shape in zip(outputs, op.output_shapes):
            alive[name] = _nbytes(shape)
            out_bytes += alive[name]
        read = sum(_nbytes(s) for s in op.input_shapes) + op.weight_bytes
        live = sum(alive.values())
        for name in set(op.inputs):
            if last_read[name] == i and name not in outputs:
                del alive[name]
        resident = sum(alive.values())
        costs.append(OpCost(op, read, out_bytes, live, resident))
    weight_bytes = sum(op.weight_bytes for op in ops)
    return Profile(
        macs=sum(op.macs for op in ops),
        params=weight_bytes // BYTES_PER_ELEMENT if params is None else int(params),
        weight_bytes=weight_bytes,
        traffic_bytes=sum(c.traffic for c in costs),
        op_count=len(ops),
        peak_activation_bytes=max((c.live_bytes for c in costs), default=input_bytes),
        peak_resident_bytes=max((c.resident_bytes for c in costs), default=input_bytes),
        input_bytes=input_bytes,
        ops=tuple(costs),
    )


def _nchw(input_shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W), got {input_shape!r}")
    return shape


def _trace(module, shape: tuple[int, ...]) -> tuple[Trace, TensorRef]:
    """``module``'s op list on one input of ``shape``, and the tensor it outputs."""
    t = Trace()
    out = module.trace(t, t.input(shape))
    return t, out


def profile(module, input_shape: Sequence[int]) -> Profile:
    """Trace ``module`` on an input of ``input_shape`` (NCHW, batch included) and profile it."""
    t, _ = _trace(module, _nchw(input_shape))
    return profile_ops(t.ops, t.inputs, params=count_params(module))


class LayerProfile(NamedTuple):
    """One layer of a network profiled on its own, train and deploy form (:func:`profile_layers`)."""

    name: str
    module: object
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    train: Profile
    deploy: Profile


def _named_layers(module, prefix: str, depth: int) -> list[tuple[str, object]]:
    """``(dotted name, layer)`` of a container's children, containers expanded ``depth`` levels deep.

    A container is anything with ``layers`` and ``names`` (:class:`repnp.blocks.common.Sequential`)
    or a ``layers`` attribute that is one (:class:`repnp.models.Network`).
    """
    inner = getattr(module, "layers", None)
    if inner is not None and not hasattr(module, "names"):
        module = inner                      # a Network: its layers are a Sequential
    if depth == 0 or not hasattr(module, "names"):
        return [(prefix, module)]
    out = []
    for name, layer in zip(module.names, module.layers):
        out += _named_layers(layer, f"{prefix}.{name}" if prefix else name, depth - 1)
    return out


def profile_layers(network, input_shape: Sequence[int], *, deploy=None,
                   depth: int = 2) -> list[LayerProfile]:
    """Profile a network layer by layer, train form and deploy form side by side.

    Parameters
    ----------
    network : Network or Sequential
        The train form; its layers are ``(name, layer)`` pairs of nested containers.
    input_shape : (N, C, H, W)
        The network's input; each layer is profiled on the shape it receives.
    deploy : same structure as ``network``, keyword-only, optional
        The deploy form; default ``network.reparameterize()``.
    depth : int, keyword-only
        How many container levels to open: 2 (default) lists the blocks of
        each stage of a :mod:`repnp.models` network (``stage1.0``, ...), 1 the
        stages themselves.

    Returns
    -------
    list of LayerProfile
        In execution order. Each layer runs on its own, under the schedule of
        the module docstring: its input is a graph input, alive until its last
        reader (so the figures show what each block holds, RepVGG's 1x vs
        2x). MACs, parameters, traffic and operator counts add up to the
        whole network's; peak memories do not (a maximum is not a sum).

    Raises
    ------
    ValueError
        If ``input_shape`` is not 4-D, ``depth < 1``, or ``deploy`` does not
        have the layers of ``network`` (same names, in the same order).
    """
    shape = _nchw(input_shape)
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if deploy is None:
        deploy = network.reparameterize()
    train_layers = _named_layers(network, "", int(depth))
    deploy_layers = _named_layers(deploy, "", int(depth))
    train_names = [name for name, _ in train_layers]
    deploy_names = [name for name, _ in deploy_layers]
    if train_names != deploy_names:
        raise ValueError(f"deploy must have the layers of network: {train_names} vs {deploy_names}")
    rows = []
    for (name, layer), (_, deployed) in zip(train_layers, deploy_layers):
        profiles = []
        for module in (layer, deployed):
            t, out = _trace(module, shape)
            profiles.append(profile_ops(t.ops, t.inputs, params=count_params(module)))
        rows.append(LayerProfile(name, layer, shape, out.shape, *profiles))
        shape = out.shape
    return rows


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


@dataclass(frozen=True)
class Comparison:
    """Train-vs-deploy figures side by side; ``str()`` gives the printable table."""

    train: Profile
    deploy: Profile
    input_shape: tuple[int, ...]

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(figure, train, deploy, train/deploy) rows as strings."""
        def ratio(a, b):
            return f"{a / b:.2f}x" if b else "-"
        t, d = self.train, self.deploy
        return [
            ("parameters", f"{t.params:,}", f"{d.params:,}", ratio(t.params, d.params)),
            ("MACs", f"{t.macs:,}", f"{d.macs:,}", ratio(t.macs, d.macs)),
            ("operators", f"{t.op_count:,}", f"{d.op_count:,}", ratio(t.op_count, d.op_count)),
            ("memory traffic", _mb(t.traffic_bytes), _mb(d.traffic_bytes),
             ratio(t.traffic_bytes, d.traffic_bytes)),
            ("peak live activations", _mb(t.peak_activation_bytes), _mb(d.peak_activation_bytes),
             ratio(t.peak_activation_bytes, d.peak_activation_bytes)),
            ("peak resident (between ops)", _mb(t.peak_resident_bytes), _mb(d.peak_resident_bytes),
             ratio(t.peak_resident_bytes, d.peak_resident_bytes)),
        ]

    def __str__(self) -> str:
        header = ("", "train", "deploy", "train/deploy")
        rows = [header] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        def fmt(r):
            return (f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  "
                                 f"{r[3]:>{widths[3]}}")
        rule = "-" * (sum(widths) + 6)
        return "\n".join([f"input {self.input_shape}, float32 bytes", fmt(header), rule]
                         + [fmt(r) for r in rows[1:]])


def compare(train, deploy, input_shape: Sequence[int]) -> Comparison:
    """Profile a train form and its deploy form on one input shape; ``print()`` the result."""
    shape = _nchw(input_shape)
    return Comparison(profile(train, shape), profile(deploy, shape), shape)
