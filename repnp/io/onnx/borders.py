"""Borders for the ONNX walker: a crop (``Slice``) and a padding (``Pad``, ``Pad`` + ``ScatterND``).

A ``Slice`` that crops the spatial axes of a tracked map is negative padding of the region
(ACNet's ``CropLayer``); a ``Pad`` of a pointwise region is exact for a conv after it only when
the border holds the region's own value at zero input — DBB's BN-and-pad (Ding et al., CVPR
2021; official ``BNAndPadLayer``), which PyTorch exports as a zero ``Pad`` and ``ScatterND``
writes of the per-channel values. These handlers are mixed into
:class:`repnp.io.onnx.walk._Converter`, whose state they read.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from repnp.io.onnx import fold as _fold
from repnp.io.onnx import graph as og
from repnp.io.onnx.regions import _identity_region, _NoFuse, _Padded, _Region
from repnp.tolerance import FLOAT32, FLOAT64

#: How far a padded map's border may be from the region's value at zero input (relative
#: to the largest bias) and still be BN-and-pad: the stored pad values are that value
#: rounded to the model's dtype once (float16's rounding step is about 1e-3; float32 and
#: float64 use the one-fusion tolerances of :mod:`repnp.tolerance`). Keyed by item size, so
#: that bfloat16 counts as a 2-byte type.
_BORDER_TOL = {2: 1e-3, 4: FLOAT32, 8: FLOAT64}


class _BorderRules:
    """``op_Slice``, ``op_Pad`` and ``op_ScatterND`` of the walker, and the undoing of a padding."""

    def _unpad(self, padded: _Padded, node) -> _Region:
        base = padded.base
        border = padded.border
        bias = base.bias.reshape(1, -1, 1, 1)
        mask = ~np.isnan(border)
        diff = np.where(mask, np.abs(border - bias), 0.0)
        scale = max(float(np.max(np.abs(base.bias))), np.finfo(np.float32).tiny)
        dtype = np.dtype(base.dtype) if base.dtype is not None else np.dtype(np.float32)
        tol = _BORDER_TOL.get(dtype.itemsize, FLOAT32)
        err = float(diff.max()) / scale if diff.size else 0.0
        if err > tol:
            raise _NoFuse(f"the map before {node.op_type} {node.name!r} is padded with values that are not "
                          f"the region's value at zero input (relative difference {err:.3g}): exact only "
                          f"in the interior")
        return replace(base, pads=padded.pads, nodes=padded.nodes)

    # -- crops and BN-and-pad ---------------------------------------------------
    def op_Slice(self, idx, node):
        x = node.input[0]
        r, took = self.eff(x)
        shape = self.shapes.get(x)
        if not isinstance(r, _Region) or not r.plain_identity or shape is None or len(shape) != 4:
            return None
        if shape[2] is None or shape[3] is None or shape[1] is None:
            return None
        if self.opset >= 10:
            vals = [self.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
            starts, ends, axes, steps = vals
            if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) or \
                    (len(node.input) > 4 and node.input[4] and steps is None):
                return None
        else:
            attrs = og.node_attributes(node)
            starts, ends, axes, steps = attrs.get("starts"), attrs.get("ends"), attrs.get("axes"), None
        starts, ends = np.asarray(starts).tolist(), np.asarray(ends).tolist()
        axes = list(range(len(starts))) if axes is None else [int(a) % 4 for a in np.asarray(axes).tolist()]
        steps = [1] * len(starts) if steps is None else np.asarray(steps).tolist()
        crop = [0, 0, 0, 0]
        for a, s, e, st in zip(axes, starts, ends, steps):
            n = shape[a]
            if st != 1:
                return None
            s = min(max(s + n if s < 0 else s, 0), n)
            e = min(max(e + n if e < 0 else e, 0), n)
            if a in (0, 1):
                if s != 0 or e != n:
                    return None
                continue
            if e <= s:
                return None
            crop[a - 2], crop[a] = -s, -(n - e)
        r = _identity_region(x, shape[1], nodes=r.nodes + (idx,))
        r.pads = tuple(crop)
        return r, ([x] if took else [])

    def op_Pad(self, idx, node):
        x = node.input[0]
        r, took = self.eff(x)
        if not isinstance(r, _Region) or r.kernel is None or not r.pointwise or r.pads != (0, 0, 0, 0):
            return None
        attrs = og.node_attributes(node)
        if attrs.get("mode", "constant") != "constant":
            return None
        if self.opset >= 11:
            pads = self.const(node.input[1]) if len(node.input) > 1 else None
            value = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
            axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if pads is None or value is None or (len(node.input) > 3 and node.input[3] and axes is None):
                return None
        else:
            pads, value, axes = attrs.get("pads"), np.asarray(attrs.get("value", 0.0)), None
        pads = np.asarray(pads).astype(np.int64).tolist()
        axes = list(range(len(pads) // 2)) if axes is None else [int(a) % 4 for a in np.asarray(axes).tolist()]
        full = [0] * 8
        for k, a in enumerate(axes):
            full[a], full[a + 4] = pads[k], pads[k + len(axes)]
        if full[0] or full[1] or full[4] or full[5] or min(full) < 0 or np.asarray(value).size != 1:
            return None
        shape = self.shapes.get(r.source)
        if shape is None or len(shape) != 4 or any(d is None for d in (shape[0], shape[2], shape[3])):
            return None
        top, left, bottom, right = full[2], full[3], full[6], full[7]
        n, c, h, w = shape[0], r.out_channels, shape[2], shape[3]
        size = n * c * (h + top + bottom) * (w + left + right)
        if size > _fold.FOLD_LIMIT:
            self.note(idx, f"Pad {og.text(node.name)!r}: the padded map would have {size} elements (more than "
                           f"{_fold.FOLD_LIMIT}): not tracked", r.nodes)
            return None
        border = np.full((n, c, h + top + bottom, w + left + right), float(np.asarray(value)))
        border[:, :, top:top + h, left:left + w] = np.nan
        state = _Padded(r, x, (top, left, bottom, right), border, r.nodes + (idx,))
        return state, ([x] if took else [])

    def op_ScatterND(self, idx, node):
        data = node.input[0]
        st = self.states.get(data)
        if not isinstance(st, _Padded) or len(self.users.get(data, ())) != 1 or data in self.outputs:
            return None
        indices, updates = self.const(node.input[1]), self.const(node.input[2])
        if indices is None or updates is None or og.node_attributes(node).get("reduction", "none") != "none":
            return None
        indices = np.asarray(indices).astype(np.int64)
        k = indices.shape[-1]
        border = st.border.copy()
        try:
            index = tuple(indices[..., j] for j in range(k))
            if np.any(np.isnan(border[index])):
                self.note(idx, "ScatterND writes inside the padded map, not only its border", st.nodes)
                return None
            border[index] = np.asarray(updates, dtype=np.float64)
        except (IndexError, ValueError):
            return None
        return _Padded(st.base, st.base_tensor, st.pads, border, st.nodes + (idx,)), [data]
