"""One writer per work folder: a small JSON lock file, ``<folder>/.weakclip.lock``.

Every command that writes into a work or output folder takes the lock before it does any work
(:func:`weakclip.cli.main`, from the folder argument each command names with ``lock_folder``). The
file is created atomically (``O_CREAT | O_EXCL``) and records who holds it: host, pid, the process's
start time (so that a reused pid is not mistaken for the holder), the command, when it started, and
under ``torchrun`` the job (its run id and rendezvous address), which the job's other ranks check.

- A second writer fails at once with one line naming the holder (:class:`FolderInUse`).
- A lock whose holder is gone (same host, pid not running) is taken over with a one-line note: a
  ``kill -9`` leaves the file behind, and the next run of the same command resumes as before.
- A lock of another host cannot be checked from here: the message names the host and ``--force-unlock``.
  ``--force-unlock`` never takes the lock of a process that is alive on this host (refused in one line).
- An empty, unreadable or garbled lock file names no holder that could be alive: it is stale (taken over
  with the one-line note), not "in use on another host".
- Under ``torchrun`` rank 0 takes the lock; the other ranks only check that no other job holds it.
- Taking the lock again in the process that holds it is a no-op (the pipeline stages of ``run``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from weakclip.errors import WeakclipError

LOCK_NAME = ".weakclip.lock"

__all__ = ["LOCK_NAME", "FolderInUse", "WorkdirLock", "describe_holder", "holder_alive", "workdir_lock"]


class FolderInUse(WeakclipError):
    """Another process (or job) writes into the folder."""


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count fields after its last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _job_id() -> str | None:
    """The ``torchrun`` job this process belongs to (None when launched alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return f"{run_id}@{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def holder_alive(record: dict[str, Any]) -> bool | None:
    """Whether the process that wrote ``record`` still runs: True, False, or None for another host.
    A record naming no host (an empty, unreadable or garbled lock file) has no holder: False."""
    if not record.get("host"):
        return False
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = record.get("pid_start")
    now = _process_start(pid)
    return not (started is not None and now is not None and started != now)  # a reused pid is not it


def describe_holder(record: dict[str, Any]) -> str:
    """``'weakclip run' (pid 123 on host h, started 2026-12-03 00:40:12 UTC)``."""
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) \
        else "at an unknown time"
    job = f", torchrun job {record['job']}" if record.get("job") else ""
    return (f"'{record.get('command', 'weakclip')}' (pid {record.get('pid', '?')} on host "
            f"{record.get('host', '?')}, started {when}{job})")


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's record; None when the file is gone. A file being written (empty) is waited for briefly;
    one that never becomes JSON, or cannot be read, reads as an empty record (no holder that could be
    alive)."""
    for _ in range(40):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return {}
        try:
            record = json.loads(text)
            return record if isinstance(record, dict) else {}
        except ValueError:
            time.sleep(0.025)
    return {}


class WorkdirLock:
    """The lock of one folder; use :func:`workdir_lock` (a context manager) or ``acquire``/``release``."""

    def __init__(self, folder: str | Path, command: str, *, force: bool = False,
                 note: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.force = force
        self.note = note or (lambda line: print(line, file=sys.stderr, flush=True))
        self.token = secrets.token_hex(8)
        self.held = False
        self._created: list[Path] = []  # folders this lock made, removed again if left empty

    # ------------------------------------------------------------------ acquire
    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                "command": self.command, "started": time.time(), "job": _job_id(), "token": self.token}

    def _make_folder(self) -> None:
        from weakclip.write_errors import make_missing_folders, output_error

        try:
            make_missing_folders(self.folder, self._created)
        except OSError as exc:
            self._remove_created()
            failed = Path(exc.filename) if exc.filename else self.folder
            raise output_error(failed, exc, "nothing was written", what="the folder") from exc

    def _try_create(self) -> bool:
        """Create the lock file; False when one exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            from weakclip.write_errors import output_error

            self._remove_created()
            raise output_error(self.path, exc, "nothing was written", what="the lock file") from exc
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._record(), fh)
                fh.write("\n")
        except BaseException as exc:
            self.path.unlink(missing_ok=True)
            self._remove_created()
            if isinstance(exc, OSError):
                from weakclip.write_errors import output_error

                raise output_error(self.path, exc, "nothing was written", what="the lock file") from exc
            raise
        return True

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove the lock file if it still holds ``stale`` (renamed aside first, so that of two processes
        taking over at once only one removes it, and never a lock written in between)."""
        aside = self.folder / f"{LOCK_NAME}.{os.getpid()}.{secrets.token_hex(4)}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved == stale:
            aside.unlink(missing_ok=True)
            return
        with contextlib.suppress(OSError):  # not the one judged stale: put it back unless replaced
            os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _mine(self, record: dict[str, Any]) -> bool:
        return (record.get("host") == socket.gethostname() and record.get("pid") == os.getpid()
                and record.get("pid_start") == _process_start(os.getpid()))

    def acquire(self) -> WorkdirLock:
        """Take the lock or raise :class:`FolderInUse` (one line naming the holder)."""
        job = _job_id()
        if job is not None and _rank() != 0:
            self._check_for_rank(job)
            return self
        self._make_folder()
        for _ in range(20):
            if self._try_create():
                self.held = True
                return self
            record = _read(self.path)
            if record is None:
                continue  # released in between
            if self._mine(record):
                return self  # already held by this process: the outer holder releases it
            alive = holder_alive(record)
            where = f"the work folder {self.folder}"
            same_job = job is not None and record.get("job") == job
            if not record.get("host"):
                self.note(f"note: taking over the lock of {where}: its lock file {self.path} is empty or "
                          f"unreadable, no holder could be read from it")
                self._take_over(record)
                continue
            if alive is False or same_job or (self.force and alive is None):
                why = ("its torchrun job restarted" if same_job and alive else "as --force-unlock asks"
                       if alive is None else "that process is no longer running")
                self.note(f"note: taking over the lock of {where} from {describe_holder(record)}: {why}")
                self._take_over(record)
                continue
            self._remove_created()
            if self.force:
                raise FolderInUse(f"{where} is in use by {describe_holder(record)}, still running on this "
                                  f"host: --force-unlock only takes a lock whose holder cannot be checked "
                                  f"from here (another host's); wait for that process to end or stop it")
            if alive is None:
                raise FolderInUse(f"{where} is in use by {describe_holder(record)}, on another host: if that "
                                  f"process is gone, run again with --force-unlock")
            raise FolderInUse(f"{where} is in use by {describe_holder(record)}: wait for it to end or "
                              f"stop it (a second writer would mix its outputs in)")
        raise FolderInUse(f"could not take the lock of {self.folder}: {self.path} keeps changing")

    def _check_for_rank(self, job: str) -> None:
        """A rank other than 0 of a ``torchrun`` job: fail if another live job holds the folder."""
        if not self.path.is_file():
            return  # rank 0 takes it (or fails, and torchrun stops the job)
        record = _read(self.path) or {}
        if record.get("job") == job:
            return
        alive = holder_alive(record)
        if alive is False or (self.force and alive is None):  # --force-unlock: another host's lock only
            return
        raise FolderInUse(f"the work folder {self.folder} is in use by {describe_holder(record)}")

    # ------------------------------------------------------------------ release
    def _remove_created(self) -> None:
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty
        self._created = []

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        record = _read(self.path)
        if record is not None and record.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._remove_created()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def workdir_lock(folder: str | Path, command: str, *, force: bool = False,
                 note: Callable[[str], None] | None = None) -> Iterator[WorkdirLock]:
    """Hold the lock of ``folder`` for the ``with`` block (released on exceptions and Ctrl-C too)."""
    lock = WorkdirLock(folder, command, force=force, note=note)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
