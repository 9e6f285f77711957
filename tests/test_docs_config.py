"""The documentation site's configuration, checked without building it (fast, no docs extra needed).

What the site promises and a careless edit of ``docs/conf.py`` could silently break: notebooks
executed at every build with errors failing it, the notebooks used in place (a symlink, so a new
notebook appears by itself through the glob), math rendered from a vendored MathJax (no CDN), the
bibliography (``docs/sources.md``) in the site, and the porting guide linked to the golden files.
"""

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _assignments() -> dict:
    tree = ast.parse((DOCS / "conf.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def test_notebooks_execute_and_fail_the_build():
    conf = _assignments()
    assert conf["nb_execution_mode"] in ("force", "cache")
    assert conf["nb_execution_raise_on_error"] is True
    assert conf["nb_execution_in_temp"] is False


def test_notebooks_used_in_place_and_globbed():
    link = DOCS / "learn" / "notebooks"
    assert link.is_symlink(), "docs/learn/notebooks must be a symlink to ../../notebooks"
    assert link.resolve() == (ROOT / "notebooks").resolve()
    assert os.readlink(link) == "../../notebooks"          # relative: works in any clone
    index = (DOCS / "learn" / "index.md").read_text()
    assert ":glob:" in index and "notebooks/*" in index


def test_math_is_offline():
    conf = _assignments()
    assert "sphinx-mathjax-offline" in conf["extensions"]
    assert "mathjax_path" not in conf                      # the package sets its own local path


def test_bibliography_and_guides_in_the_toctree():
    index = (DOCS / "index.md").read_text()
    for page in ("learn/index", "algebra", "porting/index", "golden", "converter", "api/index", "sources"):
        assert f"\n{page}\n" in index, f"{page} missing from the root toctree"
    assert "../data/README.md" in (DOCS / "golden.md").read_text()
    assert "{doc}`../golden`" in (DOCS / "porting" / "index.md").read_text()


def test_docs_extra_covers_the_notebooks_imports():
    """The site executes every notebook: what they import must come with ``pip install -e .[docs]``."""
    import json
    import re
    import sys

    import pytest

    tomllib = pytest.importorskip("tomllib")            # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["docs"]
    installed = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements}
    imported = set()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            imported |= {m.split(".")[0] for m in re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, re.M)}
    missing = sorted(m for m in imported
                     if m not in sys.stdlib_module_names and m != "repnp" and m.lower() not in installed)
    assert not missing, f"notebooks import {missing}, not in the dependencies nor the docs extra"
