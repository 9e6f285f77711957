"""Sphinx configuration of repnp's documentation site.

Build (from the repository root): ``make docs`` — or, in a venv with the ``docs`` extra,
``sphinx-build -W --keep-going -b html docs docs/_build/html``. Warnings are errors: a
broken cross-reference, a docstring that does not parse or a notebook cell that raises
fails the build.
"""

import os
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# repnp from this checkout (also for the notebook kernels, which inherit the environment),
# and the site's own extensions.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# Notebook figures must be captured as image outputs: the kernel's inline backend, whatever the
# caller's MPLBACKEND says (the test suite runs the notebooks with Agg, which would show nothing).
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"

import repnp  # noqa: E402

# numpydoc reports a docstring section it does not know (repnp.golden's "Keys", a list of the
# file's keys) as a Python warning, not a Sphinx one; the section is still rendered as text.
warnings.filterwarnings("ignore", message="Unknown section Keys", category=UserWarning)

project = "repnp"
author = "the repnp authors"
copyright = "the repnp authors"
release = version = repnp.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",      # MathJax 3.2.2 vendored by a package (its name has hyphens): no CDN
    "numpydoc",
    "myst_nb",                     # Markdown pages and the notebooks (includes myst_parser)
    "repnp_docs",                  # docs/_ext/repnp_docs.py: pictures and tables made from repnp itself
]

# -- sources --------------------------------------------------------------------------------
# The notebooks are used in place: docs/learn/notebooks is a symlink to ../../notebooks (a glob in
# learn/index.md picks up every notebook there, a ninth one included). Nothing is copied.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "porting/*.py"]
root_doc = "index"
nitpicky = False

# -- notebooks: executed at every build, an error fails it ----------------------------------
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 300
nb_execution_in_temp = False      # run where the notebook lives (its relative paths hold)
nb_merge_streams = True

# -- MyST -----------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Links to files of the repository outside docs/ (data/README.md, notebooks/...) point at the code host.
myst_url_schemes = {
    "http": None, "https": None, "mailto": None,
    "repo": "https://github.com/repnp/repnp/blob/main/{{path}}",
}

# -- API reference --------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "none"          # numpydoc's Parameters sections say the types
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# A docstring section numpydoc does not know (the golden module's "Keys") is reported, not fatal.
numpydoc_validation_checks = set()

# -- HTML -----------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"repnp {release}"
html_static_path = ["_static"]
html_css_files = ["repnp.css"]
# A favicon of our own (the identity kernel): otherwise browsers ask for /favicon.ico, a 404.
html_favicon = "_static/favicon.svg"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "footer_start": ["copyright"],
    "footer_end": [],
    # No external resources: the site must work offline.
    "icon_links": [],
}
# The long pages read better without the (empty) left sidebar; learn/ and api/ keep their section list.
html_sidebars = {page: [] for page in ("index", "algebra", "porting/index", "golden", "converter", "sources")}
html_show_sourcelink = False
html_copy_source = False
# textmacros: `\_` and friends inside \text{...} (the notebooks write \text{fan\_in}); the extension
# ships with the vendored MathJax (input/tex/extensions/textmacros.js).
mathjax3_config = {
    "loader": {"load": ["[tex]/textmacros"]},
    "tex": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]],
            "packages": {"[+]": ["textmacros"]}},
}
