"""Online Convolutional Re-parameterization (OREPA): one conv whose weight is built from six branches.

Paper: Hu et al., *Online Convolutional Re-parameterization*, CVPR 2022 (arXiv 2204.00826). Facts read from the official
``blocks.py`` class ``OREPA`` (github.com/JUGGHM/OREPA_CVPR2022, commit
3ed037beeb106cc1c3d011eb2678cebfefc4cba0; the examples ``tests/data/ecb_orepa/*/off_orepa*``
were made there and load into this block, see ``tests/test_blocks_orepa.py``):

* training runs ONE conv (stride, padding ``K//2`` -- asserted --, groups, no bias) whose weight
  ``weight_gen()`` computes from parameters, then a BN. There is no BN per branch (the point of
  OREPA: the linear branches collapse online, during training);
* ``weight_gen()`` sums six kernels, each scaled per output channel by a row of ``vector`` (6, O):
  0 ``weight_orepa_origin`` (KxK); 1 ``weight_orepa_avg_conv`` (1x1) times the buffer
  ``weight_orepa_avg_avg`` (K, K) of ``1/K^2``; 2 ``weight_orepa_pfir_conv`` (1x1) times the buffer
  ``weight_orepa_prior`` (O, K, K), a per-output-channel DCT-like pattern (``fre_init``, written for
  K = 3 only); 3 ``weight_orepa_1x1_kxk_idconv1`` (T, C/g, 1, 1) plus the buffer ``id_tensor``
  (identity-based, T = C when groups <= 4 else 2C) then ``weight_orepa_1x1_kxk_conv2``
  (O, T/g, K, K); 4 ``weight_orepa_1x1`` (1x1, centred); 5 ``weight_orepa_gconv_dw`` (8C, 1, K, K)
  then ``weight_orepa_gconv_pw`` (O, 8C/g, 1, 1) (``dwsc2full``);
* ``dwsc2full`` views the pointwise weight as (O/g, g, C/g, 8) and writes output channel
  ``G * O/g + o`` of group ``G`` from pointwise row ``o * g + G``: for ``groups > 1`` the rows are
  read interleaved. That is the official train form (its state dicts mean that), so this block
  reads them the same way (:meth:`OREPA.gconv_pointwise`);
* ``switch_to_deploy`` writes ``orepa_reparam`` (weight, bias) = ``transI_fusebn(weight_gen(), bn)``.

Parameter names (``params()``) are the official state dict's keys (``bn.weight`` ... as the BN's
``bn.gamma`` ...): the buffers ``weight_orepa_avg_avg``, ``id_tensor`` and ``weight_orepa_prior``
are in the state dict and are read from it, not recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repnp import fusion
from repnp.blocks.base import BatchNorm, Conv2d, random_bn, random_conv_weight
from repnp.dataflow import Dataflow, Described
from repnp.errors import ShapeError

__all__ = ["OREPA", "orepa_prior"]

#: The row of ``vector`` scaling each branch, as ``weight_gen()`` reads them.
BRANCH_ROWS = ("origin", "avg", "prior", "1x1_kxk", "1x1", "gconv")
_EXPAND = 8   # the official expand_ratio of the depthwise-separable branch


def orepa_prior(out_channels: int, kernel_size: int = 3, *, dtype=np.float64) -> np.ndarray:
    """OREPA's ``weight_orepa_prior`` buffer as ``fre_init`` writes it, (O, 3, 3).

    The first ``O/2`` channels hold ``cos(pi (h + 1/2) (i + 1) / 3)`` (rows), the others
    ``cos(pi (w + 1/2) (i + 1 - O/2) / 3)`` (columns). The official loop covers h, w < 3 only
    (other sizes leave uninitialised memory there): refused here.
    """
    if kernel_size != 3:
        raise ShapeError(f"OREPA's fre_init prior is defined for kernel_size 3 only, got {kernel_size}")
    half = out_channels / 2
    out = np.empty((out_channels, 3, 3))
    h, w = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    for i in range(out_channels):
        out[i] = (np.cos(np.pi * (h + 0.5) * (i + 1) / 3) if i < half
                  else np.cos(np.pi * (w + 0.5) * (i + 1 - half) / 3))
    return out.astype(dtype)


@dataclass(frozen=True, eq=False)
class OREPA(Described):
    """Train form of OREPA: ``bn(conv(x, weight_gen()))``.

    Attributes
    ----------
    origin, avg_conv, pfir_conv, one : ndarray
        ``weight_orepa_origin`` (O, C/g, K, K); ``weight_orepa_avg_conv``,
        ``weight_orepa_pfir_conv``, ``weight_orepa_1x1`` (O, C/g, 1, 1); ``one`` may be None (the
        official ``hasattr`` check).
    avg_avg : ndarray
        Buffer (K, K), ``1/K^2`` everywhere in the official code.
    prior : ndarray
        Buffer (O, K, K) (:func:`orepa_prior`).
    idconv1, id_tensor : ndarray
        (T, C/g, 1, 1): the 1x1 of the 1x1 -> KxK branch is ``idconv1 + id_tensor``.
    conv2 : ndarray
        (O, T/g, K, K).
    gconv_dw, gconv_pw : ndarray
        (8C, 1, K, K) and (O, 8C/g, 1, 1).
    vector : ndarray
        (6, O), the per-branch, per-output-channel factors.
    bn : BatchNorm
    stride, groups : int

    Notes
    -----
    Deploy (:meth:`reparameterize`; official ``get_equivalent_kernel_bias``): the weight
    generator as calls into :mod:`repnp.fusion`, then rule 1 --

    * avg: :func:`repnp.fusion.merge_depthwise` of the 1x1 and the (shared) averaging kernel;
    * prior: :func:`repnp.fusion.merge_depthwise` of the 1x1 and the per-channel prior;
    * 1x1 -> KxK: :func:`repnp.fusion.merge_sequential` (transform III, no bias: no border issue);
    * 1x1: :func:`repnp.fusion.pad_kernel`;
    * depthwise-separable: :func:`repnp.fusion.merge_pointwise` (depthwise with multiplier 8, then
      the pointwise read as ``dwsc2full`` does);
    * summed with the rows of ``vector`` as per-channel scales (:func:`repnp.fusion.add_branches`),
      then :func:`repnp.fusion.fuse_bn`.

    The whole generator is linear in each parameter tensor and has no bias, so every branch
    equals a conv branch on the input: that is how :meth:`describe` states the train form
    (weight-only nodes for the products of parameters, conv branches for the two
    compositions), which computes the same function as the one generated conv.
    """

    origin: np.ndarray
    avg_conv: np.ndarray
    pfir_conv: np.ndarray
    avg_avg: np.ndarray
    one: np.ndarray | None
    idconv1: np.ndarray
    id_tensor: np.ndarray
    conv2: np.ndarray
    gconv_dw: np.ndarray
    gconv_pw: np.ndarray
    vector: np.ndarray
    prior: np.ndarray
    bn: BatchNorm
    stride: int = 1
    groups: int = 1

    def __post_init__(self) -> None:
        o, cg, k, kw = self.origin.shape
        g = int(self.groups)
        c = cg * g
        if k != kw or k % 2 == 0 or g < 1 or o % g:
            raise ShapeError(f"OREPA: weight_orepa_origin {self.origin.shape} must be (O, C/g, K, K), K odd, "
                             f"groups={g} dividing O")
        t = self.idconv1.shape[0]
        want = {"weight_orepa_avg_conv": (self.avg_conv, (o, cg, 1, 1)),
                "weight_orepa_pfir_conv": (self.pfir_conv, (o, cg, 1, 1)),
                "weight_orepa_avg_avg": (self.avg_avg, (k, k)),
                "weight_orepa_1x1_kxk_idconv1": (self.idconv1, (t, cg, 1, 1)),
                "id_tensor": (self.id_tensor, (t, cg, 1, 1)),
                "weight_orepa_1x1_kxk_conv2": (self.conv2, (o, t // g, k, k)),
                "weight_orepa_gconv_dw": (self.gconv_dw, (_EXPAND * c, 1, k, k)),
                "weight_orepa_gconv_pw": (self.gconv_pw, (o, _EXPAND * c // g, 1, 1)),
                "vector": (self.vector, (len(BRANCH_ROWS), o)),
                "weight_orepa_prior": (self.prior, (o, k, k))}
        if self.one is not None:
            want["weight_orepa_1x1"] = (self.one, (o, cg, 1, 1))
        bad = {name: tuple(np.shape(a)) for name, (a, shape) in want.items() if tuple(np.shape(a)) != shape}
        if bad or t % g:
            raise ShapeError(f"OREPA with weight_orepa_origin {self.origin.shape}, groups={g}: expected "
                             f"{ {n: s for n, (_, s) in want.items() if n in bad} }, got {bad}"
                             + (f"; groups must divide T = {t}" if t % g else ""))
        if self.bn.channels != o:
            raise ShapeError(f"OREPA: bn has {self.bn.channels} channels, weight_orepa_origin {self.origin.shape}")

    # -- configuration ---------------------------------------------------------
    @property
    def kernel_size(self) -> int:
        return int(self.origin.shape[2])

    @property
    def in_channels(self) -> int:
        return int(self.origin.shape[1]) * int(self.groups)

    @property
    def out_channels(self) -> int:
        return int(self.origin.shape[0])

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    def gconv_pointwise(self) -> np.ndarray:
        """The pointwise kernel in the row order ``dwsc2full`` applies it: output ``G*O/g + o``
        (group ``G``) takes row ``o*g + G`` (the identity permutation when ``groups == 1``)."""
        o, g = self.out_channels, int(self.groups)
        rows = np.arange(o).reshape(o // g, g).T.reshape(-1)
        return self.gconv_pw[rows]

    # -- construction ----------------------------------------------------------
    @classmethod
    def random(cls, seed, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
               groups: int = 1, internal_channels: int | None = None, eps: float = 1e-5,
               dtype=np.float64) -> "OREPA":
        """Random weights, ``vector`` and BN statistics; buffers as the official constructor
        makes them (``internal_channels`` default: C when groups <= 4, else 2C)."""
        rng = np.random.default_rng(seed)
        k, g, c, o = int(kernel_size), int(groups), int(in_channels), int(out_channels)
        if g < 1 or c % g or o % g:
            raise ShapeError(f"groups={g} must divide in_channels={c} and out_channels={o}")
        cg = c // g
        t = int(internal_channels) if internal_channels is not None else (c if g <= 4 else 2 * c)
        id_tensor = np.zeros((t, cg, 1, 1), dtype=dtype)
        id_tensor[np.arange(t), np.arange(t) % cg] = 1
        w = lambda *shape: random_conv_weight(rng, shape[0], shape[1], shape[2:], dtype=dtype)  # noqa: E731
        prior = orepa_prior(o, k, dtype=dtype) if k == 3 else rng.standard_normal((o, k, k)).astype(dtype)
        return cls(origin=w(o, cg, k, k), avg_conv=w(o, cg, 1, 1), pfir_conv=w(o, cg, 1, 1),
                   avg_avg=np.full((k, k), 1.0 / (k * k), dtype=dtype), one=w(o, cg, 1, 1),
                   idconv1=(0.3 * rng.standard_normal((t, cg, 1, 1))).astype(dtype), id_tensor=id_tensor,
                   conv2=w(o, t // g, k, k), gconv_dw=w(_EXPAND * c, 1, k, k), gconv_pw=w(o, _EXPAND * c // g, 1, 1),
                   vector=(0.5 + 0.5 * rng.standard_normal((len(BRANCH_ROWS), o))).astype(dtype), prior=prior,
                   bn=random_bn(rng, o, eps=eps, dtype=dtype), stride=stride, groups=g)

    # -- the one description of the train form ---------------------------------
    def describe(self, d: Dataflow, x: str, prefix: str = "") -> str:
        """``bn(sum of the six branches as convs on x)``: equal to the official one generated conv."""
        k, p, s, g, o = self.kernel_size, self.padding, self.stride, int(self.groups), self.out_channels
        par = lambda name, a: d.param(f"{prefix}{name}", a)  # noqa: E731
        names = {}
        # Parameters first, in the official state dict's order.
        names["origin"] = par("weight_orepa_origin", self.origin)
        names["avg_conv"] = par("weight_orepa_avg_conv", self.avg_conv)
        names["pfir_conv"] = par("weight_orepa_pfir_conv", self.pfir_conv)
        if self.one is not None:
            names["one"] = par("weight_orepa_1x1", self.one)
        names["idconv1"] = par("weight_orepa_1x1_kxk_idconv1", self.idconv1)
        names["conv2"] = par("weight_orepa_1x1_kxk_conv2", self.conv2)
        names["dw"] = par("weight_orepa_gconv_dw", self.gconv_dw)
        names["pw"] = par("weight_orepa_gconv_pw", self.gconv_pw)
        names["vector"] = par("vector", self.vector)
        names["avg_avg"] = par("weight_orepa_avg_avg", self.avg_avg)
        names["id_tensor"] = par("id_tensor", self.id_tensor)
        names["prior"] = par("weight_orepa_prior", self.prior)
        scope = prefix

        def row(i):   # vector[i] as an (O, 1, 1, 1) factor
            sl = d.node("Slice", [names["vector"]], scope, starts=[i], ends=[i + 1], axes=[0])
            return d.node("Reshape", [sl], scope, shape=[o, 1, 1, 1])

        def scaled(kernel, i):
            return d.node("Mul", [kernel, row(i)], scope)

        def conv(h, kernel, ksize, *, stride=s, pad=p, groups=g):
            return d.conv(h, kernel, None, scope, kernel_shape=(ksize, ksize), stride=stride, padding=pad,
                          groups=groups)

        avg = d.node("Reshape", [names["avg_avg"]], scope, shape=[1, 1, k, k])
        prior = d.node("Reshape", [names["prior"]], scope, shape=[o, 1, k, k])
        w_avg = d.node("Mul", [names["avg_conv"], avg], scope)
        w_pfir = d.node("Mul", [names["pfir_conv"], prior], scope)
        first = d.node("Add", [names["idconv1"], names["id_tensor"]], scope)
        pw = names["pw"]
        if g > 1:     # dwsc2full's interleaved rows: (O/g, g, X) -> g slices on axis 1, concatenated
            view = d.node("Reshape", [pw], scope, shape=[o // g, g, -1])
            parts = [d.node("Slice", [view], scope, starts=[G], ends=[G + 1], axes=[1]) for G in range(g)]
            pw = d.node("Reshape", [d.node("Concat", parts, scope, axis=0)], scope, shape=[o, -1, 1, 1])

        branches = [lambda: conv(x, scaled(names["origin"], 0), k),
                    lambda: conv(x, scaled(w_avg, 1), k),
                    lambda: conv(x, scaled(w_pfir, 2), k),
                    lambda: conv(conv(x, first, 1, stride=1, pad=0), scaled(names["conv2"], 3), k)]
        if self.one is not None:
            branches.append(lambda: conv(x, scaled(names["one"], 4), 1, pad=0))
        branches.append(lambda: conv(conv(x, names["dw"], k, groups=self.in_channels), scaled(pw, 5), 1,
                                     stride=1, pad=0))
        return self.bn.describe(d, d.sum(branches, scope), f"{prefix}bn.")

    # -- the algebra -----------------------------------------------------------
    def branch_kernels(self) -> list[fusion.KernelBias]:
        """The six kernels of ``weight_gen()`` before their ``vector`` rows, KxK, no bias."""
        k, g, o = self.kernel_size, int(self.groups), self.out_channels
        shared = np.broadcast_to(self.avg_avg, (o, 1, k, k))
        out = [fusion.KernelBias(self.origin, None),
               fusion.merge_depthwise((self.avg_conv, None), (shared, None)),
               fusion.merge_depthwise((self.pfir_conv, None), (self.prior[:, None], None)),
               fusion.merge_sequential((self.idconv1 + self.id_tensor, None), (self.conv2, None), groups=g)]
        if self.one is not None:
            out.append(fusion.KernelBias(fusion.pad_kernel(self.one, k), None))
        out.append(fusion.merge_pointwise((self.gconv_dw, None), (self.gconv_pointwise(), None),
                                          groups=self.in_channels, second_groups=g))
        return out

    def weight(self) -> np.ndarray:
        """``weight_gen()``: the one conv weight of the train form, (O, C/g, K, K)."""
        rows = [0, 1, 2, 3] + ([4] if self.one is not None else []) + [5]
        kernel, _ = fusion.add_branches(*self.branch_kernels(), scales=[self.vector[i] for i in rows])
        return kernel

    def reparameterize(self) -> Conv2d:
        """One KxK conv with bias (``orepa_reparam``): stride, padding ``K//2``, groups."""
        kernel, bias = self.bn.fold(self.weight())
        return Conv2d(kernel, bias, stride=self.stride, padding=self.padding, groups=int(self.groups))

    @classmethod
    def from_params(cls, params, *, stride: int = 1, groups: int | None = None, eps: float = 1e-5) -> "OREPA":
        """The inverse of :meth:`params` (the official state dict's names, BN leaves as ``bn.mean`` ...).

        ``groups=None`` is read from the arrays: ``8C / (8C/g)`` with ``C`` the depthwise
        weight's channels / 8 and ``8C/g`` the pointwise weight's input width. Stride is not
        in the arrays (a keyword; the fused weights do not depend on it).

        Raises
        ------
        ValueError
            Missing or unexpected keys (named).
        ShapeError
            Shapes that do not fit together (keys and shapes named).
        """
        from repnp.blocks import fromparams as fp

        names = ["weight_orepa_origin", "weight_orepa_avg_conv", "weight_orepa_pfir_conv", "weight_orepa_avg_avg",
                 "weight_orepa_1x1_kxk_idconv1", "id_tensor", "weight_orepa_1x1_kxk_conv2", "weight_orepa_gconv_dw",
                 "weight_orepa_gconv_pw", "vector", "weight_orepa_prior"]
        optional = ["weight_orepa_1x1"] if "weight_orepa_1x1" in params else []
        fp.check_keys(params, names + optional + fp.bn_keys("bn."), what="OREPA")
        a = {n: np.asarray(params[n]) for n in names + optional}
        dw, pw = a["weight_orepa_gconv_dw"], a["weight_orepa_gconv_pw"]
        if groups is None:
            if dw.ndim != 4 or pw.ndim != 4 or pw.shape[1] < 1 or dw.shape[0] % pw.shape[1]:
                raise ShapeError(f"'weight_orepa_gconv_dw' {dw.shape} and 'weight_orepa_gconv_pw' {pw.shape} do not "
                                 f"tell groups (8C and 8C/groups)")
            groups = dw.shape[0] // pw.shape[1]
        for n in names + optional:
            want = 2 if n in ("weight_orepa_avg_avg", "vector") else 3 if n == "weight_orepa_prior" else 4
            fp.array(params, n, ndim=want)
        return cls(origin=a["weight_orepa_origin"], avg_conv=a["weight_orepa_avg_conv"],
                   pfir_conv=a["weight_orepa_pfir_conv"], avg_avg=a["weight_orepa_avg_avg"],
                   one=a.get("weight_orepa_1x1"), idconv1=a["weight_orepa_1x1_kxk_idconv1"],
                   id_tensor=a["id_tensor"], conv2=a["weight_orepa_1x1_kxk_conv2"], gconv_dw=dw, gconv_pw=pw,
                   vector=a["vector"], prior=a["weight_orepa_prior"], bn=fp.bn_from(params, "bn.", eps=eps),
                   stride=stride, groups=int(groups))

