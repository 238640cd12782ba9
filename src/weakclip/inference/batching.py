"""Running sliding windows through the model in batches: a fixed number, or as many as memory allows.

:class:`WindowRunner` is the one place the test-time model is called. It takes a batch of windows of
one (padded) size, runs it in chunks of at most ``limit`` windows under the optional autocast, and
returns float32 logits resized to the windows' size. With ``window_batch=0`` (:data:`AUTO`) the limit is
chosen at the first call: on CUDA from the free device memory and the memory one and two windows of the
largest size need (:func:`windows_for_memory`), on other devices :data:`CPU_AUTO_WINDOWS`. Whatever the
limit, a CUDA out-of-memory error halves it and the chunk is run again (the device is shared, other
tensors grow), so a long job never dies of a batch that was a little too large.

Batching does not change what a window gives: the model is in eval mode and treats each window alone;
only the floating-point order of a few kernels can differ (about 1e-6 of the logits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AUTO", "CPU_AUTO_WINDOWS", "MAX_AUTO_WINDOWS", "WindowRunner", "windows_for_memory"]

#: ``window_batch`` value that sizes the batches by the device's free memory.
AUTO = 0

#: Windows per forward pass that ``AUTO`` gives off CUDA: on a CPU larger batches gain nothing (ViT-B/16
#: at 512 x 512 on 2 cores: 0.90x to 1.01x of batch 1 at batches of 2 and 4, benchmarks/window_batch.py)
#: and only hold more memory.
CPU_AUTO_WINDOWS = 1

#: Largest batch ``AUTO`` chooses: beyond it a GPU is already saturated by ViT-B/16 at 512 x 512.
MAX_AUTO_WINDOWS = 64


def windows_for_memory(free_bytes: float, fixed_bytes: float, per_window_bytes: float, *,
                       fraction: float = 0.8, cap: int = MAX_AUTO_WINDOWS) -> int:
    """How many windows fit in ``fraction`` of ``free_bytes`` when a batch of ``n`` takes
    ``fixed_bytes + n * per_window_bytes``; at least 1, at most ``cap``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_window_bytes <= 0:
        return max(1, int(cap))
    room = free_bytes * fraction - max(0.0, fixed_bytes)
    return int(max(1, min(int(cap), room // per_window_bytes)))


def _model_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    return out["logits"] if isinstance(out, dict) else out


class WindowRunner:
    """Calls ``model`` on batches of windows; see the module docstring.

    Args:
        model: returns ``{"logits": N x K x h x w}`` (any h, w) or the logits tensor itself.
        num_classes: K, checked on every output.
        window_batch: windows per forward pass; :data:`AUTO` (0) sizes it by free memory.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the model under autocast.
        memory_fraction: share of the free device memory ``AUTO`` may plan for.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, window_batch: int = 1,
                 autocast_dtype: torch.dtype | None = None, memory_fraction: float = 0.8,
                 max_auto: int = MAX_AUTO_WINDOWS) -> None:
        if int(window_batch) < 0:
            raise ValueError(f"window_batch must be >= 0 (0: by free memory), got {window_batch}")
        self.model = model
        self.num_classes = int(num_classes)
        self.requested = int(window_batch)
        self.limit: int | None = self.requested if self.requested != AUTO else None
        self.autocast_dtype = autocast_dtype
        self.memory_fraction = float(memory_fraction)
        self.max_auto = int(max_auto)
        self.calls = 0  # forward passes run
        self.halvings = 0  # out-of-memory retries

    # ------------------------------------------------------------------ sizing
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        amp = (torch.autocast(device_type=batch.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        with amp:
            logits = _model_logits(self.model, batch)
        self.calls += 1
        if logits.dim() != 4 or logits.shape[0] != batch.shape[0] or logits.shape[1] != self.num_classes:
            raise ValueError(f"the model gives logits of shape {tuple(logits.shape)} for {batch.shape[0]} "
                             f"windows, expected {batch.shape[0]} x {self.num_classes} x h x w")
        return logits

    def _measure(self, device: torch.device, window_size: Sequence[int]) -> int:
        """Windows of ``window_size`` per pass that fit the free CUDA memory (one and two measured)."""
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        peaks = []
        for n in (1, 2):
            probe = torch.zeros(n, 3, int(window_size[0]), int(window_size[1]), device=device)
            torch.cuda.reset_peak_memory_stats(device)
            self._forward(probe)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
            del probe
        per_window = max(peaks[1] - peaks[0], 1)
        fixed = peaks[0] - per_window
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch
        return windows_for_memory(free, fixed, per_window, fraction=self.memory_fraction, cap=self.max_auto)

    def resolve(self, device: torch.device, window_size: Sequence[int]) -> int:
        """The batch limit, chosen now when ``AUTO`` and not chosen yet, for windows of at most
        ``window_size`` (h, w): the largest the job will run, measured on CUDA."""
        if self.limit is None:
            self.limit = (self._measure(device, window_size) if device.type == "cuda"
                          else min(CPU_AUTO_WINDOWS, self.max_auto))
        return self.limit

    # ------------------------------------------------------------------ running
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``N x K x h x w`` of windows ``N x 3 x h x w`` (resized to the windows' size)."""
        limit = self.resolve(batch.device, batch.shape[-2:])
        outs = []
        start = 0
        while start < batch.shape[0]:
            chunk = batch[start:start + limit]
            try:
                logits = self._forward(chunk)
            except torch.OutOfMemoryError:
                if limit == 1:
                    raise
                limit = max(1, limit // 2)
                self.limit = limit
                self.halvings += 1
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            outs.append(F.interpolate(logits.float(), size=chunk.shape[-2:], mode="bilinear",
                                      align_corners=False))
            start += chunk.shape[0]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
