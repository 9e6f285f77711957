"""Reference cases of the YOLO-family and RepViT blocks: YOLOv6 QARepVGG v1/v2, yolov7 RepConv, official RepViT.

NOT run in CI: it needs PyTorch and checkouts of the official repositories. It made the cases in
``tests/data/yolo_repvit/state/<case>/`` and ``tests/data/yolo_repvit/onnx/<case>/``; how, and at which
commits, is in each ``meta.json`` and in ``tests/data/yolo_repvit/README.md``.

Usage::

    python tests/data/generators/yolo_repvit.py OUT_DIR YOLOV6_GIT_DIR YOLOV7_GIT_DIR REPVIT_GIT_DIR

The ``*_GIT_DIR`` are git directories (bare clones are enough): the classes are read from the
files at ``HEAD`` and only the listed classes and functions are executed (the modules' other
imports -- data loaders, plotting -- are not needed), with ``torch``, ``torch.nn`` and ``numpy``
in their namespace. The official code is used as it is; nothing of it is copied into this
repository.
"""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

SEED = 14


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True,
                          text=True).stdout


def _load(git_dir: str, path: str, names: list[str], extra: dict) -> tuple[dict, str]:
    """Execute the top-level definitions ``names`` of ``path`` at HEAD; return (namespace, commit)."""
    source = _git(git_dir, "show", f"HEAD:{path}")
    commit = _git(git_dir, "rev-parse", "HEAD").strip()
    tree = ast.parse(source)
    picked = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.Assign))
              and (getattr(n, "name", None) in names
                   or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets)))]
    module = ast.Module(body=picked, type_ignores=[])
    ns = {"torch": torch, "nn": nn, "np": np, **extra}
    exec(compile(module, f"{git_dir}:{path}", "exec"), ns)  # noqa: S102 - official code, reference data only
    return ns, commit


def _randomize(model: nn.Module, rng: torch.Generator, *, eps: float | None = None) -> None:
    """Random BN statistics and affine parameters (mean != 0, var != 1, gamma != 1, beta != 0); biases random."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=rng))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=rng))
                m.weight.copy_(0.5 + torch.rand(c, generator=rng))
                m.bias.copy_(0.5 * torch.randn(c, generator=rng))
                if eps is not None and isinstance(m, nn.BatchNorm2d):
                    m.eps = eps
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=rng) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=rng))


def _state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _export(model, x, path, *, fold: bool) -> None:
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["output"], do_constant_folding=fold,
                      training=torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE)


def _write(out: Path, case: str, train, deploy, x, meta: dict, *, deploy_output_too: bool = False) -> None:
    state_dir, onnx_dir = out / "state" / case, out / "onnx" / case
    state_dir.mkdir(parents=True, exist_ok=True)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    train.eval()
    deploy.eval()
    with torch.no_grad():
        y = train(x)
        y_dep = deploy(x)
    for d in (state_dir, onnx_dir):
        np.save(d / "input.npy", x.numpy())
        np.save(d / "output.npy", y.numpy())
        if deploy_output_too:
            np.save(d / "deploy_output.npy", y_dep.numpy())
    np.savez(state_dir / "train_state.npz", **_state(train))
    np.savez(state_dir / "deploy_state.npz", **_state(deploy))
    _export(train, x, onnx_dir / "train.onnx", fold=True)
    _export(train, x, onnx_dir / "train_keepbn.onnx", fold=False)
    _export(deploy, x, onnx_dir / "deploy.onnx", fold=True)
    meta = {"case": case, **meta, "seed": SEED, "torch": torch.__version__,
            "export": {"exporter": "torch.onnx.export(dynamo=False)", "opset": 17,
                       "train.onnx": "do_constant_folding=True, training=TrainingMode.EVAL",
                       "train_keepbn.onnx": "do_constant_folding=False, training=TrainingMode.PRESERVE",
                       "deploy.onnx": "the deploy module, do_constant_folding=True, training=EVAL"},
            "batchnorm_eps": {n: m.eps for n, m in train.named_modules()
                              if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))},
            "max_abs_deploy_vs_train": float((y_dep - y).abs().max() / y.abs().max())}
    (state_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def main(out: str, yolov6: str, yolov7: str, repvit: str) -> None:
    out = Path(out)
    rng = torch.Generator().manual_seed(SEED)

    # --- YOLOv6 QARepVGGBlock / QARepVGGBlockV2 -------------------------------------------------
    y6, y6_commit = _load(yolov6, "yolov6/layers/common.py",
                          ["activation_table", "ConvModule", "RepVGGBlock", "QARepVGGBlock", "QARepVGGBlockV2"], {})
    y6u, _ = _load(yolov6, "yolov6/utils/torch_utils.py", ["fuse_conv_and_bn", "fuse_model"], {})
    # fuse_model imports ConvModule from yolov6.layers.common: give it the class loaded above.
    for name in ("yolov6", "yolov6.layers", "yolov6.layers.common"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["yolov6.layers.common"].ConvModule = y6["ConvModule"]
    for cls, case, kw in [("QARepVGGBlock", "off_qarepvgg_c8", dict(in_channels=8, out_channels=8)),
                          ("QARepVGGBlockV2", "off_qarepvggv2_c8", dict(in_channels=8, out_channels=8)),
                          ("QARepVGGBlockV2", "off_qarepvggv2_s2_c6to10",
                           dict(in_channels=6, out_channels=10, stride=2))]:
        m = y6[cls](**kw)
        _randomize(m, rng, eps=1e-3)        # YOLOv6 initialize_weights: BatchNorm2d eps 1e-3
        m.eval()
        d = y6u["fuse_model"](copy.deepcopy(m))     # as yolov6/utils/checkpoint.py load_checkpoint(fuse=True)
        d.switch_to_deploy()
        x = torch.randn(1, kw["in_channels"], 12, 11, generator=rng)
        _write(out, case, m, d, x, {
            "origin": f"official meituan/YOLOv6 yolov6/layers/common.py {cls}, random weights and BN statistics, "
                      "eval mode; the deploy form keeps the post-sum bn, as switch_to_deploy does",
            "source": {"project": "meituan/YOLOv6", "class": f"yolov6.layers.common.{cls}", "commit": y6_commit,
                       "deploy_conversion": f"m = fuse_model(copy.deepcopy(m)); m.switch_to_deploy()  [{cls}; "
                                            "fuse_model of yolov6/utils/torch_utils.py, as load_checkpoint"
                                            "(fuse=True) then export_onnx.py / evaler.py do]"},
            "constructor_kwargs": kw, "scheme": "qarepvgg" if cls == "QARepVGGBlock" else "qarepvggv2",
            "forward": {"stride": kw.get("stride", 1), "padding": 1, "groups": 1, "activation": "relu"}})

    # --- yolov7 RepConv ---------------------------------------------------------------------------
    y7, y7_commit = _load(yolov7, "models/common.py", ["autopad", "RepConv"], {})
    for case, kw in [("off_yolov7_repconv_c8", dict(c1=8, c2=8)),
                     ("off_yolov7_repconv_g2_c8", dict(c1=8, c2=8, g=2)),
                     ("off_yolov7_repconv_dw_c8", dict(c1=8, c2=8, g=8)),
                     ("off_yolov7_repconv_s2_c6to10", dict(c1=6, c2=10, s=2))]:
        m = y7["RepConv"](**kw)
        _randomize(m, rng, eps=1e-3)        # yolov7 utils/torch_utils.py initialize_weights: eps 1e-3
        m.eval()
        d = copy.deepcopy(m)
        how = "copy.deepcopy(m); m.fuse_repvgg_block()  [what models/yolo.py Model.fuse() calls]"
        error = None
        try:
            d.fuse_repvgg_block()
        except Exception as exc:  # the depthwise RepConv: its own fuse cannot run
            error = f"{type(exc).__name__}: {exc}"
            d = copy.deepcopy(m)
            kernel, bias = d.get_equivalent_kernel_bias()
            d.rbr_reparam = nn.Conv2d(kw["c1"], kw["c2"], 3, kw.get("s", 1), 1, groups=kw.get("g", 1), bias=True)
            d.rbr_reparam.weight.data.copy_(kernel)
            d.rbr_reparam.bias.data.copy_(bias)
            for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "id_tensor"):
                if hasattr(d, name):
                    delattr(d, name)
            how = ("fuse_repvgg_block() raised; deploy = rbr_reparam from the class's own "
                   "get_equivalent_kernel_bias()")
        x = torch.randn(1, kw["c1"], 12, 11, generator=rng)
        with torch.no_grad():
            equiv = [t.numpy() for t in copy.deepcopy(m).get_equivalent_kernel_bias()]
        _write(out, case, m, d, x, {
            "origin": "official WongKinYiu/yolov7 models/common.py RepConv, random weights and BN statistics, "
                      "eval mode",
            "source": {"project": "WongKinYiu/yolov7", "class": "models.common.RepConv", "commit": y7_commit,
                       "deploy_conversion": how},
            "official_fuse_error": error,
            "constructor_kwargs": kw, "scheme": "yolov7",
            "forward": {"stride": kw.get("s", 1), "padding": 1, "groups": kw.get("g", 1), "activation": "silu"}},
            deploy_output_too=True)
        np.savez(out / "state" / case / "equivalent_kernel_bias.npz", weight=equiv[0], bias=equiv[1])

    # --- official RepViT ----------------------------------------------------------------------
    def _no_se(*a, **k):
        raise RuntimeError("SqueezeExcite is not used by these cases (use_se=0)")

    rv, rv_commit = _load(repvit, "model/repvit.py",
                          ["_make_divisible", "Conv2d_BN", "Residual", "RepVGGDW", "RepViTBlock", "BN_Linear",
                           "Classfier", "RepViT"],
                          {"SqueezeExcite": _no_se, "trunc_normal_": nn.init.trunc_normal_})
    util, _ = _load(repvit, "utils.py", ["replace_batchnorm"], {})
    cfgs = [[3, 2, 8, 0, 0, 1], [3, 2, 16, 0, 1, 2], [3, 2, 16, 0, 1, 1]]
    for case, build, shape, kw in [
            ("off_repvit_repvggdw_c12", lambda: rv["RepVGGDW"](12), (1, 12, 10, 9), {"ed": 12}),
            ("off_repvit_classfier_d24_k10", lambda: rv["Classfier"](24, 10, True), (3, 24),
             {"dim": 24, "num_classes": 10, "distillation": True}),
            ("off_repvit_tiny", lambda: rv["RepViT"](cfgs, num_classes=5, distillation=True), (1, 3, 16, 16),
             {"cfgs": cfgs, "num_classes": 5, "distillation": True})]:
        m = build()
        _randomize(m, rng)
        m.eval()
        d = copy.deepcopy(m)
        if hasattr(d, "fuse") and not isinstance(d, rv["RepViT"]):
            d = d.fuse()                    # what replace_batchnorm does to a child that has fuse()
            how = "copy.deepcopy(m).fuse()  [utils.replace_batchnorm on the module's parent]"
        else:
            util["replace_batchnorm"](d)
            how = "copy.deepcopy(m); utils.replace_batchnorm(m)"
        x = torch.randn(*shape, generator=rng)
        _write(out, case, m, d, x, {
            "origin": "official THU-MIG/RepViT model/repvit.py, random weights and BN statistics, eval mode",
            "source": {"project": "THU-MIG/RepViT", "class": f"model.repvit.{type(m).__name__}",
                       "commit": rv_commit, "deploy_conversion": how},
            "constructor_kwargs": kw, "scheme": "repvit"})


if __name__ == "__main__":
    main(*sys.argv[1:5])
