"""The main job on bundled data, as run by ``repnp demo`` (see README).

1. Our worked identity-kernel example (the identity branch of RepVGG, Ding et
   al., CVPR 2021, as a 3x3 kernel): a 3x3 kernel that returns its input.
2. A random (seeded) RepVGG-A0 and MobileOne-S0: re-parameterize, print the
   cost model's train-vs-deploy table (parameters, MACs, operators, memory
   traffic, peak activation memory) and the largest output difference on a
   random 1x3x224x224 image, judged by the project's tolerance rule for whole
   networks in float32 (``max|deploy - train| / max|train| <= 1e-4``).
"""

from __future__ import annotations

import time

import numpy as np

from repnp import cost, fusion, models, ops
from repnp.tolerance import NETWORK, relative_error

INPUT_SHAPE = (1, 3, 224, 224)


def _identity_example() -> bool:
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    kernel = fusion.identity_kernel(1, kernel_size=3)
    y = ops.conv2d(x, kernel, padding=1)
    print("Identity kernel (worked example): a 3x3 conv that returns its input (stride 1, padding 1)")
    print("X =\n", x[0, 0])
    print("W_identity =\n", kernel[0, 0])
    print("Y = conv2d(X, W_identity, padding=1) =\n", y[0, 0])
    exact = bool(np.array_equal(x, y))
    print(f"Y == X exactly: {exact}")
    return exact


def _network_example(name: str, x: np.ndarray) -> bool:
    train = models.create(name, seed=0)
    start = time.perf_counter()
    deploy = train.reparameterize()
    seconds = time.perf_counter() - start
    print(f"\n== {name}: random weights (seed=0), float32; reparameterized in {seconds:.2f} s ==")
    print(cost.compare(train, deploy, x.shape))
    y_train, y_deploy = train.forward(x), deploy.forward(x)
    diff = float(np.max(np.abs(y_deploy - y_train)))
    err = relative_error(y_deploy, y_train)
    ok = err <= NETWORK
    print(f"max |deploy - train| on a random {x.shape} image: {diff:.3g} "
          f"(relative {err:.2e}, tolerance {NETWORK:g}): {'OK' if ok else 'FAILED'}")
    return ok


def run() -> int:
    """Run the demo; return a process exit code (non-zero if any check fails)."""
    ok = _identity_example()
    x = np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)
    for name in ("repvgg_a0", "mobileone_s0"):
        ok = _network_example(name, x) and ok
    return 0 if ok else 1
