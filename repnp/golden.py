"""Golden tensors for porters: deterministic, seeded, documented in ``data/README.md``.

Each ``make_*`` function returns a ``{key: array}`` dict; :func:`write_golden`
stores one as ``.npz`` (atomically: temp file, then rename). Regenerating a
file gives the same values bit for bit (a test checks this), so a porter can
trust that the file says what the code says.

Regenerate every file with ``python -m repnp.golden data/golden``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from repnp import fusion, ops

__all__ = ["make_identity_example", "write_golden", "GENERATORS", "main"]


def make_identity_example() -> dict[str, np.ndarray]:
    """Seed 001's worked identity-kernel example, single- and multi-channel.

    Keys
    ----
    x : (1, 1, 3, 3) float64, ``[[1, 2, 3], [4, 5, 6], [7, 8, 9]]``
    kernel : (1, 1, 3, 3), a single 1 in the centre
    y : (1, 1, 3, 3), ``conv2d(x, kernel, padding=1)`` (equals ``x``)
    corner_window : (3, 3), the zero-padded neighbourhood of ``y[0, 0, 0, 0]``
    x_multi : (2, 3, 5, 5), seeded N(0, 1)
    kernel_multi : (3, 3, 3, 3), unit centre where c_in == c_out
    y_multi : (2, 3, 5, 5), ``conv2d(x_multi, kernel_multi, padding=1)`` (equals ``x_multi``)
    """
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    kernel = fusion.identity_kernel(1, kernel_size=3)
    padded = ops.pad2d(x, 1)
    rng = np.random.default_rng(1)
    x_multi = rng.standard_normal((2, 3, 5, 5))
    kernel_multi = fusion.identity_kernel(3, kernel_size=3)
    return {
        "x": x,
        "kernel": kernel,
        "y": ops.conv2d(x, kernel, padding=1),
        "corner_window": padded[0, 0, 0:3, 0:3],
        "x_multi": x_multi,
        "kernel_multi": kernel_multi,
        "y_multi": ops.conv2d(x_multi, kernel_multi, padding=1),
    }


def write_golden(path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz``, via a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


#: File name -> generator, for every golden file shipped in ``data/golden``.
GENERATORS = {
    "identity_kernel.npz": make_identity_example,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "data/golden")
    for name, make in GENERATORS.items():
        print(write_golden(out / name, make()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
