"""Whole-network state dicts in timm's layout: RepVGG-A0 and MobileOne-S0.

The training-form parameters come from ``repnp.models`` (random, seeded) and are
renamed to the layout of timm's ``byobnet`` models (``stem.``, ``stages.<i>.<j>.``,
``head.fc.``; BN ``weight / bias / running_mean / running_var / num_batches_tracked``;
MobileOne units as two consecutive blocks, depthwise then pointwise, as
``_mobileone_bcfg`` lays them out). The converter must find every block by prefix,
write timm's deploy names (``<block>.reparam_conv.weight / .bias``), pass the head
through, and produce the same kernels as repnp's own ``reparameterize()``.

Key counts are derived by hand from the published configurations (timm byobnet
``repvgg_a0``: stem + stages of (2, 4, 14, 1) RepVggBlocks, widths 48, 48, 96, 192,
1280; ``mobileone_s0``: stem + stages of (2, 8, 10, 1) dw/pw pairs, widths 48, 48,
128, 256, 1024, 4 conv branches).
"""

import re

import numpy as np
import pytest

from repnp import models
from repnp.io import convert_state
from repnp.io.npz import detect_scheme, find_blocks
from repnp.tolerance import relative_error as rel_err

BN_NAMES = {"mean": "running_mean", "var": "running_var", "gamma": "weight", "beta": "bias"}


def timm_name(key: str) -> str:
    key = re.sub(r"^stage0\.", "stem.", key)
    # MobileOne units: dw block then pw block, numbered consecutively within the stage
    key = re.sub(r"^stage(\d+)\.(\d+)\.(dw|pw)\.",
                 lambda m: f"stages.{int(m[1]) - 1}.{2 * int(m[2]) + (m[3] == 'pw')}.", key)
    key = re.sub(r"^stage(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.", key)
    key = key.replace(".skip.", ".identity.")
    key = re.sub(r"^linear\.", "head.fc.", key)
    return key


def timm_train_state(params: dict) -> dict:
    out = {}
    for key, value in params.items():
        module, leaf = key.rsplit(".", 1)
        if leaf in BN_NAMES:
            out[timm_name(f"{module}.{BN_NAMES[leaf]}")] = value
            if leaf == "beta":
                out[timm_name(f"{module}.num_batches_tracked")] = np.array(5000, dtype=np.int64)
        else:
            out[timm_name(key)] = value
    return out


def timm_deploy_state(params: dict) -> dict:
    return {timm_name(re.sub(r"\.conv\.(weight|bias)$", r".reparam_conv.\1", k)): v for k, v in params.items()}




@pytest.mark.parametrize("name, n_keys, n_blocks, n_identity", [
    # RepVGG-A0: 22 blocks x (kxk conv-BN 6 keys + 1x1 conv-BN 6 keys) + 17 identity BNs x 5 + head 2
    ("repvgg_a0", 22 * 12 + 17 * 5 + 2, 22, 17),
    # MobileOne-S0, keys per block (conv-BN 6, identity BN 5): stem 12; dw block 4 conv + scale = 30,
    # +5 with identity (stride 1); pw block 4 conv = 24, +5 with identity (C_in == C_out). Stage 1
    # (48->48): 30+29 + 35+29; stage 2 (->128): 30+24 + 7 * (35+29); stage 3 (->256): 30+24 + 9 * 64;
    # stage 4 (->1024): 30+24; head 2. Blocks: stem + 2 * (2 + 8 + 10 + 1). Identity: stride-1 dw
    # blocks 1 + 7 + 9, pw blocks with C_in == C_out 2 + 7 + 9.
    ("mobileone_s0", 12 + 123 + 502 + 630 + 54 + 2, 43, 17 + 18),
])
def test_network_in_timm_layout(name, n_keys, n_blocks, n_identity):
    net = models.create(name, num_classes=10, seed=3)
    train = timm_train_state(net.params())
    assert len(train) == n_keys
    assert detect_scheme(train) == "timm"
    blocks = find_blocks(train)
    assert len(blocks) == n_blocks
    assert sum(b.identity for b in blocks) == n_identity
    assert blocks[0].prefix == "stem."
    assert all(re.fullmatch(r"stages\.\d\.\d+\.", b.prefix) for b in blocks[1:])

    out, report = convert_state(train)
    assert report.counts_before[blocks[1].name] == n_blocks and report.counts_after[blocks[1].name] == 0
    assert len(report.fused) == n_blocks and report.passed and len(report.check["per_block"]) == n_blocks
    assert report.counts_before["keys"] == n_keys and report.counts_after["keys"] == 2 * n_blocks + 2
    expected = timm_deploy_state(net.reparameterize().params())
    assert list(out) == list(expected)
    assert len(out) == 2 * n_blocks + 2
    assert out["head.fc.weight"] is train["head.fc.weight"]
    for key, ref in expected.items():
        assert out[key].dtype == ref.dtype == np.float32
        assert rel_err(out[key], ref) <= 1e-5, key
