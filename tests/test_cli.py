"""The ``repnp`` CLI: convert, inspect, verify — run in-process through ``repnp.cli.main``.

Test data: the real PyTorch exports and state dicts of ``tests/data/onnx`` and
``tests/data/state`` (see their README), and models built here with
:func:`repnp.io.export_onnx`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from repnp import cli, models
from repnp.blocks import RepVGGBlock
from repnp.io import export_onnx

DATA = Path(__file__).parent / "data"
ONNX_DBB = DATA / "onnx" / "off_dbb_k3_c12"
ONNX_REPVGG = DATA / "onnx" / "off_repvgg_ident_c10"
STATE_DBB = DATA / "state" / "off_dbb_k3_c12"
STATE_REPVGG = DATA / "state" / "off_repvgg_ident_c10"


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(err: str, *words):
    assert err.startswith("repnp: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


# ----------------------------------------------------------------------------
# help, version
# ----------------------------------------------------------------------------

def test_help_in_a_real_subprocess():
    res = subprocess.run([sys.executable, "-m", "repnp", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for word in ("convert", "inspect", "verify", "demo"):
        assert word in res.stdout


def test_bad_input_in_a_real_subprocess(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    res = subprocess.run([sys.executable, "-m", "repnp", "convert", str(bad), str(tmp_path / "o.onnx")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("repnp: error: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.onnx"]


def test_version_and_no_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("repnp ")
    assert cli.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# convert: ONNX
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["train.onnx", "train_keepbn.onnx"])
def test_convert_onnx_example(capsys, tmp_path, name):
    src = ONNX_DBB / name
    before = _sha(src)
    out = tmp_path / "fused.onnx"
    code, stdout, err = _run(capsys, "convert", src, out)
    assert code == 0, err
    assert _sha(src) == before
    fused = onnx.load(out)
    onnx.checker.check_model(fused, full_check=True)
    ops = Counter(n.op_type for n in fused.graph.node)
    deploy = Counter(n.op_type for n in onnx.load(ONNX_DBB / "deploy.onnx").graph.node)
    assert all(ops[k] <= deploy[k] for k in ops) and ops["Conv"] == 1
    # the table: operators by type, parameters, file size, verified error
    assert "ScatterND" in stdout and "parameters" in stdout and "file size (bytes)" in stdout
    assert "numeric check (onnxruntime" in stdout and "passed" in stdout


def test_convert_onnx_json_and_output_equals_torch(capsys, tmp_path):
    out = tmp_path / "fused.onnx"
    code, stdout, _ = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", out, "--json")
    assert code == 0
    report = json.loads(stdout)               # only JSON on stdout
    assert report["written"] is True and report["kind"] == "onnx"
    assert report["check"]["passed"] and report["check"]["max_error"] <= 1e-5
    assert report["counts_after"] == {"Conv": 1, "Relu": 1}
    assert report["bytes_before"] == os.path.getsize(ONNX_REPVGG / "train.onnx")
    assert report["bytes_after"] == os.path.getsize(out)
    import onnxruntime as ort

    x, y = np.load(ONNX_REPVGG / "input.npy"), np.load(ONNX_REPVGG / "output.npy")
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.max(np.abs(got - y)) / np.max(np.abs(y)) <= 1e-5


def test_convert_exported_network_with_input_shape(capsys, tmp_path):
    net = models.create("repvgg_a0", num_classes=10)
    src = export_onnx(net, tmp_path / "a0.onnx", input_shape=(1, 3, 32, 32))
    code, stdout, err = _run(capsys, "convert", src, tmp_path / "a0_fused.onnx", "--input-shape", "1,3,32,32",
                             "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["counts_after"] == {"Conv": 22, "Relu": 22, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert report["check"]["input_shapes"] == {"input": [1, 3, 32, 32]}
    assert report["check"]["max_error"] <= 1e-4


def test_convert_check_failure_exits_1_and_writes_nothing(capsys, tmp_path):
    # tol 0 asks for bit-identical outputs; the fused conv rounds differently (measured ~3e-7)
    out = tmp_path / "fused.onnx"
    code, stdout, err = _run(capsys, "convert", ONNX_DBB / "train.onnx", out, "--tol", "0")
    assert code == 1
    assert "check failed" in err and "nothing written" in err and err.count("\n") == 1
    assert "FAILED" in stdout
    assert not out.exists() and os.listdir(tmp_path) == []


def test_convert_no_check(capsys, tmp_path):
    code, stdout, _ = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", tmp_path / "o.onnx", "--no-check",
                           "--tol", "0", "--json")
    assert code == 0
    assert json.loads(stdout)["check"] is None


# ----------------------------------------------------------------------------
# convert: .npz
# ----------------------------------------------------------------------------

STATE_CASES = sorted(p for p in (DATA / "state").iterdir() if (p / "train_state.npz").exists())


@pytest.mark.parametrize("case", STATE_CASES, ids=lambda p: p.name)
def test_convert_state_matches_the_frameworks_deploy_state(capsys, tmp_path, case):
    """Every real state dict of tests/data/state: the CLI's independent check passes and the
    written dict equals the framework's own deploy_state.npz key for key."""
    src = case / "train_state.npz"
    before = _sha(src)
    out = tmp_path / "deploy.npz"
    partition = json.loads((case / "meta.json").read_text()).get("partition")
    extra = ["--partition", ",".join(map(str, partition))] if partition else []
    code, stdout, err = _run(capsys, "convert", src, out, "--json", *extra)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["check"]["passed"] and report["check"]["max_error"] <= 1e-5
    assert None not in report["check"]["per_block"].values()            # every block checked
    assert _sha(src) == before
    got, want = np.load(out, allow_pickle=False), np.load(case / "deploy_state.npz", allow_pickle=False)
    assert set(got.files) == set(want.files)
    for k in want.files:
        b = want[k].astype(np.float64)
        assert np.max(np.abs(got[k] - b)) / max(np.max(np.abs(b)), 1e-30) <= 1e-5, k
    assert report["keys_after"] == len(want.files)


def test_convert_repmlp_state_needs_and_uses_partition(capsys, tmp_path):
    case = DATA / "state" / "off_repmlp_block_c12_h6w7"        # h, w = 6, 7 (meta.json)
    code, _, err = _run(capsys, "convert", case / "train_state.npz", tmp_path / "a.npz")
    assert code == 2
    _assert_one_line_error(err, "partition")
    code, stdout, _ = _run(capsys, "convert", case / "train_state.npz", tmp_path / "b.npz", "--partition", "6,7",
                           "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["check"]["max_error"] <= 1e-5 and None not in report["check"]["per_block"].values()
    got, want = np.load(tmp_path / "b.npz"), np.load(case / "deploy_state.npz")
    assert sorted(got.files) == sorted(want.files)
    for k in want.files:
        assert np.max(np.abs(got[k] - want[k])) / np.max(np.abs(want[k])) <= 1e-5, k
    code, _, err = _run(capsys, "convert", case / "train_state.npz", tmp_path / "c.npz", "--partition", "5,7")
    assert code == 2
    _assert_one_line_error(err, "h*w")


def test_state_check_catches_a_wrong_fusion(capsys, tmp_path, monkeypatch):
    # A converter that writes a wrong kernel must be caught by the check, which runs each block's
    # train form (repnp.ops, the scheme's eps) against the deploy form holding the written arrays.
    import repnp.io.npz.convert as convert_module

    real = convert_module._written

    def wrong(block, deploy, dtype):
        out = real(block, deploy, dtype)
        weight = next(k for k in out if k.endswith("weight"))
        out[weight] = out[weight] * 1.5
        return out

    monkeypatch.setattr(convert_module, "_written", wrong)
    out = tmp_path / "d.npz"
    code, stdout, err = _run(capsys, "convert", STATE_REPVGG / "train_state.npz", out)
    assert code == 1 and "FAILED" in stdout and "nothing written" in err
    assert not out.exists()


def test_onnx_check_catches_a_wrong_conversion(capsys, tmp_path, monkeypatch):
    # A rewrite that writes a wrong kernel must be caught by the converter's numeric check
    # (run inside convert_onnx since the CLI calls it with check=True): CheckFailed -> exit 1.
    import repnp.io.onnx.convert as convert_module

    real = convert_module._rewrite

    def wrong(*args):
        fused, trusted = real(*args)
        conv = next(n for n in fused.graph.node if n.op_type == "Conv")
        init = next(t for t in fused.graph.initializer if t.name == conv.input[1])
        w = onnx.numpy_helper.to_array(init).copy()
        w[0, 0, 0, 0] += 0.1
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        return fused, trusted

    monkeypatch.setattr(convert_module, "_rewrite", wrong)
    out = tmp_path / "o.onnx"
    code, stdout, err = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", out, "--json")
    assert code == 1 and json.loads(stdout)["check"]["max_error"] > 1e-3
    assert json.loads(stdout)["written"] is False and "nothing written" in err
    assert not out.exists()


def test_convert_state_check_failure(capsys, tmp_path):
    out = tmp_path / "deploy.npz"
    code, stdout, err = _run(capsys, "convert", STATE_DBB / "train_state.npz", out, "--tol", "0")
    assert code == 1 and "nothing written" in err
    assert not out.exists()


def test_convert_state_text_table(capsys, tmp_path):
    code, stdout, _ = _run(capsys, "convert", STATE_REPVGG / "train_state.npz", tmp_path / "d.npz")
    assert code == 0
    assert "1 repvgg block(s) fused" in stdout and "keys" in stdout and "file size (bytes)" in stdout
    assert "passed" in stdout


def test_convert_state_wrong_eps_is_caught_by_nothing_but_changes_weights(capsys, tmp_path):
    # --eps is honoured: a different eps gives a different (still self-consistent) deploy dict
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert _run(capsys, "convert", STATE_REPVGG / "train_state.npz", a)[0] == 0
    assert _run(capsys, "convert", STATE_REPVGG / "train_state.npz", b, "--eps", "0.1")[0] == 0
    wa, wb = np.load(a)["rbr_reparam.weight"], np.load(b)["rbr_reparam.weight"]
    assert np.max(np.abs(wa - wb)) > 1e-3


# ----------------------------------------------------------------------------
# output path rules
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("src", [ONNX_REPVGG / "train.onnx", STATE_REPVGG / "train_state.npz"])
def test_existing_output_needs_force(capsys, tmp_path, src):
    out = tmp_path / ("o" + src.suffix)
    out.write_bytes(b"keep me")
    code, _, err = _run(capsys, "convert", src, out)
    assert code == 2
    _assert_one_line_error(err, "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert _run(capsys, "convert", src, out, "--force")[0] == 0
    assert out.read_bytes() != b"keep me"


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "respelled"])
@pytest.mark.parametrize("suffix", [".onnx", ".npz"])
def test_never_writes_to_the_input(capsys, tmp_path, how, suffix):
    original = ONNX_REPVGG / "train.onnx" if suffix == ".onnx" else STATE_REPVGG / "train_state.npz"
    src = tmp_path / f"in{suffix}"
    src.write_bytes(original.read_bytes())
    before = _sha(src)
    if how == "same":
        out = src
    elif how == "symlink":
        out = tmp_path / f"link{suffix}"
        out.symlink_to(src)
    elif how == "hardlink":
        out = tmp_path / f"hard{suffix}"
        os.link(src, out)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / f"in{suffix}"
    code, _, err = _run(capsys, "convert", src, out, "--force")
    assert code == 2
    _assert_one_line_error(err, "input file")
    assert _sha(src) == before


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".onnx", ".npz"])
@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "missing"])
def test_bad_input_exits_2_one_line_no_output(capsys, tmp_path, suffix, kind):
    original = ONNX_DBB / "train.onnx" if suffix == ".onnx" else STATE_DBB / "train_state.npz"
    src = tmp_path / f"bad{suffix}"
    data = original.read_bytes()
    if kind == "truncated":
        src.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        src.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        src.write_bytes(b"")
    before = _sha(src) if src.exists() else None
    out = tmp_path / f"out{suffix}"
    for argv in (["convert", src, out], ["inspect", src]):
        code, stdout, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        _assert_one_line_error(err)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ([] if kind == "missing" else [src.name])
    if before is not None:
        assert _sha(src) == before


def test_pickled_npz_is_refused(capsys, tmp_path):
    src = tmp_path / "evil.npz"
    np.savez(src, **{"a.weight": np.array([{"x": 1}], dtype=object)})
    code, _, err = _run(capsys, "convert", src, tmp_path / "o.npz")
    assert code == 2
    _assert_one_line_error(err, "object array")
    assert not (tmp_path / "o.npz").exists()


def test_external_data_outside_the_model_folder_is_refused(capsys, tmp_path):
    from repnp.io.onnx.export import build_onnx

    model = build_onnx(RepVGGBlock.random(0, 4, 4), input_shape=(1, 4, 5, 5))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(144, np.float32).tobytes())
    tensor = next(t for t in model.graph.initializer if t.name == "conv_kxk.conv.weight")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", str(144 * 4))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    folder = tmp_path / "models"
    folder.mkdir()
    src = folder / "m.onnx"
    src.write_bytes(model.SerializeToString())
    for argv in (["convert", src, folder / "o.onnx"], ["inspect", src], ["verify", src, src]):
        code, _, err = _run(capsys, *argv)
        assert code == 2
        _assert_one_line_error(err, "outside")
    assert sorted(os.listdir(folder)) == ["m.onnx"]


def test_state_without_blocks_is_written_unchanged(capsys, tmp_path):
    # issue 13: nothing to fuse exits 0, the output equals the input, and the message says so
    src = tmp_path / "plain.npz"
    np.savez(src, **{"fc.weight": np.ones((3, 4), np.float32)})
    code, out, err = _run(capsys, "convert", src, tmp_path / "o.npz")
    assert code == 0 and err == ""
    assert "nothing to re-parameterize" in out and "no re-parameterizable block" in out
    with np.load(tmp_path / "o.npz") as z:
        assert list(z) == ["fc.weight"] and np.array_equal(z["fc.weight"], np.ones((3, 4), np.float32))


def test_option_and_kind_mismatches(capsys, tmp_path):
    code, _, err = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", tmp_path / "o.npz")
    assert code == 2
    _assert_one_line_error(err, "onnx")
    code, _, err = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", tmp_path / "o.onnx", "--eps", "1e-3")
    assert code == 2
    _assert_one_line_error(err, "--eps")
    code, _, err = _run(capsys, "convert", STATE_REPVGG / "train_state.npz", tmp_path / "o.npz",
                        "--input-shape", "1,3,8,8")
    assert code == 2
    code, _, err = _run(capsys, "convert", STATE_REPVGG / "train_state.npz", tmp_path / "o.npz",
                        "--scheme", "nonsense")
    assert code == 2
    _assert_one_line_error(err, "nonsense")
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", str(ONNX_REPVGG / "train.onnx"), str(tmp_path / "o.onnx"), "--input-shape", "a,b"])
    assert exc.value.code == 2
    assert os.listdir(tmp_path) == []


def test_missing_output_folder(capsys, tmp_path):
    code, _, err = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", tmp_path / "nope" / "o.onnx")
    assert code == 2
    _assert_one_line_error(err, "output folder")
    assert os.listdir(tmp_path) == []


def test_check_failure_json_report(capsys, tmp_path):
    code, stdout, err = _run(capsys, "convert", STATE_DBB / "train_state.npz", tmp_path / "d.npz", "--tol", "0",
                             "--json")
    assert code == 1
    report = json.loads(stdout)
    assert report["written"] is False and report["check"]["passed"] is False
    assert report["check"]["max_error"] > 0 and report["bytes_after"] is None
    assert os.listdir(tmp_path) == []


def test_wrong_input_shape_for_the_model(capsys, tmp_path):
    code, _, err = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", tmp_path / "o.onnx",
                        "--input-shape", "1,3,8,8")
    assert code == 2
    _assert_one_line_error(err)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------

def test_inspect_onnx(capsys):
    code, stdout, _ = _run(capsys, "inspect", ONNX_DBB / "train_keepbn.onnx")
    assert code == 0
    assert "1 region(s) will be fused" in stdout and "operators" in stdout and "memory traffic" in stdout
    code, stdout, _ = _run(capsys, "inspect", ONNX_DBB / "train_keepbn.onnx", "--json")
    report = json.loads(stdout)
    assert len(report["fused"]) == 1
    # The shape subgraph is constant; the kernels launched are the 5 convs, 6 BNs, 3 Adds, the two
    # BN-and-pads (Pad + 4 ScatterND each, and the 4 Slices of the padded map PyTorch takes to size
    # the border writes) and the pooling.
    assert report["cost_ops_before"] == {"Conv": 5, "BatchNormalization": 6, "Add": 3, "Pad": 2,
                                         "ScatterND": 8, "Slice": 8, "AveragePool": 1}
    assert report["cost_ops_after"] == {"Conv": 1}
    assert report["cost"]["operators"]["train"] == "33" and report["cost"]["operators"]["deploy"] == "1"


def test_inspect_exported_network(capsys, tmp_path):
    net = models.create("mobileone_s0", num_classes=10)
    src = export_onnx(net, tmp_path / "s0.onnx", input_shape=(1, 3, 32, 32))
    code, stdout, _ = _run(capsys, "inspect", src, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert len(report["fused"]) == 43
    assert report["cost_ops_after"]["Conv"] == 43 and "Add" not in report["cost_ops_after"]


def test_inspect_state(capsys):
    code, stdout, _ = _run(capsys, "inspect", STATE_DBB / "train_state.npz", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["scheme"] == "dbb" and len(report["blocks"]) == 1
    assert report["blocks"][0]["deploy"] == "dbb_reparam"
    assert report["params_after"] < report["params_before"]
    code, stdout, _ = _run(capsys, "inspect", DATA / "state" / "off_repmlp_block_c12_h6w7" / "train_state.npz")
    assert code == 0 and "partition" in stdout          # RepMLP needs --partition to count the deploy form


# ----------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------

def test_verify_equal_and_different(capsys, tmp_path):
    a = export_onnx(RepVGGBlock.random(0, 4, 4), tmp_path / "a.onnx", input_shape=(1, 4, 6, 6))
    a2 = export_onnx(RepVGGBlock.random(0, 4, 4).reparameterize(), tmp_path / "a2.onnx", input_shape=(1, 4, 6, 6))
    b = export_onnx(RepVGGBlock.random(1, 4, 4), tmp_path / "b.onnx", input_shape=(1, 4, 6, 6))
    code, stdout, _ = _run(capsys, "verify", a, a2, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["passed"] and 0 < report["max_error"] <= 1e-5
    code, stdout, _ = _run(capsys, "verify", a, b)
    assert code == 1 and "DIFFERENT" in stdout


def test_verify_with_input_file(capsys, tmp_path):
    code, stdout, _ = _run(capsys, "verify", ONNX_REPVGG / "train.onnx", ONNX_REPVGG / "deploy.onnx",
                           "--input", ONNX_REPVGG / "input.npy", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["input_shapes"]["input"] == list(np.load(ONNX_REPVGG / "input.npy").shape)
    bad = tmp_path / "x.npy"
    np.save(bad, np.zeros((1, 3, 4, 4), np.float32))
    code, _, err = _run(capsys, "verify", ONNX_REPVGG / "train.onnx", ONNX_REPVGG / "deploy.onnx", "--input", bad)
    assert code == 2
    _assert_one_line_error(err, "shape")


def test_verify_bad_model(capsys, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    code, _, err = _run(capsys, "verify", ONNX_REPVGG / "train.onnx", junk)
    assert code == 2
    _assert_one_line_error(err)


# ----------------------------------------------------------------------------
# progress bar
# ----------------------------------------------------------------------------

def test_progress_bar_only_when_asked(capsys, tmp_path):
    code, _, err = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", tmp_path / "a.onnx")
    assert code == 0 and err == ""                       # stderr is not a TTY under pytest
    code, _, err = _run(capsys, "convert", ONNX_REPVGG / "train.onnx", tmp_path / "b.onnx", "--progress")
    assert code == 0 and "[" in err and "#" * 30 in err and err.endswith("\n")


def test_progress_class_draws_and_stays_quiet():
    import io

    from repnp.io.progress import Progress

    buf = io.StringIO()
    with Progress(4, "x", enabled=True, stream=buf, width=8) as bar:
        bar.update()
        bar.update(3)
    assert "\rx [##......] 1/4" in buf.getvalue() and buf.getvalue().endswith("[########] 4/4\n")
    quiet = io.StringIO()
    with Progress(4, "x", stream=quiet) as bar:            # StringIO is not a TTY
        bar.update()
    assert quiet.getvalue() == ""
    # set(done, total): the form of the library's progress(done, total) callbacks
    buf = io.StringIO()
    with Progress(1, "y", enabled=True, stream=buf, width=4) as bar:
        bar.set(5, 10)
        bar.set(99)                                        # clipped to the total
    assert "\ry [##..] 5/10" in buf.getvalue() and buf.getvalue().endswith("[####] 10/10\n")


# ----------------------------------------------------------------------------
# a whole network's state dict
# ----------------------------------------------------------------------------

_TIMM_BN = {"mean": "running_mean", "var": "running_var", "gamma": "weight", "beta": "bias"}


def test_convert_whole_network_state_dict(capsys, tmp_path):
    """RepVGG-A0 (10 classes) with timm's RepVggBlock names (``conv_kxk.conv``, ``conv_kxk.bn``,
    ``conv_1x1.*``, ``identity``; BN leaves ``running_mean``...): 22 blocks fused into
    ``reparam_conv``, equal to repnp's own deploy form, the head passed through."""
    net = models.create("repvgg_a0", num_classes=10)
    train = {}
    for key, value in net.params().items():
        module, leaf = key.rsplit(".", 1)
        train[f"{module}.{_TIMM_BN.get(leaf, leaf)}"] = value
    src = tmp_path / "a0.npz"
    np.savez(src, **train)
    out = tmp_path / "a0_deploy.npz"
    code, stdout, err = _run(capsys, "convert", src, out, "--json", "--progress")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["scheme"] == "timm" and report["blocks"] == 22 and len(report["check"]["per_block"]) == 22
    assert report["check"]["max_error"] <= 1e-5
    assert "verifying blocks" in err and "22/22" in err            # the progress bar, one step per block
    got = np.load(out)
    want = {k.replace(".conv.weight", ".reparam_conv.weight").replace(".conv.bias", ".reparam_conv.bias"): v
            for k, v in net.reparameterize().params().items()}
    assert sorted(got.files) == sorted(want)
    for k, v in want.items():
        assert np.max(np.abs(got[k] - v)) / np.max(np.abs(v)) <= 1e-5, k


# ----------------------------------------------------------------------------
# audit fixes: output suffix, verify on different inputs
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("src,out_name", [
    (ONNX_REPVGG / "train.onnx", "x.txt"), (ONNX_REPVGG / "train.onnx", "x"),
    (ONNX_REPVGG / "train.onnx", "x.npz"), (STATE_REPVGG / "train_state.npz", "x.onnx"),
    (STATE_REPVGG / "train_state.npz", "x.npy"),
])
def test_convert_output_suffix_must_match_the_input_kind(capsys, tmp_path, src, out_name):
    out = tmp_path / out_name
    code, _, err = _run(capsys, "convert", src, out)
    assert code == 2
    _assert_one_line_error(err, str(src), str(out), "must end in")
    assert " a onnx" not in err and " a npz" not in err
    assert os.listdir(tmp_path) == []


def test_convert_input_without_suffix_keeps_its_kind_by_content(capsys, tmp_path):
    src = tmp_path / "model"
    src.write_bytes((ONNX_REPVGG / "train.onnx").read_bytes())
    code, _, err = _run(capsys, "convert", src, tmp_path / "o.npz")
    assert code == 2
    _assert_one_line_error(err, "ONNX model", ".onnx")
    assert _run(capsys, "convert", src, tmp_path / "o.onnx")[0] == 0
    assert onnx.load(str(tmp_path / "o.onnx")).graph.node


def test_verify_models_with_different_inputs_names_what_differs(capsys, tmp_path):
    block = RepVGGBlock.random(0, 4, 4)
    a = export_onnx(block, tmp_path / "a.onnx", input_shape=(1, 4, 6, 6))
    b = export_onnx(block.reparameterize(), tmp_path / "b.onnx", input_shape=(1, 4, 8, 8))
    code, stdout, err = _run(capsys, "verify", a, b)
    assert code == 2 and stdout == ""
    _assert_one_line_error(err, "graph inputs differ", "[1, 4, 6, 6]", "[1, 4, 8, 8]", str(a), str(b))
    assert "invalid dimensions" not in err.lower()
    # another dtype
    model = onnx.load(str(b))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    onnx.save(model, str(tmp_path / "c.onnx"))
    a8 = export_onnx(block, tmp_path / "a8.onnx", input_shape=(1, 4, 8, 8))
    code, _, err = _run(capsys, "verify", a8, tmp_path / "c.onnx")
    assert code == 2
    _assert_one_line_error(err, "graph inputs differ", "float", "double")
    # another name
    model = onnx.load(str(b))
    old = model.graph.input[0].name
    model.graph.input[0].name = "other"
    for node in model.graph.node:
        node.input[:] = ["other" if i == old else i for i in node.input]
    onnx.save(model, str(tmp_path / "d.onnx"))
    code, _, err = _run(capsys, "verify", a8, tmp_path / "d.onnx")
    assert code == 2
    _assert_one_line_error(err, "graph inputs differ", repr(old), "'other'")
    # same declared inputs still verify
    assert _run(capsys, "verify", a8, b)[0] == 0


def test_verify_dynamic_reference_against_fixed_model(capsys, tmp_path):
    """A's batch is symbolic, B's fixed: the feed drawn for A (--input-shape) must fit B."""
    block = RepVGGBlock.random(0, 4, 4)
    a = export_onnx(block, tmp_path / "a.onnx", input_shape=(1, 4, 6, 6))
    model = onnx.load(str(a))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = "N"
    onnx.save(model, str(tmp_path / "dyn.onnx"))
    b = export_onnx(block.reparameterize(), tmp_path / "b.onnx", input_shape=(1, 4, 6, 6))
    assert _run(capsys, "verify", tmp_path / "dyn.onnx", b, "--input-shape", "1,4,6,6")[0] == 0
    code, _, err = _run(capsys, "verify", tmp_path / "dyn.onnx", b, "--input-shape", "3,4,6,6")
    assert code == 2
    _assert_one_line_error(err, "graph inputs differ", "'N'", "fed [3, 4, 6, 6]")
