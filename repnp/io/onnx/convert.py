"""The ONNX converter's entry point: :func:`convert_onnx` (load, walk, rewrite, check).

:mod:`repnp.io.onnx.walk` finds the regions, :mod:`repnp.io.onnx.rewrite` emits one
Conv per region, :func:`repnp.io.onnx.graph.check_model_full` validates the output,
and :func:`repnp.io.onnx.check.compare_models` checks it numerically against the input
before anything is returned. The result is ``(model, report)`` with the
:class:`repnp.io.report.ConversionReport` that the ``.npz`` converter returns too.
"""

from __future__ import annotations

import onnx

from repnp.errors import CheckFailed, ConversionError
from repnp.io.onnx import fold as _fold
from repnp.io.onnx import graph as og
from repnp.io.onnx.check import compare_models, effective_tol, spatial_check_size
from repnp.io.onnx.rewrite import _rewrite
from repnp.io.onnx.walk import _Converter
from repnp.io.report import ConversionReport
from repnp.tolerance import NETWORK

__all__ = ["convert_onnx"]

# Quantized graphs are left alone: fusing must happen before quantization.
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
            "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"}


def _check_input(model: onnx.ModelProto) -> None:
    """Raise a ConversionError naming what is wrong with an input the ONNX checker rejects.

    Run only when something failed: checking every input up front would serialize the
    whole model once more for nothing (the output is checked in full anyway)."""
    try:
        onnx.checker.check_model(og.sorted_model(model))
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"input model is not valid ONNX: {str(exc).splitlines()[0]}") from None


def _check_shapes(model: onnx.ModelProto, input_shape):
    """``input_shape`` for the check: the caller's, else explicit shapes for the 4-D inputs
    whose height or width is dynamic (:func:`repnp.io.onnx.check.spatial_check_size`), else ``None`` (the defaults of
    :func:`repnp.io.onnx.check.make_inputs`). Second value: a note for the report."""
    if input_shape is not None:
        return input_shape, None
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != 4 or all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[2:]):
            continue
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    if not shapes:
        return None, None
    size = spatial_check_size(model)
    for dims in shapes.values():
        dims[0] = dims[0] or 1
        dims[1] = dims[1] or 1
        dims[2] = dims[2] or size
        dims[3] = dims[3] or size
    note = (f"dynamic height/width: checked at {', '.join(f'{og.text(k)} {v}' for k, v in shapes.items())} "
            f"so that borders and strides show (input_shape= chooses another)")
    return {k: tuple(v) for k, v in shapes.items()}, note


def _live_only(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` without the nodes no graph output depends on (and the initializers only
    they read), for the check: a runtime would evaluate an unused ``ConstantOfShape``
    of gigabytes for nothing. ``model`` itself when every node is live. Second value:
    the number of nodes dropped."""
    graph = model.graph
    live = og.live_nodes(graph)
    if len(live) == len(graph.node):
        return model, 0
    out = og.model_without(model)
    nodes = [n for i, n in enumerate(graph.node) if i in live]
    out.graph.node.extend(nodes)
    read = {i for n in nodes for i in n.input} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for n in nodes:
        read |= og.subgraph_inputs(n)
    out.graph.initializer.extend(t for t in graph.initializer if t.name in read)
    return out, len(graph.node) - len(nodes)


def _fold_messages(conv: _Converter, report: ConversionReport) -> None:
    """Notes on what the walk did not treat as constants: overridable initializers and
    tensors too large to fold."""
    if conv.overridable:
        report.messages.append(f"{len(conv.overridable)} initializers are also graph inputs (overridable at run "
                               f"time): the nodes reading them were not fused (fold_input_initializers=True "
                               f"treats them as constants)")
    for name, op, size in conv.consts.skipped:
        what = f"{size} elements" if size is not None else "an output of unknown size"
        report.messages.append(f"constant folding: {op} {name!r} not evaluated ({what}, limit "
                               f"{_fold.FOLD_LIMIT})")


def convert_onnx(model, *, check: bool = True, tol: float = NETWORK, input_shape=None, progress=None,
                 fold_input_initializers: bool = False, aggressive: bool = False):
    """Fuse every re-parameterizable subgraph of an ONNX model into one Conv.

    Parameters
    ----------
    model : onnx.ModelProto, str or os.PathLike
        The model or its path (external data only from the model's folder). Never modified.
    check : bool, keyword-only
        Run both models on seeded random inputs and raise :class:`~repnp.errors.CheckFailed`
        when ``max|a - b| / max|b| > tol``.
    tol : float, keyword-only
        Tolerance of the check, :data:`repnp.tolerance.NETWORK` by default (float32
        networks). float16 models are checked at ``max(tol, repnp.tolerance.FLOAT16)``
        (their rounding step is about 1e-3), which the report says
        (:func:`repnp.io.onnx.check.effective_tol`).
    input_shape : tuple or dict, keyword-only
        Shape for the first input (or name -> shape) used by the check. Without it, a 4-D
        input whose height or width is dynamic is fed at a size where the borders and
        strides of the model's convs show (:func:`repnp.io.onnx.check.spatial_check_size`:
        twice the largest conv reach, at least 32x32, at most 256x256; the report's
        messages and ``check["input_shapes"]`` say which); other dynamic dimensions are 1.
        The fused padding itself never depends on it: it comes from the inputs' declared
        static dimensions only (never from ``value_info``), and a ``SAME_*``-padded conv
        whose padding depends on a dynamic size is left as it is.
    progress : callable, keyword-only, optional
        ``progress(done, total)``, called as the walk over the graph's nodes advances
        (at most about 100 times per walk; ``done == total`` at the end of each walk).
    fold_input_initializers : bool, keyword-only
        Initializers that are also graph inputs (IR >= 4; PyTorch's
        ``keep_initializers_as_inputs=True``) can be overridden at run time, so by default
        the nodes reading them are left alone (a ``left`` entry names the inputs).
        ``True`` treats them as constants: they are folded, and those no node reads any
        more leave the graph inputs (a message says how many). Models of IR < 4 list every
        initializer as an input by necessity; theirs are always constants.
    aggressive : bool, keyword-only
        By default the output is never costlier than the input: the nodes of patterns
        that runtimes fuse into one kernel (GELU, SiLU/Swish, HardSwish, LayerNorm,
        RMSNorm; :mod:`repnp.io.onnx.patterns`) are left intact, and a merge whose one
        Conv would have more MACs or parameters than the convs it replaces
        (:mod:`repnp.cost`) is not made. ``True`` makes every exact merge (fewest nodes,
        maybe slower on a runtime).

    Returns
    -------
    (onnx.ModelProto, repnp.io.report.ConversionReport)
        The report has ``format="onnx"``; its counts are nodes per op type, its
        parameters :func:`repnp.io.onnx.graph.count_params`; one
        :class:`~repnp.io.report.Fused` per region (``where``: the tensor the new Conv
        replaces; ``kind``: ``"Conv KHxKW"``; ``merged``: the node names; ``written``:
        the new node and initializer names; ``detail``: ``source``, ``kernel_shape``,
        ``groups``, ``strides``, ``pads``, ``dilations``, ``op_types``); ``left``: the
        near-matches and why; ``check``: ``engine``, ``max_error``, ``max_abs``, ``tol``,
        ``passed``, ``input_shapes``, ``seed``, ``reason``, ``messages``, and
        ``not_compared`` when outputs were left out (``None`` with ``check=False``).
        Outputs after a data-dependent selection (``TopK``, ``ArgMax``...:
        :data:`repnp.io.onnx.check.DATA_DEPENDENT`) that rounding flipped are listed in
        ``not_compared`` and a message says why; the tensors feeding the selection and
        the other outputs are compared instead, at ``tol``.

    Raises
    ------
    CheckFailed
        The numeric check failed (a :class:`ConversionError`); its ``report`` attribute
        holds the report with the measured errors.
    ConversionError
        Bad input (unreadable file, missing initializer, cycle, external data
        outside the folder, BN in training mode, BN of the wrong length).

    Notes
    -----
    The method tracks affine regions (:mod:`repnp.io.onnx.walk`); the algebra is
    RepVGG's branch sum (Ding et al., CVPR 2021, eq. (3)), the Diverse Branch Block's
    transforms I-V (Ding et al., CVPR 2021) and RepMLP's conv-into-FC (Ding et al.,
    2021; RepMLPNet, CVPR 2022), all computed by :mod:`repnp.fusion`. Exporter facts (BN folding, ``Add``
    with a ``Constant`` 0, DBB's ``Pad`` + ``ScatterND``, RepMLP's partition reshapes)
    come from real PyTorch exports (``tests/data/onnx``).

    A QuantizeLinear/DequantizeLinear graph is returned unchanged (nodes sorted)
    with a message: fuse before quantizing. The input model is checked by
    ``onnx.checker`` only when something fails (to say whether the input is to
    blame); the output always passes ``check_model(full_check=True)`` (run by
    :func:`repnp.io.onnx.graph.check_model_full`, which does not serialize the weights).

    Memory: a ModelProto argument is read, not copied; the output is built from the
    input's initializers (only those it keeps are copied) and the fused kernels, each
    cast to the model's dtype as soon as no later node can extend it.

    Examples
    --------
    >>> model, report = repnp.io.convert_onnx(repnp.io.load_onnx("train.onnx"))  # doctest: +SKIP
    >>> print(report)                                                            # doctest: +SKIP
    >>> repnp.io.save_onnx(model, "deploy.onnx", source="train.onnx")            # doctest: +SKIP
    """
    original = og.load_model(model, copy=False)
    report = ConversionReport("onnx")
    report.counts_before = og.op_counts(original.graph)
    report.params_before = og.count_params(original.graph)
    trusted = ()
    if any(n.op_type in _QDQ_OPS for n in original.graph.node):
        report.messages.append("quantized (QuantizeLinear/DequantizeLinear) graph: left unchanged; fuse "
                               "before quantizing")
        og.validate_graph(original.graph)
        result = og.sorted_model(original)
        regions_found = False
    else:
        try:
            conv = _Converter(original, input_shape=input_shape, fold_input_initializers=fold_input_initializers,
                              aggressive=aggressive)
            conv.progress = progress
            regions = conv.run()
            report.left.extend(conv.near)
            _fold_messages(conv, report)
            result, trusted = _rewrite(original, conv, regions, report)
        except ConversionError:
            raise
        except Exception as exc:
            _check_input(original)  # an invalid input explains it; else it is our bug
            raise ConversionError(f"internal error while converting (please report): {exc!r}") from exc
        regions_found = bool(regions)
        del conv, regions
    report.counts_after = og.op_counts(result.graph)
    report.params_after = og.count_params(result.graph)
    try:
        og.check_model_full(result, trusted=trusted)
    except Exception as exc:
        _check_input(original)
        raise ConversionError(f"the converted model fails onnx.checker (please report): {exc}") from None
    if check:
        order = og.topological_order(original.graph)
        reference = original if order == list(range(len(order))) else og.sorted_model(original)
        used_tol, note = effective_tol(original, tol)
        if note:
            report.messages.append(note)
        check_shape, note = _check_shapes(reference, input_shape)
        if note:
            report.messages.append(note)
        reference, dropped = _live_only(reference)
        if dropped:
            report.messages.append(f"check: {dropped} nodes no output depends on were not run")
        res = compare_models(reference, _live_only(result)[0], tol=used_tol, input_shape=check_shape)
        report.check = res.to_dict()
        report.messages.extend(f"check: {m}" for m in res.messages)
        if not res.passed:
            why = f"; {res.reason}" if res.reason else ""
            raise CheckFailed(
                f"converted model differs from the original: max rel error {res.max_error:.3g} > tol "
                f"{used_tol:g} (max abs {res.max_abs:.3g}, {res.engine}){why}", report=report)
    if not regions_found and not report.messages:
        report.messages.append("no re-parameterizable subgraph found: model unchanged")
    return result, report

