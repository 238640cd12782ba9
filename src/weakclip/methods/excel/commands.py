"""ExCEL's side of the commands that take a method (the ``"seeds"`` and ``"pseudo_masks"`` entry points of
:mod:`weakclip.methods`): ``weakclip seeds --method excel`` and ``weakclip pseudo-masks --checkpoint X``
where X is ExCEL's.

Each takes the command's parsed arguments, refuses in one line (before any work) what ExCEL does not take,
runs the job of :mod:`weakclip.methods.excel.jobs`, prints its summary on the first process and returns it;
the command turns failed images into its exit status. The process group is the command's.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weakclip.errors import WeakclipError
from weakclip.methods import RUN_RECORD, check_same, of_folder, of_preset

__all__ = ["PSEUDO_SUMMARY", "SEEDS_SUMMARY", "excel_network_file", "format_free_summary",
           "format_trained_summary", "run_pseudo_masks", "run_seeds"]

#: The summary files the commands write beside the masks (the names WeakCLIP's commands use).
SEEDS_SUMMARY = "seeds_summary.json"
PSEUDO_SUMMARY = "pseudo_masks_summary.json"

#: ``weakclip seeds`` flags of CLIP-ES alone: (attribute, flag, the value it has when not given).
_CLIP_ES_FLAGS = (
    ("scales", "--scales", None), ("flip", "--flip", False), ("input_size", "--input-size", None),
    ("box_threshold", "--box-threshold", None), ("softmax_over", "--softmax-over", None),
    ("plain_names", "--plain-names", False), ("inclusive_boxes", "--inclusive-boxes", False),
    ("float_resize", "--float-resize", False), ("precision", "--precision", None),
    ("background", "--background", None), ("template", "--template", None),
    ("no_refine", "--no-refine", False), ("masks", "--masks", None), ("bg_power", "--bg-power", None),
    ("crf_fix_wrap", "--crf-fix-wrap", False),
    ("save_cams", "--save-cams", False), ("batch_size", "--batch-size", None),
)
#: ``weakclip pseudo-masks`` flags of WeakCLIP's sliding-window inference alone.
_WEAKCLIP_PSEUDO_FLAGS = (
    ("base_scale", "--base-scale", None), ("crop", "--crop", None), ("stride", "--stride", None),
    ("average", "--average", None), ("size_divisor", "--size-divisor", None),
    ("window_batch", "--window-batch", None), ("amp", "--amp", None), ("restrict", "--restrict", False),
    ("no_restrict", "--no-restrict", False), ("save_probs", "--save-probs", False),
    ("crf_backend", "--crf-backend", None), ("crf_workers", "--crf-workers", None),
    ("batch_size", "--batch-size", None), ("classes", "--classes", None),
)


def _refuse(args: argparse.Namespace, flags, what: str, instead: str) -> None:
    """One line when a flag of another method's job was given."""
    given = [flag for attr, flag, unset in flags if getattr(args, attr, unset) not in (unset, [], ())]
    if given:
        verb = "is a setting" if len(given) == 1 else "are settings"
        raise WeakclipError(f"{', '.join(given)} {verb} of {what}; {instead}")


def _main() -> bool:
    from weakclip.distributed import env_world

    return env_world()[0] == 0


def _say(line: str) -> None:
    if _main():
        print(line, flush=True)


def _write_json(path: Path, summary: dict[str, Any]) -> None:
    from weakclip.data.io import jsonable, write_json_atomic

    if _main():
        write_json_atomic(path, jsonable(summary))


def _percent(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}%"


def _counts(summary: dict[str, Any], what: str) -> list[str]:
    lines = [f"{what} in {summary['out_dir']}: {summary['written']} written, {summary['skipped_existing']} "
             f"already there, {summary['failed']} failed (of {summary['images']} images)"
             + ("" if summary.get("complete", True) else "; stopped early")]
    lines += [f"  failed {ident}: {msg}" for ident, msg in list(summary.get("failures", {}).items())[:10]]
    lines += [f"  not scored {ident}: {msg}" for ident, msg in list(summary.get("unscored", {}).items())[:5]]
    return lines


# ====================================================================== weakclip seeds --method excel
def format_free_summary(summary: dict[str, Any]) -> str:
    """A short text report of :func:`~weakclip.methods.excel.jobs.free_mask_job`'s summary."""
    band = summary.get("band")
    lines = _counts(summary, "ExCEL training-free seeds" if band else "ExCEL training-free masks")
    if summary.get("no_labels"):
        lines.append(f"{summary['no_labels']} images without a foreground label: all background")
    coverage = summary.get("coverage")
    if summary.get("miou") is not None:
        lines.append(f"mIoU (unsure as background): {_percent(summary['miou'])}")
        lines.append(f"mIoU of confident pixels:    {_percent(summary['miou_confident'])} "
                     f"(coverage {_percent(coverage)})")
    elif coverage is not None:
        lines.append(f"coverage (pixels not unsure): {_percent(coverage)}; no ground truth, no mIoU")
    return "\n".join(lines)


def run_seeds(args: argparse.Namespace, dataset_of: Callable[[str], Any], info) -> dict[str, Any]:
    """``weakclip seeds --method excel``: ExCEL's training-free masks of ``dataset_of(coco_kind)`` (the
    command's dataset; ``coco_kind`` the kind a detected COCO folder is read as) with the ignore band of
    :mod:`weakclip.methods.excel.seed_band` (``--band none``: without), as a seed folder. ``info``: the
    process group (:func:`weakclip.distributed.init_distributed`). Returns the job's summary."""
    from weakclip.methods.excel.config import check_text_inputs, training_free_config
    from weakclip.methods.excel.jobs import free_mask_job
    from weakclip.methods.excel.seed_band import SeedBand
    from weakclip.methods.excel.train import build_network
    from weakclip.methods.excel.training_free import free_settings

    _refuse(args, _CLIP_ES_FLAGS, "CLIP-ES's seeds",
            "ExCEL's training-free masks take --preset excel-voc|excel-coco, --descriptors, --band, --lo, "
            "--hi and --set KEY=VALUE")
    if args.preset is not None and of_preset(args.preset).name != "excel":
        raise WeakclipError(f"--preset {args.preset} is {of_preset(args.preset).title}'s; --method excel "
                            "takes excel-voc or excel-coco (default: by the dataset)")
    if not Path(args.clip_weights).is_file():
        raise WeakclipError(f"CLIP weights file not found: {args.clip_weights}")
    if args.band == "none" and (args.lo is not None or args.hi is not None):
        raise WeakclipError("--lo and --hi set the ignore band, which --band none leaves out")
    dataset = dataset_of("coco")
    arch = [f"model.clip_arch={args.arch}"] if args.arch else []
    preset, cfg = training_free_config(getattr(dataset, "kind", "folder"), args.preset,
                                       [*arch, *(args.set or [])])
    check_text_inputs(cfg, args.descriptors, list(dataset.classes), preset)
    band = None if args.band == "none" else SeedBand.of_config(cfg, high=args.hi, low=args.lo)
    settings = free_settings(cfg)
    _say(f"ExCEL training-free {'seeds' if band else 'masks'} (preset {preset}): the frozen CLIP "
         f"{cfg.model.clip_arch}, images resized to {settings.size} x {settings.size}, attention refinement, "
         f"PAR; " + (f"ignore band: class above {band.high}, background at or below {band.low}, 255 between "
                     "or where the band and the mask disagree (an option in no paper, unmeasured)"
                     if band else "no ignore band (--band none)"))
    net = build_network(cfg, list(dataset.classes), clip_weights=args.clip_weights,
                        descriptors=args.descriptors, device=info.device,
                        note=lambda line: _say(line)).eval()
    summary = free_mask_job(net, dataset, args.out, settings, band=band, rank=info.rank,
                            world_size=info.world_size, progress=not args.quiet)
    descriptors = None if args.descriptors is None else str(Path(args.descriptors).resolve())
    summary.update({"method": "excel", "preset": preset, "descriptors": descriptors,
                    "clip_weights": str(Path(args.clip_weights).resolve())})
    _write_json(Path(args.out) / SEEDS_SUMMARY, summary)
    if args.json:
        _write_json(Path(args.json), summary)
    _say(format_free_summary(summary))
    return summary


# ====================================================================== weakclip pseudo-masks (ExCEL network)
def format_trained_summary(summary: dict[str, Any]) -> str:
    """A short text report of :func:`~weakclip.methods.excel.jobs.trained_mask_job`'s summary."""
    lines = _counts(summary, "ExCEL masks")
    if summary.get("miou") is not None:
        crf = bool((summary.get("settings") or {}).get("crf"))
        if crf:
            lines.append(f"mIoU before CRF {_percent(summary['miou_no_crf'])}, after CRF "
                         f"{_percent(summary['miou'])}")
        else:
            lines.append(f"mIoU {_percent(summary['miou'])} (no CRF)")
        lines.append(f"mIoU as the release computes it (classes of the ground truth): "
                     f"{_percent(summary['release_miou'])}")
    return "\n".join(lines)


def excel_network_file(path: str | Path, best: bool = False) -> Path:
    """The checkpoint of an ExCEL network: a checkpoint file; an ExCEL training work folder (its latest
    checkpoint; ``best``: its ``checkpoints/best.pth``); or a ``weakclip run`` work folder of ExCEL (its
    training stage's folder, likewise). One-line WeakclipError otherwise."""
    from weakclip.engine.checkpoint import best_checkpoint_path, latest_checkpoint
    from weakclip.methods import get

    path = Path(path)
    if path.is_dir() and (path / RUN_RECORD).is_file():
        check_same(of_folder(path), "excel", str(path))
        stage = get("excel").network_stages[0]
        folder = path / stage
        if not folder.is_dir():
            raise WeakclipError(f"the ExCEL run {path} has no trained network yet ({folder})")
        path = folder
    if path.is_dir():
        found = best_checkpoint_path(path) if best else latest_checkpoint(path)
        if found is None or not found.is_file():
            what = "best checkpoint (checkpoints/best.pth)" if best else "checkpoint (checkpoints/)"
            raise WeakclipError(f"no {what} in {path}")
        return found
    if best:
        raise WeakclipError(f"--best takes a work folder (its checkpoints/best.pth), got the file {path}")
    if not path.is_file():
        raise WeakclipError(f"checkpoint not found: {path}")
    return path


def _infer_settings(args: argparse.Namespace, cfg):
    """The checkpoint's test-time settings (its preset's ``infer`` section), ``--scales``, ``--no-flip``
    and ``--crf`` (none: off; auto: the preset's; voc / coco: on, with the release's one CRF setting)."""
    settings = cfg.infer.settings()
    changes: dict[str, Any] = {}
    if args.scales is not None:
        changes["scales"] = tuple(float(s) for s in args.scales)
    if args.no_flip:
        changes["flip"] = False
    if args.crf is not None and args.crf != "auto":
        changes["crf"] = args.crf != "none"
    return dataclasses.replace(settings, **changes) if changes else settings


def run_pseudo_masks(args: argparse.Namespace, info) -> dict[str, Any]:
    """``weakclip pseudo-masks --checkpoint X`` for an ExCEL network (:func:`excel_network_file`): its
    masks of the data with the release's test-time settings of its preset
    (:func:`~weakclip.methods.excel.jobs.trained_mask_job`), written to ``--out`` with
    ``pseudo_masks_summary.json``. Returns the job's summary."""
    from weakclip.data.datasets import build_dataset
    from weakclip.data.folder import default_split, split_choice_line
    from weakclip.methods.excel.config import ExcelConfig
    from weakclip.methods.excel.jobs import trained_mask_job
    from weakclip.methods.excel.train import load_excel_checkpoint

    _refuse(args, _WEAKCLIP_PSEUDO_FLAGS, "WeakCLIP's sliding-window pseudo masks",
            "an ExCEL network takes --scales, --no-flip and --crf (else its preset's test-time settings)")
    path = excel_network_file(args.checkpoint, args.best)
    root = Path(args.data_root)
    if not root.exists():
        raise WeakclipError(f"dataset folder not found: {root}")
    net, ckpt = load_excel_checkpoint(path, args.clip_weights, info.device, pretrained_download=False)
    cfg = ExcelConfig.from_dict(dict(ckpt.get("config") or {}), source=f"config of {path}")
    settings = _infer_settings(args, cfg)
    kind = args.dataset or cfg.data.kind
    split = args.split
    if kind == "folder" and split is None:
        split = default_split(root, "training")
        _say(f"weakclip pseudo-masks: {split_choice_line('training split', split, 'training')}")
    dataset = build_dataset(kind, root, split=split, image_reader=cfg.data.image_reader,
                            image_orientation=cfg.data.image_orientation)
    _say(f"ExCEL network of {path}: test-time square {settings.size}, scales "
         f"{', '.join(f'{s:g}' for s in settings.scales)}, flip {'on' if settings.flip else 'off'}, "
         f"CRF {'on' if settings.crf else 'off'}")
    summary = trained_mask_job(net, dataset, args.out, settings, rank=info.rank, world_size=info.world_size,
                               progress=not args.quiet, limit=args.max_images)
    summary.update({"method": "excel", "checkpoint": str(path)})
    _write_json(Path(args.out) / PSEUDO_SUMMARY, summary)
    _say(format_trained_summary(summary))
    return summary
