"""Sub-commands of the ``weakclip`` CLI, one module each.

Every module listed in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds its parser
and sets ``func`` to a function that imports the heavy parts (torch, models) only when it runs.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "weakclip.commands.evaluate",
    "weakclip.commands.data",
    "weakclip.commands.weights",
    "weakclip.commands.seeds",
    "weakclip.commands.train",
    "weakclip.commands.retrain",
    "weakclip.commands.pseudo_masks",
    "weakclip.commands.predict",
    "weakclip.commands.export",
    "weakclip.commands.run",
    "weakclip.commands.report",
)


def lock_folder(parser, attr: str, existing: bool = False) -> None:
    """The command writes into the folder ``args.<attr>``: :func:`weakclip.cli.main` holds that folder's
    lock (:mod:`weakclip.workdir_lock`) while the command runs (``existing``: only when the folder exists,
    for a command that never makes it); ``--force-unlock`` takes a lock whose holder cannot be checked
    from here (another host)."""
    parser.set_defaults(lock_folder=attr, lock_existing=existing)
    parser.add_argument("--force-unlock", action="store_true",
                        help="take the folder's lock from its holder (for a lock left on a shared file "
                             "system by a job on another host that is gone; never a process alive on this "
                             "host)")


def output_files(parser, *attrs: str) -> None:
    """Files (``--json``) or folders (``--out``) the command writes besides its locked folder: their
    folders are checked for writability before any work (a read-only folder fails at once)."""
    parser.set_defaults(output_files=attrs)


def flag_overrides(args, flag_keys, **paths) -> list[str]:
    """``key=value`` config overrides from the direct flags that were given: ``flag_keys`` pairs an argparse
    attribute with its config key; ``paths`` maps config keys to values (e.g. ``data.root``) set when not
    None. They come before ``--set``, so that ``--set`` wins."""
    overrides = [f"{key}={value}" for key, value in paths.items() if value is not None]
    for attr, key in flag_keys:
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def folder_default_split(command: str, root, purpose: str, what: str, *,
                         to_stderr: bool = False) -> str | None:
    """A folder dataset's default split for ``purpose`` (:func:`weakclip.data.folder.default_split`), said in
    one line by the first process (``what``: e.g. "training split"; ``to_stderr``: when stdout is the
    command's product, e.g. ``--print-config``)."""
    import os
    import sys

    from weakclip.data.folder import default_split, split_choice_line

    split = default_split(root, purpose) if root is not None else None
    if os.environ.get("RANK", "0") == "0":
        line = f"{command}: {split_choice_line(what, split, purpose)}"
        print(line, file=sys.stderr if to_stderr else sys.stdout)
    return split


def report_failed_items(command: str, failures, total: int, show: bool = True) -> int:
    """The exit status of a command that went over ``total`` items: 0 when none failed, else 1
    (``EXIT_ITEMS_FAILED``, the same for every command) after one line on stderr,
    ``weakclip <command>: N failed (of M images): ...; fix or remove them and run again``."""
    import sys

    from weakclip.errors import EXIT_ITEMS_FAILED, EXIT_OK, failed_items_message

    if not failures:
        return EXIT_OK
    if show:
        print(f"weakclip {command}: {failed_items_message(failures, total)}; fix or remove them and run "
              "again (the others are written and kept)", file=sys.stderr)
    return EXIT_ITEMS_FAILED
