"""Input vs output onnxruntime time of ``repnp.io.convert_onnx`` (issue 13: never slower).

Whole networks exported by :func:`repnp.io.export_onnx` (repvgg_a0, mobileone_s0,
mobilenet_v2 at 1x3x224x224, BN kept as nodes and folded by the exporter) and models built
with ``onnx.helper`` that carry the patterns runtimes fuse (GELU erf and tanh forms,
SiLU, HardSwish, LayerNorm, RMSNorm between convs; a Conv+Add+Relu residual; ResRep's
compactor; Linear layers on a sequence sharing one weight through Identity nodes, as the
TorchScript exporter writes tied parameters). Both models of a pair run in one onnxruntime
process, single thread, default optimization level (ORT_ENABLE_ALL), in interleaved rounds;
the median per model is reported with the ratio output / input (target <= 1.02; < 1 where
something was fused).

Run from the repository root: ``python benchmarks/bench_never_slower.py [--rounds 15]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import repnp.io as rio  # noqa: E402
from repnp import models  # noqa: E402

C, HW = 64, 56


def _model(nodes, inits, cin, cout, hw=HW):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _between_convs(body_fn, seed):
    """Conv 3x3 (C->C) -> pattern -> Conv 1x1 (C->C), four times in a row."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], {}, "x"
    for k in range(4):
        p = f"b{k}_"
        inits |= {p + "w1": rng.standard_normal((C, C, 3, 3)) * 0.05, p + "b1": rng.standard_normal(C) * 0.1,
                  p + "w2": rng.standard_normal((C, C, 1, 1)) * 0.1, p + "b2": rng.standard_normal(C) * 0.1}
        nodes.append(oh.make_node("Conv", [cur, p + "w1", p + "b1"], [p + "c1"], pads=[1, 1, 1, 1]))
        body, consts, out = body_fn(p, p + "c1")
        nodes += body
        inits |= consts
        cur = p + "y" if k < 3 else "y"
        nodes.append(oh.make_node("Conv", [out, p + "w2", p + "b2"], [cur]))
    return _model(nodes, inits, C, C)


def _gelu_erf(p, x):
    return ([oh.make_node("Div", [x, p + "sqrt2"], [p + "d"]), oh.make_node("Erf", [p + "d"], [p + "e"]),
             oh.make_node("Add", [p + "e", p + "one"], [p + "a"]), oh.make_node("Mul", [x, p + "a"], [p + "m"]),
             oh.make_node("Mul", [p + "m", p + "half"], [p + "g"])],
            {p + "sqrt2": np.sqrt(2.0), p + "one": 1.0, p + "half": 0.5}, p + "g")


def _gelu_tanh(p, x):
    return ([oh.make_node("Pow", [x, p + "three"], [p + "p"]), oh.make_node("Mul", [p + "p", p + "k"], [p + "pk"]),
             oh.make_node("Add", [x, p + "pk"], [p + "i"]), oh.make_node("Mul", [p + "i", p + "s"], [p + "arg"]),
             oh.make_node("Tanh", [p + "arg"], [p + "t"]), oh.make_node("Add", [p + "t", p + "one"], [p + "a"]),
             oh.make_node("Mul", [x, p + "a"], [p + "m"]), oh.make_node("Mul", [p + "m", p + "half"], [p + "g"])],
            {p + "three": 3.0, p + "k": 0.044715, p + "s": np.sqrt(2 / np.pi), p + "one": 1.0, p + "half": 0.5},
            p + "g")


def _silu(p, x):
    return ([oh.make_node("Sigmoid", [x], [p + "s"]), oh.make_node("Mul", [x, p + "s"], [p + "g"])], {}, p + "g")


def _hardswish(p, x):
    return ([oh.make_node("Add", [x, p + "three"], [p + "a"]),
             oh.make_node("Clip", [p + "a", p + "zero", p + "six"], [p + "c"]),
             oh.make_node("Mul", [x, p + "c"], [p + "m"]), oh.make_node("Div", [p + "m", p + "six"], [p + "g"])],
            {p + "three": 3.0, p + "zero": 0.0, p + "six": 6.0}, p + "g")


def _norm(rms):
    def body(p, x):
        rng = np.random.default_rng(0)
        nodes, d = [], x
        if not rms:
            nodes += [oh.make_node("ReduceMean", [x], [p + "mu"], axes=[1]),
                      oh.make_node("Sub", [x, p + "mu"], [p + "dd"])]
            d = p + "dd"
        nodes += [oh.make_node("Pow", [d, p + "two"], [p + "sq"]),
                  oh.make_node("ReduceMean", [p + "sq"], [p + "var"], axes=[1]),
                  oh.make_node("Add", [p + "var", p + "eps"], [p + "ve"]), oh.make_node("Sqrt", [p + "ve"], [p + "sd"]),
                  oh.make_node("Div", [d, p + "sd"], [p + "n"]),
                  oh.make_node("Mul", [p + "n", p + "gamma"], [p + ("g" if rms else "ng")])]
        if not rms:
            nodes.append(oh.make_node("Add", [p + "ng", p + "beta"], [p + "g"]))
        return nodes, {p + "two": 2.0, p + "eps": 1e-6, p + "gamma": rng.standard_normal((C, 1, 1)),
                       p + "beta": rng.standard_normal((C, 1, 1))}, p + "g"
    return body


def _residual(seed):
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], {}, "x"
    for k in range(4):
        p = f"r{k}_"
        inits |= {p + "w1": rng.standard_normal((C, C, 3, 3)) * 0.05,
                  p + "w2": rng.standard_normal((C, C, 3, 3)) * 0.05, p + "b": rng.standard_normal(C) * 0.1}
        out = "y" if k == 3 else p + "y"
        nodes += [oh.make_node("Conv", [cur, p + "w1", p + "b"], [p + "c1"], pads=[1, 1, 1, 1]),
                  oh.make_node("Relu", [p + "c1"], [p + "r"]),
                  oh.make_node("Conv", [p + "r", p + "w2", p + "b"], [p + "c2"], pads=[1, 1, 1, 1]),
                  oh.make_node("Add", [p + "c2", cur], [p + "s"]), oh.make_node("Relu", [p + "s"], [out])]
        cur = out
    return _model(nodes, inits, C, C)


def _resrep(seed):
    """Four conv-BN-compactor(square 1x1)-ReLU stages."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], {}, "x"
    for k in range(4):
        p = f"q{k}_"
        inits |= {p + "w": rng.standard_normal((C, C, 3, 3)) * 0.05, p + "g": rng.uniform(0.5, 2, C),
                  p + "bt": rng.standard_normal(C) * 0.1, p + "mu": rng.standard_normal(C) * 0.1,
                  p + "var": rng.uniform(0.5, 2, C), p + "q": rng.standard_normal((C, C, 1, 1)) * 0.1}
        out = "y" if k == 3 else p + "y"
        nodes += [oh.make_node("Conv", [cur, p + "w"], [p + "c"], pads=[1, 1, 1, 1]),
                  oh.make_node("BatchNormalization", [p + "c", p + "g", p + "bt", p + "mu", p + "var"], [p + "b"]),
                  oh.make_node("Conv", [p + "b", p + "q"], [p + "cq"]), oh.make_node("Relu", [p + "cq"], [out])]
        cur = out
    return _model(nodes, inits, C, C)


def _tied_linear(seed):
    """Conv-BN, then four Linear layers (MatMul + zero bias + Relu) on the (1, HW, C)
    sequence, all reading one weight and one bias through an ``Identity`` each (how the
    TorchScript exporter writes tied or cloned parameters: rtdetr-l's decoder)."""
    rng = np.random.default_rng(seed)
    inits = {"w": rng.standard_normal((C, C, 3, 3)) * 0.05, "g": rng.uniform(0.5, 2, C),
             "bt": rng.standard_normal(C) * 0.1, "mu": rng.standard_normal(C) * 0.1, "var": rng.uniform(0.5, 2, C),
             "lw": rng.standard_normal((C, C)) * 0.1, "lb": np.zeros(C)}
    shapes = [numpy_helper.from_array(np.array([1, C, HW * HW], np.int64), "seq"),
              numpy_helper.from_array(np.array([1, C, HW, HW], np.int64), "img")]
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("BatchNormalization", ["c", "g", "bt", "mu", "var"], ["bn"]),
             oh.make_node("Reshape", ["bn", "seq"], ["s"]), oh.make_node("Transpose", ["s"], ["t0"], perm=[0, 2, 1])]
    cur = "t0"
    for k in range(4):
        nodes += [oh.make_node("Identity", ["lw"], [f"lw{k}"]), oh.make_node("Identity", ["lb"], [f"lb{k}"]),
                  oh.make_node("MatMul", [cur, f"lw{k}"], [f"m{k}"]),
                  oh.make_node("Add", [f"m{k}", f"lb{k}"], [f"a{k}"]), oh.make_node("Relu", [f"a{k}"], [f"r{k}"])]
        cur = f"r{k}"
    nodes += [oh.make_node("Transpose", [cur], ["tb"], perm=[0, 2, 1]), oh.make_node("Reshape", ["tb", "img"], ["y"])]
    model = _model(nodes, inits, C, C)
    model.graph.initializer.extend(shapes)
    return model


def _session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time_models(models_, rounds, repeats):
    """Median seconds per run of each model, all timed in interleaved rounds (the order
    rotating each round) so that a load change hits every model alike."""
    sessions = [_session(m) for m in models_]
    name = sessions[0].get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in sessions[0].get_inputs()[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for s in sessions:
        for _ in range(3):
            s.run(None, {name: x})
    times = [[] for _ in sessions]
    for r in range(rounds):
        for k in range(len(sessions)):
            j = (k + r) % len(sessions)
            t0 = time.perf_counter()
            for _ in range(repeats):
                sessions[j].run(None, {name: x})
            times[j].append((time.perf_counter() - t0) / repeats)
    return [statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=None, help="a substring of the model names to run")
    ap.add_argument("--aggressive", action="store_true",
                    help="convert with aggressive=True (every exact merge: the pre-issue-13 behaviour)")
    args = ap.parse_args(argv)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in ("repvgg_a0", "mobileone_s0", "mobilenet_v2"):
            for fold in (False, True):
                name = f"{net} ({'folded' if fold else 'keepbn'})"
                if args.only and args.only not in name:
                    continue
                path = Path(tmp) / f"{net}_{fold}.onnx"
                rio.export_onnx(getattr(models, net)(seed=0), path, fold_bn=fold, input_shape=(1, 3, 224, 224))
                cases.append((name, onnx.load(str(path))))
        helpers = [("GELU erf between convs", _between_convs(_gelu_erf, 1)),
                   ("GELU tanh between convs", _between_convs(_gelu_tanh, 2)),
                   ("SiLU between convs", _between_convs(_silu, 3)),
                   ("HardSwish between convs", _between_convs(_hardswish, 4)),
                   ("LayerNorm (channels) between convs", _between_convs(_norm(False), 5)),
                   ("RMSNorm (channels) between convs", _between_convs(_norm(True), 6)),
                   ("Conv+Add+Relu residuals", _residual(7)),
                   ("ResRep conv-BN-compactor", _resrep(8)),
                   ("Tied Linear layers (Identity-shared weight, zero bias)", _tied_linear(9))]
        cases += [(n, m) for n, m in helpers if not args.only or args.only in n]
        print(f"aggressive={args.aggressive}, onnxruntime {ort.__version__}, 1 thread, ORT_ENABLE_ALL, "
              f"median of {args.rounds} interleaved "
              f"rounds x {args.repeats} runs")
        print("| model | nodes in -> out | Conv in -> out | input ms | output ms | output/input | "
              "input again / input |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        worst = 0.0
        for name, model in cases:
            out, report = rio.convert_onnx(model, aggressive=args.aggressive)
            # the input twice: the second copy's ratio is the noise floor of this row
            ta, tb, tc = _time_models([model, out, model], args.rounds, args.repeats)
            ratio = tb / ta
            worst = max(worst, ratio)
            ca = sum(1 for n in model.graph.node if n.op_type == "Conv")
            cb = sum(1 for n in out.graph.node if n.op_type == "Conv")
            print(f"| {name} | {len(model.graph.node)} -> {len(out.graph.node)} | {ca} -> {cb} | "
                  f"{ta * 1e3:.2f} | {tb * 1e3:.2f} | {ratio:.3f} | {tc / ta:.3f} |", flush=True)
        print(f"worst output/input: {worst:.3f} (target <= 1.02)")


if __name__ == "__main__":
    main()
