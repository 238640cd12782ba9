"""``weakclip seeds``: training-free CLIP-ES style seeds; ``weakclip seeds check DIR``: validate seeds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _dataset(args: argparse.Namespace):
    from weakclip.data.datasets import build_dataset

    options = {"split": args.split, "with_gt": False if args.no_gt else None}
    if args.cls_labels is not None:
        options["cls_labels"] = args.cls_labels
    if args.dataset:
        return build_dataset(args.dataset, args.data_root, **options)
    return build_dataset(args.data_root, **options)


def _background(spec: str | None):
    from weakclip.seeds.clip_es import BACKGROUND_PROMPTS

    if spec is None:
        return BACKGROUND_PROMPTS
    path = Path(spec)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        return tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def run_generate(args: argparse.Namespace) -> int:
    from weakclip.errors import WeakclipError

    given = (("--data-root", args.data_root), ("--clip-weights", args.clip_weights), ("--out", args.out))
    missing = [flag for flag, value in given if value is None]
    if args.batch_size is not None and args.batch_size < 1:
        raise WeakclipError(f"--batch-size must be >= 1, got {args.batch_size}")
    if missing:
        raise WeakclipError(f"{', '.join(missing)} required to generate seeds "
                            "(or use 'weakclip seeds check DIR' to validate a folder)")
    from weakclip.data.io import jsonable, write_json_atomic
    from weakclip.distributed import cleanup, init_distributed
    from weakclip.models.clip import build_clip
    from weakclip.seeds.clip_es import ClipEsConfig, ClipEsSeeder
    from weakclip.seeds.run import format_summary, generate_seeds

    info = init_distributed(args.device)
    try:
        dataset = _dataset(args)
        settings = {"scales": tuple(args.scales), "flip": args.flip, "input_size": args.input_size,
                    "lo": args.lo, "hi": args.hi, "box_threshold": args.box_threshold,
                    "softmax_over": args.softmax_over, "background": _background(args.background),
                    "refine": not args.no_refine}
        if args.template:
            settings["templates"] = tuple(args.template)
        config = ClipEsConfig(**settings)
        image_tower, text_tower = build_clip(args.arch, args.clip_weights, device=info.device)
        seeder = ClipEsSeeder(image_tower, dataset.classes, text_tower=text_tower, config=config)
        del text_tower
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
    return 0


def run_check(args: argparse.Namespace) -> int:
    from weakclip.data.io import write_json_atomic
    from weakclip.seeds.check import check_seeds

    report = check_seeds(args.dir, _dataset(args), progress=not args.quiet)
    print(report.format())
    if args.json:
        write_json_atomic(args.json, report.to_dict())
    if not report.ok:
        print(f"weakclip seeds check: {len(report.problems())} problems in {args.dir}", file=sys.stderr)
        return 1
    return 0


def _data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data-root", required=required, type=Path, help="dataset root folder")
    p.add_argument("--dataset", choices=["voc", "coco", "folder"], default=None,
                   help="dataset layout (default: detected from the folder)")
    p.add_argument("--split", default=None,
                   help="split / id list (default: the dataset's; train_aug for VOC)")
    p.add_argument("--cls-labels", type=Path, default=None, help="VOC: cls_labels.npy image labels")
    p.add_argument("--no-gt", action="store_true", help="ignore ground-truth masks even when present")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub) -> None:
    p = sub.add_parser(
        "seeds", help="training-free CLIP CAM seeds (CLIP-ES style), or check a seed folder",
        description="Writes <out>/<id>.png seeds (class id, 0 = background, 255 = unsure) from Grad-CAM on "
                    "the frozen CLIP image tower refined by class-aware attention affinity, for the labelled "
                    "classes of each image. Resumable; run under torchrun to shard. Ends with the seeds' "
                    "mIoU when ground truth exists. 'weakclip seeds check DIR --data-root ...' validates "
                    "a seed folder made by any method.")
    _data_args(p, required=False)
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="CLIP weights file (OpenAI ViT-B-16.pt, open_clip state dict or HF folder)")
    p.add_argument("--arch", default="ViT-B/16", help="CLIP architecture ('auto': from the file)")
    p.add_argument("--out", type=Path, default=None, help="output seed folder")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="image scales, CAMs averaged (default 1.0, as CLIP-ES)")
    p.add_argument("--flip", action="store_true", help="also use horizontally flipped images")
    p.add_argument("--input-size", type=int, default=None,
                   help="resize the short side to this before scaling (default: the image's own size)")
    p.add_argument("--lo", type=float, default=0.25, help="background where every label CAM is below this")
    p.add_argument("--hi", type=float, default=0.5, help="a class where its CAM is the largest and >= this")
    p.add_argument("--box-threshold", type=float, default=0.4,
                   help="fraction of the CAM maximum outlining the affinity boxes")
    p.add_argument("--softmax-over", choices=["all", "labels"], default="all",
                   help="Grad-CAM target: softmax over all class prompts (default) or the image's labels, "
                        "plus the background prompts")
    p.add_argument("--background", default=None,
                   help="background prompts: a comma-separated list or a file (one a line); "
                        "default: CLIP-ES's 25 words")
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with {} (repeatable; default 'a clean origami {}.')")
    p.add_argument("--no-refine", action="store_true", help="plain Grad-CAM, no attention affinity")
    p.add_argument("--save-cams", action="store_true", help="also write cams/<id>.npz (float16)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images through the CLIP tower at once, those of one size batched "
                        "(default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=run_generate)

    actions = p.add_subparsers(dest="seeds_action", metavar="ACTION")
    c = actions.add_parser("check", help="validate a seed folder against a dataset",
                           description="Every image has a seed of its size, values are class ids or 255, "
                                       "classes agree with the image labels; prints coverage statistics. "
                                       "Exit status 1 when a problem is found.")
    c.add_argument("dir", type=Path, help="seed folder (<id>.png)")
    _data_args(c, required=True)
    c.set_defaults(func=run_check)
