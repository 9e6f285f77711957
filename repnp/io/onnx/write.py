"""Write an ONNX model atomically (temp file in the target folder, then a rename), with the
output-path rules of :mod:`repnp.io.atomic`: never onto the input, never over an existing
file without ``force``.

The model is serialized piece by piece (:func:`serialized_chunks`): the graph's structure,
then one initializer at a time. ``model.SerializeToString()`` would build the whole file in
memory, twice over with the upb backend (its encode buffer, then the Python ``bytes``), which
for a weights-heavy model is about twice the file size on top of the model itself.
"""

from __future__ import annotations

import mmap
import os

import onnx
from onnx import external_data_helper

from repnp.errors import ConversionError
from repnp.io.atomic import check_output_path, open_regular, write_atomically
from repnp.io.onnx.graph import copy_fields

__all__ = ["save_onnx", "serialized_chunks", "check_model_output", "external_data_files"]

# How an external-data entry starts on the wire: StringStringEntryProto field 1 (key),
# length 8, "location". Every external tensor has one (the loader refuses it otherwise).
_LOCATION_KEY = b"\n\x08location"

_PROTOBUF_LIMIT = 2 ** 31 - 1
_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number              # 7
_INIT_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number         # 5
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int) -> bytes:
    return _varint((number << 3) | _LENGTH_DELIMITED)


def _split(message, number: int, skip: str):
    """Two copies of ``message``: its fields numbered below ``number`` and above it,
    without field ``skip`` (only small fields are copied: the caller skips the big one)."""
    numbers = {fd.number for fd in message.DESCRIPTOR.fields}
    low, high = type(message)(), type(message)()
    copy_fields(message, low, skip={skip}, numbers={n for n in numbers if n < number})
    copy_fields(message, high, skip={skip}, numbers={n for n in numbers if n > number})
    return low, high


def _has_unknown_fields(message) -> bool:
    try:
        from google.protobuf import unknown_fields
    except ImportError:  # old protobuf: assume there may be some
        return True
    return len(unknown_fields.UnknownFieldSet(message)) > 0


def serialized_chunks(model: onnx.ModelProto):
    """``(size, chunks)``: the protobuf serialization of ``model`` as a list of byte
    strings and callables, whose concatenation parses back to ``model``.

    Notes
    -----
    Protobuf's wire format writes a message field as key, length, payload; a repeated
    field is its elements one after the other, and fields are written in field-number
    order (what ``SerializeToString`` does). The model's fields before ``graph`` (7),
    then the graph's key and length, its fields before ``initializer`` (5), each
    initializer (serialized only when its chunk is written: a callable), its fields
    after, and the model's fields after ``graph``. The lengths come from
    ``ByteSize()`` of each initializer.
    """
    if _has_unknown_fields(model) or (model.HasField("graph") and _has_unknown_fields(model.graph)):
        # Fields this onnx version does not know (a newer exporter's) are kept by protobuf's
        # own serialization, not by copying known fields: serialize in one piece then.
        data = model.SerializeToString()
        return len(data), [data]
    head, tail = _split(model, _GRAPH_FIELD, "graph")
    chunks = [head.SerializeToString()]
    if model.HasField("graph"):
        g_head, g_tail = _split(model.graph, _INIT_FIELD, "initializer")
        g_head_bytes, g_tail_bytes = g_head.SerializeToString(), g_tail.SerializeToString()
        parts, graph_size = [], len(g_head_bytes) + len(g_tail_bytes)
        for t in model.graph.initializer:
            n = t.ByteSize()
            prefix = _key(_INIT_FIELD) + _varint(n)
            graph_size += len(prefix) + n
            parts += [prefix, t.SerializeToString]
        chunks += [_key(_GRAPH_FIELD) + _varint(graph_size), g_head_bytes, *parts, g_tail_bytes]
        size = len(chunks[0]) + len(chunks[1]) + graph_size
    else:
        size = len(chunks[0])
    tail_bytes = tail.SerializeToString()
    chunks.append(tail_bytes)
    return size + len(tail_bytes), chunks


def external_data_files(path) -> list[str]:
    """The files the ONNX model at ``path`` reads its external data from (real paths).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    list of str
        Empty for a model without external data, and for a file that cannot be read
        or parsed (it is then no model whose data could be lost).

    Notes
    -----
    The file is first searched for the bytes every external-data entry starts with
    (in a memory map, no copy); only a file that has them, a model whose weights are
    mostly elsewhere and so a small file, is parsed, without loading its data.
    """
    try:
        with open_regular(path) as fh:
            try:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    if mapped.find(_LOCATION_KEY) < 0:
                        return []
                    proto = onnx.ModelProto()
                    with memoryview(mapped) as view:
                        proto.ParseFromString(view)
            except ValueError:        # empty file: nothing mapped, no model
                return []
    except Exception:                 # unreadable or not a model: nothing it could read
        return []
    root = os.path.dirname(os.path.abspath(os.fspath(path)))
    files = set()
    for tensor in external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value:
                files.add(os.path.realpath(os.path.join(root, entry.value)))
    return sorted(files)


def check_model_output(path, *, force: bool = False, source=None):
    """:func:`repnp.io.atomic.check_output_path` for a model read from ``source``: also
    refuses, even with ``force``, the files ``source`` reads its external data from.

    Parameters
    ----------
    path : str or os.PathLike
    force : bool, keyword-only
    source : str or os.PathLike, optional, keyword-only

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ConversionError
        As :func:`~repnp.io.atomic.check_output_path`; also when ``path`` is one of
        ``source``'s external-data files.
    """
    protected = ()
    # Only an existing output replaced with force can destroy a data file (without force
    # an existing output is refused anyway); only then is the source searched.
    if source is not None and force and os.path.lexists(path):
        protected = external_data_files(source)
    return check_output_path(path, force=force, source=source, protected=protected)


def save_onnx(model: onnx.ModelProto, path, *, force: bool = False, source=None):
    """Serialize ``model`` to ``path`` through a temp file and a rename (``os.replace``
    with ``force``, else a move that never replaces).

    Parameters
    ----------
    model : onnx.ModelProto
    path : str or os.PathLike
    force : bool, keyword-only
        Replace an existing ``path`` (the CLI's ``--force``). Default: refuse.
    source : str or os.PathLike, keyword-only, optional
        The file the model was read from: writing onto it is always refused.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConversionError
        Existing output without ``force`` (also one that appears during the write),
        output == input or one of its external-data files, or a model over
        protobuf's 2 GB limit (external-data output is not supported).

    Notes
    -----
    Written in pieces (:func:`serialized_chunks`), so that the peak memory is the model
    plus its largest initializer, not the model plus two copies of the file. A crash
    mid-write leaves the old file (if any) intact, never a truncated model.

    Examples
    --------
    >>> model, report = repnp.io.convert_onnx(repnp.io.load_onnx("train.onnx"))  # doctest: +SKIP
    >>> repnp.io.save_onnx(model, "deploy.onnx", source="train.onnx")            # doctest: +SKIP
    """
    if not isinstance(model, onnx.ModelProto):
        raise ConversionError(f"save_onnx writes an onnx.ModelProto, got {type(model).__name__}")
    target = check_model_output(path, force=force, source=source)
    size, chunks = serialized_chunks(model)
    if size > _PROTOBUF_LIMIT:
        raise ConversionError("model exceeds protobuf's 2 GB limit; external-data output is not supported")

    def write(handle):
        for chunk in chunks:
            handle.write(chunk() if callable(chunk) else chunk)

    return write_atomically(target, write, replace=force)
