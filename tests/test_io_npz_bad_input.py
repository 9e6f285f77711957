"""repnp.io.npz on bad input: clear errors, input files untouched, no partial output."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from repnp.errors import ConversionError, ShapeError
from repnp.io import convert_state, load_state, save_state
from repnp.io.npz import detect_scheme, find_blocks

CASE = Path(__file__).parent / "data" / "state" / "off_repvgg_ident_c10"


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.npz"
    shutil.copyfile(CASE / "train_state.npz", path)
    return path


# ----------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------

def test_round_trip_keeps_order_and_dtypes(tmp_path, train_file):
    state = load_state(train_file)
    state["step"] = np.array(7, dtype=np.int64)
    state["file"] = np.zeros(2, np.float32)            # a key np.savez could not take as a keyword
    state["allow_pickle"] = np.ones(1, np.float64)
    out = save_state(state, tmp_path / "copy.npz")
    back = load_state(out)
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype
        np.testing.assert_array_equal(back[k], state[k])


def test_truncated_file(tmp_path, train_file):
    data = train_file.read_bytes()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated.npz"):
        load_state(bad)


def test_garbage_bytes(tmp_path):
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(ConversionError, match="garbage.npz"):
        load_state(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ConversionError, match="nothere.npz"):
        load_state(tmp_path / "nothere.npz")


def test_object_arrays_refused(tmp_path):
    bad = tmp_path / "pickled.npz"
    np.savez(bad, w=np.zeros(3), evil=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ConversionError, match=r"'evil' is an object array.*allow_pickle=False"):
        load_state(bad)


def test_single_npy_refused(tmp_path):
    bad = tmp_path / "one.npy"
    np.save(bad, np.zeros(3))
    with pytest.raises(ConversionError, match="single array"):
        load_state(bad)


def test_string_arrays_refused(tmp_path):
    bad = tmp_path / "text.npz"
    np.savez(bad, name=np.array(["resnet"]))
    with pytest.raises(ConversionError, match="'name' must be a numeric array"):
        load_state(bad)


# ----------------------------------------------------------------------------
# block contents
# ----------------------------------------------------------------------------

def test_bn_length_mismatch_names_both(train_file):
    state = load_state(train_file)
    for p in ("weight", "bias", "running_mean", "running_var"):
        state[f"rbr_1x1.bn.{p}"] = state[f"rbr_1x1.bn.{p}"][:7]
    with pytest.raises(ShapeError, match=r"rbr_1x1\.bn.*7 channels.*rbr_1x1\.conv\.weight.*\(10, 10, 1, 1\)"):
        convert_state(state)


def test_bn_vectors_of_different_lengths(train_file):
    state = load_state(train_file)
    state["rbr_dense.bn.bias"] = state["rbr_dense.bn.bias"][:9]
    with pytest.raises(ShapeError, match=r"rbr_dense\.bn\.bias': \(9,\)"):
        convert_state(state)


def test_identity_bn_of_wrong_length(train_file):
    state = load_state(train_file)
    for p in ("weight", "bias", "running_mean", "running_var"):
        state[f"rbr_identity.{p}"] = np.ones(4, np.float32)
    with pytest.raises(ShapeError, match="identity BN 'rbr_identity' has 4 channels"):
        convert_state(state)


@pytest.mark.parametrize("key", ["rbr_dense.bn.running_var", "rbr_1x1.bn.running_mean",
                                 "rbr_identity.running_var", "rbr_1x1.conv.weight", "rbr_dense.bn.weight"])
def test_missing_key_is_named(train_file, key):
    state = load_state(train_file)
    del state[key]
    with pytest.raises(ConversionError, match=f"key '{key}' is missing"):
        convert_state(state)


def test_unexpected_key_in_a_block_module(train_file):
    state = load_state(train_file)
    state["rbr_dense.conv.weight_orig"] = state["rbr_dense.conv.weight"]
    with pytest.raises(ConversionError, match="weight_orig"):
        convert_state(state)


def test_unknown_scheme_and_no_blocks(train_file):
    state = load_state(train_file)
    with pytest.raises(ConversionError, match="unknown scheme 'resnet'.*repvgg"):
        convert_state(state, scheme="resnet")
    # issue 13: nothing to fuse is not an error; the output is the input, the message says why
    out, report = convert_state(state, scheme="timm")
    assert out == dict(state) and "nothing to re-parameterize: no timm block" in report.messages[0]
    plain = {"fc.weight": np.zeros((2, 3)), "fc.bias": np.zeros(2)}
    out, report = convert_state(plain)
    assert out == plain and report.fused == [] and report.check["passed"]
    assert "nothing to re-parameterize: no re-parameterizable block" in report.messages[0]
    with pytest.raises(ConversionError, match="no re-parameterizable block"):
        detect_scheme(plain)


def test_already_deployed_dict_is_reported():
    deploy = load_state(CASE / "deploy_state.npz")
    out, report = convert_state(deploy)        # issue 13: reported, not refused
    assert out == deploy and "nothing to re-parameterize: no re-parameterizable block" in report.messages[0]
    train = load_state(CASE / "train_state.npz")
    with pytest.raises(ConversionError, match="already exists"):
        convert_state(train | deploy)


def test_ambiguous_schemes_listed():
    train = load_state(CASE / "train_state.npz")
    timm = load_state(CASE.parent / "timm_repvgg_ident_c12" / "train_state.npz")
    mixed = {f"a.{k}": v for k, v in train.items()} | {f"b.{k}": v for k, v in timm.items()}
    with pytest.raises(ConversionError, match=r"several naming schemes match: repvgg \(1 blocks\), timm \(1 blocks\)"):
        detect_scheme(mixed)
    # an explicit scheme converts its blocks and passes the others through
    out, _ = convert_state(mixed, scheme="timm")
    assert "b.reparam_conv.weight" in out and "a.rbr_dense.conv.weight" in out


def test_not_a_mapping():
    with pytest.raises(ConversionError, match="mapping"):
        find_blocks([("a", np.zeros(1))])


# ----------------------------------------------------------------------------
# writing: never touch the input, never leave a partial file
# ----------------------------------------------------------------------------

def test_input_file_unchanged_by_conversion(tmp_path, train_file):
    before = digest(train_file)
    save_state(convert_state(load_state(train_file))[0], tmp_path / "deploy.npz")
    assert digest(train_file) == before
    assert sorted(os.listdir(tmp_path)) == ["deploy.npz", "train.npz"]


def test_refuses_to_overwrite_without_force(tmp_path, train_file):
    target = tmp_path / "deploy.npz"
    target.write_bytes(b"precious")
    state, _ = convert_state(load_state(train_file))
    with pytest.raises(ConversionError, match="exists; pass force=True"):
        save_state(state, target)
    assert target.read_bytes() == b"precious"
    save_state(state, target, force=True)
    assert list(load_state(target)) == ["rbr_reparam.weight", "rbr_reparam.bias"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask    # not mkstemp's 0600


def test_refuses_to_write_over_the_source(train_file):
    before = digest(train_file)
    state, _ = convert_state(load_state(train_file))
    with pytest.raises(ConversionError, match="input file"):
        save_state(state, train_file, force=True, source=train_file)
    link = train_file.parent / "alias.npz"
    os.symlink(train_file, link)
    with pytest.raises(ConversionError, match="input file"):
        save_state(state, link, force=True, source=train_file)
    assert digest(train_file) == before


def test_failure_mid_write_leaves_nothing(tmp_path, train_file, monkeypatch):
    target = tmp_path / "deploy.npz"
    target.write_bytes(b"old")
    calls = []

    def failing_write(member, array, allow_pickle):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(member, array, allow_pickle=allow_pickle)

    real_write = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_state(load_state(train_file), target, force=True)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["deploy.npz", "train.npz"]


def test_non_numeric_value_refused_before_writing(tmp_path):
    with pytest.raises(ConversionError, match="'w' must be a numeric array"):
        save_state({"w": [1, 2]}, tmp_path / "x.npz")
    assert os.listdir(tmp_path) == []


def test_kernels_without_common_centre():
    # A 2x2 "1x1 branch" inside a 3x3 block: the centres cannot coincide.
    state = load_state(CASE / "train_state.npz")
    state["rbr_1x1.conv.weight"] = np.ones((10, 10, 2, 2), np.float32)
    # fusion reports it as a ShapeError (or ValueError); either way a ValueError naming the block
    with pytest.raises(ValueError, match=r"RepVGGBlock block '\(top level\)'.*centre"):
        convert_state(state)


def test_branches_of_different_channels():
    state = load_state(CASE / "train_state.npz")
    state["rbr_1x1.conv.weight"] = np.ones((10, 5, 1, 1), np.float32)
    with pytest.raises(ShapeError, match=r"rbr_1x1\.conv\.weight has shape \(10, 5, 1, 1\).*\(10, 10, 3, 3\)"):
        convert_state(state)
