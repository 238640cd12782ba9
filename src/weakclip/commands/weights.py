"""``weakclip weights FILE``: which CLIP weights a file holds."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from weakclip.models.clip_weights import describe_weights

    info = describe_weights(args.file)
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("weights", help="identify a CLIP weights file: its format and architecture",
                       description="Reads a CLIP weights file (or Hugging Face folder) and prints its "
                                   "format, architecture, image size, text tower, activation, parameter "
                                   "count and dtypes: what --clip-weights will load.")
    p.add_argument("file", type=Path, help="OpenAI .pt, open_clip state dict, or HF CLIPModel folder")
    p.set_defaults(func=run)
