"""Exceptions with messages meant for a person: one line, naming the file or value at fault.

Each carries the exit status of the ``weakclip`` command that ends with it (``exit_status``; the README's
table): 2 for bad input or usage (the default), 1 for work that finished but left some items undone
(:class:`ItemsFailed`), 3 for a ``--stop-on-regression`` stop. 0 is success, 130 an interrupt (Ctrl-C),
143 a SIGTERM.
"""

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_REGRESSION = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class WeakclipError(Exception):
    """Base class: the CLI prints the message alone (no traceback) and exits with ``exit_status`` (2)."""

    exit_status = EXIT_USAGE


class DataError(WeakclipError):
    """Bad input data: a missing or unreadable image, a mask of the wrong size, an unknown class."""


class WeightsError(WeakclipError):
    """A weights file that is missing, corrupt, or of another architecture."""


class OutputError(WeakclipError):
    """An output that could not be written (a full disk, a read-only or foreign folder): says which file,
    the free space, and what was kept."""


class OutOfMemory(WeakclipError, MemoryError):
    """Memory ran out (or would have: checked before a library that aborts the process on it) for one item,
    e.g. a very large photo; the message says its size and what to set. Also a :class:`MemoryError`."""


class ItemsFailed(WeakclipError):
    """The work finished, but some items (images) failed and have no output: exit status 1."""

    exit_status = EXIT_ITEMS_FAILED


def failed_items_message(failures: dict[str, str] | list[str], total: int, what: str = "images") -> str:
    """``N failed (of M images): a: why; b: why, ...`` -- the one line every command ends with."""
    items = list(failures.items()) if isinstance(failures, dict) else [(str(f), "") for f in failures]
    shown = "; ".join(f"{k}: {v}" if v else k for k, v in items[:3])
    more = f"; ... and {len(items) - 3} more" if len(items) > 3 else ""
    return f"{len(items)} failed (of {total} {what}): {shown}{more}"
