"""Writing a file so that it is either the old one or the complete new one, never half of it.

Converters must never corrupt or overwrite a user's file by accident: output goes
to a temporary file in the target's folder, is flushed to disk, given the
permissions a plain ``open()`` would give it, then renamed over the target
(``os.replace``: atomic on POSIX and Windows). Any failure removes the temporary
file and leaves the target as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from repnp.errors import ConversionError

__all__ = ["check_output_path", "write_atomically"]


def check_output_path(path, *, force: bool = False, source=None) -> Path:
    """Refuse an output path that would overwrite something it should not.

    Parameters
    ----------
    path : str or os.PathLike
        Where the output is to go.
    force : bool, keyword-only
        Whether an existing file at ``path`` may be replaced.
    source : str or os.PathLike, optional, keyword-only
        The input file: never overwritten, even with ``force`` (also through a
        symlink or another spelling of the same path).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ConversionError
        ``path`` is ``source``, or exists and ``force`` is false.
    """
    path = Path(path)
    if source is not None:
        source = Path(source)
        same_file = path.exists() and source.exists() and os.path.samefile(path, source)
        if same_file or path.resolve() == source.resolve():
            raise ConversionError(f"refusing to write over the input file {str(source)!r}: choose another output")
    if path.exists() and not force:
        raise ConversionError(f"{str(path)!r} exists; pass force=True (CLI: --force) to replace it")
    return path


def write_atomically(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file, then rename it to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
    write : callable
        Writes the whole content to the binary file handle it is given.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
