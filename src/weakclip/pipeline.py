"""From image-level labels to a trained segmenter in one call: seeds -> refinement -> pseudo masks ->
retraining -> val evaluation.

Each stage works in its own folder of the work directory: when it starts it records the settings it is
made with in ``<workdir>/<stage>/made_with.json`` (:mod:`weakclip.stage_settings`), and when it has finished
it writes ``<workdir>/<stage>/stage.json`` with those, its report settings and its metrics; what it prints is
kept in ``<workdir>/<stage>/log.txt``. A stage whose ``stage.json`` exists is reused; a stage that was
interrupted is resumed (the refinement and retraining from their latest checkpoints, the seeds and pseudo
masks from the images already written) -- both only when the run asks for the settings that made them: before
any work, every stage the folder holds is compared with what the run asks for, and another setting that
changes its results stops the run in one line (``redo`` / ``--redo STAGE`` recomputes that stage and every
stage after it), while one that does not is a note. The run ends with one summary table,
``<workdir>/report.json`` and the page ``<workdir>/report.html`` (:mod:`weakclip.report`), with warnings when
a stage made things worse or a class vanished; with ``stop_on_regression`` the run stops at the first such
stage instead of going on. ``<workdir>/run.json`` records the data and presets of what the folder holds (the
report reads it) with its class names and palette; it is written once the folder's stages are known to match
the run. Every path recorded is absolute, and the networks' checkpoints store their classes too, so the run's
networks load from any folder once the data is gone. Under ``torchrun`` every stage is shared by all
processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weakclip.errors import EXIT_REGRESSION, ItemsFailed, WeakclipError, failed_items_message
from weakclip.sections import override_keys
from weakclip.stage_settings import MADE_WITH, check_reuse, made_with

STAGES = ("seeds", "refine", "pseudo_masks", "retrain")


@dataclass
class PipelineConfig:
    """Everything ``weakclip run`` needs; the stage settings come from the presets plus overrides."""

    workdir: Path
    data_root: Path
    preset: str = "voc"  # refinement preset (voc, coco or a YAML file)
    retrain_preset: str | None = None  # default: the same name as ``preset`` (voc, coco, voc-plus, coco-plus)
    dataset: str | None = None  # voc, coco, folder; default: the preset's
    train_split: str | None = None  # default: the preset's
    val_split: str | None = None  # default: the retrain preset's
    clip_weights: Path | None = None
    seeds: Path | None = None  # external seeds; None: built-in CLIP-ES seeds
    refine_overrides: list[str] = field(default_factory=list)
    retrain_overrides: list[str] = field(default_factory=list)
    seed_overrides: dict[str, Any] = field(default_factory=dict)  # ClipEsConfig fields
    seeds_batch: int = 1  # images through CLIP at once in the seed stage (1: as CLIP-ES; e.g. 8 on a GPU)
    device: str | None = None
    progress: bool = True
    stop_on_regression: bool = False  # stop after a stage that made things worse (see weakclip.report.checks)
    write_html: bool = True  # report.html at the end (and on a stop)
    redo: str | None = None  # a stage to recompute with every stage after it (their folders emptied first)


class RegressionStop(WeakclipError):
    """``stop_on_regression``: a stage made things worse; the report has been written (exit status 3)."""

    exit_status = EXIT_REGRESSION


def _broadcast(obj: Any) -> Any:
    """``obj`` of the first process on every process (itself when alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


class _Tee:
    """A text stream writing to two others (the console and a stage's log file)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def _percent(value: float | None) -> float | None:
    return None if value is None or value != value else round(100.0 * float(value), 2)


def _retrain_preset_for(preset: str | Path) -> str:
    """The retraining preset that goes with a refinement preset: the same name for the packaged ones
    (``voc``, ``coco``: the authors' DeepLab-v1; ``voc-plus``, ``coco-plus``), ``voc`` for a YAML file."""
    from weakclip.config import PRESETS

    name = str(preset).strip().lower()
    return name if name in PRESETS else "voc"


class Pipeline:
    """The four stages over one work directory. ``run()`` does what is left and returns the report."""

    def __init__(self, cfg: PipelineConfig, log: Callable[[str], None] = print):
        from weakclip.config import apply_overrides, load_preset
        from weakclip.retrain.config import apply_retrain_overrides, load_retrain_preset

        # every path the stages record is absolute: the run's networks load from any folder
        cfg = dataclasses.replace(cfg, **{name: Path(getattr(cfg, name)).absolute() for name in
                                          ("workdir", "data_root", "clip_weights", "seeds")
                                          if getattr(cfg, name) is not None})
        self.cfg = cfg
        self.workdir = Path(cfg.workdir)
        if not Path(cfg.data_root).exists():
            raise WeakclipError(f"dataset folder not found: {cfg.data_root}")
        if cfg.clip_weights is not None and not Path(cfg.clip_weights).exists():
            raise WeakclipError(f"CLIP weights file not found: {cfg.clip_weights}")
        if cfg.seeds is not None and not Path(cfg.seeds).is_dir():
            raise WeakclipError(f"seed folder not found: {cfg.seeds}")
        if cfg.redo is not None and cfg.redo not in STAGES:
            raise WeakclipError(f"--redo takes a stage: {', '.join(STAGES)}; got {cfg.redo!r}")
        self._log = log
        self._stage_t0: float | None = None
        self._made_with: dict[str, Any] | None = None  # what the stage now running is made with
        self._data_ids: dict[str, tuple[str, list[str]]] = {}  # split -> (its images' fingerprint, classes)
        self._fingerprints: dict[str, str | None] = {}  # weights file -> file_fingerprint

        refine = load_preset(cfg.preset)
        kind = cfg.dataset or refine.data.kind
        data = [f"data.kind={kind}", f"data.root={cfg.data_root}"]
        folder = kind == "folder"
        if cfg.train_split:
            data.append(f"data.split={cfg.train_split}")
        elif folder and "data.split" not in override_keys(cfg.refine_overrides):
            data.append(f"data.split={self._folder_split('training', 'training split')}")
        self.refine_cfg = apply_overrides(refine, [*data, *cfg.refine_overrides])
        self.kind = self.refine_cfg.data.kind
        self.train_split = self.refine_cfg.data.split
        retrain_name = cfg.retrain_preset or _retrain_preset_for(cfg.preset)
        self.retrain_name = str(retrain_name)
        retrain = load_retrain_preset(retrain_name)
        r_data = [f"data.kind={self.kind}", f"data.root={cfg.data_root}"]
        if cfg.val_split:
            r_data.append(f"data.val_split={cfg.val_split}")
        elif folder and "data.val_split" not in override_keys(cfg.retrain_overrides) and \
                self._folder_split("val", "val split") is not None:
            r_data.append("data.val_split=val")
        # the user's keys are checked before any dataset is opened
        apply_retrain_overrides(retrain, [*r_data, *cfg.retrain_overrides])
        # seeds, pseudo masks and retraining take each image once (refinement may repeat some: VOC's
        # "train+train_aug")
        self.pseudo_split = self._image_split(self.train_split)
        if self.pseudo_split or folder:
            r_data.append(f"data.split={self.pseudo_split or 'none'}")
        self.retrain_cfg = apply_retrain_overrides(retrain, [*r_data, *cfg.retrain_overrides])
        self._check_data()

    def _check_data(self) -> None:
        """Open the training and val splits now, so that a missing list or folder stops the run before
        hours of work rather than at the last stage."""
        from weakclip.data.datasets import require_images
        from weakclip.errors import DataError

        try:
            require_images(self._dataset(self.train_split, seed_dir=None), "training split")
        except DataError as exc:
            raise DataError(f"training split {self.train_split!r}: {exc}") from exc
        val_split = self.retrain_cfg.data.val_split
        if val_split:
            try:
                val = self._dataset(val_split, seed_dir=None, with_gt=True)
                require_images(val, "val split")
            except DataError as exc:
                raise DataError(f"val split {val_split!r}: {exc} (--val-split none skips the final "
                                "evaluation)") from exc
            if not val.has_gt:
                raise DataError(f"val split {val_split!r} has no ground-truth masks to evaluate against "
                                "(--val-split none skips the final evaluation)")

    # ------------------------------------------------------------------ bookkeeping
    def log(self, message: str) -> None:
        from weakclip.distributed import env_world

        if env_world()[0] == 0:
            self._log(message)

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        """The stage's ``stage.json`` when it finished; None when it has not, or when the record says it
        went over no image (written by an older version for an empty split: the stage is run again)."""
        record = self._read_record(stage)
        if record is None and (self.stage_dir(stage) / "stage.json").is_file():
            self.log(f"== {stage}: recorded complete over 0 images, so not done: run again")
        return record

    def _read_record(self, stage: str) -> dict[str, Any] | None:
        from weakclip.data.io import read_json

        path = self.stage_dir(stage) / "stage.json"
        record = read_json(path, what="stage record") if path.is_file() else None
        if record is not None and (record.get("metrics") or {}).get("images") == 0:
            return None
        return record

    def _finish(self, stage: str, settings: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
        from weakclip.data.io import jsonable, write_json_atomic
        from weakclip.distributed import barrier, env_world

        if metrics.get("images") == 0:  # never "complete" over nothing (require_images stops this before)
            raise WeakclipError(f"{stage}: no image was processed; the stage is not recorded complete")
        record = {"stage": stage, "status": "complete", "settings": settings, "metrics": metrics}
        if self._stage_t0 is not None:  # wall time of this session of the stage
            record["seconds"] = round(time.perf_counter() - self._stage_t0, 2)
        if self._made_with is not None:  # what it was made with, and which making of it this is (the
            # later stages record it as what they were made from)
            record["made_with"] = self._made_with
            record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            record["token"] = uuid.uuid4().hex[:12]
        if env_world()[0] == 0:
            write_json_atomic(self.stage_dir(stage) / "stage.json", jsonable(record))
        barrier()
        return record

    @contextlib.contextmanager
    def _stage_log(self, stage: str):
        """Copy what the stage prints (first process) to ``<stage>/log.txt``, appended on a resumed run."""
        from weakclip.distributed import env_world

        if env_world()[0] != 0:
            yield
            return
        path = self.stage_dir(stage) / "log.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8", buffering=1) as fh:  # line-buffered: kept on a crash
            fh.write(f"== {stage} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            with contextlib.redirect_stdout(_Tee(sys.stdout, fh)):
                yield

    def _folder_split(self, purpose: str, what: str) -> str | None:
        """A folder dataset's own split for ``purpose`` (the presets' are VOC's and COCO's), said in one line:
        for training ``"none"`` is every labelled image; a missing val list gives None (the data check then
        refuses the run, which ``--val-split none`` runs without a final evaluation)."""
        from weakclip.data.folder import default_split, split_choice_line

        split = default_split(self.cfg.data_root, purpose)
        if split is None and purpose == "val":
            return None
        self.log(split_choice_line(what, split, purpose))
        return split or "none"

    def _image_split(self, split: str | None) -> str | None:
        """The split whose images a concatenated training split ``"a+b"`` repeats: the part that holds every
        image of the others (VOC ``train+train_aug`` -> ``train_aug``); a plain split is its own."""
        if not split or "+" not in split:
            return split
        parts = [p.strip() for p in split.split("+")]
        ids = {p: set(self._dataset(p, seed_dir=None, with_gt=False).ids) for p in parts}
        union = set().union(*ids.values())
        for part in sorted(parts, key=lambda p: -len(ids[p])):
            if ids[part] >= union:
                return part
        raise WeakclipError(f"training split {split!r}: no part holds the images of all the others, so the "
                            "seeds and pseudo masks cannot be made once per image; pass --split")

    def _dataset(self, split: str | None, **kwargs):
        from weakclip.data.datasets import build_dataset

        return build_dataset(self.kind, self.cfg.data_root, split=split, **kwargs)

    # ------------------------------------------------------------------ what made a stage
    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings this run makes ``stage`` with, as one flat dict (dotted keys; split by
        :func:`weakclip.stage_settings.made_with` into those that change its results and those that do
        not). Each stage adds what it was made from: ``from.<stage>`` names the making of the stage before."""
        from weakclip.distributed import init_distributed
        from weakclip.methods import of_preset

        builders = {"seeds": self._seeds_settings, "refine": self._refine_settings,
                    "pseudo_masks": self._pseudo_settings, "retrain": self._retrain_settings}
        info = init_distributed(self.cfg.device)
        preset = self.retrain_name if stage == "retrain" else str(self.cfg.preset)
        return {"method": of_preset(str(self.cfg.preset)).name, **builders[stage](),
                "device": info.device.type, "processes": info.world_size, "preset": preset}

    def _data_settings(self, split: str | None, prefix: str = "data.") -> dict[str, Any]:
        """Which images and classes a split holds (not where: ``data.root`` may move)."""
        from weakclip.stage_settings import ids_fingerprint

        if split is None and prefix != "data.":  # no val split
            return {f"{prefix}images": None}
        key = split or ""
        if key not in self._data_ids:
            dataset = self._dataset(split, seed_dir=None, with_gt=False)
            self._data_ids[key] = (ids_fingerprint(dataset.ids), list(dataset.classes))
        images, classes = self._data_ids[key]
        return {f"{prefix}images": images, f"{prefix}classes": classes}

    def _fingerprint(self, path: str | Path | None) -> str | None:
        from weakclip.stage_settings import file_fingerprint

        if path is None:
            return None
        key = str(Path(path).resolve())
        if key not in self._fingerprints:
            self._fingerprints[key] = file_fingerprint(path)
        return self._fingerprints[key]

    def _clip_settings(self) -> dict[str, Any]:
        weights = self.cfg.clip_weights
        return {"clip.weights": self._fingerprint(weights),
                "clip.weights_file": None if weights is None else str(Path(weights).resolve())}

    def _made_from(self, stage: str) -> dict[str, Any]:
        """``from.<stage>``: when the stage this one comes after was made, and which making it was."""
        record = self._read_record(stage)
        token = record.get("token") if record else None
        return {f"from.{stage}": f"{record.get('finished')} #{token}" if token else None}

    def _seed_config(self):
        """CLIP-ES's settings; a -plus preset also switches on the seed departures, as
        `weakclip seeds --preset voc-plus` does."""
        from weakclip.seeds.settings import PLUS_SWITCHES, ClipEsConfig

        plus = PLUS_SWITCHES if str(self.cfg.preset).lower().endswith("-plus") else {}
        return ClipEsConfig(**{**plus, **self.cfg.seed_overrides})

    def _seeds_settings(self) -> dict[str, Any]:
        from weakclip.stage_settings import folder_fingerprint

        out: dict[str, Any] = {"data.kind": self.kind, "data.split": self.pseudo_split,
                               **self._data_settings(self.pseudo_split),
                               "data.root": str(Path(self.cfg.data_root).resolve())}
        if self.cfg.seeds is not None:
            return {**out, "seeds.source": "external", "seeds.files": folder_fingerprint(self.cfg.seeds),
                    "seeds.dir": str(Path(self.cfg.seeds).resolve())}
        # as resolved for the class list (background words, box threshold), as the seeder records them
        resolved = asdict(self._seed_config().for_classes(out["data.classes"]))
        return {**out, "seeds.source": "built-in CLIP-ES", "model.clip_arch": self.refine_cfg.model.clip_arch,
                **self._clip_settings(), **{f"seeds.{k}": v for k, v in resolved.items()},
                "seeds.batch_size": self.cfg.seeds_batch}

    def _refine_settings(self) -> dict[str, Any]:
        from weakclip.stage_settings import flatten

        # the pseudo section is the next stage's
        return {**flatten(self.refine_cfg.to_dict(), skip=("pseudo",)), "data.seeds": str(self.seed_dir()),
                **self._data_settings(self.train_split), **self._clip_settings(), **self._made_from("seeds")}

    def _pseudo_settings(self) -> dict[str, Any]:
        p = self.refine_cfg.pseudo
        return {**{f"pseudo.{k}": v for k, v in asdict(p).items()}, "pseudo.crf": p.crf_name(self.kind),
                "data.kind": self.kind, "data.split": self.pseudo_split,
                **self._data_settings(self.pseudo_split), **self._made_from("refine")}

    def _retrain_settings(self) -> dict[str, Any]:
        from weakclip.stage_settings import flatten

        m = self.retrain_cfg.model
        backbone = m.backbone_weights if m.pretrained_backbone else None
        return {**flatten(self.retrain_cfg.to_dict()), "data.masks": str(self.stage_dir("pseudo_masks")),
                **self._data_settings(self.pseudo_split),
                **self._data_settings(self.retrain_cfg.data.val_split, "data.val_"),
                "backbone.weights": self._fingerprint(backbone), **self._made_from("pseudo_masks")}

    def _held(self, stage: str, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """What the folder's ``stage`` was made with (finished) or started with (interrupted); None when
        it holds nothing of it. Records of older versions tell what they can (:meth:`_legacy_made_with`)."""
        from weakclip.data.io import read_json

        if record is not None:
            return record.get("made_with") or self._legacy_made_with(stage, record)
        path = self.stage_dir(stage) / MADE_WITH
        if path.is_file():
            return (read_json(path, what="stage settings") or {}).get("made_with")
        return self._legacy_made_with(stage, None)

    def _legacy_made_with(self, stage: str, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """The settings a stage made by a version without ``made_with`` records: the refinement's and the
        retraining's ``config.yaml``, the pseudo masks' and the built-in seeds' ``stage.json`` settings
        (the seeds' background words there are the ones prompted, so they are left out)."""
        from dataclasses import fields

        from weakclip.sections import read_yaml
        from weakclip.seeds.settings import ClipEsConfig
        from weakclip.stage_settings import flatten, normalised

        settings = (record or {}).get("settings") or {}
        flat: dict[str, Any] | None = None
        if stage in ("refine", "retrain") and (self.stage_dir(stage) / "config.yaml").is_file():
            flat = flatten(read_yaml(self.stage_dir(stage) / "config.yaml") or {}, skip=("pseudo",))
        elif stage == "pseudo_masks" and settings:
            flat = {f"pseudo.{k}": v for k, v in settings.items() if k != "dir"}
        elif stage == "seeds" and settings.get("source"):
            flat = {"seeds.source": settings["source"]}
            flat.update({f"seeds.{f.name}": settings[f.name] for f in fields(ClipEsConfig)
                         if f.name in settings and f.name != "background"})
        return None if flat is None else {"output": normalised(flat), "incidental": {}}

    def plan(self, stages: Sequence[str] = STAGES) -> tuple[dict[str, str], dict[str, Any], list[str]]:
        """Before any work, without writing: which of ``stages`` this run reuses (``"skip"``: complete and
        made with this run's settings) and which it makes or resumes (``"run"``), the records of those
        reused, and the notes (settings that differ but do not change results). Every stage the folder
        holds is checked, asked for or not. WeakclipError (one line) for a stage made or started with
        another setting that changes its results (:func:`weakclip.stage_settings.check_reuse`), or held
        while a stage before it is to be made again; ``redo`` stages are made again, unchecked."""
        redo = set(STAGES[STAGES.index(self.cfg.redo):]) if self.cfg.redo else set()
        plan: dict[str, str] = {}
        records: dict[str, Any] = {}
        notes: list[str] = []
        upstream: str | None = None  # the first stage this run makes (again) or resumes
        for stage in STAGES:
            record = held = None
            if stage in redo:
                self._check_redo_removes_no_input(stage)
            else:
                record = self.stage_record(stage)
                held = self._held(stage, record)
            if record is not None or held is not None:  # the folder holds (some of) it
                if upstream is not None:
                    state = "is complete" if record is not None else "was started"
                    raise WeakclipError(
                        f"{stage} in {self.workdir} {state}, but the {upstream} stage before it is not, and "
                        f"this run makes it: its results would no longer come from the {upstream} stage's; "
                        f"pass --redo {upstream} to recompute {upstream} and every stage after it, or use a "
                        "new --workdir")
                note = check_reuse(stage, self.workdir, held, made_with(self.stage_settings(stage)),
                                   complete=record is not None)
                notes += [note] if note else []
            if record is not None:
                records[stage] = record
            elif upstream is None and (stage in stages or held is not None or stage in redo):
                upstream = stage
            if stage in stages:
                plan[stage] = "skip" if record is not None else "run"
        return plan, records, notes

    def _check_redo_removes_no_input(self, stage: str) -> None:
        """``redo`` empties the stage's folder: refused when it holds something the run reads."""
        folder = self.stage_dir(stage).resolve()
        m = self.retrain_cfg.model
        inputs = [self.cfg.data_root, self.cfg.seeds, self.cfg.clip_weights, m.backbone_weights]
        for item in inputs:
            if item is None:
                continue
            path = Path(item).resolve()
            if path == folder or folder in path.parents:
                raise WeakclipError(f"--redo {self.cfg.redo} would empty {folder}, which holds {path} that "
                                    "this run reads: move it out of the work folder first")

    def _clear_for_redo(self) -> None:
        """Empty the folders of the ``redo`` stage and of every stage after it (first process)."""
        removed = []
        for stage in STAGES[STAGES.index(self.cfg.redo):]:
            folder = self.stage_dir(stage)
            if folder.exists():
                try:
                    shutil.rmtree(folder)
                except OSError as exc:
                    raise WeakclipError(f"--redo {self.cfg.redo}: cannot remove {folder}: "
                                        f"{exc.strerror or exc}") from exc
                removed.append(stage)
        if removed:
            self.log(f"== --redo {self.cfg.redo}: removed {', '.join(removed)} of {self.workdir}")

    # ------------------------------------------------------------------ stages
    def run_seeds(self) -> dict[str, Any]:
        if self.cfg.seeds is not None:
            return self._external_seeds(Path(self.cfg.seeds))
        from weakclip.distributed import init_distributed
        from weakclip.models.clip import build_clip
        from weakclip.seeds.clip_es import ClipEsSeeder
        from weakclip.seeds.run import format_names, generate_seeds

        info = init_distributed(self.cfg.device)
        out = self.stage_dir("seeds")
        dataset = self._dataset(self.pseudo_split, seed_dir=None)
        # CLIP-ES's settings (background words and box threshold follow the class list)
        es_cfg = self._seed_config()
        image_tower, text_tower = build_clip(self.refine_cfg.model.clip_arch, self.cfg.clip_weights,
                                             device=info.device)
        seeder = ClipEsSeeder(image_tower, dataset.classes, text_tower=text_tower, config=es_cfg)
        names = seeder.names_record()
        for line in format_names(names):
            self.log(f"seeds: {line}")
        summary = generate_seeds(dataset, seeder, out, rank=info.rank, world_size=info.world_size,
                                 progress=self.cfg.progress, batch_size=self.cfg.seeds_batch)
        if summary.get("failed"):
            raise ItemsFailed(f"seeds: {failed_items_message(summary['failures'], summary['images'])}; fix "
                              "or remove them and run again (the stage is not recorded complete)")
        metrics = {"seeds_miou": summary.get("miou"), "seeds_miou_confident": summary.get("miou_confident"),
                   "coverage": summary.get("coverage"), "images": summary.get("images")}
        # the settings as resolved for the class list, then the prompts used (its "background" replaces the
        # configured list by the words actually prompted)
        settings = {"source": "built-in CLIP-ES", "dir": str(out), **asdict(seeder.config), **names}
        return self._finish("seeds", settings, metrics)

    def _external_seeds(self, seed_dir: Path) -> dict[str, Any]:
        from weakclip.metrics import ConfusionMatrix
        from weakclip.seeds.check import check_seeds

        dataset = self._dataset(self.pseudo_split, seed_dir=seed_dir)
        report = check_seeds(seed_dir, dataset, progress=False)
        if not report.ok:
            problems = report.problems()
            raise WeakclipError(f"seed folder {seed_dir} (checked with the dataset's images and masks): "
                                f"{len(problems)} problems, e.g. {problems[:3]} (see 'weakclip seeds check "
                                f"{seed_dir}')")
        metrics: dict[str, Any] = {"images": len(dataset), "coverage": report.coverage}
        if dataset.has_gt:
            as_bg = ConfusionMatrix(dataset.classes, unsure="background")
            confident = ConfusionMatrix(dataset.classes, unsure="ignore")
            for i in range(len(dataset)):
                gt = dataset.read_gt(i)  # each checked against its image (check_seeds did so already)
                seed = dataset.read_seed(i)
                as_bg.update(seed, gt, name=str(dataset.seed_path(i)))
                confident.update(seed, gt, name=str(dataset.seed_path(i)))
            metrics["seeds_miou"] = as_bg.scores().miou
            metrics["seeds_miou_confident"] = confident.scores().miou
        return self._finish("seeds", {"source": "external", "dir": str(seed_dir)}, metrics)

    def seed_dir(self) -> Path:
        return Path(self.cfg.seeds) if self.cfg.seeds is not None else self.stage_dir("seeds")

    def run_refine(self) -> dict[str, Any]:
        from weakclip.config import apply_overrides
        from weakclip.engine.trainer import train
        from weakclip.inference.periodic import build_evaluator

        out = self.stage_dir("refine")
        cfg = apply_overrides(self.refine_cfg, [f"data.seeds={self.seed_dir()}"])
        summary = train(cfg, out, clip_weights=self.cfg.clip_weights, resume=True, device=self.cfg.device,
                        progress=self.cfg.progress, evaluator=build_evaluator)
        if not summary["finished"]:
            raise WeakclipError(f"refinement stopped at iteration {summary['end_iter']} of "
                                f"{summary['total_iters']}")
        metrics = {"final_losses": summary["final"], "seconds": summary["seconds"],
                   "checkpoint": summary["checkpoint"]}
        return self._finish("refine", {"config": str(out / "config.yaml")}, metrics)

    def run_pseudo_masks(self) -> dict[str, Any]:
        from weakclip.distributed import init_distributed
        from weakclip.inference.loading import load_trained_model, normalization_of
        from weakclip.inference.pseudo_masks import generate_pseudo_masks

        p = self.refine_cfg.pseudo  # the preset's section with the --set pseudo.* overrides
        info = init_distributed(self.cfg.device)
        # the run's --clip-weights served the seeds and the refinement: no note that this stage needs none
        model, cfg = load_trained_model(self.stage_dir("refine"), self.cfg.clip_weights, device=info.device,
                                        note_unused=False)
        dataset = self._dataset(self.pseudo_split, seed_dir=None, image_reader=cfg.data.image_reader,
                                image_orientation=cfg.data.image_orientation)
        crf = p.crf_name(self.kind)
        mean, std = normalization_of(cfg)
        out = self.stage_dir("pseudo_masks")
        summary = generate_pseudo_masks(model, dataset, out, p, mean=mean, std=std, kind=self.kind,
                                        rank=info.rank, world_size=info.world_size,
                                        progress=self.cfg.progress)
        if summary.get("failed"):
            failed = failed_items_message(summary["failures"], summary["images"])
            raise ItemsFailed(f"pseudo masks: {failed}; fix or remove them and run again (the stage is not "
                              "recorded complete)")
        metrics = {"pseudo_miou": summary.get("miou"),
                   "pseudo_miou_no_crf": summary.get("miou_before_crf", summary.get("miou")),
                   "images": summary.get("images")}
        return self._finish("pseudo_masks", {**asdict(p), "crf": crf, "dir": str(out)}, metrics)

    def run_retrain(self) -> dict[str, Any]:
        from weakclip.retrain.train import retrain

        out = self.stage_dir("retrain")
        summary = retrain(self.retrain_cfg, self.stage_dir("pseudo_masks"), workdir=out, resume=True,
                          device=self.cfg.device, progress=self.cfg.progress)
        if not summary.get("finished"):
            raise WeakclipError("retraining did not finish")
        ev = summary.get("eval") or {}
        metrics = {"final_miou": None if ev.get("miou") is None else ev["miou"] / 100.0,
                   "val_images": ev.get("images")}
        return self._finish("retrain", {"config": str(out / "config.yaml")}, metrics)

    # ------------------------------------------------------------------ driver
    def run(self, stages: Sequence[str] = STAGES) -> dict[str, Any]:
        from weakclip.data.io import jsonable, write_json_atomic
        from weakclip.distributed import barrier, env_world, init_distributed
        from weakclip.retrain.train import check_backbone_weights

        if "retrain" in stages:  # ResNet-38 has no download: fail now, not after hours of refinement
            check_backbone_weights(self.retrain_cfg)
        # One process group for the whole run (under torchrun): the stages find it and leave it up.
        init_distributed(self.cfg.device)
        # what the folder holds against what this run asks for, before anything is written
        plan, held, notes = self.plan(stages)
        # Every process has looked before any can write: all take the same branches.
        barrier()
        for note in notes:
            self.log(note)
        first = env_world()[0] == 0
        if self.cfg.redo is not None and first:
            self._clear_for_redo()
        self.workdir.mkdir(parents=True, exist_ok=True)
        runners = {"seeds": self.run_seeds, "refine": self.run_refine, "pseudo_masks": self.run_pseudo_masks,
                   "retrain": self.run_retrain}
        if first:
            self._write_run_info()
        barrier()
        records: dict[str, Any] = {}
        for stage in stages:
            if plan[stage] == "skip":
                record = held[stage]
                self.log(f"== {stage}: complete, skipped (--redo {stage} recomputes it and the later stages)")
            else:
                self.log(f"== {stage}")
                self._made_with = made_with(self.stage_settings(stage))
                if first:
                    write_json_atomic(self.stage_dir(stage) / MADE_WITH,
                                      jsonable({"stage": stage, "made_with": self._made_with}))
                self._stage_t0 = time.perf_counter()
                with self._stage_log(stage):
                    record = runners[stage]()
                self._stage_t0 = self._made_with = None
            records[stage] = record
            if self.cfg.stop_on_regression and stage in ("pseudo_masks", "retrain"):
                analysis = self._analyse() if env_world()[0] == 0 else None
                found = _broadcast(None if analysis is None else
                                   [str(r) for r in analysis["regressions"] if r.stage == stage])
                if found:
                    self._write_report(records, analysis)
                    barrier()
                    raise RegressionStop(f"stopped after the {stage} stage (--stop-on-regression): "
                                         + "; ".join(found))
        report = self._write_report(records, None)
        barrier()
        return report

    def _write_run_info(self) -> None:
        from weakclip.data.classes import class_record
        from weakclip.data.io import write_json_atomic
        from weakclip.report.analysis import RUN_INFO

        # Written once every stage the folder holds was found made with this run's settings (plan), so that
        # it tells what the folder holds, not only what the last command asked for. train_split: the split
        # whose images were seeded and pseudo-masked (each image once); classes: the names of the masks' ids
        # (the dataset's; a refinement's prompts may spell them otherwise).
        classes = self._dataset(self.pseudo_split, seed_dir=None).classes
        info = {"data_root": str(Path(self.cfg.data_root).resolve()), "kind": self.kind,
                "train_split": self.pseudo_split, "val_split": self.retrain_cfg.data.val_split,
                "seed_dir": str(Path(self.seed_dir()).resolve()), "preset": str(self.cfg.preset),
                "retrain_preset": self.retrain_name,
                **class_record(classes)}
        write_json_atomic(self.workdir / RUN_INFO, info)

    def _analyse(self) -> dict[str, Any]:
        """The report's analysis of the work folder plus its ``regressions`` (first process only)."""
        from weakclip.report.analysis import analyse
        from weakclip.report.checks import find_regressions

        try:
            analysis = analyse(self.workdir, log=self.log)
        except Exception as exc:  # the report must not stop a run whose stages succeeded
            self.log(f"report page: could not analyse {self.workdir}: {type(exc).__name__}: {exc}")
            return {"regressions": [], "failed": True}
        analysis["regressions"] = find_regressions(analysis)
        return analysis

    def _write_report(self, records: dict[str, Any], analysis: dict[str, Any] | None) -> dict[str, Any]:
        """report.json, report.html and the summary table with the warnings (first process)."""
        from weakclip.data.io import write_json_atomic
        from weakclip.distributed import env_world

        report = self.report(records)
        if env_world()[0] != 0:
            return report
        if analysis is None:
            analysis = self._analyse()
        report["warnings"] = [str(r) for r in analysis["regressions"]]
        if self.cfg.write_html and not analysis.get("failed"):
            from weakclip.report.page import build_report

            try:
                report["html"] = str(build_report(self.workdir, log=self.log, analysis=analysis))
            except Exception as exc:  # the run's results stand without their page
                self.log(f"report page: could not write report.html: {type(exc).__name__}: {exc} "
                         f"('weakclip report {self.workdir}' tries again)")
        write_json_atomic(self.workdir / "report.json", report)
        self.log(format_report(report))
        return report

    def report(self, records: dict[str, Any]) -> dict[str, Any]:
        def metric(stage: str, key: str):
            return _percent((records.get(stage) or {}).get("metrics", {}).get(key))

        return {
            "seeds_miou": metric("seeds", "seeds_miou"),
            "seeds_miou_confident": metric("seeds", "seeds_miou_confident"),
            "pseudo_miou_no_crf": metric("pseudo_masks", "pseudo_miou_no_crf"),
            "pseudo_miou": metric("pseudo_masks", "pseudo_miou"),
            "final_miou": metric("retrain", "final_miou"),
            "units": "percent mIoU; seeds, pseudo masks on the training split, final on val",
            "stages": {k: {**v.get("settings", {}), "metrics": v.get("metrics", {})}
                       for k, v in records.items()},
            "workdir": str(self.workdir),
        }


def format_report(report: dict[str, Any]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:6.2f}"

    rows = [("seeds (unsure = background)", report["seeds_miou"]),
            ("refined pseudo masks, before CRF", report["pseudo_miou_no_crf"]),
            ("refined pseudo masks", report["pseudo_miou"]),
            ("final network, val", report["final_miou"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  mIoU %", "-" * (width + 8)]
    lines += [f"{name:<{width}}  {cell(v)}" for name, v in rows]
    for warning in report.get("warnings") or []:
        lines.append(f"WARNING: {warning}")
    lines.append(f"report: {Path(report['workdir']) / 'report.json'}")
    if report.get("html"):
        lines.append(f"page: {report['html']}")
    return "\n".join(lines)
