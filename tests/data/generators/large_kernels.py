"""Reference data of the large-kernel families (RepLKNet, UniRepLKNet): NOT run in CI.

Needs PyTorch (with timm, onnx) and the two official repositories' model files on the path:

    git --git-dir=<mirror of DingXiaoH/RepLKNet-pytorch> show b76808a:replknet.py > /tmp/lk/replknet.py
    git --git-dir=<mirror of AILab-CVC/UniRepLKNet> show b5677d8:unireplknet.py > /tmp/lk/unireplknet.py
    python tests/data/generators/large_kernels.py /tmp/lk tests/data/large_kernels

For each case it builds the official module with random weights and random BN statistics (eval
mode), writes ``state/<case>/``: ``train_state.npz`` (its ``state_dict()``), ``deploy_state.npz``
(the ``state_dict()`` after the official conversion), ``input.npy``, ``output.npy`` (the train
form's float32 output), ``meta.json``; and ``onnx/<case>/``: ``train.onnx``
(``do_constant_folding=True, training=EVAL``: the exporter folds BN after a Conv),
``train_keepbn.onnx`` (``do_constant_folding=False, training=PRESERVE``: every BN kept),
``deploy.onnx`` (the official deploy form), ``input.npy``, ``output.npy``. TorchScript exporter
(``dynamo=False``), opset 17.
"""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPLKNET_COMMIT = "b76808ac2c763eaed6af9d286c6163c9345b4d5f"
UNIREPLKNET_COMMIT = "b5677d8fb0e7b8af61eac39c1bf02727f5afc1d5"


def randomize(module, gen):
    """Random weights (N(0, 1/fan_in)), BN statistics and affine, GRN and layer scale."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1 and "act" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) + (1.0 if name.endswith("gamma") else 0.0))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=gen))


def export(module, x, path, *, fold):
    torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=["output"], opset_version=17,
                      do_constant_folding=fold,
                      training=torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE,
                      dynamo=False)


def save_state(path, module):
    np.savez(path, **{k: v.detach().numpy() for k, v in module.state_dict().items()})


def make_case(out, name, module, convert, x_shape, meta):
    gen = torch.Generator().manual_seed(meta["seed"])
    randomize(module, gen)
    module.eval()
    x = torch.randn(x_shape, generator=gen)
    with torch.no_grad():
        y = module(x)
    deploy = copy.deepcopy(module)
    convert(deploy)
    deploy.eval()
    with torch.no_grad():
        yd = deploy(x)
    meta["torch"] = torch.__version__
    meta["deploy_vs_train_error"] = float((yd - y).abs().max() / y.abs().max())
    meta["batchnorm_eps"] = {n: m.eps for n, m in module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for kind in ("state", "onnx"):
        (out / kind / name).mkdir(parents=True, exist_ok=True)
        np.save(out / kind / name / "input.npy", x.numpy())
        np.save(out / kind / name / "output.npy", y.numpy())
    save_state(out / "state" / name / "train_state.npz", module)
    save_state(out / "state" / name / "deploy_state.npz", deploy)
    (out / "state" / name / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    export(module, x, out / "onnx" / name / "train.onnx", fold=True)
    export(module, x, out / "onnx" / name / "train_keepbn.onnx", fold=False)
    export(deploy, x, out / "onnx" / name / "deploy.onnx", fold=True)


def main(src, out):
    sys.path.insert(0, str(src))
    import replknet
    import unireplknet

    out = Path(out)
    for name, kwargs, shape, seed in (
            ("off_replknet_dw13_s5_c8", dict(in_channels=8, out_channels=8, kernel_size=13, stride=1, groups=8,
                                             small_kernel=5), (1, 8, 16, 15), 1401),
            ("off_replknet_g2_s2_k7_c6to12", dict(in_channels=6, out_channels=12, kernel_size=7, stride=2, groups=2,
                                                  small_kernel=3), (1, 6, 13, 12), 1402)):
        make_case(out, name, replknet.ReparamLargeKernelConv(**kwargs), lambda m: m.merge_kernel(), shape, {
            "case": name, "seed": seed, "scheme": "replknet",
            "origin": "official DingXiaoH/RepLKNet-pytorch replknet.ReparamLargeKernelConv, random weights and BN "
                      "statistics, eval; deploy by its merge_kernel()",
            "source": {"project": "DingXiaoH/RepLKNet-pytorch", "class": "replknet.ReparamLargeKernelConv",
                       "deploy_conversion": "merge_kernel()", "commit": REPLKNET_COMMIT},
            "constructor_kwargs": kwargs,
            "forward": {"stride": kwargs["stride"], "padding": kwargs["kernel_size"] // 2, "groups": kwargs["groups"],
                        "activation": "identity"}})
    kwargs = dict(channels=8, kernel_size=13, deploy=False, attempt_use_lk_impl=False)
    make_case(out, "off_unireplknet_drb_k13_c8", unireplknet.DilatedReparamBlock(**kwargs),
              lambda m: m.merge_dilated_branches(), (1, 8, 17, 16), {
                  "case": "off_unireplknet_drb_k13_c8", "seed": 1403, "scheme": "unireplknet",
                  "origin": "official AILab-CVC/UniRepLKNet unireplknet.DilatedReparamBlock, random weights and BN "
                            "statistics, eval; deploy by its merge_dilated_branches()",
                  "source": {"project": "AILab-CVC/UniRepLKNet", "class": "unireplknet.DilatedReparamBlock",
                             "deploy_conversion": "merge_dilated_branches()", "commit": UNIREPLKNET_COMMIT},
                  "constructor_kwargs": kwargs,
                  "forward": {"stride": 1, "padding": 6, "groups": 8, "activation": "identity"}})
    for name, k, seed in (("off_unireplknet_block_k7_c8", 7, 1404), ("off_unireplknet_block_k3_c8", 3, 1405)):
        kwargs = dict(dim=8, kernel_size=k, deploy=False, attempt_use_lk_impl=False, layer_scale_init_value=1e-6)
        make_case(out, name, unireplknet.UniRepLKNetBlock(**kwargs), lambda m: m.reparameterize(), (1, 8, 12, 11), {
            "case": name, "seed": seed, "scheme": "unireplknet",
            "origin": "official AILab-CVC/UniRepLKNet unireplknet.UniRepLKNetBlock, random weights, BN statistics, "
                      "GRN gamma/beta and layer scale, eval; deploy by its reparameterize()",
            "source": {"project": "AILab-CVC/UniRepLKNet", "class": "unireplknet.UniRepLKNetBlock",
                       "deploy_conversion": "reparameterize()", "commit": UNIREPLKNET_COMMIT},
            "constructor_kwargs": kwargs})
    # A whole (tiny) UniRepLKNet: every kind of block (K = 3; 13 and 7, Dilated Reparam Blocks; 0),
    # stem, downsampling LayerNorms and head passing through; deploy by reparameterize_unireplknet().
    kwargs = dict(in_chans=3, num_classes=5, depths=(1, 1, 1, 1), dims=(4, 4, 8, 8),
                  kernel_sizes=((3,), (13,), (0,), (7,)), attempt_use_lk_impl=False)
    make_case(out, "off_unireplknet_net_tiny", unireplknet.UniRepLKNet(**kwargs),
              lambda m: m.reparameterize_unireplknet(), (1, 3, 24, 24), {
                  "case": "off_unireplknet_net_tiny", "seed": 1406, "scheme": "unireplknet",
                  "origin": "official AILab-CVC/UniRepLKNet unireplknet.UniRepLKNet (tiny), random weights, BN "
                            "statistics, GRN gamma/beta and layer scales, eval; deploy by its "
                            "reparameterize_unireplknet()",
                  "source": {"project": "AILab-CVC/UniRepLKNet", "class": "unireplknet.UniRepLKNet",
                             "deploy_conversion": "reparameterize_unireplknet()", "commit": UNIREPLKNET_COMMIT},
                  "constructor_kwargs": kwargs})


if __name__ == "__main__":
    main(*sys.argv[1:3])
