"""RepMLP's rules for the ONNX walker: a region seen through ``Reshape``, and a conv on a
fixed-size map merged into the fully connected layer on the flat view of the same rows.

RepMLP (Ding et al., "RepMLP: Re-parameterizing Convolutions into Fully-connected Layers
for Image Recognition", arXiv:2105.01883, 2021; RepMLPNet, CVPR 2022) sums, through
reshapes, local convs on partitions ``(M, C, H, W)`` and an FC on the flat partitions
``(M, C*H*W, 1, 1)``; a conv on the first is an FC on the second (rule 8,
:func:`repnp.fusion.conv_to_fc`). These handlers are mixed into
:class:`repnp.io.onnx.walk._Converter`, whose state (``shapes``, ``states``, ``users`` ...)
they read.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from repnp import fusion
from repnp.io.onnx.regions import (
    _add_regions,
    _affine,
    _kernel,
    _NoFuse,
    _Region,
    _View,
)


class _ViewRules:
    """The ``Reshape`` handler and the view algebra of :class:`repnp.io.onnx.walk._Converter`."""

    _FC_LIMIT = 1 << 24  # elements of a conv_to_fc matrix; larger maps are not merged

    def op_Reshape(self, idx, node):
        x = node.input[0]
        target = self.shapes.get(node.output[0])
        if self.const(node.input[1]) is None or target is None or any(d is None for d in target):
            return None
        st = self.states.get(x)
        if st is None or len(self.users.get(x, ())) != 1 or x in self.outputs:
            return None
        if isinstance(st, _View):
            return replace(st, shape=tuple(target), nodes=st.nodes + (idx,)), [x]
        if not isinstance(st, _Region) or st.kernel is None or st.identity:
            return None
        if self.shapes.get(x) is None or len(self.shapes[x]) != 4 or any(d is None for d in self.shapes[x]):
            return None
        return _View(st, x, tuple(target), st.nodes + (idx,), base=st), [x]

    def _flat(self, view: _View) -> _Region:
        """The view's region as a 1x1 conv on the flat tensor of its rows (rule 8)."""
        r = view.region
        src_shape = self.shapes.get(r.source)
        if src_shape is None or len(src_shape) != 4 or any(d is None for d in src_shape):
            raise _NoFuse(f"shape of {r.source!r} unknown")
        if src_shape[2:] == (1, 1) and r.pointwise:
            return r
        key = self.view_key.get(r.source)
        flat = self.flat_of.get(key) if key else None
        if flat is None:
            raise _NoFuse(f"no flat (M, C*H*W, 1, 1) view of {r.source!r} to carry the FC")
        if min(r.pads) < 0:
            raise _NoFuse("a cropping conv cannot become an FC here")
        c, h, w = src_shape[1:]
        out_shape = self.shapes.get(view.base_tensor)
        f = int(np.prod(out_shape[1:])) if out_shape else None
        if f is None or f * c * h * w > self._FC_LIMIT:
            raise _NoFuse("the FC matrix would be too large")
        fc = fusion.conv_to_fc(_kernel(r), r.bias, input_shape=(c, h, w), stride=r.stride, padding=r.pads,
                               dilation=r.dilation, groups=r.groups)
        return _Region(flat, fc.kernel[:, :, None, None], fc.bias, 1, nodes=r.nodes, dtype=r.dtype,
                       weights=r.weights)

    def _as_view(self, name, region):
        shape = self.shapes.get(name)
        if not isinstance(region, _Region) or region.kernel is None or region.identity or shape is None \
                or any(d is None for d in shape):
            return None
        return _View(region, name, tuple(shape), region.nodes, base=region)

    def _add_views(self, idx, node, a: _View, b: _View, sign: float):
        if a.shape != b.shape:
            raise _NoFuse(f"views differ: {list(a.shape)} vs {list(b.shape)}")
        fa, fb = self._flat(a), self._flat(b)
        if sign < 0:
            fb = _affine(fb, -1.0, 0.0)
        total = _add_regions(fa, fb, (1, 1))
        total.nodes = a.nodes + b.nodes + (idx,)
        return _View(total, a.base_tensor, a.shape, total.nodes, merged=True)

    def _bn_view(self, idx, node, view: _View, scale, shift):
        """A per-channel affine on a view (M, c, ...) whose rows are the region's rows."""
        r = view.region
        out_shape = self.shapes.get(view.base_tensor)
        if out_shape is None or view.shape[0] != out_shape[0] or len(view.shape) < 2:
            return None
        c = view.shape[1]
        o = r.out_channels
        if o % c:
            return None
        per = o // c
        new = _affine(r, np.repeat(scale, per), np.repeat(shift, per))
        new.nodes = r.nodes + (idx,)
        return replace(view, region=new, nodes=view.nodes + (idx,))
