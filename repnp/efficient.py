"""Cost tables for the efficient blocks of MobileNetV2's figures: the lineage (a) -> (d) and the four-way comparison.

Two figures of MobileNetV2 (Sandler et al., CVPR 2018, arXiv 1801.04381; see
``docs/sources.md``): Fig. 2, the evolution of separable blocks ((a)
regular 3x3 conv, (b) depthwise separable, (c) separable with linear
bottleneck, (d) bottleneck with expansion layer = inverted residual), and
Fig. 4, MobileNetV2's block next to NASNet-A's cell, MobileNetV1's separable
block and ShuffleNetV1's unit. This module builds those blocks with random
weights for one input shape and profiles them with :mod:`repnp.cost` (the MACs,
parameter, traffic and memory definitions live there; nothing is counted here).

Rows are **deploy forms** (every BN folded, as a runtime would run them) unless
``form="train"``; blocks with a linear depthwise -> pointwise pair get a second
row "merged", the exact ``reparameterize(merge_pointwise=True)`` form whose
dense (or grouped) KxK conv shows why that merge is a bad trade.

Default geometry (issue 8: "the same input, e.g. 1x32x56x56 -> 32 or 64"):

* lineage: 32 -> 32 channels, 3x3, stride 1; (c) reduces to 32 // 4 = 8
  channels (the ResNet / ShuffleNet ratio), (d) expands by 6 (MobileNetV2);
* four-way: MobileNetV1's 32 -> 64 block (its first separable layer);
  ShuffleNetV1 with g = 4, 32 -> 32 (stride 1) and 32 -> 64 (stride 2),
  bottleneck ``out // 4``; MobileNetV2 32 -> 32 (stride 1, residual) and
  32 -> 64 (stride 2, no residual), expansion 6; a NASNet-A normal cell with
  ``F = 32`` whose two inputs h_(i-1), h_i are both 1x32x56x56 (its output
  has ``6 F = 192`` channels: the cell's concatenation is part of its cost).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from repnp import cost
from repnp.blocks.mobilenetv2 import InvertedResidual
from repnp.blocks.nasnet import NASNetNormalCell
from repnp.blocks.separable import DepthwiseSeparableBlock, LinearBottleneckBlock, RegularConvBlock
from repnp.blocks.shufflenet import ShuffleNetUnit
from repnp.trace import Trace

__all__ = ["CostRow", "lineage_blocks", "four_way_blocks", "profile_block", "cost_rows",
           "format_table", "lineage_table", "four_way_table", "DEFAULT_INPUT"]

#: Issue 8's common input: one 32-channel 56x56 feature map.
DEFAULT_INPUT = (1, 32, 56, 56)


class CostRow(NamedTuple):
    """One block profiled: its label, output shape and :class:`repnp.cost.Profile`."""

    name: str
    output_shape: tuple[int, ...]
    profile: cost.Profile


def lineage_blocks(seed=0, *, channels: int = 32, dtype=np.float32) -> dict[str, object]:
    """MobileNetV2's Fig. 2 blocks (Sandler et al., CVPR 2018), train form, ``channels -> channels``, stride 1."""
    rng = np.random.default_rng(seed)
    return {
        "(a) regular 3x3": RegularConvBlock.random(rng, channels, channels, dtype=dtype),
        "(b) depthwise separable": DepthwiseSeparableBlock.random(rng, channels, channels, dtype=dtype),
        "(c) linear bottleneck": LinearBottleneckBlock.random(rng, channels, channels, dtype=dtype),
        "(d) inverted residual": InvertedResidual.random(rng, channels, channels, expand_ratio=6,
                                                         dtype=dtype),
    }


def four_way_blocks(seed=0, *, channels: int = 32, dtype=np.float32) -> dict[str, object]:
    """MobileNetV2's Fig. 4 blocks (Sandler et al., CVPR 2018), train form, all reading ``channels`` channels."""
    rng = np.random.default_rng(seed)
    wide = 2 * channels
    return {
        "NASNet-A normal cell": NASNetNormalCell.random(rng, channels, channels, channels, dtype=dtype),
        "MobileNetV1": DepthwiseSeparableBlock.random(rng, channels, wide, dtype=dtype),
        "ShuffleNetV1 s1": ShuffleNetUnit.random(rng, channels, channels, groups=4, stride=1, dtype=dtype),
        "ShuffleNetV1 s2": ShuffleNetUnit.random(rng, channels, wide, groups=4, stride=2, dtype=dtype),
        "MobileNetV2 s1": InvertedResidual.random(rng, channels, channels, stride=1, dtype=dtype),
        "MobileNetV2 s2": InvertedResidual.random(rng, channels, wide, stride=2, dtype=dtype),
    }


def profile_block(block, input_shape: Sequence[int]) -> CostRow:
    """Profile one block (:func:`repnp.cost.profile`); a NASNet cell gets two inputs of ``input_shape``.

    The cell reads h_(i-1) and h_i; both are graph inputs here (both alive
    from the start), which is what the cell costs inside a network.
    """
    shape = tuple(int(s) for s in input_shape)
    t = Trace()
    if isinstance(block, NASNetNormalCell):
        out = block.trace(t, t.input(shape, "x_prev"), t.input(shape, "x"))
    else:
        out = block.trace(t, t.input(shape))
    prof = cost.profile_ops(t.ops, t.inputs, params=cost.count_params(block))
    return CostRow(type(block).__name__, out.shape, prof)


def _merged(block):
    """The exact merged deploy form, for blocks with a linear depthwise -> pointwise pair, else None."""
    if isinstance(block, (LinearBottleneckBlock, ShuffleNetUnit, NASNetNormalCell)):
        return block.reparameterize(merge_pointwise=True)
    return None


def cost_rows(blocks: dict, input_shape: Sequence[int] = DEFAULT_INPUT, *, form: str = "deploy",
              merged: bool | None = None) -> list[CostRow]:
    """Profile every block of ``blocks`` (train forms) in the chosen form.

    Parameters
    ----------
    blocks : dict of name -> train-form block
    input_shape : (N, C, H, W)
    form : {"deploy", "train"}, keyword-only
        "deploy" folds the BNs (``reparameterize()``) before profiling.
    merged : bool, keyword-only
        Add a "<name>, merged dw+pw" row (a deploy form) for blocks that offer
        ``reparameterize(merge_pointwise=True)``; default: only when ``form`` is "deploy".
    """
    if form not in ("deploy", "train"):
        raise ValueError(f"form must be 'deploy' or 'train', got {form!r}")
    if merged is None:
        merged = form == "deploy"
    rows = []
    for name, block in blocks.items():
        module = block.reparameterize() if form == "deploy" else block
        rows.append(profile_block(module, input_shape)._replace(name=name))
        alt = _merged(block) if merged else None
        if alt is not None:
            rows.append(profile_block(alt, input_shape)._replace(name=f"{name}, merged dw+pw"))
    return rows


def format_table(rows: Sequence[CostRow], *, title: str = "") -> str:
    """A fixed-width text table: params, MACs, traffic, operators, peak live and resident memory."""
    header = ("block", "output", "params", "MACs", "traffic MiB", "ops", "peak live MiB", "resident MiB")
    body = [(r.name, "x".join(str(s) for s in r.output_shape), f"{r.profile.params:,}",
             f"{r.profile.macs:,}", f"{r.profile.traffic_bytes / 2**20:.2f}", f"{r.profile.op_count}",
             f"{r.profile.peak_activation_bytes / 2**20:.2f}", f"{r.profile.peak_resident_bytes / 2**20:.2f}")
            for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def fmt(line):
        return "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])

    lines = ([title] if title else []) + [fmt(header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    return "\n".join(lines + [fmt(line) for line in body])


def lineage_table(seed=0, input_shape: Sequence[int] = DEFAULT_INPUT, *, form: str = "deploy") -> str:
    """The (a) -> (d) table for ``input_shape`` (its C is the blocks' width)."""
    rows = cost_rows(lineage_blocks(seed, channels=int(input_shape[1])), input_shape, form=form)
    return format_table(rows, title=f"MobileNetV2 Fig. 2 lineage, input {tuple(input_shape)}, {form} forms")


def four_way_table(seed=0, input_shape: Sequence[int] = DEFAULT_INPUT, *, form: str = "deploy") -> str:
    """The four-way (NASNet, MobileNetV1, ShuffleNetV1, MobileNetV2) table for ``input_shape``."""
    rows = cost_rows(four_way_blocks(seed, channels=int(input_shape[1])), input_shape, form=form)
    return format_table(rows, title=f"MobileNetV2 Fig. 4 comparison, input {tuple(input_shape)}, {form} forms")
