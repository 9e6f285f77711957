"""Our worked identity-kernel example (RepVGG's identity branch as a 3x3 kernel), read from the shipped golden file."""

from pathlib import Path

import numpy as np

from repnp import fusion, golden, ops

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "identity_kernel.npz"


def load():
    with np.load(GOLDEN, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_single_channel_hand_typed():
    g = load()
    np.testing.assert_array_equal(g["x"][0, 0], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(g["kernel"][0, 0], [[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    y = ops.conv2d(g["x"], g["kernel"], stride=1, padding=1)
    np.testing.assert_array_equal(y, g["x"])          # Y == X exactly
    np.testing.assert_array_equal(y, g["y"])
    assert y[0, 0, 1, 1] == 5                         # centre: 1 * 5
    np.testing.assert_array_equal(g["corner_window"], [[0, 0, 0], [0, 1, 2], [0, 4, 5]])
    assert y[0, 0, 0, 0] == 1                         # corner: 1 * 1 over the padded window
    assert np.sum(g["corner_window"] * g["kernel"][0, 0]) == 1


def test_multi_channel():
    g = load()
    k = g["kernel_multi"]
    assert k.shape == (3, 3, 3, 3)
    for o in range(3):
        for i in range(3):
            expected = np.zeros((3, 3))
            if o == i:
                expected[1, 1] = 1
            np.testing.assert_array_equal(k[o, i], expected)
    np.testing.assert_array_equal(k, fusion.identity_kernel(3, kernel_size=3))
    y = ops.conv2d(g["x_multi"], k, padding=1)
    np.testing.assert_array_equal(y, g["x_multi"])
    np.testing.assert_array_equal(y, g["y_multi"])


def test_regeneration_is_identical():
    fresh = golden.make_identity_example()
    shipped = load()
    assert set(fresh) == set(shipped)
    for key in fresh:
        np.testing.assert_array_equal(fresh[key], shipped[key], err_msg=key)
