"""The machinery every method's ``weakclip run`` shares: stages over one work folder, each recorded, reused
when complete, resumed when interrupted, checked against what the run asks for before any work, and one
report at the end.

Each stage works in its own folder of the work directory: when it starts it records the settings it is made
with in ``<workdir>/<stage>/made_with.json`` (:mod:`weakclip.stage_settings`), and when it has finished it
writes ``<workdir>/<stage>/stage.json`` with those, its report settings and its metrics; what it prints is
kept in ``<workdir>/<stage>/log.txt``. A stage whose ``stage.json`` exists is reused; a stage that was
interrupted is resumed -- both only when the run asks for the settings that made them: before any work, every
stage the folder holds is compared with what the run asks for, and another setting that changes its results
stops the run in one line (``redo`` / ``--redo STAGE`` recomputes that stage and every stage after it), while
one that does not is a note. The run ends with one summary table, ``<workdir>/report.json`` and the page
``<workdir>/report.html`` (:mod:`weakclip.report`), with warnings when a stage made things worse or a class
vanished; with ``stop_on_regression`` the run stops at the first such stage instead of going on.
``<workdir>/run.json`` records the method, data and presets of what the folder holds (the report reads it)
with its class names and palette; it is written once the folder's stages are known to match the run. A
folder made by another method is refused in one line before any work. Under ``torchrun`` every stage is
shared by all processes.

A method's run (:class:`StagedRun` subclass, the ``"pipeline"`` entry point of :mod:`weakclip.methods`) says
which stages it has (:meth:`StagedRun.active_stages`), how each is made (:meth:`StagedRun.runners`), with
which settings (:meth:`StagedRun.settings_builders`), what its report holds (:meth:`StagedRun.report`) and
what ``run.json`` records (:meth:`StagedRun.run_info`).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from weakclip.errors import EXIT_REGRESSION, ItemsFailed, WeakclipError, failed_items_message
from weakclip.stage_settings import MADE_WITH, check_reuse, made_with


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


def percent(value: float | None) -> float | None:
    return None if value is None or value != value else round(100.0 * float(value), 2)


class StagedRun:
    """Stages over one work folder (see the module docstring). Subclasses set :attr:`method` and fill in the
    hooks; ``run()`` does what is left and returns the report."""

    method: Any = None  # the weakclip.methods.MethodInfo of the subclass

    def __init__(self, cfg: Any, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.workdir = Path(cfg.workdir)
        self._log = log
        self._stage_t0: float | None = None
        self._made_with: dict[str, Any] | None = None  # what the stage now running is made with
        self._data_ids: dict[str, tuple[str, list[str]]] = {}  # split -> (its images' fingerprint, classes)
        self._fingerprints: dict[str, str | None] = {}  # weights file -> file_fingerprint

    # ------------------------------------------------------------------ hooks of a method
    @property
    def stages(self) -> tuple[str, ...]:
        """Every stage of the method, in order (a folder may hold any of them)."""
        return self.method.stage_names()

    def active_stages(self) -> tuple[str, ...]:
        """The stages this run makes, in order (default: all of the method's)."""
        return self.stages

    def runners(self) -> dict[str, Callable[[], dict[str, Any]]]:
        raise NotImplementedError

    def settings_builders(self) -> dict[str, Callable[[], dict[str, Any]]]:
        raise NotImplementedError

    def stage_preset(self, stage: str) -> str:
        return str(self.cfg.preset)

    def run_info(self) -> dict[str, Any]:
        """What ``run.json`` records besides the method and the stages (data root, kind, splits, seed folder,
        presets, classes and palette)."""
        raise NotImplementedError

    def inputs(self) -> list[Any]:
        """The files and folders the run reads (``redo`` refuses to empty a folder holding one)."""
        return [self.cfg.data_root, getattr(self.cfg, "clip_weights", None)]

    def before_run(self, stages: Sequence[str]) -> None:
        """Checks that must fail before any stage runs (e.g. weights with no download)."""

    def _legacy_made_with(self, stage: str, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """What a stage made by an older version without ``made_with`` records was made with (None if
        unknown)."""
        return None

    def report(self, records: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def report_rows(self) -> list[tuple[str, str]]:
        """The summary table's rows: ``(title, report key)``."""
        return [("seeds (unsure = background)", "seeds_miou"),
                ("pseudo masks, before CRF", "pseudo_miou_no_crf"),
                ("pseudo masks", "pseudo_miou"),
                ("final network, val", "final_miou")]

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


    # ------------------------------------------------------------------ stages every method may share
    def check_val_split(self, val_split: str | None) -> None:
        """The val split opens, holds images and has ground truth to evaluate against (one line otherwise,
        before any work)."""
        from weakclip.data.datasets import require_images
        from weakclip.errors import DataError

        if not val_split:
            return
        try:
            val = self._dataset(val_split, seed_dir=None, with_gt=True)
            require_images(val, "val split")
        except DataError as exc:
            raise DataError(f"val split {val_split!r}: {exc} (--val-split none skips the final "
                            "evaluation)") from exc
        if not val.has_gt:
            raise DataError(f"val split {val_split!r} has no ground-truth masks to evaluate against "
                            "(--val-split none skips the final evaluation)")

    def raise_if_failed(self, what: str, summary: dict[str, Any]) -> None:
        """A per-image stage whose job failed on some images (``summary["failed"]``, ``["failures"]``) is not
        recorded complete: one line naming them, after the others were written (exit status 1)."""
        if summary.get("failed"):
            failed = failed_items_message(summary["failures"], summary["images"])
            raise ItemsFailed(f"{what}: {failed}; fix or remove them and run again (the stage is not "
                              "recorded complete)")

    def check_retrain_weights(self, stages: Sequence[str]) -> None:
        """The retraining's ImageNet weights (ResNet-38 has no download): checked when the run makes the
        ``retrain`` stage, before hours of the stages before it."""
        from weakclip.retrain.train import check_backbone_weights

        if "retrain" in stages:
            check_backbone_weights(self.retrain_cfg)

    def _retrain_settings(self) -> dict[str, Any]:
        """What the ``retrain`` stage (a DeepLab on the ``pseudo_masks`` stage's masks of ``pseudo_split``,
        ``self.retrain_cfg``) is made with."""
        from weakclip.stage_settings import flatten

        m = self.retrain_cfg.model
        backbone = m.backbone_weights if m.pretrained_backbone else None
        return {**flatten(self.retrain_cfg.to_dict()), "data.masks": str(self.stage_dir("pseudo_masks")),
                **self._data_settings(self.pseudo_split),
                **self._data_settings(self.retrain_cfg.data.val_split, "data.val_"),
                "backbone.weights": self._fingerprint(backbone), **self._made_from("pseudo_masks")}

    def run_retrain(self) -> dict[str, Any]:
        """The ``retrain`` stage: :func:`weakclip.retrain.train.retrain` on the ``pseudo_masks`` stage's
        masks, resumed from its latest checkpoint; its val mIoU is ``final_miou``."""
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


    # ------------------------------------------------------------------ what made a stage
    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings this run makes ``stage`` with, as one flat dict (dotted keys; split by
        :func:`weakclip.stage_settings.made_with` into those that change its results and those that do
        not). Each stage adds what it was made from: ``from.<stage>`` names the making of the stage before."""
        from weakclip.distributed import init_distributed

        info = init_distributed(self.cfg.device)
        return {"method": self.method.name, **self.settings_builders()[stage](),
                "device": info.device.type, "processes": info.world_size, "preset": self.stage_preset(stage)}

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

    def plan(self, stages: Sequence[str] | None = None) -> tuple[dict[str, str], dict[str, Any], list[str]]:
        """Before any work, without writing: which of ``stages`` this run reuses (``"skip"``: complete and
        made with this run's settings) and which it makes or resumes (``"run"``), the records of those
        reused, and the notes (settings that differ but do not change results). Every stage the folder
        holds is checked, asked for or not. WeakclipError (one line) for a stage made or started with
        another setting that changes its results (:func:`weakclip.stage_settings.check_reuse`), or held
        while a stage before it is to be made again; ``redo`` stages are made again, unchecked. The stages
        are this run's (:meth:`active_stages`): a stage of the method this run does not make is left alone."""
        order = self.active_stages()
        stages = order if stages is None else tuple(stages)
        redo = set(order[order.index(self.cfg.redo):]) if self.cfg.redo else set()
        plan: dict[str, str] = {}
        records: dict[str, Any] = {}
        notes: list[str] = []
        upstream: str | None = None  # the first stage this run makes (again) or resumes
        for stage in order:
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
        for item in self.inputs():
            if item is None:
                continue
            path = Path(item).resolve()
            if path == folder or folder in path.parents:
                raise WeakclipError(f"--redo {self.cfg.redo} would empty {folder}, which holds {path} that "
                                    "this run reads: move it out of the work folder first")

    def _clear_for_redo(self) -> None:
        """Empty the folders of the ``redo`` stage and of every stage after it (first process)."""
        removed = []
        order = self.active_stages()
        for stage in order[order.index(self.cfg.redo):]:
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


    # ------------------------------------------------------------------ driver
    def run(self, stages: Sequence[str] | None = None) -> dict[str, Any]:
        from weakclip.data.io import jsonable, write_json_atomic
        from weakclip.distributed import barrier, env_world, init_distributed

        stages = self.active_stages() if stages is None else tuple(stages)
        unknown = [s for s in stages if s not in self.active_stages()]
        if unknown:
            raise WeakclipError(f"this {self.method.title} run has no stage {unknown[0]!r}; its stages: "
                                f"{', '.join(self.active_stages())}")
        self.check_method()
        self.before_run(stages)
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
        runners = self.runners()
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
            if self.cfg.stop_on_regression and stage in ("pseudo_masks", "evaluate", "retrain"):
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
        from weakclip.data.io import write_json_atomic
        from weakclip.methods import METHOD_KEY
        from weakclip.report.analysis import RUN_INFO

        # Written once every stage the folder holds was found made with this run's settings (plan), so that
        # it tells what the folder holds, not only what the last command asked for.
        info = {METHOD_KEY: self.method.name, "stages": list(self.active_stages()), **self.run_info()}
        write_json_atomic(self.workdir / RUN_INFO, info)

    def check_method(self) -> None:
        """A work folder made by another method is refused in one line, before any work (its ``run.json``,
        else the method its stage records name)."""
        from weakclip.data.io import read_json
        from weakclip.methods import check_same, of_record
        from weakclip.report.analysis import RUN_INFO

        hint = "use a new --workdir"
        path = self.workdir / RUN_INFO
        if path.is_file():
            check_same(of_record(read_json(path, what="run record")), self.method, f"the work folder "
                       f"{self.workdir}", hint)
            return
        for stage in self.stages:
            for name in ("stage.json", MADE_WITH):
                record = self.stage_dir(stage) / name
                if record.is_file():
                    raw = read_json(record, what="stage record") or {}
                    held = raw.get("made_with") or {}
                    named = (held.get("output") or {}).get("method") if isinstance(held, dict) else None
                    if named:
                        check_same(named, self.method, f"the work folder {self.workdir}", hint)
                        return

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
        self.log(format_report(report, self.report_rows()))
        return report

def format_report(report: dict[str, Any], rows: Sequence[tuple[str, str]] | None = None) -> str:
    """The summary table of a run's report: ``rows`` of ``(title, report key)`` (default: the report's own
    ``"rows"``), then its warnings and where the report and its page are."""

    def cell(v):
        return "-" if v is None else f"{v:6.2f}"

    rows = [(title, report.get(key)) for title, key in (rows or report.get("rows") or [])]
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  mIoU %", "-" * (width + 8)]
    lines += [f"{name:<{width}}  {cell(v)}" for name, v in rows]
    for warning in report.get("warnings") or []:
        lines.append(f"WARNING: {warning}")
    lines.append(f"report: {Path(report['workdir']) / 'report.json'}")
    if report.get("html"):
        lines.append(f"page: {report['html']}")
    return "\n".join(lines)
