"""Real PyTorch cases of the YOLO-family and RepViT blocks (tests/data/yolo_repvit):
YOLOv6 QARepVGG v1/v2, yolov7 RepConv,
official RepViT (RepVGGDW, Classfier, a tiny whole RepViT).

* ``.npz``: ``convert_state(train_state, scheme=meta["scheme"])`` gives exactly the keys of the official
  deploy state dict (``num_batches_tracked`` aside: BatchNorm loads without it) and values within the
  tolerance rule (float32 weights: 1e-5 per array, ``max|a-b| / max|b|``) -- except where the official
  conversion is wrong (yolov7's grouped RepConv), where ours matches the train form and theirs does not;
* ONNX, both export styles: at most the official deploy graph's count of every operator type, output
  within 1e-4 of torch's train-form output.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from repnp import tolerance
from repnp.blocks import RepVGGBlock
from repnp.io.npz import convert_state
from repnp.io.onnx.check import run_model
from repnp.io.onnx.convert import convert_onnx

DATA = Path(__file__).parent / "data" / "yolo_repvit"
CASES = sorted(p.name for p in (DATA / "state").iterdir() if p.is_dir() and p.name.startswith("off_"))
OURS = [c for c in CASES if c.startswith(("off_qarepvgg", "off_yolov7", "off_repvit"))]
# yolov7's own fuse_repvgg_block() is wrong for groups > 1 (identity at [i, i] of the squeezed (C, C/g)
# weight only); the depthwise one it cannot run at all (meta.json: official_fuse_error), so that case's
# deploy_state.npz holds the class's own get_equivalent_kernel_bias(), which is right.
OFFICIAL_WRONG = {"off_yolov7_repconv_g2_c8"}


def _meta(case):
    return json.loads((DATA / "state" / case / "meta.json").read_text())


def _state(case, name):
    with np.load(DATA / "state" / case / name) as z:
        return {k: z[k] for k in z.files}


def test_the_cases_are_here():
    assert len(OURS) == 10
    assert {_meta(c)["scheme"] for c in OURS} == {"qarepvgg", "qarepvggv2", "yolov7", "repvit"}


@pytest.mark.parametrize("case", OURS)
def test_npz_converts_to_the_official_deploy_state_dict(case):
    train, official = _state(case, "train_state.npz"), _state(case, "deploy_state.npz")
    out, report = convert_state(train, scheme=_meta(case)["scheme"])
    assert report.check["passed"]
    assert sorted(out) == sorted(k for k in official if not k.endswith("num_batches_tracked"))
    errors = {k: tolerance.relative_error(out[k], official[k]) for k in out}
    if case in OFFICIAL_WRONG:
        assert max(errors.values()) > 0.1
    else:
        assert max(errors.values()) <= tolerance.FLOAT32, errors
    for k in out:
        assert out[k].dtype == official[k].dtype and out[k].shape == official[k].shape


@pytest.mark.parametrize("case", [c for c in OURS if c.startswith("off_yolov7")])
def test_yolov7_ours_is_right_for_groups_and_depthwise(case):
    """Ours equals the class's own get_equivalent_kernel_bias() and reproduces torch's train-form output
    (through the deploy block); the grouped case's official fuse_repvgg_block() result does not."""
    meta = _meta(case)
    out, _ = convert_state(_state(case, "train_state.npz"), scheme="yolov7")
    equiv = _state(case, "equivalent_kernel_bias.npz")
    assert tolerance.relative_error(out["rbr_reparam.weight"], equiv["weight"]) <= tolerance.FLOAT32
    assert tolerance.relative_error(out["rbr_reparam.bias"], equiv["bias"]) <= tolerance.FLOAT32
    fwd = meta["forward"]
    x, y = np.load(DATA / "state" / case / "input.npy"), np.load(DATA / "state" / case / "output.npy")

    def run(state):
        params = {"conv.weight": state["rbr_reparam.weight"].astype(np.float64),
                  "conv.bias": state["rbr_reparam.bias"].astype(np.float64)}
        from repnp.blocks import ConvAct

        deploy = ConvAct.from_params(params, stride=fwd["stride"], padding=fwd["padding"], groups=fwd["groups"],
                                     activation="silu")
        return deploy.forward(x.astype(np.float64))

    assert tolerance.relative_error(run(out), y) <= tolerance.NETWORK
    theirs = tolerance.relative_error(run(_state(case, "deploy_state.npz")), y)
    if case in OFFICIAL_WRONG:
        assert theirs > 0.1
        torch_theirs = np.load(DATA / "state" / case / "deploy_output.npy")
        assert tolerance.relative_error(torch_theirs, y) > 0.1      # torch itself says so
    else:
        assert theirs <= tolerance.NETWORK
    if case == "off_yolov7_repconv_dw_c8":
        assert "dimensions must larger than 1" in meta["official_fuse_error"]


def test_yolov7_block_is_repvgg_with_eps_1e3_and_silu():
    train = _state("off_yolov7_repconv_g2_c8", "train_state.npz")
    from repnp.io.npz import find_blocks

    (block,) = find_blocks(train, "yolov7")
    assert block.kind.block is RepVGGBlock and block.kind.config == {"activation": "silu"}
    from repnp.io.npz.schemes import SCHEMES

    assert SCHEMES["yolov7"].eps == SCHEMES["qarepvgg"].eps == SCHEMES["qarepvggv2"].eps == 1e-3
    assert all(v == 1e-3 for v in _meta("off_yolov7_repconv_g2_c8")["batchnorm_eps"].values())


def _counts(model):
    return Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")


@pytest.mark.parametrize("style", ["train.onnx", "train_keepbn.onnx"])
@pytest.mark.parametrize("case", OURS)
def test_onnx_converts_to_at_most_the_official_deploy_counts(case, style):
    d = DATA / "onnx" / case
    model, report = convert_onnx(str(d / style))
    deploy = _counts(onnx.load(str(d / "deploy.onnx")))
    got = _counts(model)
    extra = {k: (v, deploy.get(k, 0)) for k, v in got.items() if v > deploy.get(k, 0)}
    assert not extra, f"more nodes than deploy.onnx (got, deploy): {extra}"
    for op in ("Conv", "BatchNormalization", "Add", "Gemm"):
        assert got.get(op, 0) <= deploy.get(op, 0)
    x, ref = np.load(d / "input.npy"), np.load(d / "output.npy")
    y = run_model(model, {"input": x})[0][0]
    assert tolerance.relative_error(y, ref) <= tolerance.NETWORK
    assert report.check["passed"]


def test_official_repvit_is_detected_and_converted_in_full():
    """Detection picks timm (official RepViT models are timm models, with timm's RepVGGDW / Conv2d_BN
    keys), which also folds the official Classfier: the whole official deploy dict, no --scheme."""
    from repnp.io.npz import detect_scheme

    train, official = _state("off_repvit_tiny", "train_state.npz"), _state("off_repvit_tiny", "deploy_state.npz")
    assert detect_scheme(train) == "timm"
    out, report = convert_state(train)
    assert sorted(out) == sorted(official)
    assert "classifier" in {f.where for f in report.fused}
    explicit, _ = convert_state(train, scheme="repvit")
    for k in out:
        np.testing.assert_array_equal(out[k], explicit[k])


def test_cli_converts_qarepvgg_with_its_scheme_and_names_it_without(tmp_path, capsys):
    from repnp.cli import main

    src = DATA / "state" / "off_qarepvggv2_c8" / "train_state.npz"
    out = tmp_path / "deploy.npz"
    assert main(["convert", str(src), str(out), "--scheme", "qarepvggv2"]) == 0
    with np.load(out) as z:
        assert sorted(z.files) == ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight",
                                   "rbr_reparam.bias", "rbr_reparam.weight"]
    capsys.readouterr()
    # Without --scheme: v1 and v2 have the same keys, so nothing is guessed; the message names both.
    assert main(["convert", str(src), str(tmp_path / "same.npz")]) == 0
    text = capsys.readouterr().out
    assert "nothing to re-parameterize" in text and "qarepvgg, qarepvggv2" in text
