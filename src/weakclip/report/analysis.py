"""What a work folder holds, scored: the facts the report page and the regression checks are made of.

:func:`analyse` reads a work folder of ``weakclip run`` (finished or partial): ``run.json`` (the dataset
root, kind and splits the run used; older runs without it fall back to ``refine/config.yaml``), each stage's
``stage.json``, the training logs (``log.csv``) and ``retrain/eval.json``. It scores three mask sets of the
training split against the ground truth, from their PNG folders:

- ``seeds``: the seed folder (unsure pixels counted as background, the usual CAM evaluation),
- ``pseudo_no_crf``: ``pseudo_masks/no_crf/`` (the refined masks before CRF),
- ``pseudo``: ``pseudo_masks/`` (the final pseudo masks),

giving per class IoU, FP and FN (fractions of the union, :mod:`weakclip.metrics`), per image the mIoU over
the classes present in its ground truth or prediction, and, with or without ground truth, the predicted
pixels of each class and each image's class shares. The final network is scored on the val split by the
retraining stage itself (``retrain/eval.json``).

The scores of a finished stage's masks are cached in ``<workdir>/report/scores_<set>.json``, keyed on the
stage's ``stage.json``; a partial stage is scored afresh each time.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weakclip.errors import DataError, WeakclipError
from weakclip.methods import RUN_RECORD
from weakclip.report import REPORT_DIR

STAGES = ("seeds", "refine", "pseudo_masks", "retrain")  # WeakCLIP's, in order (runs without a run.json)
MASK_SETS = ("seeds", "pseudo_no_crf", "pseudo")
SET_STAGE = {"seeds": "seeds", "pseudo_no_crf": "pseudo_masks", "pseudo": "pseudo_masks"}
SET_TITLES = {"seeds": "seeds", "pseudo_no_crf": "pseudo masks before CRF", "pseudo": "pseudo masks",
              "final": "final network (val)"}
RUN_INFO = RUN_RECORD  # run.json
CACHE_VERSION = 1


@dataclass
class RunInfo:
    """Where a run's data is: written by the pipeline to ``<workdir>/run.json`` when it starts."""

    workdir: Path
    data_root: Path | None = None
    kind: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    seed_dir: Path | None = None
    method: str = "weakclip"  # weakclip.methods: which method's run (its stages, titles, final stage)
    stages: tuple[str, ...] | None = None  # the stages the run makes (None: every stage of its method)

    def to_dict(self) -> dict[str, Any]:
        return {"data_root": _str(self.data_root), "kind": self.kind, "train_split": self.train_split,
                "val_split": self.val_split, "seed_dir": _str(self.seed_dir), "method": self.method,
                "stages": None if self.stages is None else list(self.stages)}

    def run_stages(self) -> tuple[str, ...]:
        """The run's stages, in order: those ``run.json`` lists, else every stage of its method."""
        from weakclip.methods import get

        names = get(self.method).stage_names()
        return names if self.stages is None else tuple(s for s in names if s in self.stages)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def read_run_info(workdir: str | Path) -> RunInfo:
    """The run's data locations: ``run.json``, else what the stage configs and records say."""
    from weakclip.data.io import read_json

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise WeakclipError(f"work folder not found: {workdir}")
    path = workdir / RUN_INFO
    if path.is_file():
        raw = read_json(path, what="run record")
        def path_of(key: str) -> Path | None:
            return Path(raw[key]) if raw.get(key) else None

        from weakclip.methods import of_record

        stages = raw.get("stages")
        return RunInfo(workdir, data_root=path_of("data_root"), kind=raw.get("kind"),
                       train_split=raw.get("train_split"), val_split=raw.get("val_split"),
                       seed_dir=path_of("seed_dir"), method=of_record(raw).name,
                       stages=tuple(stages) if isinstance(stages, list) else None)
    if not any((workdir / s).is_dir() for s in STAGES):
        raise WeakclipError(f"{workdir} holds no pipeline run (no {RUN_INFO}, no stage folder)")
    info = RunInfo(workdir)
    data = _read_yaml(workdir / "refine" / "config.yaml").get("data") or {}
    info.data_root = Path(data["root"]) if data.get("root") else None
    info.kind, info.train_split = data.get("kind"), data.get("split")
    info.seed_dir = Path(data["seeds"]) if data.get("seeds") else None
    r_data = _read_yaml(workdir / "retrain" / "config.yaml").get("data") or {}
    info.val_split = r_data.get("val_split")
    seeds = stage_record(workdir, "seeds")
    if seeds is not None and seeds.get("settings", {}).get("dir"):
        info.seed_dir = Path(seeds["settings"]["dir"])
    if info.seed_dir is None and (workdir / "seeds").is_dir():
        info.seed_dir = workdir / "seeds"
    return info


def stage_record(workdir: Path, stage: str) -> dict[str, Any] | None:
    from weakclip.data.io import read_json

    path = Path(workdir) / stage / "stage.json"
    return read_json(path, what="stage record") if path.is_file() else None


def stage_status(workdir: Path, stage: str) -> str:
    if (Path(workdir) / stage / "stage.json").is_file():
        return "complete"
    return "partial" if (Path(workdir) / stage).is_dir() else "not started"


def read_log_csv(path: Path) -> dict[str, list[float]]:
    """A training ``log.csv`` as columns of floats (empty when the file is missing or unreadable)."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("iter", "").isdigit()]
    except (OSError, csv.Error):
        return {}
    if not rows:
        return {}
    columns: dict[str, list[float]] = {}
    for key in rows[0]:
        try:
            columns[key] = [float(r[key]) for r in rows]
        except (TypeError, ValueError):
            continue
    return columns


# ---------------------------------------------------------------------- scoring masks
def _frac(value: float) -> float | None:
    return None if value != value else round(float(value), 6)


def _image_miou(matrix: np.ndarray) -> float | None:
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    return round(float((tp[present] / union[present]).mean()), 6) if present.any() else None


class _SetScorer:
    """Accumulates one mask set: confusion matrix (with ground truth), class pixels, per-image facts."""

    def __init__(self, classes: list[str], folder: Path) -> None:
        from weakclip.metrics import ConfusionMatrix

        self.classes = classes
        self.folder = folder
        self.cm = ConfusionMatrix(classes, unsure="background")
        self.pixels = np.zeros(len(classes), dtype=np.int64)
        self.unsure = 0
        self.images: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []

    def add(self, ident: str, mask: np.ndarray, gt: np.ndarray | None) -> None:
        from weakclip.metrics import ConfusionMatrix

        k = len(self.classes)
        counts = np.bincount(mask.ravel(), minlength=256)
        self.pixels += counts[:k]
        self.unsure += int(counts[255])
        total = max(1, mask.size)
        shares = {int(c): round(float(counts[c]) / total, 4) for c in np.flatnonzero(counts[:k])}
        if counts[255]:
            shares[255] = round(float(counts[255]) / total, 4)
        fact: dict[str, Any] = {"shares": shares}
        if gt is not None:
            one = ConfusionMatrix(self.classes, unsure="background")
            one.update(mask, gt, name=str(self.folder / f"{ident}.png"))
            self.cm.merge(one)
            fact["miou"] = _image_miou(one.matrix)
        self.images[ident] = fact

    def result(self, with_gt: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"folder": str(self.folder), "images": len(self.images),
                               "pixels": self.pixels.tolist(), "unsure_pixels": self.unsure,
                               "per_image": self.images, "problems": self.problems[:20],
                               "problem_count": len(self.problems)}
        if with_gt and self.images:
            s = self.cm.scores()
            out.update({"miou": _frac(s.miou), "iou": [_frac(v) for v in s.iou],
                        "fp": [_frac(v) for v in s.fp], "fn": [_frac(v) for v in s.fn]})
        return out


def _signature(workdir: Path, name: str) -> str | None:
    """The cache key of a finished stage's mask set (None while the stage is not finished)."""
    path = workdir / SET_STAGE[name] / "stage.json"
    return f"{CACHE_VERSION}:{path.stat().st_mtime_ns}" if path.is_file() else None


def score_mask_sets(info: RunInfo, dataset, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Score the mask sets found in the work folder (see the module docstring); cached per finished stage."""
    from weakclip.data.io import jsonable, read_json, read_label_png, write_json_atomic

    workdir = info.workdir
    folders = {"seeds": info.seed_dir, "pseudo_no_crf": workdir / "pseudo_masks" / "no_crf",
               "pseudo": workdir / "pseudo_masks"}
    results: dict[str, dict[str, Any]] = {}
    todo: dict[str, _SetScorer] = {}
    classes = list(dataset.classes)
    for name, folder in folders.items():
        if folder is None or not folder.is_dir() or not any(folder.glob("*.png")):
            continue
        sig = _signature(workdir, name)
        cache = workdir / REPORT_DIR / f"scores_{name}.json"
        if sig is not None and cache.is_file():
            try:
                cached = read_json(cache, what="score cache")
            except DataError:
                cached = {}
            if cached.get("signature") == sig and cached.get("folder") == str(folder):
                results[name] = cached
                continue
        todo[name] = _SetScorer(classes, folder)
    if todo:
        start = time.perf_counter()
        with_gt = bool(dataset.has_gt)
        for i, ident in enumerate(dataset.ids):
            present = {n: s.folder / f"{ident}.png" for n, s in todo.items()}
            present = {n: p for n, p in present.items() if p.is_file()}
            if not present:
                continue
            gt = None
            if with_gt:
                try:
                    gt = dataset.read_gt(i)
                except DataError as exc:
                    for n in present:
                        todo[n].problems.append(str(exc))
            for n, path in present.items():
                try:
                    mask = read_label_png(path, num_classes=len(classes), what="mask")
                    if gt is not None:  # on the upright image's grid, as gt (the dataset reads upright)
                        mask = dataset.fit_label(i, mask, path, "mask", expected_hw=gt.shape,
                                                 reference=f"its ground-truth mask {dataset.gt_path(i)}")
                    todo[n].add(ident, mask, gt)
                except DataError as exc:
                    todo[n].problems.append(str(exc))
        for name, scorer in todo.items():
            result = scorer.result(with_gt)
            sig = _signature(workdir, name)
            if sig is not None:
                write_json_atomic(workdir / REPORT_DIR / f"scores_{name}.json",
                                  jsonable({**result, "signature": sig}))
            results[name] = result
        log(f"report page: scored {', '.join(todo)} over {len(dataset)} images in "
            f"{time.perf_counter() - start:.1f} s")
    return results


#: The stages whose ``eval.json`` scores a network on val, the final one first (WeakCLIP: the retraining;
#: ExCEL: the retraining when the run makes one, else its own network's evaluation).
EVAL_STAGES = ("retrain", "evaluate")


def final_stage(info: RunInfo) -> str | None:
    """The stage of the run whose network is the final one scored on val."""
    stages = info.run_stages()
    return next((s for s in EVAL_STAGES if s in stages), None)


def final_scores(workdir: Path, classes: list[str], stage: str | None = "retrain") -> dict[str, Any] | None:
    """A network's val scores from ``<stage>/eval.json`` (percent there; fractions here)."""
    from weakclip.data.io import read_json

    if stage is None:
        return None
    path = workdir / stage / "eval.json"
    if not path.is_file():
        return None
    raw = read_json(path, what="evaluation record")

    def column(key: str) -> list[float | None]:
        values = raw.get(key) or {}
        return [None if values.get(c) is None else values[c] / 100.0 for c in classes]

    miou = raw.get("miou")
    return {"miou": None if miou is None else miou / 100.0, "iou": column("iou"),
            "fp": column("fp_per_class"), "fn": column("fn_per_class"), "images": raw.get("images"),
            "split": raw.get("split")}


# ---------------------------------------------------------------------- the whole folder
def analyse(workdir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything the report shows about ``workdir`` (see the module docstring), JSON-ready."""
    from weakclip.data.datasets import build_dataset
    from weakclip.methods import get

    info = read_run_info(workdir)
    workdir = info.workdir
    method = get(info.method)
    run_stages = info.run_stages()
    stages = {s: {"status": stage_status(workdir, s), "record": stage_record(workdir, s),
                  "title": method.stage(s).title} for s in run_stages}
    out: dict[str, Any] = {"workdir": str(workdir), "run": info.to_dict(), "stages": stages,
                           "method": {"name": method.name, "title": method.title},
                           "final_stage": final_stage(info),
                           "classes": None, "has_gt": False, "sets": {}, "final": None, "notes": [],
                           "curves": {s: read_log_csv(workdir / s / "log.csv")
                                      for s in run_stages if method.stage(s).trains}}
    dataset = None
    if info.data_root is None or info.kind is None:
        out["notes"].append("the dataset of this run is not recorded: masks not scored")
    elif not info.data_root.exists():
        out["notes"].append(f"dataset folder not found: {info.data_root}: masks not scored")
    else:
        try:
            # every mask is put on the upright image's grid (stages may read tagged images differently)
            dataset = build_dataset(info.kind, info.data_root, split=info.train_split, seed_dir=None,
                                    image_orientation="exif")
        except DataError as exc:
            out["notes"].append(f"cannot open the training split: {exc}")
    if dataset is not None:
        out["classes"] = list(dataset.classes)
        out["has_gt"] = bool(dataset.has_gt)
        out["sets"] = score_mask_sets(info, dataset, log=log)
        for name, scored in out["sets"].items():
            if scored.get("problems"):
                count, first = scored.get("problem_count"), scored["problems"][0]
                out["notes"].append(f"{SET_TITLES[name]}: {count} masks not scored, e.g. {first}")
        out["final"] = final_scores(workdir, out["classes"], out["final_stage"])
        out["dataset_images"] = len(dataset)
    return out

