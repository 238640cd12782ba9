"""TorchScript export of a segmentation network: :func:`torch.jit.trace` and :func:`torch.jit.save`, loaded
back with :func:`torch.jit.load` (PyTorch alone, no weakclip).

Tracing records the operations run on one example (batch 2, a small size of the
:class:`~weakclip.export.network.SizeRule`); the sizes the networks compute with (interpolation targets, the
positional-embedding grid) are recorded from the input's shape, so the file takes other batches and sizes of
the same rule, which the export checks on a second size. PyTorch marks TorchScript as deprecated (2.14 still
traces, saves and loads it); ONNX is the format to prefer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from weakclip.export.network import SizeRule

__all__ = ["export_torchscript", "torchscript_logits"]


def export_torchscript(network: nn.Module, path: str | Path, rule: SizeRule) -> dict:
    """Trace ``network`` (eval mode) and save it to ``path``; ExportError (one line) when tracing fails."""
    from weakclip.export.errors import ExportError

    (h, w), _ = rule.example_sizes()
    example = torch.randn(2, 3, h, w)
    with warnings.catch_warnings():  # gradients on, as for ONNX (see prepared_for_export)
        # TracerWarnings on shape comparisons and the deprecation notices: the result is checked instead
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(network, example, check_trace=False, strict=False)
            torch.jit.save(traced, str(path))
        except Exception as exc:  # noqa: BLE001 - tracing fails in many ways
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ExportError(f"the network cannot be traced to TorchScript: {text}") from exc
    return {"traced_at": [2, 3, h, w]}


def torchscript_logits(path: str | Path, image: torch.Tensor) -> torch.Tensor:
    """Run a saved TorchScript file on ``image`` (``B x 3 x H x W`` float32, normalised) on the CPU."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
        out = module(image)
    return out
