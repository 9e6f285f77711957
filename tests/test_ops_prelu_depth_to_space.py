"""repnp.ops.prelu and repnp.ops.depth_to_space (ECBSR's PReLU and PixelShuffle) against onnxruntime,
and the dataflow nodes that use them (PRelu, DepthToSpace, Div, ReduceL2, ReduceMean) through
run, infer_shapes and the exporter."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp import ops
from repnp.dataflow import Dataflow, infer_shapes, run
from repnp.errors import ShapeError
from repnp.io.onnx.check import run_model
from repnp.tolerance import relative_error


def _single_node_model(op, x_shape, inits=(), opset=17, **attrs):
    names = [f"i{k}" for k in range(len(inits))]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", *names], ["y"], **attrs)], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in zip(names, inits)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("slope_shape", [(5, 1, 1), (1,), (1, 5, 1, 1)])
def test_prelu_matches_onnxruntime(slope_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    x[0, 0, 0, :2] = [0.0, -0.0]
    slope = rng.standard_normal(slope_shape).astype(np.float32)
    ref = run_model(_single_node_model("PRelu", x.shape, [slope]), {"x": x})[0][0]
    got = ops.prelu(x, slope)
    assert got.dtype == np.float32 and np.array_equal(got, ref)


def test_prelu_rejects_a_slope_that_does_not_broadcast():
    with pytest.raises(ShapeError, match=r"slope of shape \(4,\)"):
        ops.prelu(np.zeros((1, 5, 2, 2)), np.ones(4))


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
@pytest.mark.parametrize("r, c", [(2, 1), (3, 2), (1, 3)])
def test_depth_to_space_matches_onnxruntime(mode, r, c):
    x = np.random.default_rng(1).standard_normal((2, c * r * r, 3, 4)).astype(np.float32)
    ref = run_model(_single_node_model("DepthToSpace", x.shape, blocksize=r, mode=mode), {"x": x})[0][0]
    got = ops.depth_to_space(x, r, mode=mode)
    assert got.shape == (2, c, 3 * r, 4 * r) and np.array_equal(got, ref)


def test_depth_to_space_crd_is_pixel_shuffle():
    """PyTorch's PixelShuffle: out[n, c, h r + i, w r + j] = in[n, c r^2 + i r + j, h, w]."""
    r, c = 2, 3
    x = np.arange(2 * c * r * r * 3 * 2, dtype=np.float64).reshape(2, c * r * r, 3, 2)
    y = ops.depth_to_space(x, r)
    for n, ch, h, w, i, j in [(0, 0, 0, 0, 1, 0), (1, 2, 2, 1, 1, 1), (0, 1, 1, 0, 0, 1)]:
        assert y[n, ch, h * r + i, w * r + j] == x[n, ch * r * r + i * r + j, h, w]


@pytest.mark.parametrize("shape, r, mode", [((1, 6, 2, 2), 2, "CRD"), ((1, 4, 2), 2, "CRD"),
                                            ((1, 4, 2, 2), 0, "CRD"), ((1, 4, 2, 2), 2, "XYZ")])
def test_depth_to_space_rejects_bad_input(shape, r, mode):
    with pytest.raises(ValueError, match="blocksize|mode|NCHW"):
        ops.depth_to_space(np.zeros(shape), r, mode=mode)


def test_dataflow_nodes_run_shape_and_reject():
    rng = np.random.default_rng(2)
    d = Dataflow()
    x = d.input()
    g = d.node("ReduceL2", [x], "grn.", axes=[2, 3], keepdims=1)
    m = d.node("ReduceMean", [g], "grn.", axes=[1], keepdims=1)
    n = d.node("Div", [g, m], "grn.")
    y = d.node("PRelu", [d.node("Mul", [x, n], ""), d.param("act.weight", rng.standard_normal((4, 1, 1)))], "")
    d.outputs.append(d.node("DepthToSpace", [y], "", blocksize=2, mode="CRD"))
    xv = rng.standard_normal((2, 4, 3, 5))
    shapes = infer_shapes(d, xv.shape)
    assert shapes[g] == (2, 4, 1, 1) and shapes[m] == (2, 1, 1, 1) and shapes[d.outputs[0]] == (2, 1, 6, 10)
    gv = np.sqrt((xv ** 2).sum(axis=(2, 3), keepdims=True))
    ref = ops.depth_to_space(ops.prelu(xv * (gv / gv.mean(axis=1, keepdims=True)), d.params["act.weight"]), 2)
    assert relative_error(run(d, xv), ref) <= 1e-12
    assert run(d, xv.astype(np.float32)).dtype == np.float32
    with pytest.raises(ShapeError, match=r"DepthToSpace.*\(2, 4, 3, 5\)"):
        d2 = Dataflow()
        d2.outputs.append(d2.node("DepthToSpace", [d2.input()], "up.", blocksize=3, mode="CRD"))
        infer_shapes(d2, (2, 4, 3, 5))
    with pytest.raises(ShapeError, match=r"Div .*do not broadcast"):
        d3 = Dataflow()
        xin = d3.input()
        d3.outputs.append(d3.node("Div", [xin, d3.param("w", np.ones(3))], "s."))
        infer_shapes(d3, (1, 4, 2, 2))

