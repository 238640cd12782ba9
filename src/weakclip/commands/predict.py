"""``weakclip predict``: masks and side-by-side overlays of images from a trained refinement model."""

from __future__ import annotations

import argparse
from pathlib import Path

from weakclip.commands.tta_flags import add_tta_flags, tta_overrides


def run(args: argparse.Namespace) -> int:
    import torch

    from weakclip.config import Config, apply_overrides
    from weakclip.errors import WeakclipError
    from weakclip.inference.loading import load_trained_model, normalization_of
    from weakclip.inference.predict import parse_labels, predict_images

    overrides = tta_overrides(args) + [f"pseudo.crf={args.crf}"]
    apply_overrides(Config(), overrides)  # bad values fail now, before the checkpoint is read
    if args.device == "cuda" and not torch.cuda.is_available():
        raise WeakclipError("--device cuda asked for, but no CUDA device is visible to PyTorch")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_trained_model(args.checkpoint, args.clip_weights, device=device)
    parse_labels(args.labels, cfg.classes)  # fail on an unknown name before reading any image
    settings = apply_overrides(cfg, overrides).pseudo
    mean, std = normalization_of(cfg)
    result = predict_images(model, args.images, cfg.classes, args.labels, args.out, settings,
                            kind=cfg.data.kind, mean=mean, std=std, progress=not args.quiet)
    n_fail = len(result["failures"])
    print(f"wrote {len(result['written'])} masks and overlays to {args.out}"
          + (f"; {n_fail} image(s) could not be read" if n_fail else ""))
    return 1 if n_fail else 0


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="masks and overlay images of a trained model's predictions",
        description="Predict a mask for each IMAGE with a trained WeakCLIP model (test-time settings: the "
                    "checkpoint's pseudo-mask section, each flag overriding one) and write OUT/<stem>.png "
                    "(VOC palette) and OUT/<stem>_overlay.png (image | colour overlay | legend: 3x the "
                    "image's width, same height).")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="training checkpoint (.pth), the training work folder (its latest checkpoint) "
                        "or an authors' release checkpoint (mmseg .pth; needs no --clip-weights)")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="the CLIP weights file the model was trained with")
    p.add_argument("--labels", default=None,
                   help="comma-separated class names in the images (e.g. cat,dog); default: all classes")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_tta_flags(p)  # each defaults to the checkpoint's `pseudo` section (its preset's)
    p.add_argument("--crf", choices=["none", "auto", "voc", "coco"], default="none",
                   help="dense-CRF post-processing (default none; auto: by the checkpoint's dataset)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--quiet", action="store_true", help="no per-image lines")
    p.set_defaults(func=run)
