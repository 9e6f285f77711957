"""Convert the exports of ``export_networks.py`` with two repnp trees and tabulate (NOT run in CI).

Run with the project's Python (numpy, onnx, onnxruntime; no torch needed)::

    python benchmarks/real_networks/run_networks.py --exports /tmp/realnet \
        --old /path/to/tree-before-issue-13 --new . [--rounds 15] [--only yolov8n ...]

For every export listed in ``manifest.json`` (styles ``cf``, ``nocf``, ``dynamo``), each tree's
``python -m repnp convert IN OUT --json --force`` runs in a subprocess (``PYTHONPATH`` = the
tree). Then, for the input, the framework's deploy export and each written output:

* exit code (0 written, 1 check failed, 2 bad input, other = crash) and the last stderr line;
* ``Conv`` nodes (target: the deploy export's count), node count, ``Constant`` nodes left;
* ``err``: max|out - in| / max|in| over every graph output, from onnxruntime on one seeded
  input (the tolerance rule's metric, measured here, independent of repnp's own check);
* onnxruntime latency: single thread (``intra_op_num_threads = inter_op_num_threads = 1``),
  ``ORT_ENABLE_ALL``, all models of one export in interleaved rounds (order rotating),
  median per model; ``out/in`` ratios. The input is timed twice: ``in2/in`` is the row's noise.

Results go to ``results.json`` (``--results``) in ``--exports``; ``--table`` prints the markdown
table of every ``results*.json`` there, in the manifest's order. ``--retime`` measures the
outputs already converted again (e.g. once the machine is quiet), without converting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

STYLES = ("cf", "nocf", "dynamo")


def convert(tree: str, src: str, dst: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    t0 = time.time()
    try:
        # cwd = the tree: ``python -m`` puts the working directory first on sys.path, ahead of
        # PYTHONPATH, so run from anywhere else another tree's repnp could be imported.
        p = subprocess.run([sys.executable, "-m", "repnp", "convert", src, dst, "--json", "--force"],
                           env=env, capture_output=True, text=True, timeout=timeout, cwd=str(Path(tree).resolve()))
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "seconds": timeout}
    r = {"rc": p.returncode, "seconds": round(time.time() - t0, 1)}
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    if err:
        r["stderr"] = err[-1][:300]
    try:
        rep = json.loads(p.stdout)
        r["check_error"] = rep.get("max_error")
        r["messages"] = rep.get("messages", [])[:6]
    except (json.JSONDecodeError, AttributeError):
        pass
    return r


def inspect_all(args) -> None:
    """``repnp inspect IN`` of every export with each tree: exit code and last stderr line."""
    root = Path(args.exports)
    manifest = json.loads((root / "manifest.json").read_text())
    rows = {}
    for name, entry in manifest.items():
        for style in STYLES:
            ex = entry.get("exports", {}).get(style, {})
            if "path" not in ex or (args.only and name not in args.only):
                continue
            for tag, tree in (("old", args.old), ("new", args.new)):
                tree = str(Path(tree).resolve())
                p = subprocess.run([sys.executable, "-m", "repnp", "inspect", ex["path"]], cwd=tree,
                                   env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True)
                err = [ln for ln in p.stderr.splitlines() if ln.strip()]
                last = err[-1][:200] if err else ""
                rows.setdefault(f"{name}.{style}", {})[tag] = {"rc": p.returncode, "stderr": last}
            print(name, style, rows[f"{name}.{style}"], flush=True)
    (root / "inspect.json").write_text(json.dumps(rows, indent=1))


def stats(path: str) -> dict:
    g = onnx.load(path, load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    return {"nodes": len(ops), "convs": ops.count("Conv"), "constants": ops.count("Constant"),
            "bn": ops.count("BatchNormalization")}


def session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def rel_error(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return float("inf")
        if x.size == 0:
            continue
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            return float("inf")
        worst = max(worst, float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30)))
    return worst


def measure(models: dict, shape: list, rounds: int) -> dict:
    sess = {k: session(p) for k, p in models.items()}
    feeds = {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    for k, s in sess.items():
        feeds[k] = {s.get_inputs()[0].name: x}
    outs = {k: s.run(None, feeds[k]) for k, s in sess.items()}
    errs = {k: rel_error(outs[k], outs["in"]) for k in sess if k != "in"}
    keys = list(sess) + ["in2"]
    times = {k: [] for k in keys}
    for r in range(rounds + 2):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            s = sess["in" if k == "in2" else k]
            f = feeds["in" if k == "in2" else k]
            t0 = time.perf_counter()
            s.run(None, f)
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"errors": errs, "ms": med}


def run(args) -> None:
    root = Path(args.exports)
    manifest = json.loads((root / "manifest.json").read_text())
    rpath = root / args.results
    results = json.loads(rpath.read_text()) if rpath.exists() else {}
    for name, entry in manifest.items():
        if args.only and name not in args.only:
            continue
        exports = entry.get("exports", {})
        deploy = exports.get("deploy", {})
        for style in STYLES:
            ex = exports.get(style)
            if not ex:
                continue
            key = f"{name}.{style}"
            if args.retime:
                row = results.get(key)
                if row and "in" in row:
                    models = {"in": ex["path"]}
                    if "path" in deploy:
                        models["deploy"] = deploy["path"]
                    models |= {t: str(root / f"{key}.{t}.onnx") for t in ("old", "new") if "convs" in row.get(t, {})}
                    row.update(measure(models, entry["input_shape"], args.rounds))
                    row["ms"] = row.pop("ms")
                    row["errors"] = row.pop("errors")
                    print(key, row["ms"], flush=True)
                    rpath.write_text(json.dumps(results, indent=1))
                continue
            row = {"net": name, "style": style, "deploy_convs": deploy.get("convs")}
            if "error" in ex:
                row["export_error"] = ex["error"]
                results[key] = row
                continue
            src = ex["path"]
            before = results.get(key, {})
            row["in"] = stats(src)
            models = {"in": src}
            if "path" in deploy:
                models["deploy"] = deploy["path"]
            for tag, tree in (("old", args.old), ("new", args.new)):
                dst = str(root / f"{name}.{style}.{tag}.onnx")
                if tag in args.keep and "rc" in before.get(tag, {}):     # converted by an earlier run
                    row[tag] = before[tag]
                    if os.path.exists(dst):
                        models[tag] = dst
                    continue
                if os.path.exists(dst):
                    os.unlink(dst)
                row[tag] = convert(tree, src, dst, args.timeout)
                if os.path.exists(dst):
                    row[tag].update(stats(dst))
                    models[tag] = dst
                print(key, tag, {k: v for k, v in row[tag].items() if k != "messages"}, flush=True)
            try:
                m = measure(models, entry["input_shape"], args.rounds)
                row["errors"], row["ms"] = m["errors"], m["ms"]
            except Exception as e:  # recorded: an output onnxruntime cannot load is a finding
                row["measure_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(key, row.get("errors"), row.get("ms"), row.get("measure_error", ""), flush=True)
            results[key] = row
            rpath.write_text(json.dumps(results, indent=1))


def _fmt_err(e):
    return "—" if e is None else ("inf" if e == float("inf") else f"{e:.1e}")


def table(root: Path) -> str:
    results = {}
    for path in sorted(root.glob("results*.json")):  # several runs may have covered parts of the list
        results |= json.loads(path.read_text())
    manifest = json.loads((root / "manifest.json").read_text())
    order = {f"{n}.{s}": i for i, (n, s) in enumerate((n, s) for n in manifest for s in STYLES)}
    results = dict(sorted(results.items(), key=lambda kv: order.get(kv[0], len(order))))
    lines = ["| network | export | deploy Conv | in: nodes / Conv / Constant "
             "| before: rc, Conv, nodes, Const, err, out/in | after: rc, Conv, nodes, Const, err, out/in "
             "| deploy/in | in2/in |",
             "| --- | --- | ---: | --- | --- | --- | ---: | ---: |"]
    for r in results.values():
        if "export_error" in r:
            lines.append(f"| {r['net']} | {r['style']} | {r['deploy_convs']} | export failed: "
                         f"{r['export_error'][:60]} | | | | |")
            continue
        ms, errs = r.get("ms", {}), r.get("errors", {})

        def cell(tag, r=r, ms=ms, errs=errs):
            c = r.get(tag, {})
            if "convs" not in c:
                return f"**{c.get('rc')}** {c.get('stderr', '')[:90]}"
            ratio = f"{ms[tag] / ms['in']:.3f}" if tag in ms and "in" in ms else "—"
            return (f"{c['rc']}, {c['convs']}, {c['nodes']}, {c['constants']}, "
                    f"{_fmt_err(errs.get(tag))}, {ratio}")
        i = r["in"]
        dep = f"{ms['deploy'] / ms['in']:.3f}" if "deploy" in ms else "—"
        noise = f"{ms['in2'] / ms['in']:.3f}" if "in2" in ms else "—"
        lines.append(f"| {r['net']} | {r['style']} | {r['deploy_convs']} | {i['nodes']} / {i['convs']} / "
                     f"{i['constants']} | {cell('old')} | {cell('new')} | {dep} | {noise} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exports", default="/tmp/realnet")
    ap.add_argument("--old", default="/work/wt-old")
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--results", default="results.json", help="file in --exports to add the rows to")
    ap.add_argument("--keep", nargs="*", default=[], choices=["old", "new"],
                    help="reuse the conversions of these trees recorded in --results instead of converting again")
    ap.add_argument("--retime", action="store_true",
                    help="only time again (and re-check) the outputs already in results.json")
    ap.add_argument("--inspect", action="store_true", help="only run `repnp inspect` of every export, both trees")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of results.json")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.exports)))
    elif args.inspect:
        inspect_all(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
