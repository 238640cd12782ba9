"""``weakclip predict``: masks and side-by-side overlays of images from any trained network
(:func:`weakclip.api.load`: retrained DeepLab, refinement model, a ``weakclip run`` folder, the authors'
releases)."""

from __future__ import annotations

import argparse
from pathlib import Path

from weakclip.commands import lock_folder, output_files
from weakclip.commands.flags import add_classes, add_crf, add_device, add_stage
from weakclip.commands.tta_flags import add_tta_flags, tta_overrides

#: The flags that only the refinement model's sliding-window inference has.
_WINDOW_FLAGS = {"base_scale": "--base-scale", "crop": "--crop", "stride": "--stride", "average": "--average",
                 "size_divisor": "--size-divisor", "window_batch": "--window-batch", "amp": "--amp"}


def settings_changes(args: argparse.Namespace, kind: str) -> dict:
    """The test-time flags given, as :meth:`weakclip.api.Segmenter.configure` changes for a network of
    ``kind``; a window flag for a retrained network is a one-line error."""
    from weakclip.errors import WeakclipError

    changes: dict = {}
    if args.max_side is not None:
        changes["max_side"] = args.max_side
    if args.scales is not None:
        changes["scales"] = list(args.scales)
    if args.no_flip:
        changes["flip"] = False
    if kind in ("refinement", "release-refinement"):
        for flag in _WINDOW_FLAGS:
            if getattr(args, flag) is not None:
                changes[flag] = getattr(args, flag)
        if args.crf is not None:
            changes["crf"] = args.crf
        return changes
    given = [name for flag, name in _WINDOW_FLAGS.items() if getattr(args, flag) not in (None, False)]
    if given:
        raise WeakclipError(f"{', '.join(given)}: sliding-window settings of the refinement model; the "
                            f"{kind} network runs each scale on the whole image")
    if args.crf == "none":
        changes["crf"] = False
    elif args.crf in ("voc", "coco"):
        changes.update(crf=True, crf_params=args.crf)
    elif args.crf == "auto":
        changes["crf"] = True
    return changes


def run(args: argparse.Namespace) -> int:
    import torch

    from weakclip.api import load
    from weakclip.commands import report_failed_items
    from weakclip.config import Config, apply_overrides
    from weakclip.errors import WeakclipError
    from weakclip.predict_files import collect_images, predict_files

    apply_overrides(Config(), tta_overrides(args))  # bad values fail now, before the checkpoint is read
    if args.batch_size < 1:
        raise WeakclipError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise WeakclipError("--device cuda asked for, but no CUDA device is visible to PyTorch")
    images = collect_images(args.images, exclude=args.out)  # a missing path or empty folder fails first
    seg = load(args.checkpoint, args.device, stage=args.stage, best=args.best, clip_weights=args.clip_weights,
               classes=args.classes)
    seg.label_ids(args.labels)  # an unknown name fails before any image is read
    seg.configure(**settings_changes(args, seg.kind))
    if not args.quiet:
        print(f"loaded {seg.description}", flush=True)
    result = predict_files(seg, images, args.out, labels=args.labels, batch_size=args.batch_size,
                           json_path=args.json, progress=not args.quiet)
    failures = result["failures"]
    skipped = f" ({len(result['skipped'])} already there, skipped)" if result["skipped"] else ""
    memory = [p for p, why in failures.items() if why.startswith("out of memory")]
    unread = [p for p in failures if p not in memory]
    print(f"wrote {len(result['written'])} masks and overlays to {args.out}{skipped}"
          + (f"; {len(unread)} image(s) could not be read: {', '.join(unread)}" if unread else "")
          + (f"; {len(memory)} image(s) ran out of memory: {', '.join(memory)}" if memory else ""))
    return report_failed_items("predict", failures, len(images))


def register(sub) -> None:
    from weakclip.memory import DEFAULT_MAX_SIDE

    p = sub.add_parser(
        "predict", help="masks and overlay images of a trained network's predictions",
        description="Predict a mask for each IMAGE (folders are walked for images) with any trained "
                    "network: a retraining checkpoint or work folder, a `weakclip run` work folder (its "
                    "final network; --stage refine: the refinement model), a refinement checkpoint or work "
                    "folder, an ExCEL checkpoint or training folder, or the authors' released WeakCLIP or "
                    "DeepLab-v1 ResNet-38 checkpoint. "
                    "Test-time settings: the network's own evaluation settings (retrained: its eval section; "
                    "refinement model: its pseudo-mask section), each flag overriding one. Writes "
                    "OUT/<stem>.png (VOC palette) and OUT/<stem>_overlay.png (image | colour overlay | "
                    "legend: 3x the image's width); a rerun skips images whose two files exist.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE|FOLDER", help="image files or folders")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint file or work folder of any kind above (loaded with weights_only=True)")
    add_stage(p)
    p.add_argument("--best", action="store_true",
                   help="the work folder's checkpoints/best.pth (kept by periodic evaluation) instead of the "
                        "latest checkpoint")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="the CLIP weights file a refinement checkpoint was trained with (default: the file "
                        "it records; not used for networks that hold their towers or have none, which "
                        "says so)")
    add_classes(p)
    p.add_argument("--labels", default=None,
                   help="comma-separated class names in the images (e.g. cat,dog); default: all classes")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write each image's class pixel shares (and the settings used) to FILE")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images of one size through the network together (default 1: one at a time, a "
                        "retrained network's masks then exactly its evaluation's; larger batches change "
                        "probabilities by float rounding only)")
    p.add_argument("--max-side", type=int, default=None, metavar="PIXELS",
                   help=f"the longest side an image is processed at (default {DEFAULT_MAX_SIDE}; 0: the full "
                        "size). A larger image is shrunk for a retrained or ExCEL network (then its "
                        "scales, flip and CRF); the refinement model resizes each scale from the full image "
                        "by its base scale and bounds its probabilities and CRF to this size. Masks and "
                        "overlays are written at the full size. Memory grows with its square: a photo of 48 "
                        "MP at the default peaks at a few GB on a CPU (benchmarks/README.md); an image that "
                        "runs out of memory is listed as failed with the value to set, and the others are "
                        "written")
    add_tta_flags(p)  # each defaults to the network's own settings
    add_crf(p, "dense-CRF post-processing: auto (on, the network's own parameters), voc or coco (on, those "
               "parameters) or none (default: the network's own)")
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or loading line")
    p.set_defaults(func=run)
    lock_folder(p, "out")
    output_files(p, "json")
