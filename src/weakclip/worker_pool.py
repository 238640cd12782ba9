"""A bounded pool of CPU worker processes that is safe after the parent has run torch, and dies with it.

Used by the pseudo-mask stage for the full-resolution dense CRF (the release's pydensecrf, one image per
job). Three rules, each from a failure seen on real photos:

* **No torch thread pool in a forked child.** A process forked after the parent ran the model with
  several threads inherits GNU OpenMP's thread-team state without its threads; its first parallel torch
  op (a ``torch.stack`` of a photo's probabilities) then waited forever in ``gomp_team_barrier_wait_end``.
  So a job that runs torch is started with ``spawn`` (a fresh interpreter, one torch thread; scripts
  that call it need the usual ``if __name__ == "__main__":`` guard), and a fork is used only for a job
  that runs no torch at all (:func:`worker_context`: the pseudo-mask stage's pydensecrf job, numpy
  and pydensecrf2 only), and only while CUDA is not initialised. A forked worker starts at once and
  needs no guard in the caller's script.
* **Ctrl-C is the parent's.** The workers ignore SIGINT (the terminal sends it to the whole process
  group); the parent's ``KeyboardInterrupt`` terminates them at once instead of waiting for their jobs.
* **No orphans.** Each worker watches its parent and exits when the parent is gone (SIGTERM or
  ``kill -9`` of the main process), so no worker holding a photo's probabilities outlives the run.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from weakclip.errors import WeakclipError

__all__ = ["PARENT_POLL_SECONDS", "WorkerPool", "WorkerPoolError", "init_worker", "usable_cpus",
           "worker_context"]

PARENT_POLL_SECONDS = 0.25


class WorkerPoolError(WeakclipError):
    """A worker process died (killed, out of memory): the work done so far is kept."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def worker_context(start_method: str | None = None, *, runs_torch: bool = True):
    """The multiprocessing context of workers whose job ``runs_torch`` (or not): ``start_method`` when
    given; else ``fork`` for a job that runs no torch op while CUDA is not initialised here (where fork
    exists), ``spawn`` otherwise (the module docstring says why)."""
    if start_method is None:
        torch = sys.modules.get("torch")
        cuda_up = torch is not None and torch.cuda.is_initialized()
        forkable = "fork" in multiprocessing.get_all_start_methods()
        start_method = "fork" if forkable and not runs_torch and not cuda_up else "spawn"
    return multiprocessing.get_context(start_method)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent is gone: nobody will collect our results


def init_worker(parent_pid: int, torch_threads: int | None = None) -> None:
    """Runs first in each worker (a pool's ``initializer``, with ``os.getpid()`` of the parent): ignore
    Ctrl-C (and take SIGTERM's default back from the CLI's handler), exit with the parent, and with
    ``torch_threads`` (spawned workers whose job runs torch) limit torch's threads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="weakclip-parent-watch",
                     daemon=True).start()


class WorkerPool:
    """Runs ``job(*args)`` in ``workers`` processes (inline when 0), with at most ``max_pending`` jobs
    queued; ``on_done(ident, result)`` is called in the parent, in completion order, for each.
    ``runs_torch``: whether the job runs torch ops (then spawned, one torch thread; else forked where
    :func:`worker_context` allows); ``start_method`` overrides that choice."""

    def __init__(self, job: Callable[..., Any], workers: int, on_done: Callable[[str, Any], None], *,
                 runs_torch: bool = True, max_pending: int | None = None, start_method: str | None = None,
                 what: str = "worker") -> None:
        self.job = job
        self.workers = max(0, int(workers))
        self.max_pending = max(1, int(max_pending) if max_pending else 2 * max(1, self.workers))
        self.on_done = on_done
        self.runs_torch = runs_torch
        self.start_method = start_method
        self.what = what
        self.pending: dict[Future, str] = {}
        self.pool: ProcessPoolExecutor | None = None

    def _collect(self, block_until: int) -> None:
        while len(self.pending) > block_until:
            finished, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                ident = self.pending.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool as exc:
                    raise WorkerPoolError(
                        f"a {self.what} process died (killed or out of memory?) while on {ident!r}; what was "
                        "written so far is kept: run the same command again to go on, or with fewer "
                        "worker processes") from exc
                self.on_done(ident, result)

    def submit(self, ident: str, *args: Any) -> None:
        if self.workers == 0:
            self.on_done(ident, self.job(*args))
            return
        if self.pool is None:
            context = worker_context(self.start_method, runs_torch=self.runs_torch)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=context,
                                            initializer=init_worker,
                                            initargs=(os.getpid(), 1 if self.runs_torch else None))
        self._collect(self.max_pending - 1)
        self.pending[self.pool.submit(self.job, *args)] = ident

    def drain(self) -> None:
        """Wait for every queued job (their ``on_done`` runs)."""
        self._collect(0)

    def close(self, cancel: bool = False) -> None:
        """Stop the workers: after their jobs, or with ``cancel`` at once (queued and running jobs lost)."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if not cancel:
            pool.shutdown(wait=True)
            return
        self.pending.clear()
        # ProcessPoolExecutor has no public way to stop running jobs before Python 3.14's
        # terminate_workers(); before that its (private) process table is what there is
        procs = list((getattr(pool, "_processes", None) or {}).values())
        terminate = getattr(pool, "terminate_workers", None)
        if terminate is not None:
            terminate()
        else:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.join(timeout=5)
