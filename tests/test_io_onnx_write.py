"""repnp.io.onnx.write: the piecewise serialization is byte-identical to protobuf's own, and the
atomic writer keeps the output-path rules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp.errors import ConversionError
from repnp.io.onnx.write import save_onnx, serialized_chunks


def _joined(model):
    size, chunks = serialized_chunks(model)
    data = b"".join(c() if callable(c) else c for c in chunks)
    assert len(data) == size
    return data


def _model(*, ir=8, n_inits=3, big=5000, extras=True):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w0")]
    # sizes that make the varint lengths take 1, 2 and 3 bytes
    for k, n in enumerate([1, 100, big][:n_inits - 1]):
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"v{k}"))
    inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), "shape_int"))  # int64, raw_data
    inits.append(helper.make_tensor("typed", TensorProto.FLOAT, [2], [1.5, -2.0]))   # float_data storage
    nodes = [helper.make_node("Conv", ["x", "w0"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], inits,
                              doc_string="graph doc" if extras else None)
    if extras:
        graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5]))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="repnp-test",
                          doc_string="model doc" if extras else "")
    m.ir_version = ir
    if extras:
        helper.set_model_props(m, {"author": "test"})
    return m


@pytest.mark.parametrize("ir,n_inits,extras", [(8, 3, True), (3, 1, False), (10, 2, True)])
def test_chunks_are_byte_identical_to_serialize_to_string(ir, n_inits, extras):
    m = _model(ir=ir, n_inits=n_inits, extras=extras)
    assert _joined(m) == m.SerializeToString()


def test_chunks_of_a_model_without_graph_or_initializers():
    m = onnx.ModelProto(ir_version=8, producer_name="x")
    assert _joined(m) == m.SerializeToString()
    g = _model()
    del g.graph.initializer[:]
    assert _joined(g) == g.SerializeToString()


def test_large_initializer_length_prefix():
    # a 3-byte varint length (> 16 KiB) and a 4-byte one (> 2 MiB)
    m = _model(big=600_000)
    data = _joined(m)
    assert data == m.SerializeToString()
    back = onnx.ModelProto()
    back.ParseFromString(data)
    np.testing.assert_array_equal(numpy_helper.to_array(back.graph.initializer[3]),
                                  numpy_helper.to_array(m.graph.initializer[3]))


def test_save_onnx_writes_and_refuses(tmp_path):
    m = _model()
    out = tmp_path / "m.onnx"
    save_onnx(m, out)
    assert out.read_bytes() == m.SerializeToString()
    with pytest.raises(ConversionError, match="exists"):
        save_onnx(m, out)
    m.producer_name = "changed"
    save_onnx(m, out, force=True)
    assert onnx.load(out).producer_name == "changed"
    with pytest.raises(ConversionError, match="input file"):
        save_onnx(m, out, force=True, source=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]     # no temp file left


def test_unknown_fields_of_a_newer_exporter_are_kept():
    m = _model()
    data = m.SerializeToString() + b"\xf8\x07\x05"      # field 127 (varint 5): unknown to onnx
    newer = onnx.ModelProto()
    newer.ParseFromString(data)
    assert _joined(newer) == newer.SerializeToString() and _joined(newer).endswith(b"\xf8\x07\x05")
