"""OREPA (JUGGHM/OREPA_CVPR2022 blocks.py): the block, the .npz scheme, and the ONNX converter on
exports that keep the weight generator (Einsum, Expand, Shape, CastLike on initializers only).

Reference data (tests/data/ecb_orepa, made by tests/data/generators/make_ecb_orepa.py from the
official repository with PyTorch): dense, grouped with stride 2 and depthwise blocks, each with
the official ``switch_to_deploy()`` state dict and graph.
"""

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from official_cases import load_case
from onnx import TensorProto, helper, numpy_helper

from repnp import fusion, ops
from repnp.blocks import OREPA
from repnp.blocks.orepa import orepa_prior
from repnp.errors import ShapeError
from repnp.io import check_state, convert_state, load_state
from repnp.io.npz import detect_scheme
from repnp.io.onnx.check import run_model
from repnp.io.onnx.convert import convert_onnx
from repnp.io.onnx.export import export_onnx
from repnp.tolerance import relative_error as rel_err

DATA = Path(__file__).parent / "data" / "ecb_orepa"
CASES = ["off_orepa_k3_c6to10", "off_orepa_g2_s2_c8", "off_orepa_dw_c8"]


def weight_gen(b):
    """The official weight_gen() written out with einsum, float64 (the reference of the algebra)."""
    v = b.vector.astype(np.float64)
    g, k = b.groups, b.kernel_size
    w = np.einsum("oihw,o->oihw", b.origin, v[0])
    w = w + np.einsum("oihw,o->oihw", np.einsum("oi,hw->oihw", b.avg_conv[:, :, 0, 0], b.avg_avg), v[1])
    w = w + np.einsum("oihw,o->oihw", np.einsum("oi,ohw->oihw", b.pfir_conv[:, :, 0, 0], b.prior), v[2])
    c1 = (b.idconv1 + b.id_tensor)[:, :, 0, 0]
    t, ig = c1.shape
    o, tg = b.conv2.shape[:2]
    kxk = np.einsum("gti,gothw->goihw", c1.reshape(g, t // g, ig), b.conv2.reshape(g, o // g, tg, k, k))
    w = w + np.einsum("oihw,o->oihw", kxk.reshape(o, ig, k, k), v[3])
    if b.one is not None:
        w = w + np.einsum("oihw,o->oihw", np.pad(b.one, ((0, 0), (0, 0), (k // 2,) * 2, (k // 2,) * 2)), v[4])
    # dwsc2full(weight_dw, weight_pw, in_channels, groups)
    dw, pw = b.gconv_dw, b.gconv_pw
    tt, igd = dw.shape[:2]
    c = b.in_channels
    tg_, ogc, ggc = tt // c, o // g, c // g
    dsc = np.einsum("cgtihw,ocgt->cogihw", dw.reshape(g, ggc, tg_, igd, k, k), pw[:, :, 0, 0].reshape(ogc, g, ggc, tg_))
    w = w + np.einsum("oihw,o->oihw", dsc.reshape(o, c // g, k, k), v[5])
    return w


@pytest.mark.parametrize("cin, cout, stride, groups, one", [(4, 6, 1, 1, True), (8, 8, 2, 2, True),
                                                            (6, 6, 1, 6, False), (8, 4, 1, 4, True)])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_orepa_weight_is_weight_gen_and_deploy_equals_train(cin, cout, stride, groups, one, dtype, tol):
    block = OREPA.random(cin + groups, cin, cout, stride=stride, groups=groups, dtype=dtype)
    if not one:
        block = OREPA(**{**block.__dict__, "one": None})
    x = np.random.default_rng(3).standard_normal((2, cin, 9, 8)).astype(dtype)
    w = weight_gen(block)
    assert rel_err(block.weight(), w) <= tol
    bn = block.bn
    ref = ops.batch_norm(ops.conv2d(x.astype(np.float64), w, stride=stride, padding=1, groups=groups),
                         *(np.asarray(a, np.float64) for a in (bn.mean, bn.var, bn.gamma, bn.beta)), eps=bn.eps)
    assert rel_err(block.forward(x), ref) <= tol
    deploy = block.reparameterize()
    assert deploy.weight.dtype == dtype and deploy.groups == groups
    assert rel_err(deploy.forward(x), ref) <= tol


def test_orepa_prior_is_fre_init():
    p = orepa_prior(4)
    assert p.shape == (4, 3, 3)
    assert np.allclose(p[0, :, 0], np.cos(np.pi * (np.arange(3) + 0.5) / 3)) and np.allclose(p[0, 0], p[0, 0, 0])
    assert np.allclose(p[2, 0], np.cos(np.pi * (np.arange(3) + 0.5) / 3)) and np.allclose(p[2, :, 1], p[2, 0, 1])
    with pytest.raises(ShapeError, match="kernel_size 3"):
        orepa_prior(4, 5)
    for case in CASES:     # the buffers the official fre_init wrote
        prior = load_state(DATA / "state" / case / "train_state.npz")["weight_orepa_prior"]
        assert rel_err(orepa_prior(prior.shape[0]), prior) <= 1e-6


def test_orepa_rejects_bad_shapes():
    b = OREPA.random(0, 4, 4)
    with pytest.raises(ShapeError, match="weight_orepa_gconv_pw"):
        OREPA(**{**b.__dict__, "gconv_pw": np.ones((4, 31, 1, 1))})
    params = b.params()
    del params["id_tensor"]
    with pytest.raises(ValueError, match="id_tensor"):
        OREPA.from_params(params)


@pytest.mark.parametrize("fold_bn", [False, True])
def test_orepa_export_runs_in_onnxruntime_and_converts_to_one_conv(tmp_path, fold_bn):
    block = OREPA.random(2, 4, 6, groups=2, stride=2, dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((1, 4, 9, 8)).astype(np.float32)
    model = onnx.load(str(export_onnx(block, tmp_path / "orepa.onnx", fold_bn=fold_bn, input_shape=x.shape)))
    assert rel_err(run_model(model, {model.graph.input[0].name: x})[0][0], block.forward(x)) <= 1e-5
    fused, report = convert_onnx(model)
    assert collections.Counter(n.op_type for n in fused.graph.node) == {"Conv": 1}
    assert report.check["passed"]


# ----------------------------------------------------------------------------
# the official examples
# ----------------------------------------------------------------------------

def _case(case):
    return load_case(DATA / "state" / case)


@pytest.mark.parametrize("case", CASES)
def test_official_orepa_loads_reproduces_torch_and_its_deploy(case):
    train, deploy, meta, x, want = _case(case)
    leaf = {"running_mean": "mean", "running_var": "var", "weight": "gamma", "bias": "beta"}
    params = {(f"bn.{leaf[k[3:]]}" if k.startswith("bn.") else k): v for k, v in train.items()
              if k != "bn.num_batches_tracked"}
    block = OREPA.from_params(params, stride=meta["forward"]["stride"])
    assert block.groups == meta["forward"]["groups"]
    assert rel_err(block.forward(x), want) <= 1e-5
    fused = block.reparameterize()
    assert rel_err(fused.weight, deploy["orepa_reparam.weight"]) <= 1e-5
    assert rel_err(fused.bias, deploy["orepa_reparam.bias"]) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_npz_converts_to_exactly_the_official_deploy_state(case):
    train, deploy, *_ = _case(case)
    assert detect_scheme(train) == "orepa"
    out, report = convert_state(train)
    assert report.passed and report.max_error <= 1e-5
    assert list(out) == list(deploy)
    for key, ref in deploy.items():
        assert out[key].dtype == ref.dtype == np.float32 and out[key].shape == ref.shape
        assert rel_err(out[key], ref) <= 1e-5, key
    assert check_state(train, out)["passed"]


@pytest.mark.parametrize("style", ["train.onnx", "train_keepbn.onnx"])
@pytest.mark.parametrize("case", CASES)
def test_official_onnx_reaches_the_deploy_counts(case, style):
    """Both exports: the dynamo exporter's optimized graph (weight generator and BN folded) and
    its unoptimized one (Einsum / Expand / Shape / CastLike on initializers, BN kept)."""
    model = onnx.load(str(DATA / "onnx" / case / style))
    fused, report = convert_onnx(model)
    deploy = collections.Counter(n.op_type for n in onnx.load(str(DATA / "onnx" / case / "deploy.onnx")).graph.node)
    got = collections.Counter(n.op_type for n in fused.graph.node)
    assert got == deploy == {"Conv": 1}
    x = np.load(DATA / "onnx" / case / "input.npy")
    assert rel_err(run_model(fused, {"input": x})[0][0], np.load(DATA / "onnx" / case / "output.npy")) <= 1e-4
    assert report.check["passed"]


# ----------------------------------------------------------------------------
# parameter-only subgraphs (onnx.helper)
# ----------------------------------------------------------------------------

def _generated_weight_graph(*, castlike_bias: bool):
    """A conv whose weight is ``Einsum('oi,hw->oihw', a, b) * v`` of initializers and whose bias is
    the dynamo exporter's ``Expand(CastLike(0, input), [O])`` when ``castlike_bias``, then a BN."""
    rng = np.random.default_rng(0)
    o, c = 5, 3
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("a", rng.standard_normal((o, c)).astype(np.float32)), ("b", np.full((3, 3), 1 / 9, np.float32)),
        ("v", rng.standard_normal((o, 1, 1, 1)).astype(np.float32)), ("zero", np.array(0.0, np.float32)),
        ("oshape", np.array([o], np.int64)), ("gamma", rng.uniform(0.5, 1.5, o).astype(np.float32)),
        ("beta", rng.standard_normal(o).astype(np.float32)), ("mean", rng.standard_normal(o).astype(np.float32)),
        ("var", rng.uniform(0.5, 2, o).astype(np.float32))]]
    nodes = [helper.make_node("Einsum", ["a", "b"], ["w0"], equation="oi,hw->oihw"),
             helper.make_node("Mul", ["w0", "v"], ["w"])]
    conv_in = ["x", "w"]
    if castlike_bias:
        nodes += [helper.make_node("CastLike", ["zero", "x"], ["z"]),
                  helper.make_node("Expand", ["z", "oshape"], ["bias"])]
        conv_in.append("bias")
    nodes += [helper.make_node("Conv", conv_in, ["y0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", ["y0", "gamma", "beta", "mean", "var"], ["y"])]
    graph = helper.make_graph(nodes, "orepa_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     [1, c, 6, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, o, 6, 7])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("castlike_bias", [False, True])
def test_parameter_only_weight_subgraph_is_evaluated_and_bn_folded(castlike_bias):
    """Regression (castlike_bias=True): CastLike reads only its second input's element type, so
    ``CastLike(0, input)`` is a constant; it was left unfolded and kept the conv's bias, and
    with it the conv and its BN, unfused."""
    model = _generated_weight_graph(castlike_bias=castlike_bias)
    fused, report = convert_onnx(model)
    assert collections.Counter(n.op_type for n in fused.graph.node) == {"Conv": 1}
    assert report.check["passed"]
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 7)).astype(np.float32)
    assert rel_err(run_model(fused, {"x": x})[0][0], run_model(model, {"x": x})[0][0]) <= 1e-5


def test_orepa_fusion_rules_agree_with_a_dense_merge():
    """merge_depthwise for the avg branch equals merge_sequential with the averaging kernel dense."""
    b = OREPA.random(0, 4, 6)
    shared = np.broadcast_to(b.avg_avg, (6, 1, 3, 3))
    a = fusion.merge_depthwise((b.avg_conv, None), (shared, None))
    d = fusion.merge_sequential((b.avg_conv, None), (fusion.ungroup_kernel(shared, groups=6), None))
    assert rel_err(a.kernel, d.kernel) <= 1e-12
