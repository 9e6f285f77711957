"""The ``repnp`` command line: a thin layer over the library.

Subcommands:

``repnp demo``
    Runs the main job on bundled data and checks it.
``repnp convert IN OUT``
    ``.onnx`` -> fused ``.onnx`` (:func:`repnp.io.convert_onnx`), ``.npz`` ->
    deploy ``.npz`` (:func:`repnp.io.convert_state`), with a before/after table
    and the verified error. OUT ends in the input's suffix (``.onnx`` or ``.npz``).
``repnp inspect IN``
    The blocks found, what will be fused, and the cost-model table train vs deploy.
``repnp verify A B``
    Max absolute and relative error between two ONNX models on the same input;
    models whose graph inputs differ (name, element type, fixed dims) are refused
    before anything runs.

Exit codes: 0 success; 1 the numeric check failed (nothing written) or, for
``verify``, the models differ beyond ``--tol``; 2 bad input or usage (one line
on stderr, no traceback); 130 / 143 interrupted by SIGINT / SIGTERM (one line on
stderr, temporary files removed).

Inputs are read from regular files only (after symlinks): a FIFO, a pipe such as
``<(cat model.onnx)`` or a device such as ``/dev/zero`` is refused, never waited on or
read without end. OUT is replaced only with ``--force``; without it the final rename
itself refuses an OUT that appeared during the write.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings

import numpy as np

from repnp import __version__
from repnp.errors import CheckFailed, ConversionError, ShapeError
from repnp.tolerance import NETWORK

#: Default tolerance of the numeric checks (whole networks in float32).
DEFAULT_TOL = NETWORK


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W (integers), got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers N,C,H,W, got {text!r}")
    return dims


def _pair(text: str) -> tuple[int, int]:
    dims = _shape(text)
    if len(dims) != 2:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}")
    return dims


def _partition(text: str):
    """``H,W`` (every RepMLP block) or ``PREFIX=H,W`` (the block at PREFIX): ``(prefix or None, (h, w))``."""
    prefix, sep, dims = text.rpartition("=")
    if sep and not prefix.strip():
        raise argparse.ArgumentTypeError(f"expected H,W or PREFIX=H,W, got {text!r}")
    try:
        return (prefix.strip() or None), _pair(dims)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected H,W or PREFIX=H,W, got {text!r}") from None


def _partitions(entries):
    """The ``partition=`` of :func:`repnp.io.convert_state` from the repeated ``--partition`` values:
    ``(h, w)`` for one plain ``H,W``, else a mapping prefix -> ``(h, w)`` (``None``: every other block)."""
    if not entries:
        return None
    table = {}
    for prefix, dims in entries:
        if prefix in table and table[prefix] != dims:
            name = "H,W" if prefix is None else f"{prefix}=H,W"
            raise ConversionError(f"--partition {name} is given twice, as {table[prefix]} and {dims}")
        table[prefix] = dims
    return table[None] if list(table) == [None] else table


def _kind(path: str) -> str:
    """``"onnx"`` or ``"npz"``, by suffix, else by content (an .npz is a zip archive)."""
    from repnp.io.atomic import open_regular

    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".onnx", ".npz"):
        return suffix[1:]
    # Regular files only: sniffing a pipe (``<(cat model.onnx)``) would consume the
    # bytes the parser needs, and a FIFO without a writer would block forever.
    try:
        with open_regular(path) as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ConversionError(f"cannot read {path!r}: {exc.strerror}") from None
    return "npz" if head.startswith(b"PK") else "onnx"


def _file_size(path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _emit(args, text: str, payload: dict) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=_json_default))
    else:
        print(text)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray, tuple, set)):
        return list(np.asarray(obj).tolist()) if isinstance(obj, np.ndarray) else list(obj)
    return str(obj)


def _progress(args, total: int, label: str):
    from repnp.io.progress import Progress

    return Progress(total, label, enabled=True if args.progress else None)


def _table(rows, header) -> str:
    rows = [tuple(str(c) for c in r) for r in [header] + list(rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------

def _convert_npz(args) -> int:
    from repnp.io.atomic import check_output_path
    from repnp.io.npz import convert_state, load_state, save_state

    check_output_path(args.output, force=args.force, source=args.input)
    state = load_state(args.input)
    failure = None
    with _progress(args, 1, "verifying blocks") as bar:
        try:
            # scheme=args.scheme: the report then says whether the scheme was detected or given
            converted, report = convert_state(state, scheme=args.scheme, eps=args.eps,
                                              partition=_partitions(args.partition), check=not args.no_check,
                                              tol=args.tol, progress=bar.set)
        except CheckFailed as exc:
            converted, report, failure = None, exc.report, exc
    scheme, eps = report.info["scheme"], report.info["eps"]
    written = failure is None
    if written:
        save_state(converted, args.output, force=args.force, source=args.input)
    size_after = _file_size(args.output) if written else None
    payload = report.to_dict()
    payload.update(kind="npz", input=args.input, output=args.output, written=written, scheme=scheme, eps=eps,
                   blocks=len(report.fused), keys_before=report.counts_before["keys"],
                   keys_after=report.counts_after.get("keys"), bytes_before=_file_size(args.input),
                   bytes_after=size_after)
    if report.info.get("nothing_to_fuse"):
        headline = f"{args.input} -> {args.output}: {report.messages[0]}"
    else:
        headline = f"{args.input} -> {args.output}: {len(report.fused)} {scheme} block(s) fused (BN eps {eps:g})"
    text = "\n".join([headline,
                      str(report),
                      _table([("file size (bytes)", payload["bytes_before"], "-" if size_after is None else
                               size_after)], ("", "before", "after"))])
    _emit(args, text, payload)
    if failure is not None:
        raise CheckFailed(f"{failure}; nothing written")
    return 0


def _convert_onnx(args) -> int:
    from repnp.io.onnx.convert import convert_onnx
    from repnp.io.onnx.write import check_model_output, save_onnx

    # Also refuses OUT = one of IN's external-data files, even with --force.
    check_model_output(args.output, force=args.force, source=args.input)
    failure = None
    with _progress(args, 1, "converting") as bar:
        try:
            fused, report = convert_onnx(args.input, check=not args.no_check, tol=args.tol,
                                         input_shape=args.input_shape, progress=bar.set,
                                         aggressive=args.aggressive)
        except CheckFailed as exc:
            fused, report, failure = None, exc.report, exc
        if fused is not None:
            bar.set(0, 1)
            bar.label = "writing"
            save_onnx(fused, args.output, force=args.force, source=args.input)
            bar.set(1, 1)
    written = failure is None
    size_after = _file_size(args.output) if written else None
    payload = report.to_dict()
    payload.update(kind="onnx", input=args.input, output=args.output, written=written,
                   bytes_before=_file_size(args.input), bytes_after=size_after)
    text = "\n".join([f"{args.input} -> {args.output}", str(report),
                      _table([("file size (bytes)", payload["bytes_before"], "-" if size_after is None else
                               size_after)], ("", "before", "after"))])
    _emit(args, text, payload)
    if failure is not None:
        raise CheckFailed(f"{failure}; nothing written")
    return 0


def _convert(args) -> int:
    if not os.path.exists(args.input):
        raise ConversionError(f"input {args.input!r} does not exist")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise ConversionError(f"output folder {folder!r} does not exist")
    kind = _kind(args.input)
    out_suffix = os.path.splitext(args.output)[1].lower()
    if out_suffix != f".{kind}":
        # The output is written in the input's format: a name that says otherwise
        # (x.txt, x.npz for a model) would mislabel the file.
        what = "an ONNX model" if kind == "onnx" else "an .npz state dict"
        raise ConversionError(f"input {args.input!r} is {what}, so output {args.output!r} must end in .{kind}")
    if kind == "onnx" and (args.scheme or args.eps is not None or args.partition):
        raise ConversionError("--scheme, --eps and --partition apply to .npz state dicts (an ONNX model "
                              "carries its BN eps)")
    if kind == "npz" and args.aggressive:
        raise ConversionError("--aggressive applies to ONNX models")
    if kind == "npz" and args.input_shape:
        raise ConversionError("--input-shape applies to ONNX models")
    return _convert_npz(args) if kind == "npz" else _convert_onnx(args)


# ----------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------

def _inspect_npz(args) -> int:
    from repnp.io.npz import convert_state, find_blocks, load_state

    state = load_state(args.input)
    try:
        _, report = convert_state(state, scheme=args.scheme, eps=args.eps, partition=_partitions(args.partition),
                                  check=False)
    except ConversionError as exc:     # e.g. RepMLP without --partition: still list the blocks
        report, note = None, str(exc)
    else:
        note = None
    if report is not None:
        # The conversion's own report (the fields ``repnp convert --json`` prints) and its blocks.
        payload = report.to_dict()
        scheme = report.info["scheme"]
        blocks = [{"prefix": f.where or "(top level)", "block": f.kind, "deploy": f.detail["deploy"],
                   "branches": f.detail["branches"], "kernel_shape": f.detail["kernel_shape"],
                   "groups": f.detail["groups"], "keys": len(f.merged)} for f in report.fused]
    else:
        found = find_blocks(state, args.scheme)
        scheme = args.scheme or (found[0].scheme if found else None)
        payload = {"format": "npz", "params_before": None, "params_after": None, "fused": [], "messages": [note]}
        blocks = [{"prefix": b.where, "block": b.name, "deploy": b.deploy, "branches": list(b.branches),
                   "kernel_shape": None, "groups": None, "keys": len(b.keys)} for b in found]
    payload.update(kind="npz", input=args.input, scheme=scheme, blocks=blocks, note=note)
    if report is not None and report.info.get("nothing_to_fuse"):
        lines = [f"{args.input}: {report.messages[0]}"]
    else:
        lines = [f"{args.input}: {scheme} naming, {len(blocks)} re-parameterizable block(s), {len(state)} keys"]
    rows = [(d["prefix"], d["block"], len(d["branches"]),
             "?" if d["kernel_shape"] is None else "x".join(map(str, d["kernel_shape"])), d["deploy"])
            for d in blocks]
    lines.append(_table(rows, ("block", "type", "branches", "fused kernel", "fused into")))
    lines.append("")
    lines.append(str(report) if report is not None else f"note: {note}")
    _emit(args, "\n".join(lines), payload)
    return 0


def _inspect_onnx(args) -> int:
    from repnp.io.onnx.inspect import inspect_onnx

    with _progress(args, 3, "inspecting") as bar:
        report, cmp = inspect_onnx(args.input, input_shape=args.input_shape, progress=bar.set)
    # The conversion's own report (the fields ``repnp convert --json`` prints), plus the cost model.
    payload = report.to_dict()
    payload.update(kind="onnx", input=args.input,
                   cost={name: {"train": t, "deploy": d, "ratio": r} for name, t, d, r in cmp.rows()},
                   cost_ops_before=cmp.train.op_types(), cost_ops_after=cmp.deploy.op_types())
    lines = [f"{args.input}: {len(report.fused)} region(s) will be fused into one Conv each", str(report)]
    lines += ["", "cost model (kernels launched; constant subgraphs folded at load time):", str(cmp)]
    _emit(args, "\n".join(lines), payload)
    return 0


def _inspect(args) -> int:
    kind = _kind(args.input)
    if kind == "onnx" and (args.scheme or args.eps is not None or args.partition):
        raise ConversionError("--scheme, --eps and --partition apply to .npz state dicts")
    return _inspect_npz(args) if kind == "npz" else _inspect_onnx(args)


# ----------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------

def _verify(args) -> int:
    from repnp.io.atomic import open_regular
    from repnp.io.onnx.verify import verify_models

    x = None
    if args.input is not None:
        with open_regular(args.input, what="--input") as fh:
            try:
                x = np.load(fh, allow_pickle=False)
            except Exception as exc:
                raise ConversionError(f"cannot read {args.input!r} as a .npy array: {exc}") from None
            if not isinstance(x, np.ndarray):
                raise ConversionError(f"{args.input!r} is an .npz archive; --input takes one .npy array")
    seed = None if x is not None else args.seed
    result = verify_models(args.a, args.b, tol=args.tol, x=x, input_shape=args.input_shape, seed=args.seed)
    rows = [(name, str(shape), f"{d:.3g}", f"{r:.3g}") for name, shape, d, r in result.outputs]
    payload = {"a": args.a, "b": args.b, **result.to_dict(), "seed": seed}
    text = "\n".join([
        f"{args.a} vs {args.b} ({result.engine}, inputs {payload['input_shapes']}"
        + (f", seed {seed})" if seed is not None else f", from {args.input})"),
        _table(rows, ("output", "shape", "max abs", "max rel")),
        *(f"note: {m}" for m in result.messages),
        *([f"why: {result.reason}"] if result.reason else []),
        f"max abs {result.max_abs:.3g}, max rel {result.max_error:.3g} (max|a-b| / max|a|, tol {args.tol:g}): "
        f"{'equal within tolerance' if result.passed else 'DIFFERENT'}"])
    _emit(args, text, payload)
    return 0 if result.passed else 1


# ----------------------------------------------------------------------------
# parser and entry point
# ----------------------------------------------------------------------------

def _demo(args: argparse.Namespace) -> int:
    from repnp import demo

    return demo.run()


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line, ``repnp: error: ...``, exit 2, like every
    other bad input (argparse's own prints the usage block first)."""

    def error(self, message: str):
        text = " ".join(str(message).split())
        self.exit(2, f"repnp: error: {text} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="repnp",
        description="Structural re-parameterization in pure NumPy: fuse multi-branch blocks "
                    "into single convolutions, with numerical proof.",
    )
    parser.add_argument("--version", action="version", version=f"repnp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demo on bundled data and check it")
    demo.set_defaults(func=_demo)

    def common(p, *, state_options=True):
        if state_options:
            from repnp.io.npz.schemes import scheme_names

            p.add_argument("--scheme", help=f".npz: naming scheme, one of {', '.join(scheme_names())} "
                                            f"(default: detected)")
            p.add_argument("--eps", type=float, help=".npz: BN epsilon (default: the scheme's, usually 1e-5)")
            p.add_argument("--partition", type=_partition, metavar="[PREFIX=]H,W", action="append",
                           help=".npz: RepMLP partition size (the weights only tell H*W); H,W for every "
                                "block, PREFIX=H,W for the block at PREFIX (repeatable)")
        p.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                       help="ONNX: input shape for the check (default for dynamic dimensions: batch 1, H and W "
                            "twice the model's largest receptive step, 32 to 256; the report says which)")
        p.add_argument("--json", action="store_true", help="print the report as JSON (only JSON on stdout)")
        p.add_argument("--progress", action="store_true", help="draw a progress bar on stderr even if it is "
                                                               "not a terminal")

    conv = sub.add_parser("convert", help="fuse a model (.onnx) or a state dict (.npz) into its deploy form",
                          description="Fuse every re-parameterizable block: .onnx -> fused .onnx, .npz -> deploy "
                                      ".npz. Writes through a temp file; never writes to IN; exit 1 (nothing "
                                      "written) when the numeric check fails, 2 on bad input.")
    conv.add_argument("input", metavar="IN")
    conv.add_argument("output", metavar="OUT")
    conv.add_argument("--tol", type=float, default=DEFAULT_TOL,
                      help=f"tolerance of the check, max|a-b|/max|b| (default {DEFAULT_TOL:g})")
    conv.add_argument("--no-check", action="store_true", help="skip the numeric check")
    conv.add_argument("--force", action="store_true", help="replace an existing OUT")
    conv.add_argument("--aggressive", action="store_true",
                      help="ONNX: also merge where the result may be costlier, and through the patterns runtimes "
                           "fuse (GELU, SiLU, HardSwish, LayerNorm ...); default: never slower")
    common(conv)
    conv.set_defaults(func=_convert)

    ins = sub.add_parser("inspect", help="list the blocks and compare train vs deploy costs",
                         description="The blocks found, what will be fused, and the cost-model table (ONNX) "
                                     "or parameter counts (.npz) train vs deploy.")
    ins.add_argument("input", metavar="IN")
    common(ins)
    ins.set_defaults(func=_inspect)

    ver = sub.add_parser("verify", help="max error between two ONNX models on the same input",
                         description="Run two ONNX models on the same input (seeded random unless --input) "
                                     "and print max abs and relative error; exit 1 above --tol.")
    ver.add_argument("a", metavar="A", help="reference model")
    ver.add_argument("b", metavar="B")
    ver.add_argument("--input", metavar="x.npy", help="input array (.npy) for the first graph input")
    ver.add_argument("--tol", type=float, default=DEFAULT_TOL,
                     help=f"tolerance, max|a-b|/max|a| (default {DEFAULT_TOL:g})")
    ver.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    common(ver, state_options=False)
    ver.set_defaults(func=_verify)
    return parser


def _bad_input_errors() -> tuple:
    errors = (ConversionError, ShapeError, ValueError, OSError)
    try:
        import onnx
    except ImportError:
        return errors
    return errors + (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where the program is, so that ``finally`` and ``except
    BaseException`` blocks (the temp file of a write) run before the exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    # One interruption is enough: a second Ctrl-C must not break the clean-up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise _Interrupted(signum)


def _install_signal_handlers() -> dict:
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):   # not the main thread: leave the handlers alone
            pass
    return previous


def main(argv=None) -> int:
    from repnp.io.atomic import remove_pending

    previous = _install_signal_handlers()
    try:
        return _main(argv)
    except (_Interrupted, KeyboardInterrupt) as exc:
        remove_pending()
        signum = exc.signum if isinstance(exc, _Interrupted) else signal.SIGINT
        print(f"repnp: interrupted by {signal.Signals(signum).name}; temporary files removed",
              file=sys.stderr)
        return 128 + int(signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        # NumPy's floating-point warnings (a NaN or inf in a damaged file) would add lines to
        # stderr beside the one-line verdict; the checks catch non-finite values and name
        # them, so the CLI does not print the warnings.
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return args.func(args)
    except CheckFailed as exc:
        print(f"repnp: check failed: {exc}", file=sys.stderr)
        return 1
    except _bad_input_errors() as exc:
        # Bad input (unreadable, truncated or garbage files, wrong shapes, refused paths):
        # one line, no traceback. onnx's checker and protobuf errors are ValueError subclasses
        # or are turned into ConversionError by the loader.
        print(f"repnp: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
