"""What a conversion would do to an ONNX model, and what it would save: ``repnp inspect``.

:func:`inspect_onnx` converts without the numeric check (nothing is written) and profiles
both graphs with the cost model (:mod:`repnp.cost`): MACs, parameters, memory traffic,
operators launched and peak activation memory, train form against deploy form.
"""

from __future__ import annotations

from repnp.cost import Comparison, profile_ops
from repnp.io.onnx.convert import convert_onnx
from repnp.io.onnx.graph import count_params, load_model, sorted_model
from repnp.io.onnx.ops import graph_ops
from repnp.io.report import ConversionReport

__all__ = ["inspect_onnx"]


def inspect_onnx(model, *, input_shape=None, progress=None) -> tuple[ConversionReport, Comparison]:
    """The conversion report (check not run) and the train-vs-deploy cost comparison.

    Parameters
    ----------
    model : onnx.ModelProto, str or os.PathLike
    input_shape : tuple or dict, optional, keyword-only
        Shapes where the model's input dimensions are dynamic (the cost model needs sizes).
    progress : callable, optional, keyword-only
        ``progress(done, total)`` after each of the three steps (convert, profile twice).

    Returns
    -------
    (ConversionReport, repnp.cost.Comparison)
        The report has the fields ``repnp convert --json`` prints (``check`` is ``None``);
        its parameter counts and the comparison's are the same count
        (:func:`repnp.io.onnx.graph.count_params`: trainable parameters).
    """
    model = load_model(model, copy=False)
    step = progress if progress is not None else (lambda done, total: None)
    fused, report = convert_onnx(model, check=False, input_shape=input_shape)
    step(1, 3)
    ops_before, inputs = graph_ops(sorted_model(model), input_shape=input_shape)
    step(2, 3)
    ops_after, inputs_after = graph_ops(fused, input_shape=input_shape)
    step(3, 3)
    shape = inputs[0].shape if inputs else ()
    comparison = Comparison(profile_ops(ops_before, inputs, params=count_params(model)),
                            profile_ops(ops_after, inputs_after, params=count_params(fused)), tuple(shape))
    return report, comparison
