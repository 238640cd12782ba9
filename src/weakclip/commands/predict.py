"""``weakclip predict``: masks and side-by-side overlays of images from a trained refinement model."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    import torch

    from weakclip.errors import WeakclipError
    from weakclip.inference.loading import load_trained_model, normalization_of
    from weakclip.inference.predict import parse_labels, predict_images

    if args.device == "cuda" and not torch.cuda.is_available():
        raise WeakclipError("--device cuda asked for, but no CUDA device is visible to PyTorch")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_trained_model(args.checkpoint, args.clip_weights, device=device)
    parse_labels(args.labels, cfg.classes)  # fail on an unknown name before reading any image
    crf = None
    if args.crf != "none":
        from weakclip.crf import COCO_CRF, VOC_CRF

        crf = COCO_CRF if args.crf == "coco" else VOC_CRF
    mean, std = normalization_of(cfg)
    result = predict_images(model, args.images, cfg.classes, args.labels, args.out, scales=args.scales,
                            flip=not args.no_flip, crop=args.crop, stride=args.stride,
                            base_scale=tuple(args.base_scale), mean=mean, std=std, crf_params=crf,
                            progress=not args.quiet)
    n_fail = len(result["failures"])
    print(f"wrote {len(result['written'])} masks and overlays to {args.out}"
          + (f"; {n_fail} image(s) could not be read" if n_fail else ""))
    return 1 if n_fail else 0


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="masks and overlay images of a trained model's predictions",
        description="Predict a mask for each IMAGE with a trained WeakCLIP model and write OUT/<stem>.png "
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
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
                   help="ratios of the base scale (default: the release's)")
    p.add_argument("--base-scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="base resize scale, aspect kept (default 2048 512)")
    p.add_argument("--crop", type=int, default=512, help="sliding-window size (default 512)")
    p.add_argument("--stride", type=int, default=341, help="sliding-window stride (default 341)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    p.add_argument("--crf", choices=["none", "voc", "coco"], default="none",
                   help="dense-CRF post-processing (default none)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--quiet", action="store_true", help="no per-image lines")
    p.set_defaults(func=run)
