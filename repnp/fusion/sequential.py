"""Rule 5: two convolutions in sequence merged into one (1x1 then KxK, KxK then 1x1)."""

from __future__ import annotations

import math

import numpy as np

from repnp.errors import ShapeError
from repnp.fusion._common import KernelBias, _kb, _out_dtype
from repnp.fusion.kernels import ungroup_kernel


def merge_sequential(first, second, *, groups: int = 1) -> KernelBias:
    """Merge a 1x1 conv followed by a KxK conv into one KxK conv (DBB transform III).

    Parameters
    ----------
    first : KernelBias or (kernel, bias)
        The 1x1 conv, kernel (M, C/groups, 1, 1), stride 1, no padding
        (a BN after it already folded in with :func:`fuse_bn`).
    second : KernelBias or (kernel, bias)
        The KxK conv, kernel (O, M/groups, kh, kw), with its own stride,
        padding and dilation (kept by the merged conv). An average pooling is
        ``(avgpool_kernel(M, K, groups=M), None)`` here (DBB's 1x1-AvgPool
        branch).
    groups : int, keyword-only
        The groups of both convs (DBB uses one value for both).

    Returns
    -------
    KernelBias
        Kernel (O, C/groups, kh, kw), bias (O,), dtype of ``first.kernel``.
        Run it with ``groups`` and the second conv's stride, padding and
        dilation.

    Raises
    ------
    ShapeError
        If ``first`` is not 1x1, ``groups`` does not divide M and O, or the
        second conv does not read M/groups channels per group.

    Notes
    -----
    DBB transform III (Ding et al., CVPR 2021; official ``transIII_1x1_kxk``).
    Per group, with ``W1`` the 1x1 kernel as an
    (M_g, C_g) matrix and ``g(o)`` the group of output channel ``o``:

    .. math::

        W[o, c, u, v] = \\sum_m W_2[o, m, u, v]\\, W_1[g(o) M_g + m, c], \\qquad
        b[o] = b_2[o] + \\sum_{m,u,v} W_2[o, m, u, v]\\, b_1[g(o) M_g + m]

    The bias term assumes the KxK conv sees ``b1`` at every tap. That is true
    in the interior; in the border the second conv reads its padding instead.
    So the merge is

    * exact everywhere when the intermediate map is padded with ``b1`` per
      channel instead of zeros -- ``ops.pad2d(y1, p, value=first.bias)``, the
      second conv then running with padding 0 on the padded map. That is DBB's
      ``BNAndPadLayer``: ``b1`` is the 1x1-BN output at zero input, the shift
      ``s`` of :func:`bn_scale_shift`. ONNX ``Pad`` takes one scalar, so
      PyTorch exports it as a zero ``Pad`` followed by ``ScatterND`` writes of
      the per-channel values into the border;
    * exact only in the interior (outputs whose window lies inside the input)
      when the intermediate map is zero-padded, unless ``b1 == 0``.
    """
    first = _kb(first, "first")
    second = _kb(second, "second")
    groups = int(groups)
    w1, w2 = first.kernel, second.kernel
    m, cg = w1.shape[:2]
    o, mg, kh, kw = w2.shape
    if w1.shape[2:] != (1, 1):
        raise ShapeError(f"first must be a 1x1 kernel, got first.kernel shape {w1.shape}")
    if groups < 1 or m % groups or o % groups:
        raise ShapeError(
            f"groups={groups} must divide first's M = {m} (first.kernel {w1.shape}) and second's "
            f"O = {o} (second.kernel {w2.shape})"
        )
    if mg * groups != m:
        raise ShapeError(
            f"second.kernel {w2.shape} reads {mg} channels per group, but first.kernel {w1.shape} "
            f"gives M/groups = {m}/{groups} = {m // groups}"
        )
    a = w1.astype(np.float64)[:, :, 0, 0].reshape(groups, mg, cg)           # (g, M_g, C_g)
    b = w2.astype(np.float64).reshape(groups, o // groups, mg, kh, kw)      # (g, O_g, M_g, kh, kw)
    kernel = np.einsum("gomhw,gmc->gochw", b, a).reshape(o, cg, kh, kw)
    # b1 of the group each output channel reads, as (O, M_g):
    b1_per_out = first.bias.reshape(groups, mg)[np.repeat(np.arange(groups), o // groups)]
    bias = second.bias + np.einsum("omhw,om->o", b.reshape(o, mg, kh, kw), b1_per_out)
    dtype = _out_dtype(first.kernel)
    return KernelBias(kernel.astype(dtype), bias.astype(dtype))


def _grouped_product(q: np.ndarray, w1: np.ndarray, groups: int) -> np.ndarray:
    """``Q @ ungroup_kernel(W1, groups)`` without the ungrouped kernel: (O, M) times a grouped
    (M, C/groups, kh, kw) kernel gives the dense (O, C, kh, kw) one, one matrix product per group
    (a depthwise 7x7 then a dense 1x1 at 384 -> 1536 channels is 29 M multiply-adds this way,
    11 G through the mostly-zero dense kernel)."""
    m, cg, kh, kw = w1.shape
    o = q.shape[0]
    w = w1.astype(np.float64).reshape(groups, m // groups, cg * kh * kw)          # (G, M/G, C/G*k*k)
    qg = q.reshape(o, groups, m // groups).transpose(1, 0, 2)                     # (G, O, M/G)
    out = np.matmul(qg, w)                                                        # (G, O, C/G*k*k)
    return out.reshape(groups, o, cg, kh, kw).transpose(1, 0, 2, 3, 4).reshape(o, groups * cg, kh, kw)


def merge_pointwise(first, second, *, groups: int = 1, second_groups: int = 1) -> KernelBias:
    """Merge a KxK conv followed by a 1x1 conv into one KxK conv.

    Parameters
    ----------
    first : KernelBias or (kernel, bias)
        The KxK conv, kernel (M, C/groups, kh, kw), any stride, padding,
        dilation (kept by the merged conv).
    second : KernelBias or (kernel, bias)
        The 1x1 conv, kernel (O, M/second_groups, 1, 1), stride 1, no padding.
    groups : int, keyword-only
        The groups of ``first``.
    second_groups : int, keyword-only
        The groups of ``second`` (1: a dense 1x1, as in ResRep's compactor and
        MobileNet's pointwise conv; ShuffleNet's 1x1 group conv has more).

    Returns
    -------
    KernelBias
        Kernel (O, C/g, kh, kw) and bias (O,), dtype of ``first.kernel``, for a
        conv with ``g = gcd(groups, second_groups)`` groups and the first
        conv's stride, padding and dilation. So the result is **dense**
        (g = 1) whenever the 1x1 is dense, whatever ``groups``; when
        ``groups`` is a multiple of ``second_groups`` (a depthwise conv
        followed by a 1x1 group conv) it keeps the 1x1's groups. For a
        depthwise conv then a dense 1x1 (MobileNet, no nonlinearity between)
        that turns ``C*K*K + O*C`` weights into ``O*C*K*K``: exact, but a bad
        trade.

    Raises
    ------
    ShapeError
        If ``second`` is not 1x1, ``groups`` does not divide M,
        ``second_groups`` does not divide M and O, or ``second`` does not read
        M/second_groups channels per group.

    Notes
    -----
    ResRep's compactor merge (Ding et al., ICCV 2021; official
    ``rr/resrep_convert.py`` ``fold_conv``); DBB transform III with the roles
    swapped. The 1x1 is a matrix ``Q`` applied to every pixel (block
    diagonal with ``second_groups`` blocks, written dense here), so

    .. math::

        W[o, c, u, v] = \\sum_m Q[o, m]\\, W_1[m, c, u, v], \\qquad
        b = Q b_1 + b_2

    exact everywhere: the 1x1 conv has no padding, so no border effect.
    Groups: split the M intermediate channels into ``g = gcd(groups,
    second_groups)`` equal chunks. Each chunk is a union of whole groups of
    ``first`` (``g`` divides ``groups``) and of whole input groups of the 1x1
    (``g`` divides ``second_groups``), so output chunk ``G`` reads only
    intermediate chunk ``G``, which reads only input chunk ``G``: the merged
    conv has ``g`` groups, and per chunk it is the formula above with both
    kernels made dense inside the chunk (:func:`ungroup_kernel`). Depthwise
    then grouped 1x1 (``groups = M``, ``second_groups = s``) gives
    ``W[o, m', u, v] = Q[o, m'] D[G M_s + m', 0, u, v]`` with ``M_s = M/s``
    and ``G`` the group of ``o``.
    """
    first = _kb(first, "first")
    second = _kb(second, "second")
    w1, w2 = first.kernel, second.kernel
    groups, second_groups = int(groups), int(second_groups)
    if w2.shape[2:] != (1, 1):
        raise ShapeError(f"second must be a 1x1 kernel, got second.kernel shape {w2.shape}")
    m, o = w1.shape[0], w2.shape[0]
    if second_groups < 1 or m % second_groups or o % second_groups or w2.shape[1] * second_groups != m:
        raise ShapeError(
            f"second.kernel {w2.shape} must read all M = {m} output channels of first.kernel {w1.shape}, "
            f"M/second_groups per group, with second_groups={second_groups} dividing M and O = {o}"
        )
    if groups < 1 or m % groups:
        raise ShapeError(f"groups={groups} must divide first's M = {m} (first.kernel {w1.shape})")
    g = math.gcd(groups, second_groups)
    mg, og = m // g, o // g
    kernels, biases = [], []
    for chunk in range(g):  # one matrix product per chunk; a single one (g == 1) for every dense 1x1
        rows, outs = slice(chunk * mg, (chunk + 1) * mg), slice(chunk * og, (chunk + 1) * og)
        q = ungroup_kernel(w2[outs].astype(np.float64), groups=second_groups // g)[:, :, 0, 0]  # (O/g, M/g)
        kernels.append(_grouped_product(q, w1[rows], groups // g))
        biases.append(q @ first.bias[rows] + second.bias[outs])
    dtype = _out_dtype(first.kernel)
    return KernelBias(np.concatenate(kernels).astype(dtype), np.concatenate(biases).astype(dtype))
