"""Reference data for ECB / ECBSR and OREPA (tests/data/{state,onnx}/off_ecb*, off_orepa*).

NOT run in CI: it needs PyTorch and checkouts of the official repositories
(xindongzhang/ECBSR, JUGGHM/OREPA_CVPR2022). Usage::

    python make_ecb_orepa.py ECBSR_CHECKOUT OREPA_CHECKOUT OUT_DATA_DIR

Random weights (every parameter and BN statistic, not the official init: the
official init makes the Sobel/Laplacian scales ~1e-3 and OREPA's prior branch
0, which would hide those branches), seed per case, float32, CPU.
Export styles: ``train.onnx`` = ``do_constant_folding=True,
training=EVAL``; ``train_keepbn.onnx`` = ``do_constant_folding=False,
training=PRESERVE`` (for ECB the module is in training mode there: its eval
``forward`` runs ``rep_params()``, so only a training-mode export shows the
train-form graph with its bias-padding ``ScatterND`` writes).
"""

import copy
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import torch

ECBSR_COMMIT = "c60b1d2712af4ed4a615c2b7afa3980222c44a31"
OREPA_COMMIT = "3ed037beeb106cc1c3d011eb2678cebfefc4cba0"
FIXED = ("mask", "id_tensor", "weight_orepa_avg_avg", "weight_orepa_prior", "num_batches_tracked")


def randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if name.split(".")[-1] in FIXED:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif name.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def save_state(sd, path):
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in sd.items()})


def export(m, x, path, *, fold, training):
    torch.onnx.export(m, (x,), str(path), opset_version=17, do_constant_folding=fold, training=training,
                      input_names=["input"], output_names=["output"], dynamo=False)


def dynamo_export(m, x, path, *, optimize):
    """The dynamo exporter, weights embedded; node metadata (stack traces) and doc strings
    dropped, which are most of the file and no part of the graph."""
    import onnx

    torch.onnx.export(m, (x,), str(path), opset_version=18, dynamo=True, optimize=optimize,
                      external_data=False, input_names=["input"], output_names=["output"])
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    onnx.save(model, str(path))


def write_case(out, case, train_m, deploy_m, x, meta, *, train_mode_for_keepbn, dynamo_keepbn=False, xz=False):
    s, o = out / "state" / case, out / "onnx" / case
    s.mkdir(parents=True, exist_ok=True)
    o.mkdir(parents=True, exist_ok=True)
    train_m.eval()
    deploy_m.eval()
    with torch.no_grad():
        train_m.train(train_mode_for_keepbn)
        y = train_m(x)
        train_m.eval()
        yd = deploy_m(x)
    err = (y - yd).abs().max().item() / y.abs().max().item()
    print(case, "official deploy vs train:", err)
    for d in (s, o):
        np.save(d / "input.npy", x.numpy())
        np.save(d / "output.npy", y.numpy())
    save_state(train_m.state_dict(), s / "train_state.npz")
    save_state(deploy_m.state_dict(), s / "deploy_state.npz")
    meta["official_deploy_relative_error"] = err
    (s / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if dynamo_keepbn:
        dynamo_export(train_m, x, o / "train.onnx", optimize=True)
    else:
        export(train_m, x, o / "train.onnx", fold=True, training=torch.onnx.TrainingMode.EVAL)
    train_m.train(train_mode_for_keepbn)
    if dynamo_keepbn:
        # The TorchScript exporter refuses OREPA (grouped, or unfolded) ("convolution for kernel of unknown
        # shape": the Einsum outputs have no inferred shape); the dynamo exporter, unoptimized,
        # keeps the weight generator as Einsum / Expand / Shape / CastLike nodes.
        dynamo_export(train_m, x, o / "train_keepbn.onnx", optimize=False)
    else:
        export(train_m, x, o / "train_keepbn.onnx", fold=False, training=torch.onnx.TrainingMode.PRESERVE)
    train_m.eval()
    export(deploy_m, x, o / "deploy.onnx", fold=True, training=torch.onnx.TrainingMode.EVAL)
    if xz:
        # ECB's exports are ~90% Constant nodes of ScatterND index arithmetic (140 KB to 1 MB):
        # stored xz-compressed (test data size); the tests decompress them.
        for f in ("train.onnx", "train_keepbn.onnx", "deploy.onnx"):
            (o / (f + ".xz")).write_bytes(lzma.compress((o / f).read_bytes(), preset=9))
            (o / f).unlink()


def meta_for(case, project, commit, cls, kwargs, conversion, scheme, forward, eps=None):
    return {
        "case": case,
        "origin": (f"PyTorch reference case: `{cls}` of the official {project} repository (github.com/{project}, "
                   f"commit {commit}) with random weights{' and random BN statistics' if eps else ''}; "
                   f"train_state.npz is its state_dict(), deploy_state.npz the state_dict() of the official deploy "
                   f"form ({conversion}), output.npy the float32 PyTorch ({torch.__version__}, CPU) output of the "
                   f"training form on input.npy; made by tests/data/generators/make_ecb_orepa.py"),
        "source": {"project": project, "class": cls, "deploy_conversion": conversion, "commit": commit},
        "constructor_kwargs": kwargs,
        "batchnorm_eps": eps or {},
        "scheme": scheme,
        "forward": forward,
        "seed": SEED[case],
        "torch": torch.__version__,
        "export": ({"train.onnx": "TorchScript exporter, opset 17, do_constant_folding=True, training=EVAL",
                    "train_keepbn.onnx": "TorchScript exporter, opset 17, do_constant_folding=False, "
                                         "training=PRESERVE, module in training mode",
                    "compressed": "the three .onnx files are stored xz-compressed (.onnx.xz)"}
                   if project.endswith("ECBSR") else
                   {"train.onnx": "dynamo exporter, opset 18, optimize=True (eval mode)",
                    "train_keepbn.onnx": "dynamo exporter, opset 18, optimize=False (eval mode)",
                    "deploy.onnx": "TorchScript exporter, opset 17, do_constant_folding=True, training=EVAL"}),
    }


SEED = {"off_ecb_c4to8_prelu": 1, "off_ecb_idt_c6_linear": 2, "off_ecbsr_m1c4_x2": 3,
        "off_orepa_k3_c6to10": 4, "off_orepa_g2_s2_c8": 5, "off_orepa_dw_c8": 6}


def ecb_cases(root, out):
    sys.path.insert(0, str(root))
    from models.ecb import ECB
    from models.ecbsr import ECBSR
    from models.plainsr import Conv3X3, PlainSR

    for case, (cin, cout, act, idt) in {"off_ecb_c4to8_prelu": (4, 8, "prelu", False),
                                        "off_ecb_idt_c6_linear": (6, 6, "linear", True)}.items():
        torch.manual_seed(SEED[case])
        m = ECB(cin, cout, depth_multiplier=2.0, act_type=act, with_idt=idt)
        randomize(m, SEED[case])
        d = Conv3X3(cin, cout, act_type=act)
        with torch.no_grad():
            rk, rb = m.rep_params()
            d.conv3x3.weight.copy_(rk)
            d.conv3x3.bias.copy_(rb)
            if act == "prelu":
                d.act.weight.copy_(m.act.weight)
        x = torch.randn(1, cin, 9, 11, generator=torch.Generator().manual_seed(100 + SEED[case]))
        kwargs = {"inp_planes": cin, "out_planes": cout, "depth_multiplier": 2.0, "act_type": act, "with_idt": idt}
        meta = meta_for(case, "xindongzhang/ECBSR", ECBSR_COMMIT, "models.ecb.ECB", kwargs,
                        "RK, RB = m.rep_params() copied into models.plainsr.Conv3X3 as convert.py does", "ecb",
                        {"stride": 1, "padding": 1, "groups": 1, "activation": act})
        write_case(out, case, m, d, x, meta, train_mode_for_keepbn=True, xz=True)

    case = "off_ecbsr_m1c4_x2"
    torch.manual_seed(SEED[case])
    kwargs = {"module_nums": 1, "channel_nums": 4, "with_idt": 0, "act_type": "prelu", "scale": 2, "colors": 1}
    m = ECBSR(**kwargs)
    randomize(m, SEED[case])
    d = PlainSR(module_nums=1, channel_nums=4, act_type="prelu", scale=2, colors=1)
    with torch.no_grad():  # convert.py's copy loop
        for i, blk in enumerate(m.backbone):
            rk, rb = blk.rep_params()
            d.backbone[i].conv3x3.weight.copy_(rk)
            d.backbone[i].conv3x3.bias.copy_(rb)
            if blk.act_type == "prelu":
                d.backbone[i].act.weight.copy_(blk.act.weight)
    x = torch.rand(1, 1, 10, 12, generator=torch.Generator().manual_seed(100 + SEED[case]))
    meta = meta_for(case, "xindongzhang/ECBSR", ECBSR_COMMIT, "models.ecbsr.ECBSR", kwargs,
                    "convert.py: models.plainsr.PlainSR with each ECB's rep_params()", "ecb",
                    {"stride": 1, "padding": 1, "groups": 1, "activation": "prelu"})
    write_case(out, case, m, d, x, meta, train_mode_for_keepbn=True, xz=True)
    sys.path.remove(str(root))


def orepa_cases(root, out):
    sys.path.insert(0, str(root))
    from blocks import OREPA


    for case, (cin, cout, s, g) in {"off_orepa_k3_c6to10": (6, 10, 1, 1), "off_orepa_g2_s2_c8": (8, 8, 2, 2),
                                    "off_orepa_dw_c8": (8, 8, 1, 8)}.items():
        torch.manual_seed(SEED[case])
        kwargs = {"in_channels": cin, "out_channels": cout, "kernel_size": 3, "stride": s, "padding": 1, "groups": g}
        m = OREPA(**kwargs)
        randomize(m, SEED[case])
        d = copy.deepcopy(m)
        d.switch_to_deploy()
        x = torch.randn(1, cin, 9, 10, generator=torch.Generator().manual_seed(100 + SEED[case]))
        meta = meta_for(case, "JUGGHM/OREPA_CVPR2022", OREPA_COMMIT, "blocks.OREPA", kwargs,
                        "copy.deepcopy(m); m.switch_to_deploy()", "orepa",
                        {"stride": s, "padding": 1, "groups": g, "activation": "identity"}, eps={"bn": 1e-5})
        write_case(out, case, m, d, x, meta, train_mode_for_keepbn=False, dynamo_keepbn=True)
    sys.path.remove(str(root))


if __name__ == "__main__":
    ecb_root, orepa_root, out = (Path(a) for a in sys.argv[1:4])
    ecb_cases(ecb_root, out)
    orepa_cases(orepa_root, out)
