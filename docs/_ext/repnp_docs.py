"""Sphinx directives that write tables from repnp itself, so the site cannot drift from the code.

``.. repnp-fusion-rules::``
    One row per name in ``repnp.fusion.__all__`` (a function a new rule adds appears by itself):
    a cross-reference to its API entry and the first line of its docstring.
Also: a ``py`` cross-reference on a hand-written page (anything outside ``api/``) that does not
resolve is a warning (an error under ``-W``), nitpicky mode or not.

``.. repnp-picture:: picture_fuse_bn``
    The figure ``docs/_ext/pictures.py`` draws with that function (by calling the repnp.fusion
    rule it shows), saved as a PNG under ``docs/_build/pictures`` and shown as an image. (The
    matplotlib ``plot`` directive is not used: inside MyST's ``eval-rst`` blocks its image counter
    restarts for every block, so every picture of a page would be written to the same file.)
``.. repnp-cli-help::``
    The ``--help`` text of every ``repnp`` subcommand, from ``repnp.cli.build_parser()``.
``.. repnp-schemes::``
    One row per naming scheme of ``repnp.io.npz.schemes.SCHEMES``: name, description (its block
    types and deploy names), BN eps, whether it is auto-detected, and where its names were read.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _xref(role: str, target: str, docname: str) -> nodes.Node:
    """A Python cross-reference (``:func:`~target```) built as a node, so it works in MyST and RST pages."""
    ref = addnodes.pending_xref("", refdomain="py", reftype=role, reftarget=target, refexplicit=False,
                                refwarn=True, refdoc=docname)
    ref += nodes.literal(text=target.rsplit(".", 1)[-1] + ("()" if role == "func" else ""), classes=["xref", "py"])
    return ref


def _inline(text: str) -> list[nodes.Node]:
    """Plain text with ``double-backquoted`` parts as literals."""
    out = []
    for k, part in enumerate(text.split("``")):
        if part:
            out.append(nodes.literal(text=part) if k % 2 else nodes.Text(part))
    return out


def _table(header: list[str], rows: list[list], widths: list[int]) -> nodes.table:
    """A docutils table; a cell is a string (inline literals allowed) or a list of nodes."""
    table = nodes.table(classes=["repnp-generated"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)

    def row(cells, head=False):
        r = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            para = nodes.paragraph()
            para.extend([nodes.Text(cell)] if head else (_inline(cell) if isinstance(cell, str) else cell))
            entry += para
            r += entry
        return r

    thead = nodes.thead()
    thead += row(header, head=True)
    tbody = nodes.tbody()
    for cells in rows:
        tbody += row(cells)
    group += thead
    group += tbody
    return table


class FusionRules(SphinxDirective):
    """Every public function of ``repnp.fusion`` with its summary line."""

    has_content = False

    def run(self):
        import repnp.fusion as fusion

        self.env.note_dependency(fusion.__file__)
        rows = []
        for name in fusion.__all__:
            obj = getattr(fusion, name)
            role = "class" if inspect.isclass(obj) else "func"
            rows.append([[_xref(role, f"repnp.fusion.{name}", self.env.docname)], _first_line(obj)])
        return [_table(["function", "what it does"], rows, [25, 75])]


class Schemes(SphinxDirective):
    """The naming schemes of the ``.npz`` converter."""

    has_content = False

    def run(self):
        from repnp.io.npz import schemes

        self.env.note_dependency(schemes.__file__)
        rows = []
        for name in sorted(schemes.SCHEMES):
            s = schemes.SCHEMES[name]
            eps = f"{s.eps:.0e}".replace("e-0", "e-")
            rows.append([f"``{name}``", s.description, eps, "yes" if s.detect else "no: pass ``--scheme``",
                         s.source])
        return [_table(["scheme", "what it reads (framework blocks → deploy name)", "BN eps", "auto-detected",
                        "names read in"], rows, [10, 44, 7, 11, 28])]


class Picture(SphinxDirective):
    """One picture of ``pictures.py``, drawn at build time."""

    has_content = False
    required_arguments = 1

    def run(self):
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt
        import pictures

        name = self.arguments[0]
        draw = getattr(pictures, name, None)
        if not name.startswith("picture_") or draw is None:
            raise self.error(f"repnp-picture: no function {name!r} in docs/_ext/pictures.py")
        self.env.note_dependency(pictures.__file__)
        out = Path(self.env.srcdir) / "_build" / "pictures" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        with plt.rc_context({"figure.dpi": 110, "font.size": 9}):
            fig = draw()
            fig.savefig(out, dpi=110)
            plt.close(fig)
        doc = inspect.getdoc(draw).splitlines()[0]
        # An absolute URI is relative to the source folder; Sphinx copies the file to _images/.
        return [nodes.image(uri="/" + out.relative_to(self.env.srcdir).as_posix(), alt=doc,
                            classes=["repnp-picture"])]


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


def _broken_reference(app, env, node, contnode):
    """A Python cross-reference of a hand-written page (not ``api/``) that nothing resolves is a warning.

    Sphinx reports unresolved ``py`` references only in nitpicky mode, which would also report
    every unresolved reference of the docstrings (shown on the ``api/`` pages). The guides are
    ours and must not link to a function that does not exist (-W makes this an error).
    """
    if node.get("refdomain") == "py" and not str(node.get("refdoc", "")).startswith("api/"):
        logger.warning("broken cross-reference %s:`%s`", node.get("reftype"), node.get("reftarget"),
                       location=node, type="ref", subtype="repnp")
    return None


def setup(app):
    app.connect("missing-reference", _broken_reference)
    app.add_directive("repnp-picture", Picture)
    app.add_directive("repnp-cli-help", CliHelp)
    app.add_directive("repnp-fusion-rules", FusionRules)
    app.add_directive("repnp-schemes", Schemes)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
