"""The ``.npz`` state-dict converter: trained weights in a framework's names in, its deploy form out.

* :mod:`repnp.io.npz.archive` — :func:`load_state`, :func:`save_state` (numeric
  arrays only, atomic writes);
* :mod:`repnp.io.npz.schemes` — each framework's block types as data: key
  names to block parameter names, deploy names, block class, config facts;
* :mod:`repnp.io.npz.layout` — finding blocks by key prefix and renaming their keys;
* :mod:`repnp.io.npz.convert` — :func:`convert_state` and :func:`check_state`,
  which build each block with ``from_params`` and fuse it with its own
  ``reparameterize()``.
"""

from repnp.io.npz.archive import load_state, save_state
from repnp.io.npz.convert import check_state, convert_state, detect_scheme, find_blocks
from repnp.io.npz.layout import StateBlock
from repnp.io.npz.schemes import SCHEMES, scheme_names

__all__ = ["load_state", "save_state", "convert_state", "check_state", "detect_scheme", "find_blocks",
           "StateBlock", "SCHEMES", "scheme_names"]
