"""Files under adverse conditions (issue 12): an OUT that appears during the write, OUT =
one of IN's external-data files, dangling symlinks, FIFOs, pipes and devices as IN, long
OUT names, usage errors, SIGINT/SIGTERM during the write.

Every test here failed on the code before the fix (a hang is caught by a subprocess
timeout, never waited for in-process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import onnx
import pytest
from test_cli import _assert_one_line_error, _run, _sha

import repnp.io.npz.archive as archive
from repnp import cli
from repnp.blocks import RepVGGBlock
from repnp.errors import ConversionError
from repnp.io import export_onnx, load_onnx, save_onnx
from repnp.io.atomic import write_atomically
from repnp.io.npz import load_state, save_state

DATA = Path(__file__).parent / "data"
ONNX_REPVGG = DATA / "onnx" / "off_repvgg_ident_c10" / "train.onnx"
STATE_REPVGG = DATA / "state" / "off_repvgg_ident_c10" / "train_state.npz"
ROOT = Path(__file__).resolve().parent.parent

posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, /dev/zero and signals are POSIX")


def _subprocess(argv, *, timeout=60, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "repnp", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


# ----------------------------------------------------------------------------
# item 5: OUT appearing between the up-front check and the final rename
# ----------------------------------------------------------------------------

def _appearing_writer(monkeypatch, module, content=b"the user's file"):
    """Make ``module.write_atomically`` create the target while the temp file is written."""
    original = module.write_atomically

    def racing(path, write, **kw):
        def write_and_race(handle):
            write(handle)
            Path(path).write_bytes(content)
        return original(path, write_and_race, **kw)

    monkeypatch.setattr(module, "write_atomically", racing)
    return content


def test_write_atomically_without_replace_never_replaces(tmp_path):
    target = tmp_path / "out.bin"

    def write(handle):
        handle.write(b"ours")
        target.write_bytes(b"theirs")

    with pytest.raises(ConversionError, match="appeared while it was being written"):
        write_atomically(target, write, replace=False)
    assert target.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["out.bin"]
    write_atomically(tmp_path / "new.bin", lambda h: h.write(b"x"), replace=False)
    assert (tmp_path / "new.bin").read_bytes() == b"x"


def test_cli_npz_output_appearing_during_the_write_is_kept(capsys, monkeypatch, tmp_path):
    user = _appearing_writer(monkeypatch, archive)
    out = tmp_path / "o.npz"
    code, _, err = _run(capsys, "convert", STATE_REPVGG, out)
    assert code == 2
    _assert_one_line_error(err, "appeared")
    assert out.read_bytes() == user
    assert os.listdir(tmp_path) == ["o.npz"]


def test_cli_onnx_output_appearing_during_the_write_is_kept(capsys, monkeypatch, tmp_path):
    import repnp.io.onnx.write as write_module

    user = _appearing_writer(monkeypatch, write_module)
    out = tmp_path / "o.onnx"
    code, _, err = _run(capsys, "convert", ONNX_REPVGG, out)
    assert code == 2
    _assert_one_line_error(err, "appeared")
    assert out.read_bytes() == user
    assert os.listdir(tmp_path) == ["o.onnx"]


def test_force_still_replaces_at_the_final_step(capsys, monkeypatch, tmp_path):
    _appearing_writer(monkeypatch, archive)
    out = tmp_path / "o.npz"
    code, _, _ = _run(capsys, "convert", "--force", STATE_REPVGG, out)
    assert code == 0
    assert load_state(out)
    assert os.listdir(tmp_path) == ["o.npz"]


def test_two_simultaneous_converts_one_wins(tmp_path):
    """Both pass the up-front check; the final no-replace move lets only one through."""
    out = tmp_path / "o.npz"
    gate = threading.Barrier(2, timeout=30)
    original = archive.write_atomically
    results = []

    def both_write(path, write, **kw):
        def wait_then_write(handle):
            write(handle)
            gate.wait()           # both temp files complete before either moves
        return original(path, wait_then_write, **kw)

    def convert():
        state = load_state(STATE_REPVGG)
        try:
            save_state(state, out, source=STATE_REPVGG)
            results.append("written")
        except ConversionError as exc:
            results.append(str(exc))

    archive.write_atomically = both_write
    try:
        threads = [threading.Thread(target=convert) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        archive.write_atomically = original
    assert sorted(results)[1] == "written" and "appeared" in sorted(results)[0], results
    assert os.listdir(tmp_path) == ["o.npz"]


# ----------------------------------------------------------------------------
# item 6: OUT = one of IN's external-data files
# ----------------------------------------------------------------------------

def _model_with_external_data(folder: Path) -> tuple[Path, Path]:
    src = export_onnx(RepVGGBlock.random(0, 4, 4), folder / "plain.onnx", input_shape=(1, 4, 6, 6))
    model = onnx.load(str(src))
    path, data = folder / "model.onnx", folder / "weights.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=0)
    os.unlink(src)
    return path, data


def test_cli_refuses_to_write_over_an_external_data_file(capsys, tmp_path):
    model, data = _model_with_external_data(tmp_path)
    before = _sha(data)
    code, _, err = _run(capsys, "convert", "--force", model, data)
    assert code == 2
    _assert_one_line_error(err, "external data", "weights.onnx")
    assert _sha(data) == before
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "weights.onnx"]
    # the model still loads, and another OUT is fine
    load_onnx(model)
    code, _, _ = _run(capsys, "convert", "--force", model, tmp_path / "deploy.onnx")
    assert code == 0


def test_save_onnx_refuses_an_external_data_file_of_the_source(tmp_path):
    model, data = _model_with_external_data(tmp_path)
    before = _sha(data)
    loaded = load_onnx(model)
    link = tmp_path / "alias.onnx"
    link.symlink_to(data.name)
    (tmp_path / "sub").mkdir()
    for target in (data, link, tmp_path / "sub" / ".." / "weights.onnx"):
        with pytest.raises(ConversionError, match="external data"):
            save_onnx(loaded, target, force=True, source=model)
    assert _sha(data) == before


# ----------------------------------------------------------------------------
# item 7: dangling symlink at OUT
# ----------------------------------------------------------------------------

def test_dangling_symlink_output_needs_force(capsys, tmp_path):
    out = tmp_path / "o.npz"
    out.symlink_to(tmp_path / "nowhere.npz")
    code, _, err = _run(capsys, "convert", STATE_REPVGG, out)
    assert code == 2
    _assert_one_line_error(err, "dangling symlink", "--force")
    assert out.is_symlink() and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["o.npz"]
    with pytest.raises(ConversionError, match="dangling"):
        save_state(load_state(STATE_REPVGG), out)
    code, _, _ = _run(capsys, "convert", "--force", STATE_REPVGG, out)
    assert code == 0
    assert not out.is_symlink() and load_state(out)
    assert not (tmp_path / "nowhere.npz").exists()      # the link was replaced, not followed


# ----------------------------------------------------------------------------
# item 14: regular files only
# ----------------------------------------------------------------------------

def _run_with_fifo(capsys, fifo: Path, *argv):
    """``cli.main(argv)`` in a thread; if it blocks on ``fifo`` (the bug), unblock it by
    opening and closing the writing end, and fail."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=cli.main([str(a) for a in argv])), daemon=True)
    worker.start()
    worker.join(30)
    blocked = worker.is_alive()
    if blocked:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))   # the reader sees end of file
        worker.join(30)
    out, err = capsys.readouterr()
    assert not blocked, "blocked on a FIFO without a writer"
    return result.get("code"), out, err


@posix_only
@pytest.mark.parametrize("name", ["in.onnx", "in.npz", "in"])
def test_fifo_without_writer_is_refused_not_waited_on(capsys, tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    out = tmp_path / ("o" + (Path(name).suffix or ".onnx"))
    code, _, err = _run_with_fifo(capsys, fifo, "convert", fifo, out)
    assert code == 2
    _assert_one_line_error(err, "FIFO or pipe", "regular files")
    assert sorted(os.listdir(tmp_path)) == [name]


@posix_only
def test_pipe_is_refused_not_half_read(capsys, tmp_path):
    """``repnp convert <(cat in.onnx) out.onnx``: refused as a pipe, not 'not an ONNX model'."""
    read_fd, write_fd = os.pipe()
    data = ONNX_REPVGG.read_bytes()

    def feed():
        try:
            os.write(write_fd, data[:16384])       # fits the pipe's buffer: never blocks
        finally:
            os.close(write_fd)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        code, _, err = _run(capsys, "convert", f"/dev/fd/{read_fd}", tmp_path / "o.onnx")
    finally:
        feeder.join(10)
        os.close(read_fd)
    assert code == 2
    _assert_one_line_error(err, "FIFO or pipe")
    assert "not an ONNX model" not in err
    assert os.listdir(tmp_path) == []


@posix_only
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_symlink_to_a_device_is_refused(capsys, tmp_path):
    link = tmp_path / "z.npz"                     # numpy gives up on zeros quickly: in-process
    link.symlink_to("/dev/zero")
    code, _, err = _run(capsys, "inspect", link)
    assert code == 2
    _assert_one_line_error(err, "device", "regular files")
    link = tmp_path / "z.onnx"                    # the ONNX loader read it all: in a subprocess
    link.symlink_to("/dev/zero")

    def limit_memory():                 # before the fix, /dev/zero was read until memory ran out
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    res = _subprocess(["inspect", link], preexec_fn=limit_memory)
    assert res.returncode == 2, res.stderr
    _assert_one_line_error(res.stderr, "device", "regular files")


def test_open_regular_refuses_folders_and_missing_files(tmp_path):
    from repnp.io.atomic import open_regular

    with pytest.raises(ConversionError, match="folder"):
        open_regular(tmp_path)
    with pytest.raises(ConversionError, match="cannot read"):
        open_regular(tmp_path / "missing.onnx")
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "l").symlink_to("f")
    with open_regular(tmp_path / "l") as fh:
        assert fh.read() == b"abc"


@posix_only
def test_verify_input_fifo_is_refused(capsys, tmp_path):
    fifo = tmp_path / "x.npy"
    os.mkfifo(fifo)
    code, _, err = _run_with_fifo(capsys, fifo, "verify", ONNX_REPVGG, ONNX_REPVGG, "--input", fifo)
    assert code == 2
    _assert_one_line_error(err, "--input", "FIFO or pipe")


# ----------------------------------------------------------------------------
# item 18: a long (valid) OUT name
# ----------------------------------------------------------------------------

def test_long_output_name_is_written(capsys, tmp_path):
    seen = []
    original = archive.write_atomically

    out = tmp_path / ("a" * 246 + ".npz")            # 250 characters: valid on common file systems
    try:
        out.write_bytes(b"")
        out.unlink()
    except OSError:
        pytest.skip("the file system refuses 250-character names")

    def spy(path, write, **kw):
        def write_and_look(handle):
            seen.extend(p for p in os.listdir(tmp_path) if p != out.name)
            write(handle)
        return original(path, write_and_look, **kw)

    archive.write_atomically = spy
    try:
        code, _, err = _run(capsys, "convert", STATE_REPVGG, out)
    finally:
        archive.write_atomically = original
    assert code == 0, err
    assert load_state(out)
    assert os.listdir(tmp_path) == [out.name]
    assert len(seen) == 1 and len(seen[0]) <= 32 and seen[0].endswith(".tmp"), seen


# ----------------------------------------------------------------------------
# item 21: usage errors on one line
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["convert"], ["convert", "a.onnx"], ["convert", "a.onnx", "b.onnx", "--nope"],
                                  ["nonsense"], ["convert", "a.onnx", "b.onnx", "--tol", "x"],
                                  ["verify", "a.onnx", "b.onnx", "--seed", "1.5"]])
def test_usage_errors_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_one_line_error(err, "--help")


def test_usage_error_in_a_real_subprocess_and_help_unchanged(capsys):
    res = _subprocess(["convert", "only-one.onnx"])
    assert res.returncode == 2 and res.stdout == ""
    _assert_one_line_error(res.stderr, "OUT")
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "--help"])
    out, err = capsys.readouterr()
    assert exc.value.code == 0 and err == ""
    assert out.startswith("usage: repnp convert") and "--force" in out


# ----------------------------------------------------------------------------
# item 22: SIGINT / SIGTERM during the write
# ----------------------------------------------------------------------------

_SLOW_DRIVER = """
import sys, time
import repnp.io.npz.archive as archive
from repnp import cli

original = archive.write_atomically

def slow(path, write, **kw):
    def write_slowly(handle):
        write(handle)
        handle.flush()
        print("writing", flush=True)      # the temp file exists now
        time.sleep(60)
    return original(path, write_slowly, **kw)

archive.write_atomically = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@posix_only
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_the_write_removes_the_temp_file(tmp_path, sig, code):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_DRIVER, "convert", str(STATE_REPVGG), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "writing\n"
        temps = os.listdir(out_dir)
        assert len(temps) == 1 and temps[0].endswith(".tmp")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert err.count("\n") == 1 and err.startswith("repnp: interrupted by "), err
    assert "Traceback" not in err
    assert os.listdir(out_dir) == []
