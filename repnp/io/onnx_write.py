"""Write an ONNX model atomically (temp file in the target folder, then a rename), with the
output-path rules of :mod:`repnp.io.atomic`: never onto the input, never over an existing
file without ``overwrite``."""

from __future__ import annotations

import onnx

from repnp.errors import ConversionError
from repnp.io.atomic import check_output_path, write_atomically

__all__ = ["save_model_atomic"]

_PROTOBUF_LIMIT = 2 ** 31 - 1


def save_model_atomic(model: onnx.ModelProto, path, *, overwrite: bool = False, source=None):
    """Serialize ``model`` to ``path`` through a temp file and ``os.replace``.

    Parameters
    ----------
    model : onnx.ModelProto
    path : str or os.PathLike
    overwrite : bool, keyword-only
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
        Existing output without ``overwrite``, output == input, or a model over
        protobuf's 2 GB limit (external-data output is not supported).
    """
    target = check_output_path(path, force=overwrite, source=source)
    data = model.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:
        raise ConversionError("model exceeds protobuf's 2 GB limit; external-data output is not supported")
    return write_atomically(target, lambda handle: handle.write(data))
