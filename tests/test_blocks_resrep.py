"""ResRep: gradient resetting, channel selection, pruning + merging a small network."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repnp import fusion
from repnp.blocks.base import BatchNorm, ConvBN
from repnp.blocks.resrep import (
    CONVERSION_THRESHOLD,
    CompactorConv,
    Linear,
    ResRepNet,
    compactor_gradient,
    compactor_mask,
    row_norms,
    select_channels,
    train_compactor,
)
from repnp.errors import ShapeError
from repnp.testing import assert_reparam_equivalent, random_input, relative_error
from repnp.trace import Trace

TOL = {np.float64: 1e-12, np.float32: 1e-5}


# ----------------------------------------------------------------------------
# the gradient and the selection, by hand
# ----------------------------------------------------------------------------

def test_compactor_gradient_hand_typed():
    q = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    grad = np.array([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    mask = np.array([0.0, 1.0, 1.0])
    g = compactor_gradient(grad, q, mask, lam=0.5)
    # row 0 masked: only 0.5 * [3, 4] / 5; row 1 zero: no direction, only the loss gradient;
    # row 2: [5, 5] + 0.5 * [1, 0] / 1
    np.testing.assert_allclose(g, [[0.3, 0.4], [2.0, 2.0], [5.5, 5.0]], rtol=0, atol=1e-15)
    l2 = compactor_gradient(grad, q, mask, lam=0.5, penalty="l2")
    np.testing.assert_allclose(l2, [[1.5, 2.0], [2.0, 2.0], [5.5, 5.0]], rtol=0, atol=1e-15)


def test_compactor_gradient_accepts_kernels_and_keeps_dtype():
    q = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    g = compactor_gradient(np.ones_like(q), q, np.ones(3), lam=0.1)
    assert g.shape == (3, 3, 1, 1) and g.dtype == np.float32
    np.testing.assert_allclose(g[:, :, 0, 0], np.ones((3, 3)) + 0.1 * np.eye(3), rtol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"grad": np.zeros((2, 3)), "q": np.zeros((3, 3)), "mask": np.ones(3)},
    {"grad": np.zeros((3, 3)), "q": np.zeros((3, 3)), "mask": np.ones(2)},
    {"grad": np.zeros((3,)), "q": np.zeros((3,)), "mask": np.ones(3)},
])
def test_compactor_gradient_shape_errors(kwargs):
    with pytest.raises(ShapeError):
        compactor_gradient(kwargs["grad"], kwargs["q"], kwargs["mask"], lam=0.1)


def test_compactor_gradient_bad_options():
    with pytest.raises(ValueError, match="penalty"):
        compactor_gradient(np.zeros((2, 2)), np.eye(2), np.ones(2), lam=0.1, penalty="l1")
    with pytest.raises(ValueError, match="lam"):
        compactor_gradient(np.zeros((2, 2)), np.eye(2), np.ones(2), lam=-1.0)


def test_select_channels_and_mask():
    q = np.diag([1.0, 1e-6, 0.5, 2e-5, 0.0])
    np.testing.assert_array_equal(row_norms(q), [1.0, 1e-6, 0.5, 2e-5, 0.0])
    np.testing.assert_array_equal(select_channels(q), [0, 2, 3])            # default threshold 1e-5
    np.testing.assert_array_equal(select_channels(q, threshold=1e-4), [0, 2])
    np.testing.assert_array_equal(select_channels(np.diag([1e-7, 3e-6, 0.0])), [1])   # keep at least one
    np.testing.assert_array_equal(compactor_mask(q, 2), [1, 0, 1, 1, 0])
    np.testing.assert_array_equal(compactor_mask(q, 0), np.ones(5))
    with pytest.raises(ValueError):
        compactor_mask(q, 5)


# ----------------------------------------------------------------------------
# training: finite steps with the group lasso, geometric decay with plain lam * Q
# ----------------------------------------------------------------------------

def _problem(seed=0, channels=8):
    block = CompactorConv.random(seed, 3, channels)
    rng = np.random.default_rng(seed + 1)
    z = block.features(rng.standard_normal((4, 3, 6, 6)))
    a = np.eye(channels) + 0.3 * rng.standard_normal((channels, channels))
    target = np.einsum("dc,nchw->ndhw", a, z)
    zz = z.transpose(1, 0, 2, 3).reshape(channels, -1)
    lr = 1.0 / np.linalg.eigvalsh(zz @ zz.T / zz.shape[1]).max()   # a stable step for the loss part
    return block, z, target, lr


def test_masked_rows_shrink_linearly_then_stop_within_one_step():
    block, z, target, lr = _problem()
    mask = np.ones(8)
    mask[[2, 5]] = 0
    lam = 0.03 / lr                       # each step shortens a masked row by lr * lam = 0.03
    run = train_compactor(block.q, z, target, mask, lam=lam, lr=lr, steps=60)
    norms = run.row_norms[:, 2]           # starts at 1 (identity row)
    steps = np.arange(34)
    np.testing.assert_allclose(norms[:34], 1.0 - 0.03 * steps, rtol=0, atol=1e-12)
    assert norms[33] < 0.03               # reached the ball of radius lr * lam in 33 steps
    assert np.all(run.row_norms[34:, [2, 5]] <= 0.03 + 1e-12)   # and stays there (overshoot at most)
    l2 = train_compactor(block.q, z, target, mask, lam=lam, lr=lr, steps=60, penalty="l2")
    # plain lam * Q: multiplied by (1 - lr * lam) = 0.97 each step, never zero
    np.testing.assert_allclose(l2.row_norms[:, 2], 0.97 ** np.arange(61), rtol=1e-12)


def test_group_lasso_drives_masked_rows_below_resrep_threshold_l2_does_not():
    block, z, target, lr = _problem()
    steps = 300
    lam = 8.0 / (lr * steps)              # total shrinkage lam * sum(lr_t) = 4 > the rows' norm 1
    mask = compactor_mask(block.q + 1e-3 * np.arange(8)[:, None], 3)   # rows 0, 1, 2 (smallest norms)
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 1, 1, 1])
    target[:, :3] = 0                     # the removed channels are not needed by the target
    lasso = train_compactor(block.q, z, target, mask, lam=lam, lr=lr, steps=steps, schedule="cosine")
    l2 = train_compactor(block.q, z, target, mask, lam=lam, lr=lr, steps=steps, schedule="cosine",
                         penalty="l2")
    masked, kept = mask == 0, mask == 1
    first_below = np.argmax(lasso.row_norms[:, masked] < CONVERSION_THRESHOLD, axis=0)
    assert np.all(lasso.row_norms[-1, masked] < CONVERSION_THRESHOLD)
    assert np.all((first_below > 0) & (first_below <= steps))              # finitely many steps
    # same steps, same schedule, same lam: plain decay leaves exp(-lam * sum(lr)) ~ 2e-2
    expected_l2 = np.prod(1 - lasso.learning_rates * lam)
    np.testing.assert_allclose(l2.row_norms[-1, masked], expected_l2, rtol=1e-9)
    assert np.all(l2.row_norms[-1, masked] > 1e3 * CONVERSION_THRESHOLD)
    # the rows that learn stay well above the threshold: selection picks exactly them
    assert np.all(lasso.row_norms[-1, kept] > 0.1)
    np.testing.assert_array_equal(select_channels(lasso.q), np.flatnonzero(kept))
    assert lasso.losses[-1] < 0.5 * lasso.losses[0]      # and the loss went down meanwhile


def test_train_compactor_shape_errors():
    block, z, target, lr = _problem()
    with pytest.raises(ShapeError, match="features"):
        train_compactor(block.q, z[:, :3], target, np.ones(8), lam=0.1, lr=lr, steps=1)
    with pytest.raises(ShapeError, match="target"):
        train_compactor(block.q, z, target[:, :3], np.ones(8), lam=0.1, lr=lr, steps=1)
    with pytest.raises(ValueError, match="schedule"):
        train_compactor(block.q, z, target, np.ones(8), lam=0.1, lr=lr, steps=1, schedule="step")


def test_trained_compactor_prunes_the_network_end_to_end():
    net = ResRepNet.random(4, 3, 8, 5, head="conv")
    x = random_input((2, 3, 7, 7), seed=9)
    z = net.layer.features(x)
    target = np.einsum("dc,nchw->ndhw", np.eye(8), z)
    mask = np.ones(8)
    mask[[1, 6]] = 0
    zz = z.transpose(1, 0, 2, 3).reshape(8, -1)
    lr = 1.0 / np.linalg.eigvalsh(zz @ zz.T / zz.shape[1]).max()
    run = train_compactor(net.layer.q, z, target, mask, lam=8.0 / (lr * 300), lr=lr, steps=300,
                          schedule="cosine")
    trained = net.with_compactor(run.q)
    deploy = trained.reparameterize()
    assert deploy.channels == 6
    assert deploy.conv.weight.shape == (6, 3, 3, 3) and deploy.next_conv.weight.shape == (5, 6, 3, 3)
    assert relative_error(deploy.forward(x), trained.zero_pruned().forward(x)) <= 1e-12
    diff = np.abs(deploy.forward(x) - trained.forward(x)).max()
    assert diff <= trained.pruning_error_bound(x)
    assert relative_error(deploy.forward(x), trained.forward(x)) <= 1e-5


# ----------------------------------------------------------------------------
# the network: exact against the zeroed train form, bounded against the unzeroed one
# ----------------------------------------------------------------------------

def _pruned(net, rows, scale, seed=0):
    """``net`` with a compactor moved off the identity and rows ``rows`` of norm ~``scale``."""
    rng = np.random.default_rng(seed)
    d = net.layer.out_channels
    q = np.eye(d) + 0.2 * rng.standard_normal((d, d))
    q[rows] = scale * rng.standard_normal((len(rows), d)) / np.sqrt(d)
    return net.with_compactor(q.astype(net.layer.q.dtype))


@pytest.mark.parametrize("head", ["conv", "linear"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_against_zeroed_train_form(head, dtype):
    net = ResRepNet.random(1, 3, 6, 4, head=head, input_size=(7, 8), stride=2, dtype=dtype)
    net = _pruned(net, [1, 4], 1e-7)
    x = random_input((2, 3, 7, 8), dtype=dtype, seed=2)
    deploy = net.reparameterize()
    assert deploy.channels == 4
    y = deploy.forward(x)
    assert y.dtype == dtype
    assert relative_error(y, net.zero_pruned().forward(x)) <= TOL[dtype]
    assert_reparam_equivalent(net.zero_pruned(), x)        # nothing below threshold left to prune


@pytest.mark.parametrize("head", ["conv", "linear"])
def test_error_against_unzeroed_train_form_is_bounded_by_the_pruned_norms(head):
    net = ResRepNet.random(3, 3, 6, 4, head=head, input_size=(6, 6))
    x = random_input((2, 3, 6, 6), seed=3)
    # threshold 1e-2: the rows of norm ~1e-3 go, with a visible error
    big = _pruned(net, [0, 5], 1e-3)
    deploy = big.reparameterize(threshold=1e-2)
    assert deploy.channels == 4
    diff = np.abs(deploy.forward(x) - big.forward(x)).max()
    bound = big.pruning_error_bound(x, threshold=1e-2)
    assert 0 < diff <= bound
    # the bound is linear in the pruned rows' norms
    half = _pruned(net, [0, 5], 0.5e-3)
    assert half.pruning_error_bound(x, threshold=1e-2) == pytest.approx(bound / 2, rel=1e-12)
    # and it is zero when nothing is removed
    assert big.pruning_error_bound(x, threshold=1e-6) == 0.0


def test_bound_derivation_is_tight_for_one_channel_identity_head():
    """With one pruned row, a linear head reading one feature of it: the bound is (nearly) attained."""
    net = ResRepNet.random(0, 2, 3, 1, head="linear", input_size=(1, 1), kernel_size=1, activation="identity")
    x = random_input((1, 2, 1, 1), seed=0)
    z = net.layer.features(x)[0, :, 0, 0]
    q = np.eye(3)
    q[2] = 1e-3 * z / np.linalg.norm(z)         # aligned with z: Cauchy-Schwarz is an equality
    w = np.array([[0.0, 0.0, 1.0]])             # the head reads only channel 2
    net = dataclasses.replace(net.with_compactor(q), linear=Linear(w, np.zeros(1)))
    diff = np.abs(net.reparameterize(threshold=1e-2).forward(x) - net.forward(x)).max()
    assert diff == pytest.approx(net.pruning_error_bound(x, threshold=1e-2), rel=1e-12)


def test_linear_is_cut_channel_first():
    """NCHW flattens channel-first: channel c owns features c*H*W .. (c+1)*H*W - 1."""
    net = ResRepNet.random(5, 2, 4, 3, head="linear", input_size=(3, 3))
    net = _pruned(net, [1], 0.0)
    deploy = net.reparameterize()
    hw = 9
    keep = np.r_[0:hw, 2 * hw:3 * hw, 3 * hw:4 * hw]
    np.testing.assert_array_equal(deploy.linear.weight, net.linear.weight[:, keep])
    x = random_input((2, 2, 3, 3), seed=5)
    assert relative_error(deploy.forward(x), net.forward(x)) <= 1e-12
    # the official converter's channel-last cut (indices i + C*k) keeps other columns: wrong output
    d = 4
    wrong_delete = np.arange(0, hw * d, d) + 1
    wrong_keep = np.setdiff1d(np.arange(d * hw), wrong_delete)
    wrong = dataclasses.replace(deploy, linear=Linear(net.linear.weight[:, wrong_keep], net.linear.bias))
    assert relative_error(wrong.forward(x), net.forward(x)) > 1e-2


def test_bn_eps_is_a_parameter_not_hard_coded():
    net = ResRepNet.random(6, 3, 6, 4, eps=1e-3)
    net = _pruned(net, [2], 0.0)
    assert net.layer.conv_bn.bn.eps == 1e-3 and net.next_conv.bn.eps == 1e-3
    x = random_input((1, 3, 6, 6), seed=6)
    ref = net.forward(x)
    assert relative_error(net.reparameterize().forward(x), ref) <= 1e-12
    # fusing with the official converter's hard-coded 1e-5 instead would be visibly wrong
    bn = net.layer.conv_bn.bn
    wrong_bn = BatchNorm(bn.mean, bn.var, bn.gamma, bn.beta, eps=1e-5)
    wrong = dataclasses.replace(net, layer=dataclasses.replace(
        net.layer, conv_bn=ConvBN(net.layer.conv_bn.conv, wrong_bn)))
    assert relative_error(wrong.reparameterize().forward(x), ref) > 1e-5


@given(
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    channels=st.integers(2, 4),
    head=st.sampled_from(["conv", "linear"]),
    activation=st.sampled_from(["relu", "relu6", "identity"]),
    n_pruned=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float64, np.float32]),
)
def test_pruning_property(k, stride, dilation, groups, channels, head, activation, n_pruned, seed, dtype):
    d = channels * groups
    layer = CompactorConv.random(seed, 2 * groups, d, kernel_size=k, stride=stride, dilation=dilation,
                                 groups=groups, dtype=dtype)
    net = ResRepNet.random(seed, 2 * groups, d, 3, head=head, input_size=(9, 9), kernel_size=k, stride=stride,
                           groups=groups, activation=activation, dtype=dtype)
    net = dataclasses.replace(net, layer=layer)
    if head == "linear":   # size the Linear for this layer's output
        _, _, ho, wo = layer.conv_bn.conv.output_shape((1, 2 * groups, 9, 9))
        rng = np.random.default_rng(seed)
        net = dataclasses.replace(net, linear=Linear(rng.standard_normal((3, d * ho * wo)).astype(dtype),
                                                     np.zeros(3, dtype)))
    rows = list(np.random.default_rng(seed).permutation(d)[:min(n_pruned, d - 1)])
    net = _pruned(net, rows, 0.0, seed=seed)
    x = random_input((2, 2 * groups, 9, 9), dtype=dtype, seed=seed + 1)
    deploy = net.reparameterize()
    assert deploy.channels == d - len(rows)
    assert relative_error(deploy.forward(x), net.forward(x)) <= TOL[dtype]


def test_compactor_conv_reparameterize_alone():
    block = CompactorConv.random(0, 4, 6, stride=2, groups=2)
    x = random_input((1, 4, 8, 8), seed=0)
    assert_reparam_equivalent(block, x)                      # identity compactor: nothing removed
    q = np.eye(6)
    q[3] = 0
    thin = block.with_compactor(q).reparameterize()
    assert thin.weight.shape == (5, 4, 3, 3) and thin.groups == 1   # the compactor mixes the groups
    np.testing.assert_allclose(thin.forward(x), np.delete(block.forward(x), 3, axis=1), rtol=0, atol=1e-12)


def test_merge_uses_fusion_merge_pointwise():
    block = CompactorConv.random(1, 3, 4)
    q = np.random.default_rng(1).standard_normal((4, 4))
    thin = block.with_compactor(q).reparameterize()
    expected = fusion.merge_pointwise(block.conv_bn.fused(), (q[:, :, None, None], None))
    np.testing.assert_allclose(thin.weight, expected.kernel, rtol=0, atol=1e-14)


def test_trace():
    net = ResRepNet.random(0, 3, 6, 4, head="linear", input_size=(5, 5))
    t = Trace()
    y = net.trace(t, t.input((1, 3, 5, 5)))
    assert [op.op_type for op in t.ops] == ["Conv", "BatchNormalization", "Conv", "Relu", "Flatten", "Gemm"]
    assert y.shape == (1, 4)
    deploy = _pruned(net, [0, 1], 0.0).reparameterize()
    td = Trace()
    deploy.trace(td, td.input((1, 3, 5, 5)))
    assert [op.op_type for op in td.ops] == ["Conv", "Relu", "Flatten", "Gemm"]
    assert td.ops[0].output_shape == (1, 4, 5, 5) and td.ops[-1].macs == 4 * 4 * 25


def test_config_properties():
    net = ResRepNet.random(0, 3, 6, 4)
    assert (net.in_channels, net.channels, net.out_channels) == (3, 6, 4)
    lin = ResRepNet.random(0, 3, 6, 5, head="linear", input_size=(4, 4))
    assert (lin.in_channels, lin.channels, lin.out_channels) == (3, 6, 5)
    assert lin.linear.weight.shape == (5, 6 * 16)


def test_params_names():
    names = set(ResRepNet.random(0, 3, 6, 4).params())
    assert {"layer.conv.weight", "layer.bn.mean", "layer.compactor.weight", "next.conv.weight",
            "next.bn.beta"} <= names
    deploy = ResRepNet.random(0, 3, 6, 4, head="linear", input_size=(4, 4)).reparameterize()
    assert set(deploy.params()) == {"conv.weight", "conv.bias", "linear.weight", "linear.bias"}


def test_bad_configs():
    with pytest.raises(ValueError, match="activation"):
        ResRepNet.random(0, 3, 6, 4, activation="sigmoid")       # sigmoid(0) != 0: not prunable
    with pytest.raises(ValueError, match="input_size"):
        ResRepNet.random(0, 3, 6, 4, head="linear")
    with pytest.raises(ValueError, match="head"):
        ResRepNet.random(0, 3, 6, 4, head="pool")
    net = ResRepNet.random(0, 3, 6, 4)
    grouped = ConvBN.random(np.random.default_rng(0), 6, 4, 3, padding=1, groups=2)
    with pytest.raises(ShapeError, match="groups=1"):
        dataclasses.replace(net, next_conv=grouped)
    with pytest.raises(ValueError, match="exactly one"):
        ResRepNet(net.layer, "relu")
    layer = net.layer
    with pytest.raises(ShapeError, match="compactor"):
        dataclasses.replace(layer, compactor=dataclasses.replace(layer.compactor, bias=np.zeros(6)))
