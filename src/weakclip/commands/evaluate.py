"""``weakclip evaluate``: mIoU of a folder of predicted label PNGs against ground truth."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weakclip.commands import output_files


def run(args: argparse.Namespace) -> int:
    from weakclip.data.io import write_json_atomic
    from weakclip.evaluate import evaluate_folders

    scores, record = evaluate_folders(args.pred, args.gt, args.classes, ids=args.ids, unsure=args.unsure,
                                      workers=args.workers, progress=not args.quiet)
    print(scores.table())
    line = f"mIoU {100 * scores.miou:.2f}% over {record['images']} images"
    if record["unsure_pixels"]:
        how = "left out" if args.unsure == "ignore" else "counted as background"
        line += f" ({record['unsure_pixels']} unsure pixels {how})"
    print(line)
    if record["highest_class_id"] + 1 < len(scores.classes) // 2:
        print(f"note: the masks' class ids go up to {record['highest_class_id']} but --classes "
              f"{args.classes} has {len(scores.classes)} classes: is it the right list?", file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, {**scores.to_dict(), **record})
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="mIoU of a folder of predicted label PNGs against ground truth",
                       description="Confusion-matrix mIoU, per-class IoU and FP/FN rates of predicted "
                                   "label PNGs (<pred>/<id>.png) against ground truth (<gt>/<id>.png).")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted label PNGs")
    p.add_argument("--gt", required=True, type=Path, help="folder of ground-truth label PNGs (255 = ignored)")
    p.add_argument("--classes", required=True,
                   help="'voc', 'coco' (81 classes), 'coco91' (COCO's 91 category ids) or a class-list file "
                        "(first: background); its size must match the masks' values")
    p.add_argument("--ids", type=Path, default=None,
                   help="id-list file: score only these images (default: every ground-truth PNG)")
    p.add_argument("--unsure", choices=["background", "ignore", "error"], default="background",
                   help="how to count prediction pixels of 255 (unsure seeds): as background (default), "
                        "left out, or an error")
    p.add_argument("--json", type=Path, default=None, help="write the scores (percent) to this JSON file")
    p.add_argument("--workers", type=int, default=4, help="reader threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    output_files(p, "json")
