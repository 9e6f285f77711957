"""Op lists: what a block, a network or an ONNX graph computes, as data.

The cost model (``repnp.cost``) reads nothing but these lists, so that a repnp
block and an ONNX graph are profiled by the same code. A block records itself
with ``block.trace(t, x)``: ``t`` is a :class:`Trace`, ``x`` the
:class:`TensorRef` it reads; it appends one :class:`OpRecord` per operator
(one kernel launch) and returns the :class:`TensorRef` it produces.

This module sits beside ``repnp.ops`` in the layering: blocks import it, the
cost model and the ONNX reader import it, it imports nothing of repnp.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

#: The cost model counts every tensor as float32, whatever the compute dtype.
FLOAT32_BYTES = 4


class TensorRef(NamedTuple):
    """An activation tensor in a trace: a unique name and its shape (batch included)."""

    name: str
    shape: tuple[int, ...]


class OpRecord(NamedTuple):
    """One operator (one kernel launch).

    Attributes
    ----------
    op_type : str
        ONNX spelling where there is one: ``Conv``, ``BatchNormalization``,
        ``Add``, ``Relu``, ``Clip`` (ReLU6), ``AveragePool``, ``Gemm``, ...
    inputs : tuple of str
        Names of the activation tensors read (weights are not activations).
    output : str
        Name of the activation tensor written.
    input_shapes : tuple of tuple of int
    output_shape : tuple of int
    weight_bytes : int
        Bytes of parameters the operator reads (float32 unless stated).
    macs : int
        Multiply-accumulates (0 for element-wise ops, by convention).
    extra_outputs : tuple of str
        Further tensors the same kernel writes (``Split``'s second part, ``TopK``'s
        indices, ``If``/``Loop`` results); empty for the single-output ops blocks record.
    extra_output_shapes : tuple of tuple of int
        Their shapes, in the same order.
    """

    op_type: str
    inputs: tuple[str, ...]
    output: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    weight_bytes: int = 0
    macs: int = 0
    extra_outputs: tuple[str, ...] = ()
    extra_output_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every tensor the operator writes: ``output`` then ``extra_outputs``."""
        return (self.output,) + tuple(self.extra_outputs)

    @property
    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Their shapes, in the same order."""
        return (tuple(self.output_shape),) + tuple(tuple(s) for s in self.extra_output_shapes)


class Trace:
    """An append-only list of :class:`OpRecord` with fresh tensor names."""

    def __init__(self) -> None:
        self.ops: list[OpRecord] = []
        self.inputs: list[TensorRef] = []
        self._count = 0

    def input(self, shape: Sequence[int], name: str = "input") -> TensorRef:
        """Declare a graph input."""
        ref = TensorRef(name, tuple(int(s) for s in shape))
        self.inputs.append(ref)
        return ref

    def add(self, op_type: str, inputs: Sequence[TensorRef], output_shape: Sequence[int], *,
            weight_bytes: int = 0, macs: int = 0) -> TensorRef:
        """Append one operator reading ``inputs``; return the tensor it writes."""
        self._count += 1
        out = TensorRef(f"t{self._count}", tuple(int(s) for s in output_shape))
        self.ops.append(OpRecord(op_type, tuple(i.name for i in inputs), out.name,
                                 tuple(i.shape for i in inputs), out.shape,
                                 int(weight_bytes), int(macs)))
        return out
