"""Benchmark: NumPy forward of whole networks (train and deploy form) against onnxruntime, per op type.

Run from the repository root::

    python benchmarks/bench_models.py                 # repvgg_a0, mobileone_s0, mobilenet_v2, 1 thread
    python benchmarks/bench_models.py --threads 2     # BLAS, repnp's fill pool and ORT all on 2 threads
    python benchmarks/bench_models.py --models mobilenet_v2 --rounds 21 --ops
    python benchmarks/bench_models.py --no-ort        # without onnxruntime: the train/deploy table only

For each network (random weights, seed 0, float32, batch 1, 224x224) it prints, in one table:

* ``train ms`` / ``deploy ms``: repnp's ``forward`` of the train form and of the deploy form;
* ``ort ms``: onnxruntime on the deploy form exported by :func:`repnp.io.export_onnx` (BN folded
  by the exporter, ORT's default graph optimizations, ``intra_op_num_threads`` = ``--threads``,
  ``inter_op_num_threads`` = 1), and ``deploy/ort``, the ratio issue 15 sets at <= 2.0;
* the cost model's train/deploy ratios (:mod:`repnp.cost`: MACs, memory traffic, operator count)
  beside the measured ``train/deploy``.

Every column is the minimum over ``--rounds`` interleaved rounds (train, deploy, ort, train, ...):
machine load then hits all three alike, and the minimum is the least noisy estimate on a shared
machine. With ``--ops`` it also prints, per network, the time of each op type (convs split into
dense KxK, depthwise and pointwise, by stride) for repnp's deploy form and for onnxruntime (from
ORT's own profiler), each op's minimum over the rounds summed per type, beside a per-op roofline
``max(MACs / R, bytes / B)``: R (multiply-accumulates per second of a large float32 ``matmul``) and
B (bytes per second of a large ``np.copyto``, read + write) measured on this machine first, bytes
counted as the op's input activations + weights + output written once. The roofline says what
the op type could cost at best, the columns say where the time goes.

Threads: ``--threads N`` sets ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
before NumPy is imported and ORT's ``intra_op_num_threads``: both compared at the same thread
count. With more than one thread it also sets ``OPENBLAS_THREAD_TIMEOUT=4`` (unless set): OpenBLAS's
idle workers then sleep at once instead of spinning, and stop taking the cores that ORT's
threads need right after a NumPy GEMM in the same process (without it, ORT's two-thread times
measured here were up to 1.3x its one-thread times).

This is a script, not a test: nothing here is timed in the pytest suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

DEFAULT_MODELS = ["repvgg_a0", "mobileone_s0", "mobilenet_v2"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--rounds", "--repeats", type=int, default=9, dest="rounds",
                        help="interleaved timed rounds (the minimum is kept)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for BLAS and onnxruntime (0: BLAS's default, ORT's default)")
    parser.add_argument("--ops", action="store_true", help="also print the per-op-type breakdown")
    parser.add_argument("--no-ort", action="store_true", help="skip onnxruntime")
    return parser.parse_args(argv)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine_constants(repeats: int = 5) -> dict[str, float]:
    """R (MAC/s of a float32 matmul) and B (bytes/s of a copy), measured on this machine."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    mac_rate = 1024**3 / min(_seconds(lambda: a @ b) for _ in range(repeats))
    src = np.ones(16 * 2**20, dtype=np.float32)      # 64 MiB, well beyond the caches
    dst = np.empty_like(src)
    bandwidth = 2 * src.nbytes / min(_seconds(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return {"R": mac_rate, "B": bandwidth}


# ----------------------------------------------------------------------------
# per-op-type accounting
# ----------------------------------------------------------------------------

def conv_kind(weight_shape, group: int, stride) -> str:
    """``dense 3x3 s1``, ``dw 3x3 s2``, ``pw 1x1 s1`` ... from a Conv's weight shape (OIHW)."""
    o, cg, kh, kw = weight_shape
    s = max(stride)
    if group > 1 and cg == 1:
        return f"Conv dw {kh}x{kw} s{s}"
    if (kh, kw) == (1, 1):
        return f"Conv pw 1x1 s{s}" + (f" g{group}" if group > 1 else "")
    return f"Conv dense {kh}x{kw} s{s}" + (f" g{group}" if group > 1 else "")


class OpTimer:
    """Records wall time, MACs and bytes of every op call of a repnp forward, in call order.

    Wraps :func:`repnp.ops.conv2d` (every Conv, with the activation ``run`` fuses into it, as
    ORT's profile counts its fused convs) and :func:`repnp.dataflow.evaluate` for the other
    nodes. What ``run`` does in place without either (a Relu or an Add overwriting its input)
    and the interpreter itself are the row ``rest (run, in place)``.
    """

    def __init__(self):
        self.calls = []                      # (kind, seconds, MACs, bytes)
        self._evaluate, self._conv = dataflow.evaluate, ops.conv2d

    def __enter__(self):
        def conv(x, weight, bias=None, **kw):
            start = time.perf_counter()
            out = self._conv(x, weight, bias, **kw)
            elapsed = time.perf_counter() - start
            kind = conv_kind(weight.shape, kw.get("groups", 1), kw.get("stride", [1, 1]))
            if kw.get("activation"):
                kind += " +act"
            nbytes = x.nbytes + weight.nbytes + out.nbytes + (0 if bias is None else bias.nbytes)
            self.calls.append((kind, elapsed, out.size * int(np.prod(weight.shape[1:])), nbytes))
            return out

        def evaluate(node, args):
            if node.op == "Conv":
                return self._evaluate(node, args)
            start = time.perf_counter()
            out = self._evaluate(node, args)
            macs = out.shape[0] * args[1].size if node.op == "Gemm" else 0
            self.calls.append((node.op, time.perf_counter() - start, macs,
                               sum(a.nbytes for a in args) + out.nbytes))
            return out
        dataflow.evaluate, ops.conv2d = evaluate, conv
        return self

    def __exit__(self, *exc):
        dataflow.evaluate, ops.conv2d = self._evaluate, self._conv


def ort_session(path: Path, threads: int, *, profile: bool = False):
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_op_times(path: Path, x, threads: int, rounds: int) -> dict[str, float]:
    """Seconds per op kind from ORT's profiler: each node's minimum over the runs, summed per kind.

    ORT's optimized graph fuses Conv + activation (``FusedConv``, or its NCHWc Conv with an
    ``activation`` attribute): those count as ``+act`` convs.
    """
    sess = ort_session(path, threads, profile=True)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})                                # warm-up, left out below
    for _ in range(rounds):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    warm_end = runs[0]["ts"] + runs[0]["dur"]
    best: dict[str, tuple[str, float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] <= warm_end:
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        node = e["name"][:-len("_kernel_time")]
        if op in ("Conv", "FusedConv"):
            shapes = [list(d.values())[0] for d in args.get("input_type_shape", [])]
            attrs = _conv_attrs.get(node, {})
            kind = conv_kind(shapes[1], attrs.get("group", 1), attrs.get("strides", [1, 1]))
            if op == "FusedConv" or "activation" in attrs:
                kind += " +act"
        else:
            kind = op
        dur = e["dur"] * 1e-6
        if node not in best or dur < best[node][1]:
            best[node] = (kind, dur)
    times = defaultdict(float)
    for kind, dur in best.values():
        times[kind] += dur
    return dict(times)


_conv_attrs: dict[str, dict] = {}


def _remember_conv_attrs(path: Path, threads: int) -> None:
    """Node names and Conv attributes of ORT's optimized graph (its profile names nodes, not groups)."""
    opt_path = path.with_name(path.stem + "_opt.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(opt_path)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for node in onnx.load(str(opt_path)).graph.node:
        if node.op_type in ("Conv", "FusedConv"):
            _conv_attrs[node.name] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ----------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        if "numpy" in sys.modules:
            print("warning: numpy was imported before --threads could take effect", file=sys.stderr)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        if args.threads > 1:
            os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    global np, cost, models, ops, dataflow, ort, onnx
    # Imported only now, after the thread variables are set (BLAS reads them once, at load time).
    import numpy as np

    from repnp import cost, dataflow, models, ops
    from repnp.io import export_onnx
    if not args.no_ort:
        import onnx
        import onnxruntime as ort

    k = machine_constants()
    print(f"threads: {args.threads if args.threads > 0 else 'default'} (BLAS, onnxruntime"
          f"{' ' + ort.__version__ if not args.no_ort else ''}); numpy {np.__version__}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"machine: R = {k['R'] / 1e9:.1f} GMAC/s (float32 matmul 1024^3), "
          f"B = {k['B'] / 1e9:.1f} GB/s (copy, read + write)")
    shape = (1, 3, args.size, args.size)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    header = (f"{'network':<14} {'train ms':>9} {'deploy ms':>10} {'ort ms':>8} {'deploy/ort':>10} "
              f"{'train/ort':>9} {'train/deploy':>12} | {'MACs':>6} {'traffic':>8} {'ops':>6}")
    rows, breakdowns = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            train = models.create(name, seed=0)
            deploy = train.reparameterize()
            fns = [partial(train.forward, x), partial(deploy.forward, x)]
            if not args.no_ort:
                path = export_onnx(deploy, Path(tmp) / f"{name}.onnx", fold_bn=True, input_shape=shape)
                sess = ort_session(path, args.threads)
                in_name = sess.get_inputs()[0].name
                fns.append(partial(sess.run, None, {in_name: x}))
                ref = sess.run(None, {in_name: x})[0]
                err = float(np.max(np.abs(deploy.forward(x) - ref)) / np.max(np.abs(ref)))
                if err > 1e-4:
                    print(f"warning: {name}: repnp vs onnxruntime relative error {err:.1e}", file=sys.stderr)
            for fn in fns:                                        # warm-up (allocations, threads)
                fn()
            best = [float("inf")] * len(fns)
            for _ in range(args.rounds):                          # interleaved rounds
                for i, fn in enumerate(fns):
                    best[i] = min(best[i], _seconds(fn))
            t_train, t_deploy = best[:2]
            t_ort = best[2] if len(best) > 2 else float("nan")
            cmp = cost.compare(train, deploy, shape)
            p_t, p_d = cmp.train, cmp.deploy
            rows.append(f"{name:<14} {t_train * 1e3:>9.1f} {t_deploy * 1e3:>10.1f} {t_ort * 1e3:>8.1f} "
                        f"{t_deploy / t_ort:>9.2f}x {t_train / t_ort:>8.2f}x {t_train / t_deploy:>11.2f}x | "
                        f"{p_t.macs / p_d.macs:>5.2f}x {p_t.traffic_bytes / p_d.traffic_bytes:>7.2f}x "
                        f"{p_t.op_count / p_d.op_count:>5.2f}x")
            if args.ops:
                breakdowns.append(_breakdown(name, deploy, x, path if not args.no_ort else None, args, k))
    print(f"input {shape}, float32, minimum of {args.rounds} interleaved rounds; the cost-model "
          f"columns are train / deploy")
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    for text in breakdowns:
        print()
        print(text)
    return 0


def _breakdown(name, deploy, x, path, args, k) -> str:
    # Each op call's minimum over the rounds (the calls come in the same order every time),
    # summed per kind: steadier on a loaded machine than the ops of the single fastest forward.
    best_total, best_calls = float("inf"), None
    for _ in range(args.rounds):
        with OpTimer() as timer:
            best_total = min(best_total, _seconds(lambda: deploy.forward(x)))
        if best_calls is None:
            best_calls = list(timer.calls)
        else:
            best_calls = [c if c[1] <= t[1] else t for c, t in zip(best_calls, timer.calls)]
    times, costs = defaultdict(float), {}
    for kind, seconds, macs, nbytes in best_calls:
        times[kind] += seconds
        m, b, c = costs.get(kind, (0, 0, 0))
        costs[kind] = (m + macs, b + nbytes, c + 1)
    best = argparse.Namespace(times=times, costs=costs)
    ort_times = {}
    if path is not None:
        _remember_conv_attrs(path, args.threads)
        ort_times = ort_op_times(path, x, args.threads, args.rounds)
    kinds = sorted(set(best.times) | set(ort_times), key=lambda s: -best.times.get(s, 0.0))
    lines = [f"{name} (deploy form): time per op type, each op's minimum over {args.rounds} runs; ORT's "
             f"+act Conv rows are its fused convs",
             f"{'op type':<22} {'n':>3} {'repnp ms':>9} {'ort ms':>8} {'repnp/ort':>9} {'roofline ms':>11} "
             f"{'repnp/roof':>10}"]
    for kind in kinds:
        t = best.times.get(kind, 0.0)
        macs, nbytes, count = best.costs.get(kind, (0, 0, 0))
        roof = max(macs / k["R"], nbytes / k["B"])
        o = ort_times.get(kind, float("nan"))
        lines.append(f"{kind:<22} {count:>3} {t * 1e3:>9.2f} {o * 1e3:>8.2f} "
                     f"{(t / o if o > 0 else float('nan')):>9.2f} {roof * 1e3:>11.2f} "
                     f"{(t / roof if roof > 0 else float('nan')):>10.2f}")
    rest = best_total - sum(best.times.values())
    lines.append(f"{'rest (run, in place)':<22} {'':>3} {rest * 1e3:>9.2f}")
    t_sum = best_total
    o_sum = sum(ort_times.values()) if ort_times else float("nan")
    lines.append(f"{'forward / ort ops':<22} {'':>3} {t_sum * 1e3:>9.2f} {o_sum * 1e3:>8.2f} {t_sum / o_sum:>9.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
