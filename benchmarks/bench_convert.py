"""Benchmark: the ONNX converter on a RepVGG-A0-sized model (issue 6, "Performance").

Run from the repository root::

    python benchmarks/bench_convert.py                  # both exporter styles, 5 rounds
    python benchmarks/bench_convert.py --styles keepbn --repeats 3 --profile

For RepVGG-A0 (random weights, seed 0, 1000 classes) exported with
:func:`repnp.io.export_onnx` at 1x3x224x224, in each exporter style (``keepbn``:
every BN a node; ``folded``: BN folded into the convs, as PyTorch's constant
folding does), it prints:

* ``io s``: minimum wall time of ``onnx.load`` + ``onnx.save`` of the file (the baseline);
* ``convert s``: minimum wall time of :func:`repnp.io.convert_onnx` from the path with
  ``check=False`` (reading the file included); ``atomic write s``: writing the result with
  ``save_onnx`` (piecewise serialization, temp file, ``fsync``, rename); ``onnx.save s``:
  writing it with plain
  ``onnx.save`` (what the baseline does); ``(conv+atomic)/io`` and ``(conv+save)/io``: the
  ratios to the baseline (target <= 2);
* ``check s``: minimum wall time of the numeric check alone (``compare_models`` of the two
  models, onnxruntime, one seeded 1x3x224x224 input), reported separately;
* ``RSS/file``: peak resident memory of the conversion (load, convert, save; no check) above the
  interpreter's after its imports, divided by the file size (target <= 3), measured in a fresh
  subprocess (``VmHWM`` of ``/proc/self/status``, else ``resource.getrusage(RUSAGE_SELF).ru_maxrss``:
  Linux carries ``ru_maxrss`` over ``exec``, so a child of this big process would report our
  peak; ``VmHWM`` belongs to the new address space); beside it the same figure for
  ``onnx.load`` plus ``numpy_helper.to_array`` of every initializer (the floor the issue quotes
  as "about 3x");
* onnxruntime inference (one thread, 1x3x224x224, minimum over interleaved rounds) of the
  train-form model and the converted one, with graph optimizations disabled (the graphs as
  written) and at ORT's default level (which itself folds Conv+BN but does not merge branches),
  and the speedups train/converted.

``--profile`` runs the conversion once under ``cProfile`` and prints the top functions by
cumulative time. This is a script, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))

_RSS_SCRIPT = r"""
import resource, sys
import numpy as np, onnx
from onnx import numpy_helper
import repnp.io.onnx.convert, repnp.io.onnx.write, repnp.io.onnx.graph, repnp.io.onnx.check

def peak_kib():
    # VmHWM (the peak RSS of this address space, reset by exec) where /proc has it: Linux keeps
    # ru_maxrss across exec, so a child of a big parent would report the parent's peak.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

mode, src, dst = sys.argv[1:4]
base = peak_kib()
if mode == "convert":
    from repnp.io.onnx.convert import convert_onnx
    from repnp.io.onnx.write import save_onnx
    model, _ = convert_onnx(src, check=False)
    save_onnx(model, dst, force=True)
else:
    m = onnx.load(src)
    arrays = [numpy_helper.to_array(t) for t in m.graph.initializer]
peak = peak_kib()
print((peak - base) * 1024)   # KiB on Linux
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--styles", nargs="+", default=["keepbn", "folded"], choices=["keepbn", "folded"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the minimum is kept)")
    parser.add_argument("--ort-repeats", type=int, default=20, help="timed onnxruntime runs per model")
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--profile", action="store_true", help="cProfile one conversion")
    return parser.parse_args(argv)


def _io_round(src: str, copy: str) -> None:
    """The baseline: read a model and write it back with plain onnx."""
    onnx.save(onnx.load(src), copy)


def _timed(fn):
    """``(fn(), wall seconds)``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _peak_rss(mode: str, src: str, dst: str) -> int:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode, src, dst], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _ort_times(paths: dict, level, repeats: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for s in sessions.values():       # warm-up
        s.run(None, {"input": x})
    best = {k: float("inf") for k in sessions}
    for _ in range(repeats):          # interleaved, so that machine load hits both alike
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"input": x})
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    from repnp import models
    from repnp.io.onnx.check import compare_models
    from repnp.io.onnx.convert import convert_onnx
    from repnp.io.onnx.export import export_onnx
    from repnp.io.onnx.graph import load_model
    from repnp.io.onnx.write import save_onnx
    from repnp.tolerance import NETWORK

    net = models.create(args.model)
    rows, ort_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for style in args.styles:
            src = os.path.join(tmp, f"{style}.onnx")
            dst = os.path.join(tmp, f"{style}_fused.onnx")
            copy = os.path.join(tmp, f"{style}_copy.onnx")
            export_onnx(net, src, fold_bn=style == "folded", input_shape=(1, 3, 224, 224))
            size = os.path.getsize(src)

            t_io = t_conv = t_atomic = t_save = t_check = float("inf")
            for _ in range(args.repeats):          # interleaved, so that machine load hits all alike
                t_io = min(t_io, _timed(partial(_io_round, src, copy))[1])
                (model, _), t = _timed(partial(convert_onnx, src, check=False))
                t_conv = min(t_conv, t)
                t_atomic = min(t_atomic, _timed(partial(save_onnx, model, dst, force=True))[1])
                t_save = min(t_save, _timed(partial(onnx.save, model, copy))[1])
                del model
            original, fused = load_model(src), load_model(dst)
            for _ in range(max(1, args.repeats // 2)):
                res, t = _timed(partial(compare_models, original, fused, tol=NETWORK))
                t_check = min(t_check, t)
            rss_conv = _peak_rss("convert", src, dst)
            rss_load = _peak_rss("load", src, dst)
            nodes = (len(original.graph.node), len(fused.graph.node))
            rows.append((style, size, nodes, t_io, t_conv, t_atomic, t_save, t_check, res.max_error, rss_conv,
                         rss_load))
            paths = {"train": src, "converted": dst}
            plain = _ort_times(paths, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, args.ort_repeats)
            full = _ort_times(paths, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, args.ort_repeats)
            ort_rows.append((style, plain, full))
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                save_onnx(convert_onnx(src, check=False)[0], dst, force=True)
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
                print(f"--- cProfile, {style} ---")
                print(buf.getvalue())

    print(f"{args.model} at 1x3x224x224 (onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"python {sys.version.split()[0]})")
    head = ("style", "file MB", "nodes", "io s", "convert s", "atomic write s", "onnx.save s",
            "(conv+atomic)/io", "(conv+save)/io", "check s", "check err", "RSS/file", "load RSS/file")
    lines = [head]
    for style, size, nodes, t_io, t_conv, t_atomic, t_save, t_check, err, rss_c, rss_l in rows:
        lines.append((style, f"{size / 2**20:.1f}", f"{nodes[0]} -> {nodes[1]}", f"{t_io:.3f}", f"{t_conv:.3f}",
                      f"{t_atomic:.3f}", f"{t_save:.3f}", f"{(t_conv + t_atomic) / t_io:.2f}x",
                      f"{(t_conv + t_save) / t_io:.2f}x", f"{t_check:.3f}", f"{err:.2g}", f"{rss_c / size:.2f}x",
                      f"{rss_l / size:.2f}x"))
    _print_table(lines)
    print()
    lines = [("style", "ORT opt", "train ms", "converted ms", "speedup")]
    for style, plain, full in ort_rows:
        for name, t in (("disabled", plain), ("default", full)):
            lines.append((style, name, f"{1e3 * t['train']:.2f}", f"{1e3 * t['converted']:.2f}",
                          f"{t['train'] / t['converted']:.2f}x"))
    _print_table(lines)
    print("\ntargets: convert/io <= 2 (no check), RSS/file <= 3")
    return 0


def _print_table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


if __name__ == "__main__":
    sys.exit(main())
