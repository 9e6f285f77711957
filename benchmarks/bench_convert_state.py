"""Benchmark: :func:`repnp.io.convert_state` on whole networks laid out in timm's names.

Run from the repository root::

    python benchmarks/bench_convert_state.py                 # repvgg_a0 and mobileone_s0, 7 rounds
    python benchmarks/bench_convert_state.py --repeats 15 --check
    python benchmarks/bench_convert_state.py --blocks 250 500 1000 2000   # scaling with the block count

The training-form parameters come from :mod:`repnp.models` (random, seeded) in
float32 and are renamed to the layout of timm's ``byobnet`` models (``stem.``,
``stages.<i>.<j>.``, BN ``weight / bias / running_mean / running_var /
num_batches_tracked``, MobileOne units as two consecutive blocks), as
``tests/test_io_state_networks.py`` does. Printed: the minimum wall time over
the rounds of ``convert_state(state, check=False)`` and, with ``--check``, of
``convert_state(state)`` with its numeric check. This is a script, not a test.

``--blocks N ...`` instead times synthetic timm MobileOne states of N blocks
(``blocks.<n>.``: two 3x3 conv-BN, a 1x1 scale conv-BN and an identity BN, 2
channels, 19 keys a block) through ``save`` -> ``load_state`` ->
``convert_state`` -> ``save_state`` (the CLI's path) and prints the time per
block at each N: linear work gives a flat column.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from functools import partial

import numpy as np

from repnp import models
from repnp.io import convert_state, load_state, save_state

BN_NAMES = {"mean": "running_mean", "var": "running_var", "gamma": "weight", "beta": "bias"}


def timm_name(key: str) -> str:
    key = re.sub(r"^stage0\.", "stem.", key)
    key = re.sub(r"^stage(\d+)\.(\d+)\.(dw|pw)\.",
                 lambda m: f"stages.{int(m[1]) - 1}.{2 * int(m[2]) + (m[3] == 'pw')}.", key)
    key = re.sub(r"^stage(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.", key)
    key = key.replace(".skip.", ".identity.")
    return re.sub(r"^linear\.", "head.fc.", key)


def timm_train_state(name: str) -> dict:
    net = models.create(name, num_classes=1000, seed=0, dtype=np.float32)
    out = {}
    for key, value in net.params().items():
        module, leaf = key.rsplit(".", 1)
        if leaf in BN_NAMES:
            out[timm_name(f"{module}.{BN_NAMES[leaf]}")] = value
            if leaf == "beta":
                out[timm_name(f"{module}.num_batches_tracked")] = np.array(5000, dtype=np.int64)
        else:
            out[timm_name(key)] = value
    return out


def mobileone_state(blocks: int, channels: int = 2) -> dict:
    """timm MobileOneBlocks ``blocks.<n>.`` with tiny random tensors (19 keys a block)."""
    rng = np.random.default_rng(0)
    out = {}

    def bn(prefix):
        out[f"{prefix}.weight"] = (rng.random(channels) + 0.5).astype(np.float32)
        out[f"{prefix}.bias"] = rng.standard_normal(channels).astype(np.float32)
        out[f"{prefix}.running_mean"] = rng.standard_normal(channels).astype(np.float32)
        out[f"{prefix}.running_var"] = (rng.random(channels) + 0.5).astype(np.float32)

    for n in range(blocks):
        for i in range(2):
            out[f"blocks.{n}.conv_kxk.{i}.conv.weight"] = rng.standard_normal(
                (channels, channels, 3, 3)).astype(np.float32)
            bn(f"blocks.{n}.conv_kxk.{i}.bn")
        out[f"blocks.{n}.conv_scale.conv.weight"] = rng.standard_normal((channels, channels, 1, 1)).astype(np.float32)
        bn(f"blocks.{n}.conv_scale.bn")
        bn(f"blocks.{n}.identity")
    return out


def scaling(counts, repeats: int) -> None:
    """Time per block of load + convert (with its check) + save, for each block count."""
    print(f"{'blocks':>6s} {'keys':>6s} {'load ms/blk':>11s} {'convert ms/blk':>14s} {'save ms/blk':>11s} "
          f"{'total ms/blk':>12s}")
    with tempfile.TemporaryDirectory() as folder:
        for n in counts:
            src, dst = f"{folder}/in{n}.npz", f"{folder}/out{n}.npz"
            np.savez(src, **mobileone_state(n))
            state = load_state(src)
            out, _ = convert_state(state)
            load = best_time(partial(load_state, src), repeats)
            conv = best_time(partial(convert_state, state), repeats)
            save = best_time(partial(save_state, out, dst, force=True), repeats)
            ms = [t * 1e3 / n for t in (load, conv, save)]
            print(f"{n:6d} {len(state):6d} {ms[0]:11.3f} {ms[1]:14.3f} {ms[2]:11.3f} {sum(ms):12.3f}")


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["repvgg_a0", "mobileone_s0"])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (the minimum is kept)")
    parser.add_argument("--check", action="store_true", help="also time convert_state with its check")
    parser.add_argument("--blocks", nargs="+", type=int, metavar="N",
                        help="time synthetic MobileOne states of N blocks instead (per block, each N)")
    args = parser.parse_args(argv)
    if args.blocks:
        scaling(args.blocks, args.repeats)
        return
    for name in args.models:
        state = timm_train_state(name)
        try:                               # the converter before issue 11 had no check= keyword
            convert_state(state, check=False)
            plain = partial(convert_state, state, check=False)
        except TypeError:
            plain = partial(convert_state, state)
        plain()                                                     # warm-up
        line = f"{name:14s} keys {len(state):5d}  convert(check=False) {best_time(plain, args.repeats) * 1e3:8.1f} ms"
        if args.check:
            line += f"  convert(check=True) {best_time(partial(convert_state, state), args.repeats) * 1e3:8.1f} ms"
        print(line)


if __name__ == "__main__":
    main()
