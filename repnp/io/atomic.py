"""Safe file access: reading regular files only, and writing a file so that it is either
the old one or the complete new one, never half of it.

Converters must never corrupt or overwrite a user's file by accident: output goes
to a temporary file in the target's folder, is flushed to disk, given the
permissions a plain ``open()`` would give it, then moved to the target. With
``replace`` that move is ``os.replace`` (atomic on POSIX and Windows); without it,
it is a move that fails if the target exists by then (a hard link, or
``renameat2(RENAME_NOREPLACE)``), so a file that appeared during the write is
never replaced. Any failure, and SIGINT/SIGTERM in the CLI (which turn into
exceptions, see :mod:`repnp.cli`), removes the temporary file and leaves the target
as it was.

Inputs are read from regular files only (after following symlinks,
:func:`open_regular`): a FIFO with no writer would block forever, ``/dev/zero``
never ends, and a pipe cannot be read twice (type sniffing, then parsing).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from repnp.errors import ConversionError

__all__ = ["check_output_path", "open_regular", "write_atomically", "remove_pending"]

#: Temporary files being written right now (removed by :func:`remove_pending`).
_PENDING: set[str] = set()


def open_regular(path, *, what: str = "input") -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (after symlinks).

    Parameters
    ----------
    path : str or os.PathLike
    what : str, keyword-only
        How to name the file in an error message.

    Returns
    -------
    file object
        Open for reading, positioned at the start.

    Raises
    ------
    ConversionError
        Missing, unreadable, or not a regular file (a FIFO, a pipe such as
        ``<(cat model.onnx)``, a device such as ``/dev/zero``, a folder).

    Notes
    -----
    The file is opened non-blocking and checked with ``fstat`` on the open
    descriptor: opening a FIFO that has no writer would otherwise block forever,
    and checking the path before opening it would leave a window for a swap.
    """
    name = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(name, flags)
    except OSError as exc:
        raise ConversionError(f"cannot read {what} {name!r}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO or pipe" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
                    if stat.S_ISSOCK(mode) else "not a regular file")
            raise ConversionError(f"{what} {name!r} is {kind}: only regular files are read "
                                  f"(save a stream to a file first)")
        if getattr(os, "O_NONBLOCK", 0) and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_output_path(path, *, force: bool = False, source=None, protected: Iterable = ()) -> Path:
    """Refuse an output path that would overwrite something it should not.

    Parameters
    ----------
    path : str or os.PathLike
        Where the output is to go.
    force : bool, keyword-only
        Whether an existing file at ``path`` may be replaced.
    source : str or os.PathLike, optional, keyword-only
        The input file: never overwritten, even with ``force`` (also through a
        symlink, a hard link or another spelling of the same path).
    protected : iterable of str or os.PathLike, keyword-only
        More files never overwritten, even with ``force`` (an ONNX input's
        external-data files).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ConversionError
        ``path`` is ``source`` or a ``protected`` file, or exists (a dangling
        symlink counts) and ``force`` is false.

    Notes
    -----
    This is the early check, made before any work. Without ``force`` the final
    move of :func:`write_atomically` (``replace=False``) checks again, atomically.
    """
    path = Path(path)
    guarded = [(Path(source), "the input file")] if source is not None else []
    guarded += [(Path(p), "a file the input model reads (its external data)") for p in protected]
    for other, role in guarded:
        same_file = path.exists() and other.exists() and os.path.samefile(path, other)
        if same_file or path.resolve() == other.resolve():
            raise ConversionError(f"refusing to write over {role} {str(other)!r}: choose another output")
    if os.path.lexists(path) and not force:
        what = "is a dangling symlink" if not path.exists() else "exists"
        raise ConversionError(f"{str(path)!r} {what}; pass force=True (CLI: --force) to replace it")
    return path


def _rename_noreplace(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists (a
    dangling symlink included), atomically."""
    if sys.platform == "win32":
        os.rename(src, dst)          # never replaces on Windows
        return
    try:
        os.link(src, dst, follow_symlinks=False)   # EEXIST if the name exists at all
    except FileExistsError:
        raise
    except OSError as exc:           # no hard links here (some FUSE/FAT mounts): renameat2
        if not _renameat2_noreplace(src, dst):
            raise ConversionError(f"cannot create {dst!r} without the risk of replacing a file "
                                  f"that appears meanwhile ({exc.strerror or exc}); pass --force "
                                  f"(force=True) to replace") from None
        return
    os.unlink(src)


def _renameat2_noreplace(src: str, dst: str) -> bool:
    """``renameat2(RENAME_NOREPLACE)`` through libc; ``False`` if unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), dst)


def write_atomically(path, write: Callable[[BinaryIO], None], *, replace: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary file, then move it to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
    write : callable
        Writes the whole content to the binary file handle it is given.
    replace : bool, keyword-only
        ``True``: an existing ``path`` is replaced (``os.replace``). ``False``: the
        move fails if ``path`` exists when it happens, even if it appeared during
        the write (the check of :func:`check_output_path` is made earlier).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConversionError
        ``replace`` is false and ``path`` exists at the final step (the temporary
        file is removed, ``path`` is left as it is).

    Notes
    -----
    The temporary file is ``.repnp-XXXXXXXX.tmp`` in ``path``'s folder: a short name
    (a long valid ``path`` name must not give a temp name over the file system's
    limit), unique (``mkstemp``), on the same file system (so the move is a rename).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".repnp-", suffix=".tmp")
        _PENDING.add(tmp)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                _rename_noreplace(tmp, os.fspath(path))
            except FileExistsError:
                raise ConversionError(f"{str(path)!r} appeared while it was being written; left as it is "
                                      f"(pass force=True, CLI: --force, to replace it)") from None
    except BaseException:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if tmp is not None:
            _PENDING.discard(tmp)
    return path


def remove_pending() -> None:
    """Remove the temporary files of writes still in progress (on a signal, before exiting)."""
    for tmp in list(_PENDING):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _PENDING.discard(tmp)
