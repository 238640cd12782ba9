"""The ``weakclip`` command: a thin layer of argument parsing over the Python API.

Each sub-command imports what it needs when it runs, so ``weakclip --help`` stays fast.
Errors meant for the user (:class:`weakclip.errors.WeakclipError`) print one line and exit with the error's
``exit_status``: 2 (bad input or usage), 1 (finished, but some items failed), 3 (a regression stop); so
does (2) a disk's refusal of a write that no writer turned into an :class:`~weakclip.errors.OutputError`.
A command that writes into a work folder runs holding that folder's lock (:mod:`weakclip.workdir_lock`).
Ctrl-C (SIGINT) and SIGTERM stop the command through its clean-up code (worker processes stopped, the
lock released, partial files removed): ``interrupted``, exit 130; ``terminated``, exit 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from pathlib import Path

from weakclip import __version__
from weakclip.commands import COMMAND_MODULES
from weakclip.commands.flags import WeakclipParser
from weakclip.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, WeakclipError


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


def _command_name(args: argparse.Namespace) -> str:
    action = getattr(args, "seeds_action", None)
    return " ".join(["weakclip", args.command, *([action] if action else [])])


def _folder_lock(args: argparse.Namespace):
    """The lock of the folder the command writes into (nothing for commands that only read, for
    ``--print-config`` and for a folder not given)."""
    attr = getattr(args, "lock_folder", None)
    folder = getattr(args, attr, None) if attr else None
    if folder is None or getattr(args, "print_config", False):
        return contextlib.nullcontext()
    if getattr(args, "lock_existing", False) and not Path(folder).is_dir():
        return contextlib.nullcontext()
    from weakclip.workdir_lock import workdir_lock

    return workdir_lock(folder, _command_name(args), force=args.force_unlock)


def _check_outputs(args: argparse.Namespace) -> None:
    """A read-only (or otherwise unwritable) output folder fails before the work."""
    paths = [getattr(args, attr, None) for attr in getattr(args, "output_files", ())]
    if not any(p is not None for p in paths):
        return
    from weakclip.write_errors import check_writable

    for attr, path in zip(args.output_files, paths):
        if path is not None:
            path = Path(path)
            is_file = attr == "json" or path.suffix.lower() == ".json"
            check_writable(path.parent if is_file else path, f"into the --{attr.replace('_', '-')} folder")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _catch_sigterm()
    try:
        with _folder_lock(args):
            _check_outputs(args)
            return args.func(args)
    except OSError as err:
        from weakclip.write_errors import is_write_failure, output_error

        if not is_write_failure(err) or err.filename is None:
            raise
        print(f"weakclip {args.command}: error: {output_error(err.filename, err)}", file=sys.stderr)
        return EXIT_USAGE
    except WeakclipError as err:
        print(f"weakclip {args.command}: error: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
