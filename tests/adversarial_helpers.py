"""Shared helpers of the adversarial suite (issue 12): the README's promises as assertions.

The promises (README, "The command line"): exit codes 0 success, 1 check failed (nothing
written), 2 bad input with ONE line on stderr starting ``repnp: error:`` and no traceback,
130/143 after SIGINT/SIGTERM; IN is never changed; OUT is replaced only with ``--force``;
no temp file (``.OUT.*.tmp``, see :func:`repnp.io.atomic.write_atomically`) is left behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

from repnp import cli

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def sha(path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


#: Warning categories Python does not print by default outside ``__main__``.
_SILENT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_cli(capsys, *argv):
    """``repnp.cli.main(argv)`` in-process: ``(code, stdout, stderr)``.

    Warnings raised during the run are appended to ``stderr`` as the interpreter would
    print them in a real run (pytest would otherwise swallow them): a NumPy
    ``RuntimeWarning`` is two more lines on the user's terminal."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    shown = [w for w in caught if not issubclass(w.category, _SILENT)]
    err = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown) + err
    return code, out, err


def run_subprocess(*argv, timeout: float = 120, cwd=None):
    """``python -m repnp argv`` in a fresh interpreter (catches tracebacks the interpreter
    itself prints, e.g. from an exception escaping ``main``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "repnp", *[str(a) for a in argv]], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def assert_one_line_error(err: str, *, prefix: str = "repnp: error:") -> None:
    """Exactly one line on stderr, starting with ``prefix``, no traceback."""
    assert "Traceback" not in err, err
    assert err.startswith(prefix), err
    assert err.count("\n") == 1 and err.endswith("\n"), err


def temp_files(folder) -> list[str]:
    """Temp files :func:`repnp.io.atomic.write_atomically` may leave (hidden ``.name.*.tmp``)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or ".tmp" in n)
