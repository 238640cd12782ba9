"""The ``weakclip`` command: a thin layer of argument parsing over the Python API.

Each sub-command imports what it needs when it runs, so ``weakclip --help`` stays fast.
Errors meant for the user (:class:`weakclip.errors.WeakclipError`) print one line and exit 2. Ctrl-C
(SIGINT) and SIGTERM stop the command through its clean-up code (worker processes stopped, partial files
removed): ``interrupted``, exit 130; ``terminated``, exit 143.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading

from weakclip import __version__
from weakclip.commands import COMMAND_MODULES
from weakclip.commands.flags import WeakclipParser
from weakclip.errors import WeakclipError


def build_parser() -> WeakclipParser:
    parser = WeakclipParser(
        prog="weakclip",
        description="WeakCLIP: weakly-supervised semantic segmentation with a frozen CLIP.",
    )
    parser.add_argument("--version", action="version", version=f"weakclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so ``finally`` blocks and pools clean up as for Ctrl-C
    (a BaseException: no ``except Exception`` swallows it)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def _catch_sigterm() -> None:
    """SIGTERM -> :class:`Terminated` in the main thread, unless someone else already handles it."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_terminated)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _catch_sigterm()
    try:
        return args.func(args)
    except WeakclipError as err:
        print(f"weakclip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
