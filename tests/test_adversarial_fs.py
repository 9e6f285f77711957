"""Adversarial suite (issue 12), the file system and signals: the README's write promises
under races, links, FIFOs and SIGINT/SIGTERM, and a memory bound.

Promises (README, "The command line"): ``repnp convert`` writes through a temp file and a
rename, never writes to IN, replaces an existing OUT only with ``--force``; exit 2 on bad
input with one line on stderr and no traceback; after SIGINT / SIGTERM exit 130 / 143
with one line on stderr, no temp file left and OUT not written.

Races are made deterministic by wrapping the writer callback that
:func:`repnp.io.atomic.write_atomically` is given (wherever a module imported it by name),
so that the test acts while the temp file is half written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import onnx
import pytest
from adversarial_helpers import DATA, ROOT, assert_one_line_error, run_cli, run_subprocess, sha, temp_files

import repnp.io.atomic as atomic

SMALL_ONNX = DATA / "onnx" / "off_repvgg_ident_c10" / "train.onnx"
SMALL_NPZ = DATA / "state" / "off_repvgg_ident_c10" / "train_state.npz"

FS_ITEMS = "issue 12 file-system/signal items (5/6/7/14/18/21/22)"


def _copy(src: Path, folder: Path, name: str | None = None) -> Path:
    dst = folder / (name or src.name)
    dst.write_bytes(src.read_bytes())
    return dst


def _writer_modules():
    """Every module that holds a reference to ``write_atomically`` (imported by name)."""
    import repnp.io.npz.archive as archive
    import repnp.io.onnx.write as owrite

    return [m for m in (atomic, owrite, archive) if hasattr(m, "write_atomically")]


def _wrap_writer(monkeypatch, during_write):
    """Make ``write_atomically`` call ``during_write(path)`` after the first bytes of the temp
    file are written and before the rest."""
    original = atomic.write_atomically

    def wrapped(path, write, *args, **kwargs):
        def writer(handle):
            handle.write(b"")
            handle.flush()
            during_write(Path(path))
            write(handle)
        return original(path, writer, *args, **kwargs)

    for module in _writer_modules():
        monkeypatch.setattr(module, "write_atomically", wrapped)


def _valid_onnx(path: Path) -> None:
    onnx.checker.check_model(onnx.load(str(path)))


# ----------------------------------------------------------------------------
# existing OUT, links
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("src", [SMALL_ONNX, SMALL_NPZ], ids=["onnx", "npz"])
def test_existing_out_needs_force(capsys, tmp_path, src):
    inp = _copy(src, tmp_path)
    out = tmp_path / f"out{src.suffix}"
    out.write_bytes(b"the user's own file")
    code, _, err = run_cli(capsys, "convert", inp, out)
    assert code == 2
    assert_one_line_error(err)
    assert out.read_bytes() == b"the user's own file"
    assert sha(inp) == sha(src) and temp_files(tmp_path) == []
    code, _, err = run_cli(capsys, "convert", inp, out, "--force")
    assert code == 0, err
    assert out.read_bytes() != b"the user's own file" and temp_files(tmp_path) == []


def test_dangling_symlink_out_is_refused_without_force(capsys, tmp_path):
    inp = _copy(SMALL_ONNX, tmp_path)
    out = tmp_path / "out.onnx"
    out.symlink_to(tmp_path / "nowhere.onnx")
    code, _, err = run_cli(capsys, "convert", inp, out)
    assert code == 2
    assert_one_line_error(err)
    assert out.is_symlink() and not (tmp_path / "nowhere.onnx").exists()
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
@pytest.mark.parametrize("src", [SMALL_ONNX, SMALL_NPZ], ids=["onnx", "npz"])
def test_out_is_in_through_a_link_is_refused_even_with_force(capsys, tmp_path, link, src):
    inp = _copy(src, tmp_path)
    out = tmp_path / f"alias{src.suffix}"
    if link == "symlink":
        out.symlink_to(inp)
    else:
        os.link(inp, out)
    code, _, err = run_cli(capsys, "convert", inp, out, "--force")
    assert code == 2
    assert_one_line_error(err)
    assert sha(inp) == sha(src) and temp_files(tmp_path) == []
    assert out.is_symlink() if link == "symlink" else os.path.samefile(inp, out)


# ----------------------------------------------------------------------------
# races
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("src", [SMALL_ONNX, SMALL_NPZ], ids=["onnx", "npz"])
def test_out_appearing_mid_write_is_not_replaced(capsys, tmp_path, monkeypatch, src):
    inp = _copy(src, tmp_path)
    out = tmp_path / f"out{src.suffix}"

    def someone_else_writes(path):
        path.write_bytes(b"written by another program meanwhile")

    _wrap_writer(monkeypatch, someone_else_writes)
    code, _, err = run_cli(capsys, "convert", inp, out)
    assert out.read_bytes() == b"written by another program meanwhile"
    assert code == 2
    assert_one_line_error(err)
    assert sha(inp) == sha(src) and temp_files(tmp_path) == []


def test_two_concurrent_converts_to_one_out(tmp_path, monkeypatch):
    """Both conversions are held inside their writes at once (a barrier in the writer), the
    worst interleaving; at most one may succeed, the other exits 2, OUT is one valid model."""
    from repnp import cli

    inp = _copy(SMALL_ONNX, tmp_path)
    out = tmp_path / "out.onnx"
    barrier = threading.Barrier(2, timeout=5)

    def meet(_path):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:   # the other was refused before writing: fine
            pass

    _wrap_writer(monkeypatch, meet)
    codes = []

    def convert():
        codes.append(cli.main(["convert", str(inp), str(out)]))

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(codes) == [0, 2], codes
    _valid_onnx(out)
    assert sha(inp) == sha(SMALL_ONNX) and temp_files(tmp_path) == []


def test_two_concurrent_subprocess_converts(tmp_path):
    """Two real ``repnp convert`` to one OUT started together: whatever the interleaving,
    no traceback, exit 0 or 2, at least one succeeds, OUT is one complete valid model."""
    inp = _copy(SMALL_ONNX, tmp_path)
    out = tmp_path / "out.onnx"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "repnp", "convert", str(inp), str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    for code, err in results:
        assert code in (0, 2), err
        if code == 2:
            assert_one_line_error(err)
    assert 0 in [c for c, _ in results]
    _valid_onnx(out)
    assert sha(inp) == sha(SMALL_ONNX) and temp_files(tmp_path) == []


# ----------------------------------------------------------------------------
# a FIFO as IN
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".onnx"])
def test_fifo_input_exits_2_quickly(tmp_path, suffix):
    fifo = tmp_path / f"in{suffix}"
    os.mkfifo(fifo)
    try:
        res = run_subprocess("convert", fifo, tmp_path / f"out{suffix}", timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("repnp convert on a FIFO did not return within 20 s")
    assert res.returncode == 2
    assert_one_line_error(res.stderr)
    assert sorted(os.listdir(tmp_path)) == [fifo.name]


# ----------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------

_DRIVER = textwrap.dedent("""
    # Runs ``python -m repnp`` (runpy, as the interpreter would) after marking two moments
    # with files: ``<mark>.imported`` once repnp is imported, ``<mark>.writing`` once the temp
    # file of OUT holds its first bytes (then the write waits, so that a signal lands mid-write).
    import os, runpy, sys, time
    mark = os.environ["REPNP_TEST_MARK"]
    import repnp.io.atomic as atomic
    import repnp.io.onnx.write as owrite
    original = atomic.write_atomically

    def wrapped(path, write, *args, **kwargs):
        def writer(handle):
            handle.write(b"\\x08")
            handle.flush()
            open(mark + ".writing", "w").close()
            time.sleep(60)
            write(handle)
        return original(path, writer, *args, **kwargs)

    atomic.write_atomically = owrite.write_atomically = wrapped
    open(mark + ".imported", "w").close()
    sys.argv = ["repnp"] + sys.argv[1:]
    runpy.run_module("repnp", run_name="__main__", alter_sys=True)
""")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """RepVGG-A0 exported at 1x3x64x64 (36 MB, about 3 s to convert with its check)."""
    from repnp import models
    from repnp.io import export_onnx

    path = tmp_path_factory.mktemp("big") / "repvgg_a0.onnx"
    export_onnx(models.create("repvgg_a0"), path, input_shape=(1, 3, 64, 64))
    return path


def _wait_for(path: Path, proc, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("signame, when, expected", [("SIGTERM", "writing", 143), ("SIGINT", "converting", 130)])
def test_signal_during_convert(tmp_path, big_model, signame, when, expected):
    work = tmp_path / "work"
    work.mkdir()
    inp = work / "in.onnx"
    shutil.copyfile(big_model, inp)
    before = sha(inp)
    out = work / "out.onnx"
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    mark = str(tmp_path / "mark")
    env = dict(os.environ, PYTHONPATH=str(ROOT), REPNP_TEST_MARK=mark)
    proc = subprocess.Popen([sys.executable, str(driver), "convert", str(inp), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert _wait_for(Path(mark + ".imported"), proc, 60), proc.communicate()[1]
        if when == "writing":
            assert _wait_for(Path(mark + ".writing"), proc, 120), proc.communicate()[1]
            assert temp_files(work), "the write started but no temp file is there"
        else:
            time.sleep(1.0)          # imports done, the conversion takes seconds more
            assert proc.poll() is None
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert temp_files(work) == [], "temp file left after a handled signal"
    assert not out.exists()
    assert sha(inp) == before
    assert proc.returncode == expected, (proc.returncode, err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("repnp:"), err


# ----------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------

_MEMORY = textwrap.dedent("""
    import sys

    def hwm_kb():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

    import numpy, onnx, onnxruntime  # noqa: F401  (libraries loaded before the baseline)
    from repnp import cli
    import repnp.io.onnx.convert, repnp.io.npz.convert  # noqa: F401
    base = hwm_kb()
    code = cli.main(sys.argv[1:])
    print("GROWTH_KB", hwm_kb() - base, "CODE", code)
""")

#: Bound on the peak resident memory growth of converting a small (<= 1 MB) model.
MEMORY_BOUND_MB = 300


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("src", [SMALL_ONNX, SMALL_NPZ], ids=["onnx", "npz"])
def test_small_model_memory_bound(tmp_path, src):
    """Converting a model of at most 1 MB (with its numeric check) raises the process's
    peak RSS (VmHWM, measured in a fresh subprocess, libraries imported before the
    baseline) by less than 300 MB (``MEMORY_BOUND_MB``)."""
    assert src.stat().st_size <= 1 << 20
    inp = _copy(src, tmp_path)
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(script), "convert", str(inp), str(tmp_path / f"out{src.suffix}")],
                         capture_output=True, text=True, timeout=120, env=env)
    line = [x for x in res.stdout.splitlines() if x.startswith("GROWTH_KB")]
    assert line, res.stderr
    growth_kb, code = int(line[0].split()[1]), int(line[0].split()[3])
    assert code == 0, res.stderr
    assert growth_kb < MEMORY_BOUND_MB * 1024, f"peak RSS grew by {growth_kb / 1024:.0f} MB"
