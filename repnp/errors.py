"""Exceptions raised by repnp.

Kept in a module of its own so that every layer (ops, fusion, blocks, I/O) can
raise them without importing anything else.
"""


class ShapeError(ValueError):
    """An argument has a shape that does not fit the others.

    Subclasses :class:`ValueError` so that callers catching ``ValueError`` keep
    working. The message always names the offending arguments and their shapes.
    """


class ConversionError(ValueError):
    """A model or state dict cannot be converted (bad file, unknown layout, failed check)."""


class CheckFailed(ConversionError):
    """A conversion's numeric check failed: the converted model (or state dict) differs from
    the original by more than the tolerance. Nothing should be written.

    Attributes
    ----------
    report : object or None
        What the converter measured (a :class:`repnp.io.report.ConversionReport`, from
        ``repnp.io.convert_onnx`` or ``repnp.io.convert_state``), so that a caller can show it.
    """

    def __init__(self, message: str, *, report=None) -> None:
        super().__init__(message)
        self.report = report
