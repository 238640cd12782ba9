"""The ``weakclip`` command: a thin layer of argument parsing over the Python API.

Each sub-command imports what it needs when it runs, so ``weakclip --help`` stays fast.
Errors meant for the user (:class:`weakclip.errors.WeakclipError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from weakclip import __version__
from weakclip.errors import WeakclipError


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from weakclip.data.io import write_json_atomic
    from weakclip.evaluate import evaluate_folders

    scores, record = evaluate_folders(args.pred, args.gt, args.classes, ids=args.ids, unsure=args.unsure,
                                      workers=args.workers, progress=not args.quiet)
    print(scores.table())
    line = f"mIoU {100 * scores.miou:.2f}% over {record['images']} images"
    if record["unsure_pixels"]:
        line += f" ({record['unsure_pixels']} unsure pixels counted as {args.unsure})"
    print(line)
    if args.json:
        write_json_atomic(args.json, {**scores.to_dict(), **record})
        print(f"wrote {args.json}")
    return 0


def _cmd_prepare_coco(args: argparse.Namespace) -> int:
    from weakclip.data.coco import prepare_coco

    prepare_coco(args.coco_root, args.out, splits=tuple(args.splits), workers=args.workers)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from weakclip.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    print(f"wrote a synthetic dataset in the folder layout to {root}")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from weakclip.models.clip_weights import describe_weights

    print(json.dumps(describe_weights(args.file), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weakclip",
        description="WeakCLIP: weakly-supervised semantic segmentation with a frozen CLIP.",
    )
    parser.add_argument("--version", action="version", version=f"weakclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("evaluate", help="mIoU of a folder of predicted label PNGs against ground truth",
                       description="Confusion-matrix mIoU, per-class IoU and FP/FN rates of predicted "
                                   "label PNGs (<pred>/<id>.png) against ground truth (<gt>/<id>.png).")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted label PNGs")
    p.add_argument("--gt", required=True, type=Path, help="folder of ground-truth label PNGs (255 = ignored)")
    p.add_argument("--classes", required=True, help="'voc', 'coco' or a class-list file (first: background)")
    p.add_argument("--ids", type=Path, default=None, help="id-list file (default: all GT)")
    p.add_argument("--unsure", choices=["background", "ignore", "error"], default="background",
                   help="how to count prediction pixels of 255 (unsure seeds): as background (default), "
                        "left out, or an error")
    p.add_argument("--json", type=Path, default=None, help="write the scores (percent) to this JSON file")
    p.add_argument("--workers", type=int, default=4, help="reader threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("prepare", help="one-time dataset preparation (COCO label PNGs)")
    prep = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    pc = prep.add_parser("coco", help="convert COCO 2014 instances JSON into 81-class label PNGs",
                         description="Writes <out>/SegmentationClass/<split>/<id>.png, <out>/ImageSets/"
                                     "<split>.txt and <out>/labels_<split>.json. Resumable.")
    pc.add_argument("--coco-root", required=True, type=Path,
                    help="folder holding annotations/instances_<split>.json")
    pc.add_argument("--out", required=True, type=Path, help="output root (may equal --coco-root)")
    pc.add_argument("--splits", nargs="+", default=["train2014", "val2014"])
    pc.add_argument("--workers", type=int, default=2)
    pc.set_defaults(func=_cmd_prepare_coco)

    p = sub.add_parser("synth", help="write the small synthetic dataset used by the tests and the demo")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-val", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("weights", help="identify a CLIP weights file: its format and architecture")
    p.add_argument("file", type=Path, help="OpenAI .pt, open_clip state dict, or HF CLIPModel folder")
    p.set_defaults(func=_cmd_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except WeakclipError as err:
        print(f"weakclip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
