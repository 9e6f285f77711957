"""Diverse Branch Block: four branches -> one KxK conv, exact at the borders too."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repnp import fusion, ops
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.blocks.dbb import DiverseBranchBlock
from repnp.errors import ShapeError
from repnp.testing import assert_reparam_equivalent, random_input, relative_error
from repnp.trace import Trace

OFFICIAL = Path(__file__).parent / "data" / "state"  # official PyTorch cases, shared with test_io_npz*


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cin, cout, k, stride, groups, internal", [
    (4, 6, 3, 1, 1, None),     # dense, identity-based 1x1 (M = C_in)
    (4, 6, 3, 2, 2, None),     # grouped, stride 2
    (6, 6, 3, 1, 6, None),     # depthwise: no 1x1 branch, pool the input, M = 2 C
    (6, 6, 5, 2, 6, None),
    (4, 6, 5, 2, 2, 8),        # plain conv1 (M != C_in)
    (3, 6, 1, 1, 1, None),     # K = 1: nothing to pad
])
def test_train_equals_deploy(cin, cout, k, stride, groups, internal, dtype):
    block = DiverseBranchBlock.random(7, cin, cout, kernel_size=k, stride=stride, groups=groups,
                                      internal_channels=internal, dtype=dtype)
    x = random_input((2, cin, 9, 11), dtype=dtype, seed=1)
    assert_reparam_equivalent(block, x)


@given(
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 3]),
    cin=st.integers(1, 2),
    cout=st.integers(1, 3),
    internal=st.sampled_from([None, 1, 2]),
    depthwise=st.booleans(),
    hw=st.tuples(st.integers(5, 10), st.integers(5, 10)),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float64, np.float32]),
)
def test_train_equals_deploy_property(k, stride, groups, cin, cout, internal, depthwise, hw, seed, dtype):
    if depthwise:
        cin = cout = groups * cin
        cout_total, internal_total = cin, None if internal is None else groups * internal
    else:
        cin, cout_total = cin * groups, cout * groups
        internal_total = None if internal is None else groups * internal
        if cout_total == groups:  # would select the depthwise layout, which needs cin == cout
            cout_total *= 2
    block = DiverseBranchBlock.random(seed, cin, cout_total, kernel_size=k, stride=stride, groups=groups,
                                      internal_channels=internal_total, dtype=dtype)
    x = random_input((1, cin) + hw, dtype=dtype, seed=seed)
    assert_reparam_equivalent(block, x)


def test_layouts_follow_the_official_constructor():
    dense = DiverseBranchBlock.random(0, 4, 4)
    assert dense.one is not None and dense.avg_conv is not None
    assert dense.seq_identity_based and dense.internal_channels == 4
    dw = DiverseBranchBlock.random(0, 6, 6, groups=6)
    assert dw.one is None and dw.avg_conv is None
    assert not dw.seq_identity_based and dw.internal_channels == 12
    plain = DiverseBranchBlock.random(0, 4, 4, internal_channels=8)
    assert not plain.seq_identity_based


def test_identity_based_kernel_is_delta_plus_identity():
    block = DiverseBranchBlock.random(3, 4, 4, groups=2)
    expected = block.seq_conv1.weight + fusion.identity_kernel(4, groups=2)
    np.testing.assert_array_equal(block.seq_kernel1, expected)
    # a zero delta (the official initialisation) is exactly the identity 1x1
    zero = DiverseBranchBlock(block.origin, block.one, block.avg_conv, block.avg_bn,
                              Conv2d(np.zeros_like(block.seq_conv1.weight), groups=2), True,
                              block.seq_bn1, block.seq_conv2, block.seq_bn2)
    x = random_input((1, 4, 5, 5), seed=0)
    np.testing.assert_array_equal(ops.conv2d(x, zero.seq_kernel1, groups=2), x)
    assert_reparam_equivalent(zero, x)
    assert "seq.idconv1.weight" in block.params() and "seq.conv1.weight" not in block.params()


def test_bn_and_pad_is_what_makes_the_border_exact():
    """With zero padding of the 1x1-BN output the merged kernel is right only in the interior."""
    block = DiverseBranchBlock.random(5, 3, 4, kernel_size=3)
    x = random_input((1, 3, 8, 8), seed=2)
    merged = block.branch_kernels()[-1]                      # the 1x1 -> KxK branch, merged
    deploy = ops.conv2d(x, merged.kernel, merged.bias, padding=1)
    # BN-and-pad, as the official block: pad the 1x1-BN output with the BN's value at zero input
    h = block.seq_bn1.forward(ops.conv2d(x, block.seq_kernel1))
    pad_value = block.seq_bn1.forward(np.zeros((1, h.shape[1], 1, 1))).reshape(-1)
    exact = block.seq_bn2.forward(ops.conv2d(ops.pad2d(h, 1, value=pad_value), block.seq_conv2.weight))
    assert relative_error(deploy, exact) <= 1e-12
    zero_padded = block.seq_bn2.forward(ops.conv2d(h, block.seq_conv2.weight, padding=1))
    np.testing.assert_allclose(zero_padded[..., 1:-1, 1:-1], exact[..., 1:-1, 1:-1], rtol=0, atol=1e-12)
    assert np.abs(zero_padded - exact).max() > 1e-3        # the border differs


def test_random_bn_statistics_are_not_trivial():
    block = DiverseBranchBlock.random(0, 4, 4)
    bns = [block.origin.bn, block.one.bn, block.avg_conv.bn, block.avg_bn, block.seq_bn1, block.seq_bn2]
    for bn in bns:
        assert np.all(bn.mean != 0) and np.all(bn.var != 1) and np.all(bn.gamma != 1) and np.all(bn.beta != 0)


def test_eps_is_used():
    block = DiverseBranchBlock.random(0, 4, 4, eps=1e-3)
    assert block.seq_bn1.eps == 1e-3
    assert_reparam_equivalent(block, random_input((1, 4, 6, 6), seed=0))


def test_params_names_map_to_the_official_ones():
    dense = set(DiverseBranchBlock.random(0, 4, 4).params())
    for prefix in ("origin.bn.", "one.bn.", "avg.bn.", "avg.avgbn.", "seq.bn1.", "seq.bn2."):
        assert {prefix + s for s in ("mean", "var", "gamma", "beta")} <= dense
    assert {"origin.conv.weight", "one.conv.weight", "avg.conv.weight", "seq.idconv1.weight",
            "seq.conv2.weight"} <= dense
    dw = set(DiverseBranchBlock.random(0, 6, 6, groups=6).params())
    assert not any(n.startswith(("one.", "avg.conv", "avg.bn.")) for n in dw)
    assert "seq.conv1.weight" in dw


def test_trace():
    block = DiverseBranchBlock.random(0, 4, 6, stride=2, groups=2)
    t = Trace()
    y = block.trace(t, t.input((1, 4, 8, 8)))
    ops_ = [op.op_type for op in t.ops]
    assert ops_.count("Add") == 3 and ops_.count("Pad") == 2 and ops_.count("AveragePool") == 1
    assert ops_.count("Conv") == 5 and ops_.count("BatchNormalization") == 6
    assert y.shape == (1, 6, 4, 4)
    pads = [op for op in t.ops if op.op_type == "Pad"]
    assert [p.output_shape for p in pads] == [(1, 6, 10, 10), (1, 4, 10, 10)]
    td = Trace()
    block.reparameterize().trace(td, td.input((1, 4, 8, 8)))
    assert [op.op_type for op in td.ops] == ["Conv"] and td.ops[0].output_shape == y.shape
    dw = Trace()
    DiverseBranchBlock.random(0, 6, 6, groups=6).trace(dw, dw.input((1, 6, 8, 8)))
    pool = [op for op in dw.ops if op.op_type == "AveragePool"][0]
    assert pool.inputs == ("input",) and pool.output_shape == (1, 6, 8, 8)


@pytest.mark.parametrize("args, kwargs, error", [
    ((4, 6), {"kernel_size": 2}, ValueError),
    ((4, 6), {"groups": 4}, ShapeError),                 # groups must divide 6
    ((4, 8), {"groups": 8}, ShapeError),                 # does not divide in_channels
    ((3, 6), {"groups": 6}, ShapeError),                 # does not divide in_channels either
    ((4, 6), {"groups": 2, "internal_channels": 3}, ShapeError),
])
def test_bad_configs(args, kwargs, error):
    with pytest.raises(error):
        DiverseBranchBlock.random(0, *args, **kwargs)


def test_depthwise_layout_needs_equal_channels():
    with pytest.raises(ShapeError, match="in_channels == out_channels"):
        DiverseBranchBlock.random(0, 8, 4, groups=4)


def test_dilation_and_padding_are_refused():
    block = DiverseBranchBlock.random(0, 2, 2)
    c = block.origin.conv
    for bad in (Conv2d(c.weight, padding=1, dilation=2), Conv2d(c.weight, padding=2)):
        with pytest.raises(ValueError):
            DiverseBranchBlock(ConvBN(bad, block.origin.bn), block.one, block.avg_conv, block.avg_bn,
                               block.seq_conv1, True, block.seq_bn1, block.seq_conv2, block.seq_bn2)


def _load(case):
    with np.load(OFFICIAL / case / "train_state.npz", allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    with np.load(OFFICIAL / case / "deploy_state.npz", allow_pickle=False) as f:
        deploy = {k: f[k] for k in f.files}
    meta = json.loads((OFFICIAL / case / "meta.json").read_text())
    return state, deploy, meta, np.load(OFFICIAL / case / "input.npy"), np.load(OFFICIAL / case / "output.npy")


def _bn(state, name, eps=1e-5):
    return BatchNorm(state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                     state[f"{name}.bias"], eps=eps)


@pytest.mark.parametrize("case", ["off_dbb_k3_c12", "off_dbb_dw3_c14"])
def test_official_dbb_state_dict(case):
    """The official DBB loaded by name (mapping in the module docstring): PyTorch's output and deploy conv."""
    state, deploy_state, meta, x, ref = _load(case)
    kw = meta["constructor_kwargs"]
    assert set(meta["batchnorm_eps"].values()) == {1e-5}
    g, s, k = kw.get("groups", 1), kw["stride"], kw["kernel_size"]
    p = k // 2
    origin = ConvBN(Conv2d(state["dbb_origin.conv.weight"], stride=s, padding=p, groups=g), _bn(state, "dbb_origin.bn"))
    if "dbb_1x1.conv.weight" in state:
        one = ConvBN(Conv2d(state["dbb_1x1.conv.weight"], stride=s, groups=g), _bn(state, "dbb_1x1.bn"))
        avg_conv = ConvBN(Conv2d(state["dbb_avg.conv.weight"], groups=g), _bn(state, "dbb_avg.bn.bn"))
    else:
        one = avg_conv = None
    identity_based = "dbb_1x1_kxk.idconv1.weight" in state
    w1 = state["dbb_1x1_kxk.idconv1.weight" if identity_based else "dbb_1x1_kxk.conv1.weight"]
    block = DiverseBranchBlock(origin, one, avg_conv, _bn(state, "dbb_avg.avgbn"), Conv2d(w1, groups=g),
                               identity_based, _bn(state, "dbb_1x1_kxk.bn1.bn"),
                               Conv2d(state["dbb_1x1_kxk.conv2.weight"], stride=s, groups=g),
                               _bn(state, "dbb_1x1_kxk.bn2"))
    assert relative_error(block.forward(x), ref) <= 1e-5
    deploy = block.reparameterize()
    assert relative_error(deploy.weight, deploy_state["dbb_reparam.weight"]) <= 1e-5
    assert relative_error(deploy.bias, deploy_state["dbb_reparam.bias"]) <= 1e-5
    assert relative_error(deploy.forward(x), ref) <= 1e-5
