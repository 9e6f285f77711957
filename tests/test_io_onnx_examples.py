"""The 16 real PyTorch exports (tests/data/onnx): every train graph converts to at most the
deploy graph's nodes of each type and reproduces torch's output (tolerance rule, 1e-4)."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from repnp.io.onnx.check import run_model
from repnp.io.onnx.convert import convert_onnx

DATA = Path(__file__).parent / "data" / "onnx"
CASES = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def test_all_sixteen_cases_are_here():
    assert len(CASES) == 16


def _counts(model):
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("style", ["train.onnx", "train_keepbn.onnx"])
@pytest.mark.parametrize("case", CASES)
def test_example_converts_and_matches_torch(case, style):
    path = DATA / case / style
    before = path.read_bytes()
    original = onnx.load(str(path))
    model, report = convert_onnx(str(path))
    assert path.read_bytes() == before  # the input file is never touched
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    assert model.ir_version == original.ir_version
    assert list(model.opset_import) == list(original.opset_import)
    x = np.load(DATA / case / "input.npy")
    ref = np.load(DATA / case / "output.npy")
    y = run_model(model, {"input": x})[0][0]
    err = np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err <= 1e-4
    assert report.check["passed"] and report.check["max_error"] <= 1e-4
    assert report.fused, "every case has at least one fusable region"
    assert sum(report.counts_after.values()) < sum(report.counts_before.values())


@pytest.mark.parametrize("style", ["train.onnx", "train_keepbn.onnx"])
@pytest.mark.parametrize("case", CASES)
def test_example_has_no_more_nodes_than_deploy(case, style):
    model, _ = convert_onnx(str(DATA / case / style), check=False)
    deploy = _counts(onnx.load(str(DATA / case / "deploy.onnx")))
    got = _counts(model)
    extra = {k: (v, deploy.get(k, 0)) for k, v in got.items() if v > deploy.get(k, 0)}
    assert not extra, f"more nodes than deploy.onnx (got, deploy): {extra}"


def test_dbb_shape_chains_are_gone_and_kernel_matches_deploy():
    """The dense DBB's 839 nodes (818 of them computing ScatterND indices) become one Conv whose
    kernel equals the official switch_to_deploy kernel."""
    model, report = convert_onnx(str(DATA / "off_dbb_k3_c12" / "train.onnx"), check=False)
    assert _counts(model) == Counter({"Conv": 1})
    deploy = onnx.load(str(DATA / "off_dbb_k3_c12" / "deploy.onnx"))
    w_new = onnx.numpy_helper.to_array(model.graph.initializer[0])
    w_dep = onnx.numpy_helper.to_array(deploy.graph.initializer[0])
    b_pair = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    assert w_new.shape == w_dep.shape == (12, 12, 3, 3)
    assert np.abs(w_new - w_dep).max() / np.abs(w_dep).max() <= 1e-5
    assert len(b_pair) == 2
    (region,) = report.fused
    assert region.detail["op_types"]["ScatterND"] == 8 and region.detail["op_types"]["Pad"] == 2
    assert region.detail["op_types"]["AveragePool"] == 1


def test_fastvit_gelu_stays():
    model, _ = convert_onnx(str(DATA / "timm_fastvit_mobileone_s2_noscale_c6to12" / "train_keepbn.onnx"))
    got = _counts(model)
    assert got["Erf"] == 1 and got["Conv"] == 1 and got["BatchNormalization"] == 0


@pytest.mark.parametrize("style", ["train.onnx", "train_keepbn.onnx"])
def test_repmlp_local_convs_merge_into_the_partition_fc(style):
    """RepMLP: the local conv-BN branches on the (M, S, h, w) view become part of the grouped 1x1
    FC on the (M, S*h*w, 1, 1) view (conv_to_fc), the BN after the FC's reshape folds into it;
    the result equals the official local_inject() FC, groups included."""
    case = DATA / "off_repmlp_block_c12_h6w7"
    model, report = convert_onnx(str(case / style))
    deploy = onnx.load(str(case / "deploy.onnx"))
    dep = {t.name: onnx.numpy_helper.to_array(t) for t in deploy.graph.initializer}
    (region,) = report.fused
    fc = next(n for n in model.graph.node if n.name == region.written[0])
    got = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    w, b = got[fc.input[1]], got[fc.input[2]]
    assert region.detail["groups"] == 3 and w.shape == dep["fc3.weight"].shape == (126, 42, 1, 1)
    assert np.abs(w - dep["fc3.weight"]).max() / np.abs(dep["fc3.weight"]).max() <= 1e-5
    assert np.abs(b - dep["fc3.bias"]).max() / np.abs(dep["fc3.bias"]).max() <= 1e-5
    assert _counts(model)["Conv"] == 3 and _counts(model)["BatchNormalization"] == 0


def test_check_without_onnxruntime_uses_the_reference_evaluator():
    """The numeric proof's fallback engine agrees too (its BN is ours: see repnp.io.onnx.check)."""
    from repnp.io.onnx.check import compare_models
    from repnp.io.onnx.graph import load_model, sorted_model

    original = load_model(DATA / "off_repvgg_ident_c10" / "train_keepbn.onnx")
    model, _ = convert_onnx(original, check=False)
    res = compare_models(sorted_model(original), model, engine="reference")
    assert res.engine == "reference" and res.passed and res.max_error <= 1e-5
