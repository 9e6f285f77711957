"""The pictures of the algebra page, drawn at build time from repnp.fusion's own results.

Every picture calls the function it illustrates on a tiny seeded example and shows the
kernels as grids of numbers, so a picture cannot disagree with the code. A new rule's
picture is one function here (returning a matplotlib figure; its docstring's first line is
the image's alt text) and one ``repnp-picture`` directive on ``docs/algebra.md``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from repnp import fusion

__all__ = ["kernel_row", "picture_fuse_bn", "picture_identity", "picture_pad", "picture_add_branches",
           "picture_merge_sequential", "picture_merge_pointwise", "picture_avgpool", "picture_concat",
           "picture_ungroup", "picture_conv_to_fc", "picture_linear"]

_CMAP = "RdBu_r"


def _grid(ax, a, title, *, annotate=True, vmax=None):
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    vmax = vmax or max(float(np.abs(a).max()), 1e-12)
    ax.imshow(a, cmap=_CMAP, vmin=-vmax, vmax=vmax)
    if annotate:
        for (r, c), v in np.ndenumerate(a):
            text = "0" if v == 0 else f"{v:.2f}".rstrip("0").rstrip(".")
            ax.text(c, r, text, ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 * vmax else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def kernel_row(panels, ops, *, annotate=True, width=None):
    """Grids ``panels`` (pairs ``(title, 2-D array)``) in a row, with ``ops[i]`` printed after panel i."""
    n = len(panels)
    fig = plt.figure(figsize=(width or 1.9 * n + 0.4 * len(ops), 2.0))
    axes = fig.subplots(1, n)
    axes = np.atleast_1d(axes)
    for i, (ax, (title, a)) in enumerate(zip(axes, panels)):
        _grid(ax, a, title, annotate=annotate)
        if i < len(ops) and ops[i]:
            ax.annotate(ops[i], xy=(1.0, 0.5), xycoords="axes fraction", xytext=(1.25, 0),
                        textcoords="offset fontsize", ha="center", va="center", fontsize=16)
    fig.tight_layout(w_pad=2.5)
    return fig


def _rng():
    return np.random.default_rng(0)


def _bn(rng, c):
    return dict(mean=rng.normal(0, 0.5, c), var=rng.uniform(0.5, 2, c), gamma=rng.uniform(0.5, 1.5, c),
                beta=rng.normal(0, 0.5, c))


def picture_fuse_bn():
    """A 3x3 kernel, its BN's scale t, the fused kernel t W (one output channel)."""
    rng = _rng()
    w = rng.normal(0, 1, (1, 1, 3, 3)).round(2)
    bn = dict(mean=np.array([0.4]), var=np.array([3.0]), gamma=np.array([1.2]), beta=np.array([-0.3]))
    t, s = fusion.bn_scale_shift(**bn, eps=1e-5)
    k, b = fusion.fuse_bn(w, None, **bn, eps=1e-5)
    return kernel_row([("W (conv, no bias)", w[0, 0]), (f"t = γ/√(σ²+ε) = {t[0]:.3f}", t[:, None]),
                       (f"W' = t·W,  b' = β − μt = {b[0]:.3f}", k[0, 0])], ["×", "="])


def picture_identity():
    """The identity as a 3x3 kernel: dense, and grouped (C = 4, groups = 2), centre taps as (O, I)."""
    dense = fusion.identity_kernel(4, kernel_size=3)
    grouped = fusion.identity_kernel(4, groups=2, kernel_size=3)
    depthwise = fusion.identity_kernel(4, groups=4, kernel_size=3)
    return kernel_row([("groups=1: [o, i, 1, 1] (4×4)", dense[:, :, 1, 1]),
                       ("groups=2: [o, i, 1, 1] (4×2)", grouped[:, :, 1, 1]),
                       ("groups=4: [o, i, 1, 1] (4×1)", depthwise[:, :, 1, 1]),
                       ("any o, its one i: [u, v]", grouped[0, 0])], [])


def picture_pad():
    """1x1, 1x3 and 3x1 kernels placed inside a 3x3, centres aligned."""
    rng = _rng()
    one = rng.normal(0, 1, (1, 1, 1, 1)).round(2)
    hor = rng.normal(0, 1, (1, 1, 1, 3)).round(2)
    ver = rng.normal(0, 1, (1, 1, 3, 1)).round(2)
    return kernel_row([("1×1", one[0, 0]), ("pad_kernel(·, 3)", fusion.pad_kernel(one, 3)[0, 0]),
                       ("1×3", hor[0, 0]), ("pad_kernel(·, 3)", fusion.pad_kernel(hor, 3)[0, 0]),
                       ("3×1", ver[0, 0]), ("pad_kernel(·, 3)", fusion.pad_kernel(ver, 3)[0, 0])],
                      ["→", "", "→", "", "→"])


def picture_add_branches():
    """RepVGG: BN-fused 3x3 + 1x1 + identity = one 3x3 kernel (output channel 0, input channel 0)."""
    rng = _rng()
    kxk = fusion.fuse_bn(rng.normal(0, 0.5, (1, 1, 3, 3)), None, **_bn(rng, 1))
    one = fusion.fuse_bn(rng.normal(0, 0.5, (1, 1, 1, 1)), None, **_bn(rng, 1))
    eye = fusion.fuse_bn(fusion.identity_kernel(1), None, **_bn(rng, 1))
    kernel, bias = fusion.add_branches(kxk, one, eye, kernel_size=3)
    return kernel_row([(f"3×3 branch, b={kxk.bias[0]:.2f}", kxk.kernel[0, 0]),
                       (f"1×1 branch, b={one.bias[0]:.2f}", fusion.pad_kernel(one.kernel, 3)[0, 0]),
                       (f"identity, b={eye.bias[0]:.2f}", fusion.pad_kernel(eye.kernel, 3)[0, 0]),
                       (f"add_branches, b={bias[0]:.2f}", kernel[0, 0])], ["+", "+", "="])


def picture_merge_sequential():
    """DBB: a 1x1 conv (2 -> 2) then a 3x3 conv (2 -> 1) is one 3x3 conv (2 -> 1)."""
    rng = _rng()
    w1 = rng.normal(0, 1, (2, 2, 1, 1)).round(2)
    w2 = rng.normal(0, 1, (1, 2, 3, 3)).round(2)
    k, _ = fusion.merge_sequential((w1, None), (w2, None))
    return kernel_row([("W1 (1×1) as a 2×2 matrix", w1[:, :, 0, 0]), ("W2[0, 0]", w2[0, 0]), ("W2[0, 1]", w2[0, 1]),
                       ("merged[0, 0]", k[0, 0]), ("merged[0, 1]", k[0, 1])], ["then", "", "=", ""])


def picture_merge_pointwise():
    """ResRep's compactor: a 3x3 conv (1 -> 2) then a 1x1 Q (2 -> 2) is one 3x3 conv (1 -> 2)."""
    rng = _rng()
    w1 = rng.normal(0, 1, (2, 1, 3, 3)).round(2)
    q = np.array([[1.1, 0.2], [0.0, 0.0]])           # row 1 pruned: exactly zero
    k, _ = fusion.merge_pointwise((w1, None), (q[:, :, None, None], None))
    return kernel_row([("W[0, 0]", w1[0, 0]), ("W[1, 0]", w1[1, 0]), ("Q (row 1 pruned)", q),
                       ("merged[0, 0]", k[0, 0]), ("merged[1, 0] = 0", k[1, 0])], ["", "then", "=", ""])


def picture_avgpool():
    """3x3 average pooling of one channel as a depthwise kernel."""
    return kernel_row([("avgpool_kernel(1, 3)", fusion.avgpool_kernel(1, 3)[0, 0])], [], width=2.2)


def picture_concat():
    """DBB transform IV: a 1x1 branch and a 3x3 branch concatenated on channels are one 3x3 conv."""
    rng = _rng()
    a = (rng.normal(0, 1, (1, 1, 1, 1)).round(2), None)
    b = (rng.normal(0, 1, (1, 1, 3, 3)).round(2), None)
    k, _ = fusion.concat_branches(a, b, kernel_size=3)
    return kernel_row([("branch A (1×1)", a[0][0, 0]), ("branch B (3×3)", b[0][0, 0]),
                       ("concat: out 0", k[0, 0]), ("concat: out 1", k[1, 0])], ["‖", "=", ""])


def picture_ungroup():
    """A grouped kernel (4 outputs, 2 groups) as a dense block-diagonal one (1x1 kernels, as (O, I))."""
    rng = _rng()
    w = rng.normal(0, 1, (4, 2, 1, 1)).round(2)
    dense = fusion.ungroup_kernel(w, groups=2)
    return kernel_row([("grouped (4×2)", w[:, :, 0, 0]), ("ungroup_kernel(·, groups=2)", dense[:, :, 0, 0])],
                      ["→"], width=4.6)


def picture_conv_to_fc():
    """RepMLP: a 3x3 conv (padding 1) on a fixed 3x4 map as a 12x12 matrix."""
    rng = _rng()
    w = rng.normal(0, 1, (1, 1, 3, 3)).round(2)
    m, _ = fusion.conv_to_fc(w, None, input_shape=(1, 3, 4), padding=1)
    return kernel_row([("W (3×3)", w[0, 0]), ("conv_to_fc: M (12×12)", m)], ["→"], annotate=False, width=5.0)


def picture_linear():
    """RepViT: a BN before a Linear folds into the Linear's columns."""
    rng = _rng()
    w = rng.normal(0, 1, (3, 4)).round(2)
    bn = _bn(rng, 4)
    fused, _ = fusion.fuse_bn_linear(w, None, **bn, eps=1e-5, bn_first=True)
    t, _ = fusion.bn_scale_shift(**bn, eps=1e-5)
    return kernel_row([("BN scale t (per input)", t[None, :]), ("W (3×4)", w), ("W diag(t)", fused)],
                      ["then", "="], width=6.4)


def picture_dilate():
    """UniRepLKNet: a 3x3 kernel used with dilation 2 and 3 is a dense 5x5 / 7x7 kernel with zeros between taps."""
    w = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    return kernel_row([("3×3, dilation 1", w[0, 0]),
                       ("dilate_kernel(·, dilation=2)", fusion.dilate_kernel(w, dilation=2)[0, 0]),
                       ("dilate_kernel(·, dilation=3)", fusion.dilate_kernel(w, dilation=3)[0, 0])], ["", ""])


def picture_masked():
    """ECB: a 1x1 conv (2 -> 1) then a Sobel-x mask scaled per channel is one 3x3 conv (2 -> 1)."""
    rng = _rng()
    w1 = rng.normal(0, 1, (1, 2, 1, 1)).round(2)
    b1 = np.array([0.5])
    scale = np.array([0.8])
    mask = fusion.edge_mask("sobelx")
    dw = fusion.masked_kernel(scale, mask)
    k, b = fusion.merge_depthwise((w1, b1), (dw, np.array([0.1])))
    return kernel_row([("1×1 weights (O=1, I=2)", w1[:, :, 0, 0]), ("Sobel-x mask", mask),
                       ("masked_kernel: 0.8·mask", dw[0, 0]), (f"merged[0, 0], b={b[0]:.2f}", k[0, 0]),
                       ("merged[0, 1]", k[0, 1])], ["then", "→", "=", ""])


def picture_transposed():
    """ConvTranspose (C_in = 2, C_out = 2, groups 1) + BN: the scale t_o multiplies kernel[:, o], not kernel[o]."""
    rng = _rng()
    w = rng.normal(0, 1, (2, 2, 2, 2)).round(2)
    bn = dict(mean=np.array([0.2, -0.1]), var=np.array([0.25, 4.0]), gamma=np.array([1.0, 1.0]),
              beta=np.array([0.0, 0.0]))
    k, _ = fusion.fuse_bn_transposed(w, None, **bn, eps=0.0)
    return kernel_row([("W[0, 0] (in 0 → out 0)", w[0, 0]), ("W[0, 1] (in 0 → out 1)", w[0, 1]),
                       ("t = (2.0, 0.5)", np.array([[2.0], [0.5]])),
                       ("W'[0, 0] = 2.0·W[0, 0]", k[0, 0]), ("W'[0, 1] = 0.5·W[0, 1]", k[0, 1])],
                      ["", "×", "=", ""])
