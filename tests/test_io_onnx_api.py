"""The public ONNX API of repnp.io: load_onnx, convert_onnx, save_onnx, one report type and
one parameter count shared by ``repnp convert`` and ``repnp inspect``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

import repnp.io
from repnp import cli
from repnp.errors import CheckFailed, ConversionError
from repnp.io.onnx import graph as og
from repnp.io.report import ConversionReport, Fused
from repnp.tolerance import NETWORK

ONNX_REPVGG = Path(__file__).parent / "data" / "onnx" / "off_repvgg_ident_c10"


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_public_names_are_the_package_functions():
    assert repnp.io.load_onnx is og.load_onnx
    assert repnp.io.save_onnx is repnp.io.onnx.write.save_onnx
    assert repnp.io.convert_onnx is repnp.io.onnx.convert.convert_onnx
    assert {"load_onnx", "save_onnx", "convert_onnx"} <= set(repnp.io.__all__)


def test_param_count_by_hand_excludes_bn_statistics():
    # RepVGG block, 10 -> 10 channels, identity BN: the 3x3 conv (10*10*9 = 900), the 1x1 conv
    # (10*10 = 100) and gamma, beta of three BNs (3 * 2 * 10 = 60). The running means and
    # variances (another 60) are buffers, not parameters.
    model = repnp.io.load_onnx(ONNX_REPVGG / "train_keepbn.onnx")
    assert og.count_params(model.graph) == og.count_params(model) == 900 + 100 + 60
    fused, report = repnp.io.convert_onnx(model)
    # deploy form: one 3x3 conv with bias
    assert report.params_before == 1060 and report.params_after == og.count_params(fused) == 900 + 10


def test_param_count_includes_constant_tensors_but_not_bn_statistics_read_through_them():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    nodes = [onnx.helper.make_node("Constant", [], [n], value=onnx.helper.make_tensor(n, onnx.TensorProto.FLOAT, [2],
                                                                                     [1.0, 1.0]))
             for n in ("gamma", "beta", "mean", "var")]
    nodes.append(onnx.helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"]))
    graph = onnx.helper.make_graph(nodes, "g", [x], [y])
    assert og.count_params(graph) == 4                        # gamma and beta, 2 channels each


def test_convert_and_inspect_print_one_parameter_count(capsys, tmp_path):
    src = ONNX_REPVGG / "train_keepbn.onnx"
    code, stdout, _ = _run(capsys, "convert", src, tmp_path / "d.onnx", "--json")
    converted = json.loads(stdout)
    assert code == 0
    code, stdout, _ = _run(capsys, "inspect", src, "--json")
    inspected = json.loads(stdout)
    assert code == 0
    assert converted["params_before"] == inspected["params_before"] == 1060
    assert converted["params_after"] == inspected["params_after"] == 910
    assert inspected["cost"]["parameters"]["train"] == "1,060" and inspected["cost"]["parameters"]["deploy"] == "910"
    # the fields both print are the library's report; inspect runs no check
    for key in ("format", "counts_before", "counts_after", "fused", "left", "messages"):
        assert converted[key] == inspected[key], key
    assert inspected["check"] is None and converted["check"]["passed"]


def test_convert_onnx_report_fields():
    model = repnp.io.load_onnx(ONNX_REPVGG / "train.onnx")
    fused, report = repnp.io.convert_onnx(model)
    assert isinstance(report, ConversionReport) and report.format == "onnx"
    assert report.counts_before == og.op_counts(model.graph) and report.counts_after == og.op_counts(fused.graph)
    (f,) = report.fused
    assert isinstance(f, Fused) and f.kind == "Conv 3x3"
    conv = next(n for n in fused.graph.node if n.op_type == "Conv")
    assert f.written[0] == conv.name and f.written[1:] == list(conv.input[1:])
    assert conv.output[0] == f.where
    names = {n.name for n in model.graph.node}
    assert f.merged and set(f.merged) <= names
    assert set(f.detail) == {"source", "kernel_shape", "groups", "strides", "pads", "dilations", "op_types"}
    assert f.detail["source"] == conv.input[0] and f.detail["kernel_shape"] == [3, 3]
    assert set(report.check) == {"engine", "max_error", "max_abs", "tol", "passed", "input_shapes", "seed",
                                 "reason", "messages"}
    assert report.check["tol"] == NETWORK and report.passed and report.max_error == report.check["max_error"]
    assert json.loads(json.dumps(report.to_dict()))["fused"][0]["kind"] == "Conv 3x3"
    text = str(report)
    assert "fused regions: 1" in text and f"{f.where} <- Conv 3x3" in text and "nodes" in text


def test_failed_check_raises_check_failed_carrying_the_report():
    with pytest.raises(CheckFailed) as info:
        repnp.io.convert_onnx(repnp.io.load_onnx(ONNX_REPVGG / "train.onnx"), tol=0.0)
    report = info.value.report
    assert isinstance(report, ConversionReport) and report.passed is False and report.max_error > 0


def test_save_onnx_refuses_an_existing_file_without_force(tmp_path):
    model = repnp.io.load_onnx(ONNX_REPVGG / "deploy.onnx")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(ConversionError, match="exists"):
        repnp.io.save_onnx(model, out)
    assert out.read_bytes() == b"keep me"
    repnp.io.save_onnx(model, out, force=True)
    assert repnp.io.load_onnx(out).SerializeToString() == model.SerializeToString()


def test_save_onnx_never_writes_its_source(tmp_path):
    src = tmp_path / "train.onnx"
    src.write_bytes((ONNX_REPVGG / "train.onnx").read_bytes())
    before = src.read_bytes()
    fused, _ = repnp.io.convert_onnx(repnp.io.load_onnx(src))
    for force in (False, True):
        with pytest.raises(ConversionError, match="input file"):
            repnp.io.save_onnx(fused, src, force=force, source=src)
        # also through another spelling of the same path
        with pytest.raises(ConversionError, match="input file"):
            repnp.io.save_onnx(fused, tmp_path / "." / "train.onnx", force=force, source=src)
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["train.onnx"]      # no temp file left


def test_load_save_round_trip(tmp_path):
    model = repnp.io.load_onnx(ONNX_REPVGG / "train_keepbn.onnx")
    out = repnp.io.save_onnx(model, tmp_path / "copy.onnx")
    assert Path(out) == tmp_path / "copy.onnx"
    again = repnp.io.load_onnx(out)
    assert again.SerializeToString() == model.SerializeToString()
    # and byte-identical to protobuf's own serialization
    assert (tmp_path / "copy.onnx").read_bytes() == model.SerializeToString()


def test_load_onnx_takes_a_path():
    with pytest.raises(ConversionError, match="path"):
        repnp.io.load_onnx(onnx.ModelProto())
    with pytest.raises(ConversionError, match="cannot read"):
        repnp.io.load_onnx(ONNX_REPVGG / "missing.onnx")


def test_compare_models_on_given_inputs_reports_each_output():
    from repnp.io.onnx.check import compare_models, make_inputs

    train = repnp.io.load_onnx(ONNX_REPVGG / "train.onnx")
    deploy = repnp.io.load_onnx(ONNX_REPVGG / "deploy.onnx")
    feeds = make_inputs(train, seed=3)
    res = compare_models(train, deploy, feeds=feeds)
    assert res.seed is None and res.passed and res.tol == NETWORK
    ((name, shape, max_abs, rel),) = res.outputs
    assert name == train.graph.output[0].name and max_abs == res.max_abs and rel == res.max_error
    assert res.input_shapes == {k: v.shape for k, v in feeds.items()}
