"""TorchScript export of a segmentation network: :func:`torch.jit.trace` and :func:`torch.jit.save`, loaded
back with :func:`torch.jit.load` (PyTorch alone, no weakclip).

Tracing records the operations run on one example (batch 2, a small size of the
:class:`~weakclip.export.network.SizeRule`); the sizes the networks compute with (interpolation targets, the
positional-embedding grid) are recorded from the input's shape, so the file takes other batches and sizes of
the same rule, which the export checks on a second size. PyTorch marks TorchScript as deprecated (2.14 still
traces, saves and loads it); ONNX is the format to prefer.

The traced module is serialised in memory first and the bytes written by Python: ``torch.jit.save`` to a
path writes through PyTorch's C++ zip writer, which on a full disk aborts the whole process (``terminate
called after throwing an instance of 'c10::Error'``, exit 134) where no ``except`` can catch it. In memory
its size is known, so the free space is checked before writing (``reserve``), and a write that still fails
is an ``OSError`` like any other.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from weakclip.export.network import SizeRule

__all__ = ["export_torchscript", "torchscript_logits", "write_new_file"]


def write_new_file(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` into the new file ``path`` (OSError, e.g. ENOSPC, as the disk gives it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def export_torchscript(network: nn.Module, path: str | Path, rule: SizeRule, *,
                       reserve: Callable[[int], None] | None = None) -> dict:
    """Trace ``network`` (eval mode) and save it to ``path``; ExportError (one line) when tracing fails.
    ``reserve(nbytes)`` is called with the file's size before it is written (a check of the free space)."""
    from weakclip.export.errors import ExportError

    (h, w), _ = rule.example_sizes()
    example = torch.randn(2, 3, h, w)
    with warnings.catch_warnings():  # gradients on, as for ONNX (see prepared_for_export)
        # TracerWarnings on shape comparisons and the deprecation notices: the result is checked instead
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(network, example, check_trace=False, strict=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
        except Exception as exc:  # noqa: BLE001 - tracing fails in many ways
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ExportError(f"the network cannot be traced to TorchScript: {text}") from exc
    del traced
    data = buffer.getbuffer()
    if reserve is not None:
        reserve(len(data))
    write_new_file(path, data)
    return {"traced_at": [2, 3, h, w]}


def torchscript_logits(path: str | Path, image: torch.Tensor) -> torch.Tensor:
    """Run a saved TorchScript file on ``image`` (``B x 3 x H x W`` float32, normalised) on the CPU."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
        out = module(image)
    return out
