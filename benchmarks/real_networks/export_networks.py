"""Export the 19 networks of issue 13 to ONNX, for ``run_networks.py`` (needs torch, NOT run in CI).

Run with a Python that has torch, torchvision, timm, ultralytics, onnx and onnxscript::

    /path/to/torch/python benchmarks/real_networks/export_networks.py --out /tmp/realnet [--only yolov8n ...]

Every network is built with random weights (no download), every BatchNorm's statistics and
affine parameters randomised (mean != 0, var != 1, gamma != 1, beta != 0: an identity BN would
hide a wrong fold), eval mode, batch 1. Each is exported in up to three styles:

* ``cf``: TorchScript exporter, ``dynamo=False``, ``do_constant_folding=True``,
  ``training=TrainingMode.EVAL`` (BN folded into the convs by the exporter);
* ``nocf``: ``dynamo=False``, ``do_constant_folding=False``, ``training=TrainingMode.PRESERVE``
  (every BN a node, Shape/Gather chains and Constant nodes left in);
* ``dynamo``: the default exporter (``torch.onnx.export(..., dynamo=True)``), where it works;

plus the framework's own deploy form (timm ``reparameterize_model``, ultralytics ``fuse()``;
the model itself for networks without re-parameterizable blocks), exported ``cf``, whose Conv
count is the target. ``manifest.json`` in ``--out`` lists every file, the input shape, the
deploy Conv count and any export error.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from pathlib import Path

try:
    import torch
except ImportError:     # state_dicts.py compare reads NETWORKS without torch
    torch = None

# name -> (framework, constructor name, input H=W)
NETWORKS = {
    "repvgg_a0": ("timm", "repvgg_a0", 224),
    "repvgg_b1g4": ("timm", "repvgg_b1g4", 224),
    "mobileone_s1": ("timm", "mobileone_s1", 224),
    "fastvit_t8": ("timm", "fastvit_t8", 224),
    "fastvit_sa12": ("timm", "fastvit_sa12", 224),
    "repvit_m0_9": ("timm", "repvit_m0_9", 224),
    "repghostnet_050": ("timm", "repghostnet_050", 224),
    "mobilevitv2_050": ("timm", "mobilevitv2_050", 256),
    "resnet18": ("timm", "resnet18", 224),
    "efficientnet_b0": ("timm", "efficientnet_b0", 224),
    "convnext_atto": ("timm", "convnext_atto", 224),
    "tv_mobilenet_v2": ("torchvision", "mobilenet_v2", 224),
    "tv_resnet18": ("torchvision", "resnet18", 224),
    "yolov8n": ("ultralytics", "yolov8n.yaml", 320),
    "yolo11n": ("ultralytics", "yolo11n.yaml", 320),
    "yolov6n": ("ultralytics", "yolov6n.yaml", 320),
    "yolov10n": ("ultralytics", "yolov10n.yaml", 320),
    "yolov9t": ("ultralytics", "yolov9t.yaml", 320),
    "rtdetr-l": ("ultralytics", "rtdetr-l.yaml", 320),
}


def randomise_bn(model, seed: int) -> int:
    """Give every BatchNorm random statistics and affine parameters; returns how many."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            n += 1
    return n


def build(name: str):
    """Return (train model, deploy model) in eval mode, BN randomised, the deploy made from the train copy."""
    fw, ctor, _ = NETWORKS[name]
    torch.manual_seed(0)
    if fw == "timm":
        import timm
        from timm.utils.model import reparameterize_model
        model = timm.create_model(ctor, pretrained=False).eval()
        randomise_bn(model, 0)
        deploy = reparameterize_model(copy.deepcopy(model)).eval()
    elif fw == "torchvision":
        import torchvision
        model = getattr(torchvision.models, ctor)(weights=None).eval()
        randomise_bn(model, 0)
        deploy = copy.deepcopy(model)
    else:
        from ultralytics.nn.modules.head import Detect
        from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel
        cls = RTDETRDetectionModel if ctor.startswith("rtdetr") else DetectionModel
        from ultralytics.cfg import get_cfg  # noqa: F401  (settings initialised before building)
        model = cls(ctor, nc=80, verbose=False).eval()
        randomise_bn(model, 0)
        for m in model.modules():  # what ultralytics' own ONNX exporter sets
            if isinstance(m, Detect) or type(m).__name__ == "RTDETRDecoder":
                m.export, m.format, m.dynamic = True, "onnx", False
        deploy = copy.deepcopy(model).fuse(verbose=False).eval()
    return model, deploy


def export(model, x, path: Path, style: str):
    if style == "dynamo":
        prog = torch.onnx.export(model, (x,), dynamo=True)
        prog.save(str(path))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=(style != "nocf"),
                          training=(torch.onnx.TrainingMode.PRESERVE if style == "nocf"
                                    else torch.onnx.TrainingMode.EVAL),
                          input_names=["input"])


def count_convs(path: Path) -> int:
    import onnx
    return sum(n.op_type == "Conv" for n in onnx.load(str(path), load_external_data=False).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/realnet")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--styles", nargs="*", default=["cf", "nocf", "dynamo"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    torch.set_num_threads(1)
    for name in args.only or NETWORKS:
        hw = NETWORKS[name][2]
        entry = manifest.setdefault(name, {"framework": NETWORKS[name][0], "ctor": NETWORKS[name][1],
                                           "input_shape": [1, 3, hw, hw], "exports": {}})
        try:
            model, deploy = build(name)
        except Exception as e:  # recorded, the other networks go on
            entry["build_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            continue
        x = torch.randn(1, 3, hw, hw, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for m in (model, deploy):  # a dry run, as ultralytics' exporter does: anchors and shapes cached
                m(x)
            for style, m in [("deploy", deploy)] + [(s, model) for s in args.styles]:
                path = out / f"{name}.{style}.onnx"
                t0 = time.time()
                try:
                    export(m, x, path, "cf" if style == "deploy" else style)
                    entry["exports"][style] = {"path": str(path), "convs": count_convs(path),
                                               "seconds": round(time.time() - t0, 1)}
                except Exception as e:
                    entry["exports"][style] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    traceback.print_exc()
                print(name, style, entry["exports"][style], flush=True)
                mpath.write_text(json.dumps(manifest, indent=1))
        entry["versions"] = {"torch": torch.__version__}
        for mod in ("timm", "torchvision", "ultralytics", "onnx", "onnxscript"):
            try:
                entry["versions"][mod] = __import__(mod).__version__
            except ImportError:
                pass
        mpath.write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
