"""repnp.dataflow: one description per block, three interpreters (run, trace, export)."""

import numpy as np
import pytest

from repnp import ops
from repnp.blocks import DiverseBranchBlock, RepVGGBlock
from repnp.blocks.base import BatchNorm
from repnp.dataflow import Dataflow, describe_module, infer_shapes, run, trace_dataflow, weight_only
from repnp.errors import ShapeError
from repnp.tolerance import relative_error
from repnp.trace import Trace


def _conv_bn_relu_flow(rng):
    """x -> Conv(3x3, stride 2, pad 1) -> BN -> Add(x pooled) -> Relu, built by hand."""
    d = Dataflow()
    x = d.input()
    w = d.param("conv.weight", rng.standard_normal((4, 3, 3, 3)))
    b = d.param("conv.bias", rng.standard_normal(4))
    y = d.conv(x, w, b, "conv.", kernel_shape=(3, 3), stride=2, padding=1)
    stats = [d.param(f"bn.{k}", v) for k, v in (("gamma", rng.uniform(0.5, 1.5, 4)),
                                                 ("beta", rng.standard_normal(4)),
                                                 ("mean", rng.standard_normal(4)),
                                                 ("var", rng.uniform(0.5, 2, 4)))]
    y = d.node("BatchNormalization", [y, *stats], "bn.", epsilon=1e-3)
    d.outputs.append(d.node("Relu", [y], ""))
    return d


def test_run_is_the_ops_composition():
    rng = np.random.default_rng(0)
    d = _conv_bn_relu_flow(rng)
    x = rng.standard_normal((2, 3, 7, 6))
    p = d.params
    ref = ops.relu(ops.batch_norm(ops.conv2d(x, p["conv.weight"], p["conv.bias"], stride=2, padding=1),
                                  p["bn.mean"], p["bn.var"], p["bn.gamma"], p["bn.beta"], eps=1e-3))
    assert relative_error(run(d, x), ref) <= 1e-12
    assert run(d, x.astype(np.float32)).dtype == np.float32       # the input's dtype, parameters cast


def test_shapes_and_trace_records():
    d = _conv_bn_relu_flow(np.random.default_rng(1))
    shapes = infer_shapes(d, (2, 3, 7, 6))
    assert shapes[d.outputs[0]] == (2, 4, 4, 3)          # floor((7 + 2 - 3) / 2) + 1 = 4, (6 + 2 - 3) // 2 + 1 = 3
    t = Trace()
    trace_dataflow(d, t, t.input((2, 3, 7, 6)))
    conv, bn, relu = t.ops
    assert (conv.op_type, bn.op_type, relu.op_type) == ("Conv", "BatchNormalization", "Relu")
    assert conv.macs == 2 * 4 * 4 * 3 * 3 * 3 * 3 and conv.weight_bytes == (4 * 3 * 3 * 3 + 4) * 4
    assert bn.weight_bytes == 4 * 4 * 4 and relu.weight_bytes == 0


def test_shape_errors_name_the_scope_and_shapes():
    d = Dataflow()
    x = d.input()
    stats = [d.param(f"bn.{k}", np.ones(3)) for k in ("gamma", "beta", "mean", "var")]
    d.outputs.append(d.node("BatchNormalization", [x, *stats], "bn.", epsilon=1e-5))
    with pytest.raises(ShapeError, match=r"BN 'bn' has 3 channels, its input has shape \(1, 4, 5, 5\)"):
        infer_shapes(d, (1, 4, 5, 5))


def test_reshape_zero_and_minus_one_follow_onnx():
    d = Dataflow()
    x = d.input()
    d.outputs.append(d.node("Reshape", [x], "", shape=[0, -1, 2]))
    a = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    assert run(d, a).shape == (2, 6, 2) and infer_shapes(d, (2, 3, 4))[d.outputs[0]] == (2, 6, 2)


def test_weight_only_nodes_compute_weights_and_launch_nothing():
    # DBB's identity-based 1x1 applies delta + I: an Add of a parameter and a constant.
    block = DiverseBranchBlock.random(0, 4, 4)
    flow = block.dataflow
    static = weight_only(flow)
    assert len(static) == 1
    (node,) = [n for n in flow.nodes if n.output in static]
    assert node.op == "Add" and node.inputs[0] == "seq.idconv1.weight"
    t = Trace()
    block.trace(t, t.input((1, 4, 6, 6)))
    assert len(t.ops) == len(flow.nodes) - 1


def test_params_are_the_described_parameters_in_order():
    block = RepVGGBlock.random(0, 4, 4)
    names = list(block.params())
    assert names[:5] == ["conv_kxk.conv.weight", "conv_kxk.bn.mean", "conv_kxk.bn.var", "conv_kxk.bn.gamma",
                         "conv_kxk.bn.beta"]
    assert names[-4:] == ["identity.mean", "identity.var", "identity.gamma", "identity.beta"]
    assert all(block.params()[k] is v for k, v in block.dataflow.params.items())   # no copies
    assert list(block.params("s.0."))[0] == "s.0.conv_kxk.conv.weight"


def test_a_parameter_declared_twice_is_refused():
    d = Dataflow()
    d.param("w", np.ones(1))
    with pytest.raises(ValueError, match="'w' declared twice"):
        d.param("w", np.ones(1))


def test_the_description_is_readable():
    text = repr(describe_module(BatchNorm(np.zeros(2), np.ones(2), np.ones(2), np.zeros(2))))
    assert "BatchNormalization(input, gamma, beta, mean, var; epsilon=1e-05)" in text


def test_pad_channels_and_slice_evaluate_like_ops():
    d = Dataflow()
    x = d.input()
    value = d.const(np.array([1.5, -2.0]), "", "pad_value")
    padded = d.node("PadChannels", [x, value], "", pads=[1, 2, 1, 2])
    d.outputs.append(d.node("Slice", [padded], "", starts=[1], ends=[-1], axes=[3]))
    a = np.random.default_rng(3).standard_normal((1, 2, 3, 3))
    ref = ops.pad2d(a, (1, 2, 1, 2), value=np.array([1.5, -2.0]))[..., 1:-1]
    assert np.array_equal(run(d, a), ref)
    assert infer_shapes(d, a.shape)[d.outputs[0]] == ref.shape


def test_run_checks_the_number_of_inputs():
    d = _conv_bn_relu_flow(np.random.default_rng(0))
    with pytest.raises(ValueError, match="takes 1 input"):
        run(d, np.zeros((1, 3, 4, 4)), np.zeros((1, 3, 4, 4)))
