"""What a conversion did: one report type for both front doors (``.npz`` and ONNX).

:func:`repnp.io.convert_state` and :func:`repnp.io.convert_onnx` both return
``(result, report)`` with a :class:`ConversionReport`; ``repnp convert --json``
prints :meth:`ConversionReport.to_dict`, and ``repnp inspect --json`` prints the
same fields where they overlap. A failed check raises
:class:`repnp.errors.CheckFailed` carrying the report.

Parameter counts are *trainable* parameters: conv and linear weights and biases,
BN ``gamma`` and ``beta``. BN running statistics (``mean``, ``var``) and
bookkeeping (``num_batches_tracked``) are buffers, not parameters, and are not
counted — the convention of PyTorch's ``sum(p.numel() for p in model.parameters())``
and of the published parameter counts. :func:`repnp.cost.count_params` counts the
same way for repnp blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Fused", "ConversionReport"]


@dataclass
class Fused:
    """One fused block (``.npz``) or region (ONNX): where it is and what was merged.

    Attributes
    ----------
    where : str
        The block's key prefix (``stages.0.blocks.1``) or the ONNX tensor the new
        Conv writes.
    kind : str
        The framework's block class (``RepVGGBlock``) or, for ONNX, ``Conv KxK``.
    merged : list of str
        The state-dict keys or ONNX node names that became the fused conv.
    written : list of str
        The keys (``.npz``) or initializers and node (ONNX) that replace them.
    detail : dict
        Format-specific facts (kernel shape, groups, strides, pads, op types ...),
        JSON-serialisable.
    """

    where: str
    kind: str
    merged: list = field(default_factory=list)
    written: list = field(default_factory=list)
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"where": self.where, "kind": self.kind, "merged": list(self.merged),
                "written": list(self.written), "detail": dict(self.detail)}


@dataclass
class ConversionReport:
    """What a conversion did; ``str(report)`` is the human table, :meth:`to_dict` the JSON.

    Attributes
    ----------
    format : str
        ``"onnx"`` or ``"npz"``.
    params_before, params_after : int
        Trainable parameters (module docstring: BN running statistics excluded).
    counts_before, counts_after : dict of str to int
        ONNX: nodes per op type. ``.npz``: ``{"keys": n}`` and blocks per class.
    fused : list of Fused
    left : list of dict
        What looked re-parameterizable but was left alone, each ``{"where", "reason"}``.
    messages : list of str
        Notes for the user (defaults used, checks that could not see something ...).
    check : dict or None
        The numeric check: ``engine``, ``max_error``, ``tol``, ``passed`` and
        format-specific details; ``None`` when it was not run.
    info : dict
        Facts the conversion used that the input did not state (``.npz``: ``scheme``,
        ``scheme_detected``, ``eps``), JSON-serialisable.
    """

    format: str
    params_before: int = 0
    params_after: int = 0
    counts_before: dict = field(default_factory=dict)
    counts_after: dict = field(default_factory=dict)
    fused: list = field(default_factory=list)
    left: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    check: dict | None = None
    info: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        """Whether the numeric check passed; ``None`` when it was not run."""
        return None if self.check is None else bool(self.check["passed"])

    @property
    def max_error(self) -> float | None:
        """``max|a - b| / max|b|`` of the check (:func:`repnp.tolerance.relative_error`)."""
        return None if self.check is None else self.check["max_error"]

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "passed": self.passed,
            "max_error": self.max_error,
            "params_before": int(self.params_before),
            "params_after": int(self.params_after),
            "counts_before": dict(self.counts_before),
            "counts_after": dict(self.counts_after),
            "fused": [f.to_dict() for f in self.fused],
            "left": [dict(n) for n in self.left],
            "messages": list(self.messages),
            "check": None if self.check is None else dict(self.check),
            "info": dict(self.info),
        }

    def __str__(self) -> str:
        onnx = self.format == "onnx"
        label = "operator" if onnx else "item"
        rows = sorted(set(self.counts_before) | set(self.counts_after),
                      key=lambda k: (-self.counts_before.get(k, 0), k))
        width = max([len(label), len("parameters")] + [len(k) for k in rows])
        lines = [f"{label:<{width}}  {'before':>10}  {'after':>10}"]
        for k in rows:
            lines.append(f"{k:<{width}}  {self.counts_before.get(k, 0):>10}  {self.counts_after.get(k, 0):>10}")
        if onnx:
            lines.append(f"{'nodes':<{width}}  {sum(self.counts_before.values()):>10}  "
                         f"{sum(self.counts_after.values()):>10}")
        lines.append(f"{'parameters':<{width}}  {self.params_before:>10}  {self.params_after:>10}")
        lines.append("")
        lines.append(f"fused{' regions' if onnx else ''}: {len(self.fused)}")
        for f in self.fused:
            lines += _fused_lines(f)
        if self.left:
            lines.append(f"left untouched: {len(self.left)}")
            for n in self.left:
                lines.append(f"  {n['where']}: {n['reason']}")
        for m in self.messages:
            lines.append(f"note: {m}")
        if self.check is None:
            lines.append("numeric check: not run")
        else:
            c = self.check
            verdict = "passed" if c["passed"] else "FAILED"
            where = ", ".join([str(c.get("engine", "?"))]
                              + ([f"inputs {c['input_shapes']}"] if c.get("input_shapes") else [])
                              + ([f"seed {c['seed']}"] if c.get("seed") is not None else []))
            abs_part = f"max abs {c['max_abs']:.3g}, " if c.get("max_abs") is not None else ""
            lines.append(f"numeric check ({where}): {abs_part}max rel error {c['max_error']:.3g} "
                         f"(tol {c['tol']:.3g}) {verdict}")
        return "\n".join(lines)


def _fused_lines(f: Fused) -> list[str]:
    """One fused block or region for the table: ONNX regions as ``out <- Conv KxK ... on 'x'``
    with their nodes, ``.npz`` blocks with their scalar details."""
    d = f.detail
    if "source" in d:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(d.get("op_types", {}).items()))
        return [(f"  {f.where} <- {f.kind} groups={d.get('groups')} strides={d.get('strides')} "
                 f"pads={d.get('pads')} on {d['source']!r}  [{kinds}]"),
                f"      nodes: {', '.join(f.merged)}"]
    extra = " ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list)))
    return [f"  {f.where or '(top level)'}: {f.kind} ({len(f.merged)} merged){' ' + extra if extra else ''}"]
