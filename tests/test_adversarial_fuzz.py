"""Adversarial suite (issue 12), damaged files: seeded bit flips and truncations.

The real exports of ``tests/data/onnx/*/train*.onnx`` and state dicts of
``tests/data/state/*/train_state.npz`` (see their README) are damaged in a seeded,
bounded way (``N_CASES`` cases, each a fixed seed: the same bytes in every run) and
fed to ``repnp convert``, ``repnp inspect`` and ``repnp verify`` through
:func:`repnp.cli.main` in-process; a few run as real ``python -m repnp`` subprocesses,
which also catch tracebacks printed by the interpreter.

Every run asserts the README's promises:

* the exit code is 0, 1 or 2 (``inspect``: 0 or 2);
* exit 2: stderr is exactly one line, ``repnp: error: ...``, without "Traceback";
* exit 0 from ``convert``: OUT exists and is right (ONNX: ``repnp verify IN OUT`` exits 0;
  npz: :func:`repnp.io.check_state` passes); exit 1: nothing written;
* IN's bytes are unchanged and no temp file is left in the folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from adversarial_helpers import DATA, assert_one_line_error, run_cli, run_subprocess, sha, temp_files

ONNX_FILES = sorted((DATA / "onnx").glob("*/train*.onnx"))
NPZ_FILES = sorted((DATA / "state").glob("*/train_state.npz"))

#: Cases per format and damage kind: 2 x (6 + 4 + 10) = 40 in all (each runs convert, inspect, verify).
N_PER_KIND = {"flip": 6, "trunc": 4, "weights": 6, "special": 4}

#: What "special" writes into one weight value, by case index.
SPECIAL = [np.nan, np.inf, -3e38, 3e38]


def _flip_bits(buf: bytearray, rng, start: int, stop: int) -> None:
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(start, stop))
        buf[pos] ^= 1 << int(rng.integers(0, 8))


def _damage_weights(src: Path, rng, special=None) -> bytes:
    """Bit flips inside the float data of one weight tensor only (or, with ``special``,
    that value written over one element): the file still parses, and the numbers (huge,
    denormal, inf or NaN) reach the numeric path and its check."""
    if src.suffix == ".onnx":
        import onnx

        data = bytearray(src.read_bytes())
        model = onnx.load_from_string(bytes(data))
        raws = [t for t in model.graph.initializer if len(t.raw_data) >= 16 and t.data_type == 1]
        tensor = raws[int(rng.integers(0, len(raws)))]
        raw = tensor.raw_data
        start = bytes(data).find(raw)
        assert start >= 0
        if special is None:
            _flip_bits(data, rng, start, start + len(raw))
        else:
            pos = start + 4 * int(rng.integers(0, len(raw) // 4))
            data[pos:pos + 4] = np.array(special, dtype="<f4").tobytes()
        return bytes(data)
    import io

    with np.load(src, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    floats = sorted(k for k, v in state.items() if v.dtype.kind == "f" and v.size >= 4)
    key = floats[int(rng.integers(0, len(floats)))]
    if special is None:
        buf = bytearray(state[key].tobytes())
        _flip_bits(buf, rng, 0, len(buf))
        state[key] = np.frombuffer(bytes(buf), dtype=state[key].dtype).reshape(state[key].shape)
    else:
        state[key] = state[key].copy()
        state[key].flat[int(rng.integers(0, state[key].size))] = special
    out = io.BytesIO()
    np.savez(out, **state)
    return out.getvalue()


def _damage(src: Path, kind: str, seed: int) -> bytes:
    """``kind`` "flip": 1-8 bit flips, half of the time within the first 512 bytes (headers,
    graph structure, zip local headers), else anywhere; "trunc": cut at a random length;
    "weights": flips inside one weight tensor's data (the file stays well-formed);
    "special": one weight value set to NaN, inf or +-3e38 (float32 overflows once scaled)."""
    rng = np.random.default_rng(seed)
    if kind == "weights":
        return _damage_weights(src, rng)
    if kind == "special":
        return _damage_weights(src, rng, SPECIAL[seed % len(SPECIAL)])
    data = src.read_bytes()
    if kind == "trunc":
        return data[:int(rng.integers(0, len(data)))]
    buf = bytearray(data)
    _flip_bits(buf, rng, 0, min(len(buf), 512) if rng.random() < 0.5 else len(buf))
    return bytes(buf)


def _cases():
    out = []
    for fmt, files in (("onnx", ONNX_FILES), ("npz", NPZ_FILES)):
        for k, kind in enumerate(N_PER_KIND):
            for i in range(N_PER_KIND[kind]):
                seed = 1000 * (fmt == "npz") + 100 * k + i
                src = files[(seed * 7) % len(files)]
                short = f"{fmt}-{kind}-{i}"
                out.append(pytest.param(fmt, kind, seed, src, id=f"{short}-{src.parent.name}"))
    return out


def _make_case(tmp_path: Path, kind: str, seed: int, src: Path) -> Path:
    damaged = tmp_path / src.name
    damaged.write_bytes(_damage(src, kind, seed))
    return damaged


def _check_result(code, err, *, allowed=(0, 1, 2), convert=False):
    assert code in allowed, (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        assert_one_line_error(err)
    if code == 1 and convert:
        # convert's exit 1 says why on one line; verify's says "DIFFERENT" on stdout.
        assert_one_line_error(err, prefix="repnp: check failed:")
    if code in (0, 1) and not convert:
        assert err == "", err


def _assert_converted_right(capsys, fmt, src_path: Path, out: Path):
    if fmt == "onnx":
        code, _, err = run_cli(capsys, "verify", src_path, out)
        assert code == 0, f"convert exited 0 but verify IN OUT exits {code}: {err}"
    else:
        from repnp.io import check_state, load_state

        assert check_state(load_state(src_path), load_state(out))["passed"]


def test_the_corpus_is_there():
    assert len(ONNX_FILES) >= 16 and len(NPZ_FILES) >= 16


@pytest.mark.parametrize("fmt, kind, seed, src", _cases())
def test_damaged_file_cli(capsys, tmp_path, fmt, kind, seed, src):
    damaged = _make_case(tmp_path, kind, seed, src)
    before = sha(damaged)
    out = tmp_path / f"out.{fmt}"

    code, _, err = run_cli(capsys, "convert", damaged, out)
    _check_result(code, err, convert=True)
    if code == 0:
        assert out.exists()
        _assert_converted_right(capsys, fmt, damaged, out)
        out.unlink()
    else:
        assert not out.exists(), f"exit {code} but {out.name} was written"
    assert sha(damaged) == before and temp_files(tmp_path) == []

    code, _, err = run_cli(capsys, "inspect", damaged)
    _check_result(code, err, allowed=(0, 2))
    assert sha(damaged) == before

    # verify: the damaged model against the intact one (an .npz is refused, exit 2).
    code, _, err = run_cli(capsys, "verify", damaged, src)
    _check_result(code, err)
    assert sha(damaged) == before and temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [damaged.name]


# A handful as real subprocesses: what the interpreter itself would print is seen too.
_SUBPROCESS_CASES = [c for i, c in enumerate(_cases()) if i % 13 == 1][:3] + \
    [c for c in _cases() if c.id.startswith("npz-weights-5-")]


@pytest.mark.parametrize("fmt, kind, seed, src", _SUBPROCESS_CASES)
def test_damaged_file_subprocess(tmp_path, fmt, kind, seed, src):
    damaged = _make_case(tmp_path, kind, seed, src)
    before = sha(damaged)
    out = tmp_path / f"out.{fmt}"
    res = run_subprocess("convert", damaged, out, timeout=120)
    _check_result(res.returncode, res.stderr, convert=True)
    assert (res.returncode == 0) == out.exists()
    assert sha(damaged) == before and temp_files(tmp_path) == []


def test_intact_files_convert(capsys, tmp_path):
    """The undamaged corpus converts (so that the fuzz cases above start from good files)."""
    for src in (ONNX_FILES[0], NPZ_FILES[0]):
        dst = tmp_path / src.suffix[1:]
        dst.mkdir()
        shutil.copy(src, dst / src.name)
        out = dst / f"out{src.suffix}"
        code, _, err = run_cli(capsys, "convert", dst / src.name, out)
        assert code == 0, err
        _assert_converted_right(capsys, src.suffix[1:], dst / src.name, out)
