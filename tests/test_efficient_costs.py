"""Closed-form cost claims of MobileNetV1 (Howard et al. 2017) and MobileNetV2 (Sandler et al.,
CVPR 2018), checked through repnp.cost on the blocks' op lists (repnp.efficient)."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repnp import cost
from repnp.blocks.separable import DepthwiseSeparableBlock, LinearBottleneckBlock, RegularConvBlock
from repnp.blocks.shufflenet import ShuffleNetUnit
from repnp.efficient import (
    DEFAULT_INPUT,
    cost_rows,
    format_table,
    four_way_blocks,
    four_way_table,
    lineage_blocks,
    lineage_table,
    profile_block,
)
from repnp.testing import random_input, relative_error


def _conv_macs(profile):
    return [c.op.macs for c in profile.ops if c.op.op_type == "Conv"]


# ----------------------------------------------------------------------------
# MobileNetV1: separable / regular = 1/C_out + 1/K^2
# ----------------------------------------------------------------------------

def test_lineage_macs_by_hand():
    shape = DEFAULT_INPUT   # 1x32x56x56 -> 32 channels
    blocks = lineage_blocks(0)
    macs = {name: cost.profile(b, shape).macs for name, b in blocks.items()}
    assert macs["(a) regular 3x3"] == 56 * 56 * 32 * 32 * 9 == 28_901_376
    assert macs["(b) depthwise separable"] == 56 * 56 * (32 * 9 + 32 * 32) == 4_114_432
    assert macs["(c) linear bottleneck"] == 56 * 56 * (32 * 8 + 8 * 9 + 8 * 32) == 1_831_424
    assert macs["(d) inverted residual"] == 56 * 56 * (32 * 192 + 192 * 9 + 192 * 32) == 43_954_176


@given(c_in=st.integers(1, 16), c_out=st.integers(1, 16), k=st.sampled_from([1, 3, 5, 7]),
       h=st.integers(1, 9), w=st.integers(1, 9))
def test_separable_over_regular_is_one_over_cout_plus_one_over_k2(c_in, c_out, k, h, w):
    # MobileNetV1 (Howard et al. 2017), Sec. 3.1; block (b) of MobileNetV2's Fig. 2:
    # (D_K^2 M D_F^2 + M N D_F^2) / (D_K^2 M N D_F^2) = 1/N + 1/D_K^2
    shape = (1, c_in, h, w)
    regular = cost.profile(RegularConvBlock.random(0, c_in, c_out, kernel_size=k).reparameterize(), shape)
    separable = cost.profile(DepthwiseSeparableBlock.random(0, c_in, c_out, kernel_size=k).reparameterize(),
                             shape)
    assert Fraction(separable.macs, regular.macs) == Fraction(1, c_out) + Fraction(1, k * k)


# ----------------------------------------------------------------------------
# ShuffleNet: group 1x1 convs cost 1/g of the dense ones
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("groups, stride", [(2, 1), (3, 1), (4, 1), (8, 1), (3, 2), (4, 2)])
def test_shufflenet_group_pointwise_saving(groups, stride):
    c_in, c_out = 48, (48 if stride == 1 else 96)
    m = 24
    shape = (1, c_in, 14, 14)
    grouped = cost.profile(ShuffleNetUnit.random(0, c_in, c_out, groups=groups, stride=stride,
                                                 bottleneck_channels=m), shape)
    dense = cost.profile(ShuffleNetUnit.random(0, c_in, c_out, groups=1, stride=stride,
                                               bottleneck_channels=m), shape)
    g1, g_dw, g2 = _conv_macs(grouped)
    d1, d_dw, d2 = _conv_macs(dense)
    assert g1 * groups == d1 and g2 * groups == d2    # both 1x1 GConvs: divided by g
    assert g_dw == d_dw                               # the depthwise conv is unchanged
    ho = 14 // stride
    assert d1 == 14 * 14 * c_in * m and d2 == ho * ho * m * (c_out - (c_in if stride == 2 else 0))


# ----------------------------------------------------------------------------
# MobileNetV2: residual at stride 1, none at stride 2
# ----------------------------------------------------------------------------

def test_mobilenetv2_stride2_has_no_residual():
    blocks = four_way_blocks(0)
    s1 = cost.profile(blocks["MobileNetV2 s1"].reparameterize(), DEFAULT_INPUT)
    s2 = cost.profile(blocks["MobileNetV2 s2"].reparameterize(), DEFAULT_INPUT)
    assert s1.op_types().get("Add") == 1
    assert "Add" not in s2.op_types()
    # the residual keeps the block input alive until the add: more resident memory than the output alone
    assert s1.peak_resident_bytes >= 2 * 32 * 56 * 56 * 4


# ----------------------------------------------------------------------------
# merging depthwise -> pointwise: exact, but a bad trade
# ----------------------------------------------------------------------------

def test_merging_depthwise_into_pointwise_costs_macs_and_params():
    shape = DEFAULT_INPUT
    blocks = {**lineage_blocks(0), **four_way_blocks(0)}
    checked = 0
    for name, block in blocks.items():
        if not isinstance(block, (LinearBottleneckBlock, ShuffleNetUnit)) and "NASNet" not in name:
            continue
        plain = profile_block(block.reparameterize(), shape).profile
        merged = profile_block(block.reparameterize(merge_pointwise=True), shape).profile
        assert merged.macs > 1.5 * plain.macs, name
        assert merged.params > 1.5 * plain.params, name
        assert merged.op_count < plain.op_count, name   # one conv fewer per merged pair
        checked += 1
    assert checked == 4   # (c), NASNet, ShuffleNet s1 and s2


def test_linear_bottleneck_merge_closed_form():
    # dw (M K^2 + M bias) + expand (C M + C bias)  ->  one dense conv (C M K^2 + C bias)
    c, m, k = 32, 8, 3
    b = LinearBottleneckBlock.random(0, c, c, bottleneck_channels=m, kernel_size=k)
    plain = cost.count_params(b.reparameterize())
    merged = cost.count_params(b.reparameterize(merge_pointwise=True))
    reduce = c * m + m
    assert plain == reduce + (m * k * k + m) + (c * m + c)
    assert merged == reduce + c * m * k * k + c


# ----------------------------------------------------------------------------
# the tables
# ----------------------------------------------------------------------------

def test_tables_list_every_block_with_profiled_numbers():
    rows = cost_rows(lineage_blocks(0), DEFAULT_INPUT)
    names = [r.name for r in rows]
    assert names == ["(a) regular 3x3", "(b) depthwise separable", "(c) linear bottleneck",
                     "(c) linear bottleneck, merged dw+pw", "(d) inverted residual"]
    text = format_table(rows)
    for r in rows:
        line = next(line for line in text.splitlines() if line.startswith(r.name + " "))
        assert f"{r.profile.macs:,}" in line and f"{r.profile.params:,}" in line
    assert "28,901,376" in lineage_table()
    four = four_way_table()
    for name in ("NASNet-A normal cell", "MobileNetV1", "ShuffleNetV1 s1", "ShuffleNetV1 s2",
                 "MobileNetV2 s1", "MobileNetV2 s2"):
        assert name in four
    train_rows = cost_rows(lineage_blocks(0), DEFAULT_INPUT, form="train")
    assert len(train_rows) == 4   # no merged rows for train forms
    # folding BN removes one operator per conv-BN and leaves the MACs unchanged
    for t_row, d_row in zip(train_rows, [r for r in rows if "merged" not in r.name]):
        assert t_row.profile.macs == d_row.profile.macs
        assert t_row.profile.op_count - d_row.profile.op_count == t_row.profile.op_types()["BatchNormalization"]


def test_nasnet_row_has_two_inputs_and_six_f_outputs():
    row = profile_block(four_way_blocks(0)["NASNet-A normal cell"].reparameterize(), DEFAULT_INPUT)
    assert row.output_shape == (1, 192, 56, 56)
    assert row.profile.input_bytes == 2 * 32 * 56 * 56 * 4


def test_cost_rows_rejects_unknown_form():
    with pytest.raises(ValueError, match="form"):
        cost_rows(lineage_blocks(0), form="fused")


def test_blocks_run_at_the_table_shape():
    # The profiled blocks are real: each runs on the table's input (float32) and its deploy form agrees.
    x = random_input((1, 32, 12, 12), dtype=np.float32, seed=0)
    for name, b in {**lineage_blocks(0), **four_way_blocks(0)}.items():
        if "NASNet" in name:
            y, d = b.forward(x, x), b.reparameterize().forward(x, x)
        else:
            y, d = b.forward(x), b.reparameterize().forward(x)
        assert y.dtype == d.dtype == np.float32
        assert relative_error(d, y) <= 1e-5, name
