"""MobileNetV2 inverted residual: each conv-BN fused, the three convs kept apart by the ReLU6s."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import cost, fusion, ops
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.mobilenetv2 import InvertedResidual
from repnp.errors import ShapeError
from repnp.testing import random_input
from repnp.testing import relative_error as _err  # max|a - b| / max|b|, b the reference


def _op_counts(module, shape):
    """Operator counts by type and the output shape of ``module`` on an input of ``shape``."""
    p = cost.profile(module, shape)
    return p.op_types(), p.ops[-1].op.output_shape


@settings(max_examples=20)
@given(c_in=st.integers(1, 6), same=st.booleans(), c_out=st.integers(1, 6), stride=st.sampled_from([1, 2]),
       expand_ratio=st.sampled_from([1, 2, 6]), hw=st.integers(3, 8), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_reparameterize_is_exact(c_in, same, c_out, stride, expand_ratio, hw, seed, dtype):
    c_out = c_in if same else c_out
    block = InvertedResidual.random(seed, c_in, c_out, stride=stride, expand_ratio=expand_ratio, dtype=dtype)
    x = random_input((2, c_in, hw, hw + 1), dtype=dtype, seed=seed)
    deploy = block.reparameterize()
    y, yd = block.forward(x), deploy.forward(x)
    assert y.dtype == yd.dtype == dtype
    assert y.shape == (2, c_out, (hw - 1) // stride + 1, hw // stride + 1)
    assert _err(yd, y) <= (1e-12 if dtype == np.float64 else 1e-5)
    assert block.use_residual == (stride == 1 and c_in == c_out)
    assert (block.expand is None) == (expand_ratio == 1)
    assert block.hidden_channels == c_in * expand_ratio


def test_deploy_form_keeps_three_convs_and_the_nonlinearities():
    block = InvertedResidual.random(0, 8, 8, expand_ratio=6)
    deploy = block.reparameterize()
    for layer in (deploy.expand, deploy.depthwise, deploy.project):
        assert isinstance(layer, Conv2d) and layer.bias is not None
    counts, out = _op_counts(block, (1, 8, 7, 7))
    assert counts == {"Conv": 3, "BatchNormalization": 3, "Clip": 2, "Add": 1}
    counts, out_d = _op_counts(deploy, (1, 8, 7, 7))
    assert counts == {"Conv": 3, "Clip": 2, "Add": 1}
    assert out == out_d == (1, 8, 7, 7)
    assert deploy.reparameterize().depthwise is deploy.depthwise  # deploy form is a fixed point


def test_convs_across_a_relu6_are_not_merged():
    """Merging the depthwise conv and the projection (fusion.merge_pointwise) is exact only
    without the ReLU6 between them; across it the merged conv is wrong by a wide margin."""
    block = InvertedResidual.random(4, 8, 8, expand_ratio=6)
    x = random_input((1, 8, 9, 9), seed=2)
    h = ops.relu6(block.expand.forward(x))                       # the depthwise conv's input
    dw, proj = block.depthwise.fused(), block.project.fused()
    merged = fusion.merge_pointwise(dw, proj, groups=block.hidden_channels)
    merged_out = ops.conv2d(h, merged.kernel, merged.bias, padding=1)
    linear_path = block.project.forward(block.depthwise.forward(h))              # no ReLU6
    true_path = block.project.forward(ops.relu6(block.depthwise.forward(h)))      # the block's
    assert _err(merged_out, linear_path) <= 1e-12   # the algebra itself is right...
    assert _err(merged_out, true_path) > 0.1        # ...but the ReLU6 forbids it
    # and the block's deploy form computes the true path
    assert _err(block.reparameterize().forward(x), block.forward(x)) <= 1e-12


def test_hand_computed_block():
    """C = 1, expand_ratio 1 (no expansion), identity-like convs, eps = 0:
    depthwise W = 2 at the centre, BN(mean 1, var 1, gamma 1, beta 0): y = 2x - 1, then ReLU6;
    project W = 1, BN(mean 0, var 4, gamma 1, beta 1): y = h / 2 + 1; residual + x.
    x = 3: dw 5, relu6 5, project 3.5, + 3 = 6.5.   x = 5: dw 9 -> 6 (clipped), 4, + 5 = 9.
    x = 0: dw -1 -> 0, project 1, + 0 = 1.
    """
    def one(v):
        return np.array([float(v)])
    dw_w = np.zeros((1, 1, 3, 3))
    dw_w[0, 0, 1, 1] = 2.0
    block = InvertedResidual(
        None,
        ConvBN(Conv2d(dw_w, padding=1, groups=1), BatchNorm(one(1), one(1), one(1), one(0), eps=0.0)),
        ConvBN(Conv2d(np.ones((1, 1, 1, 1))), BatchNorm(one(0), one(4), one(1), one(1), eps=0.0)),
        use_residual=True)
    x = np.array([3.0, 5.0, 0.0]).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(block.forward(x).ravel(), [6.5, 9.0, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(block.reparameterize().forward(x).ravel(), [6.5, 9.0, 1.0], atol=1e-15)


def test_params_names():
    block = InvertedResidual.random(0, 4, 4, expand_ratio=2)
    assert {"expand.conv.weight", "depthwise.bn.mean", "project.bn.beta"} <= set(block.params())
    assert set(block.reparameterize().params()) == {
        f"{n}.{p}" for n in ("expand", "depthwise", "project") for p in ("weight", "bias")}


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(stride=3), ValueError, "stride"),
    (dict(expand_ratio=0), ValueError, "expand_ratio"),
])
def test_bad_configs_raise_clear_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        InvertedResidual.random(0, 4, 4, **kwargs)


def test_bad_structures_raise_clear_errors():
    good = InvertedResidual.random(0, 4, 4, expand_ratio=2)
    with pytest.raises(ValueError, match="residual needs stride 1"):
        InvertedResidual(good.expand, InvertedResidual.random(0, 4, 4, expand_ratio=2, stride=2).depthwise,
                         good.project, use_residual=True)
    with pytest.raises(ShapeError, match="project"):
        InvertedResidual(good.expand, good.depthwise, InvertedResidual.random(0, 4, 4).project)
    with pytest.raises(ShapeError, match="groups"):
        InvertedResidual(None, ConvBN.random(np.random.default_rng(0), 4, 4, 3, padding=1), good.project)
