"""A RepVGG port in plain NumPy, checked against ``data/golden/repvgg_float64.npz``.

The worked example of the porting guide (``docs/porting/index.md``): it does not
import repnp. It reads the golden file, runs the train form on ``x``, fuses the
three branches into one 3x3 kernel and bias by hand, and checks both the fused
parameters (against ``deploy.*``) and both outputs (against ``y``) with the
project's one error rule, ``max|ours - golden| / max|golden|``.
``tests/test_docs_porting_example.py`` runs this file.

Run it from the repository root: ``python docs/porting/repvgg_port.py``.
"""

import json
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "golden" / "repvgg_float64.npz"


def conv2d(x, w, *, padding, groups):
    """Cross-correlation (no kernel flip), stride 1, zero padding, NCHW / OIHW, ``I = C_in / groups``."""
    n, c, h, wd = x.shape
    o, i, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = h + 2 * padding - kh + 1, wd + 2 * padding - kw + 1
    out = np.zeros((n, o, ho, wo))
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group                      # output channel oc reads input channels g*i ... g*i + i - 1
        for u in range(kh):
            for v in range(kw):
                patch = xp[:, g * i:(g + 1) * i, u:u + ho, v:v + wo]
                out[:, oc] += np.einsum("nchw,c->nhw", patch, w[oc, :, u, v])
    return out


def batchnorm(x, p, prefix, eps):
    """Inference BN with the running statistics: ``gamma * (x - mean) / sqrt(var + eps) + beta``."""
    mean, var, gamma, beta = (p[prefix + k][None, :, None, None] for k in ("mean", "var", "gamma", "beta"))
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def fuse_bn(kernel, p, prefix, eps):
    """Fold a BN into the bias-free conv before it: ``W' = t W``, ``b' = beta - mean t``."""
    t = p[prefix + "gamma"] / np.sqrt(p[prefix + "var"] + eps)
    return kernel * t[:, None, None, None], p[prefix + "beta"] - p[prefix + "mean"] * t


def relative_error(ours, golden):
    """The project's one metric: ``max|ours - golden| / max|golden|``."""
    return float(np.max(np.abs(ours - golden)) / np.max(np.abs(golden)))


def main(path=GOLDEN):
    with np.load(path, allow_pickle=False) as f:
        g = {k: f[k] for k in f.files}
    config = json.loads(str(g["config"]))
    eps = float(g["eps"])
    groups = config["kwargs"]["groups"]          # a group COUNT (timm's group_size = C_in / groups)
    tol = config["tolerance"]                    # 1e-12 for a float64 file
    p = {k[len("train."):]: v for k, v in g.items() if k.startswith("train.")}
    x = g["x"]

    # 1. The train form: three branches summed, then ReLU.
    dense = batchnorm(conv2d(x, p["conv_kxk.conv.weight"], padding=1, groups=groups), p, "conv_kxk.bn.", eps)
    one = batchnorm(conv2d(x, p["conv_1x1.conv.weight"], padding=0, groups=groups), p, "conv_1x1.bn.", eps)
    skip = batchnorm(x, p, "identity.", eps)
    y_train = np.maximum(dense + one + skip, 0.0)

    # 2. The deploy form, by hand.
    k_dense, b_dense = fuse_bn(p["conv_kxk.conv.weight"], p, "conv_kxk.bn.", eps)
    k_one, b_one = fuse_bn(p["conv_1x1.conv.weight"], p, "conv_1x1.bn.", eps)
    channels, in_per_group = k_dense.shape[:2]   # (4, 2): I = C_in / groups
    eye = np.zeros((channels, in_per_group, 3, 3))
    for i in range(channels):
        # Output channel i reads its group's inputs; input channel i is number i % I there.
        eye[i, i % in_per_group, 1, 1] = 1.0
    k_eye, b_eye = fuse_bn(eye, p, "identity.", eps)
    kernel = k_dense + k_eye
    kernel[:, :, 1:2, 1:2] += k_one              # the 1x1 kernel sits on the 3x3 centre
    bias = b_dense + b_one + b_eye
    y_deploy = np.maximum(conv2d(x, kernel, padding=1, groups=groups) + bias[None, :, None, None], 0.0)

    errors = {
        "deploy.conv.weight": relative_error(kernel, g["deploy.conv.weight"]),
        "deploy.conv.bias": relative_error(bias, g["deploy.conv.bias"]),
        "y (train form)": relative_error(y_train, g["y"]),
        "y (deploy form)": relative_error(y_deploy, g["y"]),
    }
    for name, err in errors.items():
        print(f"{name:20s} err = {err:.2e}  {'ok' if err <= tol else 'FAILED'} (tolerance {tol:g})")
    return errors, tol


if __name__ == "__main__":
    errors, tol = main(*sys.argv[1:])
    sys.exit(0 if all(e <= tol for e in errors.values()) else 1)
