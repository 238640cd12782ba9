"""Streaming confusion-matrix segmentation metrics, as in the WSSS evaluations the release reports.

For each class ``c`` with ``TP`` true positives, ``P`` predicted and ``T`` ground-truth pixels:

- IoU ``= TP / (T + P - TP)``
- FP rate ``= (P - TP) / (T + P - TP)``: the share of the union that the prediction adds wrongly,
- FN rate ``= (T - TP) / (T + P - TP)``: the share of the union that the prediction misses.

So ``IoU + FP + FN = 1`` per class. Pixels whose ground truth is ``ignore_index`` (255) are not
counted. A class absent from both the prediction and the ground truth of the whole dataset has an
empty union: it gets ``nan`` and is left out of the means.

The matrix is a plain ``(K, K)`` int64 array (rows: ground truth, columns: prediction), so partial
results from several processes or shards add up exactly (:meth:`ConfusionMatrix.merge`,
:meth:`ConfusionMatrix.all_reduce`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from weakclip.data.classes import IGNORE_INDEX
from weakclip.errors import DataError

UNSURE_MODES = ("background", "ignore", "error")


@dataclass
class SegScores:
    """Scores of a confusion matrix; all rates are fractions in [0, 1] (``nan`` for absent classes)."""

    classes: list[str]
    iou: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    pixel_accuracy: float

    @property
    def miou(self) -> float:
        return _nanmean(self.iou)

    @property
    def mean_fp(self) -> float:
        return _nanmean(self.fp)

    @property
    def mean_fn(self) -> float:
        return _nanmean(self.fn)

    def to_dict(self) -> dict:
        """JSON-ready summary; every value in percent, absent classes as ``None``."""

        def pct(v: float) -> float | None:
            return None if np.isnan(v) else round(100.0 * float(v), 4)

        return {
            "miou": pct(self.miou),
            "iou": {c: pct(v) for c, v in zip(self.classes, self.iou)},
            "fp": pct(self.mean_fp),
            "fn": pct(self.mean_fn),
            "fp_per_class": {c: pct(v) for c, v in zip(self.classes, self.fp)},
            "fn_per_class": {c: pct(v) for c, v in zip(self.classes, self.fn)},
            "pixel_accuracy": pct(self.pixel_accuracy),
            "units": "percent",
        }

    def table(self) -> str:
        """A per-class text table (percent), with the means on the last line."""
        width = max([len(c) for c in self.classes] + [5])
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'FP':>7}  {'FN':>7}"]

        def fmt(v: float) -> str:
            return f"{'-':>7}" if np.isnan(v) else f"{100.0 * v:7.2f}"

        for c, i, p, n in zip(self.classes, self.iou, self.fp, self.fn):
            lines.append(f"{c:<{width}}  {fmt(i)}  {fmt(p)}  {fmt(n)}")
        lines.append("-" * len(lines[0]))
        lines.append(f"{'mean':<{width}}  {fmt(self.miou)}  {fmt(self.mean_fp)}  {fmt(self.mean_fn)}")
        return "\n".join(lines)


def _nanmean(values: np.ndarray) -> float:
    valid = values[~np.isnan(values)]
    return float(valid.mean()) if valid.size else float("nan")


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` confusion matrix over any number of (prediction, ground truth) pairs.

    ``unsure`` says what to do with prediction pixels equal to ``ignore_index`` (seed masks mark
    unsure pixels with 255): ``"background"`` counts them as class 0 (the usual CAM evaluation),
    ``"ignore"`` leaves those pixels out (precision of the confident pixels), ``"error"`` rejects them.
    """

    def __init__(self, classes: Sequence[str], ignore_index: int = IGNORE_INDEX, unsure: str = "error"):
        if unsure not in UNSURE_MODES:
            raise ValueError(f"unsure must be one of {UNSURE_MODES}, got {unsure!r}")
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.ignore_index = ignore_index
        self.unsure = unsure
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.unsure_pixels = 0

    def update(self, pred, gt, name: str = "prediction") -> None:
        """Add one prediction / ground-truth pair (numpy arrays or tensors of equal shape)."""
        pred = _as_numpy(pred)
        gt = _as_numpy(gt)
        if pred.shape != gt.shape:
            raise DataError(f"{name}: shape {tuple(pred.shape)} differs from its ground truth "
                            f"{tuple(gt.shape)}")
        pred = pred.astype(np.int64, copy=False).ravel()
        gt = gt.astype(np.int64, copy=False).ravel()
        valid = gt != self.ignore_index
        bad_gt = valid & ((gt < 0) | (gt >= self.num_classes))
        if bad_gt.any():
            raise DataError(f"{name}: ground truth holds values {sorted(set(gt[bad_gt].tolist()))[:10]} "
                            f"outside 0..{self.num_classes - 1} and {self.ignore_index}")
        unsure = pred == self.ignore_index
        n_unsure = int((unsure & valid).sum())
        if n_unsure:
            if self.unsure == "error":
                raise DataError(f"{name}: {n_unsure} pixels are {self.ignore_index} (unsure); choose how to "
                                "count them (unsure='background' or 'ignore')")
            self.unsure_pixels += n_unsure
            if self.unsure == "background":
                pred = np.where(unsure, 0, pred)
            else:
                valid &= ~unsure
        bad_pred = valid & ((pred < 0) | (pred >= self.num_classes))
        if bad_pred.any():
            raise DataError(f"{name}: prediction holds values {sorted(set(pred[bad_pred].tolist()))[:10]} "
                            f"outside 0..{self.num_classes - 1}")
        idx = gt[valid] * self.num_classes + pred[valid]
        self.matrix += np.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix over the same classes (e.g. from another shard) into this one."""
        if other.classes != self.classes:
            raise ValueError("cannot merge confusion matrices over different class lists")
        self.matrix += other.matrix
        self.unsure_pixels += other.unsure_pixels
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all processes of the default ``torch.distributed`` group (no-op alone)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            on_gpu = backend == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
            flat = np.append(self.matrix.ravel(), self.unsure_pixels)
            t = torch.from_numpy(flat).to(device)
            torch.distributed.all_reduce(t)
            flat = t.cpu().numpy()
            self.matrix = flat[:-1].reshape(self.matrix.shape).copy()
            self.unsure_pixels = int(flat[-1])
        return self

    def scores(self) -> SegScores:
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        gt_count = m.sum(axis=1)
        pred_count = m.sum(axis=0)
        union = gt_count + pred_count - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            fp = np.where(union > 0, (pred_count - tp) / union, np.nan)
            fn = np.where(union > 0, (gt_count - tp) / union, np.nan)
        total = m.sum()
        acc = float(tp.sum() / total) if total > 0 else float("nan")
        return SegScores(self.classes, iou, fp, fn, acc)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
