"""``weakclip pseudo-masks``: pseudo masks of a dataset split from a trained refinement model."""

from __future__ import annotations

import argparse
from pathlib import Path


def _crf_params(args: argparse.Namespace, kind: str):
    if args.no_crf:
        return None
    from weakclip.crf import COCO_CRF, VOC_CRF

    preset = args.crf or ("coco" if kind == "coco" else "voc")
    return COCO_CRF if preset == "coco" else VOC_CRF


def run(args: argparse.Namespace) -> int:
    from weakclip.data.datasets import build_dataset
    from weakclip.distributed import cleanup, init_distributed
    from weakclip.errors import WeakclipError
    from weakclip.inference.loading import load_trained_model, normalization_of
    from weakclip.inference.pseudo_masks import format_summary, generate_pseudo_masks

    if args.crf_workers < 0:
        raise WeakclipError("--crf-workers must be >= 0")
    if any(s <= 0 for s in args.scales):
        raise WeakclipError(f"--scales must be positive, got {args.scales}")
    info = init_distributed(args.device)
    try:
        model, cfg = load_trained_model(args.checkpoint, args.clip_weights, device=info.device)
        kind = args.dataset or cfg.data.kind
        root = args.data_root
        if not root.exists():
            raise WeakclipError(f"dataset folder not found: {root}")
        dataset = build_dataset(kind, root, split=args.split)
        if len(dataset.classes) != len(cfg.classes):
            raise WeakclipError(f"the model was trained on {len(cfg.classes)} classes, the dataset at "
                                f"{root} has {len(dataset.classes)}")
        mean, std = normalization_of(cfg)
        crf = _crf_params(args, kind)
        amp = None
        if args.amp and info.device.type == "cuda":
            import torch

            amp = torch.bfloat16
        summary = generate_pseudo_masks(
            model, dataset, args.out, scales=args.scales, flip=not args.no_flip, crop=args.crop,
            stride=args.stride, base_scale=tuple(args.base_scale), mean=mean, std=std, crf_params=crf,
            restrict_to_labels=not args.no_restrict, save_probs=args.save_probs, crf_workers=args.crf_workers,
            window_batch=args.window_batch, autocast_dtype=amp, limit=args.max_images,
            progress=not args.quiet)
        if info.is_main:
            print(format_summary(summary))
    finally:
        cleanup()
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "pseudo-masks", help="pseudo masks of a dataset split from a trained model (TTA, labels, CRF)",
        description="Multi-scale + flip sliding-window inference of a trained WeakCLIP model over a dataset "
                    "split, restricted to each image's labels (+ background), then the full-resolution dense "
                    "CRF in worker processes. Writes OUT/<id>.png (VOC palette), OUT/no_crf/<id>.png and, "
                    "with --save-probs, OUT/probs/<id>.npz. Resumable (existing masks are skipped); runs "
                    "sharded under torchrun; with ground truth it prints the mIoU before and after CRF.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="training checkpoint (.pth), the training work folder (its latest checkpoint) "
                        "or an authors' release checkpoint (mmseg .pth; needs no --clip-weights)")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="the CLIP weights file the model was trained with")
    p.add_argument("--data-root", required=True, type=Path,
                   help="dataset root (VOC2012, prepared COCO, folder)")
    p.add_argument("--dataset", choices=["voc", "coco", "folder"], default=None,
                   help="dataset layout (default: the one the model was trained on)")
    p.add_argument("--split", default=None,
                   help="split name or id-list file (default: the dataset's training split: VOC train_aug, "
                        "COCO train2014, folder: every labelled image)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
                   help="ratios of the base scale (default: the release's 0.5 ... 1.75)")
    p.add_argument("--base-scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="base resize scale, aspect kept (default 2048 512)")
    p.add_argument("--crop", type=int, default=512, help="sliding-window size (default 512)")
    p.add_argument("--stride", type=int, default=341, help="sliding-window stride (default 341)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    p.add_argument("--no-crf", action="store_true", help="no dense CRF (OUT/<id>.png is the model's mask)")
    p.add_argument("--crf", choices=["voc", "coco"], default=None,
                   help="CRF parameters (default: coco for COCO, voc otherwise)")
    p.add_argument("--no-restrict", action="store_true",
                   help="predict over all classes, not only the image's labels (as the release)")
    p.add_argument("--save-probs", action="store_true",
                   help="also write OUT/probs/<id>.npz (float16 probabilities of the present classes)")
    p.add_argument("--crf-workers", type=int, default=2,
                   help="CRF worker processes per process (default 2; 0 = run the CRF inline)")
    p.add_argument("--window-batch", type=int, default=1, help="sliding windows per forward pass")
    p.add_argument("--max-images", type=int, default=None,
                   help="stop after writing this many images per process (continue later)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model on CUDA (faster)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
