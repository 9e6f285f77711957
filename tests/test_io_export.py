"""export_onnx: every block family and small whole networks, both exporter styles.

The exported train form, run in onnxruntime, must equal ``module.forward``
(tolerance rule: float32 1e-5 for blocks, 1e-4 for networks), and the round
trip ``convert_onnx(export_onnx(train))`` must leave one Conv (+ activation)
per rep block with the same output.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import models
from repnp.blocks import BatchNorm, ConvBN, InvertedResidual, MobileOneBlock, MobileOneUnit, RepVGGBlock, Sequential
from repnp.blocks.acnet import ACBlock
from repnp.blocks.common import Activation
from repnp.blocks.dbb import DiverseBranchBlock
from repnp.blocks.repmlp import RepMLPBlock
from repnp.blocks.resrep import CompactorConv, ResRepNet
from repnp.blocks.separable import DepthwiseSeparableBlock, LinearBottleneckBlock, RegularConvBlock
from repnp.blocks.shufflenet import ShuffleNetUnit
from repnp.errors import ConversionError, ShapeError
from repnp.io import convert_onnx, export_onnx
from repnp.io.onnx.export import build_onnx
from repnp.tolerance import relative_error as _err

ort = pytest.importorskip("onnxruntime")


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]




#: name -> (block factory, input (C, H, W), number of rep blocks, expected ops after conversion)
BLOCKS = {
    "repvgg_groups": (lambda: RepVGGBlock.random(0, 6, 6, groups=2), (6, 9, 10), {"Conv": 1, "Relu": 1}),
    "repvgg_s2": (lambda: RepVGGBlock.random(1, 4, 8, stride=2), (4, 9, 10), {"Conv": 1, "Relu": 1}),
    "repvgg_dilated_gelu": (lambda: RepVGGBlock.random(2, 4, 4, dilation=2, activation="gelu"), (4, 9, 10),
                            None),
    "repvgg_k5_hardswish": (lambda: RepVGGBlock.random(3, 4, 4, kernel_size=5, activation="hardswish"),
                            (4, 8, 8), {"Conv": 1, "HardSwish": 1}),
    "mobileone_dw_se_silu": (lambda: MobileOneBlock.random(4, 16, 16, num_branches=3, groups=16, use_se=True,
                                                           activation="silu"), (16, 7, 6), None),
    "mobileone_unit_s2": (lambda: MobileOneUnit.random(5, 6, 8, stride=2, num_branches=2), (6, 9, 9),
                          {"Conv": 2, "Relu": 2}),
    "acnet_crop": (lambda: ACBlock.random(6, 4, 6, kernel_size=5, stride=2, padding=1), (4, 11, 9), {"Conv": 1}),
    "acnet_same": (lambda: ACBlock.random(7, 4, 6, kernel_size=3, groups=2), (4, 8, 7), {"Conv": 1}),
    "dbb": (lambda: DiverseBranchBlock.random(8, 6, 6), (6, 8, 9), {"Conv": 1}),
    "dbb_depthwise": (lambda: DiverseBranchBlock.random(9, 6, 6, groups=6), (6, 7, 8), {"Conv": 1}),
    "dbb_s2_grouped": (lambda: DiverseBranchBlock.random(10, 4, 8, stride=2, groups=2, internal_channels=8),
                       (4, 9, 8), {"Conv": 1}),
    "dbb_k5_plain_1x1": (lambda: DiverseBranchBlock.random(22, 4, 5, kernel_size=5, internal_channels=2),
                         (4, 9, 8), {"Conv": 1}),
    "dbb_k1": (lambda: DiverseBranchBlock.random(23, 4, 4, kernel_size=1), (4, 5, 6), {"Conv": 1}),
    "inverted_residual": (lambda: InvertedResidual.random(11, 8, 8), (8, 6, 6), None),
    # ResRep: the compactor (a square 1x1 after KxK conv-BN) is merged into the conv when that
    # is no costlier (issue 13, item 7): after a dense conv it is; after a grouped one the merged
    # conv would be dense, 216 weights instead of 108 + 36, so the BN is folded and nothing else.
    "resrep_compactor": (lambda: CompactorConv.random(13, 4, 6, stride=2, groups=2), (4, 9, 8), {"Conv": 2}),
    "resrep_net_conv": (lambda: ResRepNet.random(14, 4, 6, 5), (4, 8, 8), {"Conv": 2, "Relu": 1}),
    "resrep_net_linear": (lambda: ResRepNet.random(15, 4, 6, 5, head="linear", input_size=(8, 8)), (4, 8, 8),
                          {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}),
    "regular_conv": (lambda: RegularConvBlock.random(16, 3, 5), (3, 8, 8), {"Conv": 1, "Relu": 1}),
    "depthwise_separable": (lambda: DepthwiseSeparableBlock.random(17, 4, 6, stride=2), (4, 8, 8),
                            {"Conv": 2, "Relu": 2}),
    "linear_bottleneck": (lambda: LinearBottleneckBlock.random(18, 8, 8), (8, 8, 8), None),
    "shufflenet_s1": (lambda: ShuffleNetUnit.random(19, 24, 24, groups=3), (24, 8, 8), None),
    "shufflenet_s2": (lambda: ShuffleNetUnit.random(20, 24, 48, groups=3, stride=2), (24, 8, 8), None),
    "sequential_relu6": (lambda: Sequential((ConvBN.random(np.random.default_rng(12), 3, 5, 3, padding=1),
                                             Activation("relu6"))), (3, 6, 6), None),
}


@pytest.mark.parametrize("fold_bn", [False, True], ids=["keepbn", "folded"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_export_matches_forward_and_converts(name, fold_bn):
    make, chw, after = BLOCKS[name]
    block = make()
    x = np.random.default_rng(99).standard_normal((2, *chw)).astype(np.float32)
    ref = block.forward(x.astype(np.float64))
    model = build_onnx(block, fold_bn=fold_bn, input_shape=x.shape)
    onnx.checker.check_model(model, full_check=True)
    assert _err(_run(model, x), ref) <= 1e-5
    deploy = build_onnx(block.reparameterize(), fold_bn=fold_bn, input_shape=x.shape)
    assert _err(_run(deploy, x), ref) <= 1e-5
    fused, report = convert_onnx(model)
    assert report.check["passed"] and report.check["max_error"] <= 1e-5
    assert _err(_run(fused, x), ref) <= 1e-5
    ops = Counter(n.op_type for n in fused.graph.node)
    assert "BatchNormalization" not in ops
    if after is not None:
        assert dict(ops) == after
    # the converter never leaves more nodes of a type than the deploy-form export has (ResRep's
    # deploy form also merges the compactor into its conv and prunes: not an ONNX-level fusion)
    if not name.startswith("resrep"):
        deploy_ops = Counter(n.op_type for n in deploy.graph.node)
        assert all(ops[k] <= deploy_ops[k] for k in ops), (ops, deploy_ops)


@pytest.mark.parametrize("fold_bn", [False, True], ids=["keepbn", "folded"])
def test_repmlp_export_matches_forward(fold_bn):
    block = RepMLPBlock.random(21, 8, 6, 7, share_sets=4)
    x = np.random.default_rng(3).standard_normal((2, 8, 6, 7)).astype(np.float32)
    ref = block.forward(x.astype(np.float64))
    model = build_onnx(block, fold_bn=fold_bn)          # default input: the block's fixed (1, C, H, W)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 8, 6, 7]
    model = build_onnx(block, fold_bn=fold_bn, input_shape=x.shape)
    assert _err(_run(model, x), ref) <= 1e-5
    assert _err(_run(build_onnx(block.reparameterize(), input_shape=x.shape), x), ref) <= 1e-5


@pytest.mark.parametrize("fold_bn", [False, True], ids=["keepbn", "folded"])
def test_repmlp_export_converts(fold_bn):
    block = RepMLPBlock.random(21, 8, 6, 7, share_sets=4)
    x = np.random.default_rng(3).standard_normal((2, 8, 6, 7)).astype(np.float32)
    fused, report = convert_onnx(build_onnx(block, fold_bn=fold_bn, input_shape=x.shape))
    assert report.check["passed"]
    assert _err(_run(fused, x), block.forward(x.astype(np.float64))) <= 1e-5
    ops = Counter(n.op_type for n in fused.graph.node)
    # FC + three local conv-BN branches: one grouped 1x1 Conv (the shared FC), as SharedFC exports
    assert "BatchNormalization" not in ops and "Add" not in ops and ops["Conv"] == 1


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_keepbn_style_carries_every_parameter_under_its_name(name):
    make, chw, _ = BLOCKS[name]
    block = make()
    model = build_onnx(block, input_shape=(1, *chw))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for key, value in block.params().items():
        assert key in inits, key
        np.testing.assert_array_equal(inits[key].reshape(value.shape), value.astype(np.float32))


def test_keepbn_initializers_are_the_params_names():
    block = RepVGGBlock.random(0, 4, 4)
    model = build_onnx(block, input_shape=(1, 4, 5, 5))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    params = block.params()
    assert set(inits) == set(params)
    for k, v in params.items():
        np.testing.assert_array_equal(inits[k], v.astype(np.float32))
    kinds = Counter(n.op_type for n in model.graph.node)
    assert kinds == {"Conv": 2, "BatchNormalization": 3, "Add": 2, "Relu": 1}
    eps = [a.f for n in model.graph.node if n.op_type == "BatchNormalization" for a in n.attribute
           if a.name == "epsilon"]
    assert eps == [pytest.approx(1e-5)] * 3


def test_folded_style_keeps_only_bns_without_a_conv():
    block = RepVGGBlock.random(0, 4, 4, eps=1e-3)
    model = build_onnx(block, fold_bn=True, input_shape=(1, 4, 5, 5))
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1 and bns[0].input[0] == "input"        # the identity branch
    assert [a.f for a in bns[0].attribute if a.name == "epsilon"] == [pytest.approx(1e-3)]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(len(c.input) == 3 and c.input[1].startswith("onnx::Conv_") for c in convs)


def test_dbb_exports_bn_and_pad_as_pad_plus_scatternd():
    block = DiverseBranchBlock.random(3, 4, 4)
    model = build_onnx(block, input_shape=(1, 4, 5, 5))
    kinds = Counter(n.op_type for n in model.graph.node)
    assert kinds["Pad"] == 2 and kinds["ScatterND"] == 2 and kinds["AveragePool"] == 1
    # the identity-based 1x1 stores its delta, the identity is added in the graph
    assert "seq.idconv1.weight" in {t.name for t in model.graph.initializer}


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "mobilenet_v2"])
def test_network_round_trip(name, tmp_path):
    net = models.create(name, num_classes=10)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = net.forward(x)
    path = export_onnx(net, tmp_path / f"{name}.onnx", input_shape=x.shape)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["output"]
    assert _err(_run(model, x), ref) <= 1e-4
    fused, report = convert_onnx(path)
    assert _err(_run(fused, x), ref) <= 1e-4
    ops = Counter(n.op_type for n in fused.graph.node)
    deploy = build_onnx(net.reparameterize(), input_shape=x.shape)
    # The deploy export's Constant nodes (mobilenet_v2's Clip limits) are initializers in
    # the converter's output (issue 13 item 6): same graph otherwise.
    assert "Constant" not in ops
    assert ops == Counter(n.op_type for n in deploy.graph.node if n.op_type != "Constant")
    assert _err(_run(deploy, x), ref) <= 1e-4
    if name == "repvgg_a0":
        assert ops["Conv"] == 22 and ops["Relu"] == 22 and "Add" not in ops


def test_network_folded_style_round_trip():
    net = models.create("mobileone_s0", num_classes=5)
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    model = build_onnx(net, fold_bn=True, input_shape=x.shape)
    assert _err(_run(model, x), net.forward(x)) <= 1e-4
    fused, _ = convert_onnx(model)
    ops = Counter(n.op_type for n in fused.graph.node)
    # stem + 21 units of two blocks each: 43 convs, each with its ReLU
    assert ops == {"Conv": 43, "Relu": 43, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}


def test_export_refuses_to_overwrite_and_writes_atomically(tmp_path):
    block = RepVGGBlock.random(0, 4, 4)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="exists"):
        export_onnx(block, path, input_shape=(1, 4, 5, 5))
    assert path.read_bytes() == b"precious"
    export_onnx(block, path, input_shape=(1, 4, 5, 5), force=True)
    assert onnx.load(path).graph.node
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]      # no temp file left behind


def test_export_bad_arguments():
    block = RepVGGBlock.random(0, 4, 4)
    with pytest.raises(ShapeError, match="input_shape"):
        build_onnx(block, input_shape=(4, 5, 5))
    with pytest.raises(ValueError, match="opset"):
        build_onnx(block, input_shape=(1, 4, 5, 5), opset=11)
    with pytest.raises(TypeError, match="cannot export a dict"):
        build_onnx({}, input_shape=(1, 4, 5, 5))
    from repnp.blocks.nasnet import NASNetNormalCell

    with pytest.raises(TypeError, match="cannot export a NASNetNormalCell"):
        build_onnx(NASNetNormalCell.random(0, 8, 8, 8), input_shape=(1, 8, 5, 5))
    with pytest.raises(ShapeError, match="BN"):
        build_onnx(BatchNorm(*(np.ones(3),) * 4), input_shape=(1, 4, 5, 5))


@pytest.mark.parametrize("opset", [14, 21])
def test_other_opsets(opset):
    block = MobileOneUnit.random(4, 4, 6, stride=2, num_branches=2)
    x = np.random.default_rng(4).standard_normal((1, 4, 7, 7)).astype(np.float32)
    model = build_onnx(block, input_shape=x.shape, opset=opset)
    assert model.opset_import[0].version == opset
    assert _err(_run(model, x), block.forward(x.astype(np.float64))) <= 1e-5


def test_default_input_shape_is_224():
    block = MobileOneBlock.random(0, 3, 8, stride=2)
    model = build_onnx(block)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 224, 224]
    out = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out == [1, 8, 112, 112]


def test_export_is_deterministic():
    block = DiverseBranchBlock.random(1, 4, 4)
    a = build_onnx(block, input_shape=(1, 4, 6, 6)).SerializeToString()
    b = build_onnx(block, input_shape=(1, 4, 6, 6)).SerializeToString()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


# ----------------------------------------------------------------------------
# geometry sweep (hypothesis): export and conversion agree with forward for any geometry
# ----------------------------------------------------------------------------



@st.composite
def _rep_blocks(draw):
    family = draw(st.sampled_from(["repvgg", "mobileone", "acnet"]))
    k = draw(st.sampled_from([1, 3, 5])) if family != "acnet" else draw(st.sampled_from([3, 5]))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2])) if k > 1 else 1
    seed = draw(st.integers(0, 2**16))
    if family == "repvgg":
        block = RepVGGBlock.random(seed, c_in, c_out, kernel_size=k, stride=stride, dilation=dilation,
                                   groups=groups)
    elif family == "mobileone":
        block = MobileOneBlock.random(seed, c_in, c_out, kernel_size=k, stride=stride, dilation=dilation,
                                      groups=groups, num_branches=draw(st.integers(1, 3)))
    else:
        padding = draw(st.integers(0, dilation * (k // 2)))
        block = ACBlock.random(seed, c_in, c_out, kernel_size=k, stride=stride, padding=padding,
                               dilation=dilation, groups=groups)
    lo = dilation * (k - 1) + 2          # the dilated kernel fits, ACNet crops leave a pixel
    h, w = draw(st.integers(lo, 12)), draw(st.integers(lo, 12))
    return block, (2, c_in, h, w), draw(st.booleans())


@settings(max_examples=15)
@given(_rep_blocks())
def test_export_and_round_trip_any_geometry(case):
    block, shape, fold_bn = case
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = block.forward(x.astype(np.float64))
    model = build_onnx(block, fold_bn=fold_bn, input_shape=shape)
    assert _err(_run(model, x), ref) <= 1e-5
    fused, report = convert_onnx(model)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Conv"] == 1 and "Add" not in ops and "BatchNormalization" not in ops, (ops, report)
    assert _err(_run(fused, x), ref) <= 1e-5


# ----------------------------------------------------------------------------
# activations: the export launches the operators the blocks' traces record
# ----------------------------------------------------------------------------

from repnp import ops as _ops  # noqa: E402
from repnp.trace import Trace  # noqa: E402

#: GELU below opset 20 (no Gelu operator): x * (1 + erf(x / sqrt 2)) * 0.5.
_GELU_CHAIN = ["Div", "Erf", "Add", "Mul", "Mul"]


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("name", sorted(_ops.ACTIVATIONS))
def test_activation_export_launches_what_trace_records(name, opset):
    act = Activation(name)
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 5)).astype(np.float32) * 4   # past ReLU6's 6
    model = build_onnx(act, input_shape=x.shape, opset=opset)
    launched = [n.op_type for n in model.graph.node if n.op_type != "Constant"]
    if name == "gelu" and opset < 20:
        assert launched == _GELU_CHAIN
    elif name == "identity":
        assert launched == ["Identity"]            # the graph output needs a node
    else:
        assert launched == list(act.op_types)
    assert _err(_run(model, x), act.forward(x.astype(np.float64))) <= 1e-5


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_trace_and_export_launch_the_same_operators(name):
    """Opset 20 (GELU is one node there): every block's export has exactly the op types of its
    trace, train and deploy form, but DBB's BN-and-pad (trace: Pad; export: Pad + ScatterND) and
    the Add that builds its identity-based 1x1 kernel in the graph."""
    make, chw, _ = BLOCKS[name]
    block = make()
    for form in (block, block.reparameterize()):
        t = Trace()
        form.trace(t, t.input((2, *chw)))
        traced = Counter(op.op_type for op in t.ops)
        model = build_onnx(form, input_shape=(2, *chw), opset=20)
        exported = Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")
        if name.startswith("dbb") and form is block:
            assert not traced - exported and set(exported - traced) <= {"ScatterND", "Add"}
        else:
            assert traced == exported, (traced - exported, exported - traced)


def test_gelu_at_opset_20_is_one_node_and_converts():
    block = RepVGGBlock.random(2, 4, 4, dilation=2, activation="gelu")
    x = np.random.default_rng(6).standard_normal((2, 4, 9, 10)).astype(np.float32)
    model = build_onnx(block, input_shape=x.shape, opset=20)
    ref = block.forward(x.astype(np.float64))
    assert _err(_run(model, x), ref) <= 1e-5
    fused, report = convert_onnx(model)
    assert report.check["passed"] and _err(_run(fused, x), ref) <= 1e-5
    assert Counter(n.op_type for n in fused.graph.node) == {"Conv": 1, "Gelu": 1}
