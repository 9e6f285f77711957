"""ResRep: channel pruning by a 1x1 compactor trained with gradient resetting, then merged away.

In ResRep, after a KxK conv-BN a 1x1 "compactor" ``Q`` initialised to the
identity is inserted (so the output does not change). During training the
gradient of ``Q`` is *reset*: rows chosen for removal get no gradient from the
loss (mask ``m = 0``) and all rows get a group-lasso penalty, which drives the
masked rows to zero; these rows are then removed, the compactor is merged into
the conv (a KxK followed by a 1x1 is one KxK conv) and the next layer loses the
matching input channels. Paper: Ding et al., *ResRep: Lossless CNN Pruning via
Decoupling Remembering and Forgetting*, ICCV 2021 (arXiv 2007.03260).

Facts read from the official code (github.com/DingXiaoH/ResRep, commit d1246ed):

* ``rr/resrep_train.py``: the reset gradient is ``mask * grad + lasso_strength *
  Q / ||Q_r||`` with the norm over each row (output channel) of the compactor;
  the conversion threshold ``CONVERSION_EPSILON = 1e-5``;
* ``rr/compactor.py``: the compactor is a bias-free 1x1 conv initialised to the
  identity; its metric for selection is the row norm;
* ``rr/resrep_convert.py``: rows with norm below the threshold are removed (at
  least one row is kept); *but* BN is fused with ``eps=1e-5`` hard-coded, and a
  following Linear layer is cut at indices ``base + i`` with ``base = arange(0,
  per_channel * C, C)`` — channel-last order, whereas an NCHW tensor flattens
  channel-first (channel ``i`` owns features ``i*H*W ... (i+1)*H*W - 1``).
  Neither is repeated here: each BN keeps its own ``eps``, and
  :meth:`ResRepNet.reparameterize` cuts the Linear channel-first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from repnp import fusion, ops
from repnp.blocks.base import Conv2d, ConvBN
from repnp.blocks.common import RELU, Activation, as_activation
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = [
    "CONVERSION_THRESHOLD",
    "compactor_gradient",
    "compactor_mask",
    "row_norms",
    "select_channels",
    "train_compactor",
    "CompactorTraining",
    "CompactorConv",
    "Linear",
    "ResRepNet",
    "ResRepNetDeploy",
]

#: The official conversion threshold on a compactor row's norm (``CONVERSION_EPSILON``).
CONVERSION_THRESHOLD = 1e-5

#: Activations allowed between the compactor and the next layer: a removed
#: channel must stay 0 through it (``act(0) == 0``), and the error bound needs
#: ``|act(a) - act(0)| <= |a|`` (1-Lipschitz).
PRUNABLE_ACTIVATIONS = frozenset({"identity", "relu", "relu6"})


# ----------------------------------------------------------------------------
# the compactor as a matrix
# ----------------------------------------------------------------------------

def _as_matrix(q, name: str = "q") -> np.ndarray:
    """A compactor as a (D, C) matrix; accepts (D, C) or a 1x1 kernel (D, C, 1, 1)."""
    q = np.asarray(q)
    if q.ndim == 4 and q.shape[2:] == (1, 1):
        return q[:, :, 0, 0]
    if q.ndim != 2:
        raise ShapeError(f"{name} must be a (D, C) matrix or a (D, C, 1, 1) kernel, got shape {q.shape}")
    return q


def row_norms(q) -> np.ndarray:
    """``||Q_r||_2`` for every row r (output channel) of a compactor, float64."""
    q = _as_matrix(q).astype(np.float64)
    return np.sqrt(np.sum(q * q, axis=1))


def compactor_gradient(grad, q, mask, *, lam: float, penalty: str = "group_lasso") -> np.ndarray:
    """ResRep's reset gradient of a compactor.

    Parameters
    ----------
    grad : ndarray, shape (D, C) or (D, C, 1, 1)
        ``dL/dQ``, the gradient of the task loss.
    q : ndarray, same shape
        The compactor.
    mask : ndarray, shape (D,)
        1 for rows that keep learning from the loss, 0 for rows to remove.
    lam : float, keyword-only
        The penalty strength (the official ``lasso_strength``), >= 0.
    penalty : {"group_lasso", "l2"}, keyword-only
        ``"group_lasso"`` is ResRep's; ``"l2"`` (plain weight decay ``lam * Q``)
        is there to show the difference.

    Returns
    -------
    ndarray, shape and dtype of ``grad``

    Notes
    -----
    ResRep's gradient resetting (Ding et al., ICCV 2021; official ``rr/compactor.py``,
    ``CompactorLayer.set_mask`` and ``get_lasso_vector``), row by row:

    .. math:: G_r = m_r \\frac{\\partial L}{\\partial Q_r} + \\lambda \\frac{Q_r}{\\lVert Q_r \\rVert}

    For a masked row (``m_r = 0``) an SGD step with rate ``eta`` shortens
    ``Q_r`` by exactly ``eta * lam`` along its own direction: the row reaches
    zero (to within one step) in finitely many steps. With ``lam * Q_r`` it
    would only be multiplied by ``1 - eta * lam`` per step (geometric decay,
    never zero). A zero row has no direction: its penalty term is 0 (the
    subgradient of the norm at 0 that is 0), where the official code would
    divide by zero.
    """
    grad = np.asarray(grad)
    q = np.asarray(q)
    if grad.shape != q.shape:
        raise ShapeError(f"grad {grad.shape} and q {q.shape} must have one shape")
    qm = _as_matrix(q).astype(np.float64)
    gm = _as_matrix(grad, "grad").astype(np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != (qm.shape[0],):
        raise ShapeError(f"mask must have shape ({qm.shape[0]},) (one value per row of q {q.shape}), got {mask.shape}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if penalty == "group_lasso":
        norms = row_norms(qm)
        safe = np.where(norms > 0, norms, 1.0)
        reg = np.where(norms[:, None] > 0, qm / safe[:, None], 0.0)
    elif penalty == "l2":
        reg = qm
    else:
        raise ValueError(f"penalty must be 'group_lasso' or 'l2', got {penalty!r}")
    out = mask[:, None] * gm + lam * reg
    return out.reshape(grad.shape).astype(grad.dtype if np.issubdtype(grad.dtype, np.floating) else np.float64)


def compactor_mask(q, num_remove: int) -> np.ndarray:
    """The mask that stops the ``num_remove`` rows of smallest norm from learning (0), others 1.

    ResRep picks the rows to remove by the same metric as the final
    selection, the row norm (``rr/resrep_util.py``, ``resrep_mask_model``);
    ties are broken by row index.
    """
    norms = row_norms(q)
    num_remove = int(num_remove)
    if not 0 <= num_remove < norms.size:
        raise ValueError(f"num_remove must be in [0, {norms.size}) (at least one row stays), got {num_remove}")
    mask = np.ones(norms.size)
    mask[np.argsort(norms, kind="stable")[:num_remove]] = 0.0
    return mask


def select_channels(q, *, threshold: float = CONVERSION_THRESHOLD) -> np.ndarray:
    """Indices (ascending) of the compactor rows kept: norm >= ``threshold``.

    As the official converter, at least one row is kept: if every norm is
    below the threshold, the row of largest norm stays.
    """
    norms = row_norms(q)
    kept = np.flatnonzero(norms >= threshold)
    if kept.size == 0:
        kept = np.array([int(np.argmax(norms))])
    return kept


class CompactorTraining(NamedTuple):
    """Result of :func:`train_compactor`.

    Attributes
    ----------
    q : ndarray (D, C)
        The trained compactor.
    row_norms : ndarray (steps + 1, D)
        ``||Q_r||`` before the first step and after every step.
    losses : ndarray (steps + 1,)
        The least-squares loss at the same moments.
    learning_rates : ndarray (steps,)
    """

    q: np.ndarray
    row_norms: np.ndarray
    losses: np.ndarray
    learning_rates: np.ndarray


def _schedule(lr: float, steps: int, schedule: str) -> np.ndarray:
    t = np.arange(steps)
    if schedule == "constant":
        return np.full(steps, float(lr))
    if schedule == "cosine":
        return float(lr) * 0.5 * (1.0 + np.cos(np.pi * t / steps))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def train_compactor(q, features, target, mask, *, lam: float, lr: float, steps: int,
                    penalty: str = "group_lasso", schedule: str = "constant") -> CompactorTraining:
    """Plain SGD on a compactor with ResRep's reset gradient and a least-squares loss.

    Parameters
    ----------
    q : ndarray, (D, C) or (D, C, 1, 1)
        The starting compactor (ResRep: the identity).
    features : ndarray, shape (N, C, H, W)
        What the compactor reads (the conv-BN output).
    target : ndarray, shape (N, D, H, W)
        The least-squares target of the compactor output.
    mask : ndarray, shape (D,)
        See :func:`compactor_gradient`.
    lam, penalty : keyword-only
        See :func:`compactor_gradient`.
    lr : float, keyword-only
        Learning rate (the peak one for ``schedule="cosine"``).
    steps : int, keyword-only
    schedule : {"constant", "cosine"}, keyword-only
        ``"cosine"``: ``lr_t = lr * (1 + cos(pi t / steps)) / 2`` (ResRep
        trains with a cosine decay).

    Returns
    -------
    CompactorTraining

    Notes
    -----
    Loss over the ``P = N*H*W`` pixels, ``Z`` (C, P) and ``Y`` (D, P) the
    features and target as matrices:

    .. math:: L(Q) = \\frac{1}{2P} \\lVert Q Z - Y \\rVert_F^2, \\qquad
        \\frac{\\partial L}{\\partial Q} = \\frac{1}{P} (Q Z - Y) Z^T

    and ``Q <- Q - lr_t * compactor_gradient(dL/dQ, Q, mask)``. A masked row
    moves by ``lr_t * lam`` towards 0 per step; once shorter than that it
    overshoots and stays within ``lr_t * lam`` of 0, so with a decaying rate it
    ends below any threshold above ``lam`` times the last rates.
    """
    q0 = _as_matrix(q).astype(np.float64)
    features = np.asarray(features, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    d, c = q0.shape
    if features.ndim != 4 or features.shape[1] != c:
        raise ShapeError(f"features must be (N, {c}, H, W) for q of shape {q0.shape}, got {features.shape}")
    expected = (features.shape[0], d) + features.shape[2:]
    if target.shape != expected:
        raise ShapeError(f"target must have shape {expected}, got {target.shape}")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rates = _schedule(lr, steps, schedule)
    z = features.transpose(1, 0, 2, 3).reshape(c, -1)
    y = target.transpose(1, 0, 2, 3).reshape(d, -1)
    p = z.shape[1]
    zzt, yzt = z @ z.T / p, y @ z.T / p      # the gradient only needs these two products

    def loss(qm: np.ndarray) -> float:
        r = qm @ z - y
        return float(np.sum(r * r) / (2 * p))

    qm = q0.copy()
    norms, losses = [row_norms(qm)], [loss(qm)]
    for rate in rates:
        grad = qm @ zzt - yzt
        qm = qm - rate * compactor_gradient(grad, qm, mask, lam=lam, penalty=penalty)
        norms.append(row_norms(qm))
        losses.append(loss(qm))
    return CompactorTraining(qm, np.array(norms), np.array(losses), rates)


# ----------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Linear(Described):
    """A fully connected layer ``y = x W^T + b`` on (N, in_features) (ONNX ``Gemm``)."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    #: It reads (N, in_features) vectors, not NCHW maps (what ``export_onnx`` and the
    #: ``.npz`` check feed it).
    vector_input = True

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def check_input(self, x):
        return (np.asarray(x),)      # repnp.ops.linear names the shapes that do not fit

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        inputs = [x, d.param(f"{prefix}weight", self.weight)]
        if self.bias is not None:
            inputs.append(d.param(f"{prefix}bias", self.bias))
        return d.node("Gemm", inputs, prefix, transB=1)

    @classmethod
    def from_params(cls, params) -> "Linear":
        """The inverse of :meth:`params`: ``weight`` (out, in) and an optional ``bias`` (out,)."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, ["weight"] + (["bias"] if "bias" in params else []), what="Linear")
        weight = fp.array(params, "weight", ndim=2)
        bias = None if "bias" not in params else fp.array(params, "bias", ndim=1)
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ShapeError(f"'bias' has shape {bias.shape}, 'weight' {weight.shape} needs ({weight.shape[0]},)")
        return cls(weight, bias)


@dataclass(frozen=True, eq=False)
class CompactorConv(Described):
    """Train form: ``Q * BN(conv(x))``, a conv-BN followed by a bias-free 1x1 compactor.

    Attributes
    ----------
    conv_bn : ConvBN
        Any kernel size, stride, padding, dilation, groups.
    compactor : Conv2d
        1x1, kernel (D, C_out, 1, 1), no bias, stride 1, no padding; ResRep
        initialises it to the identity (D = C_out).

    Notes
    -----
    Deploy (:meth:`reparameterize`; ResRep, Ding et al., ICCV 2021; official
    ``rr/resrep_convert.py``, ``fold_conv``): with the BN
    folded, ``BN(W * x) = W' * x + b'`` (rule 1); the compactor restricted to
    the kept rows ``K`` is a 1x1 conv after it, so (rule "KxK then 1x1",
    :func:`repnp.fusion.merge_pointwise`)

    .. math:: W''[d] = \\sum_c Q[d, c]\\, W'[c], \\qquad b''[d] = \\sum_c Q[d, c]\\, b'[c],
        \\qquad d \\in K

    exact against the train form whose removed rows are zero.
    """

    conv_bn: ConvBN
    compactor: Conv2d

    def __post_init__(self) -> None:
        q = self.compactor
        c = self.conv_bn.conv.out_channels
        if (q.weight.ndim != 4 or q.weight.shape[1:] != (c, 1, 1) or q.bias is not None or q.groups != 1
                or q.stride not in (1, (1, 1)) or ops.normalize_padding(q.padding) != (0, 0, 0, 0)):
            raise ShapeError(
                f"compactor must be a dense bias-free 1x1 conv (D, {c}, 1, 1), stride 1, padding 0; "
                f"got weight {q.weight.shape}, bias {'set' if q.bias is not None else None}, "
                f"groups={q.groups}, stride={q.stride!r}, padding={q.padding!r}"
            )

    @property
    def in_channels(self) -> int:
        return int(self.conv_bn.conv.weight.shape[1] * self.conv_bn.conv.groups)

    @property
    def out_channels(self) -> int:
        return int(self.compactor.weight.shape[0])

    @property
    def q(self) -> np.ndarray:
        """The compactor as a (D, C) matrix."""
        return self.compactor.weight[:, :, 0, 0]

    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size=3, stride=1, padding=None,
               dilation=1, groups: int = 1, eps: float = 1e-5, dtype=np.float64) -> "CompactorConv":
        """Random conv-BN (N(0, 1/fan_in), random BN statistics) and an identity compactor.

        ``padding=None`` is ``dilation * (K//2)``.
        """
        rng = np.random.default_rng(seed)
        k = int(kernel_size)
        if padding is None:
            dh, dw = ops.pair(dilation, name="dilation")
            padding = (dh * (k // 2), dw * (k // 2))
        conv_bn = ConvBN.random(rng, in_channels, out_channels, k, stride=stride, padding=padding,
                                dilation=dilation, groups=groups, eps=eps, dtype=dtype)
        eye = np.eye(out_channels, dtype=dtype).reshape(out_channels, out_channels, 1, 1)
        return cls(conv_bn, Conv2d(eye))

    def with_compactor(self, q) -> "CompactorConv":
        """A copy with compactor ``q`` ((D, C) or (D, C, 1, 1)), e.g. after :func:`train_compactor`."""
        qm = _as_matrix(q)
        dtype = self.compactor.weight.dtype
        return dataclasses.replace(self, compactor=Conv2d(qm.astype(dtype)[:, :, None, None]))

    def zero_rows(self, rows) -> "CompactorConv":
        """A copy whose compactor rows ``rows`` are set to zero (the train form the pruned conv equals)."""
        w = self.compactor.weight.copy()
        w[np.asarray(rows, dtype=int)] = 0
        return dataclasses.replace(self, compactor=Conv2d(w))

    def features(self, x: np.ndarray) -> np.ndarray:
        """``BN(conv(x))``: what the compactor reads."""
        return self.conv_bn.forward(x)

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``Q * BN(conv(x))``: the compactor is a bias-free 1x1 conv (ResRep, Sec. 3)."""
        return self.compactor.describe(d, self.conv_bn.describe(d, x, prefix), f"{prefix}compactor.")

    def kept_channels(self, *, threshold: float = CONVERSION_THRESHOLD) -> np.ndarray:
        """Indices of the compactor rows that :meth:`reparameterize` keeps (:func:`select_channels`)."""
        return select_channels(self.q, threshold=threshold)

    def reparameterize(self, *, threshold: float = CONVERSION_THRESHOLD) -> Conv2d:
        """One conv with bias and only the kept rows' outputs.

        Rules 1 and "KxK then 1x1" (``fusion.merge_pointwise``) on the compactor
        restricted to the rows of norm >= ``threshold``. A grouped conv becomes
        dense: the compactor mixes all channels.
        """
        kept = self.kept_channels(threshold=threshold)
        c = self.conv_bn.conv
        kernel, bias = fusion.merge_pointwise(self.conv_bn.fused(), (self.compactor.weight[kept], None),
                                              groups=c.groups)
        return Conv2d(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=1)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int = 1,
                    eps: float = 1e-5) -> "CompactorConv":
        """The inverse of :meth:`params`: ``conv.weight`` [``conv.bias``], ``bn.*`` and
        ``compactor.weight`` (D, C, 1, 1). ``padding=None`` is ``dilation * (K//2)``; the conv's
        geometry is not in the arrays (keywords)."""
        from repnp.blocks import fromparams as fp

        fp.check_keys(params, fp.conv_bn_keys(params, "") + ["compactor.weight"], what="CompactorConv")
        conv_bn = fp.conv_bn_from(params, stride=stride, padding=padding, dilation=dilation, groups=groups, eps=eps)
        return cls(conv_bn, fp.conv_from(params, "compactor.", padding=0))



def _prunable_activation(activation: Activation | str) -> Activation:
    """``activation`` as an :class:`Activation`, checked to be one of :data:`PRUNABLE_ACTIVATIONS`."""
    act = as_activation(activation)
    if act.name not in PRUNABLE_ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(PRUNABLE_ACTIVATIONS)} (a removed channel must stay 0 "
            f"through it: act(0) == 0 and 1-Lipschitz), got {act.name!r}"
        )
    return act


def _init_head(net) -> None:
    """What both ResRep nets' ``__post_init__`` do: a prunable activation and exactly one head."""
    object.__setattr__(net, "activation", _prunable_activation(net.activation))
    if (net.next_conv is None) == (net.linear is None):
        raise ValueError("exactly one of next_conv and linear must be given")


def _describe_head(d: Dataflow, h: str, next_conv, linear, prefix: str) -> str:
    """The layer after the pruned one: a conv, or a Linear on the NCHW map flattened
    channel-first (``Flatten``, as NCHW frameworks flatten)."""
    if next_conv is not None:
        return next_conv.describe(d, h, f"{prefix}next.")
    flat = d.node("Flatten", [h], f"{prefix}linear.", axis=1)
    return linear.describe(d, flat, f"{prefix}linear.")


@dataclass(frozen=True, eq=False)
class ResRepNet(Described):
    """A small network to prune: conv-BN-compactor, activation, then a conv-BN or a Linear.

    Attributes
    ----------
    layer : CompactorConv
    activation : Activation
        ReLU, ReLU6 or identity (:data:`PRUNABLE_ACTIVATIONS`); a name given
        here is converted by :func:`repnp.blocks.common.as_activation`.
    next_conv : ConvBN or None
        Dense (groups = 1) conv-BN reading the D compactor channels.
    linear : Linear or None
        Reads the NCHW activation flattened channel-first, ``D * H' * W'``
        features. Exactly one of ``next_conv`` and ``linear`` is set.
    """

    layer: CompactorConv
    activation: Activation = RELU
    next_conv: ConvBN | None = None
    linear: Linear | None = None

    def __post_init__(self) -> None:
        _init_head(self)
        d = self.layer.out_channels
        if self.next_conv is not None:
            w = self.next_conv.conv.weight
            if self.next_conv.conv.groups != 1 or w.shape[1] != d:
                raise ShapeError(
                    f"next_conv must be dense (groups=1) with {d} input channels, got weight {w.shape}, "
                    f"groups={self.next_conv.conv.groups} (cutting input channels of a grouped conv "
                    f"would break its groups)"
                )
        else:
            if self.linear.weight.ndim != 2 or self.linear.weight.shape[1] % d:
                raise ShapeError(
                    f"linear.weight must be (out, {d} * H * W), got {self.linear.weight.shape}"
                )

    @property
    def in_channels(self) -> int:
        return self.layer.in_channels

    @property
    def channels(self) -> int:
        """Channels between the two layers (the compactor's rows)."""
        return self.layer.out_channels

    @property
    def out_channels(self) -> int:
        """Output channels of the next conv, or output features of the Linear."""
        head = self.next_conv.conv if self.next_conv is not None else self.linear
        return int(head.weight.shape[0])

    @classmethod
    def random(cls, seed, in_channels: int, channels: int, out_channels: int, *, head: str = "conv",
               input_size=None, kernel_size=3, stride=1, groups: int = 1, next_kernel_size=3,
               activation: Activation | str = "relu", eps: float = 1e-5, dtype=np.float64) -> "ResRepNet":
        """Random network: ``in_channels -> channels`` (pruned layer) ``-> out_channels``.

        ``head="conv"``: the next layer is a KxK conv-BN (padding K//2);
        ``head="linear"``: a Linear with ``out_channels`` outputs after flatten,
        which needs ``input_size=(H, W)`` to know its number of input features.
        """
        rng = np.random.default_rng(seed)
        activation = _prunable_activation(activation)
        layer = CompactorConv.random(rng, in_channels, channels, kernel_size=kernel_size, stride=stride,
                                     groups=groups, eps=eps, dtype=dtype)
        if head == "conv":
            k = int(next_kernel_size)
            nxt = ConvBN.random(rng, channels, out_channels, k, padding=k // 2, eps=eps, dtype=dtype)
            return cls(layer, activation, next_conv=nxt)
        if head == "linear":
            if input_size is None:
                raise ValueError("head='linear' needs input_size=(H, W) to size the Linear layer")
            h, w = (int(v) for v in input_size)
            _, _, ho, wo = layer.conv_bn.conv.output_shape((1, in_channels, h, w))
            features = channels * ho * wo
            weight = (rng.standard_normal((out_channels, features)) / np.sqrt(features)).astype(dtype)
            bias = (0.5 * rng.standard_normal(out_channels)).astype(dtype)
            return cls(layer, activation, linear=Linear(weight, bias))
        raise ValueError(f"head must be 'conv' or 'linear', got {head!r}")

    def with_compactor(self, q) -> "ResRepNet":
        """A copy whose layer has compactor ``q`` (see :meth:`CompactorConv.with_compactor`)."""
        return dataclasses.replace(self, layer=self.layer.with_compactor(q))

    def zero_pruned(self, *, threshold: float = CONVERSION_THRESHOLD) -> "ResRepNet":
        """The train form with the rows that :meth:`reparameterize` removes set to zero."""
        kept = self.layer.kept_channels(threshold=threshold)
        removed = np.setdiff1d(np.arange(self.layer.out_channels), kept)
        return dataclasses.replace(self, layer=self.layer.zero_rows(removed))

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        h = self.activation.describe(d, self.layer.describe(d, x, f"{prefix}layer."), f"{prefix}layer.")
        return _describe_head(d, h, self.next_conv, self.linear, prefix)

    def reparameterize(self, *, threshold: float = CONVERSION_THRESHOLD) -> "ResRepNetDeploy":
        """Remove the compactor rows below ``threshold``, merge, and cut the next layer.

        The next conv keeps input channels ``kept`` (its BN is folded too). The
        Linear keeps, for every kept channel ``c``, the features
        ``c*H'*W' ... (c+1)*H'*W' - 1``: channel-first, as NCHW flattens.
        """
        kept = self.layer.kept_channels(threshold=threshold)
        conv = self.layer.reparameterize(threshold=threshold)
        if self.next_conv is not None:
            c = self.next_conv.conv
            kernel, bias = self.next_conv.bn.fold(c.weight[:, kept], c.bias)
            nxt = Conv2d(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation)
            return ResRepNetDeploy(conv, self.activation, next_conv=nxt)
        d = self.layer.out_channels
        per_channel = self.linear.weight.shape[1] // d
        columns = (kept[:, None] * per_channel + np.arange(per_channel)[None, :]).reshape(-1)
        return ResRepNetDeploy(conv, self.activation,
                               linear=Linear(self.linear.weight[:, columns], self.linear.bias))

    def pruning_error_bound(self, x: np.ndarray, *, threshold: float = CONVERSION_THRESHOLD) -> float:
        """An upper bound of ``max|forward(x) - reparameterize().forward(x)|``.

        Notes
        -----
        Let ``z(p)`` be the conv-BN output vector (over channels) at pixel
        ``p``, ``R`` the removed rows. The deploy form equals the train form
        with ``Q_r = 0`` for ``r`` in ``R``, so the two differ only in the
        activations of the removed channels, by
        ``|act(Q_r z(p)) - act(0)| <= |Q_r z(p)| <= ||Q_r|| ||z(p)|| <= ||Q_r|| Z``
        (1-Lipschitz activation, Cauchy-Schwarz, ``Z = max_p ||z(p)||``). The
        next layer is affine with (BN-folded) weights ``W'``; for output ``o``
        the difference is a sum over the removed channels and the taps
        (kernel taps, or the ``H'W'`` features of a channel for the Linear),
        so by the triangle inequality

        .. math:: \\max |\\Delta y| \\le Z \\max_o \\sum_{r \\in R}
            \\lVert Q_r \\rVert \\sum_{\\text{taps}} |W'_{o, r, \\text{tap}}|

        Zero padding of the next conv only removes terms.
        """
        kept = self.layer.kept_channels(threshold=threshold)
        removed = np.setdiff1d(np.arange(self.layer.out_channels), kept)
        if removed.size == 0:
            return 0.0
        z = self.layer.features(x).astype(np.float64)
        big_z = float(np.sqrt(np.sum(z * z, axis=1)).max())
        norms = row_norms(self.layer.q)[removed]
        if self.next_conv is not None:
            t, _ = self.next_conv.bn.scale_shift()
            w = np.abs(self.next_conv.conv.weight.astype(np.float64) * t[:, None, None, None])
            per_out = np.einsum("orhw,r->o", w[:, removed], norms)
        else:
            d = self.layer.out_channels
            a = np.abs(self.linear.weight.astype(np.float64))
            a = a.reshape(a.shape[0], d, -1)            # (out, channel, H'W'): channel-first
            per_out = np.einsum("orf,r->o", a[:, removed], norms)
        return big_z * float(per_out.max())

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1, groups: int = 1,
                    activation: Activation | str = "relu", eps: float = 1e-5) -> "ResRepNet":
        """The inverse of :meth:`params`: ``layer.*`` (:meth:`CompactorConv.from_params`, with the
        geometry keywords) and either ``next.*`` (a dense conv-BN, padding ``K//2``) or
        ``linear.*`` (:meth:`Linear.from_params`)."""
        from repnp.blocks import fromparams as fp

        stray = [k for k in params if not k.startswith(("layer.", "next.", "linear."))]
        if stray:
            raise ValueError(f"ResRepNet: unexpected key(s) {stray}; expected layer.*, next.* or linear.*")
        layer = CompactorConv.from_params(fp.sub(params, "layer."), stride=stride, padding=padding,
                                          dilation=dilation, groups=groups, eps=eps)
        if fp.has(params, "next."):
            nxt = fp.sub(params, "next.")
            fp.check_keys(nxt, fp.conv_bn_keys(nxt, ""), what="ResRepNet next")
            return cls(layer, activation, next_conv=fp.conv_bn_from(nxt, eps=eps))
        return cls(layer, activation, linear=Linear.from_params(fp.sub(params, "linear.")))



@dataclass(frozen=True, eq=False)
class ResRepNetDeploy(Described):
    """Deploy form of :class:`ResRepNet`: a thinner conv, activation, cut next conv or Linear."""

    conv: Conv2d
    activation: Activation = RELU
    next_conv: Conv2d | None = None
    linear: Linear | None = None

    def __post_init__(self) -> None:
        _init_head(self)

    @property
    def channels(self) -> int:
        """Channels left between the two layers."""
        return self.conv.out_channels

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        h = self.activation.describe(d, self.conv.describe(d, x, f"{prefix}conv."), f"{prefix}conv.")
        return _describe_head(d, h, self.next_conv, self.linear, prefix)

    @classmethod
    def from_params(cls, params, *, stride=1, padding=None, dilation=1,
                    activation: Activation | str = "relu") -> "ResRepNetDeploy":
        """The inverse of :meth:`params`: ``conv.*`` (dense, the geometry keywords; ``padding=None``
        is ``dilation * (K//2)``) and either ``next.*`` (a conv with bias, padding ``K//2``) or
        ``linear.*``."""
        from repnp.blocks import fromparams as fp

        stray = [k for k in params if not k.startswith(("conv.", "next.", "linear."))]
        if stray:
            raise ValueError(f"ResRepNetDeploy: unexpected key(s) {stray}; expected conv.*, next.* or linear.*")
        conv_params = fp.sub(params, "conv.")
        fp.check_keys(conv_params, fp.conv_keys(conv_params, ""), what="ResRepNetDeploy conv")
        conv = fp.conv_from(params, "conv.", stride=stride, padding=padding, dilation=dilation)
        if fp.has(params, "next."):
            return cls(conv, activation, next_conv=Conv2d.from_params(fp.sub(params, "next."), padding=None))
        return cls(conv, activation, linear=Linear.from_params(fp.sub(params, "linear.")))
