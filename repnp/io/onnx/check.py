"""Numeric proof for ONNX conversions: run two models on the same inputs and compare them.

The comparison is the project's one metric, :func:`repnp.tolerance.relative_error`
(``max|a - b| / max|b|``, ``b`` the reference), at a named tolerance of
:mod:`repnp.tolerance`. :func:`repnp.io.convert_onnx` checks its output with
:func:`compare_models`, and so does ``repnp verify`` for any two models.

onnxruntime is used when it can be imported (graph optimizations disabled, so
that the comparison is between the graphs as written); otherwise
``onnx.reference.ReferenceEvaluator``, with a BatchNormalization of our own
because the evaluator's kernels for opset <= 13 mishandle inference mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from repnp.errors import ConversionError
from repnp.tolerance import FLOAT16, NETWORK, relative_error

__all__ = ["CheckResult", "NP_TYPES", "available_engine", "run_model", "make_inputs", "compare_models",
           "output_errors", "effective_tol"]

#: ONNX element type -> NumPy dtype, for the types the check can feed.
NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`compare_models`.

    Attributes
    ----------
    engine : str
        ``"onnxruntime"`` or ``"reference"``.
    max_abs : float
        ``max|a - b|`` over all outputs.
    max_error : float
        ``max|a - b| / max|b|`` over all outputs together
        (:func:`repnp.tolerance.relative_error`), ``b`` the reference.
    tol : float
    input_shapes : dict
        Graph input name -> shape fed.
    seed : int or None
        Seed of the random inputs; ``None`` when the caller gave the inputs.
    outputs : list of tuple
        Per output ``(name, shape, max|a - b|, relative error)`` (:func:`output_errors`).
    """

    engine: str
    max_abs: float
    max_error: float
    tol: float
    input_shapes: dict
    seed: int | None
    outputs: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.max_error <= self.tol)

    def to_dict(self) -> dict:
        """The keys of :attr:`repnp.io.report.ConversionReport.check` (JSON-serialisable)."""
        return {"engine": self.engine, "max_error": float(self.max_error), "max_abs": float(self.max_abs),
                "tol": float(self.tol), "passed": self.passed,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()}, "seed": self.seed}


def available_engine() -> str:
    """``"onnxruntime"`` when importable, else ``"reference"``."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "reference"
    return "onnxruntime"


def _reference_batchnorm():
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        """Inference BN, y = (x - mean) / sqrt(var + eps) * scale + bias, per channel (axis 1)."""

        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None,
                 spatial=None, is_test=None, consumed_inputs=None):
            if training_mode:
                raise ConversionError("BatchNormalization with training_mode=1 cannot be evaluated")
            eps = 1e-5 if epsilon is None else epsilon
            shape = (1, -1) + (1,) * (x.ndim - 2)
            x64 = x.astype(np.float64)
            y = (x64 - mean.reshape(shape)) / np.sqrt(var.reshape(shape).astype(np.float64) + eps)
            y = y * scale.reshape(shape) + bias.reshape(shape)
            return (y.astype(x.dtype),)

    return BatchNormalization


def run_model(model: onnx.ModelProto, feeds: dict, *, outputs=None, engine: str | None = None):
    """Run ``model`` on ``feeds``; returns ``(list of arrays, engine name)``.

    ``engine=None`` picks onnxruntime when installed and falls back to the
    reference evaluator when onnxruntime cannot run the model.
    """
    if engine is None:
        engine = available_engine()
        if engine == "onnxruntime":
            try:
                return run_model(model, feeds, outputs=outputs, engine=engine)
            except ConversionError:
                # onnxruntime lacks some kernels (e.g. float64 Conv): the reference
                # evaluator runs every standard op, slowly but exactly.
                return run_model(model, feeds, outputs=outputs, engine="reference")
    if engine == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            return sess.run(outputs, feeds), engine
        except Exception as exc:
            raise ConversionError(f"onnxruntime could not run the model: {exc}") from None
    if engine == "reference":
        from onnx.reference import ReferenceEvaluator

        try:
            sess = ReferenceEvaluator(model, new_ops=[_reference_batchnorm()])
            return sess.run(outputs, feeds), engine
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"the ONNX reference evaluator could not run the model: {exc}") from None
    raise ValueError(f"engine must be 'onnxruntime' or 'reference', got {engine!r}")


def _input_shape_for(vi: onnx.ValueInfoProto, index: int, input_shape) -> tuple:
    if input_shape is not None:
        if isinstance(input_shape, dict):
            if vi.name in input_shape:
                return tuple(int(d) for d in input_shape[vi.name])
        elif index == 0:
            return tuple(int(d) for d in input_shape)
    dims = vi.type.tensor_type.shape.dim
    # Dynamic dimensions get 1: the batch axis is the usual one, and a fused
    # model must agree with the original at any size.
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)


def make_inputs(model: onnx.ModelProto, *, input_shape=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) inputs (zeros for integer inputs) for every non-initializer graph input.

    ``input_shape`` is one shape (for the first input) or a dict name -> shape.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    real_inputs = [vi for vi in model.graph.input if vi.name not in inits]
    for index, vi in enumerate(real_inputs):
        elem = vi.type.tensor_type.elem_type
        dtype = NP_TYPES.get(elem)
        if dtype is None:
            raise ConversionError(f"graph input {vi.name!r} has an element type ({elem}) the check "
                                  f"cannot feed")
        shape = _input_shape_for(vi, index, input_shape)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


def effective_tol(model: onnx.ModelProto, tol: float) -> tuple[float, str | None]:
    """The tolerance to check ``model`` at, and a note when it differs from ``tol``.

    float16 outputs round at about 1e-3 (eps 9.8e-4), so a fused float16 model is
    checked at ``max(tol, repnp.tolerance.FLOAT16)``; :data:`repnp.tolerance.NETWORK`
    is for float32.
    """
    float16 = any(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in model.graph.output)
    used = max(tol, FLOAT16) if float16 else tol
    if used != tol:
        return used, f"float16 outputs: checked at tol {used:g} instead of {tol:g}"
    return used, None


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, *, tol: float = NETWORK,
                   input_shape=None, seed: int = 0, engine: str | None = None, feeds=None) -> CheckResult:
    """Run both models on the same inputs and measure the project's error metric.

    Parameters
    ----------
    reference, candidate : onnx.ModelProto
        ``reference`` gives ``b`` of the metric.
    tol : float, keyword-only
        Default :data:`repnp.tolerance.NETWORK`.
    input_shape : tuple or dict, keyword-only, optional
        For the seeded inputs (:func:`make_inputs`).
    seed : int, keyword-only
    engine : str, keyword-only, optional
        ``"onnxruntime"`` or ``"reference"``; by default onnxruntime when it can run the
        reference model.
    feeds : dict of str to ndarray, keyword-only, optional
        The inputs to run on, instead of seeded random ones (``seed`` is then ``None``
        in the result).

    Returns
    -------
    CheckResult
        ``max_abs = max|a - b|`` and ``max_error = max|a - b| / max|b|`` with ``b`` the
        reference outputs (all outputs together), computed in float64 by
        :func:`repnp.tolerance.relative_error`; per output in ``outputs``.

    Raises
    ------
    ConversionError
        If a model cannot be run, the numbers of outputs differ or an output changed shape.

    Notes
    -----
    The project's one metric (:mod:`repnp.tolerance`): element-wise relative error is
    meaningless where an output is 0, an absolute one breaks on large values.
    """
    if feeds is None:
        feeds = make_inputs(reference, input_shape=input_shape, seed=seed)
    else:
        seed = None
    ref_out, used = run_model(reference, feeds, engine=engine)
    new_out, _ = run_model(candidate, feeds, engine=used)
    rows = output_errors([o.name for o in reference.graph.output], ref_out, new_out)
    max_abs = max([r[2] for r in rows], default=0.0)
    # One figure over all outputs together: the largest difference over the largest reference value.
    flat = [(np.ravel(np.asarray(a, dtype=np.float64)), np.ravel(np.asarray(b, dtype=np.float64)))
            for b, a in zip(ref_out, new_out)]
    rel = relative_error(np.concatenate([a for a, _ in flat]) if flat else np.zeros(0),
                         np.concatenate([b for _, b in flat]) if flat else np.zeros(0))
    return CheckResult(used, max_abs, rel, float(tol), {k: tuple(v.shape) for k, v in feeds.items()}, seed,
                       rows)


def output_errors(names, reference_outputs, candidate_outputs) -> list[tuple]:
    """Per output ``(name, shape, max|a - b|, relative error)`` in float64, ``b`` the reference.

    The relative error is :func:`repnp.tolerance.relative_error` of that output alone.

    Raises
    ------
    ConversionError
        If the numbers of outputs differ or an output changed shape.
    """
    reference_outputs, candidate_outputs = list(reference_outputs), list(candidate_outputs)
    if len(reference_outputs) != len(candidate_outputs):
        raise ConversionError(f"the models have {len(reference_outputs)} and {len(candidate_outputs)} outputs")
    rows = []
    for name, b, a in zip(names, reference_outputs, candidate_outputs):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ConversionError(f"output {name!r} changed shape: {b.shape} -> {a.shape}")
        d = float(np.max(np.abs(a - b))) if a.size else 0.0
        rows.append((name, b.shape, d, relative_error(a, b)))
    return rows
