"""RepViT blocks (official THU-MIG/RepViT names and timm's): RepVggDw and the BN-Linear classifier, train
form == deploy form in both dtypes against the unfused computation, and the ONNX export of both forms
run in onnxruntime against ``forward``."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import ops
from repnp.blocks import RepVggDw, RepVitClassifier
from repnp.blocks.base import Conv2d
from repnp.blocks.repvit import Linear
from repnp.io.onnx.check import run_model
from repnp.io.onnx.export import export_onnx
from repnp.tolerance import FLOAT32, FLOAT64, relative_error


def _tol(dtype):
    return FLOAT64 if dtype == np.float64 else FLOAT32


@settings(max_examples=15, deadline=None)
@given(channels=st.integers(1, 6), k=st.sampled_from([3, 5, 7]), legacy=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_repvggdw_deploy_equals_unfused(channels, k, legacy, eps, seed, dtype):
    """Official RepVGGDW: BN(BN_c(dw_KxK(x)) + dw1x1(x) + b + x) (legacy: a conv-BN 1x1, no BN after)."""
    block = RepVggDw.random(seed, channels, kernel_size=k, legacy=legacy, eps=eps, dtype=dtype)
    x = np.random.default_rng(seed + 1).standard_normal((2, channels, 7, 6)).astype(dtype)
    x64 = x.astype(np.float64)
    c = block.conv
    y = c.bn.forward(ops.conv2d(x64, c.conv.weight, padding=k // 2, groups=channels))
    one = block.conv1
    if legacy:
        y = y + one.bn.forward(ops.conv2d(x64, one.conv.weight, groups=channels))
    else:
        y = y + ops.conv2d(x64, one.weight, one.bias, groups=channels)
    y = y + x64
    if block.bn is not None:
        y = block.bn.forward(y)
    assert relative_error(block.forward(x), y) <= _tol(dtype)
    deploy = block.reparameterize()
    assert isinstance(deploy, Conv2d) and deploy.weight.shape == (channels, 1, k, k) and deploy.groups == channels
    assert deploy.weight.dtype == dtype
    assert relative_error(deploy.forward(x), y) <= _tol(dtype)


@pytest.mark.parametrize("distillation", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_classifier_deploy_equals_the_two_heads_averaged(distillation, dtype):
    block = RepVitClassifier.random(3, 8, 5, distillation=distillation, eps=1e-5, dtype=dtype)
    x = np.random.default_rng(4).standard_normal((4, 8)).astype(dtype)

    def head(h):
        u = h.bn.forward(x.astype(np.float64))
        return u @ h.l.weight.T.astype(np.float64) + h.l.bias

    want = head(block.head) if not distillation else (head(block.head) + head(block.head_dist)) / 2
    assert relative_error(block.forward(x), want) <= _tol(dtype)
    deploy = block.reparameterize()
    assert isinstance(deploy, Linear) and deploy.weight.shape == (5, 8) and deploy.weight.dtype == dtype
    assert relative_error(deploy.forward(x), want) <= _tol(dtype)
    assert block.in_channels == block.in_features == 8


@pytest.mark.parametrize("form", ["train", "deploy"])
def test_exports_run_in_onnxruntime(tmp_path, form):
    # The classifier reads (N, features) vectors in both forms (BN-Linear heads, then one Linear).
    cases = [(RepVggDw.random(0, 6, dtype=np.float32), (1, 6, 7, 6)),
             (RepVitClassifier.random(1, 8, 5, dtype=np.float32), (3, 8)),
             (RepVitClassifier.random(2, 8, 5, distillation=False, dtype=np.float32), None)]
    for i, (block, shape) in enumerate(cases):
        module = block if form == "train" else block.reparameterize()
        path = export_onnx(module, tmp_path / f"{i}.onnx", input_shape=shape)
        shape = shape or (1, 8)     # the default input of a vector block: one vector
        model = onnx.load(str(path))
        x = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        (y,), _ = run_model(model, {model.graph.input[0].name: x})
        assert relative_error(y, block.forward(x)) <= FLOAT32
