"""QARepVGG (BN after the sum, v2's AveragePool) and yolov7 RepConv as small ONNX graphs built with
onnx.helper: onnxruntime on the unfused graph agrees with the block's forward, the converter gives one
Conv (+ the activation) per block and is never costlier."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repnp import cost
from repnp.blocks import QARepVGGBlock, RepVGGBlock
from repnp.io.onnx.check import run_model
from repnp.io.onnx.convert import convert_onnx
from repnp.tolerance import FLOAT32, NETWORK, relative_error

SHAPE = (1, 6, 9, 8)


def _bn_node(prefix, src, out, bn, inits):
    for k, v in (("g", bn.gamma), ("b", bn.beta), ("m", bn.mean), ("v", bn.var)):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), f"{prefix}.{k}"))
    return helper.make_node("BatchNormalization", [src] + [f"{prefix}.{k}" for k in "gbmv"], [out],
                            epsilon=float(bn.eps))


def _conv_node(prefix, src, out, conv, inits, *, bias=None):
    inits.append(numpy_helper.from_array(conv.weight.astype(np.float32), f"{prefix}.w"))
    inputs = [src, f"{prefix}.w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), f"{prefix}.b"))
        inputs.append(f"{prefix}.b")
    k = conv.weight.shape[2]
    p = conv.padding if isinstance(conv.padding, int) else conv.padding[0]
    return helper.make_node("Conv", inputs, [out], kernel_shape=[k, k], pads=[p] * 4, group=conv.groups,
                            strides=[conv.stride] * 2 if isinstance(conv.stride, int) else list(conv.stride))


def _model(nodes, inits, out_channels, out_hw):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [1, out_channels, *out_hw])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _qarepvgg_graph(block, *, fold_dense_bn: bool, count_include_pad: int = 1):
    """As PyTorch exports YOLOv6's QARepVGGBlock(V2): dense Conv (its BN folded or kept), 1x1 Conv,
    [x], [AveragePool], Adds, the post-sum BatchNormalization, Relu."""
    nodes, inits = [], []
    k = block.conv_kxk
    if fold_dense_bn:
        w, b = k.fused()
        nodes.append(_conv_node("dense", "x", "d", type(k.conv)(w, None, padding=k.conv.padding,
                                                              stride=k.conv.stride, groups=k.conv.groups),
                                inits, bias=b))
    else:
        nodes += [_conv_node("dense", "x", "d0", k.conv, inits), _bn_node("dense.bn", "d0", "d", k.bn, inits)]
    nodes.append(_conv_node("one", "x", "o", block.conv_1x1, inits))
    nodes.append(helper.make_node("Add", ["d", "o"], ["s1"]))
    last = "s1"
    if block.identity:
        nodes.append(helper.make_node("Add", [last, "x"], ["s2"]))
        last = "s2"
    if block.avg:
        nodes += [helper.make_node("AveragePool", ["x"], ["a"], kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1],
                                   count_include_pad=count_include_pad),
                  helper.make_node("Add", [last, "a"], ["s3"])]
        last = "s3"
    nodes += [_bn_node("bn", last, "z", block.bn, inits), helper.make_node("Relu", ["z"], ["y"])]
    out_hw = block.reparameterize().conv.output_shape(SHAPE)[2:]
    return _model(nodes, inits, block.out_channels, out_hw)


def _counts(model):
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fold_dense_bn", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_qarepvgg_graph_runs_like_the_block_and_fuses_to_one_conv(version, fold_dense_bn, groups):
    block = QARepVGGBlock.random(version * 10 + groups, 6, 6, groups=groups, version=version, eps=1e-3,
                                 dtype=np.float32)
    model = _qarepvgg_graph(block, fold_dense_bn=fold_dense_bn)
    x = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    (y_ort,), _ = run_model(model, {"x": x})
    assert relative_error(y_ort, block.forward(x)) <= FLOAT32          # the block is what YOLOv6 computes
    fused, report = convert_onnx(model)
    assert _counts(fused) == Counter({"Conv": 1, "Relu": 1})
    (y,), _ = run_model(fused, {"x": x})
    assert relative_error(y, y_ort) <= NETWORK
    weight = next(numpy_helper.to_array(t) for t in fused.graph.initializer if t.name == fused.graph.node[0].input[1])
    assert weight.shape == (6, 6 // groups, 3, 3)                       # never costlier: the dense conv's size
    assert relative_error(weight, block.reparameterize().conv.weight) <= NETWORK
    assert report.check["passed"]


def test_qarepvgg_block_deploy_is_never_costlier():
    for version in (1, 2):
        block = QARepVGGBlock.random(0, 8, 8, version=version)
        train, deploy = cost.profile(block, (1, 8, 16, 16)), cost.profile(block.reparameterize(), (1, 8, 16, 16))
        assert deploy.macs <= train.macs and deploy.params <= train.params


def test_averagepool_without_padding_counted_is_not_fused_wrongly():
    """ONNX's default count_include_pad=0 divides border windows by the real pixels only: that is no
    convolution at the borders. Whatever the converter does, the output stays the input's."""
    block = QARepVGGBlock.random(3, 6, 6, version=2, dtype=np.float32)
    model = _qarepvgg_graph(block, fold_dense_bn=True, count_include_pad=0)
    fused, report = convert_onnx(model)
    x = np.random.default_rng(8).standard_normal(SHAPE).astype(np.float32)
    (a,), _ = run_model(model, {"x": x})
    (b,), _ = run_model(fused, {"x": x})
    assert relative_error(b, a) <= NETWORK and report.check["passed"]
    assert _counts(fused)["AveragePool"] == 1


@pytest.mark.parametrize("groups", [2, 6])
def test_yolov7_repconv_graph_with_bn_kept_is_one_conv(groups):
    """yolov7's RepConv exported with every BN kept (rbr_dense.1, rbr_1x1.1, rbr_identity), SiLU as
    Sigmoid * x: one grouped / depthwise Conv, exact (yolov7's own fuse is not, for these groups)."""
    block = RepVGGBlock.random(groups, 6, 6, groups=groups, activation="silu", eps=1e-3, dtype=np.float32)
    nodes, inits = [], []
    nodes += [_conv_node("rbr_dense.0", "x", "d0", block.conv_kxk.conv, inits),
              _bn_node("rbr_dense.1", "d0", "d", block.conv_kxk.bn, inits),
              _conv_node("rbr_1x1.0", "x", "o0", block.conv_1x1.conv, inits),
              _bn_node("rbr_1x1.1", "o0", "o", block.conv_1x1.bn, inits),
              _bn_node("rbr_identity", "x", "i", block.identity, inits),
              helper.make_node("Add", ["d", "o"], ["s1"]), helper.make_node("Add", ["s1", "i"], ["z"]),
              helper.make_node("Sigmoid", ["z"], ["g"]), helper.make_node("Mul", ["z", "g"], ["y"])]
    model = _model(nodes, inits, 6, SHAPE[2:])
    x = np.random.default_rng(9).standard_normal(SHAPE).astype(np.float32)
    (y_ort,), _ = run_model(model, {"x": x})
    assert relative_error(y_ort, block.forward(x)) <= FLOAT32
    fused, report = convert_onnx(model)
    assert _counts(fused) == Counter({"Conv": 1, "Sigmoid": 1, "Mul": 1})
    assert fused.graph.node[0].attribute[[a.name for a in fused.graph.node[0].attribute].index("group")].i == groups
    (y,), _ = run_model(fused, {"x": x})
    assert relative_error(y, y_ort) <= NETWORK and report.check["passed"]
