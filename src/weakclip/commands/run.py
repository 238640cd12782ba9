"""``weakclip run``: the whole pipeline; ``weakclip demo``: the same on the embedded synthetic data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weakclip.commands import lock_folder


def run_pipeline(args: argparse.Namespace) -> int:
    from weakclip.distributed import cleanup
    from weakclip.errors import WeakclipError
    from weakclip.pipeline import Pipeline, PipelineConfig, RegressionStop

    if args.seeds_batch < 1:
        raise WeakclipError(f"--seeds-batch must be >= 1, got {args.seeds_batch}")
    # the pseudo-mask flags are overrides of the preset's pseudo section (given ones only)
    pseudo = [f"pseudo.crf={args.crf}"] if args.crf is not None else []
    if args.restrict:
        pseudo.append("pseudo.restrict_to_labels=true")
    if args.crf_workers is not None:
        pseudo.append(f"pseudo.crf_workers={args.crf_workers}")
    if args.pseudo_scales:
        pseudo.append("pseudo.scales=" + ",".join(str(s) for s in args.pseudo_scales))
    cfg = PipelineConfig(workdir=args.workdir, data_root=args.data_root, preset=args.preset,
                         retrain_preset=args.retrain_preset, dataset=args.dataset, train_split=args.split,
                         val_split=args.val_split, clip_weights=args.clip_weights, seeds=args.seeds,
                         refine_overrides=[*pseudo, *args.set], retrain_overrides=list(args.retrain_set),
                         device=args.device, progress=not args.quiet, seeds_batch=args.seeds_batch,
                         stop_on_regression=args.stop_on_regression)
    try:
        Pipeline(cfg).run()
    except RegressionStop as stop:
        print(f"weakclip run: {stop}", file=sys.stderr)
        return 3
    finally:
        cleanup()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from weakclip.demo import DemoSize, run_demo

    run_demo(args.workdir, DemoSize.small() if args.small else DemoSize(), device=args.device,
             progress=not args.quiet)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="the whole pipeline: seeds -> refinement -> pseudo masks -> retraining -> val mIoU",
        description="Runs every stage in --workdir (one folder each, with its config, log and metrics); "
                    "finished stages are skipped, interrupted ones resumed. Ends with a summary table, "
                    "report.json and report.html (see 'weakclip report'). Works the same under torchrun.")
    p.add_argument("--preset", default="voc",
                   help="refinement and pseudo-mask preset: voc, coco (the release), voc-plus, coco-plus "
                        "(our unmeasured departures) or a .yaml (default voc)")
    p.add_argument("--retrain-preset", default=None,
                   help="retraining preset (default: the same name as --preset; voc for a .yaml)")
    p.add_argument("--data-root", required=True, type=Path, help="dataset root (VOC2012, COCO, folder)")
    p.add_argument("--dataset", choices=["voc", "coco", "coco91", "folder"], default=None)
    p.add_argument("--split", default=None, help="training split (default: the preset's, e.g. train_aug)")
    p.add_argument("--val-split", default=None, help="val split for the final evaluation (default: val)")
    p.add_argument("--clip-weights", type=Path, default=None, help="CLIP ViT-B/16 weights (see README)")
    p.add_argument("--seeds", type=Path, default=None, help="external seed PNGs (default: built-in CLIP-ES)")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="refinement override, e.g. --set train.iters=10000 (repeatable)")
    p.add_argument("--retrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="retraining override, e.g. --retrain-set model.name=deeplabv3plus_resnet101")
    p.add_argument("--pseudo-scales", type=float, nargs="+", default=None,
                   help="pseudo-mask test scales (default: the release's 0.5 .. 1.75)")
    p.add_argument("--crf", choices=["auto", "voc", "coco", "none"], default=None,
                   help="full-resolution CRF of the pseudo masks (default: the preset's; auto: by "
                        "dataset)")
    p.add_argument("--restrict", action="store_true",
                   help="restrict pseudo masks to each image's labels (pseudo.restrict_to_labels; the "
                        "release does not; on in the -plus presets)")
    p.add_argument("--crf-workers", type=int, default=None,
                   help="CRF worker processes (default: the preset's)")
    p.add_argument("--seeds-batch", type=int, default=1,
                   help="images through CLIP at once in the built-in seed stage (default 1, as CLIP-ES; "
                        "e.g. 8 on a GPU: the CAMs change by float rounding only)")
    p.add_argument("--stop-on-regression", action="store_true",
                   help="stop after a stage that made things worse (pseudo masks below the seeds, final "
                        "network below the pseudo masks, a class vanished) instead of going on (exit "
                        "status 3; the report is written)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_pipeline)
    lock_folder(p, "workdir")

    d = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic dataset (CPU, minutes)",
                       description="Synthetic data + a tiny random CLIP: refinement, pseudo masks, "
                                   "retraining; writes report.json, report.html, overlays/ and losses.png in "
                                   "--workdir.")
    d.add_argument("--workdir", type=Path, default=Path("weakclip_demo"))
    d.add_argument("--small", action="store_true", help="a reduced size (what the test suite runs)")
    d.add_argument("--device", default=None)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=run_demo)
    lock_folder(d, "workdir")
