"""repnp.io.atomic: the target is the old file or the complete new one, never half of it."""

import os

import pytest

from repnp.errors import ConversionError
from repnp.io.atomic import check_output_path, write_atomically


def test_write_then_replace(tmp_path):
    target = tmp_path / "out.bin"
    write_atomically(target, lambda fh: fh.write(b"one"))
    write_atomically(target, lambda fh: fh.write(b"two"))
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_failure_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_fail(fh):
        fh.write(b"ne")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_check_output_path(tmp_path):
    src = tmp_path / "in.npz"
    src.write_bytes(b"x")
    out = tmp_path / "out.npz"
    assert check_output_path(out, source=src) == out
    out.write_bytes(b"y")
    with pytest.raises(ConversionError, match="exists"):
        check_output_path(out, source=src)
    assert check_output_path(out, force=True, source=src) == out
    with pytest.raises(ConversionError, match="input file"):
        check_output_path(tmp_path / "sub" / ".." / "in.npz", force=True, source=src)
