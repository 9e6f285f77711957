"""repnp.testing: the error metric, the equivalence assertion, golden loading, and a port check."""

import re
from pathlib import Path

import numpy as np
import pytest

from repnp.blocks.acnet import ACBlock
from repnp.blocks.base import Conv2d
from repnp.errors import ShapeError
from repnp.testing import (
    assert_reparam_equivalent,
    assert_reparam_keeps_block,
    check_port,
    default_tolerance,
    golden_config,
    golden_params,
    load_golden,
    random_input,
    relative_error,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


def test_relative_error_hand_values():
    assert relative_error([1.0, 2.0], [1.0, 4.0]) == 0.5                 # max|a-b| = 2, max|b| = 4
    assert relative_error([[0.0, -3.0]], [[0.0, -1.0]]) == 2.0
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.ones(3), np.zeros(3)) == np.inf
    assert relative_error([np.nan], [1.0]) == np.inf
    assert relative_error(np.float32([1.5]), np.float64([1.0])) == 0.5


def test_random_input_is_seeded_and_keeps_the_dtype():
    x = random_input((2, 3, 4, 5), seed=7)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float64
    np.testing.assert_array_equal(x, np.random.default_rng(7).standard_normal((2, 3, 4, 5)))
    np.testing.assert_array_equal(random_input([2, 3, 4, 5], seed=7), x)           # same seed, same values
    assert not np.array_equal(random_input((2, 3, 4, 5), seed=8), x)
    x32 = random_input((2, 3, 4, 5), dtype=np.float32, seed=np.random.default_rng(7))  # a Generator works too
    assert x32.dtype == np.float32
    np.testing.assert_array_equal(x32, x.astype(np.float32))                        # float64 draw, rounded


class _InPlaceBlock:
    """A block whose reparameterize() scales its own kernel in place: the bug the check exists for."""

    def __init__(self, same_object=False):
        self.weight = np.ones((2, 2, 1, 1))
        self.same_object = same_object

    def params(self, prefix=""):
        return {f"{prefix}weight": self.weight}

    def reparameterize(self):
        if self.same_object:
            return self
        self.weight *= 2.0
        return Conv2d(self.weight)


def test_assert_reparam_keeps_block_catches_in_place_fusion():
    block = ACBlock.random(0, 2, 2)
    assert isinstance(assert_reparam_keeps_block(block), Conv2d)
    with pytest.raises(AssertionError, match="changed parameter 'weight'"):
        assert_reparam_keeps_block(_InPlaceBlock())
    with pytest.raises(AssertionError, match="returned the block itself"):
        assert_reparam_keeps_block(_InPlaceBlock(same_object=True))


def test_relative_error_refuses_broadcasting():
    with pytest.raises(ShapeError, match="one shape"):
        relative_error(np.zeros((2, 3)), np.zeros((3,)))


def test_default_tolerance_is_the_rule():
    assert default_tolerance(np.float64) == 1e-12
    assert default_tolerance(np.float32) == 1e-5
    assert default_tolerance(np.float16) == 1e-2
    with pytest.raises(ValueError, match="explicitly"):
        default_tolerance(np.int32)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_assert_reparam_equivalent_passes_and_returns_error(dtype):
    block = ACBlock.random(0, 3, 4, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(dtype)
    err = assert_reparam_equivalent(block, x)
    assert 0 <= err <= default_tolerance(dtype)


class _OffByBias:
    """A fake train-form block whose deploy form adds a small bias: must be caught."""

    def __init__(self, delta):
        self.conv = Conv2d(np.ones((1, 1, 1, 1)))
        self.delta = delta

    def forward(self, x):
        return self.conv.forward(x)

    def reparameterize(self):
        return Conv2d(np.ones((1, 1, 1, 1)), np.array([self.delta]))


def test_assert_reparam_equivalent_fails_on_a_wrong_deploy_form():
    x = np.full((1, 1, 2, 2), 2.0)
    with pytest.raises(AssertionError, match="err"):
        assert_reparam_equivalent(_OffByBias(1e-9), x)                   # 5e-10 > 1e-12
    assert assert_reparam_equivalent(_OffByBias(1e-9), x, rtol=1e-9) == pytest.approx(5e-10)
    with pytest.raises(AssertionError):
        assert_reparam_equivalent(_OffByBias(1e-3), x.astype(np.float32))


def test_load_golden_and_its_parts():
    g = load_golden(GOLDEN / "acnet_float64.npz")
    cfg = golden_config(g)
    assert cfg["family"] == "acnet" and cfg["kwargs"]["padding"] == 1 and cfg["tolerance"] == 1e-12
    train = golden_params(g, "train")
    assert train["square.conv.weight"].shape == (6, 2, 3, 3)
    assert set(golden_params(g, "deploy")) == {"weight", "bias"}
    with pytest.raises(ValueError):
        golden_params(g, "eval")
    with pytest.raises(KeyError):
        golden_config({"x": np.zeros(1)})


# ----------------------------------------------------------------------------
# How a port is checked: a from-scratch NumPy ACNet (loops, no repnp) against the golden file
# ----------------------------------------------------------------------------

def _port_conv(x, w, b, *, stride, pads, groups):
    """Direct-loop cross-correlation, pads = (top, left, bottom, right): what a porter writes."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (h + pads[0] + pads[2] - kh) // stride + 1
    wo = (wd + pads[1] + pads[3] - kw) // stride + 1
    out = np.zeros((n, o, ho, wo), dtype=x.dtype)
    og = o // groups
    for oc in range(o):
        g = oc // og
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, g * cg:(g + 1) * cg, i * stride:i * stride + kh, j * stride:j * stride + kw]
                out[:, oc, i, j] = np.sum(patch * w[oc], axis=(1, 2, 3))
    if b is not None:
        out += b[None, :, None, None]
    return out


def _port_bn(y, p, prefix, eps):
    shape = (1, -1, 1, 1)
    return ((y - p[prefix + "mean"].reshape(shape)) / np.sqrt(p[prefix + "var"].reshape(shape) + eps)
            * p[prefix + "gamma"].reshape(shape) + p[prefix + "beta"].reshape(shape))


def _acnet_port(*, eps_override=None, flip_kernels=False):
    def forward(x, params, config):
        kw = config["kwargs"]
        k, p, s, g = kw["kernel_size"], kw["padding"], kw["stride"], kw["groups"]
        eps = config["eps"] if eps_override is None else eps_override
        if "weight" in params:                                  # the deploy form: one conv
            return _port_conv(x, params["weight"], params["bias"], stride=s, pads=(p, p, p, p), groups=g)
        c = p - k // 2                                          # p >= K//2 in this file: no crop
        ver_pads, hor_pads = (p, c, p, c), (c, p, c, p)
        if flip_kernels:                                        # true convolution instead of correlation
            params = {n: v[..., ::-1, ::-1] if v.ndim == 4 else v for n, v in params.items()}
        out = _port_bn(_port_conv(x, params["square.conv.weight"], None, stride=s, pads=(p,) * 4, groups=g),
                       params, "square.bn.", eps)
        out = out + _port_bn(_port_conv(x, params["ver.conv.weight"], None, stride=s, pads=ver_pads, groups=g),
                             params, "ver.bn.", eps)
        return out + _port_bn(_port_conv(x, params["hor.conv.weight"], None, stride=s, pads=hor_pads, groups=g),
                              params, "hor.bn.", eps)
    return forward


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_port_checked_against_the_golden_file(dtype):
    g = load_golden(GOLDEN / f"acnet_{dtype}.npz")
    port = _acnet_port()
    err_train = check_port(g, port, form="train")
    err_deploy = check_port(g, port, form="deploy")
    assert err_train <= default_tolerance(g["y"].dtype) and err_deploy <= default_tolerance(g["y"].dtype)


def test_port_bugs_are_caught():
    g = load_golden(GOLDEN / "acnet_float64.npz")
    with pytest.raises(AssertionError, match="err"):
        check_port(g, _acnet_port(eps_override=1e-3))           # a hard-coded eps
    with pytest.raises(AssertionError):
        check_port(g, _acnet_port(flip_kernels=True))           # convolution, not cross-correlation


def _every_family():
    """One train-form block of every family (the golden specs) plus the composite blocks."""
    from repnp.blocks.mobileone import MobileOneUnit
    from repnp.blocks.nasnet import NASNetNormalCell
    from repnp.blocks.resrep import CompactorConv
    from repnp.golden import BLOCK_SPECS, build_golden_block

    blocks = {family: build_golden_block(family) for family in BLOCK_SPECS}
    blocks["mobileone_unit"] = MobileOneUnit.random(0, 16, 16, num_branches=2, use_se=True)
    blocks["nasnet"] = NASNetNormalCell.random(0, 3, 4, 4)
    blocks["compactor"] = CompactorConv.random(0, 3, 4)
    return blocks


@pytest.mark.parametrize("name, block", sorted(_every_family().items()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_family_reparameterizes_into_a_new_object_without_touching_the_train_form(name, block):
    deploy = assert_reparam_keeps_block(block)
    assert any(k.endswith(".mean") for k in block.params()), name
    # The deploy form has no BN left: every running statistic is folded away.
    assert not [k for k in deploy.params() if k.endswith((".mean", ".var"))], name


@pytest.mark.parametrize("name, block", sorted(_every_family().items()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_family_names_x_and_its_shape_on_a_wrong_input(name, block):
    """One more channel than the block reads: a ShapeError naming ``x`` and the shape given."""
    c = block.in_channels
    if name == "repmlp":
        shape = (2, c + 1, block.height, block.width)
    else:
        shape = (2, c + 1, 6, 7)
    args = (np.zeros((2, block.in_channels_prev, 6, 7)),) if name == "nasnet" else ()
    with pytest.raises(ShapeError, match=r"\bx\b.*" + re.escape(str(shape))):
        block.forward(*args, np.zeros(shape))
