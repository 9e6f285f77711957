"""Numeric proof for ONNX conversions: run two models on the same inputs and compare them.

The comparison is the project's one metric, ``max|a - b| / max|b|`` (``b`` the
reference), at a named tolerance of :mod:`repnp.tolerance`. Outputs that
legitimately hold NaN or infinities are compared as :func:`repnp.tolerance.compare_arrays`
does: the non-finite values by position (NaN where the reference has NaN, ``+inf``
where it has ``+inf``, ``-inf`` where it has ``-inf``), the finite values by the
metric over the finite positions. :func:`repnp.io.convert_onnx` checks its output with
:func:`compare_models`, and so does ``repnp verify`` for any two models.

The random inputs (:func:`make_inputs`, in :mod:`repnp.io.onnx.inputs`) are bounded: at most
:data:`MAX_CHECK_ELEMENTS` elements in all graph inputs together, refused by name
before anything is drawn. Dynamic dimensions get :data:`DYNAMIC_BATCH` on the
batch axis and :func:`spatial_check_size` on the spatial axes (a 1x1 image cannot
show a wrong border, padding or stride; neither can a 32x32 one to a conv after a
stride of 32); the result's ``messages`` and ``input_shapes`` say which shape was used.

onnxruntime is used when it can be imported (graph optimizations disabled, so
that the comparison is between the graphs as written); otherwise
``onnx.reference.ReferenceEvaluator``, with a BatchNormalization of our own
because the evaluator's kernels for opset <= 13 mishandle inference mode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx

from repnp.errors import ConversionError
from repnp.io.onnx.inputs import (  # noqa: F401  (re-exported: the check's inputs)
    DYNAMIC_BATCH,
    DYNAMIC_SPATIAL,
    DYNAMIC_SPATIAL_MAX,
    MAX_CHECK_ELEMENTS,
    NP_TYPES,
    default_notes,
    input_shapes,
    make_inputs,
    spatial_check_size,
)
from repnp.tolerance import FLOAT16, NETWORK, error_ratio, finite_extrema, nonfinite_mismatch

__all__ = ["CheckResult", "NP_TYPES", "MAX_CHECK_ELEMENTS", "DYNAMIC_BATCH", "DYNAMIC_SPATIAL",
           "DYNAMIC_SPATIAL_MAX", "spatial_check_size",
           "available_engine", "run_model", "input_shapes", "make_inputs", "compare_models",
           "output_errors", "effective_tol", "DATA_DEPENDENT", "data_dependent_ops"]

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
    reason : str or None
        Why the check failed, naming the output (``"output 'y1' has NaN where the
        reference is finite ..."``, or the error against the tolerance); ``None`` if it passed.
    messages : list of str
        Notes on how the check was run: outputs paired by position because their names
        differ, dynamic dimensions given default sizes, outputs not compared (and why).
    not_compared : list of str
        Graph outputs left out of the verdict because they come after a data-dependent
        selection (:data:`DATA_DEPENDENT`) that rounding flipped; the tensors feeding the
        selection were compared instead (``outputs`` lists them). Empty normally.
    """

    engine: str
    max_abs: float
    max_error: float
    tol: float
    input_shapes: dict
    seed: int | None
    outputs: list = field(default_factory=list)
    reason: str | None = None
    messages: list = field(default_factory=list)
    not_compared: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        # max_error is inf when a non-finite pattern differs; the reason also guards tol=inf
        return bool(self.max_error <= self.tol) and not (self.reason and np.isinf(self.max_error))

    def to_dict(self) -> dict:
        """The keys of :attr:`repnp.io.report.ConversionReport.check` (JSON-serialisable)."""
        out = {"engine": self.engine, "max_error": float(self.max_error), "max_abs": float(self.max_abs),
               "tol": float(self.tol), "passed": self.passed,
               "input_shapes": {k: list(v) for k, v in self.input_shapes.items()}, "seed": self.seed,
               "reason": self.reason, "messages": list(self.messages)}
        if self.not_compared:   # only when outputs were left out: the usual report keeps its keys
            out["not_compared"] = list(self.not_compared)
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


#: Ops whose outputs select by value (which elements, in which order, where): a rounding
#: error in their input can flip the choice between two nearly equal values, and then
#: everything downstream differs by more than any tolerance while the models agree.
#: ``Where`` counts when its condition is computed from the inputs' values.
DATA_DEPENDENT = ("TopK", "ArgMax", "ArgMin", "NonMaxSuppression", "NonZero", "Unique", "Where")
#: Ops that make a boolean mask from values (walked through to the values they compare).
_MASK_OPS = {"Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor",
             "IsNaN", "IsInf"}


def _node_order(model: onnx.ModelProto) -> list[int]:
    from repnp.io.onnx import graph as og

    try:
        return og.topological_order(model.graph)
    except Exception:  # a cycle is reported elsewhere, by name
        return list(range(len(model.graph.node)))


def _value_dependent(model: onnx.ModelProto) -> tuple[set, list]:
    """``(names, ops)``: the tensors that depend on the inputs' values, and the
    :data:`DATA_DEPENDENT` nodes whose selection does (:func:`data_dependent_ops`)."""
    from repnp.io.onnx.graph import subgraph_inputs

    inits = {t.name for t in model.graph.initializer}
    valued = {vi.name for vi in model.graph.input if vi.name not in inits}
    found = []
    for idx in _node_order(model):
        node = model.graph.node[idx]
        reads = [n for n in node.input if n] + sorted(subgraph_inputs(node))
        if node.op_type in ("Shape", "Size") or not any(n in valued for n in reads):
            continue
        valued.update(o for o in node.output if o)
        if node.op_type in DATA_DEPENDENT and (node.op_type != "Where" or node.input[0] in valued):
            found.append(node)
    return valued, found


def data_dependent_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of :data:`DATA_DEPENDENT` whose selection depends on the inputs' values.

    A tensor depends on the values when a graph input reaches it through nodes other
    than ``Shape``/``Size`` (shape subgraphs are the same in both models); ``Where``
    counts when its condition does, the other ops when any input does.
    """
    return _value_dependent(model)[1]


def _selection_split(model: onnx.ModelProto):
    """Where the check cuts the graph at its data-dependent ops.

    Returns ``(ops, downstream, feeds)``: the data-dependent nodes not downstream of
    another, every tensor downstream of any of them, and the value-dependent tensors
    feeding them (a computed mask replaced by the values it compares), none downstream.
    """
    from repnp.io.onnx.graph import subgraph_inputs

    valued, ops = _value_dependent(model)
    if not ops:
        return [], set(), []
    selected = {id(n) for n in ops}
    inits = {t.name for t in model.graph.initializer}
    inputs = {vi.name for vi in model.graph.input if vi.name not in inits}
    producer = {o: n for n in model.graph.node for o in n.output if o}
    downstream: set[str] = set()
    first = []
    for idx in _node_order(model):
        node = model.graph.node[idx]
        reads = [n for n in node.input if n] + sorted(subgraph_inputs(node))
        after = any(n in downstream for n in reads)
        if id(node) in selected and not after:
            first.append(node)
        if id(node) in selected or after:
            downstream.update(o for o in node.output if o)
    feeds: list[str] = []
    seen: set[str] = set()
    stack = [n for op in first for n in op.input if n]
    while stack:
        name = stack.pop(0)
        # Shape-only inputs (TopK's k computed from Shape ...) are the same in both models, and
        # the converter folds them into initializers: only value-dependent tensors are compared.
        if name in seen or name in downstream or name in inits or name in inputs or name not in valued:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is None:
            continue
        if node.op_type in _MASK_OPS:
            stack.extend(n for n in node.input if n)     # compare the values, not the mask
        elif node.op_type not in ("Constant", "Shape", "Size"):
            feeds.append(name)
    return first, downstream, feeds


def _with_outputs(model: onnx.ModelProto, names):
    """Context: ``model`` with ``names`` appended to its outputs, removed on exit (no copy of the weights)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        have = {o.name for o in model.graph.output}
        extra = [n for n in names if n not in have]
        for n in extra:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
        try:
            yield model
        finally:
            for _ in extra:
                model.graph.output.pop()
    return ctx()


def _compare_past_selection(reference, candidate, feeds, tol, used) -> CheckResult | None:
    """The check of a model whose outputs depend on a data-dependent selection (TopK...).

    Compares the tensors feeding the selections and the outputs not downstream of them;
    ``None`` when there is no selection upstream of an output, or the candidate lacks a
    tensor the comparison needs (then the full comparison stands).
    """
    ops, downstream, fed = _selection_split(reference)
    ref_outputs = [o.name for o in reference.graph.output]
    cut = [n for n in ref_outputs if n in downstream]
    if not cut:
        return None
    produced = {o for n in candidate.graph.node for o in n.output} | {i.name for i in candidate.graph.input}
    if any(n not in produced for n in fed) or sorted(ref_outputs) != sorted(o.name for o in candidate.graph.output):
        return None
    kept = [n for n in ref_outputs if n not in downstream]
    names = kept + [n for n in fed if n not in kept]
    with _with_outputs(reference, names), _with_outputs(candidate, names):
        ref_out, _ = run_model(reference, feeds, outputs=names, engine=used)
        new_out, _ = run_model(candidate, feeds, outputs=names, engine=used)
    labels = [n if n in kept else f"{n} (feeds {_op_names(ops)})" for n in names]
    rows, details = _compare_outputs(labels, ref_out, new_out)
    what = sorted({n.op_type for n in ops})
    note = (f"outputs after {'/'.join(what)} not compared: data-dependent selection ({cut}; a rounding "
            f"error can flip which elements {_op_names(ops)} select{'s' if len(ops) == 1 else ''}); "
            f"compared instead: the tensors feeding it ({fed})"
            + (f" and the outputs not downstream of it ({kept})" if kept else ""))
    return _verdict(used, labels, rows, details, tol, feeds, [note], cut)


def _op_names(ops) -> str:
    shown = [f"{n.op_type} {n.name!r}" if n.name else n.op_type for n in ops[:3]]
    return ", ".join(shown) + (f" and {len(ops) - 3} more" if len(ops) > 3 else "")


def _verdict(used, names, rows, details, tol, feeds, messages, not_compared=()) -> CheckResult:
    mismatches = [(name, m) for name, (_, _, m) in zip(names, details) if m is not None]
    max_ref = max([d[1] for d in details], default=0.0)
    if mismatches:
        max_abs = max_error = float("inf")
        name, m = mismatches[0]
        reason = f"output {name!r} {m}"
        if len(mismatches) > 1:
            reason += f"; and {len(mismatches) - 1} other output(s): {[n for n, _ in mismatches[1:]]}"
    else:
        max_abs = max([d[0] for d in details], default=0.0)
        # one figure over all outputs together: the largest difference over the largest reference value
        max_error = error_ratio(max_abs, max_ref)
        reason = None
        if not max_error <= tol:
            worst = max(range(len(details)), key=lambda i: details[i][0])
            reason = (f"max rel error {max_error:.3g} > tol {float(tol):g} (max abs {max_abs:.3g}, largest "
                      f"in output {names[worst]!r})")
    return CheckResult(used, max_abs, max_error, float(tol), {k: tuple(v.shape) for k, v in feeds.items()},
                       None, rows, reason, list(messages), list(not_compared))


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
        Outputs are paired **by name** when both models have the same set of output
        names (in any order); otherwise by position, and ``messages`` says so.
        Per output (``outputs``) and over all outputs together:

        * non-finite values are compared by position: the candidate must hold NaN
          exactly where the reference does, ``+inf`` where it has ``+inf`` and ``-inf``
          where it has ``-inf``. A difference fails the check whatever ``tol`` is
          (``max_abs`` and ``max_error`` are ``inf``) and ``reason`` names the output
          and the first position (``"output 'y1' has NaN where the reference is finite
          ..."``);
        * finite values by ``max_abs = max|a - b|`` and ``max_error = max|a - b| / max|b|``
          over the finite positions of all outputs together, ``b`` the reference,
          in float64 (:func:`repnp.tolerance.compare_arrays`'s rule; the same figure as
          :func:`repnp.tolerance.relative_error` when everything is finite).

        The verdict does not depend on the order the outputs are listed in.

    Raises
    ------
    ConversionError
        If a model cannot be run, the numbers of outputs differ, an output changed shape
        or is not a numeric tensor.

    Notes
    -----
    The project's one metric (:mod:`repnp.tolerance`): element-wise relative error is
    meaningless where an output is 0, an absolute one breaks on large values.
    """
    messages: list[str] = []
    if feeds is None:
        feeds = make_inputs(reference, input_shape=input_shape, seed=seed)
        messages += default_notes(reference, input_shape, {k: v.shape for k, v in feeds.items()})
    else:
        seed = None
    ref_names = [o.name for o in reference.graph.output]
    new_names = [o.name for o in candidate.graph.output]
    if len(ref_names) != len(new_names):
        raise ConversionError(f"the models have {len(ref_names)} and {len(new_names)} outputs "
                              f"(reference {ref_names}, candidate {new_names})")
    by_name = sorted(ref_names) == sorted(new_names) and len(set(ref_names)) == len(ref_names)
    ref_out, used = run_model(reference, feeds, engine=engine)
    if by_name:
        # the same outputs listed in another order are the same model: ask for them in the reference's order
        new_out, _ = run_model(candidate, feeds, outputs=None if new_names == ref_names else ref_names,
                               engine=used)
        names = ref_names
    else:
        new_out, _ = run_model(candidate, feeds, engine=used)
        names = [r if r == c else f"{r} vs {c}" for r, c in zip(ref_names, new_names)]
        messages.append(f"output names differ (reference {ref_names}, candidate {new_names}): "
                        f"outputs paired by position")
    rows, details = _compare_outputs(names, ref_out, new_out)
    result = _verdict(used, names, rows, details, tol, feeds, messages)
    if not result.passed and by_name:
        # a selection (TopK...) flipped by rounding makes everything after it differ: judge
        # the models on what feeds the selection and on the outputs that do not depend on it
        split = _compare_past_selection(reference, candidate, feeds, tol, used)
        if split is not None:
            split.messages[:0] = messages
            split.messages.append(f"all outputs compared first: {result.reason}")
            result = split
    return dataclasses.replace(result, seed=seed)


def _compare_outputs(names, reference_outputs, candidate_outputs) -> tuple[list, list]:
    """Rows of :func:`output_errors` and per output ``(finite max|a-b|, finite max|b|, mismatch)``."""
    reference_outputs, candidate_outputs = list(reference_outputs), list(candidate_outputs)
    if len(reference_outputs) != len(candidate_outputs):
        raise ConversionError(f"the models have {len(reference_outputs)} and {len(candidate_outputs)} outputs")
    rows, details = [], []
    for name, b, a in zip(names, reference_outputs, candidate_outputs):
        try:
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConversionError(f"output {name!r} is not a numeric tensor ({type(b).__name__}); the check "
                                  f"compares tensors") from None
        if a.shape != b.shape:
            raise ConversionError(f"output {name!r} changed shape: {b.shape} -> {a.shape}")
        mismatch = nonfinite_mismatch(a, b)
        diff, scale = finite_extrema(a, b)
        details.append((diff, scale, mismatch))
        if mismatch is not None:
            rows.append((name, b.shape, float("inf"), float("inf")))
        else:
            rows.append((name, b.shape, diff, error_ratio(diff, scale)))
    return rows, details


def output_errors(names, reference_outputs, candidate_outputs) -> list[tuple]:
    """Per output ``(name, shape, max|a - b|, relative error)`` in float64, ``b`` the reference.

    The relative error is :func:`repnp.tolerance.relative_error_masked` of that output
    alone: non-finite values must sit at the same positions with the same values (else
    both figures are ``inf``), finite ones are measured by the metric over the finite
    positions.

    Raises
    ------
    ConversionError
        If the numbers of outputs differ, an output changed shape or is not numeric.
    """
    return _compare_outputs(names, reference_outputs, candidate_outputs)[0]
