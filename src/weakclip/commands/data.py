"""``weakclip prepare coco`` and ``weakclip synth``: one-time dataset preparation."""

from __future__ import annotations

import argparse
from pathlib import Path

from weakclip.commands import output_files


def run_prepare_coco(args: argparse.Namespace) -> int:
    from weakclip.data.coco import prepare_coco

    stats = prepare_coco(args.coco_root, args.out, splits=tuple(args.splits), workers=args.workers)
    for split, s in stats.items():
        print(f"{split}: {s['images']} images, {s['written']} label PNGs written, "
              f"{s['skipped']} already there")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from weakclip.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    print(f"wrote a synthetic dataset in the folder layout to {root}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help="one-time dataset preparation (COCO label PNGs)",
                       description="Convert a dataset's annotations once into the layout the other commands "
                                   "read. DATASET: coco (COCO 2014 instances JSON -> label PNGs, id lists, "
                                   "image labels). VOC and folder datasets need no preparation.")
    prep = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    pc = prep.add_parser("coco", help="convert COCO 2014 instances JSON into 81-class label PNGs",
                         description="Writes <out>/SegmentationClass/<split>/<id>.png, <out>/ImageSets/"
                                     "<split>.txt and <out>/labels_<split>.json. Resumable.")
    pc.add_argument("--coco-root", required=True, type=Path,
                    help="folder holding annotations/instances_<split>.json")
    pc.add_argument("--out", required=True, type=Path, help="output root (may equal --coco-root)")
    pc.add_argument("--splits", nargs="+", default=["train2014", "val2014"],
                    help="COCO splits to convert, each needing annotations/instances_<split>.json "
                         "(default: train2014 val2014)")
    pc.add_argument("--workers", type=int, default=2, help="processes writing label PNGs (default 2)")
    pc.set_defaults(func=run_prepare_coco)
    output_files(pc, "out")

    p = sub.add_parser("synth", help="write the small synthetic dataset used by the tests and the demo",
                       description="Textured shapes on textured backgrounds in the folder layout "
                                   "(classes.txt, images/, labels.json, masks/ = ground truth, seeds/ = "
                                   "deliberately incomplete noisy seeds of the training images, "
                                   "splits/train.txt and splits/val.txt): a dataset to try every command on "
                                   "without a download.")
    p.add_argument("--out", required=True, type=Path, help="output folder (the dataset root)")
    p.add_argument("--n-train", type=int, default=24, help="training images (default 24)")
    p.add_argument("--n-val", type=int, default=8, help="val images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the drawing (default 0)")
    p.set_defaults(func=run_synth)
    output_files(p, "out")
