"""Bad input for the ONNX converter: clear ConversionError (a ValueError), the input never
modified, no partial output left behind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_io_onnx_convert import Builder, repvgg

from repnp.errors import ConversionError
from repnp.io.onnx.convert import convert_onnx
from repnp.io.onnx.write import save_onnx

CASE = Path(__file__).parent / "data" / "onnx" / "timm_repvgg_ident_c12" / "train.onnx"


def test_truncated_garbage_and_empty_files(tmp_path):
    data = CASE.read_bytes()
    for name, payload in [("trunc.onnx", data[: len(data) // 2]), ("garbage.onnx", os.urandom(4096)),
                          ("empty.onnx", b""), ("text.onnx", b"not a model at all\n" * 20)]:
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ConversionError):
            convert_onnx(path)
        assert path.read_bytes() == payload
    with pytest.raises(ConversionError, match="cannot read"):
        convert_onnx(tmp_path / "missing.onnx")


def _external_model(location: str) -> onnx.ModelProto:
    b = Builder(seed=1)
    m = b.model([repvgg(b, "x", 6)])
    tensor = m.graph.initializer[0]
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return m


def test_external_data_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "x").write_bytes(np.zeros(1000, np.float32).tobytes())   # the target even exists
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    for location in ["../../x", str(tmp_path / "x")]:
        path = folder / "model.onnx"
        path.write_bytes(_external_model(location).SerializeToString())
        with pytest.raises(ConversionError, match="outside the model's folder"):
            convert_onnx(path)
    os.symlink(tmp_path / "x", folder / "link.bin")                      # a symlink escape too
    path.write_bytes(_external_model("link.bin").SerializeToString())
    with pytest.raises(ConversionError, match="outside the model's folder"):
        convert_onnx(path)
    with pytest.raises(ConversionError, match="external data"):
        convert_onnx(_external_model("weights.bin"))                     # a proto: folder unknown


def test_external_data_inside_the_folder_is_loaded(tmp_path):
    b = Builder(seed=2)
    m = b.model([repvgg(b, "x", 6)])
    onnx.save_model(m, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    new, report = convert_onnx(tmp_path / "m.onnx")
    assert report.check["passed"] and len(report.fused) == 1


def test_missing_initializer():
    b = Builder(seed=3)
    out = b.node("Conv", ["x", "no_such_weight"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    with pytest.raises(ConversionError, match="no_such_weight"):
        convert_onnx(_model_unchecked(b, [out]))


def _model_unchecked(b, outputs):
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", "c", "h", "w"]) for o in outputs]
    graph = helper.make_graph(b.nodes, "g", [b.input], outs, b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_bn_length_does_not_match_the_conv():
    b = Builder(seed=4)
    conv = b.conv("x", 6, 8, 3)
    out = b.bn(conv, 6)                       # 6 statistics after an 8-channel conv
    with pytest.raises(ConversionError, match="6 channels.*8"):
        convert_onnx(_model_unchecked(b, [out]))


def test_cycle_is_refused():
    b = Builder(seed=5)
    w = b.const(np.ones((6, 6, 1, 1)))
    b.nodes.append(helper.make_node("Add", ["x", "t2"], ["t1"], name="a"))
    b.nodes.append(helper.make_node("Conv", ["t1", w], ["t2"], name="c", kernel_shape=[1, 1]))
    with pytest.raises(ConversionError, match="cycle"):
        convert_onnx(_model_unchecked(b, ["t2"]))


def test_training_mode_batchnorm_is_refused():
    b = Builder(seed=6)
    conv = b.conv("x", 6, 6, 3)
    gamma, beta, mean, var = b.bn_stats(6)
    out = b.node("BatchNormalization", [conv, b.const(gamma), b.const(beta), b.const(mean), b.const(var)],
                 training_mode=1)
    with pytest.raises(ConversionError, match="training"):
        convert_onnx(_model_unchecked(b, [out]))


def test_conversion_error_is_a_value_error():
    assert issubclass(ConversionError, ValueError)


def test_input_never_modified_and_failed_check_writes_nothing(tmp_path):
    b = Builder(seed=7)
    m = b.model([repvgg(b, "x", 6)])
    src = tmp_path / "in.onnx"
    src.write_bytes(m.SerializeToString())
    before, mtime = src.read_bytes(), src.stat().st_mtime_ns
    proto_before = m.SerializeToString()
    convert_onnx(m)
    assert m.SerializeToString() == proto_before           # a ModelProto argument is copied
    with pytest.raises(ConversionError, match="differs from the original"):
        convert_onnx(src, tol=1e-12)                        # float32 rounding alone exceeds it
    assert src.read_bytes() == before and src.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_atomic_save_refuses_overwrites_and_leaves_no_temp(tmp_path):
    b = Builder(seed=8)
    m = b.model([repvgg(b, "x", 6)])
    new, _ = convert_onnx(m)
    out = tmp_path / "out.onnx"
    save_onnx(new, out)
    assert onnx.load(str(out)).graph.node[0].op_type == "Conv"
    with pytest.raises(ConversionError, match="exists"):
        save_onnx(new, out)
    save_onnx(m, out, force=True)
    assert len(onnx.load(str(out)).graph.node) == len(m.graph.node)
    with pytest.raises(ConversionError, match="input file"):
        save_onnx(new, out, force=True, source=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
