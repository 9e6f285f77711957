"""Numeric proof for ONNX conversions: run two models on the same seeded inputs.

onnxruntime is used when it can be imported (graph optimizations disabled, so
that the comparison is between the graphs as written); otherwise
``onnx.reference.ReferenceEvaluator``, with a BatchNormalization of our own
because the evaluator's kernels for opset <= 13 mishandle inference mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from repnp.errors import ConversionError

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
    """Outcome of :func:`compare_models`: ``max_rel = max|a-b| / max|b|`` over all outputs."""

    engine: str
    max_abs: float
    max_rel: float
    tol: float
    input_shapes: dict
    seed: int

    @property
    def passed(self) -> bool:
        return bool(self.max_rel <= self.tol)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        out["passed"] = self.passed
        return out


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
    checked at ``max(tol, 1e-2)``; the tolerance rule's 1e-4 is for float32.
    """
    float16 = any(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in model.graph.output)
    used = max(tol, 1e-2) if float16 else tol
    if used != tol:
        return used, f"float16 outputs: checked at tol {used:g} instead of {tol:g}"
    return used, None


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, *, tol: float = 1e-4,
                   input_shape=None, seed: int = 0, engine: str | None = None) -> CheckResult:
    """Run both models on the same seeded inputs and measure the tolerance-rule error.

    Returns
    -------
    CheckResult
        ``max_abs = max|a - b|`` and ``max_rel = max|a - b| / max|b|`` with ``b`` the
        reference outputs (all outputs together), computed in float64.

    Notes
    -----
    The one metric of the design brief: element-wise relative error is
    meaningless where an output is 0, an absolute one breaks on large values.
    """
    feeds = make_inputs(reference, input_shape=input_shape, seed=seed)
    ref_out, used = run_model(reference, feeds, engine=engine)
    new_out, _ = run_model(candidate, feeds, engine=used)
    rows = output_errors([o.name for o in reference.graph.output], ref_out, new_out)
    max_abs = max([r[2] for r in rows], default=0.0)
    max_ref = max([r[3] for r in rows], default=0.0)
    if max_ref > 0:
        rel = max_abs / max_ref
    else:
        rel = 0.0 if max_abs == 0 else float("inf")
    return CheckResult(used, max_abs, rel, float(tol), {k: tuple(v.shape) for k, v in feeds.items()}, seed)


def output_errors(names, reference_outputs, candidate_outputs) -> list[tuple]:
    """Per output ``(name, shape, max|a - b|, max|b|)`` in float64, ``b`` the reference.

    The tolerance rule's error over several outputs is ``max(max|a - b|) / max(max|b|)``.

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
        r = float(np.max(np.abs(b))) if b.size else 0.0
        rows.append((name, b.shape, d, r))
    return rows
