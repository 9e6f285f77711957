"""RepMLP's essence: shared-set FC + depthwise conv-BN local perception -> one FC."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repnp import fusion
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.repmlp import RepMLPBlock, SharedFC
from repnp.errors import ShapeError
from repnp.testing import assert_reparam_equivalent, random_input
from repnp.trace import Trace


def unit_bn(channels):
    one, zero = np.ones(channels), np.zeros(channels)
    return BatchNorm(zero, one, one, zero, eps=0.0)


def test_hand_typed_conv_into_fc():
    # C = S = 1, a 1x2 map, FC = 0, one 3x3 conv with padding 1 and kernel [[a b c] [d e f] [g h i]]:
    # out[0] = e*x0 + f*x1, out[1] = d*x0 + e*x1, so the FC is [[e, f], [d, e]].
    kernel = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)         # a..i = 1..9: d = 4, e = 5, f = 6
    block = RepMLPBlock(np.zeros((2, 2)), unit_bn(1), (ConvBN(Conv2d(kernel, padding=1, groups=1), unit_bn(1)),),
                        1, 1, 2)
    deploy = block.reparameterize()
    np.testing.assert_array_equal(deploy.weight, [[5.0, 6.0], [4.0, 5.0]])
    np.testing.assert_array_equal(deploy.bias, [0.0, 0.0])
    x = np.array([1.0, 10.0]).reshape(1, 1, 1, 2)
    np.testing.assert_array_equal(deploy.forward(x).ravel(), [5 + 60, 4 + 50])
    np.testing.assert_array_equal(block.forward(x), deploy.forward(x))


def test_fc_bn_scales_each_set():
    # FC bn with gamma = 2 (mean 0, var 1, eps 0, beta 3): W' = 2 W, b' = 3
    w = np.arange(4.0).reshape(2, 2)
    bn = BatchNorm(np.zeros(1), np.ones(1), np.full(1, 2.0), np.full(1, 3.0), eps=0.0)
    deploy = RepMLPBlock(w, bn, (), 1, 1, 2).reparameterize()
    np.testing.assert_array_equal(deploy.weight, 2 * w)
    np.testing.assert_array_equal(deploy.bias, [3.0, 3.0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("c, h, w, kernels, sets", [
    (4, 5, 6, (1, 3, 5), None), (6, 4, 4, (3,), 2), (6, 3, 7, (), 3), (2, 2, 3, (1, 3, 5, 7), 1),
])
def test_train_equals_deploy(c, h, w, kernels, sets, dtype):
    block = RepMLPBlock.random(1, c, h, w, kernels=kernels, share_sets=sets, dtype=dtype)
    x = random_input((2, c, h, w), dtype=dtype, seed=0)
    assert_reparam_equivalent(block, x)
    deploy = block.reparameterize()
    assert isinstance(deploy, SharedFC) and deploy.weight.dtype == dtype


@given(
    sets=st.integers(1, 3),
    per_set=st.integers(1, 2),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    kernels=st.lists(st.sampled_from([1, 3, 5]), unique=True, max_size=3),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float64, np.float32]),
)
def test_train_equals_deploy_property(sets, per_set, h, w, kernels, seed, dtype):
    c = sets * per_set
    block = RepMLPBlock.random(seed, c, h, w, kernels=tuple(kernels), share_sets=sets, dtype=dtype)
    x = random_input((2, c, h, w), dtype=dtype, seed=seed)
    assert_reparam_equivalent(block, x)


def test_channel_c_uses_set_c_mod_s():
    """The (N*C/S, S, H, W) view: channel c is set c % S (as the official reshape does)."""
    block = RepMLPBlock.random(2, 6, 3, 3, kernels=(), share_sets=3)
    w = block.fc_weight.copy()
    w[9:18] = 0                                   # set 1's FC matrix (rows HW .. 2 HW - 1)
    zeroed = RepMLPBlock(w, block.fc_bn, (), 6, 3, 3)
    x = random_input((1, 6, 3, 3), seed=2)
    y, ref = zeroed.forward(x), block.forward(x)
    _, shift = fusion.bn_scale_shift(block.fc_bn.mean, block.fc_bn.var, block.fc_bn.gamma, block.fc_bn.beta,
                                     eps=block.fc_bn.eps)
    for ch in (1, 4):                             # channels of set 1: only the BN shift is left
        np.testing.assert_allclose(y[0, ch], np.full((3, 3), shift[1]), rtol=0, atol=1e-15)
    for ch in (0, 2, 3, 5):
        np.testing.assert_array_equal(y[0, ch], ref[0, ch])


def test_random_bn_statistics_are_not_trivial():
    block = RepMLPBlock.random(0, 4, 3, 3)
    for bn in [block.fc_bn] + [b.bn for b in block.local]:
        assert np.all(bn.mean != 0) and np.all(bn.var != 1) and np.all(bn.gamma != 1) and np.all(bn.beta != 0)


def test_params_names_follow_the_official_ones():
    names = set(RepMLPBlock.random(0, 4, 3, 3, kernels=(1, 3), share_sets=2).params())
    assert names == {"fc.weight", "fc_bn.mean", "fc_bn.var", "fc_bn.gamma", "fc_bn.beta",
                     "repconv1.conv.weight", "repconv1.bn.mean", "repconv1.bn.var", "repconv1.bn.gamma",
                     "repconv1.bn.beta", "repconv3.conv.weight", "repconv3.bn.mean", "repconv3.bn.var",
                     "repconv3.bn.gamma", "repconv3.bn.beta"}
    assert RepMLPBlock.random(0, 4, 3, 3, share_sets=2).fc_weight.shape == (18, 9)


def test_trace():
    block = RepMLPBlock.random(0, 4, 3, 5, kernels=(1, 3), share_sets=2)
    t = Trace()
    y = block.trace(t, t.input((2, 4, 3, 5)))
    assert [op.op_type for op in t.ops] == ["Reshape", "Conv", "Reshape", "BatchNormalization", "Reshape",
                                           "Conv", "BatchNormalization", "Add", "Conv", "BatchNormalization",
                                           "Add", "Reshape"]
    assert y.shape == (2, 4, 3, 5)
    fc = t.ops[1]
    assert fc.output_shape == (4, 30, 1, 1) and fc.macs == 4 * 2 * 15 * 15
    td = Trace()
    block.reparameterize().trace(td, td.input((2, 4, 3, 5)))
    assert [op.op_type for op in td.ops] == ["Reshape", "Conv", "Reshape"]
    assert td.ops[1].macs == fc.macs and td.ops[1].weight_bytes == (30 * 15 + 30) * 4


@pytest.mark.parametrize("kwargs, error", [
    ({"share_sets": 3}, ShapeError),
    ({"kernels": (2,)}, ValueError),
])
def test_bad_configs(kwargs, error):
    with pytest.raises(error):
        RepMLPBlock.random(0, 4, 3, 3, **kwargs)


def test_duplicate_kernel_and_wrong_input():
    block = RepMLPBlock.random(0, 4, 3, 3, kernels=(3,), share_sets=2)
    with pytest.raises(ValueError, match="clash"):
        RepMLPBlock(block.fc_weight, block.fc_bn, block.local * 2, 4, 3, 3)
    with pytest.raises(ShapeError, match="fixed-size"):
        block.forward(np.zeros((1, 4, 3, 4)))
    with pytest.raises(ShapeError, match="fc_weight"):
        RepMLPBlock(block.fc_weight[:-1], block.fc_bn, block.local, 4, 3, 3)


def test_official_repmlp_block_state_dict():
    """The official RepMLPBlock (C=12, 6x7 partitions, S=3, k=1,3): PyTorch's output and its deploy FC.

    The partitioning and the global perceptron are not part of this block (they do not take part
    in the re-parameterization): the test does them around it, as the official forward does.
    """
    import json
    from pathlib import Path

    from repnp import ops
    from repnp.testing import relative_error

    case = Path(__file__).parent / "data" / "state" / "off_repmlp_block_c12_h6w7"
    meta = json.loads((case / "meta.json").read_text())
    kw = meta["constructor_kwargs"]
    c, h, w, s = kw["in_channels"], kw["h"], kw["w"], kw["num_sharesets"]
    with np.load(case / "train_state.npz", allow_pickle=False) as f:
        st_ = {k: f[k] for k in f.files}
    with np.load(case / "deploy_state.npz", allow_pickle=False) as f:
        dep = {k: f[k] for k in f.files}

    def bn(name):
        return BatchNorm(st_[f"{name}.running_mean"], st_[f"{name}.running_var"], st_[f"{name}.weight"],
                         st_[f"{name}.bias"], eps=meta["batchnorm_eps"][name])

    local = tuple(ConvBN(Conv2d(st_[f"repconv{k}.conv.weight"], padding=k // 2, groups=s), bn(f"repconv{k}.bn"))
                  for k in kw["reparam_conv_k"])
    block = RepMLPBlock(st_["fc3.weight"][:, :, 0, 0], bn("fc3_bn"), local, c, h, w)
    x, ref = np.load(case / "input.npy"), np.load(case / "output.npy")
    n, _, hh, ww = x.shape
    hp, wp = hh // h, ww // w
    gv = ops.conv2d(x.mean(axis=(2, 3), keepdims=True), st_["gp.fc1.weight"], st_["gp.fc1.bias"])
    gv = ops.sigmoid(ops.conv2d(ops.relu(gv), st_["gp.fc2.weight"], st_["gp.fc2.bias"]))
    parts = x.reshape(n, c, hp, h, wp, w).transpose(0, 2, 4, 1, 3, 5).reshape(n * hp * wp, c, h, w)

    def unpartition(y):
        # as the official forward: fc3_out.reshape(-1, h_parts, w_parts, S, h, w).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(-1, hp, wp, s, h, w).transpose(0, 3, 1, 4, 2, 5).reshape(x.shape) * gv

    assert relative_error(unpartition(block.forward(parts)), ref) <= 1e-5
    deploy = block.reparameterize()
    assert relative_error(deploy.weight, dep["fc3.weight"][:, :, 0, 0]) <= 1e-5
    assert relative_error(deploy.bias, dep["fc3.bias"]) <= 1e-5
    assert relative_error(unpartition(deploy.forward(parts)), ref) <= 1e-5
