"""The ``repnp`` command line: a thin layer over the library.

Subcommands:

``repnp demo``
    Runs the main job on bundled data and checks it.
"""

from __future__ import annotations

import argparse
import sys

from repnp import __version__


def _demo(args: argparse.Namespace) -> int:
    from repnp import demo

    return demo.run()


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
