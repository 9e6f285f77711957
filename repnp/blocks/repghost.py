"""RepGhost (Chen et al., arXiv 2211.06088): the re-parameterizable part of the ghost module.

As timm has it (``timm/models/repghost.py``, read at commit 03fa149), ``RepGhostModule`` is
``relu(cheap_operation(x1) + fusion_bn(x1))`` with ``x1 = primary_conv(x)``: the "cheap
operation" a depthwise KxK conv-BN, the fusion branch a BN on the identity (``fusion_conv``
an ``nn.Identity``), summed, not concatenated as in GhostNet. ``switch_to_deploy()`` fuses the
two into one depthwise KxK conv with bias written as ``cheap_operation`` and deletes
``fusion_bn``; the primary 1x1 conv-BN, the bottleneck's depthwise conv, SE and shortcut are
left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion
from repnp.blocks.base import BatchNorm, Conv2d, ConvBN, random_bn
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["RepGhostCheap"]


@dataclass(frozen=True, eq=False)
class RepGhostCheap(Described):
    """Train form of RepGhost's cheap operation: ``cheap(x) + fusion_bn(x)``.

    Attributes
    ----------
    cheap : ConvBN
        Depthwise (C, 1, K, K) conv-BN, K odd, padding ``K//2``, stride 1.
    fusion_bn : BatchNorm
        The BN on the identity branch (C channels).

    Notes
    -----
    timm ``RepGhostModule.get_equivalent_kernel_bias``: the conv-BN folded (rule 1), the BN
    as a depthwise identity kernel folded the same way and padded to KxK at the centre
    (rule 4), summed (rule 2):

    .. math:: W = t_c W_c + \\mathrm{pad}_K(t_f I), \\qquad b = (\\beta_c - \\mu_c t_c) + (\\beta_f - \\mu_f t_f)

    The ReLU after the sum (``relu=True`` in the first ghost module of a bottleneck) does not
    change the fused weights and is not part of this block.
    """

    cheap: ConvBN
    fusion_bn: BatchNorm

    def __post_init__(self) -> None:
        conv = self.cheap.conv
        w = conv.weight
        c = w.shape[0]
        if (w.shape[1] != 1 or conv.groups != c or w.shape[2] % 2 == 0 or w.shape[3] % 2 == 0
                or conv.stride not in (1, (1, 1))):
            raise ShapeError(f"RepGhostCheap: cheap.conv.weight {w.shape} (groups {conv.groups}, stride "
                             f"{conv.stride}) must be depthwise (C, 1, K, K), K odd, stride 1")
        if self.fusion_bn.channels != c:
            raise ShapeError(f"RepGhostCheap: fusion_bn has {self.fusion_bn.channels} channels, "
                             f"cheap.conv.weight {w.shape} has {c}")

    @property
    def in_channels(self) -> int:
        return int(self.cheap.conv.weight.shape[0])

    out_channels = in_channels

    @classmethod
    def random(cls, seed, channels: int, *, kernel_size: int = 3, eps: float = 1e-5,
               dtype=np.float64) -> "RepGhostCheap":
        """Weights N(0, 1/fan_in), random BN statistics."""
        rng = np.random.default_rng(seed)
        k = kernel_size
        cheap = ConvBN.random(rng, channels, channels, k, padding=k // 2, groups=channels, eps=eps, dtype=dtype)
        return cls(cheap, random_bn(rng, channels, eps=eps, dtype=dtype))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        return d.sum([lambda: self.cheap.describe(d, x, f"{prefix}cheap."),
                      lambda: self.fusion_bn.describe(d, x, f"{prefix}fusion_bn.")], prefix)

    def reparameterize(self) -> Conv2d:
        """One depthwise KxK conv with bias (timm's deploy ``cheap_operation``)."""
        kernel = self.cheap.conv.weight
        c, size = kernel.shape[0], kernel.shape[2:]
        total = fusion.add_branches(self.cheap.fused(), self.fusion_bn.as_identity_conv(groups=c),
                                    kernel_size=size)
        return Conv2d(total[0], total[1], padding=(size[0] // 2, size[1] // 2), groups=c)

    @classmethod
    def from_params(cls, params, *, eps: float = 1e-5) -> "RepGhostCheap":
        """The inverse of :meth:`params`: ``cheap.conv.weight``, ``cheap.bn.*`` and ``fusion_bn.*``.

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            A kernel that is not depthwise KxK, or a BN of another width (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.conv_bn_keys(params, "cheap.") + fp.bn_keys("fusion_bn."), what="RepGhostCheap")
        w = fp.array(params, "cheap.conv.weight", ndim=4)
        if w.shape[1] != 1:
            raise ShapeError(f"'cheap.conv.weight' has shape {w.shape}: RepGhost's cheap operation is "
                             f"depthwise (C, 1, K, K)")
        cheap = fp.conv_bn_from(params, "cheap.", groups=w.shape[0], eps=eps)
        return cls(cheap, fp.bn_from(params, "fusion_bn.", eps=eps))
