"""The export's one error: a network that cannot be exported, a folder in the way, a missing extra."""

from __future__ import annotations

from weakclip.errors import WeakclipError

__all__ = ["ExportError"]


class ExportError(WeakclipError):
    """One line for a person: what cannot be exported or written, and why."""
