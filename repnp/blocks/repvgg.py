"""RepVGG block: KxK conv-BN + 1x1 conv-BN + BN identity, then an activation -> one KxK conv.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021 (arXiv
2101.03697), eq. (3) and Sec. 3.3. Parameter names follow this module
(``conv_kxk.conv.weight``, ``conv_1x1.bn.mean``, ``identity.var``); the official
code calls the same three branches ``rbr_dense``, ``rbr_1x1`` and
``rbr_identity`` (DingXiaoH/RepVGG, ``repvgg.py``).

Unlike the official block (which asserts ``kernel_size == 3`` and
``padding == 1`` and pads the 1x1 kernel by a fixed 1 on each side), any odd
K, stride, groups and dilation work here; dilation is applied to the KxK
branch of the train form too, so the two forms compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, random_bn
from repnp.blocks.common import (
    RELU,
    Activation,
    ConvAct,
    as_activation,
    check_1x1_aligned,
    check_groups,
    check_odd_kernel,
    check_skip_geometry,
    check_square_kernel,
    resolve_skip,
    same_padding,
)
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError
from repnp.ops import pair

__all__ = ["RepVGGBlock"]


class KxkGeometry:
    """The geometry of a block whose main branch is ``conv_kxk`` (a :class:`ConvBN`): channels,
    kernel size, stride, padding, dilation and groups are that conv's (RepVGG, QARepVGG)."""

    @property
    def in_channels(self) -> int:
        return int(self.conv_kxk.conv.weight.shape[1] * self.groups)

    @property
    def out_channels(self) -> int:
        return int(self.conv_kxk.conv.weight.shape[0])

    @property
    def kernel_size(self) -> int:
        return int(self.conv_kxk.conv.weight.shape[2])

    @property
    def stride(self):
        return self.conv_kxk.conv.stride

    @property
    def padding(self):
        return self.conv_kxk.conv.padding

    @property
    def dilation(self):
        return self.conv_kxk.conv.dilation

    @property
    def groups(self) -> int:
        return int(self.conv_kxk.conv.groups)


@dataclass(frozen=True, eq=False)
class RepVGGBlock(KxkGeometry, Described):
    """Train form of a RepVGG block.

    ``y = act(BN_k(conv_KxK(x)) + BN_1(conv_1x1(x)) + BN_id(x))``, the identity
    branch present only when stride is 1 and ``C_in == C_out``.

    Attributes
    ----------
    conv_kxk : ConvBN
        KxK conv (stride s, padding p, dilation d, groups g) and its BN.
    conv_1x1 : ConvBN
        1x1 conv with the same stride and groups, padding ``p - d*(K//2)``.
    identity : BatchNorm or None
        BN applied to ``x`` itself.
    activation : Activation
        A name (``"relu"``, ``"relu6"`` ...) given here is converted by
        :func:`repnp.blocks.common.as_activation`.

    Notes
    -----
    Deploy (:meth:`reparameterize`; RepVGG eq. (3) and Sec. 3.3): every conv-BN
    is folded, the 1x1 kernel is centred in the KxK one, the identity BN is a
    centre-one kernel with its BN folded in, and kernels and biases add up:

    .. math:: W = W_K' + \\mathrm{pad}_K(W_1') + W_{id}', \\qquad b = b_K' + b_1' + b_{id}'
    """

    conv_kxk: ConvBN
    conv_1x1: ConvBN
    identity: BatchNorm | None = None
    activation: Activation = RELU

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", as_activation(self.activation))
        k = self.conv_kxk.conv
        check_square_kernel(k.weight, name="conv_kxk.conv.weight")
        check_1x1_aligned(k, self.conv_1x1.conv, name="conv_1x1")
        if self.identity is not None:
            check_skip_geometry(k, name="identity")
            if self.identity.channels != self.out_channels:
                raise ShapeError(f"identity BN has {self.identity.channels} channels, block has "
                                 f"{self.out_channels}")

    # -- configuration (the rest is KxkGeometry's) ------------------------------------------
    @property
    def branches(self) -> tuple:
        """The summed branches, in the order they are computed and traced."""
        return (self.conv_kxk, self.conv_1x1) + ((self.identity,) if self.identity is not None else ())

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 3,
               stride: int = 1, padding: int | None = None, dilation: int = 1, groups: int = 1,
               use_identity: bool | None = None, activation: Activation | str = "relu", dtype=np.float64,
               eps: float = 1e-5) -> "RepVGGBlock":
        """A block with conv weights N(0, 1/fan_in) and random BN statistics.

        ``padding`` defaults to ``dilation * (kernel_size // 2)``; ``use_identity``
        defaults to "when possible" (stride 1 and ``in_channels == out_channels``);
        ``True`` where it is impossible raises ``ValueError``.
        """
        activation = as_activation(activation)
        k = check_odd_kernel(kernel_size)
        check_groups(in_channels, out_channels, groups)
        p = same_padding(k, dilation, padding)
        use_identity = resolve_skip(use_identity, name="use_identity", in_channels=in_channels,
                                    out_channels=out_channels, stride=stride, padding=p, kernel_size=k,
                                    dilation=dilation)
        rng = np.random.default_rng(seed)
        conv_kxk = ConvBN.random(rng, in_channels, out_channels, k, stride=stride, padding=p,
                                 dilation=dilation, groups=groups, eps=eps, dtype=dtype)
        conv_1x1 = ConvBN.random(rng, in_channels, out_channels, 1, stride=stride,
                                 padding=p - dilation * (k // 2), groups=groups, eps=eps, dtype=dtype)
        identity = random_bn(rng, out_channels, eps=eps, dtype=dtype) if use_identity else None
        return cls(conv_kxk, conv_1x1, identity, activation)

    # -- the one description of the train form ---------------------------------------------
    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``act(BN_k(conv_KxK(x)) + BN_1(conv_1x1(x)) [+ BN_id(x)])``, branches summed in order."""
        y = d.add(self.conv_kxk.describe(d, x, f"{prefix}conv_kxk."),
                  self.conv_1x1.describe(d, x, f"{prefix}conv_1x1."), prefix)
        if self.identity is not None:
            y = d.add(y, self.identity.describe(d, x, f"{prefix}identity."), prefix)
        return self.activation.describe(d, y, prefix)

    # -- the algebra -----------------------------------------------------------------------
    def reparameterize(self) -> ConvAct:
        """One KxK conv with bias, then the activation (RepVGG Sec. 3.3, eq. (3)).

        1. fold each BN into the conv before it: ``W' = W t``, ``b' = beta - mean t``,
           ``t = gamma / sqrt(var + eps)``;
        2. the 1x1 kernel is a KxK kernel zero but at its centre tap (its padding,
           ``p - d (K//2)``, puts its one tap on the KxK centre);
        3. the identity is a 1x1 kernel with a one at ``[i, i % (C/g)]``; its BN folds into
           it like any other, and it is centred in KxK like the 1x1 branch;
        4. the three convs read the same input with the same geometry: add kernels and biases.
        """
        k = self.kernel_size
        conv, bn = self.conv_kxk.conv, self.conv_kxk.bn
        kxk = fusion.fuse_bn(conv.weight, conv.bias, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
        conv, bn = self.conv_1x1.conv, self.conv_1x1.bn
        one = fusion.fuse_bn(conv.weight, conv.bias, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
        one = fusion.KernelBias(fusion.pad_kernel(one.kernel, k), one.bias)
        branches = [kxk, one]
        if self.identity is not None:
            bn = self.identity
            eye = fusion.identity_kernel(self.out_channels, groups=self.groups, dtype=kxk.kernel.dtype)
            eye = fusion.fuse_bn(eye, None, bn.mean, bn.var, bn.gamma, bn.beta, eps=bn.eps)
            branches.append(fusion.KernelBias(fusion.pad_kernel(eye.kernel, k), eye.bias))
        kernel, bias = fusion.add_branches(*branches)
        c = self.conv_kxk.conv
        conv = Conv2d(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
        return ConvAct(conv, self.activation)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int | None = None,
                    eps: float = 1e-5, activation: Activation | str = "relu") -> "RepVGGBlock":
        """The inverse of :meth:`params`: ``conv_kxk.*``, ``conv_1x1.*`` and, if present, ``identity.*``.

        Parameters
        ----------
        params : mapping of str to ndarray
            Exactly the keys :meth:`params` returns (BN ``mean, var, gamma, beta``).
        stride, dilation : keyword-only
            Of the KxK conv (the 1x1 shares them).
        padding : keyword-only
            Of the KxK conv; ``None`` is the centred ``dilation * (K//2)``; the 1x1 gets
            ``padding - dilation * (K//2)``.
        groups : int, keyword-only
            ``None``: ``O / (C/groups)`` when there is an identity branch (it needs
            ``C_in == C_out``), else 1. Branches add element-wise whatever the grouping,
            so the fused kernel does not depend on it.
        eps, activation : keyword-only
            Not in the arrays.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        expected = fp.conv_bn_keys(params, "conv_kxk.") + fp.conv_bn_keys(params, "conv_1x1.")
        has_identity = fp.has(params, "identity.")
        if has_identity:
            expected += fp.bn_keys("identity.")
        fp.check_keys(params, expected, what="RepVGGBlock")
        kxk = fp.array(params, "conv_kxk.conv.weight", ndim=4)
        one = fp.array(params, "conv_1x1.conv.weight", ndim=4)
        o, i, k = kxk.shape[0], kxk.shape[1], kxk.shape[2]
        if one.shape != (o, i, 1, 1):
            raise ShapeError(f"conv_1x1.conv.weight has shape {one.shape}, but conv_kxk.conv.weight has "
                             f"{kxk.shape}: the 1x1 branch must be {(o, i, 1, 1)} to sit at the KxK centre")
        identity = fp.bn_from(params, "identity.", eps=eps) if has_identity else None
        if groups is None:
            groups = fp.groups_from_identity(identity, kxk.shape, name="identity", key="conv_kxk.conv.weight")
        p = fp.centred_padding((k, k), padding, dilation)
        geometry = dict(stride=stride, dilation=dilation, groups=groups, eps=eps)
        conv_kxk = fp.conv_bn_from(params, "conv_kxk.", padding=p, **geometry)
        centre = pair(dilation, name="dilation")[0] * (k // 2)
        one_padding = p - centre if isinstance(p, int) else tuple(v - centre for v in pair(p))
        conv_1x1 = fp.conv_bn_from(params, "conv_1x1.", padding=one_padding, **geometry)
        return cls(conv_kxk, conv_1x1, identity, activation)
