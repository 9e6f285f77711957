"""The state-dict side of issue 13 on real networks (NOT run in CI).

Two steps, two Pythons::

    /path/to/torch/python benchmarks/real_networks/state_dicts.py export --out /tmp/realnet/state
    python benchmarks/real_networks/state_dicts.py compare --out /tmp/realnet/state \
        --old /path/to/tree-before-issue-13 --new .

``export`` (torch, timm, torchvision, ultralytics) builds each network of
``export_networks.NETWORKS`` with random weights and randomised BNs (the same recipe), and
saves ``<name>.train.npz`` (its ``state_dict()``) and ``<name>.deploy.npz`` (the
``state_dict()`` after the framework's own reparameterization: timm ``reparameterize_model``,
ultralytics ``fuse()``; the model itself where there is none). ``compare`` runs each tree's
``repnp convert <name>.train.npz OUT`` (``--scheme ultralytics`` for ultralytics networks,
detected otherwise) and prints, per network: exit code, keys missing from / unexpected in OUT
against the deploy dict, and the largest ``max|a-b|/max|b|`` over the keys both have.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def export(out: Path) -> None:
    import numpy as np
    import torch
    sys.path.insert(0, str(HERE))
    from export_networks import NETWORKS, build

    out.mkdir(parents=True, exist_ok=True)
    for name in NETWORKS:
        model, deploy = build(name)
        for tag, m in (("train", model), ("deploy", deploy)):
            with torch.no_grad():
                arrays = {k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}
            np.savez(out / f"{name}.{tag}.npz", **arrays)
        print(name, len(model.state_dict()), "->", len(deploy.state_dict()), flush=True)


def _rel(a, b) -> float:
    import numpy as np
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(float(np.max(np.abs(b))), 1e-30))


def compare(out: Path, old: str, new: str) -> None:
    import numpy as np
    sys.path.insert(0, str(HERE))
    from export_networks import NETWORKS

    rows = {}
    for name, (fw, _, _) in NETWORKS.items():
        src = out / f"{name}.train.npz"
        if not src.exists():
            continue
        want = np.load(out / f"{name}.deploy.npz")
        for tag, tree in (("old", old), ("new", new)):
            dst = out / f"{name}.{tag}.npz"
            if dst.exists():
                dst.unlink()
            cmd = [sys.executable, "-m", "repnp", "convert", str(src), str(dst), "--force"]
            if fw == "ultralytics":
                cmd += ["--scheme", "ultralytics"]
            tree = str(Path(tree).resolve())
            p = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=tree), cwd=tree, capture_output=True, text=True)
            row = {"rc": p.returncode}
            if p.returncode:
                row["stderr"] = (p.stderr.strip().splitlines() or [""])[-1][:200]
            elif dst.exists():
                got = np.load(dst)
                a, b = set(got.files), set(want.files)
                row["missing"], row["unexpected"] = len(b - a), len(a - b)
                errs = [_rel(got[k], want[k]) for k in a & b
                        if want[k].size and want[k].dtype.kind == "f" and got[k].shape == want[k].shape]
                row["shape_mismatch"] = sum(got[k].shape != want[k].shape for k in a & b)
                row["err"] = max(errs) if errs else 0.0
                row["keys"] = f"{len(np.load(src).files)} -> {len(a)} (deploy {len(b)})"
            rows.setdefault(name, {})[tag] = row
            print(name, tag, row, flush=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["export", "compare"])
    ap.add_argument("--out", default="/tmp/realnet/state")
    ap.add_argument("--old", default="/work/wt-old")
    ap.add_argument("--new", default=".")
    args = ap.parse_args()
    export(Path(args.out)) if args.step == "export" else compare(Path(args.out), args.old, args.new)


if __name__ == "__main__":
    main()
