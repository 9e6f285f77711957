"""RepGhost's cheap operation (timm repghost.py RepGhostModule) and FastViT's identity-only MobileOne block."""

import numpy as np
import pytest

from repnp import ops
from repnp.blocks import MobileOneIdentity, RepGhostCheap
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN
from repnp.errors import ShapeError
from repnp.tolerance import relative_error as rel_err


def bn_of(b, x):
    return ops.batch_norm(x, b.mean, b.var, b.gamma, b.beta, eps=b.eps)


@pytest.mark.parametrize("seed, channels, k, dtype, tol", [(0, 6, 3, np.float64, 1e-12), (1, 4, 5, np.float64, 1e-12),
                                                           (2, 8, 3, np.float32, 1e-5)])
def test_repghost_cheap_matches_unfused(seed, channels, k, dtype, tol):
    block = RepGhostCheap.random(seed, channels, kernel_size=k, dtype=dtype)
    x = np.random.default_rng(seed + 10).standard_normal((2, channels, 7, 6)).astype(dtype)
    c = block.cheap
    want = (bn_of(c.bn, ops.conv2d(x, c.conv.weight, None, padding=k // 2, groups=channels))
            + bn_of(block.fusion_bn, x))
    assert rel_err(block.forward(x), want) <= tol
    deploy = block.reparameterize()
    assert deploy.weight.shape == (channels, 1, k, k) and deploy.groups == channels
    assert deploy.weight.dtype == dtype
    assert rel_err(deploy.forward(x), want) <= tol


def test_repghost_cheap_rejects_bad_shapes():
    rng = np.random.default_rng(0)
    full = ConvBN.random(rng, 4, 4, 3, padding=1)
    with pytest.raises(ShapeError, match="depthwise"):
        RepGhostCheap(full, RepGhostCheap.random(0, 4).fusion_bn)
    good = RepGhostCheap.random(0, 4)
    with pytest.raises(ShapeError, match="fusion_bn has 6 channels"):
        RepGhostCheap(good.cheap, RepGhostCheap.random(1, 6).fusion_bn)
    params = dict(good.params())
    params["cheap.conv.weight"] = np.zeros((4, 2, 3, 3))
    with pytest.raises(ShapeError, match="cheap.conv.weight"):
        RepGhostCheap.from_params(params)
    with pytest.raises(ValueError, match="fusion_bn"):
        RepGhostCheap.from_params({k: v for k, v in good.params().items() if not k.startswith("fusion_bn.")})


@pytest.mark.parametrize("k", [1, 3, 5])
def test_mobileone_identity_matches_bn(k):
    block = MobileOneIdentity.random(0, 5, kernel_size=k)
    x = np.random.default_rng(1).standard_normal((2, 5, 6, 7))
    deploy = block.reparameterize()
    assert isinstance(deploy, Conv2d) and deploy.weight.shape == (5, 1, k, k)
    assert rel_err(deploy.forward(x), bn_of(block.skip, x)) <= 1e-12


def test_mobileone_identity_rejects_even_kernel():
    b = BatchNorm(np.zeros(3), np.ones(3), np.ones(3), np.zeros(3))
    with pytest.raises(ShapeError, match="kernel_size"):
        MobileOneIdentity(b, 2)
