"""Write an export folder: the network (``model.onnx`` or ``model.pt``) and ``weakclip-model.json``, checked
against PyTorch, all or nothing.

The folder is built as a hidden temporary sibling and renamed into place at the end, so an interrupted or
failed export leaves no half-written folder; an existing non-empty folder is refused before anything runs.
On every failure (a refused export, a crash or Ctrl-C inside the exporter, a full or read-only disk) the
temporary folder and the parent folders made for ``out`` are removed again. A disk's refusal is one
:class:`~weakclip.errors.OutputError` line naming ``out`` (never the temporary folder), the reason and the
free space, as every writer's (:mod:`weakclip.write_errors`); the free space is checked against the file's
size before it is written (a full disk under PyTorch's own file writer would abort the process).
After writing, the exported file is loaded back (onnxruntime on the CPU, or ``torch.jit.load``) and run on
one random normalised input of another size and batch than the one traced; its logits must be within
``1e-3`` of the logits' scale (max |logit|) of PyTorch's and give the same argmax on >= 99.9% of the pixels,
or the export fails.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakclip.export.errors import ExportError
from weakclip.export.metadata import METADATA_NAME, build_metadata
from weakclip.export.network import SizeRule, prepared_for_export, size_rule_of
from weakclip.write_errors import check_space, is_write_failure, make_missing_folders, output_error

__all__ = ["FILES", "FORMATS", "TOLERANCE", "compare_logits", "export_segmenter", "summary_line"]

FORMATS: tuple[str, ...] = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
#: max |exported - PyTorch| allowed, as a fraction of max |PyTorch logit|; and the argmax agreement needed.
TOLERANCE = 1e-3
MIN_AGREEMENT = 0.999
#: room asked for on the disk beyond the network's file (the metadata file, the file system's own records)
ROOM_BYTES = 1 << 20
#: what a failed export keeps
_NOTHING = "nothing was written"
_WHAT = "the export folder"


def compare_logits(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """``max_abs_diff``, ``logit_scale`` (max |ref|) and ``argmax_agreement`` (fraction of pixels) of two
    ``B x K x H x W`` logit arrays."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ExportError(f"the exported network gives logits of shape {got.shape}, PyTorch {ref.shape}")
    return {"max_abs_diff": float(np.abs(got - ref).max()), "logit_scale": float(np.abs(ref).max()),
            "argmax_agreement": float((got.argmax(axis=1) == ref.argmax(axis=1)).mean())}


def _close(stats: dict[str, float]) -> bool:
    scale = max(stats["logit_scale"], 1e-6)
    return stats["max_abs_diff"] <= TOLERANCE * scale and stats["argmax_agreement"] >= MIN_AGREEMENT


def check_folder(out: str | Path) -> Path:
    """``out`` as a Path; ExportError when it exists and is not an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a folder with files in it" if out.is_dir() else "a file"
        raise ExportError(f"{out} already exists ({what}): give a new or empty --out folder; nothing was "
                          "written")
    return out


def _cpu_network(segmenter: Any) -> torch.nn.Module:
    network = segmenter.network
    if any(t.device.type != "cpu" for t in [*network.parameters(), *network.buffers()]):
        network = copy.deepcopy(network).cpu()
    return network


def _make_folders(folder: Path, out: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the folders made, outermost first (OutputError naming
    ``out`` when one cannot be made, after removing those made)."""
    made: list[Path] = []
    try:
        make_missing_folders(folder.absolute(), made)
    except OSError as exc:
        error = output_error(out, exc, _NOTHING, what=_WHAT)
        _remove_folders(made)
        raise error from exc
    return made


def _remove_folders(made: list[Path]) -> None:
    for path in reversed(made):
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty


def _write_failure(exc: BaseException, out: Path, tmp: Path):
    """The one-line OutputError for a disk's refusal inside the export (naming ``out``, or the file outside
    the temporary folder that failed), or None for any other error."""
    if not isinstance(exc, (OSError, RuntimeError)) or not is_write_failure(exc):
        return None
    name = getattr(exc, "filename", None)
    if name and not Path(name).absolute().is_relative_to(tmp.absolute()):
        return output_error(name, exc, _NOTHING)
    return output_error(out, exc, _NOTHING, what=_WHAT)


def _check_input(rule: SizeRule) -> torch.Tensor:
    _, (h, w) = rule.example_sizes()
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def export_segmenter(segmenter: Any, out: str | Path, fmt: str = "onnx", *, opset: int | None = None,
                     source: str | None = None) -> dict[str, Any]:
    """Export ``segmenter`` (a :class:`weakclip.api.Segmenter`, or any object with its attributes ``network``,
    ``kind``, ``description``, ``classes``, ``palette``, ``mean``, ``std``, ``settings``) into the new folder
    ``out``: ``model.onnx`` / ``model.pt`` and ``weakclip-model.json``.

    Returns ``{"out", "model", "metadata", "bytes", "rule", "check", "format", "kind", "description",
    "source"}``. Raises ExportError (one line; nothing written) for an unknown format, an existing non-empty
    ``out``, a missing ``weakclip[export]`` extra, a network that cannot be exported, or an export whose
    logits differ from PyTorch's.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    out = check_folder(out)
    if fmt == "onnx":
        from weakclip.export.onnx import DEFAULT_OPSET, check_onnx_available

        check_onnx_available()
        opset = DEFAULT_OPSET if opset is None else int(opset)
    elif opset is not None:
        raise ExportError("--opset applies to ONNX only")
    network = _cpu_network(segmenter)
    rule = size_rule_of(network)
    file = FILES[fmt]
    made = _make_folders(out.parent, out)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as exc:
        error = output_error(out, exc, _NOTHING, what=_WHAT)
        _remove_folders(made)
        raise error from exc

    def reserve(nbytes: int) -> None:  # before the network's file is written
        check_space(out, nbytes + ROOM_BYTES, _NOTHING, what=_WHAT)

    was_training = network.training
    network.eval()
    try:
        with prepared_for_export(network):
            x = _check_input(rule)
            with torch.no_grad():
                ref = network(x)
            if not isinstance(ref, torch.Tensor) or ref.dim() != 4 or ref.shape[-2:] != x.shape[-2:]:
                shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
                raise ExportError(f"the network must give B x K x H x W logits at the input size, gave "
                                  f"{shape} for {tuple(x.shape)}")
            if fmt == "onnx":
                from weakclip.export.onnx import export_onnx, onnx_logits

                info = export_onnx(network, tmp / file, rule, opset=opset, reserve=reserve)
                got = onnx_logits(tmp / file, x.numpy(), threads=torch.get_num_threads())
            else:
                from weakclip.export.torchscript import export_torchscript, torchscript_logits

                info = export_torchscript(network, tmp / file, rule, reserve=reserve)
                got = torchscript_logits(tmp / file, x).numpy()
        stats = compare_logits(got, ref.numpy())
        check = {"input_shape": list(x.shape), **stats,
                 "tolerance": f"max_abs_diff <= {TOLERANCE:g} * logit_scale, argmax_agreement >= "
                              f"{MIN_AGREEMENT:g}"}
        if not _close(stats):
            raise ExportError(f"the exported {fmt} network does not reproduce PyTorch on a "
                              f"{'x'.join(map(str, x.shape))} input (max |diff| {stats['max_abs_diff']:.3g} "
                              f"at logit scale {stats['logit_scale']:.3g}, argmax equal on "
                              f"{100 * stats['argmax_agreement']:.2f}%): not written")
        meta = build_metadata(segmenter, fmt=fmt, file=file, rule=rule, export_info=info, check=check)
        if source is not None:
            meta["source"] = str(source)
        from weakclip.data.io import write_json_atomic

        write_json_atomic(tmp / METADATA_NAME, meta)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        if out.is_dir():
            out.rmdir()  # empty (checked above); a folder made meanwhile makes rmdir or the rename fail
        os.rename(tmp, out)
    except BaseException as exc:
        error = _write_failure(exc, out, tmp)  # before removing the partial files: the disk at the failure
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_folders(made)
        if error is not None:
            raise error from exc
        raise
    finally:
        network.train(was_training)
    return {"out": out, "model": out / file, "metadata": out / METADATA_NAME, "bytes": size, "rule": rule,
            "check": check, "format": fmt, "kind": meta["kind"], "description": meta["description"],
            "opset": info.get("opset"), "source": source}


def summary_line(result: dict[str, Any]) -> str:
    """One line: what was exported where, how large, the sizes it takes, and how close it came to PyTorch."""
    c = result["check"]
    what = f"opset {result['opset']}, " if result.get("opset") else ""
    runner = "onnxruntime" if result["format"] == "onnx" else "torch.jit.load"
    return (f"exported {result['kind']} to {result['model']} ({result['bytes'] / 2 ** 20:.1f} MiB, {what}"
            f"any batch, {result['rule'].describe()}) + {result['metadata'].name}; {runner} vs PyTorch on "
            f"{'x'.join(map(str, c['input_shape']))}: max |diff| {c['max_abs_diff']:.2g} at logit scale "
            f"{c['logit_scale']:.3g}, argmax equal on {100 * c['argmax_agreement']:.2f}%")

