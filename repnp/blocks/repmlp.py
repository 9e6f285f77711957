"""RepMLP's essence: a shared-set FC on a fixed (C, H, W) map plus conv-BN local perception, deployed as one FC.

In RepMLP the channel-perception FC would have ``(CHW)^2`` parameters, so
channels share ``S`` sets of weights and no information flows between channels:
the input (N, C, H, W) is viewed as (N*C/S, S, H, W) and set ``s`` applies its
own (HW x HW) matrix to the HW pixels of its channel. Frameworks express this as
a grouped 1x1 conv on (N*C/S, S*H*W, 1, 1) with ``groups = S``, followed by a BN
over the S sets. Local perception adds depthwise (groups = S) KxK conv-BN
branches on the same (N*C/S, S, H, W) view, padding K//2. Re-parameterization
(rule 8 of :mod:`repnp.fusion`; official ``repmlpnet.py``,
``RepMLPBlock.get_equivalent_fc3`` and ``local_inject``): fold every BN into its
conv / FC (rule 1), turn each conv into the FC matrix it equals on the fixed
H x W map (``fusion.conv_to_fc``) and add it to the FC. Paper: Ding et al., *RepMLP:
Re-parameterizing Convolutions into Fully-connected Layers for Image
Recognition*, 2021, arXiv 2105.01883 (RepMLPNet, CVPR 2022).

Left out, on purpose: the official block also partitions H x W into h x w
patches and has a global perceptron (average pool + two 1x1 convs + sigmoid)
that scales the input; neither takes part in the re-parameterization (the
ONNX example ``off_repmlp_block_c12_h6w7`` keeps them in its deploy graph), so
they are a converter concern. Here the partition is the whole map. A fact a
porter of the full official block needs (checked against PyTorch's output in
``tests/test_blocks_repmlp.py``): its forward partitions with
``reshape(-1, C, h_parts, h, w_parts, w).permute(0, 2, 4, 1, 3, 5)`` but undoes it
with ``reshape(-1, h_parts, w_parts, S, h, w).permute(0, 3, 1, 4, 2, 5)``; when
``C / S > 1`` the second reshape reads the rows (partition, channel chunk) as
(channel chunk, partition), so the output swaps those two indices. It is a
fixed permutation the trained network has learnt around, not something a
re-parameterization may change.

Parameter names and the official state dict (github.com/DingXiaoH/RepMLP,
``repmlpnet.RepMLPBlock``, read at commit 2c38953; the example
``off_repmlp_block_c12_h6w7`` was made at 3eff13f): ``fc.weight`` (S*H*W, H*W) =
``fc3.weight[:, :, 0, 0]``; ``fc_bn.*`` = ``fc3_bn.*``; ``repconv{K}.conv.weight``
(S, 1, K, K) and ``repconv{K}.bn.*`` = ``repconv{K}.conv.weight``, ``repconv{K}.bn.*``
(BN ``mean, var, gamma, beta`` = ``running_mean, running_var, weight, bias``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion, ops
from repnp.blocks.base import BatchNorm, ConvBN, random_bn
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError
from repnp.ops import pair

__all__ = ["RepMLPBlock", "SharedFC"]


def _check_input(x: np.ndarray, channels: int, height: int, width: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1:] != (channels, height, width):
        raise ShapeError(f"x must be (N, {channels}, {height}, {width}) (a fixed-size map), got {x.shape}")
    return x


def _describe_fc(d: Dataflow, x: str, weight: str, bias: str | None, prefix: str, *, sets: int,
                 hw: int) -> str:
    """The S shared FCs as frameworks run them: a grouped 1x1 conv (groups S) on the
    (N*C/S, S*H*W, 1, 1) view, its (S*H*W, H*W) weight seen as (S*H*W, H*W, 1, 1)."""
    kernel = d.node("Reshape", [weight], prefix, shape=[sets * hw, hw, 1, 1])
    flat = d.node("Reshape", [x], prefix, shape=[-1, sets * hw, 1, 1])
    return d.conv(flat, kernel, bias, prefix, kernel_shape=(1, 1), groups=sets)


@dataclass(frozen=True, eq=False)
class SharedFC(Described):
    """Deploy form: the S shared-set FC layers with bias, no conv left.

    ``y[n, c] = W_{s(c)} x[n, c] + b_{s(c)}`` on the flattened H*W pixels of
    channel ``c``, with ``s(c) = c % S`` (the set of channel ``c`` in the
    (N*C/S, S, H, W) view).

    Attributes
    ----------
    weight : ndarray, shape (S*H*W, H*W)
        Rows ``s*HW ... (s+1)*HW - 1`` are set ``s``'s matrix.
    bias : ndarray, shape (S*H*W,)
    channels, height, width : int
    """

    weight: np.ndarray
    bias: np.ndarray
    channels: int
    height: int
    width: int

    @property
    def sets(self) -> int:
        return int(self.weight.shape[0] // (self.height * self.width))

    def check_input(self, x):
        return (_check_input(x, self.channels, self.height, self.width),)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        weight, bias = d.param(f"{prefix}weight", self.weight), d.param(f"{prefix}bias", self.bias)
        y = _describe_fc(d, x, weight, bias, prefix, sets=self.sets, hw=self.height * self.width)
        return d.node("Reshape", [y], prefix, shape=[-1, self.channels, self.height, self.width])

    @classmethod
    def from_params(cls, params, *, channels: int, height: int, width: int) -> "SharedFC":
        """The inverse of :meth:`params`: ``weight`` (S*H*W, H*W), ``bias`` (S*H*W,); the input size
        (C, H, W) is not in the arrays (keywords)."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, ["weight", "bias"], what="SharedFC")
        weight, bias = fp.array(params, "weight", ndim=2), fp.array(params, "bias", ndim=1)
        if bias.shape != weight.shape[:1]:
            raise ShapeError(f"'bias' has shape {bias.shape}, 'weight' {weight.shape} needs ({weight.shape[0]},)")
        return cls(weight, bias, int(channels), int(height), int(width))


@dataclass(frozen=True, eq=False)
class RepMLPBlock(Described):
    """Train form: ``BN_S(FC(x)) + sum_K BN_S(dwconv_K(x))`` on the (N*C/S, S, H, W) view.

    Attributes
    ----------
    fc_weight : ndarray, shape (S*H*W, H*W)
        The S shared FC matrices, stacked (no bias: a BN follows).
    fc_bn : BatchNorm
        Over the S sets, applied on the (N*C/S, S, H, W) view of the FC output.
    local : tuple of ConvBN
        Depthwise (groups = S) KxK conv-BN on S channels, stride 1, padding K//2, K odd.
    channels, height, width : int
        The fixed input size (C, H, W); S must divide C.

    Notes
    -----
    Deploy (:meth:`reparameterize`), per set ``s``: with ``t, c`` the scale and
    shift of ``fc_bn`` (rule 1) and ``M_K`` the FC matrix of the fused conv of
    branch K on one H x W channel (rule 8, ``fusion.conv_to_fc``),

    .. math:: W_s = t_s W^{fc}_s + \\sum_K M_{K,s}, \\qquad
        b_s = (c_s + \\sum_K b_{K,s})\\, \\mathbf{1}_{HW}
    """

    fc_weight: np.ndarray
    fc_bn: BatchNorm
    local: tuple
    channels: int
    height: int
    width: int

    def __post_init__(self) -> None:
        hw = self.height * self.width
        s = self.fc_bn.channels
        if min(self.channels, self.height, self.width, s) < 1 or self.channels % s:
            raise ShapeError(f"share sets S = {s} (fc_bn channels) must divide channels = {self.channels}")
        if self.fc_weight.shape != (s * hw, hw):
            raise ShapeError(f"fc_weight must have shape (S*H*W, H*W) = {(s * hw, hw)}, got {self.fc_weight.shape}")
        seen = set()
        for n, branch in enumerate(self.local):
            w = branch.conv.weight
            k = w.shape[2]
            if w.shape != (s, 1, k, k) or k % 2 == 0 or branch.conv.groups != s:
                raise ShapeError(
                    f"local[{n}] must be a depthwise (groups={s}) KxK conv with K odd, weight (S, 1, K, K); "
                    f"got weight {w.shape}, groups={branch.conv.groups}"
                )
            if (branch.conv.stride not in (1, (1, 1)) or branch.conv.dilation not in (1, (1, 1))
                    or ops.normalize_padding(branch.conv.padding) != (k // 2,) * 4):
                raise ShapeError(f"local[{n}] must have stride 1, dilation 1 and padding K//2 = {k // 2}")
            if k in seen:
                raise ValueError(f"two local branches with K = {k}: their names repconv{k} would clash")
            seen.add(k)

    @property
    def sets(self) -> int:
        return self.fc_bn.channels

    @property
    def in_channels(self) -> int:
        """C of the fixed (C, H, W) input (the block keeps it: ``out_channels`` too)."""
        return int(self.channels)

    @property
    def out_channels(self) -> int:
        return int(self.channels)

    @property
    def kernels(self) -> tuple[int, ...]:
        return tuple(int(b.conv.weight.shape[2]) for b in self.local)

    @classmethod
    def random(cls, seed, channels: int, height: int, width: int, *, kernels=(1, 3, 5),
               share_sets: int | None = None, eps: float = 1e-5, dtype=np.float64) -> "RepMLPBlock":
        """A block with N(0, 1/fan_in) FC and conv weights and random BN statistics.

        ``share_sets`` (S) defaults to ``channels`` (one FC per channel).
        """
        rng = np.random.default_rng(seed)
        s = int(channels if share_sets is None else share_sets)
        if s < 1 or channels % s:
            raise ShapeError(f"share_sets={s} must divide channels={channels}")
        for k in kernels:
            if int(k) < 1 or int(k) % 2 == 0:
                raise ValueError(f"local kernels must be odd (padding K//2 keeps H x W), got {tuple(kernels)}")
        hw = height * width
        fc_weight = (rng.standard_normal((s * hw, hw)) / np.sqrt(hw)).astype(dtype)
        fc_bn = random_bn(rng, s, eps=eps, dtype=dtype)
        local = tuple(ConvBN.random(rng, s, s, int(k), padding=int(k) // 2, groups=s, eps=eps, dtype=dtype)
                      for k in kernels)
        return cls(fc_weight, fc_bn, local, int(channels), int(height), int(width))

    def check_input(self, x):
        return (_check_input(x, self.channels, self.height, self.width),)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``BN_S(FC(x)) + sum_K BN_S(dwconv_K(x))`` on the (N*C/S, S, H, W) view, back to (N, C, H, W)."""
        s, h, w = self.sets, self.height, self.width
        view = [-1, s, h, w]
        weight = d.param(f"{prefix}fc.weight", self.fc_weight)
        y = d.node("Reshape", [_describe_fc(d, x, weight, None, f"{prefix}fc.", sets=s, hw=h * w)], prefix,
                   shape=view)
        y = self.fc_bn.describe(d, y, f"{prefix}fc_bn.")
        if self.local:
            v = d.node("Reshape", [x], prefix, shape=view)
            for branch in self.local:
                y = d.add(y, branch.describe(d, v, f"{prefix}repconv{branch.conv.weight.shape[2]}."), prefix)
        return d.node("Reshape", [y], prefix, shape=[-1, self.channels, h, w])

    def reparameterize(self) -> SharedFC:
        s, h, w = self.sets, self.height, self.width
        hw = h * w
        scale, shift = self.fc_bn.scale_shift()
        weight = self.fc_weight.astype(np.float64).reshape(s, hw, hw) * scale[:, None, None]
        bias = np.repeat(shift, hw).reshape(s, hw)
        for branch in self.local:
            kernel, b = branch.fused()
            k = kernel.shape[2]
            for j in range(s):
                # One set at a time: a depthwise conv's FC is block diagonal, and
                # the (HW x HW) block of set j is the conv of channel j alone.
                m, mb = fusion.conv_to_fc(kernel[j:j + 1].astype(np.float64), b[j:j + 1],
                                          input_shape=(1, h, w), padding=k // 2)
                weight[j] += m
                bias[j] += mb
        dtype = self.fc_weight.dtype
        return SharedFC(weight.reshape(s * hw, hw).astype(dtype), bias.reshape(-1).astype(dtype),
                        self.channels, h, w)

    @classmethod
    def from_params(cls, params, *, partition=None, channels: int | None = None,
                    eps: float = 1e-5) -> "RepMLPBlock":
        """The inverse of :meth:`params`: ``fc.weight`` (S*h*w, h*w), ``fc_bn.*`` (S) and
        ``repconv<K>.*`` (depthwise (S, 1, K, K) conv-BNs).

        Parameters
        ----------
        params : mapping of str to ndarray
        partition : (h, w), keyword-only
            The arrays only tell ``h*w``. Needed when a local branch is larger than
            1x1; with 1x1 branches only (a diagonal FC for any ``(h, w)``) it defaults
            to ``(h*w, 1)``.
        channels : int, keyword-only
            ``C`` of the (C, h, w) input, a multiple of S (default S); the arrays do
            not depend on it.
        eps : float, keyword-only

        Raises
        ------
        repnp.blocks.fromparams.NeedsOption
            Local branches larger than 1x1 and no ``partition`` (a ``ValueError``).
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            ``partition`` or shapes that do not fit (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        kernels = sorted({int(k[len("repconv"):].split(".", 1)[0]) for k in params
                          if k.startswith("repconv") and k[len("repconv"):].split(".", 1)[0].isdigit()})
        expected = ["fc.weight"] + fp.bn_keys("fc_bn.")
        expected += sum((fp.conv_bn_keys(params, f"repconv{k}.") for k in kernels), [])
        fp.check_keys(params, expected, what="RepMLPBlock")
        fc = fp.array(params, "fc.weight", ndim=2)
        fc_bn = fp.bn_from(params, "fc_bn.", eps=eps)
        s, hw = fc_bn.channels, fc.shape[1]
        if fc.shape != (s * hw, hw):
            raise ShapeError(f"fc.weight has shape {fc.shape}, the S = {s} shared FCs ('fc_bn.mean' shape ({s},)) "
                             f"need (S*h*w, h*w) = {(s * hw, hw)}")
        if partition is None:
            if any(k != 1 for k in kernels):
                raise fp.NeedsOption(f"local branches {['repconv%d' % k for k in kernels]} are larger than 1x1: "
                                     f"pass partition=(h, w); the weights only tell h*w = {hw}")
            partition = (hw, 1)
        h, w = pair(partition, name="partition", minimum=1)
        if h * w != hw:
            raise ShapeError(f"partition {(h, w)} has h*w = {h * w}, but 'fc.weight' {fc.shape} needs {hw}")
        local = tuple(fp.conv_bn_from(params, f"repconv{k}.", padding=k // 2, groups=s, eps=eps) for k in kernels)
        return cls(fc, fc_bn, local, s if channels is None else int(channels), h, w)
