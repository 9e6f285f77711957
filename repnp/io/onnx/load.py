"""Reading an ONNX model safely: regular files only, external data only from the model's folder.

:func:`load_onnx` (the public entry, a path) and :func:`load_model` (a path or a
``ModelProto``, used by the converter) parse a model without following external-data
paths outside the model's own folder (a downloaded model naming ``../secret`` is refused,
not read).
"""

from __future__ import annotations

import mmap
import os

import onnx
from onnx import external_data_helper

from repnp.errors import ConversionError

__all__ = ["load_onnx", "load_model"]


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(_external_location(t) is not None for t in external_data_helper._get_all_tensors(model))


def _confine_external_data(model: onnx.ModelProto, base_dir: str | None) -> None:
    """Refuse external data that would be read from outside the model's folder."""
    tensors = list(external_data_helper._get_all_tensors(model))
    external = [(t.name, _external_location(t)) for t in tensors if _external_location(t) is not None]
    if not external:
        return
    if base_dir is None:
        raise ConversionError(
            f"model has external data ({external[0][1]!r} for tensor {external[0][0]!r}) but was "
            f"given as a ModelProto: pass the file path so that its folder is known"
        )
    root = os.path.realpath(base_dir)
    for name, location in external:
        # An absolute path or one that climbs out of the folder (``../../x``, or a
        # symlink pointing elsewhere) could read any file on the machine.
        full = os.path.realpath(os.path.join(root, location))
        if not location or os.path.isabs(location) or os.path.commonpath([root, full]) != root:
            raise ConversionError(
                f"external data of tensor {name!r} points to {location!r}, outside the model's "
                f"folder {root!r}: refused"
            )
        if not os.path.isfile(full):
            raise ConversionError(f"external data file {location!r} of tensor {name!r} not found in {root!r}")
    external_data_helper.load_external_data_for_model(model, root)


def _parse_file(proto: onnx.ModelProto, fh, path: str) -> None:
    """Parse the open file ``fh`` into ``proto``.

    A regular file is parsed from a read-only memory map: protobuf copies what it keeps,
    so the file's pages are mapped from the page cache instead of being copied into a
    fresh ``bytes`` object first (about half the load time of a weights-heavy model, the
    same peak memory). Anything that cannot be mapped (empty file, pipe) is read.
    """
    try:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # empty file, pipe, ...
        data = fh.read()
        mapped = None
    try:
        if mapped is None:
            proto.ParseFromString(data)
        else:
            with memoryview(mapped) as view:
                proto.ParseFromString(view)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ConversionError(f"{path!r} is not an ONNX model (protobuf parse failed: {exc})") from None
    finally:
        if mapped is not None:
            mapped.close()


def load_model(model, *, copy: bool = True) -> onnx.ModelProto:
    """Read an ONNX model from a path (or copy a ModelProto) and check it.

    Parameters
    ----------
    model : str, os.PathLike or onnx.ModelProto
        A ModelProto is copied, never modified.
    copy : bool, keyword-only
        ``False``: a ModelProto without external data is returned itself (for callers that
        only read it; copying it would copy its weights). One with external data is
        always copied (loading the data writes into the proto).

    Returns
    -------
    onnx.ModelProto
        With external data loaded (only from files inside the model's folder).

    Raises
    ------
    ConversionError
        Unreadable, truncated or non-ONNX file, not a regular file (FIFO, pipe, device),
        external data outside the folder.
    """
    base_dir = None
    if isinstance(model, onnx.ModelProto):
        if not copy and not _has_external_data(model):
            if model.ir_version < 1 or not model.HasField("graph") or not model.graph.output:
                raise ConversionError("not an ONNX model: no IR version, graph or graph output")
            return model
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        from repnp.io.atomic import open_regular

        path = os.fspath(model)
        proto = onnx.ModelProto()
        # Regular files only (after symlinks): a FIFO with no writer would block forever,
        # /dev/zero never ends; the file is read once, by the parse.
        try:
            with open_regular(path, what="model") as fh:
                _parse_file(proto, fh, path)
        except OSError as exc:
            raise ConversionError(f"cannot read model {path!r}: {exc}") from None
        base_dir = os.path.dirname(os.path.abspath(path))
    if proto.ir_version < 1 or not proto.HasField("graph") or not proto.graph.output:
        raise ConversionError("not an ONNX model: no IR version, graph or graph output (empty, truncated "
                              "or foreign file?)")
    _confine_external_data(proto, base_dir)
    return proto


def load_onnx(path) -> onnx.ModelProto:
    """Read an ONNX model from ``path``, external data only from the model's own folder.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    onnx.ModelProto
        With its external data loaded.

    Raises
    ------
    ConversionError
        Unreadable, truncated or non-ONNX file, or external data outside the model's
        folder (a path like ``../secret`` in a downloaded model is refused, not followed).
    """
    if isinstance(path, onnx.ModelProto):
        raise ConversionError("load_onnx takes a path; pass a ModelProto to convert_onnx directly")
    return load_model(path)
