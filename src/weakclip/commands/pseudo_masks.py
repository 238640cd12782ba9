"""``weakclip pseudo-masks``: pseudo masks of a dataset split from a trained refinement model (WeakCLIP's,
here), or from another method's network through its ``"pseudo_masks"`` entry point (:mod:`weakclip.methods`;
ExCEL: a checkpoint, training work folder or ``weakclip run`` work folder of ExCEL)."""

from __future__ import annotations

import argparse
from pathlib import Path

from weakclip.commands import lock_folder
from weakclip.commands.flags import add_classes, add_crf, add_dataset, add_device, add_renamed
from weakclip.commands.tta_flags import add_tta_flags, tta_overrides


def _pseudo_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as overrides of the checkpoint's ``pseudo`` section (its preset's settings)."""
    out = tta_overrides(args)
    for flag, key in (("crf_workers", "crf_workers"), ("batch_size", "image_batch"),
                      ("crf_backend", "crf_backend")):
        if getattr(args, flag) is not None:
            out.append(f"pseudo.{key}={getattr(args, flag)}")
    if args.crf is not None:
        out.append(f"pseudo.crf={args.crf}")
    if args.restrict and args.no_restrict:
        from weakclip.errors import WeakclipError

        raise WeakclipError("--restrict and --no-restrict exclude each other")
    if args.restrict or args.no_restrict:
        out.append(f"pseudo.restrict_to_labels={'true' if args.restrict else 'false'}")
    return out


def _network_method(path: Path):
    """``(method, raw)``: the method of the network at ``path`` (:mod:`weakclip.methods`) and, when ``path``
    is a file, what it holds (read once, handed on). A ``weakclip run`` work folder and a training work
    folder name their method in ``run.json`` / ``config.yaml``; a folder without either, WeakCLIP's (whose
    loader then says what is missing)."""
    from weakclip.engine.checkpoint import read_checkpoint_file
    from weakclip.methods import DEFAULT_METHOD, get, of_checkpoint, of_folder

    if path.is_file():
        raw = read_checkpoint_file(path)
        return of_checkpoint(raw), raw
    found = of_folder(path) if path.is_dir() else None
    return found or get(DEFAULT_METHOD), None


def _run_method(method, args: argparse.Namespace) -> int:
    """Another method's network: its ``"pseudo_masks"`` entry point."""
    from weakclip.commands import report_failed_items
    from weakclip.distributed import cleanup, init_distributed
    from weakclip.methods import entry

    job = entry(method, "pseudo_masks")
    info = init_distributed(args.device)
    try:
        summary = job(args, info)
    finally:
        cleanup()
    return report_failed_items("pseudo-masks", summary["failures"], summary["images"], info.is_main)


def run(args: argparse.Namespace) -> int:
    from weakclip.commands import folder_default_split, report_failed_items
    from weakclip.config import Config, apply_overrides
    from weakclip.data.classes import given_classes
    from weakclip.data.datasets import build_dataset
    from weakclip.distributed import cleanup, init_distributed
    from weakclip.errors import WeakclipError
    from weakclip.inference.loading import load_trained_model, normalization_of
    from weakclip.inference.pseudo_masks import format_summary, generate_pseudo_masks
    from weakclip.methods import DEFAULT_METHOD

    overrides = _pseudo_overrides(args)
    apply_overrides(Config(), overrides)  # bad values fail now, before the checkpoint is read
    method, raw = _network_method(args.checkpoint)
    if method.name != DEFAULT_METHOD:
        return _run_method(method, args)
    info = init_distributed(args.device)
    try:
        model, cfg = load_trained_model(args.checkpoint, args.clip_weights, device=info.device,
                                        best=args.best, raw=raw, classes=given_classes(args.classes))
        settings = apply_overrides(cfg, overrides).pseudo  # typed and checked: one-line errors
        kind = args.dataset or cfg.data.kind
        root = args.data_root
        if not root.exists():
            raise WeakclipError(f"dataset folder not found: {root}")
        split = args.split
        if kind == "folder" and split is None:
            split = folder_default_split("weakclip pseudo-masks", root, "training", "training split")
        dataset = build_dataset(kind, root, split=split, image_reader=cfg.data.image_reader,
                                image_orientation=cfg.data.image_orientation)
        if len(dataset.classes) != len(cfg.classes):
            raise WeakclipError(f"the model was trained on {len(cfg.classes)} classes, the dataset at "
                                f"{root} has {len(dataset.classes)}")
        mean, std = normalization_of(cfg)
        summary = generate_pseudo_masks(model, dataset, args.out, settings, mean=mean, std=std, kind=kind,
                                        save_probs=args.save_probs, limit=args.max_images,
                                        progress=not args.quiet)
        if info.is_main:
            print(format_summary(summary))
    finally:
        cleanup()
    return report_failed_items("pseudo-masks", summary["failures"], summary["images"], info.is_main)


def register(sub) -> None:
    p = sub.add_parser(
        "pseudo-masks", help="pseudo masks of a dataset split from a trained model (TTA, labels, CRF)",
        description="Multi-scale + flip sliding-window inference of a trained WeakCLIP model over a "
                    "dataset split with the settings of the checkpoint's preset (the release's for voc and "
                    "coco), then the full-resolution dense CRF in worker processes. Writes OUT/<id>.png (VOC "
                    "palette), OUT/no_crf/<id>.png and, with --save-probs, OUT/probs/<id>.npz. Resumable "
                    "(existing masks are skipped); runs sharded under torchrun; with ground truth it prints "
                    "the mIoU before and after CRF. An ExCEL network (checkpoint, training work folder or "
                    "weakclip run folder of ExCEL) gives its masks with the release's test-time settings of "
                    "its preset (tools/infer_seg_voc.py / infer_seg_coco.py: square 320, scales 0.7-1.5 with "
                    "flips, CRF as the preset: VOC off, COCO on); of the flags below it takes --scales (its "
                    "own scale ratios), --no-flip, --crf none|auto (voc, coco: on), --best, --max-images.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="training checkpoint (.pth), the training work folder (its latest checkpoint) "
                        "or an authors' release checkpoint (mmseg .pth; needs no --clip-weights); ExCEL: "
                        "its checkpoint, training work folder or weakclip run work folder")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="the CLIP weights file the model was trained with (default: the file it records; "
                        "not used for checkpoints that hold the towers, which says so)")
    add_classes(p)
    p.add_argument("--data-root", required=True, type=Path,
                   help="dataset root (VOC2012, prepared COCO, folder)")
    add_dataset(p, "the one the model was trained on")
    p.add_argument("--split", default=None,
                   help="split name or id-list file (default: the dataset's training split: VOC train_aug, "
                        "COCO train2014, folder: splits/train.txt when present, else every labelled image)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--best", action="store_true",
                   help="with a work folder: its checkpoints/best.pth (train.eval_every), not the latest")
    add_tta_flags(p)  # each defaults to the checkpoint's `pseudo` section (its preset's)
    add_crf(p, "dense CRF of the masks: auto (coco parameters for COCO, voc otherwise), voc, coco, or none "
               "(OUT/<id>.png is then the model's mask; default: the checkpoint's)")
    add_renamed(p, "--no-crf", "--crf none", "crf", value="none")
    p.add_argument("--restrict", action="store_true",
                   help="keep only each image's labels (+ background), renormalised (-plus)")
    p.add_argument("--no-restrict", action="store_true",
                   help="all classes; the CRF gets the argmax's classes (the release)")
    p.add_argument("--save-probs", action="store_true",
                   help="also write OUT/probs/<id>.npz (float16 probabilities of the kept classes)")
    p.add_argument("--crf-backend", choices=["pydensecrf", "auto", "lattice"], default=None,
                   help="pydensecrf2 in CPU workers (the release), auto (our lattice on the GPU where the "
                        "model runs, batched; pydensecrf2 on a CPU) or lattice")
    p.add_argument("--crf-workers", type=int, default=None,
                   help="CRF worker processes per process (0 = run the CRF inline)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images whose windows share forward passes (pseudo.image_batch; the release: 1)")
    add_renamed(p, "--image-batch", "--batch-size", "batch_size", type=int)
    p.add_argument("--max-images", type=int, default=None,
                   help="stop after writing this many images per process (continue later)")
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    lock_folder(p, "out")
