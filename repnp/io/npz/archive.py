"""Reading and writing state dicts as ``.npz`` archives: numeric arrays only, never pickles.

:func:`load_state` reads an archive in its order with ``allow_pickle=False``;
:func:`save_state` writes one member by member to a temporary file in the
target's folder and renames it over the target
(:func:`repnp.io.atomic.write_atomically`), refusing to overwrite an existing
file without ``force`` and the input file always.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from repnp.errors import ConversionError
from repnp.io.atomic import check_output_path, open_regular, write_atomically

__all__ = ["load_state", "save_state", "MAX_BYTES"]

#: The most array data :func:`load_state` reads from one archive, in bytes (4 GiB), unless its
#: ``max_bytes=`` says otherwise: the sizes an archive declares are checked before anything is
#: decompressed, so that a small file cannot make the reader allocate gigabytes (deflated zeros
#: shrink a thousandfold).
MAX_BYTES = 4 * 2**30
#: Array data is decompressed in chunks of this size into the array itself (no second copy).
_CHUNK = 1 << 24


def _check_array(key, value, where: str) -> None:
    if not isinstance(key, str):
        raise ConversionError(f"{where}: keys must be strings, got {key!r}")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = type(value).__name__ if not isinstance(value, np.ndarray) else f"dtype {value.dtype}"
        raise ConversionError(f"{where}: {key!r} must be a numeric array (bool, int or float), got {kind}")


def load_state(path, *, max_bytes: int = MAX_BYTES) -> dict[str, np.ndarray]:
    """Read a state dict from an ``.npz`` archive, refusing pickled objects.

    Parameters
    ----------
    path : str or os.PathLike
    max_bytes : int, keyword-only
        The most array data to read (the sum of the members' ``prod(shape) * itemsize``);
        default :data:`MAX_BYTES` (4 GiB).

    Returns
    -------
    dict of str to ndarray
        In the archive's order.

    Raises
    ------
    ConversionError
        Naming the file, if it is missing, not a regular file (a FIFO, a pipe, a
        device: never read, see :func:`repnp.io.atomic.open_regular`), truncated, not an
        ``.npz`` archive, holds object arrays (pickles; never loaded: ``allow_pickle=False``),
        non-numeric arrays, a member that is not a ``.npy`` array, two members of
        one name, a member whose size in the zip directory is not the one its
        ``.npy`` header declares, or more than ``max_bytes`` of array data.

    Notes
    -----
    Every member's ``.npy`` header (shape, dtype) is read first, without decompressing
    the data; the sizes are checked against the zip directory and their total against
    ``max_bytes``; only then is the data decompressed, in chunks, into arrays of the
    declared sizes (the zip reader stops at the declared size and checks the CRC).
    """
    path = os.fspath(path)
    if int(max_bytes) < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes!r}")
    with open_regular(path) as fh:
        return _read_state(fh, path, int(max_bytes))


def _read_state(fh, path: str, max_bytes: int) -> dict[str, np.ndarray]:
    """The state dict in the open file ``fh`` (see :func:`load_state`)."""
    try:
        archive = np.load(fh, allow_pickle=False)
    except Exception as exc:  # numpy raises OSError, ValueError, EOFError, BadZipFile... by format
        raise ConversionError(f"cannot read {path!r} as an .npz state dict: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConversionError(f"{path!r} holds a single array (.npy), not an .npz state dict")
    try:
        with archive:
            members = _headers(archive.zip, path, int(max_bytes))
            state = {key: _read_data(archive.zip, *member) for key, member in members.items()}
    except ConversionError:
        raise
    except Exception as exc:  # a truncated or corrupt member surfaces only when it is read
        raise ConversionError(f"cannot read {path!r} as an .npz state dict: {exc}") from exc
    for key, value in state.items():
        _check_array(key, value, repr(path))
    return state


def _headers(archive: zipfile.ZipFile, path: str, max_bytes: int) -> dict:
    """``key -> (ZipInfo, data offset, shape, fortran order, dtype)`` of every member, from the
    ``.npy`` headers alone, checked against the zip directory's sizes and ``max_bytes``."""
    members, total = {}, 0
    for info in archive.infolist():
        name = info.filename
        if not name.endswith(".npy"):
            raise ConversionError(f"{path!r}: member {name!r} is not a .npy array")
        key = name[:-4]
        if key in members:
            raise ConversionError(f"{path!r}: two members named {name!r}")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            # Version 3.0 differs from 2.0 only by a utf-8 header, needed for non-ASCII field
            # names of structured dtypes (refused below); its layout is 2.0's.
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(member)
            offset = member.tell()
        if dtype.hasobject:
            raise ConversionError(f"{path!r}: {key!r} is an object array (pickled Python objects); refused: "
                                  f"state dicts are read with allow_pickle=False")
        if dtype.kind not in "biuf":
            raise ConversionError(f"{path!r}: {key!r} must be a numeric array (bool, int or float), "
                                  f"got dtype {dtype}")
        size = math.prod(shape) * dtype.itemsize
        if info.file_size != offset + size:
            raise ConversionError(f"{path!r}: {key!r} declares shape {shape} {dtype} ({size} bytes of data) but its "
                                  f"member holds {info.file_size - offset} bytes")
        total += size
        if total > max_bytes:
            raise ConversionError(f"{path!r}: its arrays declare more than {max_bytes} bytes ({key!r} reached "
                                  f"{total}); refused before decompressing (raise load_state's max_bytes= to "
                                  f"read it)")
        members[key] = (info, offset, shape, fortran, dtype)
    return members


def _read_data(archive: zipfile.ZipFile, info, offset: int, shape, fortran: bool, dtype) -> np.ndarray:
    """A member's array, decompressed chunk by chunk into an array of its declared size."""
    flat = np.empty(math.prod(shape), dtype=dtype)
    buffer = flat.view(np.uint8)
    with archive.open(info) as member:
        member.read(offset)
        done = 0
        while done < buffer.size:
            chunk = member.read(min(_CHUNK, buffer.size - done))
            if not chunk:
                raise ConversionError(f"member {info.filename!r} ends after {done} of {buffer.size} bytes")
            buffer[done:done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            done += len(chunk)
        member.read(1)      # at the end: the zip reader checks the CRC
    return flat.reshape(shape, order="F" if fortran else "C")


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
