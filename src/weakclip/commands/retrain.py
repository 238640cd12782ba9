"""``weakclip retrain``: train a DeepLab-family network on pseudo masks, then evaluate it on val."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from weakclip.commands import lock_folder, output_files
from weakclip.commands.flags import PRESET_HELP, add_crf, add_device, add_training_data

# direct flag -> config key
_FLAG_KEYS: tuple[tuple[str, str], ...] = (
    ("dataset", "data.kind"),
    ("split", "data.split"),
    ("val_split", "data.val_split"),
    ("model", "model.name"),
    ("output_stride", "model.output_stride"),
    ("backbone_weights", "model.backbone_weights"),
    ("iters", "train.iters"),
    ("batch_size", "train.batch_size"),
    ("lr", "train.lr"),
    ("optimizer", "train.optimizer"),
    ("crop_size", "data.crop_size"),
    ("seed", "train.seed"),
    ("num_workers", "data.num_workers"),
)


def build_retrain_config(args: argparse.Namespace):
    """The preset, then ``--data-root``/``--masks``, the direct flags, the eval switches, then ``--set``."""
    from weakclip.commands import flag_overrides, folder_default_split
    from weakclip.retrain.config import apply_retrain_overrides, load_retrain_preset
    from weakclip.retrain.evaluate import MS_SCALES
    from weakclip.sections import override_keys

    cfg = load_retrain_preset(args.preset)
    overrides = flag_overrides(args, _FLAG_KEYS, **{"data.root": args.data_root, "data.masks": args.masks})
    if args.no_pretrained:
        overrides.append("model.pretrained_backbone=false")
    if args.ms_eval and args.scales:
        from weakclip.errors import WeakclipError

        raise WeakclipError("--ms-eval and --scales exclude each other")
    if args.ms_eval:
        overrides += ["eval.scales=" + ",".join(str(s) for s in MS_SCALES), "eval.flip=true"]
    elif args.scales:
        overrides.append("eval.scales=" + ",".join(str(s) for s in args.scales))
    if args.crf == "none":
        overrides.append("eval.crf=false")
    elif args.crf is not None:  # auto: on, with the preset's parameters
        overrides += ["eval.crf=true"] + ([f"eval.crf_params={args.crf}"] if args.crf != "auto" else [])
    overrides += list(args.set or [])
    cfg = apply_retrain_overrides(cfg, overrides)
    if cfg.data.kind == "folder":  # the presets' splits are VOC's / COCO's: a folder dataset has its own
        given = override_keys(args.set)
        picked = []
        if args.split is None and "data.split" not in given and not args.eval_only:
            split = folder_default_split("weakclip retrain", cfg.data.root, "training", "training split",
                                         to_stderr=args.print_config)
            picked.append(f"data.split={split or 'none'}")
        if args.val_split is None and "data.val_split" not in given:
            split = folder_default_split("weakclip retrain", cfg.data.root, "val", "val split",
                                         to_stderr=args.print_config)
            picked.append(f"data.val_split={split or 'none'}")
        cfg = apply_retrain_overrides(cfg, picked)
    return cfg


def run(args: argparse.Namespace) -> int:
    from weakclip.distributed import env_world
    from weakclip.errors import WeakclipError
    from weakclip.retrain.train import check_backbone_weights, evaluate_checkpoint, retrain

    if args.backbone_weights is not None and args.no_pretrained:
        raise WeakclipError("--backbone-weights and --no-pretrained exclude each other")
    cfg = build_retrain_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if not cfg.data.root:
        raise WeakclipError("no dataset given: pass --data-root")
    if args.checkpoint is not None and not args.eval_only:
        raise WeakclipError("--checkpoint is for --eval-only (to continue a training run use --resume)")
    if args.eval_only:
        if args.checkpoint is None:
            raise WeakclipError("--eval-only needs --checkpoint FILE (a released or trained network)")
        result = evaluate_checkpoint(cfg, args.checkpoint, args.workdir, device=args.device,
                                     progress=not args.quiet, pred_dir=args.save_predictions)
        if env_world()[0] == 0:
            print(json.dumps({"checkpoint": str(args.checkpoint), "val_miou": result["miou"],
                              "images": result["images"]}, indent=1))
        return 0
    if not cfg.data.masks:
        raise WeakclipError("no pseudo masks given: pass --masks DIR (a folder of <id>.png label maps, "
                            "255 = ignore)")
    check_backbone_weights(cfg)
    summary = retrain(cfg, cfg.data.masks, None, args.workdir, resume=args.resume, device=args.device,
                      max_iters_this_run=args.max_iters_this_run, evaluate=not args.no_eval,
                      progress=not args.quiet, pred_dir=args.save_predictions)
    if env_world()[0] == 0:
        keep = ("workdir", "start_iter", "end_iter", "total_iters", "finished", "iterations_run", "seconds",
                "checkpoint")
        slim = {k: summary[k] for k in keep if k in summary}
        if "eval" in summary:
            slim["val_miou"] = summary["eval"]["miou"]
        print(json.dumps(slim, indent=1, default=str))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "retrain", help="train a DeepLab network on pseudo masks and evaluate it on val",
        description="Stage 4: train a segmentation network on the pseudo masks, then evaluate it on val "
                    "and write <workdir>/eval.json. The voc / coco presets are the authors' retraining "
                    "(DeepLab-v1 on ResNet-38, their recipe and their multi-scale + flip + CRF evaluation; "
                    "ImageNet weights from --backbone-weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params or a "
                    "converted .pth); voc-plus / coco-plus train torchvision's DeepLabV3-ResNet101 instead. "
                    "--eval-only --checkpoint FILE evaluates a released or trained network. Runs alone or "
                    "under `torchrun --nproc_per_node=N` (--batch-size is GLOBAL). Settings: the preset, "
                    "then the flags, then --set key=value.")
    p.add_argument("--masks", type=Path, default=None,
                   help="folder of pseudo-mask PNGs (<id>.png, 255 = ignore); required, except with "
                        "--eval-only")
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset root (VOC2012, prepared COCO, folder); required, except with --print-config")
    add_training_data(p)
    p.add_argument("--val-split", default=None,
                   help="validation split, 'none' for no evaluation (default: the preset's, e.g. val; folder "
                        "datasets: splits/val.txt when present, else none)")
    p.add_argument("--workdir", type=Path, required=True,
                   help="output folder: config.yaml, log.csv, checkpoints/, eval.json")
    p.add_argument("--preset", default="voc",
                   help=f"retraining preset: {PRESET_HELP} (voc / coco: the authors' DeepLab-v1 / ResNet-38; "
                        f"-plus: torchvision's DeepLabV3), or a retrain config .yaml (default voc)")
    p.add_argument("--model", default=None,
                   help="network: deeplabv1_resnet38 (voc/coco), deeplabv3_resnet101 (the -plus presets), "
                        "deeplabv3plus_resnet101, fcn_resnet50, lraspp_mobilenet_v3_large, ... (any "
                        "torchvision segmentation builder)")
    p.add_argument("--output-stride", type=int, choices=[8, 16, 32], default=None,
                   help="output stride of torchvision ResNet backbones (default 16; ResNet-38 is 8)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--backbone-weights", type=Path, default=None,
                         help="ImageNet weights of the backbone: ilsvrc-cls_rna-a1_cls1000_ep-0001.params "
                              "(MXNet, read without MXNet) or a converted .pth for ResNet-38; torchvision's "
                              "resnet101-63fe2227.pth for the -plus presets")
    weights.add_argument("--no-pretrained", action="store_true",
                         help="train from random initialisation (no ImageNet weights)")
    p.add_argument("--iters", type=int, default=None, help="total iterations (train.iters)")
    p.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch size (train.batch_size)")
    p.add_argument("--lr", type=float, default=None,
                   help="backbone learning rate; the head gets x head_lr_mult")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="train.optimizer")
    p.add_argument("--crop-size", type=int, default=None, help="training crop (data.crop_size)")
    p.add_argument("--seed", type=int, default=None, help="random seed (train.seed)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per process")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override any config value, e.g. train.head_lr_mult=10 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the workdir's latest checkpoint (a finished run is only re-evaluated)")
    p.add_argument("--max-iters-this-run", type=int, default=None,
                   help="stop (with a checkpoint) after this many iterations; continue later with --resume")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="test scales of the evaluation (eval.scales; default: the preset's, 0.5-1.5 for "
                        "voc / coco)")
    p.add_argument("--ms-eval", action="store_true",
                   help="evaluate at scales 0.5-1.75 with flip (the voc/coco presets already evaluate at "
                        "0.5-1.5 with flip)")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate --checkpoint on the val split with the preset's evaluation")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="with --eval-only: the network to evaluate (the authors' released .pth or another "
                        "state dict; loaded with weights_only=True). A run of this package is re-evaluated "
                        "with --resume on its workdir")
    add_crf(p, "dense CRF on the evaluation's probabilities: auto (on, the preset's parameters), voc or coco "
               "(on, those parameters) or none (default: the preset's: on for voc / coco)", bare="auto")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--save-predictions", type=Path, default=None,
                   help="write the val predictions (PNGs) here")
    add_device(p)
    p.add_argument("--print-config", action="store_true", help="print the resulting config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    lock_folder(p, "workdir")
    output_files(p, "save_predictions")
