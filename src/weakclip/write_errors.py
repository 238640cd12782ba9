"""Failed writes in plain words: a full disk, a read-only folder, a folder of another user.

Every writer of outputs and checkpoints writes a temporary file next to its target and renames it over the
target when complete, so a failed write leaves the previous files whole. :func:`writing` turns the
``OSError`` (``ENOSPC``, ``EROFS``, ``EACCES`` ...) or PyTorch's ``RuntimeError`` from inside ``torch.save``
into an :class:`~weakclip.errors.OutputError`: one line with the file, the reason, the space left on
its disk and what was kept. :func:`check_writable` finds a read-only output folder before the work;
:func:`check_space` a disk too full for a write of known size, before a library writes it (PyTorch's C++
file writer, ``torch.jit.save`` to a path, aborts the whole process on a full disk: no ``except`` catches it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from weakclip.errors import OutputError

__all__ = ["check_space", "check_writable", "free_space", "is_write_failure", "output_error", "writing"]

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is too large for the file system",
    errno.EIO: "input/output error",
    errno.ENOTDIR: "a file stands where a folder should be",
}

# what PyTorch's zip writer says when the file under it fails (torch.save on a full disk)
_TORCH_WRITE_WORDS = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos")

#: what a failed write of a file that replaces its target keeps, unless the writer knows better
KEPT_DEFAULT = ("what was written before is kept; free some space (or make the folder writable) and run "
                "the same command again: finished outputs are skipped")


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a disk's refusal to take a write (not a bug of the writer)."""
    if isinstance(exc, OSError):
        return exc.errno in _REASONS
    if isinstance(exc, RuntimeError):
        return _os_error(exc) is not None or any(word in str(exc) for word in _TORCH_WRITE_WORDS)
    return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _nearest_existing(path: str | Path) -> Path:
    """``path`` itself when it exists, else its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def make_missing_folders(folder: str | Path, made: list[Path]) -> None:
    """Make ``folder`` and its missing parents, outermost first, appending each folder made to ``made`` as it
    is made (so that a caller can remove them again on a failure, this one's included); the ``OSError`` of a
    folder that cannot be made is raised as it is (its ``filename`` names that folder)."""
    missing = []
    path = Path(folder)
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        made.append(path)


def free_space(path: str | Path) -> str:
    """``'1.2 GiB free'`` on the file system of ``path`` (its nearest existing folder)."""
    folder = _nearest_existing(path)
    try:
        return f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        return "free space unknown"


def _os_error(exc: BaseException | None) -> OSError | None:
    """The disk's ``OSError`` behind ``exc`` (PyTorch's writer raises its own error while handling it)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _REASONS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def output_error(path: str | Path, exc: BaseException, kept: str | None = None, *,
                 what: str = "") -> OutputError:
    """The one-line :class:`OutputError` for a failed write of ``path`` (``what``: e.g. 'checkpoint').
    Call it before removing the partial file, so that the free space is the disk's at the failure."""
    cause = _os_error(exc)
    reason = _REASONS[cause.errno] if cause is not None else "the write failed"
    name = f"{what} {path}" if what else str(path)
    return OutputError(f"could not write {name}: {reason} ({free_space(path)} on its disk); "
                       f"{kept or KEPT_DEFAULT}")


@contextlib.contextmanager
def writing(path: str | Path, kept: str | None = None, *, what: str = "") -> Iterator[None]:
    """Turn a disk's refusal inside the block into :func:`output_error`; other errors pass unchanged."""
    try:
        yield
    except OutputError:
        raise
    except (OSError, RuntimeError) as exc:
        if not is_write_failure(exc):
            raise
        raise output_error(path, exc, kept, what=what) from exc


def check_writable(folder: str | Path, what: str = "into the output folder") -> None:
    """Fail now, before the work, when files cannot be created in ``folder``: a probe file is created and
    removed in it or, when it does not exist yet, in its nearest existing parent (where the writer will
    make it). Nothing is left behind; a folder that cannot be written is an :class:`OutputError`."""
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(f"could not write {what} {folder}: {existing} is a file, not a folder")
    probe = existing / f".weakclip-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise output_error(folder, exc, "nothing was written", what=what) from exc
    os.close(fd)
    probe.unlink(missing_ok=True)


def check_space(path: str | Path, needed: int, kept: str | None = None, *, what: str = "") -> None:
    """Fail now, in the one line of :func:`output_error`, when the disk of ``path`` (its nearest existing
    folder) has less than ``needed`` bytes free; nothing is written. Where the free space cannot be read the
    write goes ahead (its own failure is then the error)."""
    try:
        free = shutil.disk_usage(_nearest_existing(path)).free
    except OSError:
        return
    if free < needed:
        name = f"{what} {path}" if what else str(path)
        reason = _REASONS[errno.ENOSPC]
        raise OutputError(f"could not write {name}: {reason} ({_size(free)} free on its disk, it needs about "
                          f"{_size(needed)}); {kept or KEPT_DEFAULT}")
