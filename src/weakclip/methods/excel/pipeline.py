"""ExCEL's ``weakclip run``: training-free masks -> single-stage training -> masks of the training split from
the trained network -> val evaluation -> (optionally) a DeepLab retrained on those masks.

Stages (folders of the work directory; the shared machinery, records, reuse, resume, the report and the
refusal of another method's folder: :mod:`weakclip.staged_run`):

- ``seeds``: the release's training-free masks (``tools/infer_lam.py --training_free true``) of the training
  split, scored where it has ground truth (``seeds_miou``); a fresh network, its decoder unused;
- ``train``: the single-stage training (:func:`weakclip.methods.excel.train.train_excel`; its work folder,
  resumed from its latest checkpoint exactly as an uninterrupted run);
- ``pseudo_masks``: the trained network's masks of the training split with the release's test-time settings
  (the preset's ``infer`` section), scored (``pseudo_miou``); with the CRF on, ``no_crf/`` holds the argmax
  before it (``pseudo_miou_no_crf``);
- ``evaluate``: the same on the val split, ``evaluate/masks/`` and ``evaluate/eval.json`` (the release's
  evaluation: ``final_miou`` when nothing is retrained); left out with no val split;
- ``retrain`` (``retrain="deeplabv1"``; the release has none, so the default is ``"none"``): the DeepLab-v1
  ResNet-38 of the ``voc`` / ``coco`` retraining presets on the ``pseudo_masks`` stage's masks, as WeakCLIP
  retrains; its val mIoU is then ``final_miou`` and the ExCEL network's stays in ``network_val_miou``.

The settings come from the preset (``excel-voc``, ``excel-coco`` or a YAML file) with ``--set`` overrides
(``PipelineConfig.refine_overrides``); the retraining's from its preset with ``--retrain-set``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from weakclip.errors import WeakclipError
from weakclip.methods import get as get_method
from weakclip.sections import override_keys
from weakclip.staged_run import StagedRun, percent

__all__ = ["RETRAIN_CHOICES", "ExcelPipeline"]

RETRAIN_CHOICES = ("none", "deeplabv1")


class ExcelPipeline(StagedRun):
    """ExCEL's stages over one work directory (module docstring). ``cfg``: a
    :class:`weakclip.pipeline.PipelineConfig` whose ``preset`` is an ExCEL preset."""

    method = get_method("excel")

    def __init__(self, cfg, log: Callable[[str], None] = print) -> None:
        from weakclip.methods.excel.config import apply_excel_overrides, load_excel_preset
        from weakclip.retrain.config import apply_retrain_overrides, load_retrain_preset

        cfg = dataclasses.replace(cfg, **{name: Path(getattr(cfg, name)).absolute() for name in
                                          ("workdir", "data_root", "clip_weights", "descriptors")
                                          if getattr(cfg, name) is not None})
        super().__init__(cfg, log)
        if cfg.seeds is not None:
            raise WeakclipError("--seeds is WeakCLIP's: an ExCEL run makes its own training-free masks (the "
                                "seeds stage)")
        if cfg.seed_method != "clip-es":
            raise WeakclipError("--seed-method is WeakCLIP's (its seeds stage); an ExCEL run's seeds are its "
                                "training-free masks")
        if not Path(cfg.data_root).exists():
            raise WeakclipError(f"dataset folder not found: {cfg.data_root}")
        if cfg.clip_weights is not None and not Path(cfg.clip_weights).is_file():
            raise WeakclipError(f"CLIP weights file not found: {cfg.clip_weights}")
        self.retrain_mode = cfg.retrain or "none"
        if self.retrain_mode not in RETRAIN_CHOICES:
            raise WeakclipError(f"--retrain takes {' or '.join(RETRAIN_CHOICES)}; got {cfg.retrain!r}")
        if self.retrain_mode == "none" and (cfg.retrain_overrides or cfg.retrain_preset):
            raise WeakclipError("--retrain-set / --retrain-preset set the retraining, which this ExCEL run "
                                "does not make: add --retrain deeplabv1")

        excel = load_excel_preset(cfg.preset)
        kind = cfg.dataset or excel.data.kind
        folder = kind == "folder"
        data = [f"data.kind={kind}", f"data.root={cfg.data_root}"]
        if cfg.train_split:
            data.append(f"data.split={cfg.train_split}")
        elif folder and "data.split" not in override_keys(cfg.refine_overrides):
            data.append(f"data.split={self._folder_split('training', 'training split')}")
        if cfg.descriptors is not None:
            data.append(f"text.descriptors={cfg.descriptors}")
        if folder:  # the presets' 112 / 224 clusters are VOC's / COCO's: another class list's by VOC's ratio
            data.append("text.num_clusters=none")
        if kind == "coco91":
            raise WeakclipError("ExCEL's release trains on COCO's 80 classes (81 with background): --dataset "
                                "coco, not coco91")
        self.excel_cfg = apply_excel_overrides(excel, [*data, *cfg.refine_overrides])
        self.kind = self.excel_cfg.data.kind
        self.train_split = self.excel_cfg.data.split
        self.descriptors = self.excel_cfg.text.descriptors
        if self.descriptors is not None and not Path(self.descriptors).is_file():
            raise WeakclipError(f"descriptors file not found: {self.descriptors}")

        # the val split: --val-split, a folder's splits/val.txt, else the retraining preset's for the data
        self.retrain_name = str(cfg.retrain_preset or ("coco" if self.kind.startswith("coco") else "voc"))
        retrain = load_retrain_preset(self.retrain_name)
        if cfg.val_split:
            val = cfg.val_split
        elif folder:
            val = self._folder_split("val", "val split")
        else:
            val = retrain.data.val_split
        self.val_split = None if val in (None, "", "none") else val
        if cfg.redo is not None and cfg.redo not in self.active_stages():
            raise WeakclipError(f"--redo takes a stage of this run: {', '.join(self.active_stages())}; got "
                                f"{cfg.redo!r}")
        # training-free masks and pseudo masks take each image once (VOC's "train+train_aug" repeats some)
        self.pseudo_split = self._image_split(self.train_split)
        self.retrain_cfg = None
        self._loaded: tuple[tuple[str, str], Any] | None = None  # (checkpoint, device) -> the trained network
        if self.retrain_mode == "deeplabv1":
            r_data = [f"data.kind={self.kind}", f"data.root={cfg.data_root}",
                      f"data.split={self.pseudo_split or 'none'}",
                      f"data.val_split={self.val_split or 'none'}"]
            self.retrain_cfg = apply_retrain_overrides(retrain, [*r_data, *cfg.retrain_overrides])
        self._check_data()

    # ------------------------------------------------------------------ data
    def _dataset(self, split: str | None, **kwargs):
        """A split read as the release reads its images (the preset's reader and orientation)."""
        from weakclip.data.datasets import build_dataset

        d = self.excel_cfg.data
        kwargs.setdefault("image_reader", d.image_reader)
        kwargs.setdefault("image_orientation", d.image_orientation)
        return build_dataset(self.kind, self.cfg.data_root, split=split, **kwargs)

    def _check_data(self) -> None:
        """Open the splits and read the descriptors now: a missing list, folder or class stops the run before
        hours of work, in one line."""
        from weakclip.data.datasets import require_images
        from weakclip.errors import DataError

        try:
            train = self._dataset(self.train_split, seed_dir=None)
            require_images(train, "training split")
        except DataError as exc:
            raise DataError(f"training split {self.train_split!r}: {exc}") from exc
        from weakclip.methods.excel.config import check_text_inputs

        check_text_inputs(self.excel_cfg, self.descriptors, list(train.classes), str(self.cfg.preset))
        self.check_val_split(self.val_split)

    # ------------------------------------------------------------------ hooks
    def active_stages(self) -> tuple[str, ...]:
        stages = ["seeds", "train", "pseudo_masks"]
        if self.val_split:
            stages.append("evaluate")
        if self.retrain_mode == "deeplabv1":
            stages.append("retrain")
        return tuple(stages)

    def runners(self) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"seeds": self.run_seeds, "train": self.run_train, "pseudo_masks": self.run_pseudo_masks,
                "evaluate": self.run_evaluate, "retrain": self.run_retrain}

    def settings_builders(self) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"seeds": self._seeds_settings, "train": self._train_settings,
                "pseudo_masks": self._pseudo_settings, "evaluate": self._evaluate_settings,
                "retrain": self._retrain_settings}

    def stage_preset(self, stage: str) -> str:
        return self.retrain_name if stage == "retrain" else str(self.cfg.preset)

    def inputs(self) -> list[Any]:
        backbone = self.retrain_cfg.model.backbone_weights if self.retrain_cfg is not None else None
        return [self.cfg.data_root, self.cfg.clip_weights, self.descriptors, backbone]

    def before_run(self, stages: Sequence[str]) -> None:
        self.check_retrain_weights(stages)  # no download: fail now, not after the ExCEL training

    def run_info(self) -> dict[str, Any]:
        from weakclip.data.classes import class_record

        classes = self._dataset(self.pseudo_split, seed_dir=None).classes
        return {"data_root": str(Path(self.cfg.data_root).resolve()), "kind": self.kind,
                "train_split": self.pseudo_split, "val_split": self.val_split,
                "seed_dir": str(self.stage_dir("seeds").resolve()), "preset": str(self.cfg.preset),
                "retrain": self.retrain_mode,
                "retrain_preset": self.retrain_name if self.retrain_cfg is not None else None,
                **class_record(classes)}

    # ------------------------------------------------------------------ settings of each stage
    def _descriptor_settings(self) -> dict[str, Any]:
        path = self.descriptors
        return {"text.descriptors": self._fingerprint(path),
                "text.descriptors_file": None if path is None else str(Path(path).resolve())}

    def _network_settings(self) -> dict[str, Any]:
        """What the network's text bank and CLIP are made of (the model and text sections, the weights and
        the descriptors' contents)."""
        from weakclip.stage_settings import flatten

        tree = self.excel_cfg.to_dict()
        return {**flatten({"model": tree["model"], "text": tree["text"]}), **self._clip_settings(),
                **self._descriptor_settings()}

    def _free_settings(self) -> dict[str, Any]:
        from weakclip.methods.excel.training_free import free_settings

        return {f"free.{k}": v for k, v in asdict(free_settings(self.excel_cfg)).items()}

    def _seeds_settings(self) -> dict[str, Any]:
        root = str(Path(self.cfg.data_root).resolve())
        return {"data.kind": self.kind, "data.split": self.pseudo_split,
                **self._data_settings(self.pseudo_split), "data.root": root,
                **self._network_settings(), **self._free_settings(), **self._reading_settings()}

    def _reading_settings(self) -> dict[str, Any]:
        d = self.excel_cfg.data
        return {"data.image_reader": d.image_reader, "data.image_orientation": d.image_orientation}

    def _train_settings(self) -> dict[str, Any]:
        from weakclip.stage_settings import flatten

        # the test-time and training-free sections are the other stages'
        tree = flatten(self.excel_cfg.to_dict(), skip=("infer", "free"))
        return {**tree, **self._data_settings(self.train_split), **self._clip_settings(),
                **self._descriptor_settings(), **self._made_from("seeds")}

    def _infer_settings(self) -> dict[str, Any]:
        from weakclip.stage_settings import flatten

        return {**flatten({"infer": self.excel_cfg.to_dict()["infer"]}), **self._reading_settings()}

    def _pseudo_settings(self) -> dict[str, Any]:
        return {**self._infer_settings(), "data.kind": self.kind, "data.split": self.pseudo_split,
                **self._data_settings(self.pseudo_split), **self._made_from("train")}

    def _evaluate_settings(self) -> dict[str, Any]:
        return {**self._infer_settings(), "data.kind": self.kind, "data.split": self.val_split,
                **self._data_settings(self.val_split), **self._made_from("train")}

    # ------------------------------------------------------------------ stages
    def _not_finished(self, what: str, summary: dict[str, Any]) -> None:
        if not summary.get("complete", True):
            raise WeakclipError(f"{what}: stopped before every image was written; run again to finish")

    def run_seeds(self) -> dict[str, Any]:
        from weakclip.distributed import init_distributed
        from weakclip.methods.excel.jobs import free_mask_job
        from weakclip.methods.excel.train import build_network
        from weakclip.methods.excel.training_free import free_settings

        info = init_distributed(self.cfg.device)
        out = self.stage_dir("seeds")
        dataset = self._dataset(self.pseudo_split, seed_dir=None)
        net = build_network(self.excel_cfg, list(dataset.classes), clip_weights=self.cfg.clip_weights,
                            descriptors=self.descriptors, device=info.device, note=self.log).eval()
        summary = free_mask_job(net, dataset, out, free_settings(self.excel_cfg), band=None, rank=info.rank,
                                world_size=info.world_size, progress=self.cfg.progress)
        self.raise_if_failed("training-free masks", summary)
        self._not_finished("training-free masks", summary)
        metrics = {"seeds_miou": summary.get("miou"), "images": summary.get("images")}
        settings = {"source": "ExCEL training-free masks", "dir": str(out), **self._free_settings()}
        return self._finish("seeds", settings, metrics)

    def run_train(self) -> dict[str, Any]:
        from weakclip.methods.excel.train import train_excel

        out = self.stage_dir("train")
        summary = train_excel(self.excel_cfg, out, clip_weights=self.cfg.clip_weights,
                              descriptors=self.descriptors, resume=True, device=self.cfg.device,
                              progress=self.cfg.progress)
        if not summary["finished"]:
            raise WeakclipError(f"ExCEL training stopped at iteration {summary['end_iter']} of "
                                f"{summary['total_iters']}")
        metrics = {"final_losses": summary["final"], "seconds": summary["seconds"],
                   "checkpoint": summary["checkpoint"]}
        return self._finish("train", {"config": str(out / "config.yaml")}, metrics)

    def _trained_network(self, device):
        """The trained network (the train stage's latest checkpoint, CLIP's positional grid), loaded once for
        the pseudo-mask and evaluation stages of this run."""
        from weakclip.engine.checkpoint import latest_checkpoint
        from weakclip.methods.excel.train import load_excel_checkpoint

        key = (str(latest_checkpoint(self.stage_dir("train"))), str(device))
        if self._loaded is None or self._loaded[0] != key:
            net, _ = load_excel_checkpoint(self.stage_dir("train"), self.cfg.clip_weights, device,
                                           pretrained_download=False)
            net.set_position_mode("clip")
            self._loaded = (key, net)
        return self._loaded[1]

    def _masks(self, stage: str, split: str, out: Path) -> dict[str, Any]:
        from weakclip.distributed import init_distributed
        from weakclip.methods.excel.jobs import trained_mask_job

        info = init_distributed(self.cfg.device)
        net = self._trained_network(info.device)
        dataset = self._dataset(split, seed_dir=None)
        summary = trained_mask_job(net, dataset, out, self.excel_cfg.infer.settings(), rank=info.rank,
                                   world_size=info.world_size, progress=self.cfg.progress)
        self.raise_if_failed(stage.replace("_", " "), summary)
        self._not_finished(stage.replace("_", " "), summary)
        return summary

    def run_pseudo_masks(self) -> dict[str, Any]:
        out = self.stage_dir("pseudo_masks")
        summary = self._masks("pseudo_masks", self.pseudo_split, out)
        metrics = {"pseudo_miou": summary.get("miou"),
                   "pseudo_miou_no_crf": summary.get("miou_no_crf", summary.get("miou")),
                   "images": summary.get("images")}
        settings = {**{f"infer.{k}": v for k, v in asdict(self.excel_cfg.infer).items()}, "dir": str(out)}
        return self._finish("pseudo_masks", settings, metrics)

    def run_evaluate(self) -> dict[str, Any]:
        from weakclip.data.io import jsonable, write_json_atomic
        from weakclip.distributed import env_world

        out = self.stage_dir("evaluate")
        summary = self._masks("evaluate", self.val_split, out / "masks")
        record = {"miou": None if summary.get("miou") is None else 100.0 * summary["miou"],
                  "release_miou": None if summary.get("release_miou") is None
                  else 100.0 * summary["release_miou"],
                  "images": summary.get("images"), "split": self.val_split,
                  **(summary.get("per_class") or {})}
        if env_world()[0] == 0:
            write_json_atomic(out / "eval.json", jsonable(record))
        metrics = {"network_val_miou": summary.get("miou"), "release_miou": summary.get("release_miou"),
                   "val_images": summary.get("images"), "images": summary.get("images")}
        settings = {**{f"infer.{k}": v for k, v in asdict(self.excel_cfg.infer).items()},
                    "dir": str(out / "masks"), "eval": str(out / "eval.json")}
        return self._finish("evaluate", settings, metrics)

    # ------------------------------------------------------------------ report
    def report(self, records: dict[str, Any]) -> dict[str, Any]:
        def metric(stage: str, key: str):
            return percent((records.get(stage) or {}).get("metrics", {}).get(key))

        network = metric("evaluate", "network_val_miou")
        final = metric("retrain", "final_miou") if self.retrain_mode == "deeplabv1" else network
        return {
            "method": self.method.name,
            "seeds_miou": metric("seeds", "seeds_miou"),
            "seeds_miou_confident": None,
            "pseudo_miou_no_crf": metric("pseudo_masks", "pseudo_miou_no_crf"),
            "pseudo_miou": metric("pseudo_masks", "pseudo_miou"),
            "network_val_miou": network,
            "network_val_miou_release": metric("evaluate", "release_miou"),
            "final_miou": final,
            "units": "percent mIoU; seeds = training-free masks and pseudo masks (trained network) on the "
                     "training split; final on val (the ExCEL network's, or the retrained DeepLab's)",
            "rows": self.report_rows(),
            "stages": {k: {**v.get("settings", {}), "metrics": v.get("metrics", {})}
                       for k, v in records.items()},
            "workdir": str(self.workdir),
        }

    def report_rows(self) -> list[tuple[str, str]]:
        rows = [("training-free masks", "seeds_miou"),
                ("pseudo masks (trained network)", "pseudo_miou")]
        if self.excel_cfg.infer.crf:
            rows.insert(1, ("pseudo masks, before CRF", "pseudo_miou_no_crf"))
        if self.retrain_mode == "deeplabv1":
            rows += [("ExCEL network, val", "network_val_miou"), ("retrained DeepLab, val", "final_miou")]
        else:
            rows.append(("ExCEL network, val (final)", "final_miou"))
        return rows
