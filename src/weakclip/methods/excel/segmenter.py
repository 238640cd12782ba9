"""ExCEL's trained network as a :class:`weakclip.segmenters.Segmenter`: what :func:`weakclip.load`,
``weakclip predict`` and ``weakclip export`` take for an ExCEL checkpoint, training folder or run folder (the
registry's ``"load"`` entry point, :func:`load_segmenter`).

Test-time settings default to the release's, as the checkpoint's config records them (its ``infer`` section,
:class:`~weakclip.methods.excel.config.ExcelInferConfig`): each image through
:func:`~weakclip.methods.excel.infer.infer_image` with the network's positional embeddings resized from
CLIP's own grid (``set_position_mode("clip")``, the release's test model). For an image whose longer side is
at most ``max_side`` the label map IS ``infer_image``'s (its argmax, or its dense-CRF labels with ``crf``
on), pixel for pixel: the masks the run's evaluation writes. A larger image is shrunk first (OpenCV's area
average) and its label map enlarged back (:mod:`weakclip.segmenters`). The probabilities are the softmax of
the averaged logits resized bilinearly to the processing size (before the CRF). ``labels`` restrict the
probabilities to the background and those classes (renormalised); the label map is then their argmax (or the
CRF on them).

``Segmenter.network`` (what is exported) is :class:`ExcelLogits`: the frozen CLIP pass + the trained fusion
and decoder for one input, the class text features inside (they are the decoder's classifier: the patch-text
maps are not part of the segmentation logits), the logits resized bilinearly to the input's size. It takes
any batch and any ``H, W`` of at least two CLIP patches (32 pixels; the patch convolution drops a side's
remainder): the positional embedding is resized from CLIP's grid to the input's patch grid inside the graph,
so the exported file is not fixed to one size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip.errors import WeakclipError
from weakclip.segmenters import Segmenter, enlarge_labels, processing_size, shrink_image

__all__ = ["CRF_PARAMS", "KIND", "ExcelLogits", "ExcelSegmenter", "load_segmenter"]

#: ``Segmenter.kind`` of an ExCEL network.
KIND = "excel"
#: Names ``crf_params`` takes: the release's ``DenseCRF`` of ExCEL's test scripts, or the package's presets.
CRF_PARAMS: tuple[str, ...] = ("excel", "voc", "coco")


def _crf_values(name: str):
    from weakclip.crf import COCO_CRF, VOC_CRF
    from weakclip.methods.excel.infer import EXCEL_CRF

    return {"excel": EXCEL_CRF, "voc": VOC_CRF, "coco": COCO_CRF}[name]


class ExcelLogits(nn.Module):
    """An ``ExcelNet`` as a plain network: normalised ``B x 3 x H x W`` -> logits ``B x K x H x W`` (its
    ``segment`` at the patch grid, resized bilinearly to the input's size; one scale, no flip, no CRF).

    The export (:mod:`weakclip.export.network`) asks it for its size rule (:meth:`export_size_rule`) and
    prepares it (:meth:`prepared_for_export`): the CLIP pass's positional-embedding cache, keyed on the grid,
    is off while it is traced, so the graph resizes the embedding for whatever size it is given."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net.segment(x)
        return F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def export_size_rule(self) -> dict[str, Any]:
        """Sides the exported graph takes: any of at least two CLIP patches (the patch convolution drops a
        side's remainder, in the graph as here); the side of CLIP's stored grid is not traced (the embedding
        is not resized there, which would fix the size in the graph)."""
        clip_pass = self.net.clip_pass
        patch = int(clip_pass.patch_size)
        native = {int(s) * patch for s in clip_pass.tower.native_grid}
        return {"multiple_of": 1, "min_side": 2 * patch, "avoid": tuple(sorted(native))}

    @contextlib.contextmanager
    def prepared_for_export(self) -> Iterator[None]:
        clip_pass = self.net.clip_pass
        saved = clip_pass.cache_positions
        clip_pass.cache_positions = False
        try:
            yield
        finally:
            clip_pass.cache_positions = saved


class ExcelSegmenter(Segmenter):
    """ExCEL's network with the release's test-time inference (module docstring)."""

    def __init__(self, *, net: nn.Module, infer, **kwargs) -> None:
        net.set_position_mode("clip")  # the release's val / test model
        super().__init__(network=ExcelLogits(net), **kwargs)
        self._net = net.eval()
        self._infer = infer
        self._crf_params = "excel"

    def _settings(self) -> dict[str, Any]:
        from weakclip.data.io import jsonable

        out = dataclasses.asdict(self._infer)
        out["crf_params"] = self._crf_params
        out["crf_values"] = dataclasses.asdict(_crf_values(self._crf_params)) if self._infer.crf else None
        return jsonable(out)

    def _configure(self, **changes: Any) -> None:
        from weakclip.methods.excel.config import ExcelConfig

        known = {f.name for f in dataclasses.fields(self._infer)} | {"crf_params", "max_side"}
        self._check_known(changes, known)
        crf_params = changes.pop("crf_params", self._crf_params)
        crf_params = "excel" if crf_params is None else str(crf_params).strip().lower()
        if crf_params not in CRF_PARAMS:
            raise WeakclipError(f"crf_params of an ExCEL network must be one of {', '.join(CRF_PARAMS)}, got "
                                f"{crf_params!r}")
        raw = {**dataclasses.asdict(self._infer), **changes}
        self._infer = ExcelConfig.from_dict({"infer": raw}, source="test-time settings").infer
        self._crf_params = crf_params

    def inference_settings(self):
        """The settings :func:`~weakclip.methods.excel.infer.infer_image` runs with."""
        return dataclasses.replace(self._infer.settings(), crf_params=_crf_values(self._crf_params))

    def _run(self, images, allowed, together=False):
        """:func:`infer_image` of each image at its processing size (module docstring); one image at a time
        (the release's batch 1: ``together`` changes nothing)."""
        from weakclip.methods.excel.infer import infer_image

        settings = self.inference_settings()
        out = []
        for image in images:
            size = processing_size(*image.shape[:2], self.max_side)
            small = np.ascontiguousarray(shrink_image(image, size))
            pred = infer_image(self._net, small, settings, device=self.device)
            logits = pred.logits.float()
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probs = F.softmax(logits, dim=1)[0].cpu()
            if allowed is None:
                label = pred.crf if pred.crf is not None else pred.labels
            else:
                label, probs = self._restricted(small, probs, allowed, settings)
            out.append((probs.numpy().astype(np.float32, copy=False),
                        enlarge_labels(np.asarray(label).astype(np.uint8), image.shape[:2])))
        return out

    @staticmethod
    def _restricted(image: np.ndarray, probs: torch.Tensor, allowed: list[int], settings):
        """``(label map, probabilities)`` restricted to the background and ``allowed`` (the CRF, when on,
        on the restricted probabilities)."""
        from weakclip.segmenters import _restrict

        kept = _restrict(probs, allowed)
        if settings.crf:
            from weakclip.crf.pydensecrf_backend import dense_crf_numpy

            q = dense_crf_numpy(image.astype(np.uint8), kept.numpy(), settings.crf_params)
            return np.argmax(q, axis=0), kept
        return kept.argmax(dim=0).numpy(), kept


# ====================================================================== loading
def _clip_weights(file: Path, raw: Mapping[str, Any], given) -> str | None:
    """The CLIP weights file to rebuild the frozen CLIP from: the one given, else the one the checkpoint
    records; one line saying to pass one when neither is there."""
    if given is not None:
        if not Path(given).is_file():
            raise WeakclipError(f"CLIP weights file not found: {given}")
        return str(given)
    recorded = raw.get("clip_weights")
    if recorded and not Path(recorded).is_file():
        raise WeakclipError(f"checkpoint {file} needs the CLIP weights it was trained with (it records "
                            f"{recorded}, which is not there): pass --clip-weights FILE "
                            "(weakclip.load(..., clip_weights=FILE))")
    return str(recorded) if recorded else None


def _classes(raw: Mapping[str, Any], net, given: Sequence[str] | None, file: Path) -> list[str]:
    from weakclip.data.classes import stored_classes

    count = int(net.num_classes)
    if given is not None:
        if len(given) != count:
            raise WeakclipError(f"the class list given (--classes) has {len(given)} names, but the ExCEL "
                                f"network of {file} predicts {count} classes: give the list it was trained "
                                "with")
        return list(given)
    stored = stored_classes(raw, f"checkpoint {file}")
    return stored if stored is not None and len(stored) == count else list(net.class_names)


def load_segmenter(file: str | Path, raw: Mapping[str, Any], *, where: str = "",
                   device: torch.device | str = "cpu", clip_weights=None,
                   classes: Sequence[str] | None = None) -> ExcelSegmenter:
    """The registry's ``"load"`` entry point: an ExCEL training checkpoint ``file`` (``raw``: what it holds,
    already read) as an :class:`ExcelSegmenter` on ``device``. The trained decoder and text bank come from the
    checkpoint, the frozen CLIP from ``clip_weights`` (default: the file the checkpoint records), the
    test-time settings from its config's ``infer`` section; ``classes`` replace the stored names (as many)."""
    from weakclip.data.classes import stored_palette
    from weakclip.data.normalization import IMAGENET_MEAN, IMAGENET_STD
    from weakclip.methods.excel.config import ExcelConfig
    from weakclip.methods.excel.train import load_excel_checkpoint

    file = Path(file)
    device = torch.device(device)
    if not isinstance(raw.get("config"), Mapping):
        raise WeakclipError(f"{file} is an ExCEL checkpoint without its config")
    cfg = ExcelConfig.from_dict(dict(raw["config"]), source=f"config of {file}")
    weights = _clip_weights(file, raw, clip_weights)
    net, _ = load_excel_checkpoint(file, weights, device, raw=raw)
    names = _classes(raw, net, classes, file)
    bank = net.text_bank
    text = (f"{bank.centres.shape[0]} descriptor clusters" if bank.enriched_by_descriptors
            else "plain class prompts")
    note = "; class names given" if classes is not None else ""
    description = (f"ExCEL network (weakclip train checkpoint, iteration {raw.get('iteration')}, CLIP "
                   f"{net.settings.arch}, {len(names)} classes{note}, {text}) from {file}{where}")
    palette = None if classes is not None else stored_palette(raw, len(names))
    return ExcelSegmenter(kind=KIND, description=description, classes=names, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, device=device, net=net.to(device), infer=cfg.infer,
                          palette=palette)
