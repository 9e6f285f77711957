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
