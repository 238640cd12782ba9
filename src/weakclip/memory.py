"""Out-of-memory in plain words: how much memory this process may still take, whether an exception is an
out-of-memory error, and the one line that says so.

A very large photo must neither kill ``weakclip predict`` nor the images after it (issue 27): PyTorch's CPU
allocator raises a ``RuntimeError`` ("can't allocate memory"), CUDA a ``torch.OutOfMemoryError``, NumPy a
``MemoryError``, all of which :func:`is_out_of_memory` recognises; pydensecrf2's C++ throws
``std::bad_alloc`` through Cython, which aborts the whole process (exit 134), so its memory is checked
against :func:`available_bytes` BEFORE it runs (:mod:`weakclip.crf.pydensecrf_backend`).

No torch here (the CRF worker processes import this module without it).
"""

from __future__ import annotations

import re
from pathlib import Path

from weakclip.errors import OutOfMemory

__all__ = ["DEFAULT_MAX_SIDE", "OutOfMemory", "available_bytes", "human_bytes", "is_out_of_memory",
           "oom_reason"]

#: The longest side, in pixels, :class:`weakclip.api.Segmenter` processes an image at by default
#: (``max_side``, ``weakclip predict --max-side``): a photo of 48 MP with the authors' DeepLab-v1 ResNet-38
#: at its evaluation settings (5 scales up to 1.5, flip, CRF) then peaks at a few GB on a CPU, far below a
#: 24 GB GPU (benchmarks/README.md, "Very large photos"); VOC and COCO images (500 and 640 px) are below it,
#: so their predictions are unchanged.
DEFAULT_MAX_SIDE = 768

_UNLIMITED = float("inf")


def human_bytes(n: float) -> str:
    """``'1.2 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _read_int(path: Path) -> float:
    try:
        text = path.read_text().strip()
    except OSError:
        return _UNLIMITED
    if not text or text == "max":
        return _UNLIMITED
    try:
        return float(int(text.split()[0]))
    except ValueError:
        return _UNLIMITED


def _meminfo_available() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return _UNLIMITED


def _cgroup_room() -> float:
    """The memory limit of this process's cgroup (a container's) minus what it uses; inf without one."""
    room = _UNLIMITED
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return room
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / rel
            limit, used = _read_int(base / "memory.max"), _read_int(base / "memory.current")
        elif "memory" in controllers.split(","):  # cgroup v1
            base = Path("/sys/fs/cgroup/memory") / rel
            if not base.is_dir():
                base = Path("/sys/fs/cgroup/memory")
            limit = _read_int(base / "memory.limit_in_bytes")
            used = _read_int(base / "memory.usage_in_bytes")
            if limit >= 2 ** 60:  # v1 writes "no limit" as a huge number
                limit = _UNLIMITED
        else:
            continue
        if limit != _UNLIMITED and used != _UNLIMITED:
            room = min(room, max(0.0, limit - used))
    return room


def _address_space_room() -> float:
    """``ulimit -v`` (RLIMIT_AS) minus this process's virtual size; inf without a limit."""
    try:
        import resource
    except ImportError:  # not Unix
        return _UNLIMITED
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return _UNLIMITED
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return max(0.0, soft - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return _UNLIMITED


def available_bytes() -> float | None:
    """Bytes this process may still allocate: the least of the system's available memory (``MemAvailable``),
    its cgroup's room (a container's limit) and its address-space limit (``ulimit -v``); None where none of
    them can be read (not Linux)."""
    room = min(_meminfo_available(), _cgroup_room(), _address_space_room())
    return None if room == _UNLIMITED else room


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
              "failed to allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that memory ran out (``MemoryError``, ``torch.OutOfMemoryError``, PyTorch's CPU
    allocator's ``RuntimeError``, a CUDA/cuDNN/cuBLAS allocation failure)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(word in text for word in _OOM_WORDS) or "alloc_failed" in text
    return False


def oom_reason(exc: BaseException) -> str:
    """A short clause for an out-of-memory exception: ``'29.3 GiB could not be allocated'`` when the
    message says how much, else its first line."""
    if isinstance(exc, OutOfMemory):
        return str(exc)
    text = " ".join(str(exc).split())
    m = re.search(r"allocate (\d+) bytes", text)
    if m:
        return f"{human_bytes(int(m.group(1)))} could not be allocated"
    m = re.search(r"allocate ([\d.]+ ?[KMGT]i?B)", text)
    if m:
        return f"{m.group(1)} could not be allocated"
    first = text.split(". ")[0][:160]
    return first or type(exc).__name__
