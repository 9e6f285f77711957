"""Benchmark: NumPy forward time of whole networks, train form vs deploy form, beside the cost model.

Run from the repository root::

    python benchmarks/bench_models.py                 # RepVGG-A0 and MobileOne-S0, 1x3x224x224
    python benchmarks/bench_models.py --models repvgg_a0 mobilenet_v2 --repeats 10
    python benchmarks/bench_models.py --threads 0     # leave BLAS on its default thread count

For each network (random weights, seed 0, float32, batch 1, 224x224) it prints

* the best-of-N (minimum) wall time of ``forward`` for the train form and the deploy form,
  interleaved (train, deploy, train, ...) so that machine load affects both alike, and their
  ratio train/deploy;
* the cost model's figures as ratios train/deploy (:mod:`repnp.cost`): MACs, memory traffic,
  operator count;
* a predicted time ratio from those figures with a per-operator roofline,
  ``t_op = max(MACs / R, traffic / B) + L``, where R (multiply-accumulates per second of a large
  float32 ``matmul``), B (bytes per second of a large ``np.copyto``, read + write) and L (wall
  time of a NumPy op on a tiny array, the per-operator overhead) are measured on this machine
  first. The roofline is a model for explaining the measured ratio, not a target.

BLAS threads: ``--threads 1`` (the default) sets ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` before NumPy is imported. On a shared 2-core machine a multi-threaded BLAS
that loses a core spin-waits: the same forward then varied by more than 10x between runs
(measured), which no ratio survives; one thread gives repeatable figures.

This is a script, not a test: nothing here is timed in the pytest suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["repvgg_a0", "mobileone_s0"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per form (the minimum is kept)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads, set before NumPy is imported (0: BLAS's default)")
    return parser.parse_args(argv)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_constants(repeats: int = 5) -> dict[str, float]:
    """R (MAC/s), B (bytes/s) and L (s per op), measured on this machine."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    mac_rate = 1024**3 / _best(lambda: a @ b, repeats)
    src = np.ones(16 * 2**20, dtype=np.float32)      # 64 MiB, well beyond the caches
    dst = np.empty_like(src)
    bandwidth = 2 * src.nbytes / _best(lambda: np.copyto(dst, src), repeats)
    tiny = np.ones((1, 1, 1, 1), dtype=np.float32)
    overhead = _best(lambda: ops.relu(tiny), 200)
    return {"R": mac_rate, "B": bandwidth, "L": overhead}


def predicted_seconds(profile: cost.Profile, k: dict[str, float]) -> float:
    return sum(max(c.op.macs / k["R"], c.traffic / k["B"]) + k["L"] for c in profile.ops)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        if "numpy" in sys.modules:
            print("warning: numpy was imported before --threads could take effect", file=sys.stderr)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    global np, cost, models, ops
    # Imported only now, after the thread variables are set (BLAS reads them once, at load time).
    import numpy as np

    from repnp import cost, models, ops

    k = machine_constants()
    print(f"BLAS threads: {args.threads if args.threads > 0 else 'default'}")
    print(f"machine: R = {k['R'] / 1e9:.1f} GMAC/s (float32 matmul 1024^3), "
          f"B = {k['B'] / 1e9:.1f} GB/s (copy, read + write), L = {k['L'] * 1e6:.1f} us per op")
    shape = (1, 3, args.size, args.size)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    header = (f"{'network':<14} {'train ms':>9} {'deploy ms':>10} {'measured':>9} | {'MACs':>6} "
              f"{'traffic':>8} {'ops':>6} {'roofline':>9}")
    rows = []
    for name in args.models:
        train = models.create(name, seed=0)
        deploy = train.reparameterize()
        train.forward(x), deploy.forward(x)                       # warm-up (allocations, BLAS threads)
        t_train = t_deploy = float("inf")
        for _ in range(args.repeats):                             # interleaved rounds
            t_train = min(t_train, _best(partial(train.forward, x), 1))
            t_deploy = min(t_deploy, _best(partial(deploy.forward, x), 1))
        cmp = cost.compare(train, deploy, shape)
        p_t, p_d = cmp.train, cmp.deploy
        roof = predicted_seconds(p_t, k) / predicted_seconds(p_d, k)
        rows.append(f"{name:<14} {t_train * 1e3:>9.1f} {t_deploy * 1e3:>10.1f} {t_train / t_deploy:>8.2f}x | "
                    f"{p_t.macs / p_d.macs:>5.2f}x {p_t.traffic_bytes / p_d.traffic_bytes:>7.2f}x "
                    f"{p_t.op_count / p_d.op_count:>5.2f}x {roof:>8.2f}x")
    print(f"input {shape}, float32, best of {args.repeats}; ratios are train / deploy")
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
