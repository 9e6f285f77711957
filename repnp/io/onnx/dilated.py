"""Summed convs with different dilations (UniRepLKNet's Dilated Reparam Block) as one conv.

A KxK kernel with dilation ``r`` is a dense ``r(K-1)+1`` kernel with zeros between its taps
(:func:`repnp.fusion.dilate_kernel`); more generally, with dilation ``g`` dividing ``r``, it is a
kernel with dilation ``g`` and ``r/g - 1`` zeros between taps. Two regions of
:mod:`repnp.io.onnx.regions` whose dilations differ are re-expressed at the greatest common
dilation, and then add like any others (rule 2).

Never costlier: the merge is allowed only when one operand keeps its kernel (its dilation is
already the common one) and the sum's kernel is no larger than that operand's, so the one conv
has that operand's weights and MACs, fewer than the two it replaces. That is the Dilated Reparam
Block: every dilated branch falls inside the large kernel. Two dilated branches on their own (3x3
with dilation 2 plus 3x3 with dilation 3 would be a dense 7x7) are left as they are.
"""

from __future__ import annotations

import math
from dataclasses import replace

from repnp import fusion

__all__ = ["align_dilations", "check_not_costlier"]


def align_dilations(a, b, no_fuse):
    """``(a, b, kept)``: the two regions at their common dilation, and the one whose kernel is unchanged.

    ``kept`` is ``None`` when the dilations already agree (nothing to check afterwards).
    ``no_fuse`` is the exception class to raise (regions' ``_NoFuse``): when neither region
    can keep its kernel, the merged one would be larger than both.
    """
    common, changed = [], [False, False]
    for ax in (0, 1):
        dils = {r.dilation[ax] for r in (a, b) if r.kernel.shape[2 + ax] > 1}
        common.append(math.gcd(*dils) if dils else 1)
    if all(r.dilation[ax] == common[ax] or r.kernel.shape[2 + ax] == 1 for r in (a, b) for ax in (0, 1)):
        return a, b, None
    out = []
    for n, r in enumerate((a, b)):
        factor = [r.dilation[ax] // common[ax] if r.kernel.shape[2 + ax] > 1 else 1 for ax in (0, 1)]
        if factor != [1, 1]:
            changed[n] = True
            r = replace(r, kernel=fusion.dilate_kernel(r.kernel, dilation=tuple(factor)))
        out.append(replace(r, dilation=tuple(common)))
    if all(changed):
        raise no_fuse(f"dilations {list(a.dilation)} and {list(b.dilation)}: as one conv at dilation {common} "
                      f"both kernels grow; the merged conv would cost more than the two branches")
    return out[0], out[1], out[1] if changed[0] else out[0]


def check_not_costlier(merged_kernel, kept, no_fuse) -> None:
    """Raise ``no_fuse`` unless the merged kernel is no larger than the kept operand's."""
    if kept is not None and merged_kernel.shape[2:] != kept.kernel.shape[2:]:
        raise no_fuse(f"the dilated branch reaches outside the {kept.kernel.shape[2]}x{kept.kernel.shape[3]} kernel "
                      f"(merged {merged_kernel.shape[2]}x{merged_kernel.shape[3]}): the one conv would cost more "
                      f"than the branches")
