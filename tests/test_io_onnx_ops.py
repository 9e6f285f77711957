"""graph_ops: an ONNX graph as an op list, profiled like the block it was exported from.

A block's ``trace`` and the ONNX export of that block describe the same
kernels in the same order, so ``profile_ops(graph_ops(export_onnx(block)))``
must give the cost model's figures for the block itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp import cost, models
from repnp.blocks import MobileOneBlock, RepVGGBlock
from repnp.blocks.dbb import DiverseBranchBlock
from repnp.blocks.shufflenet import ShuffleNetUnit
from repnp.io.onnx.export import build_onnx
from repnp.io.onnx.graph import count_params
from repnp.io.onnx.ops import graph_ops
from repnp.trace import Trace

DATA = Path(__file__).parent / "data" / "onnx"

FIGURES = ("macs", "op_count", "weight_bytes", "traffic_bytes", "peak_activation_bytes",
           "peak_resident_bytes", "input_bytes")


def _same_profile(module, shape):
    want = cost.profile(module, shape)
    model = build_onnx(module, input_shape=shape)
    ops, inputs = graph_ops(model)
    got = cost.profile_ops(ops, inputs, params=count_params(model))
    assert got.params == want.params == cost.count_params(module)
    for name in FIGURES:
        assert getattr(got, name) == getattr(want, name), name
    assert got.op_types() == want.op_types()
    return got


@pytest.mark.parametrize("make", [
    lambda: RepVGGBlock.random(0, 8, 8),
    lambda: RepVGGBlock.random(1, 4, 8, stride=2, groups=2),
    lambda: MobileOneBlock.random(2, 6, 6, num_branches=3, groups=6),
    lambda: MobileOneBlock.random(3, 32, 32, use_se=True),
], ids=["repvgg", "repvgg_s2_g2", "mobileone_dw", "mobileone_se"])
def test_export_profiles_like_the_block(make):
    block = make()
    shape = (2, block.in_channels, 9, 7)
    _same_profile(block, shape)
    _same_profile(block.reparameterize(), shape)


def test_whole_network_profiles_like_its_trace():
    net = models.create("repvgg_a0", num_classes=10)
    train = _same_profile(net, (1, 3, 64, 64))
    deploy = _same_profile(net.reparameterize(), (1, 3, 64, 64))
    # 5 blocks without identity (stem, first of each stage): Conv BN Conv BN Add Relu = 6 ops;
    # 17 with one: + BN Add = 8 ops; head: GlobalAveragePool Flatten Gemm.
    assert train.op_count == 5 * 6 + 17 * 8 + 3
    # repnp.models.repvgg_a0's docstring: 9,108,968 / 8,309,384 with 1000 classes; 10 classes remove
    # 990 rows of the 1280-wide head and their biases
    assert train.params == 9_108_968 - 990 * 1281 and deploy.params == 8_309_384 - 990 * 1281
    assert deploy.op_types() == {"Conv": 22, "Relu": 22, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}


def test_hand_counted_conv_and_gemm():
    # Conv 3 -> 4, 3x3, stride 2, pads 1 on 1x3x8x8: out 1x4x4x4, MACs 64 * 3*3*3 = 1728;
    # Gemm (1, 16) x (16, 5)^T: MACs 5 * 16 = 80.
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    fc = numpy_helper.from_array(np.ones((5, 16), np.float32), "fc")
    shape = numpy_helper.from_array(np.array([1, 16], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Gemm", ["r", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[w, fc, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ops, inputs = graph_ops(model)
    assert inputs[0].shape == (1, 3, 8, 8)           # the dynamic batch defaults to 1
    assert [o.op_type for o in ops] == ["Conv", "Reshape", "Gemm"]
    assert ops[0].output_shape == (1, 4, 4, 4) and ops[0].macs == 1728 and ops[0].weight_bytes == 4 * 108
    assert ops[1].weight_bytes == 16 and ops[1].inputs == ("c",)          # int64 shape: 2 x 8 bytes
    assert ops[2].macs == 80 and ops[2].output_shape == (1, 5)
    ops4, inputs4 = graph_ops(model, input_shape=(4, 3, 8, 8))
    assert inputs4[0].shape == (4, 3, 8, 8) and ops4[0].macs == 4 * 1728


def test_shape_subgraphs_are_constant_and_unknown_shapes_are_measured():
    model = onnx.load(DATA / "off_dbb_k3_c12" / "train.onnx")
    ops, inputs = graph_ops(model)
    kinds = {o.op_type for o in ops}
    assert not kinds & {"Shape", "Constant", "Range", "Expand", "Where", "Equal", "ConstantOfShape", "Unsqueeze"}
    # the border writes of BN-and-pad: shapes from one run, the padded map is 12x16 for a 10x14 input
    scatters = [o for o in ops if o.op_type == "ScatterND"]
    assert len(scatters) == 8 and all(o.output_shape == (2, 12, 12, 16) for o in scatters)
    prof = cost.profile_ops(ops, inputs)       # every read is a graph input or an earlier output
    assert prof.op_count == len(ops)


def test_input_shape_of_wrong_rank():
    model = build_onnx(RepVGGBlock.random(0, 4, 4), input_shape=(1, 4, 5, 5))
    with pytest.raises(ValueError, match="dimensions"):
        graph_ops(model, input_shape=(4, 5, 5))


def test_hand_counted_average_pool():
    # AveragePool 3x3, stride 2, pads 1 on 1x2x8x8: out 1x2x4x4 = 32 windows of 9 taps = 288 MACs
    # (padded taps included, count_include_pad 0 or 1 alike: repnp.cost's convention).
    for include in (0, 1):
        node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1], count_include_pad=include)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        ops, _ = graph_ops(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
        assert [(o.op_type, o.output_shape, o.macs) for o in ops] == [("AveragePool", (1, 2, 4, 4), 288)]


@pytest.mark.parametrize("make, shape", [
    (lambda: DiverseBranchBlock.random(0, 8, 8), (1, 8, 8, 8)),
    (lambda: DiverseBranchBlock.random(1, 6, 8, stride=2, groups=2), (2, 6, 9, 7)),
    (lambda: ShuffleNetUnit.random(2, 12, 24, stride=2), (1, 12, 8, 8)),
    (lambda: ShuffleNetUnit.random(3, 8, 16, groups=2, stride=2), (2, 8, 7, 9)),
], ids=["dbb", "dbb_s2_g2", "shufflenet_s2", "shufflenet_s2_g2"])
def test_average_pool_macs_match_the_block_trace(make, shape):
    # Blocks with an AveragePool (DBB's pooling branch, ShuffleNet's stride-2 shortcut):
    # the export's op list must count the pool's MACs as the block's trace does.
    block = make()
    want = cost.profile(block, shape)
    ops, inputs = graph_ops(build_onnx(block, input_shape=shape))
    got = cost.profile_ops(ops, inputs)
    assert got.macs == want.macs
    t = Trace()
    block.trace(t, t.input(shape))
    traced = [o.macs for o in t.ops if o.op_type == "AveragePool"]
    pools = [o.macs for o in ops if o.op_type == "AveragePool"]
    assert pools and sorted(pools) == sorted(traced)
