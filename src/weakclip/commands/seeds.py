"""``weakclip seeds [generate]``: training-free CLIP-ES seeds and masks (``--method excel``: ExCEL's
training-free masks as seeds, the method's ``"seeds"`` entry point); ``weakclip seeds check DIR``: validate
seeds."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from weakclip.commands import lock_folder, output_files
from weakclip.commands.flags import DATASET_HELP, DATASET_KINDS, add_device

#: ``--method``: CLIP-ES (the command's own) or a method of :mod:`weakclip.methods` with a ``"seeds"`` entry.
SEED_METHODS = ("clip-es", "excel")
#: ``weakclip seeds`` flags of the methods with an entry point, unset for CLIP-ES (attribute, flag, unset).
_METHOD_FLAGS = (("descriptors", "--descriptors", None), ("band", "--band", None), ("set", "--set", None))


def _dataset(args: argparse.Namespace, command: str, coco_kind: str | None = None):
    """The dataset of ``--data-root``: its layout ``--dataset`` or detected (a COCO folder in the label space
    of the refinement preset of the seed preset's name: the release's 91 ids, 81 classes for coco-plus;
    ``coco_kind`` when given); a folder dataset in its training split unless ``--split`` names one. Says on
    stderr what it picked."""
    from weakclip.commands import folder_default_split
    from weakclip.data.datasets import build_dataset, detect_kind
    from weakclip.errors import DataError

    if not args.data_root.exists():
        raise DataError(f"dataset folder not found: {args.data_root}")
    kind = args.dataset or detect_kind(args.data_root)
    if kind == "coco" and not args.dataset:
        kind = coco_kind or ("coco" if getattr(args, "preset", None) == "coco-plus" else "coco91")
        what = "81 classes (as train --preset coco-plus)" if kind == "coco" else \
            "COCO's 91 category ids (as train --preset coco, the release)"
        if os.environ.get("RANK", "0") == "0":
            print(f"{command}: COCO layout read as {kind}: {what}; --dataset picks another")
    split = args.split
    if kind == "folder" and split is None:
        split = folder_default_split(command, args.data_root, "training", "training split")
    options = {"split": split, "with_gt": False if args.no_gt else None}
    if args.cls_labels is not None:
        options["cls_labels"] = args.cls_labels
    return build_dataset(kind, args.data_root, **options)


def _background(spec: str) -> tuple[str, ...]:
    path = Path(spec)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        return tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def seed_config(args: argparse.Namespace, dataset_kind: str, classes=None):
    """The seed settings: ``--preset`` (default: ``coco`` for a COCO dataset or a class list recognised
    as COCO's in any spelling, else ``voc``), then the switches given on the command line."""
    from weakclip.seeds.names import recognise_class_list
    from weakclip.seeds.settings import seed_preset

    coco_list = classes is not None and recognise_class_list(classes) in ("coco", "coco91")
    preset = args.preset or ("coco" if dataset_kind == "coco" or coco_list else "voc")
    given = {"scales": tuple(args.scales) if args.scales else None, "input_size": args.input_size,
             "lo": args.lo, "hi": args.hi, "box_threshold": args.box_threshold,
             "softmax_over": args.softmax_over, "precision": args.precision, "bg_power": args.bg_power,
             "background": _background(args.background) if args.background is not None else None,
             "templates": tuple(args.template) if args.template else None,
             "masks": tuple(args.masks) if args.masks is not None else None}
    overrides = {k: v for k, v in given.items() if v is not None}
    for flag in ("flip", "plain_names", "inclusive_boxes", "float_resize", "crf_fix_wrap"):
        if getattr(args, flag):
            overrides[flag] = True
    if args.no_refine:
        overrides["refine"] = False
    return preset, seed_preset(preset, **overrides)


def preset_mismatch(preset: str, class_list: str | None) -> str | None:
    """A one-line note when the seed preset is CLIP-ES's script for the other dataset than the class list
    (the names follow the class list; background words and box threshold follow the preset)."""
    dataset = {"voc": "VOC", "coco": "COCO", "coco91": "COCO"}.get(class_list or "")
    script = "COCO" if str(preset).lower().startswith("coco") else "VOC"
    if dataset is None or dataset == script:
        return None
    return (f"note: the class list is {dataset}'s but the seed preset {preset} is CLIP-ES's {script} script: "
            f"{dataset} names, the {script} script's background words and box threshold")


def _run_method_seeds(args: argparse.Namespace) -> int:
    """``--method NAME``: the seeds of the method's ``"seeds"`` entry point (:mod:`weakclip.methods`)."""
    from weakclip.commands import report_failed_items
    from weakclip.distributed import cleanup, init_distributed
    from weakclip.methods import entry

    job = entry(args.method, "seeds")
    info = init_distributed(args.device)
    try:
        summary = job(args, lambda coco_kind: _dataset(args, "weakclip seeds", coco_kind), info)
    finally:
        cleanup()
    return report_failed_items("seeds", summary["failures"], summary["images"], info.is_main)


def run_generate(args: argparse.Namespace) -> int:
    from weakclip.errors import WeakclipError
    from weakclip.methods import DEFAULT_METHOD, of_preset

    if args.method != "clip-es":
        return _run_method_seeds(args)
    given = [flag for attr, flag, unset in _METHOD_FLAGS if getattr(args, attr) != unset]
    if given:
        raise WeakclipError(f"{', '.join(given)}: for --method excel (CLIP-ES seeds do not take "
                            f"{'it' if len(given) == 1 else 'them'})")
    if args.preset is not None and of_preset(args.preset).name != DEFAULT_METHOD:
        raise WeakclipError(f"--preset {args.preset} is {of_preset(args.preset).title}'s: add --method "
                            f"{of_preset(args.preset).name}")
    if args.batch_size is not None and args.batch_size < 1:
        raise WeakclipError(f"--batch-size must be >= 1, got {args.batch_size}")
    from weakclip.commands import report_failed_items
    from weakclip.data.io import jsonable, write_json_atomic
    from weakclip.distributed import cleanup, init_distributed
    from weakclip.models.clip import build_clip
    from weakclip.seeds.clip_es import ClipEsSeeder
    from weakclip.seeds.run import format_summary, generate_seeds

    info = init_distributed(args.device)
    try:
        dataset = _dataset(args, "weakclip seeds")
        preset, config = seed_config(args, getattr(dataset, "kind", ""), dataset.classes)
        image_tower, text_tower = build_clip(args.arch or "ViT-B/16", args.clip_weights, device=info.device)
        seeder = ClipEsSeeder(image_tower, dataset.classes, text_tower=text_tower, config=config)
        del text_tower
        if info.is_main and not args.quiet:
            cfg = seeder.config
            print(f"seed preset {preset}: class names {seeder.names_source}, "
                  f"softmax over {cfg.softmax_over}, "
                  f"{len(seeder.background_prompts)} background prompts, box threshold {cfg.box_threshold}, "
                  f"{str(seeder.dtype).replace('torch.', '')}, masks: {', '.join(cfg.masks) or 'none'}")
        note = preset_mismatch(preset, seeder.vocabulary.class_list)
        if note and info.is_main:
            print(note)
        if seeder.dropped_background and info.is_main:
            dropped = ", ".join(seeder.dropped_background)
            print(f"background prompts that name a class are left out: {dropped}")
        summary = generate_seeds(dataset, seeder, args.out, save_cams=args.save_cams, rank=info.rank,
                                 world_size=info.world_size, progress=not args.quiet,
                                 batch_size=args.batch_size)
        if info.is_main:
            print(format_summary(summary))
            if args.json:
                record = {k: v for k, v in summary.items() if k != "scores"}
                write_json_atomic(args.json, jsonable(record))
    finally:
        cleanup()
    return report_failed_items("seeds", summary["failures"], summary["images"], info.is_main)


def run_check(args: argparse.Namespace) -> int:
    from weakclip.data.io import write_json_atomic
    from weakclip.seeds.check import check_seeds

    report = check_seeds(args.dir, _dataset(args, "weakclip seeds check"), progress=not args.quiet)
    print(report.format())
    if args.json:
        write_json_atomic(args.json, report.to_dict())
    if not report.ok:
        print(f"weakclip seeds check: {len(report.problems())} problems in {args.dir}", file=sys.stderr)
        return 1
    return 0


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, type=Path, help="dataset root folder")
    p.add_argument("--dataset", choices=DATASET_KINDS, default=None,
                   help=f"{DATASET_HELP} (default: detected from the folder; a COCO folder as coco91, or "
                        f"coco with --preset coco-plus)")
    p.add_argument("--split", default=None,
                   help="split / id list (default: the dataset's training split: train_aug for VOC, "
                        "train2014 for COCO, splits/train.txt of a folder dataset when present, else every "
                        "labelled image)")
    p.add_argument("--cls-labels", type=Path, default=None, help="VOC: cls_labels.npy image labels")
    p.add_argument("--no-gt", action="store_true", help="ignore ground-truth masks even when present")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub) -> None:
    s = sub.add_parser(
        "seeds", help="training-free CLIP-ES seeds and masks (generate, the default), or check a seed folder",
        default_action="generate",
        description="weakclip seeds generate ... (or 'weakclip seeds ...': generate is the default action) "
                    "makes CLIP-ES seeds (--method excel: ExCEL's training-free masks as seeds); "
                    "'weakclip seeds check DIR --data-root ...' validates a seed folder "
                    "made by any method. 'weakclip seeds ACTION --help' lists each one's options.")
    actions = s.add_subparsers(dest="seeds_action", metavar="ACTION", required=True)
    p = actions.add_parser(
        "generate", help="CLIP-ES seeds and masks of a dataset (the default action)",
        description="CLIP-ES (Grad-CAM on the frozen CLIP image tower refined by class-aware attention "
                    "affinity, for the labelled classes of each image; defaults = CLIP-ES's VOC or COCO "
                    "script). Writes <out>/<id>.png seeds (class id, 0 = background, 255 = unsure; what "
                    "refinement trains on) and CLIP-ES's own masks: argmax/<id>.png (background score "
                    "argmax) and crf/<id>.png (dense CRF, 255 under 0.95 confidence). --method excel: "
                    "ExCEL's training-free masks (tools/infer_lam.py) with an ignore band (ExCEL's 0.7 / "
                    "0.25 band of its online labels; --band none: without) as <out>/<id>.png, an option "
                    "in no paper, unmeasured (docs/method.md). Resumable; run under torchrun to shard. Ends "
                    "with the mIoUs when ground truth exists.")
    _data_args(p)
    p.add_argument("--method", choices=SEED_METHODS, default="clip-es",
                   help="clip-es (the release's seeds of WeakCLIP) or excel (ExCEL's training-free masks "
                        "with an ignore band: in no paper, unmeasured)")
    p.add_argument("--clip-weights", type=Path, required=True,
                   help="CLIP weights file (OpenAI ViT-B-16.pt, open_clip state dict or HF folder)")
    p.add_argument("--arch", default=None,
                   help="CLIP architecture ('auto': from the file; default ViT-B/16, --method excel: the "
                        "preset's)")
    p.add_argument("--out", type=Path, required=True, help="output seed folder")
    p.add_argument("--preset", choices=["voc", "coco", "voc-plus", "coco-plus", "excel-voc", "excel-coco"],
                   default=None,
                   help="seed settings: voc / coco = CLIP-ES's VOC / COCO script exactly (default: by the "
                        "dataset, coco for COCO or a COCO class list in any spelling, else voc); "
                        "-plus = our departures switched on (unmeasured); --method excel: excel-voc or "
                        "excel-coco (default: excel-coco for COCO, else excel-voc)")
    p.add_argument("--descriptors", type=Path, default=None,
                   help="--method excel: ExCEL's class descriptors JSON ({class: [sentences]}, every class "
                        "of the data); without it ExCEL uses plain class prompts (said in one line)")
    p.add_argument("--band", choices=["release", "none"], default=None,
                   help="--method excel: the ignore band (release, the default: ExCEL's online-label band, "
                        "class above --hi 0.7, background at or below --lo 0.25, 255 between or where it "
                        "disagrees with the mask) or none (the plain training-free masks)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                   help="--method excel: an ExCEL setting of the preset (e.g. free.size=320, "
                        "free.par_image=denormalized); repeatable")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="image scales, CAMs averaged (default 1.0, as CLIP-ES)")
    p.add_argument("--flip", action="store_true", help="also use horizontally flipped images")
    p.add_argument("--input-size", type=int, default=None,
                   help="resize the short side to this before scaling (default: the image's own size)")
    p.add_argument("--lo", type=float, default=None,
                   help="seeds: background where every label CAM is below this (default 0.25; --method "
                        "excel: at or below, 0.25)")
    p.add_argument("--hi", type=float, default=None,
                   help="seeds: a class where its CAM is the largest and >= this (default 0.5; --method "
                        "excel: above, 0.7)")
    p.add_argument("--box-threshold", type=float, default=None,
                   help="fraction of the CAM maximum outlining the affinity boxes "
                        "(CLIP-ES: 0.4 VOC, 0.7 COCO)")
    p.add_argument("--softmax-over", choices=["labels", "all"], default=None,
                   help="Grad-CAM target: softmax over the image's labels (CLIP-ES) or all class prompts, "
                        "plus the background prompts")
    p.add_argument("--plain-names", action="store_true",
                   help="prompt plain class names instead of CLIP-ES's synonym-extended ones")
    p.add_argument("--inclusive-boxes", action="store_true",
                   help="keep the last row / column of boxes at the border (CLIP-ES drops them)")
    p.add_argument("--float-resize", action="store_true",
                   help="resize the image as floats with torch bicubic instead of PIL bicubic on uint8")
    p.add_argument("--precision", choices=["auto", "fp16", "fp32"], default=None,
                   help="CLIP precision (auto: fp16 on CUDA as CLIP-ES, fp32 on CPU)")
    p.add_argument("--background", default=None,
                   help="background prompts: a comma-separated list or a file (one a line); "
                        "default: CLIP-ES's list for the dataset (25 words VOC, 23 COCO)")
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with {} (repeatable; default 'a clean origami {}.')")
    p.add_argument("--no-refine", action="store_true", help="plain Grad-CAM, no attention affinity")
    p.add_argument("--masks", nargs="*", choices=["argmax", "crf"], default=None,
                   help="CLIP-ES's masks written besides the seeds, to argmax/ and crf/ (default both; "
                        "'--masks' alone: none)")
    p.add_argument("--bg-power", type=float, default=None,
                   help="exponent t of CLIP-ES's background score (1 - max CAM)^t (default 1)")
    p.add_argument("--crf-fix-wrap", action="store_true",
                   help="give the CRF the image itself (CLIP-ES wraps the mean-subtracted image to uint8)")
    p.add_argument("--save-cams", action="store_true",
                   help="also write cams/<id>.npz (keys, float16 CAMs after the affinity at image size)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images through the CLIP tower at once, those of one size batched (default 1, "
                        "as CLIP-ES; e.g. 8 on a GPU for speed: the CAMs change by float rounding only)")
    add_device(p)
    p.set_defaults(func=run_generate)
    lock_folder(p, "out")
    output_files(p, "json")

    c = actions.add_parser("check", help="validate a seed folder against a dataset",
                           description="Every image has a seed of its size, values are class ids or 255, "
                                       "classes agree with the image labels; the dataset's ground-truth "
                                       "masks found (not with --no-gt) are of their image's size, hold "
                                       "class ids or 255 and are not colour-coded; prints coverage "
                                       "statistics. Exit status 1 when a problem is found.")
    c.add_argument("dir", type=Path, help="seed folder (<id>.png)")
    _data_args(c)
    c.set_defaults(func=run_check, lock_folder=None)
    output_files(c, "json")
