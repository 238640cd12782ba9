"""``weakclip run``: the whole pipeline of the method the preset belongs to (WeakCLIP: ``voc``, ``coco``,
``-plus``; ExCEL: ``excel-voc``, ``excel-coco``); ``weakclip demo``: the same on the embedded synthetic
data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weakclip.commands import lock_folder
from weakclip.commands.flags import (
    PRESET_HELP,
    add_crf,
    add_device,
    add_renamed,
    add_training_data,
)
from weakclip.methods import get as get_method
from weakclip.methods import names as method_names

#: Every stage name of every method's run (each run checks that --redo names one of its own).
ALL_STAGES: tuple[str, ...] = tuple(dict.fromkeys(stage for name in method_names()
                                                  for stage in get_method(name).stage_names()))
#: The WeakCLIP-only flags of the pseudo-mask and seed stages: (attribute, flag, its value when not given,
#: what an ExCEL run takes instead).
_WEAKCLIP_FLAGS = (("scales", "--scales", None, "--set infer.scales=..."),
                   ("crf", "--crf", None, "--set infer.crf=true"), ("restrict", "--restrict", False, None),
                   ("crf_workers", "--crf-workers", None, None), ("batch_size", "--batch-size", 1, None))


def _check_method_flags(args: argparse.Namespace) -> None:
    """WeakCLIP's stage flags given to an ExCEL run: one line naming the ExCEL setting to use instead."""
    from weakclip.errors import WeakclipError
    from weakclip.methods import DEFAULT_METHOD, of_preset

    method = of_preset(str(args.preset))
    if method.name == DEFAULT_METHOD:
        return
    for attr, flag, unset, instead in _WEAKCLIP_FLAGS:
        if getattr(args, attr) != unset:  # by value: "--crf-workers 0" is given (0 == False would hide it)
            tail = f"; use {instead}" if instead else ""
            raise WeakclipError(f"{flag} sets a WeakCLIP stage; the {method.title} run (--preset "
                                f"{args.preset}) does not take it{tail}")


def run_pipeline(args: argparse.Namespace) -> int:
    from weakclip.distributed import cleanup
    from weakclip.errors import WeakclipError
    from weakclip.pipeline import PipelineConfig, RegressionStop, build_pipeline

    if args.batch_size < 1:
        raise WeakclipError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_method_flags(args)
    # the pseudo-mask flags are overrides of the preset's pseudo section (given ones only)
    pseudo = [f"pseudo.crf={args.crf}"] if args.crf is not None else []
    if args.restrict:
        pseudo.append("pseudo.restrict_to_labels=true")
    if args.crf_workers is not None:
        pseudo.append(f"pseudo.crf_workers={args.crf_workers}")
    if args.scales:
        pseudo.append("pseudo.scales=" + ",".join(str(s) for s in args.scales))
    retrain = []
    if args.backbone_weights is not None:
        retrain.append(f"model.backbone_weights={args.backbone_weights}")
    if args.no_pretrained:
        retrain.append("model.pretrained_backbone=false")
    cfg = PipelineConfig(workdir=args.workdir, data_root=args.data_root, preset=args.preset,
                         retrain_preset=args.retrain_preset, dataset=args.dataset, train_split=args.split,
                         val_split=args.val_split, clip_weights=args.clip_weights, seeds=args.seeds,
                         refine_overrides=[*pseudo, *args.set],
                         retrain_overrides=[*retrain, *args.retrain_set],
                         device=args.device, progress=not args.quiet, seeds_batch=args.batch_size,
                         stop_on_regression=args.stop_on_regression, redo=args.redo,
                         descriptors=args.descriptors, retrain=args.retrain, seed_method=args.seed_method,
                         seed_band=not args.no_seed_band)
    try:
        build_pipeline(cfg).run()
    except RegressionStop as stop:
        print(f"weakclip run: {stop}", file=sys.stderr)
        return 3
    finally:
        cleanup()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from weakclip.methods import entry

    entry(args.method, "demo")(args.workdir, args.small, device=args.device, progress=not args.quiet)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="the whole pipeline: seeds -> refinement -> pseudo masks -> retraining -> val mIoU "
                    "(ExCEL: training-free masks -> training -> pseudo masks -> val mIoU)",
        description="Runs every stage of the preset's method (WeakCLIP: seeds, refine, pseudo_masks, "
                    "retrain; ExCEL, --preset excel-voc / excel-coco: seeds (its training-free masks), "
                    "train, pseudo_masks, evaluate, and retrain with --retrain deeplabv1) in --workdir (one "
                    "folder each, with its config, log and metrics); "
                    "finished stages are reused, interrupted ones resumed, when made with the settings this "
                    "run asks for: another setting that changes a stage's results stops the run before any "
                    "work (--redo STAGE, or a new --workdir), one that does not (--batch-size, --device, "
                    "worker counts) is a note. Ends with a summary table, report.json and report.html (see "
                    "'weakclip report'). Works the same under torchrun.")
    p.add_argument("--preset", default="voc",
                   help=f"the method and its settings: WeakCLIP's refinement and pseudo-mask preset "
                        f"{PRESET_HELP} (voc / coco: the release; -plus: our unmeasured departures), ExCEL's "
                        f"excel-voc, excel-coco (the release), or a .yaml (default voc)")
    p.add_argument("--retrain-preset", default=None,
                   help=f"retraining preset: {PRESET_HELP} or a .yaml (default: the same name as "
                        f"--preset; voc for a .yaml)")
    p.add_argument("--data-root", required=True, type=Path, help="dataset root (VOC2012, COCO, folder)")
    add_training_data(p)
    p.add_argument("--val-split", default=None,
                   help="val split for the final evaluation, 'none' for none (default: val; folder datasets: "
                        "splits/val.txt when present, else none)")
    p.add_argument("--clip-weights", type=Path, default=None, help="CLIP ViT-B/16 weights (see README)")
    p.add_argument("--seeds", type=Path, default=None, help="external seed PNGs (default: built-in CLIP-ES)")
    p.add_argument("--seed-method", choices=("clip-es", "excel"), default="clip-es",
                   help="WeakCLIP's built-in seeds: clip-es (the release) or excel (ExCEL's training-free "
                        "masks with an ignore band; in no paper, unmeasured; see docs/method.md)")
    p.add_argument("--no-seed-band", action="store_true",
                   help="--seed-method excel: the plain training-free masks, without the ignore band")
    p.add_argument("--descriptors", type=Path, default=None,
                   help="ExCEL's class descriptors JSON ({class: [sentences]}; see README); without it ExCEL "
                        "uses plain class prompts (said in one line)")
    p.add_argument("--retrain", choices=("deeplabv1", "none"), default=None,
                   help="ExCEL runs: retrain the DeepLab-v1 ResNet-38 on ExCEL's pseudo masks (deeplabv1) "
                        "or not (none, the default, as the release)")
    p.add_argument("--workdir", required=True, type=Path,
                   help="work folder: one sub-folder per stage, report.json, report.html")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--backbone-weights", type=Path, default=None,
                         help="ImageNet weights of the retraining backbone (as `weakclip retrain "
                              "--backbone-weights`): ilsvrc-cls_rna-a1_cls1000_ep-0001.params (MXNet) or a "
                              "converted .pth for ResNet-38 (voc / coco; no download), torchvision's "
                              "resnet101-63fe2227.pth for the -plus presets")
    weights.add_argument("--no-pretrained", action="store_true",
                         help="retrain from random initialisation (no ImageNet weights)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="refinement override, e.g. --set train.iters=10000 (repeatable)")
    p.add_argument("--retrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="retraining override, e.g. --retrain-set model.name=deeplabv3plus_resnet101")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="test scales of the pseudo-mask stage (default: the preset's; the release's 0.5 "
                        ".. 1.75)")
    add_renamed(p, "--pseudo-scales", "--scales", "scales", type=float, nargs="+")
    add_crf(p, "full-resolution CRF of the pseudo masks: auto (by dataset), voc, coco or none (default: the "
               "preset's)")
    p.add_argument("--restrict", action="store_true",
                   help="restrict pseudo masks to each image's labels (pseudo.restrict_to_labels; the "
                        "release does not; on in the -plus presets)")
    p.add_argument("--crf-workers", type=int, default=None,
                   help="CRF worker processes (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images through CLIP at once in the built-in seed stage, as `weakclip seeds "
                        "--batch-size` (default 1, as CLIP-ES; e.g. 8 on a GPU: the CAMs change by float "
                        "rounding only). The training batches are the presets' (--set train.batch_size=N, "
                        "--retrain-set train.batch_size=N)")
    add_renamed(p, "--seeds-batch", "--batch-size", "batch_size", type=int)
    p.add_argument("--redo", choices=ALL_STAGES, default=None, metavar="STAGE",
                   help=f"recompute STAGE (WeakCLIP: {', '.join(get_method('weakclip').stage_names())}; "
                        f"ExCEL: {', '.join(get_method('excel').stage_names())}) and every stage after it, "
                        "with this run's "
                        "settings: their folders in --workdir are emptied first (the way to change a setting "
                        "of a finished stage; the earlier stages are reused)")
    p.add_argument("--stop-on-regression", action="store_true",
                   help="stop after a stage that made things worse (pseudo masks below the seeds, final "
                        "network below the pseudo masks, a class vanished) instead of going on (exit "
                        "status 3; the report is written)")
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_pipeline)
    lock_folder(p, "workdir")

    d = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic dataset (CPU, minutes)",
                       description="Synthetic data + a tiny random CLIP: refinement, pseudo masks, "
                                   "retraining; writes report.json, report.html, overlays/ and losses.png in "
                                   "--workdir.")
    d.add_argument("--workdir", type=Path, default=Path("weakclip_demo"),
                   help="work folder (default weakclip_demo; resumable: finished stages are skipped)")
    d.add_argument("--small", action="store_true", help="a reduced size (what the test suite runs)")
    d.add_argument("--method", choices=tuple(method_names()), default="weakclip",
                   help="the method whose whole chain the demo runs (default weakclip)")
    add_device(d)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=run_demo)
    lock_folder(d, "workdir")
