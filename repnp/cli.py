"""The ``repnp`` command line: a thin layer over the library.

Subcommands:

``repnp demo``
    Runs the main job on bundled data and checks it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from repnp import __version__


def _demo(args: argparse.Namespace) -> int:
    from repnp import fusion, ops

    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    kernel = fusion.identity_kernel(1, kernel_size=3)
    y = ops.conv2d(x, kernel, padding=1)
    print("Seed 001's identity kernel: a 3x3 conv that returns its input (stride 1, padding 1)")
    print("X =\n", x[0, 0])
    print("W_identity =\n", kernel[0, 0])
    print("Y = conv2d(X, W_identity, padding=1) =\n", y[0, 0])
    exact = bool(np.array_equal(x, y))
    print(f"Y == X exactly: {exact}")
    return 0 if exact else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repnp",
        description="Structural re-parameterization in pure NumPy: fuse multi-branch blocks "
                    "into single convolutions, with numerical proof.",
    )
    parser.add_argument("--version", action="version", version=f"repnp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demo on bundled data and check it")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
