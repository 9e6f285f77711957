"""ACNet's asymmetric convolution block: dxd + 1xd + dx1 conv-BN, deployed as one dxd conv.

In ACNet every dxd conv is trained as three parallel conv-BN branches, dxd, 1xd
and dx1, whose outputs are summed; at inference the 1xd and dx1 kernels, BN
folded in, are added onto the centre row and the centre column of the dxd kernel
("skeleton-enhanced" kernel). Paper: Ding et al., *ACNet: Strengthening the
Kernel Skeletons for Powerful CNN via Asymmetric Convolution Blocks*, ICCV 2019
(arXiv 1908.03930).

Branch layout (facts read from the official ``acnet/acb.py`` of
github.com/DingXiaoH/ACNet, read at commit 8a93375; the state dicts of the
examples ``off_acb_*``, made at 748fb0c, load into this block and reproduce
PyTorch's output, see ``tests/test_blocks_acnet.py``): with block padding
``P`` and kernel ``K``, the 1xK conv keeps ``P`` along W and uses
``P - K//2`` along H; the Kx1 conv the other way round. When ``P - K//2 < 0``
the official block crops the input of the asymmetric branches by
``K//2 - P`` on both sides of the short axis instead (negative padding). Here
the same holds with dilation ``d``: the shift is ``d*(K//2)`` (the official
code subtracts ``K//2``, which with ``d > 1`` gives branch outputs of another
size than the square one).

Parameter names (``params()``) and the official state dict:
``square.conv.weight`` = ``square_conv.weight``, ``square.bn.{mean,var,gamma,beta}``
= ``square_bn.{running_mean,running_var,weight,bias}``; ``ver.*`` = ``ver_conv``
/ ``ver_bn`` (the Kx1 kernel), ``hor.*`` = ``hor_conv`` / ``hor_bn`` (the 1xK one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion, ops
from repnp.blocks.base import Conv2d, ConvBN, pair
from repnp.blocks.common import check_groups, check_input, check_odd_kernel
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["ACBlock", "asymmetric_geometry"]


def asymmetric_geometry(kernel_size: int, padding, dilation) -> dict:
    """Paddings, crops and kernel offsets of ACNet's Kx1 ("ver") and 1xK ("hor") branches.

    Parameters
    ----------
    kernel_size : int
        Odd K of the square branch.
    padding : int or (ph, pw)
        The square branch's (symmetric) padding ``P``.
    dilation : int or (dh, dw)

    Returns
    -------
    dict
        ``ver_padding``, ``hor_padding``: (ph, pw) of the branch convs, non-negative;
        ``ver_crop``, ``hor_crop``: pixels cropped from both sides of W (ver) or
        H (hor) of the branch input; ``ver_offset``, ``hor_offset``: (top, left)
        of the branch kernel inside the KxK kernel.

    Notes
    -----
    The KxK conv reads input column ``s*j - P_w + d_w*v``. The Kx1 branch has
    one tap along W, which must read the centre column ``v = K//2`` of that
    window, so its own W padding is ``P_w - d_w*(K//2)``; a negative value is a
    crop of ``d_w*(K//2) - P_w`` pixels from both sides (rule 3 of
    :mod:`repnp.fusion`, ``fusion.pad_kernel``: a crop counts as negative
    padding; the official ``ACBlock`` crops the same way when ``P < K//2``). The
    kernel then sits at offset ``(P_w - p_branch) / d_w = K//2`` along W, the
    centre column, whatever the sign of the padding. Symmetrically for 1xK.
    """
    k = int(kernel_size)
    ph, pw = pair(padding, name="padding")
    dh, dw = pair(dilation, name="dilation")
    ver_w = pw - dw * (k // 2)          # Kx1: one tap along W
    hor_h = ph - dh * (k // 2)          # 1xK: one tap along H
    # The offsets follow from the signed paddings (a crop is a negative padding).
    big = dict(kernel_size=k, padding=(ph, pw), dilation=(dh, dw))
    return {
        "ver_padding": (ph, max(ver_w, 0)),
        "hor_padding": (max(hor_h, 0), pw),
        "ver_crop": max(-ver_w, 0),
        "hor_crop": max(-hor_h, 0),
        "ver_offset": fusion.kernel_offset((k, 1), (ph, ver_w), **big),
        "hor_offset": fusion.kernel_offset((1, k), (hor_h, pw), **big),
    }


@dataclass(frozen=True, eq=False)
class ACBlock(Described):
    """Train form: ``BN(conv_KxK(x)) + BN(conv_Kx1(x)) + BN(conv_1xK(x))``, no activation.

    Attributes
    ----------
    square : ConvBN
        The KxK conv-BN, with the block's stride, padding ``P``, dilation, groups.
    ver : ConvBN
        The Kx1 conv-BN (padding from :func:`asymmetric_geometry`).
    hor : ConvBN
        The 1xK conv-BN.

    Notes
    -----
    Deploy (:meth:`reparameterize`): each branch folds its BN (rule 1), the Kx1
    and 1xK kernels are placed at their offsets in a KxK kernel (rule 3) and
    the three are summed (rule 2):

    .. math:: W = W_{sq}' + \\mathrm{pad}(W_{ver}') + \\mathrm{pad}(W_{hor}'),
        \\qquad b = b_{sq}' + b_{ver}' + b_{hor}'
    """

    square: ConvBN
    ver: ConvBN
    hor: ConvBN

    def __post_init__(self) -> None:
        w = self.square.conv.weight
        o, cg, kh, kw = w.shape
        if kh != kw or kh % 2 == 0:
            raise ValueError(f"square.conv.weight must be KxK with K odd, got shape {w.shape}")
        k = kh
        if self.ver.conv.weight.shape != (o, cg, k, 1):
            raise ShapeError(f"ver.conv.weight must have shape {(o, cg, k, 1)}, got {self.ver.conv.weight.shape}")
        if self.hor.conv.weight.shape != (o, cg, 1, k):
            raise ShapeError(f"hor.conv.weight must have shape {(o, cg, 1, k)}, got {self.hor.conv.weight.shape}")
        geo = self.geometry
        for name, branch, pad in (("ver", self.ver, geo["ver_padding"]), ("hor", self.hor, geo["hor_padding"])):
            c = branch.conv
            sq = self.square.conv
            if (pair(c.stride, name="stride"), pair(c.dilation, name="dilation"), c.groups) != (
                    pair(sq.stride, name="stride"), pair(sq.dilation, name="dilation"), sq.groups):
                raise ValueError(f"{name}.conv must share stride, dilation and groups with square.conv")
            if ops.normalize_padding(c.padding) != ops.normalize_padding(pad):
                raise ValueError(
                    f"{name}.conv.padding {c.padding!r} does not align with square.conv.padding "
                    f"{self.square.conv.padding!r}: expected {pad}"
                )

    # -- configuration ---------------------------------------------------------
    @property
    def kernel_size(self) -> int:
        return int(self.square.conv.weight.shape[2])

    @property
    def in_channels(self) -> int:
        return int(self.square.conv.weight.shape[1] * self.groups)

    @property
    def out_channels(self) -> int:
        return self.square.conv.out_channels

    @property
    def stride(self):
        return self.square.conv.stride

    @property
    def padding(self):
        return self.square.conv.padding

    @property
    def dilation(self):
        return self.square.conv.dilation

    @property
    def groups(self) -> int:
        return int(self.square.conv.groups)

    @property
    def geometry(self) -> dict:
        """The branches' paddings, crops and offsets (:func:`asymmetric_geometry`)."""
        return asymmetric_geometry(self.kernel_size, self.padding, self.dilation)

    # -- construction ----------------------------------------------------------
    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride=1,
               padding=None, dilation=1, groups: int = 1, eps: float = 1e-5,
               dtype=np.float64) -> "ACBlock":
        """A block with N(0, 1/fan_in) kernels and random BN statistics.

        ``padding=None`` means "same" for stride 1: ``dilation * (K//2)`` per axis.
        """
        rng = np.random.default_rng(seed)
        k = check_odd_kernel(kernel_size)
        check_groups(in_channels, out_channels, groups)
        dh, dw = pair(dilation, name="dilation")
        if padding is None:
            padding = (dh * (k // 2), dw * (k // 2))
        ph, pw = pair(padding, name="padding")
        if ph < 0 or pw < 0:
            raise ShapeError(f"padding must be non-negative, got {padding!r}")
        geo = asymmetric_geometry(k, (ph, pw), (dh, dw))
        common = dict(stride=stride, dilation=(dh, dw), groups=groups, eps=eps, dtype=dtype)
        square = ConvBN.random(rng, in_channels, out_channels, (k, k), padding=(ph, pw), **common)
        ver = ConvBN.random(rng, in_channels, out_channels, (k, 1), padding=geo["ver_padding"], **common)
        hor = ConvBN.random(rng, in_channels, out_channels, (1, k), padding=geo["hor_padding"], **common)
        return cls(square, ver, hor)

    # -- the one description of the train form ---------------------------------
    def check_input(self, x):
        x = check_input(x, self.in_channels)
        geo = self.geometry
        cv, ch = geo["ver_crop"], geo["hor_crop"]
        h, w = x.shape[2:]
        if 2 * cv >= w or 2 * ch >= h:
            raise ShapeError(f"x of shape {x.shape} is too small for the crops (W by {cv}, H by {ch})")
        return (x,)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``BN_s(conv_KxK(x)) + BN_v(conv_Kx1(crop_W(x))) + BN_h(conv_1xK(crop_H(x)))``.

        A crop (``Slice``) appears only when the block's padding is below ``d (K//2)``:
        the asymmetric branches would need a negative padding along their short axis.
        """
        geo = self.geometry

        def branch(name: str, axis: int, crop: int) -> str:
            src = x if not crop else d.node("Slice", [x], f"{prefix}{name}.", starts=[crop], ends=[-crop],
                                             axes=[axis])
            return getattr(self, name).describe(d, src, f"{prefix}{name}.")

        return d.sum([lambda: self.square.describe(d, x, f"{prefix}square."),
                      lambda: branch("ver", 3, geo["ver_crop"]),
                      lambda: branch("hor", 2, geo["hor_crop"])], prefix)

    # -- the algebra -----------------------------------------------------------
    def reparameterize(self) -> Conv2d:
        """One KxK conv with bias (stride, padding, dilation, groups of the square branch)."""
        geo = self.geometry
        k = self.kernel_size
        ver_k, ver_b = self.ver.fused()
        hor_k, hor_b = self.hor.fused()
        kernel, bias = fusion.add_branches(
            self.square.fused(),
            (fusion.pad_kernel(ver_k, k, offset=geo["ver_offset"]), ver_b),
            (fusion.pad_kernel(hor_k, k, offset=geo["hor_offset"]), hor_b),
        )
        c = self.square.conv
        return Conv2d(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int = 1,
                    eps: float = 1e-5) -> "ACBlock":
        """The inverse of :meth:`params`: ``square.*``, ``ver.*``, ``hor.*`` (each a conv-BN).

        ``padding`` is the square conv's (``None``: the centred ``dilation * (K//2)``); the
        branch paddings and crops follow from it (:func:`asymmetric_geometry`). ``groups``
        cannot be read from the arrays (no branch needs ``C_in == C_out``) and does not
        change the fused kernel: default 1.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        expected = sum((fp.conv_bn_keys(params, f"{n}.") for n in ("square", "ver", "hor")), [])
        fp.check_keys(params, expected, what="ACBlock")
        w = fp.array(params, "square.conv.weight", ndim=4)
        o, cg, k = w.shape[0], w.shape[1], w.shape[2]
        for name, shape in (("ver", (o, cg, k, 1)), ("hor", (o, cg, 1, k))):
            got = fp.array(params, f"{name}.conv.weight", ndim=4).shape
            if got != shape:
                raise ShapeError(f"{name}.conv.weight has shape {got}, but square.conv.weight has {w.shape}: "
                                 f"the branch must be {shape}")
        dh, dw = pair(dilation, name="dilation")
        if padding is None:
            padding = (dh * (k // 2), dw * (k // 2))
        geo = asymmetric_geometry(k, padding, (dh, dw))
        common = dict(stride=stride, dilation=dilation, groups=groups, eps=eps)
        return cls(fp.conv_bn_from(params, "square.", padding=padding, **common),
                   fp.conv_bn_from(params, "ver.", padding=geo["ver_padding"], **common),
                   fp.conv_bn_from(params, "hor.", padding=geo["hor_padding"], **common))
