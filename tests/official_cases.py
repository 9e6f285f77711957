"""The reference cases made from the official repositories' own classes (``tests/data/*/state/<case>/``).

Each folder holds ``train_state.npz`` and ``deploy_state.npz`` (the official block's state dict
before and after its own re-parameterization), ``meta.json`` (how it was built) and
``input.npy`` / ``output.npy`` (PyTorch's forward of the train form). The generators are in
``tests/data/generators/`` (not run in CI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from repnp.io import load_state


class OfficialCase(NamedTuple):
    train: dict
    deploy: dict
    meta: dict
    x: np.ndarray
    y: np.ndarray


def load_case(folder: Path) -> OfficialCase:
    """The five files of one case folder."""
    folder = Path(folder)
    return OfficialCase(load_state(folder / "train_state.npz"), load_state(folder / "deploy_state.npz"),
                        json.loads((folder / "meta.json").read_text()), np.load(folder / "input.npy"),
                        np.load(folder / "output.npy"))
