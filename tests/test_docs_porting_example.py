"""The porting guide's worked example (``docs/porting/repvgg_port.py``) runs and passes.

The page includes that file with ``literalinclude``, so what a reader copies is what runs
here. The file imports nothing but NumPy: a port that needs repnp would not be a port.
A second test checks that ``data/README.md`` answers the six questions a porter had to guess
(issue 16): the grouped identity layout, the frameworks' names, groups vs timm's group_size,
RepMLP's global perceptron, how the float32 deploy values were made, ResRep's threshold norm
and ``head``.
"""

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "porting" / "repvgg_port.py"
PAGE = ROOT / "docs" / "porting" / "index.md"
DATA_README = ROOT / "data" / "README.md"


def _load_example():
    spec = importlib.util.spec_from_file_location("repvgg_port", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_reproduces_the_golden_file():
    errors, tol = _load_example().main()
    assert tol == 1e-12
    assert set(errors) == {"deploy.conv.weight", "deploy.conv.bias", "y (train form)", "y (deploy form)"}
    for name, err in errors.items():
        assert err <= tol, f"{name}: err {err:.3e} > {tol}"


def test_example_imports_numpy_only():
    tree = ast.parse(EXAMPLE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"json", "sys", "pathlib", "numpy"}, imported


def test_example_runs_as_a_script():
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" ok ") == 4


def test_the_page_includes_the_example():
    text = PAGE.read_text()
    assert re.search(r"```\{literalinclude\} repvgg_port\.py", text)


def test_identity_layout_matters():
    """The wrong layout ``[i, i]`` does not fit the grouped file: the guide's point 1 is real."""
    import numpy as np

    with np.load(ROOT / "data" / "golden" / "repvgg_float64.npz") as g:
        in_per_group = g["deploy.conv.weight"].shape[1]
    assert in_per_group == 2            # C = 4, groups 2: [i, i] would index past I for i >= 2


def test_data_readme_answers_the_six_points():
    text = " ".join(DATA_README.read_text().split())
    for needle in (
        "[i, i % (C/groups), 1, 1]",                        # 1. grouped identity layout
        "rbr_dense", "rbr_identity", "rbr_skip", "conv.0.0", "conv.3", "compactor.pwc",  # 2. names
        "group_size",                                        # 3. groups vs group_size
        "global perceptron",                                 # 4. RepMLP
        "**not** `float32(deploy64)`",                       # 5. float32 deploy values
        "L2 norm", "kwargs.head",                            # 6. ResRep
    ):
        assert needle in text, f"data/README.md does not say {needle!r}"
