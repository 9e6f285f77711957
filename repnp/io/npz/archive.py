"""Reading and writing state dicts as ``.npz`` archives: numeric arrays only, never pickles.

:func:`load_state` reads an archive in its order with ``allow_pickle=False``;
:func:`save_state` writes one member by member to a temporary file in the
target's folder and renames it over the target
(:func:`repnp.io.atomic.write_atomically`), refusing to overwrite an existing
file without ``force`` and the input file always.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from repnp.errors import ConversionError
from repnp.io.atomic import check_output_path, open_regular, write_atomically

__all__ = ["load_state", "save_state"]


def _check_array(key, value, where: str) -> None:
    if not isinstance(key, str):
        raise ConversionError(f"{where}: keys must be strings, got {key!r}")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = type(value).__name__ if not isinstance(value, np.ndarray) else f"dtype {value.dtype}"
        raise ConversionError(f"{where}: {key!r} must be a numeric array (bool, int or float), got {kind}")


def load_state(path) -> dict[str, np.ndarray]:
    """Read a state dict from an ``.npz`` archive, refusing pickled objects.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict of str to ndarray
        In the archive's order.

    Raises
    ------
    ConversionError
        Naming the file, if it is missing, not a regular file (a FIFO, a pipe, a
        device: never read, see :func:`repnp.io.atomic.open_regular`), truncated, not an ``.npz`` archive,
        holds object arrays (pickles; never loaded: ``allow_pickle=False``) or
        non-numeric arrays.
    """
    path = os.fspath(path)
    with open_regular(path) as fh:
        return _read_state(fh, path)


def _read_state(fh, path: str) -> dict[str, np.ndarray]:
    try:
        archive = np.load(fh, allow_pickle=False)
    except Exception as exc:  # numpy raises OSError, ValueError, EOFError, BadZipFile... by format
        raise ConversionError(f"cannot read {path!r} as an .npz state dict: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConversionError(f"{path!r} holds a single array (.npy), not an .npz state dict")
    state = {}
    try:
        with archive:
            for key in archive.files:
                try:
                    state[key] = archive[key]
                except ValueError as exc:
                    if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
                        raise ConversionError(
                            f"{path!r}: {key!r} is an object array (pickled Python objects); refused: "
                            f"state dicts are read with allow_pickle=False") from exc
                    raise
    except ConversionError:
        raise
    except Exception as exc:  # a truncated member surfaces only when it is read
        raise ConversionError(f"cannot read {path!r} as an .npz state dict: {exc}") from exc
    for key, value in state.items():
        _check_array(key, value, repr(path))
    return state


def save_state(state: Mapping, path, *, force: bool = False, source=None) -> Path:
    """Write a state dict to an ``.npz`` archive, atomically.

    Parameters
    ----------
    state : mapping of str to ndarray
        Numeric arrays only (no pickles are ever written).
    path : str or os.PathLike
        The archive to write (written as given, no suffix added).
    force : bool, keyword-only
        Replace ``path`` if it exists. Default: refuse.
    source : str or os.PathLike, optional, keyword-only
        The file the state came from: writing over it is refused even with
        ``force`` (a failed conversion must never cost the user their input).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConversionError
        ``path`` is ``source``, ``path`` exists and ``force`` is false (also
        when it appears during the write: the final move never replaces then), or a
        value is not a numeric array.

    Notes
    -----
    Written to a temporary file in the target's folder, flushed, then renamed
    over ``path`` (:func:`repnp.io.atomic.write_atomically`): a reader sees the
    old file or the complete new one, and a failure leaves no partial file.
    """
    if not isinstance(state, Mapping):
        raise ConversionError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
    for key, value in state.items():
        _check_array(key, value, "state")
    path = check_output_path(path, force=force, source=source)

    def write(handle):
        # Member by member rather than np.savez, whose own keyword arguments (file,
        # allow_pickle) would collide with state-dict keys of those names.
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, value in state.items():
                with archive.open(key + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    return write_atomically(path, write, replace=force)
