"""The ``weakclip`` command: a thin layer of argument parsing over the Python API.

Each sub-command imports what it needs when it runs, so ``weakclip --help`` stays fast.
Errors meant for the user (:class:`weakclip.errors.WeakclipError`) print one line and exit with the error's
``exit_status``: 2 (bad input or usage), 1 (finished, but some items failed), 3 (a regression stop).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from weakclip import __version__
from weakclip.commands import COMMAND_MODULES
from weakclip.errors import WeakclipError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weakclip",
        description="WeakCLIP: weakly-supervised semantic segmentation with a frozen CLIP.",
    )
    parser.add_argument("--version", action="version", version=f"weakclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except WeakclipError as err:
        print(f"weakclip {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_status", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
