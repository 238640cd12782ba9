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
                             "system by a job on another host that is gone)")


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
