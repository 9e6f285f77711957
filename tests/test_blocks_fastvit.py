"""FastViT's re-parameterizable blocks (timm ``fastvit.py``; Vasu et al., ICCV 2023).

Each block's train form and deploy form (``reparameterize()``) are checked against the
unfused computation written out here with :mod:`repnp.ops` (conv2d, batch_norm), random BN
statistics, non-trivial shapes: float64 within 1e-12, float32 within 1e-5
(``repnp.tolerance``). The real timm RepMixer state dict of ``tests/data/state`` loads into
:class:`repnp.blocks.RepMixer` and reproduces PyTorch's output.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repnp import ops, tolerance
from repnp.blocks import Conv2d, ConvAct, ReparamLargeKernelConv, RepConditionalPosEnc, RepMixer
from repnp.errors import ShapeError
from repnp.trace import Trace

DATA = Path(__file__).parent / "data" / "state"


def bn(x, b):
    return ops.batch_norm(x, b.mean, b.var, b.gamma, b.beta, eps=b.eps)


def conv_bn(x, cb):
    c = cb.conv
    return bn(ops.conv2d(x, c.weight, c.bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                         groups=c.groups), cb.bn)


def repmixer_reference(block, x):
    """``x + gamma * (mixer(x) - norm(x))``, mixer = sum of conv-BN branches + BN skip."""
    m = block.mixer
    mixed = sum(conv_bn(x, b) for b in m.conv_kxk)
    if m.conv_scale is not None:
        mixed = mixed + conv_bn(x, m.conv_scale)
    if m.skip is not None:
        mixed = mixed + bn(x, m.skip)
    gamma = 1.0 if block.layer_scale is None else np.asarray(block.layer_scale).reshape(1, -1, 1, 1)
    return x + gamma * (mixed - bn(x, block.norm))


def large_kernel_reference(block, x):
    y = conv_bn(x, block.large_conv)
    if block.small_conv is not None:
        y = y + conv_bn(x, block.small_conv)
    return ops.ACTIVATIONS[block.activation.name](y)


def pos_enc_reference(block, x):
    c = block.pos_enc
    return x + ops.conv2d(x, c.weight, c.bias, padding=c.padding, groups=c.groups)


@pytest.mark.parametrize("dtype, tol", [(np.float64, tolerance.FLOAT64), (np.float32, tolerance.FLOAT32)])
@settings(max_examples=15, deadline=None)
@given(channels=st.integers(1, 6), kernel=st.sampled_from([1, 3, 5]), branches=st.integers(1, 3),
       layer_scale=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_repmixer_is_exact(dtype, tol, channels, kernel, branches, layer_scale, seed):
    block = RepMixer.random(seed, channels, kernel_size=kernel, num_branches=branches, layer_scale=layer_scale,
                            dtype=dtype)
    x = np.random.default_rng(seed).standard_normal((2, channels, 7, 6)).astype(dtype)
    ref = repmixer_reference(block, x.astype(np.float64))
    assert tolerance.relative_error(block.forward(x), ref) <= tol
    deploy = block.reparameterize()
    assert isinstance(deploy, Conv2d) and deploy.weight.dtype == dtype
    assert deploy.groups == channels and deploy.weight.shape == (channels, 1, kernel, kernel)
    assert tolerance.relative_error(deploy.forward(x), ref) <= tol


@pytest.mark.parametrize("dtype, tol", [(np.float64, tolerance.FLOAT64), (np.float32, tolerance.FLOAT32)])
@settings(max_examples=15, deadline=None)
@given(groups=st.sampled_from([1, 2, 3]), cin_per=st.integers(1, 3), cout_per=st.integers(1, 3),
       kernel=st.sampled_from([3, 5, 7]), small=st.sampled_from([None, 1, 3]), stride=st.sampled_from([1, 2]),
       activation=st.sampled_from(["identity", "gelu", "relu"]), seed=st.integers(0, 2**31 - 1))
def test_large_kernel_conv_is_exact(dtype, tol, groups, cin_per, cout_per, kernel, small, stride, activation, seed):
    cin, cout = groups * cin_per, groups * cout_per
    block = ReparamLargeKernelConv.random(seed, cin, cout, kernel_size=kernel, small_kernel=small, stride=stride,
                                          groups=groups, activation=activation, dtype=dtype)
    x = np.random.default_rng(seed).standard_normal((2, cin, 9, 8)).astype(dtype)
    ref = large_kernel_reference(block, x.astype(np.float64))
    assert tolerance.relative_error(block.forward(x), ref) <= tol
    deploy = block.reparameterize()
    assert isinstance(deploy, ConvAct) and deploy.conv.weight.shape == (cout, cin_per, kernel, kernel)
    assert tolerance.relative_error(deploy.forward(x), ref) <= tol


@pytest.mark.parametrize("dtype, tol", [(np.float64, tolerance.FLOAT64), (np.float32, tolerance.FLOAT32)])
@pytest.mark.parametrize("channels, kernel", [(1, 3), (5, 7), (8, (3, 5))])
def test_pos_enc_is_exact(dtype, tol, channels, kernel):
    block = RepConditionalPosEnc.random(channels, channels, kernel_size=kernel, dtype=dtype)
    x = np.random.default_rng(channels).standard_normal((2, channels, 9, 10)).astype(dtype)
    ref = pos_enc_reference(block, x.astype(np.float64))
    assert tolerance.relative_error(block.forward(x), ref) <= tol
    deploy = block.reparameterize()
    assert tolerance.relative_error(deploy.forward(x), ref) <= tol
    np.testing.assert_array_equal(deploy.bias, block.pos_enc.bias)     # the bias is the conv's


def test_random_bn_statistics_are_not_trivial():
    block = RepMixer.random(0, 8)
    for b in (block.norm, block.mixer.skip, block.mixer.conv_kxk[0].bn):
        assert np.all(b.mean != 0) and np.all(b.var != 1) and np.all(b.gamma != 1) and np.all(b.beta != 0)
    assert not np.allclose(block.layer_scale, 1)


def test_same_seed_same_block():
    a, b = ReparamLargeKernelConv.random(3, 4, 6), ReparamLargeKernelConv.random(3, 4, 6)
    assert all(np.array_equal(a.params()[k], b.params()[k]) for k in a.params())


def test_params_names_follow_timm():
    assert list(RepMixer.random(0, 2).params()) == [
        "mixer.conv_kxk.0.conv.weight", "mixer.conv_kxk.0.bn.mean", "mixer.conv_kxk.0.bn.var",
        "mixer.conv_kxk.0.bn.gamma", "mixer.conv_kxk.0.bn.beta", "mixer.conv_scale.conv.weight",
        "mixer.conv_scale.bn.mean", "mixer.conv_scale.bn.var", "mixer.conv_scale.bn.gamma",
        "mixer.conv_scale.bn.beta", "mixer.skip.mean", "mixer.skip.var", "mixer.skip.gamma", "mixer.skip.beta",
        "norm.mean", "norm.var", "norm.gamma", "norm.beta", "layer_scale.gamma"]
    assert list(RepConditionalPosEnc.random(0, 2).params()) == ["pos_enc.weight", "pos_enc.bias"]
    assert [k.split(".")[0] for k in ReparamLargeKernelConv.random(0, 2, 2).params()] == \
        ["large_conv"] * 5 + ["small_conv"] * 5


def _op_counts(t):
    counts = {}
    for op in t.ops:
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return counts


def test_trace():
    block = RepMixer.random(0, 6)
    t = Trace()
    out = block.trace(t, t.input((1, 6, 8, 8)))
    # mixer: conv-BN, conv-BN, BN skip, 2 Adds; norm BN; Sub, Mul, Add
    assert _op_counts(t) == {"Conv": 2, "BatchNormalization": 4, "Add": 3, "Sub": 1, "Mul": 1}
    assert out.shape == (1, 6, 8, 8)
    t = Trace()
    block.reparameterize().trace(t, t.input((1, 6, 8, 8)))
    assert _op_counts(t) == {"Conv": 1}
    t = Trace()
    out = ReparamLargeKernelConv.random(0, 4, 6, stride=2, activation="gelu").trace(t, t.input((1, 4, 9, 9)))
    assert _op_counts(t) == {"Conv": 2, "BatchNormalization": 2, "Add": 1, "Gelu": 1} and out.shape == (1, 6, 5, 5)
    t = Trace()
    RepConditionalPosEnc.random(0, 4).trace(t, t.input((1, 4, 9, 9)))
    assert _op_counts(t) == {"Conv": 1, "Add": 1}


def test_bad_blocks_raise_clear_errors():
    mixer = RepMixer.random(0, 4)
    with pytest.raises(ShapeError, match="norm has 3 channels"):
        RepMixer(mixer.mixer, RepMixer.random(0, 3).norm, None)
    with pytest.raises(ShapeError, match="depthwise conv"):
        RepConditionalPosEnc(Conv2d(np.ones((4, 2, 3, 3)), np.ones(4), padding=1, groups=2))
    big = ReparamLargeKernelConv.random(0, 4, 4)
    with pytest.raises(ShapeError, match="small_conv"):
        ReparamLargeKernelConv(big.large_conv, ReparamLargeKernelConv.random(0, 4, 4, kernel_size=9).large_conv)


def test_loads_timm_repmixer_state_and_reproduces_torch():
    """timm RepMixer(dim=20, kernel_size=3, layer_scale_init_value=1e-5): its state dict, renamed by
    the timm scheme, builds a RepMixer whose train and deploy forms give torch's output."""
    from repnp.io import load_state
    from repnp.io.npz import find_blocks

    case = DATA / "timm_fastvit_repmixer_c20"
    meta = json.loads((case / "meta.json").read_text())
    (found,) = find_blocks(load_state(case / "train_state.npz"))
    block = RepMixer.from_params(found.params, eps=meta["batchnorm_eps"]["norm.identity"])
    x, ref = np.load(case / "input.npy"), np.load(case / "output.npy")
    assert tolerance.relative_error(block.forward(x), ref) <= tolerance.FLOAT32
    assert tolerance.relative_error(block.reparameterize().forward(x), ref) <= tolerance.FLOAT32
