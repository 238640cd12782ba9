"""WeakCLIP's ``weakclip run``: seeds -> refinement -> pseudo masks -> retraining -> val evaluation, over one
work folder (the shared machinery, records, reuse, resume and the report: :mod:`weakclip.staged_run`).

The refinement and retraining resume from their latest checkpoints, the seeds and pseudo masks from the images
already written. Every path recorded is absolute, and the networks' checkpoints store their classes too, so
the run's networks load from any folder once the data is gone. :func:`build_pipeline` gives the run of the
method a preset belongs to (:mod:`weakclip.methods`: ``voc``, ``coco`` -> :class:`Pipeline`; ``excel-voc``,
``excel-coco`` -> :class:`weakclip.methods.excel.pipeline.ExcelPipeline`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from weakclip.errors import WeakclipError
from weakclip.methods import get as get_method
from weakclip.sections import override_keys
from weakclip.staged_run import RegressionStop, StagedRun, format_report, percent

__all__ = ["STAGES", "Pipeline", "PipelineConfig", "RegressionStop", "build_pipeline", "format_report"]

STAGES = ("seeds", "refine", "pseudo_masks", "retrain")
SEED_METHODS = ("clip-es", "excel")


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
    descriptors: Path | None = None  # ExCEL's class descriptors JSON (ExCEL runs; WeakCLIP's excel seeds)
    retrain: Literal["deeplabv1", "none"] | None = None  # ExCEL: a DeepLab on its masks (default none)
    seed_method: Literal["clip-es", "excel"] = "clip-es"  # WeakCLIP's built-in seeds (excel: unmeasured)
    seed_band: bool = True  # excel seeds: the ignore band (255) of weakclip.methods.excel.seed_band




def _retrain_preset_for(preset: str | Path) -> str:
    """The retraining preset that goes with a refinement preset: the same name for the packaged ones
    (``voc``, ``coco``: the authors' DeepLab-v1; ``voc-plus``, ``coco-plus``), ``voc`` for a YAML file."""
    from weakclip.config import PRESETS

    name = str(preset).strip().lower()
    return name if name in PRESETS else "voc"



class Pipeline(StagedRun):
    """WeakCLIP's four stages over one work directory. ``run()`` does what is left and returns the report."""

    method = get_method("weakclip")

    def __init__(self, cfg: PipelineConfig, log: Callable[[str], None] = print):
        from weakclip.config import apply_overrides, load_preset
        from weakclip.retrain.config import apply_retrain_overrides, load_retrain_preset

        # every path the stages record is absolute: the run's networks load from any folder
        cfg = dataclasses.replace(cfg, **{name: Path(getattr(cfg, name)).absolute() for name in
                                          ("workdir", "data_root", "clip_weights", "seeds", "descriptors")
                                          if getattr(cfg, name) is not None})
        super().__init__(cfg, log)
        if not Path(cfg.data_root).exists():
            raise WeakclipError(f"dataset folder not found: {cfg.data_root}")
        if cfg.clip_weights is not None and not Path(cfg.clip_weights).exists():
            raise WeakclipError(f"CLIP weights file not found: {cfg.clip_weights}")
        if cfg.seeds is not None and not Path(cfg.seeds).is_dir():
            raise WeakclipError(f"seed folder not found: {cfg.seeds}")
        if cfg.redo is not None and cfg.redo not in STAGES:
            raise WeakclipError(f"--redo takes a stage: {', '.join(STAGES)}; got {cfg.redo!r}")
        if cfg.retrain not in (None, "deeplabv1"):
            raise WeakclipError(f"--retrain {cfg.retrain}: a WeakCLIP run always retrains its DeepLab (the "
                                "retrain stage); --retrain none is for ExCEL runs")
        if cfg.seed_method not in SEED_METHODS:
            raise WeakclipError(f"--seed-method takes {' or '.join(SEED_METHODS)}; got {cfg.seed_method!r}")
        if cfg.seed_method == "excel" and cfg.seeds is not None:
            raise WeakclipError("--seed-method excel makes the seeds, --seeds brings them: give one of them")
        if cfg.descriptors is not None and cfg.seed_method != "excel":
            raise WeakclipError("--descriptors is read by ExCEL (an excel-* preset, or --seed-method excel); "
                                "CLIP-ES seeds take none")
        if cfg.descriptors is not None and not Path(cfg.descriptors).is_file():
            raise WeakclipError(f"descriptors file not found: {cfg.descriptors}")
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
            train = self._dataset(self.train_split, seed_dir=None)
            require_images(train, "training split")
        except DataError as exc:
            raise DataError(f"training split {self.train_split!r}: {exc}") from exc
        if self.cfg.descriptors is not None:  # --seed-method excel's: every class described, or one line
            from weakclip.methods.excel.config import check_text_inputs

            check_text_inputs(self._excel_seed_config(), self.cfg.descriptors, list(train.classes))
        self.check_val_split(self.retrain_cfg.data.val_split)

    # ------------------------------------------------------------------ hooks
    def runners(self) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"seeds": self.run_seeds, "refine": self.run_refine, "pseudo_masks": self.run_pseudo_masks,
                "retrain": self.run_retrain}

    def settings_builders(self) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"seeds": self._seeds_settings, "refine": self._refine_settings,
                "pseudo_masks": self._pseudo_settings, "retrain": self._retrain_settings}

    def stage_preset(self, stage: str) -> str:
        return self.retrain_name if stage == "retrain" else str(self.cfg.preset)

    def inputs(self) -> list[Any]:
        m = self.retrain_cfg.model
        return [self.cfg.data_root, self.cfg.seeds, self.cfg.clip_weights, m.backbone_weights,
                self.cfg.descriptors]

    def before_run(self, stages: Sequence[str]) -> None:
        self.check_retrain_weights(stages)  # no download: fail now, not after hours of refinement

    def run_info(self) -> dict[str, Any]:
        from weakclip.data.classes import class_record

        # train_split: the split whose images were seeded and pseudo-masked (each image once); classes: the
        # names of the masks' ids (the dataset's; a refinement's prompts may spell them otherwise).
        classes = self._dataset(self.pseudo_split, seed_dir=None).classes
        return {"data_root": str(Path(self.cfg.data_root).resolve()), "kind": self.kind,
                "train_split": self.pseudo_split, "val_split": self.retrain_cfg.data.val_split,
                "seed_dir": str(Path(self.seed_dir()).resolve()), "preset": str(self.cfg.preset),
                "retrain_preset": self.retrain_name, **class_record(classes)}

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
        if self.cfg.seed_method == "excel":
            return {**out, **self._excel_seeds_settings()}
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

    # ------------------------------------------------------------------ stages
    def run_seeds(self) -> dict[str, Any]:
        if self.cfg.seeds is not None:
            return self._external_seeds(Path(self.cfg.seeds))
        if self.cfg.seed_method == "excel":
            return self._excel_seeds()
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
        self.raise_if_failed("seeds", summary)
        metrics = {"seeds_miou": summary.get("miou"), "seeds_miou_confident": summary.get("miou_confident"),
                   "coverage": summary.get("coverage"), "images": summary.get("images")}
        # the settings as resolved for the class list, then the prompts used (its "background" replaces the
        # configured list by the words actually prompted)
        settings = {"source": "built-in CLIP-ES", "dir": str(out), **asdict(seeder.config), **names}
        return self._finish("seeds", settings, metrics)

    # ExCEL's training-free masks as seeds (--seed-method excel: in no paper, unmeasured)
    def _excel_seed_config(self):
        """ExCEL's settings for the training-free masks of this data (excel-coco for COCO, else excel-voc; a
        folder dataset's cluster count by VOC's ratio:
        :func:`weakclip.methods.excel.config.training_free_config`) on the refinement's CLIP."""
        from weakclip.methods.excel.config import training_free_config

        arch = self.refine_cfg.model.clip_arch
        return training_free_config(self.kind, overrides=[f"model.clip_arch={arch}"])[1]

    def _excel_band(self):
        from weakclip.methods.excel.seed_band import SeedBand

        return SeedBand.of_config(self._excel_seed_config()) if self.cfg.seed_band else None

    def _excel_seeds_settings(self) -> dict[str, Any]:
        from weakclip.methods.excel.training_free import free_settings

        cfg = self._excel_seed_config()
        band = self._excel_band()
        path = self.cfg.descriptors
        return {"seeds.source": "ExCEL training-free masks", "model.clip_arch": cfg.model.clip_arch,
                **self._clip_settings(), "text.descriptors": self._fingerprint(path),
                "text.descriptors_file": None if path is None else str(Path(path).resolve()),
                **{f"seeds.excel.{k}": v for k, v in asdict(free_settings(cfg)).items()},
                "seeds.excel.band": None if band is None else asdict(band)}

    def _excel_seeds(self) -> dict[str, Any]:
        from weakclip.distributed import init_distributed
        from weakclip.methods.excel.jobs import free_mask_job
        from weakclip.methods.excel.train import build_network
        from weakclip.methods.excel.training_free import free_settings

        info = init_distributed(self.cfg.device)
        out = self.stage_dir("seeds")
        dataset = self._dataset(self.pseudo_split, seed_dir=None)
        cfg = self._excel_seed_config()
        net = build_network(cfg, list(dataset.classes), clip_weights=self.cfg.clip_weights,
                            descriptors=self.cfg.descriptors, device=info.device, note=self.log).eval()
        band = self._excel_band()
        self.log("seeds: ExCEL's training-free masks" + (f" with the ignore band {band}" if band else
                                                        " without an ignore band") + " (unmeasured)")
        summary = free_mask_job(net, dataset, out, free_settings(cfg), band=band, rank=info.rank,
                                world_size=info.world_size, progress=self.cfg.progress)
        self.raise_if_failed("seeds", summary)
        metrics = {"seeds_miou": summary.get("miou"), "seeds_miou_confident": summary.get("miou_confident"),
                   "coverage": summary.get("coverage"), "images": summary.get("images")}
        settings = {"source": "ExCEL training-free masks", "dir": str(out),
                    "band": None if band is None else asdict(band)}
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
        self.raise_if_failed("pseudo masks", summary)
        metrics = {"pseudo_miou": summary.get("miou"),
                   "pseudo_miou_no_crf": summary.get("miou_before_crf", summary.get("miou")),
                   "images": summary.get("images")}
        return self._finish("pseudo_masks", {**asdict(p), "crf": crf, "dir": str(out)}, metrics)

    def report(self, records: dict[str, Any]) -> dict[str, Any]:
        def metric(stage: str, key: str):
            return percent((records.get(stage) or {}).get("metrics", {}).get(key))

        return {
            "seeds_miou": metric("seeds", "seeds_miou"),
            "seeds_miou_confident": metric("seeds", "seeds_miou_confident"),
            "pseudo_miou_no_crf": metric("pseudo_masks", "pseudo_miou_no_crf"),
            "pseudo_miou": metric("pseudo_masks", "pseudo_miou"),
            "final_miou": metric("retrain", "final_miou"),
            "method": self.method.name,
            "units": "percent mIoU; seeds, pseudo masks on the training split, final on val",
            "rows": self.report_rows(),
            "stages": {k: {**v.get("settings", {}), "metrics": v.get("metrics", {})}
                       for k, v in records.items()},
            "workdir": str(self.workdir),
        }

    def report_rows(self) -> list[tuple[str, str]]:
        return [("seeds (unsure = background)", "seeds_miou"),
                ("refined pseudo masks, before CRF", "pseudo_miou_no_crf"),
                ("refined pseudo masks", "pseudo_miou"),
                ("final network, val", "final_miou")]



def build_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = print) -> StagedRun:
    """The run of the method ``cfg.preset`` belongs to (its ``"pipeline"`` entry point)."""
    from weakclip.methods import entry, of_preset

    return entry(of_preset(str(cfg.preset)), "pipeline")(cfg, log=log)
