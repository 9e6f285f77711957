"""Sphinx directives that write tables from repnp itself, so the site cannot drift from the code.

``.. repnp-fusion-rules::``
    One row per name in ``repnp.fusion.__all__`` (a function a new rule adds appears by itself):
    a cross-reference to its API entry and the first line of its docstring.
``.. repnp-cli-help::``
    The ``--help`` text of every ``repnp`` subcommand, from ``repnp.cli.build_parser()``.
``.. repnp-schemes::``
    One row per naming scheme of ``repnp.io.npz.schemes.SCHEMES``: name, description, BN eps,
    whether it is auto-detected, and where its names were read.
"""

from __future__ import annotations

import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _rst_table(header: list[str], rows: list[list[str]], widths: list[int]) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {' '.join(map(str, widths))}", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    return lines


class _TableDirective(SphinxDirective):
    has_content = False

    def lines(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def run(self):
        container = nodes.container()
        self.state.nested_parse(StringList(self.lines(), source="repnp_docs"), self.content_offset, container)
        return container.children


class FusionRules(_TableDirective):
    """Every public function of ``repnp.fusion`` with its summary line."""

    def lines(self) -> list[str]:
        import repnp.fusion as fusion

        rows = []
        for name in fusion.__all__:
            obj = getattr(fusion, name)
            role = "class" if inspect.isclass(obj) else "func"
            summary = _first_line(obj).replace("|", "\\|")
            rows.append([f":{role}:`~repnp.fusion.{name}`", summary])
        return _rst_table(["function", "what it does"], rows, [25, 75])


class Schemes(_TableDirective):
    """The naming schemes of the ``.npz`` converter."""

    def lines(self) -> list[str]:
        from repnp.io.npz.schemes import SCHEMES

        rows = []
        for name in sorted(SCHEMES):
            s = SCHEMES[name]
            blocks = ", ".join(f"``{b.name}``" for b in s.blocks)
            rows.append([f"``{name}``", s.description.replace("*", "\\*"), blocks, f"{s.eps:g}",
                         "yes" if s.detect else "no (pass ``--scheme``)", s.source])
        return _rst_table(["scheme", "what it reads", "block types", "BN eps", "auto-detected", "names read in"],
                          rows, [10, 30, 20, 6, 10, 24])


class CliHelp(SphinxDirective):
    """``repnp <command> --help`` for every command, as literal blocks under small headings."""

    has_content = False

    def run(self):
        import argparse
        import os

        from repnp.cli import build_parser

        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"          # argparse wraps at the terminal width: fix it
        try:
            parser = build_parser()
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            result = []
            for name, command in sub.choices.items():
                para = nodes.paragraph()
                para += nodes.strong(text=f"repnp {name} --help")
                block = nodes.literal_block(text=command.format_help().rstrip())
                block["language"] = "text"
                result += [para, block]
        finally:
            if old is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = old
        return result


def setup(app):
    app.add_directive("repnp-cli-help", CliHelp)
    app.add_directive("repnp-fusion-rules", FusionRules)
    app.add_directive("repnp-schemes", Schemes)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
