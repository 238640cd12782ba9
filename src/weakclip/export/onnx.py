"""ONNX export of a segmentation network (PyTorch's ``torch.export``-based exporter) and running it with
onnxruntime.

The graph is captured with :func:`torch.export.export`, non-strict first and, where that fails (the
refinement model's positional-embedding cache reads tensor addresses), strict; then translated to ONNX
(``torch.onnx.export``, opset 18-23, default 20: onnxruntime >= 1.17 runs it). Batch and image sides are
dynamic: sides follow the :class:`~weakclip.export.network.SizeRule` (``32 * h32`` for the refinement model).
The file is one ``.onnx`` (weights inside) up to 2 GB, beside a ``.onnx.data`` file above that. The
initialisers' size is known before the file is written: ``reserve`` checks the free space for it first.

The exporter needs ``onnx`` and ``onnxscript``, running the file ``onnxruntime``: ``pip install
'weakclip[export]'``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from weakclip.export.network import SizeRule

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "OPSETS", "check_onnx_available", "export_onnx",
           "onnx_logits"]

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: Opsets the exporter has translations for (it would silently keep 18 for a lower one).
OPSETS = range(18, 24)
DEFAULT_OPSET = 20
#: Above this the weights go to an external ``.data`` file (protobuf's 2 GB limit).
_EXTERNAL_BYTES = 1_800_000_000
_QUIET_LOGGERS = ("torch._guards", "torch._dynamo", "torch.export", "torch._export",
                  "torch.fx.experimental.symbolic_shapes", "torch.onnx", "onnxscript")


def check_onnx_available(*, export: bool = True) -> None:
    """A one-line ExportError naming the extra when a package the ONNX export (or only running the file,
    ``export=False``) needs is missing."""
    from weakclip.export.errors import ExportError

    needed = ("onnx", "onnxscript", "onnxruntime") if export else ("onnxruntime",)
    missing = []
    for name in needed:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ExportError(f"ONNX export needs {', '.join(missing)}, which {verb} not installed: pip install "
                          "'weakclip[export]'")


@contextlib.contextmanager
def _quiet() -> None:
    """The exporter's progress lines, its logged first-attempt failures and deprecation warnings kept off the
    terminal; a failure still raises."""
    levels = {}
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _dynamic_dims(rule: SizeRule) -> dict[int, object]:
    from torch.export import Dim

    batch = Dim("batch", min=1)
    if rule.multiple_of > 1:
        m = rule.multiple_of
        lo = max(1, -(-rule.min_side // m))
        return {0: batch, 2: m * Dim(f"height_{m}", min=lo), 3: m * Dim(f"width_{m}", min=lo)}
    return {0: batch, 2: Dim("height", min=rule.min_side), 3: Dim("width", min=rule.min_side)}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200] + (" ..." if len(text) > 200 else "")


def export_onnx(network: nn.Module, path: str | Path, rule: SizeRule, *, opset: int = DEFAULT_OPSET,
                reserve: Callable[[int], None] | None = None) -> dict:
    """Write ``network`` (eval mode, logits at the input size) to ``path`` with dynamic batch and sides.
    ``reserve(nbytes)`` is called with the weights' size in the file before it is written (a check of the
    free space; the graph itself is small beside them).

    Returns ``{"opset", "external_data", "input_shape", "output_shape"}`` (the symbolic shapes as written).
    Raises ExportError (one line) when the network cannot be captured or translated.
    """
    from weakclip.export.errors import ExportError

    check_onnx_available()
    if int(opset) not in OPSETS:
        raise ExportError(f"ONNX opset {opset} is not supported by PyTorch's exporter: choose "
                          f"{OPSETS.start}-{OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    path = Path(path)
    (h, w), _ = rule.example_sizes()
    example = (torch.randn(2, 3, h, w),)
    dims = (_dynamic_dims(rule),)
    program = None
    # gradients on: under no_grad the positional-embedding cache would fix the size (prepared_for_export)
    with _quiet():
        errors = []
        for strict in (False, True):
            try:
                program = torch.export.export(network, example, dynamic_shapes=dims, strict=strict)
                break
            except Exception as exc:  # noqa: BLE001 - torch.export fails in many ways
                errors.append(exc)
        if program is None:
            raise ExportError(f"the network cannot be captured for ONNX (torch.export: "
                              f"{_one_line(errors[-1])})") from errors[-1]
        try:
            onnx_program = torch.onnx.export(program, example, dynamo=True, input_names=[INPUT_NAME],
                                             output_names=[OUTPUT_NAME], dynamic_shapes=dims,
                                             opset_version=int(opset), verbose=False)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the network cannot be translated to ONNX opset {opset}: "
                              f"{_one_line(exc)}") from exc
    del program
    size = sum(p.numel() * p.element_size() for p in network.parameters())
    size += sum(b.numel() * b.element_size() for b in network.buffers())
    external = size > _EXTERNAL_BYTES
    graph = onnx_program.model.graph
    if reserve is not None:
        reserve(sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None))
    onnx_program.save(str(path), external_data=external)

    def shape(value) -> list:
        return [d if isinstance(d, int) else str(d) for d in value.shape]

    info = {"opset": int(opset), "external_data": external, "input_shape": shape(graph.inputs[0]),
            "output_shape": shape(graph.outputs[0])}
    del onnx_program
    return info


def onnx_logits(path: str | Path, image: np.ndarray, *, threads: int | None = None,
                providers: list[str] | None = None) -> np.ndarray:
    """Run an exported file on ``image`` (``B x 3 x H x W`` float32, normalised) with onnxruntime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)})[0]
