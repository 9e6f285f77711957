"""Issue 12 on the .npz path: no false pass, no traceback, bounded memory and time on any input.

Every input is built here (``numpy.savez``, ``zipfile``); nothing large is allocated: the
memory bound is tested with a small ``max_bytes`` and a few MiB of deflated zeros.
"""

from __future__ import annotations

import io
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from repnp import cli, tolerance
from repnp.blocks.fromparams import bn_from, conv_from
from repnp.errors import CheckFailed, ConversionError, ShapeError
from repnp.io import convert_state, load_state
from repnp.io.npz import archive, check_state, find_blocks


def _bn(state, prefix, c, rng, dtype=np.float32):
    state[f"{prefix}.weight"] = (rng.random(c) + 0.5).astype(dtype)
    state[f"{prefix}.bias"] = rng.standard_normal(c).astype(dtype)
    state[f"{prefix}.running_mean"] = rng.standard_normal(c).astype(dtype)
    state[f"{prefix}.running_var"] = (rng.random(c) + 0.5).astype(dtype)


def repvgg_state(blocks=2, *, c=4, dtype=np.float32, identity=True, seed=0) -> dict:
    """timm RepVggBlocks ``stages.<n>.``: 3x3 + 1x1 conv-BN, identity BN."""
    rng = np.random.default_rng(seed)
    state = {}
    for n in range(blocks):
        p = f"stages.{n}"
        state[f"{p}.conv_kxk.conv.weight"] = rng.standard_normal((c, c, 3, 3)).astype(dtype)
        _bn(state, f"{p}.conv_kxk.bn", c, rng, dtype)
        state[f"{p}.conv_1x1.conv.weight"] = rng.standard_normal((c, c, 1, 1)).astype(dtype)
        _bn(state, f"{p}.conv_1x1.bn", c, rng, dtype)
        if identity:
            _bn(state, f"{p}.identity", c, rng, dtype)
    return state


def mobileone_state(blocks: int, *, c=2, seed=0) -> dict:
    """timm MobileOneBlocks ``blocks.<n>.``: two 3x3 conv-BN, a 1x1 scale conv-BN, identity BN."""
    rng = np.random.default_rng(seed)
    state = {}
    for n in range(blocks):
        p = f"blocks.{n}"
        for i in range(2):
            state[f"{p}.conv_kxk.{i}.conv.weight"] = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
            _bn(state, f"{p}.conv_kxk.{i}.bn", c, rng)
        state[f"{p}.conv_scale.conv.weight"] = rng.standard_normal((c, c, 1, 1)).astype(np.float32)
        _bn(state, f"{p}.conv_scale.bn", c, rng)
        _bn(state, f"{p}.identity", c, rng)
    return state


# ----------------------------------------------------------------------------
# item 4: a non-finite value anywhere fails the check, and the message says so
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_in_a_later_block_is_named_in_the_failure(value):
    state = repvgg_state(3)
    key = "stages.1.conv_1x1.conv.weight"
    state[key] = state[key].copy()
    state[key][2, 1, 0, 0] = value
    with pytest.raises(CheckFailed) as exc:
        convert_state(state)
    message = str(exc.value)
    assert "stages.1" in message and "non-finite" in message and repr(key) in message
    assert "stages.0" not in message and "stages.2" not in message
    check = exc.value.report.check
    assert check["passed"] is False and check["per_block"]["stages.1"] == float("inf")
    assert key in check["non_finite"]["stages.1"]
    assert check["per_block"]["stages.2"] <= 1e-5


def test_non_finite_written_weight_is_named_by_check_state():
    state = repvgg_state(2)
    out, _ = convert_state(state)
    out = dict(out)
    out["stages.1.reparam_conv.bias"] = out["stages.1.reparam_conv.bias"].copy()
    out["stages.1.reparam_conv.bias"][0] = np.nan
    result = check_state(state, out)
    assert result["passed"] is False and result["per_block"]["stages.1"] == float("inf")
    assert result["non_finite"] == {"stages.1": ["stages.1.reparam_conv.bias"]}


# ----------------------------------------------------------------------------
# item 8: zero-size dimensions are a ShapeError naming the key and the shape
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 0, 3, 3), (0, 4, 3, 3), (4, 4, 0, 0), (4, 4, 0, 3)])
def test_zero_size_conv_weight_is_a_shape_error(shape):
    state = repvgg_state(2)
    state["stages.1.conv_kxk.conv.weight"] = np.zeros(shape, np.float32)
    with pytest.raises(ShapeError, match=r"'stages\.1\.conv_kxk\.conv\.weight' has shape " + re_shape(shape)):
        convert_state(state)


def test_zero_length_bn_is_a_shape_error():
    state = repvgg_state(1, c=4)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        state[f"stages.0.identity.{leaf}"] = np.zeros(0, np.float32)
    with pytest.raises(ShapeError, match=r"'stages\.0\.identity\.\w+' has shape \(0,\)"):
        convert_state(state)


def test_zero_channels_everywhere_is_a_shape_error():
    # O = C = 0 throughout: every array empty, which once "passed" (the error of nothing is 0)
    state = repvgg_state(1, c=0)
    with pytest.raises(ShapeError, match="size 0"):
        convert_state(state)


def re_shape(shape) -> str:
    return r"\(" + r", ".join(str(s) for s in shape) + r"\)"


def test_zero_size_in_from_params_helpers():
    with pytest.raises(ShapeError, match=r"'conv\.weight' has shape \(4, 0, 3, 3\)"):
        conv_from({"conv.weight": np.zeros((4, 0, 3, 3))}, "conv.")
    with pytest.raises(ShapeError, match=r"BN 'bn'.*\(0,\)"):
        bn_from({f"bn.{k}": np.zeros(0) for k in ("mean", "var", "gamma", "beta")}, "bn.")


def test_zero_channel_conv_through_the_cli_exits_2(tmp_path, capsys):
    state = repvgg_state(2)
    # no input channel in either branch: the identity's groups = O / (C/groups) divided by 0
    state["stages.0.conv_kxk.conv.weight"] = np.zeros((4, 0, 3, 3), np.float32)
    state["stages.0.conv_1x1.conv.weight"] = np.zeros((4, 0, 1, 1), np.float32)
    src = tmp_path / "zero.npz"
    np.savez(src, **state)
    code = cli.main(["convert", str(src), str(tmp_path / "out.npz")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out.npz").exists()
    assert err.count("\n") == 1 and err.startswith("repnp: error:")
    assert "'stages.0.conv_kxk.conv.weight' has shape (4, 0, 3, 3)" in err


# ----------------------------------------------------------------------------
# item 12: declared sizes checked before decompressing, total bounded by max_bytes
# ----------------------------------------------------------------------------

def test_deflated_zeros_refused_above_max_bytes_before_decompressing(tmp_path):
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, w=np.zeros(4 << 20, np.float64), b=np.zeros(3, np.float32))   # 32 MiB
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ConversionError, match=r"bomb\.npz.*more than 1048576 bytes.*max_bytes="):
            load_state(bomb, max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20          # the 32 MiB were never allocated
    assert set(load_state(bomb, max_bytes=64 << 20)) == {"w", "b"}


def test_default_limit_is_the_module_constant(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    np.savez(path, a=np.zeros(100, np.float32), b=np.zeros(100, np.float32))
    assert archive.MAX_BYTES == 4 * 2**30
    monkeypatch.setattr(archive, "MAX_BYTES", 500)
    monkeypatch.setattr(archive.load_state, "__kwdefaults__", {"max_bytes": archive.MAX_BYTES})
    with pytest.raises(ConversionError, match="more than 500 bytes"):
        load_state(path)
    assert len(load_state(path, max_bytes=800)) == 2


def _npy(array, *, header_shape=None) -> bytes:
    """The ``.npy`` bytes of ``array``, its header optionally lying about the shape."""
    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    if header_shape is not None:
        header["shape"] = header_shape
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(array.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("header_shape", [(2,), (1000,)])
def test_member_size_must_match_its_header(tmp_path, header_shape):
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("ok.npy", _npy(np.ones(3)))
        z.writestr("w.npy", _npy(np.zeros(64), header_shape=header_shape))
    with pytest.raises(ConversionError, match=r"lying\.npz.*'w' declares shape"):
        load_state(path)


def test_non_npy_member_and_duplicates_refused(tmp_path):
    path = tmp_path / "extra.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", _npy(np.ones(3)))
        z.writestr("notes.txt", b"hello")
    with pytest.raises(ConversionError, match="'notes.txt' is not a .npy array"):
        load_state(path)
    path = tmp_path / "twice.npz"
    with zipfile.ZipFile(path, "w") as z, pytest.warns(UserWarning, match="Duplicate"):
        z.writestr("w.npy", _npy(np.ones(3)))
        z.writestr("w.npy", _npy(np.zeros(3)))
    with pytest.raises(ConversionError, match="two members named 'w.npy'"):
        load_state(path)


def test_corrupt_member_data_is_a_conversion_error(tmp_path):
    path = tmp_path / "crc.npz"
    np.savez(path, w=np.arange(1000, dtype=np.float64))
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF                                     # inside w's data (stored, not deflated)
    path.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="crc.npz"):
        load_state(path)


def test_load_state_round_trip_keeps_dtypes_order_and_layout(tmp_path):
    path = tmp_path / "all.npz"
    state = {"f16": np.arange(6, dtype=np.float16).reshape(2, 3), "big": np.arange(4, dtype=">f4"),
             "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "flag": np.array([True, False]),
             "scalar": np.array(5000, dtype=np.int64), "empty": np.zeros((0, 3), np.float32)}
    np.savez_compressed(path, **state)
    back = load_state(path)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


# ----------------------------------------------------------------------------
# item 13: finding and converting blocks is linear in the number of blocks
# ----------------------------------------------------------------------------

def _calls(fn) -> int:
    """Python and C function calls made by ``fn()`` (a count, not a time)."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_conversion_work_grows_linearly_with_the_number_of_blocks():
    small, large = mobileone_state(40), mobileone_state(160)
    find_small, find_large = (_calls(lambda s=s: find_blocks(s)) for s in (small, large))
    conv_small, conv_large = (_calls(lambda s=s: convert_state(s, check=False)) for s in (small, large))
    # 4x the blocks: 4x the work plus a constant, not 16x
    assert find_large <= 4.4 * find_small
    assert conv_large <= 4.4 * conv_small


# ----------------------------------------------------------------------------
# item 16: float16 weights are checked at the float16 tolerance, and the report says so
# ----------------------------------------------------------------------------

def test_float16_state_is_checked_at_the_float16_tolerance():
    state = repvgg_state(2, dtype=np.float16, seed=3)
    out, report = convert_state(state)
    assert out["stages.0.reparam_conv.weight"].dtype == np.float16
    assert report.passed and report.check["tol"] == tolerance.FLOAT16
    assert report.check["max_error"] > tolerance.NETWORK       # the float16 rounding the old rule failed
    assert any("float16" in m and "0.01" in m for m in report.messages)
    result = check_state(state, out)
    assert result["passed"] and result["tol"] == tolerance.FLOAT16 and "float16" in result["messages"][0]


def test_float16_tolerance_is_a_floor_and_float32_is_unchanged():
    state = repvgg_state(1, dtype=np.float16, seed=3)
    _, report = convert_state(state, tol=0.5)
    assert report.check["tol"] == 0.5 and not any("float16" in m for m in report.messages)
    _, report = convert_state(repvgg_state(1))
    assert report.check["tol"] == tolerance.NETWORK and not any("float16" in m for m in report.messages)
