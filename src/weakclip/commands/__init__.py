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
