"""The test-time flags ``pseudo-masks`` and ``predict`` share: each overrides one setting of the
checkpoint's ``pseudo`` config section (its preset's: the release's for ``voc`` / ``coco``)."""

from __future__ import annotations

import argparse

from weakclip.commands.flags import add_amp


def add_tta_flags(p: argparse.ArgumentParser) -> None:
    """Scales, windows, their averaging and batches, flip and amp; each defaults to the checkpoint's."""
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="test scales, ratios of the base scale (default: the checkpoint's; the release: "
                        "0.5 ... 1.75)")
    p.add_argument("--base-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="base resize scale, aspect kept (the release: 2048 512)")
    p.add_argument("--crop", type=int, default=None, help="sliding-window size (the release: 512)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (the release: 341)")
    p.add_argument("--average", choices=["logits", "probs"], default=None,
                   help="average window logits (the release) or window softmaxes (-plus)")
    p.add_argument("--size-divisor", type=int, default=None,
                   help="pad windows to a multiple of this (the release: 1, no padding; -plus: 32)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    p.add_argument("--window-batch", type=int, default=None,
                   help="sliding windows per forward pass, from any scale and flip (0: as many as the free "
                        "GPU memory allows; the release: 1)")
    add_amp(p, "autocast of the model on CUDA: bf16, fp16 or none (default: the checkpoint's, none; faster)",
            bare="bf16")


def tta_overrides(args: argparse.Namespace) -> list[str]:
    """The flags of :func:`add_tta_flags` that were given, as ``pseudo.*`` overrides."""
    out = []
    if args.scales is not None:
        out.append("pseudo.scales=" + ",".join(str(s) for s in args.scales))
    if args.base_scale is not None:
        out.append(f"pseudo.base_scale={args.base_scale[0]},{args.base_scale[1]}")
    for flag in ("crop", "stride", "window_batch", "average", "size_divisor"):
        if getattr(args, flag) is not None:
            out.append(f"pseudo.{flag}={getattr(args, flag)}")
    if args.no_flip:
        out.append("pseudo.flip=false")
    if args.amp is not None:
        out.append(f"pseudo.amp={args.amp}")
    return out
