"""repnp.io.npz on real PyTorch state dicts (timm and the official repositories).

The cases in tests/data/state/ were exported with PyTorch from timm 1.0.31 and the official
repositories (see tests/data/state/README.md): each holds the
training-form ``state_dict()`` of one block, the state dict the project's OWN
reparameterization produced (``deploy_state.npz``), and torch's output of the training
form on ``input.npy``. Two independent checks per case:

* the converted dict equals ``deploy_state.npz`` key for key (same key set), each
  tensor within the float32 tolerance (1e-5 relative to its max);
* the converted weights, run through ``repnp.ops`` (conv2d + the block's activation,
  geometry from meta.json), reproduce torch's ``output.npy`` (1e-4, tolerance rule).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from repnp import ops
from repnp.errors import ConversionError, ShapeError
from repnp.io import convert_state, load_state
from repnp.io.npz import detect_scheme, find_blocks
from repnp.tolerance import relative_error as rel_err

DATA = Path(__file__).parent / "data" / "state"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "train_state.npz").exists())




def load_case(case):
    d = DATA / case
    meta = json.loads((d / "meta.json").read_text())
    return load_state(d / "train_state.npz"), load_state(d / "deploy_state.npz"), meta


def test_all_sixteen_cases_are_here():
    assert len(CASES) == 16


@pytest.mark.parametrize("case", CASES)
def test_converted_equals_framework_deploy_state(case):
    train, deploy, meta = load_case(case)
    assert detect_scheme(train) == meta["scheme"]
    out, report = convert_state(train, partition=meta.get("partition"))
    assert report.format == "npz" and report.passed and report.max_error <= 1e-5
    assert list(out) == list(deploy)   # same keys, and in the order torch's own state_dict() lists them
    for key, ref in deploy.items():
        assert out[key].dtype == ref.dtype == np.float32
        assert out[key].shape == ref.shape, key
        assert rel_err(out[key], ref) <= 1e-5, key


@pytest.mark.parametrize("case", [c for c in CASES if "repmlp" not in c])
def test_converted_weights_reproduce_torch_output(case):
    train, _, meta = load_case(case)
    fwd = meta["forward"]
    out, _ = convert_state(train)
    (block,) = find_blocks(train)
    x = np.load(DATA / case / "input.npy")
    ref = np.load(DATA / case / "output.npy")
    y = ops.conv2d(x, out[f"{block.deploy}.weight"], out[f"{block.deploy}.bias"], stride=fwd["stride"],
                   padding=fwd["padding"], groups=fwd["groups"])
    y = ops.ACTIVATIONS[fwd["activation"]](y)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert rel_err(y, ref) <= 1e-5  # one block in float32: the 1e-5 rule


# Hand-typed from each case's constructor kwargs: what find_blocks and the report must say.
EXPECTED_BLOCKS = {
    "timm_repvgg_g3_c15": ("RepVggBlock", "reparam_conv", (15, 5, 3, 3), 3, True),
    "timm_repvgg_s2_c6to10": ("RepVggBlock", "reparam_conv", (10, 6, 3, 3), None, False),
    "timm_mobileone_dw_b3_c12": ("MobileOneBlock", "reparam_conv", (12, 1, 3, 3), 12, True),
    "timm_fastvit_repmixer_c20": ("RepMixer", "reparam_conv", (20, 1, 3, 3), 20, True),
    "off_repvgg_g2_s2_c12to20": ("RepVGGBlock", "rbr_reparam", (20, 6, 3, 3), None, False),
    "off_mobileone_pw_b2_c10": ("MobileOneBlock", "reparam_conv", (10, 10, 1, 1), 1, True),
    "off_acb_k5_s2_c6to12": ("ACBlock", "fused_conv", (12, 6, 5, 5), None, False),
    "off_dbb_dw3_c14": ("DiverseBranchBlock", "dbb_reparam", (14, 1, 3, 3), 14, False),
    "off_dbb_k3_c12": ("DiverseBranchBlock", "dbb_reparam", (12, 12, 3, 3), 1, False),
    "off_repmlp_block_c12_h6w7": ("RepMLPBlock", "fc3", (126, 42, 1, 1), 3, False),
}


@pytest.mark.parametrize("case", sorted(EXPECTED_BLOCKS))
def test_find_blocks_reports_geometry(case):
    train, _, meta = load_case(case)
    (block,) = find_blocks(train)
    _, report = convert_state(train, partition=meta.get("partition"))
    (fused,) = report.fused
    written = [f"{block.deploy}.weight", f"{block.deploy}.bias"]
    assert (fused.kind, fused.where, fused.written) == (block.name, "", written)
    kernel_shape, groups = tuple(fused.detail["kernel_shape"]), fused.detail["groups"]
    assert (block.name, block.deploy, kernel_shape, groups, block.identity) == EXPECTED_BLOCKS[case]
    assert block.prefix == ""
    # every key of a single-block dict belongs to the block, except RepMLP's global perceptron
    rest = set(train) - set(block.keys)
    assert rest == ({"gp.fc1.weight", "gp.fc1.bias", "gp.fc2.weight", "gp.fc2.bias"} if "repmlp" in case else set())


def test_mobileone_branch_names_in_order():
    train, _, _ = load_case("off_mobileone_dw_b3_c12")
    (block,) = find_blocks(train)
    assert block.branches == ("rbr_conv.0", "rbr_conv.1", "rbr_conv.2", "rbr_scale", "rbr_skip")


def repmlp_deploy_forward(x, w, *, h, wd, s):
    """The deploy RepMLPBlock's forward, op for op as PyTorch exported it (deploy.onnx of the case:
    GlobalAveragePool -> 1x1 Conv -> Relu -> 1x1 Conv -> Sigmoid gate; partition Reshape
    [-1, C, H/h, h, W/w, w] -> Transpose [0, 2, 4, 1, 3, 5] -> Reshape [-1, S*h*w, 1, 1]; fc3 as a
    grouped 1x1 Conv (groups S); Reshape [-1, S, h, w] -> [-1, H/h, W/w, S, h, w] -> Transpose
    [0, 3, 1, 4, 2, 5] -> Reshape [N, C, H, W]; times the gate)."""
    n, c, hh, ww = x.shape
    gate = x.mean(axis=(2, 3), keepdims=True)
    gate = ops.relu(ops.conv2d(gate, w["gp.fc1.weight"], w["gp.fc1.bias"]))
    gate = ops.sigmoid(ops.conv2d(gate, w["gp.fc2.weight"], w["gp.fc2.bias"])).reshape(-1, c, 1, 1)
    parts = x.reshape(-1, c, hh // h, h, ww // wd, wd).transpose(0, 2, 4, 1, 3, 5).reshape(-1, s * h * wd, 1, 1)
    y = ops.conv2d(parts, w["fc3.weight"], w["fc3.bias"], groups=s).reshape(-1, s, h, wd)
    y = y.reshape(-1, hh // h, ww // wd, s, h, wd).transpose(0, 3, 1, 4, 2, 5).reshape(n, c, hh, ww)
    return y * gate


def test_repmlp_converted_weights_reproduce_torch_output():
    case = "off_repmlp_block_c12_h6w7"
    train, _, meta = load_case(case)
    h, wd = meta["partition"]
    out, _ = convert_state(train, partition=(h, wd))
    x = np.load(DATA / case / "input.npy")
    ref = np.load(DATA / case / "output.npy")
    y = repmlp_deploy_forward(x, out, h=h, wd=wd, s=3)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert rel_err(y, ref) <= 1e-5  # one block in float32: the 1e-5 rule
    # the FC without the local branches (fc3 + fc3_bn only) does not reproduce it: the merge matters
    no_local, _ = convert_state({k: v for k, v in train.items() if not k.startswith("repconv")})
    assert rel_err(repmlp_deploy_forward(x, no_local, h=h, wd=wd, s=3), ref) > 1e-2


def test_eps_is_used():
    # The cases were trained with eps 1e-5: a different eps must give a visibly different kernel.
    train, deploy, _ = load_case("timm_repvgg_ident_c12")
    wrong, _ = convert_state(train, eps=1e-1)
    assert rel_err(wrong["reparam_conv.weight"], deploy["reparam_conv.weight"]) > 1e-3
    right, _ = convert_state(train, eps=1e-5)
    assert rel_err(right["reparam_conv.weight"], deploy["reparam_conv.weight"]) <= 1e-5


def test_repmlp_needs_partition_and_uses_it():
    train, deploy, _ = load_case("off_repmlp_block_c12_h6w7")
    with pytest.raises(ConversionError, match=r"partition=\(h, w\).*h\*w = 42"):
        convert_state(train)
    with pytest.raises(ShapeError, match="h\\*w = 35"):
        convert_state(train, partition=(5, 7))
    transposed, _ = convert_state(train, partition=(7, 6))
    assert rel_err(transposed["fc3.weight"], deploy["fc3.weight"]) > 1e-3
    # pass-through of the global perceptron: the very same arrays
    out, _ = convert_state(train, partition=(6, 7))
    assert out["gp.fc1.weight"] is train["gp.fc1.weight"]


def test_input_state_not_modified():
    train, _, _ = load_case("off_dbb_k3_c12")
    before = {k: v.copy() for k, v in train.items()}
    convert_state(train)
    assert all(np.array_equal(before[k], train[k]) for k in train)


def test_scheme_table():
    from repnp.io.npz.schemes import SCHEMES, scheme_names
    assert scheme_names() == ["acnet", "dbb", "ecb", "ecb_idt", "mmpretrain", "mobileone", "orepa", "qarepvgg",
                              "qarepvggv2", "replknet", "repmlp", "repvgg", "repvit", "timm", "ultralytics",
                              "ultralytics-end2end", "unireplknet", "yolov6", "yolov7"]
    # the schemes detection cannot tell apart or must not guess (ecb_idt: ecb's keys, with_idt is
    # not in the arrays), and their documented eps
    assert {n for n, s in SCHEMES.items() if not s.detect} == {"yolov6", "ultralytics", "ultralytics-end2end",
                                                               "qarepvgg", "qarepvggv2", "repvit", "ecb_idt"}
    assert {n: s.eps for n, s in SCHEMES.items() if s.eps != 1e-5} == {
        "yolov6": 1e-3, "ultralytics": 1e-3, "ultralytics-end2end": 1e-3, "qarepvgg": 1e-3, "qarepvggv2": 1e-3,
        "yolov7": 1e-3}
    assert all(s.source and s.blocks for s in SCHEMES.values())


# ----------------------------------------------------------------------------
# check_state: the independent block check (runs the branches with repnp.ops)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_check_state_passes_the_framework_deploy_state(case):
    # The framework's own deploy weights (torch's reparameterization) pass the check built
    # from the train weights: an independent confirmation of check_state itself.
    from repnp.io import check_state

    train, deploy, meta = load_case(case)
    result = check_state(train, deploy, partition=meta.get("partition"), tol=1e-5)
    blocks = find_blocks(train)
    assert len(result["per_block"]) == len(blocks) and result["unchecked"] == []
    assert result["scheme"] == meta["scheme"] and result["max_error"] <= 1e-5 and result["passed"]


def test_check_state_catches_wrong_eps_and_a_perturbed_kernel():
    from repnp.io.npz import check_state

    train, deploy, _ = load_case("timm_repvgg_ident_c12")
    wrong, _ = convert_state(train, eps=1e-1)
    assert check_state(train, wrong)["max_error"] > 1e-3
    # and the check's own eps is what the branches run with: with eps 1e-1 the wrong dict is right
    assert check_state(train, wrong, eps=1e-1)["max_error"] <= 1e-5
    bad = dict(deploy)
    bad["reparam_conv.weight"] = deploy["reparam_conv.weight"].copy()
    bad["reparam_conv.weight"][0, 0, 0, 0] += 0.05
    res = check_state(train, bad, tol=1e-4)
    assert not res["passed"] and res["per_block"]["(top level)"] == res["max_error"] > 1e-3


def test_check_state_repmlp_partition_and_missing_key():
    from repnp.io.npz import check_state

    train, deploy, _ = load_case("off_repmlp_block_c12_h6w7")
    assert check_state(train, deploy)["unchecked"] == ["(top level)"]      # 3x3 local branches: h, w unknown
    assert check_state(train, deploy)["max_error"] is None and check_state(train, deploy, tol=0.0)["passed"]
    assert check_state(train, deploy, partition=(6, 7))["max_error"] <= 1e-5
    with pytest.raises(ShapeError, match="h\\*w = 35"):
        check_state(train, deploy, partition=(5, 7))
    missing = {k: v for k, v in deploy.items() if k != "fc3.bias"}
    with pytest.raises(ConversionError, match="fc3.bias"):
        check_state(train, missing, partition=(6, 7))


def test_check_state_reports_progress_per_block():
    from repnp.io.npz import check_state

    train, _, _ = load_case("off_dbb_k3_c12")
    calls = []
    check_state(train, convert_state(train)[0], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)]


# ----------------------------------------------------------------------------
# the report and the check of convert_state
# ----------------------------------------------------------------------------

def two_block_state():
    """Two timm RepVggBlocks in float32 under 'stages.0.' and 'stages.1.', and a head that passes through."""
    from repnp.blocks import RepVGGBlock

    names = {"mean": "running_mean", "var": "running_var", "gamma": "weight", "beta": "bias"}
    state = {}
    for n in range(2):
        for key, value in RepVGGBlock.random(n, 4, 4, dtype=np.float32).params().items():
            module, leaf = key.rsplit(".", 1)
            key = f"stages.{n}.{module}.{names.get(leaf, leaf)}".replace(".skip.", ".identity.")
            state[key] = value
            if leaf == "beta":
                state[key.replace(".bias", ".num_batches_tracked")] = np.array(7, np.int64)
    state["head.fc.weight"] = np.ones((3, 4), np.float32)
    return state


def test_report_of_a_conversion():
    state = two_block_state()
    out, report = convert_state(state)
    assert report.format == "npz" and report.passed and report.max_error <= 1e-5
    assert report.counts_before == {"keys": len(state), "RepVggBlock": 2}
    assert report.counts_after == {"keys": 5, "RepVggBlock": 0}
    # trainable parameters: conv weights, BN gamma/beta, the head; not running stats nor counters
    kxk, one, bn = 4 * 4 * 9, 4 * 4, 2 * 4
    assert report.params_before == 2 * (kxk + one + 3 * bn) + 12
    assert report.params_after == 2 * (kxk + 4) + 12
    first = report.fused[0]
    assert (first.where, first.kind) == ("stages.0", "RepVggBlock")
    assert first.written == ["stages.0.reparam_conv.weight", "stages.0.reparam_conv.bias"]
    assert first.merged == [k for k in state if k.startswith("stages.0.")]
    assert first.detail["kernel_shape"] == [4, 4, 3, 3] and first.detail["groups"] == 1
    assert report.check["engine"] == "repnp.ops" and report.check["tol"] == 1e-4
    assert set(report.check["per_block"]) == {"stages.0", "stages.1"}
    assert report.to_dict()["check"]["passed"] is True and "numeric check" in str(report)
    unchecked, bare = convert_state(state, check=False)
    assert bare.check is None and bare.passed is None and list(unchecked) == list(out)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weight_in_the_second_block_fails_the_check(value):
    from repnp.errors import CheckFailed

    state = two_block_state()
    state["stages.1.conv_kxk.conv.weight"] = state["stages.1.conv_kxk.conv.weight"].copy()
    state["stages.1.conv_kxk.conv.weight"][0, 0, 1, 1] = value
    result = None
    with pytest.raises(CheckFailed, match="stages.1") as exc:
        result = convert_state(state)
    assert result is None                                   # nothing returned
    report = exc.value.report
    assert report.passed is False and report.max_error == float("inf")
    assert report.check["per_block"]["stages.0"] <= 1e-5 and report.check["per_block"]["stages.1"] == float("inf")
    # without the check the weights are fused as they are
    out, _ = convert_state(state, check=False)
    assert not np.all(np.isfinite(out["stages.1.reparam_conv.weight"]))


def test_check_failure_carries_the_report():
    from repnp.errors import CheckFailed

    train, _, _ = load_case("off_dbb_k3_c12")
    with pytest.raises(CheckFailed) as exc:
        convert_state(train, tol=0.0)
    assert exc.value.report.check["passed"] is False and exc.value.report.max_error > 0


def test_no_family_switch_left_in_io():
    # the converter is generic over the schemes' data: nothing in repnp.io names a fusion family
    import re

    import repnp.io

    root = Path(repnp.io.__file__).parent
    text = "\n".join(p.read_text() for p in (root / "npz").glob("*.py"))
    assert not re.search(r"def _fuse_|family ==|\.family in", text)
    assert not (root / "state.py").exists() and not (root / "schemes.py").exists()
