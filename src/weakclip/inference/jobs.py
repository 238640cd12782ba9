"""Book-keeping shared by resumable per-image jobs (pseudo masks, predictions; seeds can use it too).

A job walks the ids of a dataset, this process's share of them under ``torchrun``
(:func:`weakclip.distributed.shard`), skips ids whose final output already exists (so a killed run
resumes where it stopped), writes every file atomically (final file last, so a file found under its
final name is complete), and reports an unreadable input on stderr, skips it and lists it in the
summary instead of dropping it silently. :class:`JobLedger` keeps those counts and gathers them over
the processes at the end; :func:`write_npz_atomic` writes byte-reproducible ``.npz`` files.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weakclip.distributed import env_world, shard
from weakclip.write_errors import writing

__all__ = ["JobLedger", "gather_objects", "sum_counts", "warn", "write_npz_atomic"]

# A fixed timestamp for the members of .npz files: numpy's savez stamps the current time, which
# would make two runs of a job differ byte for byte.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _dist_on() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def sum_counts(values: Sequence[int]) -> list[int]:
    """Element-wise sum of integer counts over every process (unchanged when not distributed)."""
    values = [int(v) for v in values]
    if not _dist_on():
        return values
    import torch
    import torch.distributed as dist

    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.cpu().tolist()]


def gather_objects(items: list) -> list:
    """Concatenate a picklable list from every process in rank order (unchanged when not distributed)."""
    if not _dist_on():
        return list(items)
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def warn(message: str, bar: Any = None) -> None:
    """Print a one-line message on stderr without breaking a tqdm bar."""
    if bar is not None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)




def write_npz_atomic(path: str | Path, compress: bool = True, **arrays: np.ndarray) -> Path:
    """Atomically write ``arrays`` as an ``.npz`` file (deflate-compressed unless ``compress=False``).

    Unlike ``np.savez_compressed`` the zip members carry a fixed timestamp, so equal arrays give equal
    bytes (a resumed job reproduces a fresh one exactly). ``np.load`` reads the file as usual.
    """
    path = Path(path)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", compression=method) as zf:
                for name, value in arrays.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
                    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
                    info.compress_type = method
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, buf.getvalue())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


class JobLedger:
    """Counts of one process's share of a per-image job, gathered over all processes by :meth:`summary`.

    Usage::

        ledger = JobLedger("pseudo-masks", dataset.ids, progress=True)
        for i in ledger:                       # this process's indices, with a progress bar on rank 0
            if final_output_exists(i):
                ledger.skip(dataset.ids[i]); continue
            try:
                ... compute and write ...
            except DataError as exc:
                ledger.fail(dataset.ids[i], exc); continue
            ledger.wrote(dataset.ids[i])
        summary = ledger.summary()             # collective: every process must call it

    ``limit`` stops the iteration once that many images were written by this process (a controlled
    "kill" for tests and smoke runs; the remaining ids are left for a later run).
    """

    def __init__(self, name: str, ids: Sequence[str], *, rank: int | None = None,
                 world_size: int | None = None, progress: bool = True, limit: int | None = None) -> None:
        env_rank, env_size, _ = env_world()
        self.name = name
        self.ids = list(ids)
        self.rank = env_rank if rank is None else int(rank)
        self.world_size = env_size if world_size is None else int(world_size)
        self.indices: list[int] = shard(range(len(self.ids)), self.rank, self.world_size)
        self.progress = progress and self.rank == 0
        self.limit = None if limit is None else max(0, int(limit))
        self.written = 0
        self.skipped = 0
        self.failures: list[tuple[str, str]] = []
        self.stopped_early = False
        self.bar = None

    def __iter__(self) -> Iterator[int]:
        from tqdm import tqdm

        self.bar = tqdm(self.indices, desc=f"{self.name} [{self.rank}/{self.world_size}]", unit="img",
                        disable=not self.progress, dynamic_ncols=True)
        try:
            for i in self.bar:
                if self.limit is not None and self.written >= self.limit:
                    self.stopped_early = True
                    break
                yield i
        finally:
            self.bar.close()
            self.bar = None

    def wrote(self, ident: str) -> None:
        self.written += 1

    def skip(self, ident: str) -> None:
        self.skipped += 1

    def fail(self, ident: str, error: BaseException | str) -> None:
        message = " ".join(str(error).split()) or type(error).__name__
        self.failures.append((ident, message))
        warn(f"{self.name}: skipped image {ident!r}: {message}", self.bar)

    def summary(self) -> dict[str, Any]:
        """Totals over every process (a collective call under ``torchrun``)."""
        written, skipped, stopped = sum_counts([self.written, self.skipped, int(self.stopped_early)])
        failures = gather_objects(self.failures)
        return {
            "images": len(self.ids),
            "written": written,
            "skipped_existing": skipped,
            "failed": len(failures),
            "failures": dict(failures),
            "complete": stopped == 0,
            "processes": self.world_size,
        }
