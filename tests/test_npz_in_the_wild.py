"""Issue 13 item 5: the state dicts of the networks people deploy (timm, ultralytics).

The key layouts are built here from the frameworks' source (file and commit cited in
``repnp/io/npz/schemes.py`` next to each block type), with random conv weights and random BN
statistics in float64; no PyTorch. Each fused dict is checked against a forward computed
branch by branch with repnp.ops, and its keys against the keys the framework's own fusion
leaves (``reparameterize_model`` for timm, ``fuse()`` for ultralytics).
"""

from pathlib import Path

import numpy as np
import pytest

from repnp import cli, ops
from repnp.errors import ConversionError
from repnp.io import convert_state, load_state
from repnp.io.npz import check_state
from repnp.tolerance import relative_error as rel_err

STATE = Path(__file__).parent / "data" / "state"


def add_conv(state, rng, name, o, i, kh, kw=None, *, bias=False):
    kw = kh if kw is None else kw
    state[f"{name}.weight"] = rng.standard_normal((o, i, kh, kw)) / np.sqrt(i * kh * kw)
    if bias:
        state[f"{name}.bias"] = rng.normal(0, 0.5, o)


def add_bn(state, rng, name, c):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
    state[f"{name}.bias"] = rng.normal(0, 0.5, c)
    state[f"{name}.running_mean"] = rng.normal(0, 0.5, c)
    state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)
    state[f"{name}.num_batches_tracked"] = np.array(1000, dtype=np.int64)


def bn(state, name, x, eps):
    return ops.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                          state[f"{name}.bias"], eps=eps)


def conv(state, name, x, *, groups=1, bias=None):
    w = state[f"{name}.weight"]
    b = state.get(f"{name}.bias") if bias is None else bias
    return ops.conv2d(x, w, b, padding=w.shape[2] // 2, groups=groups)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------
# nothing to fuse, flag names in messages
# ----------------------------------------------------------------------------

def resnet_like(rng):
    """torchvision / timm resnet names (conv1 / bn1, layer1.0.conv1 ...): no scheme's blocks."""
    s = {}
    add_conv(s, rng, "conv1", 8, 3, 3)
    add_bn(s, rng, "bn1", 8)
    add_conv(s, rng, "layer1.0.conv1", 8, 8, 3)
    add_bn(s, rng, "layer1.0.bn1", 8)
    s["fc.weight"] = rng.standard_normal((10, 8)).astype(np.float32)
    s["fc.bias"] = np.zeros(10, np.float32)
    return s


def test_nothing_to_fuse_exits_0_and_writes_the_input(capsys, tmp_path):
    state = resnet_like(np.random.default_rng(0))
    np.savez(tmp_path / "r.npz", **state)
    code, out, err = run(capsys, "convert", tmp_path / "r.npz", tmp_path / "o.npz")
    assert code == 0 and err == ""
    assert "nothing to re-parameterize" in out
    got = load_state(tmp_path / "o.npz")
    assert list(got) == list(state)
    assert all(np.array_equal(got[k], state[k]) and got[k].dtype == state[k].dtype for k in state)
    code, out, _ = run(capsys, "convert", tmp_path / "r.npz", tmp_path / "j.npz", "--json")
    assert code == 0 and '"nothing_to_fuse": true' in out
    code, out, _ = run(capsys, "inspect", tmp_path / "r.npz")
    assert code == 0 and "nothing to re-parameterize" in out


def test_nothing_to_fuse_with_a_scheme_and_check_state():
    state = resnet_like(np.random.default_rng(1))
    out, report = convert_state(state, scheme="timm")
    assert out == state and report.fused == [] and report.check["passed"]
    assert "nothing to re-parameterize: no timm block" in report.messages[0]
    result = check_state(state, out)
    assert result["passed"] and result["per_block"] == {}
    assert "nothing to re-parameterize" in result["messages"][-1]


def test_messages_name_the_cli_flags():
    state = resnet_like(np.random.default_rng(2))
    _, report = convert_state(state)
    assert "--scheme" in report.messages[0] and "named with scheme=" not in report.messages[0]
    # several schemes: the flag, as the CLI spells it
    rv = load_state(STATE / "off_repvgg_ident_c10" / "train_state.npz")
    timm = load_state(STATE / "timm_repvgg_ident_c12" / "train_state.npz")
    mixed = {f"a.{k}": v for k, v in rv.items()} | {f"b.{k}": v for k, v in timm.items()}
    with pytest.raises(ConversionError, match="choose one with --scheme"):
        convert_state(mixed)


# ----------------------------------------------------------------------------
# RepMLP: a partition per block
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_repmlp():
    case = STATE / "off_repmlp_block_c12_h6w7"
    train, deploy = load_state(case / "train_state.npz"), load_state(case / "deploy_state.npz")
    both = lambda d: {f"s.{n}.{k}": v for n in ("0", "1") for k, v in d.items()}  # noqa: E731
    return both(train), both(deploy)


def test_partition_per_block(two_repmlp):
    train, deploy = two_repmlp
    for partition in ({"s.0": (6, 7), "s.1": (6, 7)}, {"s.0": (6, 7), None: (6, 7)}, (6, 7)):
        out, report = convert_state(train, partition=partition)
        assert list(out) == list(deploy) and report.check["passed"]
        assert max(rel_err(out[k], deploy[k]) for k in deploy) <= 1e-5
    with pytest.raises(ConversionError, match=r"'s\.1'.*--partition"):
        convert_state(train, partition={"s.0": (6, 7)})
    with pytest.raises(ConversionError, match=r"names \['s\.9'\].*RepMLP blocks: \['s\.0', 's\.1'\]"):
        convert_state(train, partition={"s.9": (6, 7), None: (6, 7)})


def test_partition_flag_repeatable(capsys, tmp_path, two_repmlp):
    train, deploy = two_repmlp
    np.savez(tmp_path / "t.npz", **train)
    code, out, err = run(capsys, "convert", tmp_path / "t.npz", tmp_path / "o.npz",
                         "--partition", "s.0=6,7", "--partition", "s.1=6,7")
    assert code == 0, err
    got = load_state(tmp_path / "o.npz")
    assert max(rel_err(got[k], deploy[k]) for k in deploy) <= 1e-5
    code, _, err = run(capsys, "convert", tmp_path / "t.npz", tmp_path / "p.npz", "--partition", "6,7")
    assert code == 0, err
    code, _, err = run(capsys, "convert", tmp_path / "t.npz", tmp_path / "q.npz", "--partition", "s.0=6,7")
    assert code == 2 and "--partition" in err and "'s.1'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:          # argparse: usage errors exit 2, one line
        cli.main(["convert", str(tmp_path / "t.npz"), str(tmp_path / "q.npz"), "--partition", "=6,7"])
    assert exc.value.code == 2 and "PREFIX=H,W" in capsys.readouterr().err
