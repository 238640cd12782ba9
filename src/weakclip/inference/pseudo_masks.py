"""Pseudo masks for a whole dataset from a trained refinement model (pipeline stage 3).

Driven by one config section, :class:`~weakclip.config.PseudoMaskConfig` (the preset's ``pseudo``). For each
image of this process's shard (:func:`weakclip.distributed.shard`, so ``torchrun`` splits the work):
multi-scale + flip sliding-window probabilities (:func:`multiscale_inference_batch`; with ``image_batch`` > 1
the windows of several images share forward passes), the classes kept (the argmax's classes, as the release,
or the image's labels plus background, renormalised, with ``restrict_to_labels``), argmax, then the
full-resolution dense CRF. On the CPU the CRF runs in a pool of worker processes
(:mod:`~weakclip.worker_pool`: no torch thread pool in a forked worker, safe after the model ran on several
threads, stopped by Ctrl-C, gone with the main process) fed through a bounded queue, so the model keeps
producing while the CRF of earlier images runs; when the model is on CUDA the CRF runs there, batched over the
images of a group that share their size and class count (:func:`~weakclip.crf.dense_crf`, our permutohedral
lattice).

Output layout of ``out_dir``::

    <id>.png                  the final pseudo mask (after CRF when the CRF is on), VOC palette PNG
    no_crf/<id>.png           the mask before CRF (only when the CRF is on)
    probs/<id>.npz            with save_probs: "keys" (int16 class ids) and "probs" (float16,
                              len(keys) x H x W, before CRF) of the present classes: the allowed ones
                              under label restriction, else background + the classes of the argmax
    pseudo_masks_summary.json counts, failures, settings, timings and, with ground truth, the scores

Resumable: an id whose ``<id>.png`` exists (and, with save_probs, its ``.npz``) is skipped; the PNG
is written last, atomically, after its ``no_crf`` mask and probabilities, so an interrupted run
continues where it stopped and produces the same files as an uninterrupted one. An image that
cannot be read is reported on stderr, skipped and listed in the summary. With ground truth the
summary holds the mIoU before and after CRF over every mask of the split (those found from earlier
runs too), summed over the processes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakclip.config import PseudoMaskConfig
from weakclip.crf import choose_backend, dense_crf
from weakclip.data.datasets import require_images
from weakclip.data.io import jsonable, read_label_png, write_json_atomic, write_label_png
from weakclip.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from weakclip.errors import DataError
from weakclip.inference.batching import WindowRunner
from weakclip.inference.crf_worker import pydensecrf_job
from weakclip.inference.jobs import JobLedger, gather_objects, warn, write_npz_atomic
from weakclip.inference.sliding import multiscale_inference_batch
from weakclip.metrics import ConfusionMatrix
from weakclip.worker_pool import WorkerPool

__all__ = ["SUMMARY_NAME", "argmax_probs", "format_summary", "generate_pseudo_masks", "kept_classes",
           "restrict_probs"]

SUMMARY_NAME = "pseudo_masks_summary.json"


def _as_tensor(probs) -> tuple[torch.Tensor, bool]:
    if isinstance(probs, torch.Tensor):
        return probs, False
    return torch.from_numpy(np.ascontiguousarray(probs)), True


def restrict_probs(probs, labels: np.ndarray | Sequence[float] | None):
    """Keep the classes of ``labels`` (multi-hot, background always kept) -> ``(keys, probs[keys])``.

    The kept probabilities are renormalised to sum to 1 at each pixel (a pixel whose kept classes all
    have probability 0 becomes background). ``labels=None`` keeps every class. ``probs`` is a K x H x W
    numpy array (numpy results) or tensor (tensors on its device).
    """
    t, numpy_in = _as_tensor(probs)
    k = t.shape[0]
    if labels is None:
        keys, out = torch.arange(k, device=t.device), t
    else:
        allowed = torch.from_numpy(np.asarray(labels, dtype=np.float32).reshape(-1) > 0)
        if allowed.shape[0] != k:
            raise ValueError(f"labels have {allowed.shape[0]} entries, the probabilities {k} classes")
        allowed[0] = True
        keys = torch.nonzero(allowed).flatten().to(t.device)
        kept = t[keys]
        total = kept.sum(dim=0, keepdim=True)
        empty = total <= 0
        if bool(empty.any()):
            kept = kept.clone()
            kept[0][empty[0]] = 1.0
            total = torch.where(empty, torch.ones_like(total), total)
        out = kept / total
    return (keys.cpu().numpy(), out.cpu().numpy()) if numpy_in else (keys, out)


def argmax_probs(probs):
    """The release's unrestricted rule -> ``(keys, probs[keys])``: the classes that win some pixel of the
    argmax, their probabilities NOT renormalised (what the release saves in ``prob_npy`` and its
    ``make_crf.py`` hands to the CRF, whose label set is therefore these classes only). numpy in, numpy
    out; a tensor in, tensors on its device out."""
    t, numpy_in = _as_tensor(probs)
    keys = torch.unique(t.argmax(dim=0))
    out = t[keys]
    return (keys.cpu().numpy(), out.cpu().numpy()) if numpy_in else (keys, out)


def kept_classes(probs, labels: np.ndarray | Sequence[float] | None):
    """The classes a pseudo mask is made of -> ``(keys, probs[keys])``: with ``labels`` (multi-hot) those
    and background, renormalised (:func:`restrict_probs`); without, the release's rule, the classes of the
    argmax as they are (:func:`argmax_probs`). The CRF runs over exactly these."""
    return restrict_probs(probs, labels) if labels is not None else argmax_probs(probs)


def _crf_batch(images: Sequence[np.ndarray], probs: Sequence[np.ndarray | torch.Tensor],
               keys: Sequence[np.ndarray], params, out_pngs: Sequence[str], backend: str = "pydensecrf"
               ) -> tuple[list[np.ndarray], float]:
    """Dense CRF of images of one size with the same number of kept classes, as one batch, each mask
    written to its ``out_pngs`` entry -> (masks, seconds). The probabilities are numpy (a worker process)
    or tensors on the model's device (inline: with the lattice the CRF runs there, batched, with no round
    trip to the CPU but the masks). ``backend``: of :func:`~weakclip.crf.dense_crf`."""
    start = time.perf_counter()
    probs_t = torch.stack([torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in probs]).float()
    rgb = torch.stack([torch.from_numpy(np.ascontiguousarray(im)) for im in images]).to(probs_t.device)
    q = dense_crf(probs_t, rgb.permute(0, 3, 1, 2).float(), params, backend=backend)
    labels = q.argmax(dim=1).cpu().numpy()
    masks = []
    for k, label, out_png in zip(keys, labels, out_pngs):
        masks.append(np.asarray(k, dtype=np.uint8)[label])
        write_label_png(out_png, masks[-1])
    return masks, time.perf_counter() - start


def _crf_job(image: np.ndarray, probs: np.ndarray | torch.Tensor, keys: np.ndarray, params, out_png: str,
             backend: str = "pydensecrf") -> tuple[np.ndarray, float]:
    """Dense CRF of one image, written to ``out_png`` -> (mask, seconds) (:func:`_crf_batch` of one)."""
    masks, seconds = _crf_batch([image], [probs], [keys], params, [out_png], backend)
    return masks[0], seconds


class _CrfQueue:
    """The CRF of each image in a :class:`~weakclip.worker_pool.WorkerPool` of ``workers``
    processes (inline when 0), counted and timed. With the release's ``pydensecrf`` backend the
    job is :func:`~weakclip.inference.crf_worker.pydensecrf_job` (no torch in the workers), otherwise
    :func:`_crf_job` with that backend."""

    def __init__(self, workers: int, max_pending: int | None, on_done, backend: str,
                 start_method: str | None = None) -> None:
        self.on_done = on_done
        self.backend = backend
        self.seconds = 0.0
        self.done = 0
        torch_free = backend == "pydensecrf"
        self.pool = WorkerPool(pydensecrf_job if torch_free else _crf_job, workers, self._finish,
                               runs_torch=not torch_free, max_pending=max_pending, start_method=start_method,
                               what="CRF worker")

    def _finish(self, ident: str, result: tuple[np.ndarray, float]) -> None:
        mask, seconds = result
        self.seconds += seconds
        self.done += 1
        self.on_done(ident, mask)

    def submit(self, ident: str, image: np.ndarray, probs: np.ndarray, keys: np.ndarray, params,
               out_png: str) -> None:
        extra = () if self.backend == "pydensecrf" else (self.backend,)
        self.pool.submit(ident, image, probs, keys, params, out_png, *extra)

    def record(self, ident: str, mask: np.ndarray, seconds: float) -> None:
        """A CRF that ran elsewhere (on the model's device), counted and reported like the queue's own."""
        self._finish(ident, (mask, seconds))

    def drain(self) -> None:
        self.pool.drain()

    def close(self, cancel: bool = False) -> None:
        self.pool.close(cancel)


def generate_pseudo_masks(
    model: torch.nn.Module,
    dataset,
    out_dir: str | Path,
    settings: PseudoMaskConfig | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    kind: str | None = None,
    save_probs: bool = False,
    crf_on_device: bool | None = None,
    max_pending: int | None = None,
    start_method: str | None = None,
    evaluate: bool = True,
    limit: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the pseudo masks of ``dataset`` to ``out_dir`` (layout in the module docstring).

    Args:
        model: the trained refinement model (eval mode), on the device to run on.
        dataset: a :class:`~weakclip.data.base.SegDataset` (ids, classes, labels, optional GT).
        settings: the stage's config section (default: the release's): test-time augmentation, label
            restriction, the CRF parameter set and its worker processes, window and image batches, amp.
            Without label restriction (the release) the CRF and ``probs/`` get the classes present in the
            argmax before the CRF, their probabilities as they are (the release's ``keys`` of ``prob_npy``).
        mean, std: the normalisation the model was trained with.
        kind: the dataset kind that ``settings.crf == "auto"`` picks the CRF parameters by (default the
            dataset's).
        save_probs: also write ``probs/<id>.npz``.
        crf_on_device: run the CRF inline where the probabilities are, with ``settings.crf_backend``,
            instead of in the CPU worker processes; default: when that backend is not pydensecrf2 on the
            model's device (``crf_backend: auto`` on a GPU: our batched lattice there; the release's
            ``pydensecrf``: the workers).
        max_pending: images waiting for the CRF workers at most (default twice the workers);
            ``start_method`` of the workers: by default ``fork`` for the release's pydensecrf job (no
            torch in it) unless CUDA is initialised, else ``spawn`` (scripts then need the
            ``if __name__ == "__main__":`` guard); see :mod:`weakclip.worker_pool`.
        evaluate: score against the ground truth when the dataset has it.
        limit: stop after writing this many images in this process (the rest is left for a later run).
        rank, world_size: this process's share; default from the ``torchrun`` environment.
        progress: progress bar and messages on rank 0.

    Returns the summary (the same on every process; rank 0 also writes it to ``SUMMARY_NAME``): counts
    (``written``, ``skipped_existing``, ``failed`` with ``failures`` {id: message}), ``settings``,
    ``model_seconds_per_image``, ``crf_seconds_per_image``, ``window_batch`` (the batch size used) and,
    with ground truth, ``miou`` (final masks), ``miou_before_crf`` / ``miou_after_crf`` (when the CRF is
    on), per-class ``iou_*``, ``unscored`` {id: message} and the
    :class:`~weakclip.metrics.SegScores` under ``"scores"`` (left out of the JSON file).
    """
    settings = PseudoMaskConfig() if settings is None else settings
    require_images(dataset, "pseudo masks")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crf_params = settings.crf_params(kind or getattr(dataset, "kind", "voc"))
    use_crf = crf_params is not None
    no_crf_dir = out_dir / "no_crf"
    probs_dir = out_dir / "probs"
    classes = list(dataset.classes)
    num_classes = len(classes)
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise DataError(f"the model predicts {model.num_classes} classes, the dataset has {num_classes}")
    with_gt = evaluate and bool(getattr(dataset, "has_gt", False))
    cm_before = ConfusionMatrix(classes)
    cm_after = ConfusionMatrix(classes)
    unscored: list[tuple[str, str]] = []
    gts: dict[str, np.ndarray] = {}  # ground truth of images whose CRF is still running

    def crf_done(ident: str, mask: np.ndarray) -> None:
        gt = gts.pop(ident, None)
        if gt is not None:
            cm_after.update(mask, gt, name=f"{out_dir / ident}.png")

    ledger = JobLedger("pseudo-masks", dataset.ids, rank=rank, world_size=world_size, progress=progress,
                       limit=limit)
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    backend = choose_backend(device, 0, 0) if settings.crf_backend == "auto" else settings.crf_backend
    queue = _CrfQueue(settings.crf_workers if use_crf else 0, max_pending, crf_done, backend, start_method)
    crf_here = crf_on_device if crf_on_device is not None else backend != "pydensecrf"
    runner = WindowRunner(model, num_classes, window_batch=settings.window_batch,
                          autocast_dtype=settings.autocast_dtype(device))
    timing = {"model_seconds": 0.0, "computed": 0}
    group: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]] = []

    def run_group() -> None:
        """The model on the images read so far (their windows share batches), then each one's masks."""
        start = time.perf_counter()
        all_probs = multiscale_inference_batch(
            model, [image for _, image, _, _ in group], settings.scales, settings.flip, settings.crop,
            settings.stride, mean, std, settings.base_scale, num_classes=num_classes, device=device,
            window_batch=runner, average=settings.average, size_divisor=settings.size_divisor,
            resize=settings.resize)
        on_device = []  # (ident, image, keys, kept) waiting for the CRF on the device
        for (ident, image, labels, gt), probs in zip(group, all_probs):
            # classes kept and the mask before the CRF, on the probabilities' device
            keys, kept = kept_classes(probs, labels)
            keys = keys.cpu().numpy()
            mask = keys.astype(np.uint8)[kept.argmax(dim=0).cpu().numpy()]
            timing["model_seconds"] += time.perf_counter() - start
            timing["computed"] += 1
            # the probabilities come to the CPU once, only when saved or sent to the workers
            kept_np = kept.cpu().numpy() if save_probs or (use_crf and not crf_here) else None
            write_before_crf(ident, keys, kept_np, mask, gt)
            if use_crf and crf_here:
                on_device.append((ident, image, keys, kept))
            elif use_crf:
                queue.submit(ident, image, np.ascontiguousarray(kept_np, dtype=np.float32), keys,
                             crf_params, str(out_dir / f"{ident}.png"))
                ledger.wrote(ident)
            start = time.perf_counter()
        all_probs.clear()
        group.clear()
        # the CRF where the probabilities are, batched over images of one size and class count
        batches: dict[tuple[int, ...], list] = {}
        for item in on_device:
            batches.setdefault((*item[1].shape[:2], len(item[2])), []).append(item)
        for items in batches.values():
            masks, seconds = _crf_batch([it[1] for it in items], [it[3] for it in items],
                                        [it[2] for it in items], crf_params,
                                        [str(out_dir / f"{it[0]}.png") for it in items], backend)
            for (ident, *_), mask in zip(items, masks):
                queue.record(ident, mask, seconds / len(items))
                ledger.wrote(ident)

    def write_before_crf(ident, keys, kept_np, mask, gt) -> None:
        """``probs/``, ``no_crf/`` and, without the CRF, the final mask (the CRF's is written last)."""
        final = out_dir / f"{ident}.png"
        if save_probs:
            write_npz_atomic(probs_dir / f"{ident}.npz", keys=keys.astype(np.int16),
                             probs=kept_np.astype(np.float16))
        if gt is not None:
            cm_before.update(mask, gt, name=f"{no_crf_dir / ident}.png")
        if use_crf:
            write_label_png(no_crf_dir / f"{ident}.png", mask)
            if gt is not None:
                gts[ident] = gt
        else:
            write_label_png(final, mask)
            if gt is not None:
                cm_after.update(mask, gt, name=str(final))
            ledger.wrote(ident)

    model.eval()  # dropout / stochastic depth off: the masks must not depend on the run
    ok = False
    try:
        for i in ledger:
            ident = dataset.ids[i]
            final = out_dir / f"{ident}.png"
            if final.is_file() and (not save_probs or (probs_dir / f"{ident}.npz").is_file()):
                ledger.skip(ident)
                if with_gt:
                    _score_existing(dataset, i, final, no_crf_dir / f"{ident}.png" if use_crf else final,
                                    cm_before, cm_after, unscored, ledger)
                continue
            try:
                image = dataset.read_image(i)
                labels = dataset.get_labels(i) if settings.restrict_to_labels else None
            except DataError as exc:
                ledger.fail(ident, exc)
                continue
            gt = None
            if with_gt:
                try:
                    gt = dataset.read_gt(i, image.shape[:2])
                except DataError as exc:
                    unscored.append((ident, str(exc)))
                    warn(f"pseudo-masks: {ident!r} not scored: {exc}", ledger.bar)
            group.append((ident, image, labels, gt))
            room = None if ledger.limit is None else ledger.limit - ledger.written
            if len(group) >= settings.image_batch or (room is not None and len(group) >= room):
                run_group()
        if group:
            run_group()
        queue.drain()
        ok = True
    finally:
        queue.close(cancel=not ok)
        model.train(was_training)

    summary = ledger.summary()
    seconds = gather_objects([(timing["computed"], timing["model_seconds"], queue.done, queue.seconds)])
    n_model = sum(s[0] for s in seconds)
    n_crf = sum(s[2] for s in seconds)
    summary.update({
        "out_dir": str(out_dir),
        # the section as run: the CRF's parameters and backend resolved
        "settings": {**dataclasses.asdict(settings), "crf_on_device": bool(crf_here), "crf_backend": backend,
                     "crf": None if crf_params is None else _params_dict(crf_params),
                     "save_probs": bool(save_probs)},
        "window_batch": runner.limit,
        "model_seconds_per_image": sum(s[1] for s in seconds) / n_model if n_model else None,
        "crf_seconds_per_image": sum(s[3] for s in seconds) / n_crf if n_crf else None,
    })
    scores: dict[str, Any] = {}
    if with_gt:
        unscored_all = gather_objects(unscored)
        cm_before.all_reduce()
        cm_after.all_reduce()
        before, after = cm_before.scores(), cm_after.scores()
        summary["unscored"] = dict(unscored_all)
        summary["miou"] = after.miou
        summary["iou"] = dict(zip(classes, after.iou.tolist()))
        if use_crf:
            summary["miou_before_crf"] = before.miou
            summary["miou_after_crf"] = after.miou
            summary["iou_before_crf"] = dict(zip(classes, before.iou.tolist()))
            scores = {"before_crf": before, "after_crf": after}
        else:
            scores = {"final": after}
    if ledger.rank == 0:
        write_json_atomic(out_dir / SUMMARY_NAME, jsonable(summary))
    if scores:
        summary["scores"] = scores
    return summary


def _params_dict(params) -> dict[str, Any] | str:
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else str(params)


def _score_existing(dataset, i: int, final: Path, before: Path, cm_before: ConfusionMatrix,
                    cm_after: ConfusionMatrix, unscored: list, ledger: JobLedger) -> None:
    """Add the masks an earlier run wrote for item ``i`` to the confusion matrices."""
    ident = dataset.ids[i]
    k = len(dataset.classes)
    try:
        gt = dataset.read_gt(i)
        against = f"its ground-truth mask {dataset.gt_path(i)}"
        after = read_label_png(final, expected_hw=gt.shape, num_classes=k, what="pseudo mask",
                               reference=against)
        prior = after if before == final else read_label_png(before, expected_hw=gt.shape, num_classes=k,
                                                             what="pseudo mask", reference=against)
    except DataError as exc:
        unscored.append((ident, str(exc)))
        warn(f"pseudo-masks: existing mask of {ident!r} not scored: {exc}", ledger.bar)
        return
    if (prior == 255).any() or (after == 255).any():
        unscored.append((ident, f"{final} holds 255 (unsure) pixels: not a pseudo mask of this command"))
        return
    cm_before.update(prior, gt, name=str(before))
    cm_after.update(after, gt, name=str(final))


def format_summary(summary: dict[str, Any]) -> str:
    """A text report of :func:`generate_pseudo_masks`'s summary, with the mIoU tables when scored."""
    lines = [
        f"pseudo masks in {summary['out_dir']}: {summary['written']} written, "
        f"{summary['skipped_existing']} already there, {summary['failed']} failed "
        f"(of {summary['images']} images)" + ("" if summary.get("complete", True) else "; stopped early")
    ]
    if summary.get("model_seconds_per_image") is not None:
        lines.append(f"model {summary['model_seconds_per_image']:.3f} s per image")
    if summary.get("crf_seconds_per_image") is not None:
        where = ("on the model's device" if summary.get("settings", {}).get("crf_on_device")
                 else "in the worker processes")
        lines.append(f"CRF {summary['crf_seconds_per_image']:.3f} s per image ({where})")
    failures = list(summary.get("failures", {}).items())
    for ident, msg in failures[:20]:
        lines.append(f"  failed {ident}: {msg}")
    if len(failures) > 20:
        lines.append(f"  ... and {len(failures) - 20} more (see {SUMMARY_NAME})")
    unscored = list(summary.get("unscored", {}).items())
    for ident, msg in unscored[:5]:
        lines.append(f"  not scored {ident}: {msg}")
    scores = summary.get("scores") or {}
    if "before_crf" in scores:
        lines.append("before CRF:")
        lines.append(scores["before_crf"].table())
        lines.append("after CRF:")
        lines.append(scores["after_crf"].table())
        lines.append(f"mIoU before CRF {100 * summary['miou_before_crf']:.2f}%, "
                     f"after CRF {100 * summary['miou_after_crf']:.2f}%")
    elif "final" in scores:
        lines.append(scores["final"].table())
        lines.append(f"mIoU {100 * summary['miou']:.2f}% (no CRF)")
    return "\n".join(lines)
