"""Exceptions with messages meant for a person: one line, naming the file or value at fault."""


class WeakclipError(Exception):
    """Base class: the CLI prints the message alone (no traceback) and exits with status 2."""


class DataError(WeakclipError):
    """Bad input data: a missing or unreadable image, a mask of the wrong size, an unknown class."""


class WeightsError(WeakclipError):
    """A weights file that is missing, corrupt, or of another architecture."""


class OutputError(WeakclipError):
    """An output that could not be written (a full disk, a read-only or foreign folder): says which file,
    the free space, and what was kept."""
