"""repnp: a pure-NumPy reference implementation of structural re-parameterization.

Train with multi-branch blocks, deploy as plain single convolutions, obtained by
exact algebra on the trained weights.

Layers (each imports only from the ones above it):

``repnp.errors`` -> ``repnp.ops`` -> ``repnp.fusion`` -> ``repnp.blocks`` ->
``repnp.models`` / ``repnp.cost`` -> ``repnp.io`` -> ``repnp.cli``;
``repnp.testing`` holds public helpers for porters.
"""

__version__ = "0.1.0"

from repnp.errors import ConversionError, ShapeError

__all__ = ["ConversionError", "ShapeError", "__version__"]
