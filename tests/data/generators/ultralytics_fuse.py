"""Reference case of ultralytics' own ``BaseModel.fuse()`` on Conv, Conv2 and ConvTranspose (+ BN).

NOT run in CI: it needs PyTorch and ultralytics (made with torch 2.14.1 CPU and ultralytics 8.4.190).
It made ``tests/data/ultralytics_fuse/``: a tiny ``BaseModel`` whose ``model`` is a Sequential of
ultralytics' own modules (``ultralytics/nn/modules/conv.py`` ``Conv``, ``Conv2``, ``ConvTranspose``)
with random weights and random BN statistics, its ``state_dict()`` before (``train_state.npz``) and
after ``fuse()`` (``fused_state.npz``), and the model's float32 output (``output.npy``) on
``input.npy``, before fusing. The modules are used as they are; nothing of ultralytics is copied here.

Usage::

    /work/torchvenv/bin/python tests/data/generators/ultralytics_fuse.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import ultralytics
from ultralytics.nn.modules.conv import Conv, Conv2, ConvTranspose
from ultralytics.nn.tasks import BaseModel

SEED = 13
BN_EPS = 1e-3       # ultralytics/utils/torch_utils.py initialize_weights


class Tiny(BaseModel):
    """The smallest BaseModel: fuse() walks self.model.modules()."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            Conv(3, 4, 3, 2),                        # model.0: Conv
            Conv2(4, 4, 3, 2, g=2),                  # model.1: Conv2, stride 2, groups 2
            Conv2(4, 6, 3, 1),                       # model.2: Conv2
            ConvTranspose(6, 4),                     # model.3: ConvTranspose, k=2 s=2 p=0, bn
            ConvTranspose(4, 4, 4, 2, 1),            # model.4: ConvTranspose, k=4 s=2 p=1, bn
            ConvTranspose(4, 2, bn=False),           # model.5: no bn: nothing to fold
        )

    def forward(self, x):
        return self.model(x)


def main(out_dir: str) -> None:
    torch.manual_seed(SEED)
    model = Tiny()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = BN_EPS
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.num_batches_tracked.fill_(1000)
    model.eval()
    x = torch.randn(1, 3, 8, 10)
    with torch.no_grad():
        y = model(x)
        train = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        model.fuse(verbose=False)
        fused = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        y_fused = model(x)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "train_state.npz", **train)
    np.savez(out / "fused_state.npz", **fused)
    np.save(out / "input.npy", x.numpy())
    np.save(out / "output.npy", y.numpy())
    meta = {
        "source": {"project": "ultralytics", "version": ultralytics.__version__, "torch": torch.__version__,
                   "files": ["ultralytics/nn/modules/conv.py", "ultralytics/nn/tasks.py",
                             "ultralytics/utils/torch_utils.py"]},
        "modules": ["Conv(3, 4, 3, 2)", "Conv2(4, 4, 3, 2, g=2)", "Conv2(4, 6, 3, 1)", "ConvTranspose(6, 4)",
                    "ConvTranspose(4, 4, 4, 2, 1)", "ConvTranspose(4, 2, bn=False)"],
        "batchnorm_eps": BN_EPS, "scheme": "ultralytics", "seed": SEED,
        "fused_vs_train_output": float((y_fused - y).abs().max() / y.abs().max()),
        "origin": "tests/data/generators/ultralytics_fuse.py: state_dict() before and after BaseModel.fuse()",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
