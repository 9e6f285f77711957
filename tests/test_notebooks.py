"""Execute every teaching notebook; a notebook that errors fails the suite.

Notebooks are stored without outputs (small diffs; see README), which a test
here enforces. They run on the kernel of the interpreter running the tests, with
a non-interactive matplotlib backend. A missing notebook dependency is an
error, never a skip: CI installs the ``notebooks`` extra.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


EXPECTED = [
    "01_identity_kernel", "02_conv_bn_fusion", "03_repvgg", "04_mobileone_acnet_dbb",
    "05_resrep_repmlp", "06_mobilenetv2", "07_convert_onnx", "08_efficient_blocks",
    "09_large_kernels_and_sr",
]


def test_every_notebook_is_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
