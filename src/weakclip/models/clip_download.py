"""OpenAI's CLIP weights when none are given: downloaded through open_clip (OpenAI's own TorchScript
file first, then open_clip's Hugging Face copy), or a one-line WeightsError saying what to supply when
offline or when ``WEAKCLIP_OFFLINE=1``."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from os import PathLike
from pathlib import Path

from weakclip.errors import WeightsError
from weakclip.models.clip_arch import ClipArch

__all__ = ["OFFLINE_ENV", "RELEASES", "download_openai_weights"]

OFFLINE_ENV = "WEAKCLIP_OFFLINE"

# arch name -> (open_clip model name, OpenAI's release file, Hugging Face repository)
RELEASES: dict[str, tuple[str, str, str]] = {
    "ViT-B/16": ("ViT-B-16", "ViT-B-16.pt", "openai/clip-vit-base-patch16"),
    "ViT-B/32": ("ViT-B-32", "ViT-B-32.pt", "openai/clip-vit-base-patch32"),
    "ViT-L/14": ("ViT-L-14", "ViT-L-14.pt", "openai/clip-vit-large-patch14"),
    "ViT-L/14@336px": ("ViT-L-14-336", "ViT-L-14-336px.pt", "openai/clip-vit-large-patch14-336"),
}


def _supply_hint(arch: ClipArch) -> str:
    open_clip_name, release_file, hf_repo = RELEASES.get(arch.name, ("ViT-B-16", "ViT-B-16.pt", ""))
    return (
        f"pass --clip-weights with OpenAI's {release_file} (TorchScript, from the openai/CLIP release), "
        f"an open_clip state dict for {open_clip_name}, or a Hugging Face {hf_repo} folder"
    )


def _open_clip_download(arch: ClipArch) -> str:
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(RELEASES[arch.name][0], "openai")
    if not cfg:
        raise RuntimeError(f"open_clip knows no OpenAI weights for {arch.name}")
    try:  # OpenAI's own TorchScript file first (the release's), then open_clip's Hugging Face copy
        target = download_pretrained(cfg, prefer_hf_hub=False)
    except Exception:
        socket.getaddrinfo("huggingface.co", 443)  # offline: fail now (the hub client retries for a minute)
        target = download_pretrained(cfg, prefer_hf_hub=True)
    if not target:
        raise RuntimeError("open_clip returned no file")
    return target


def download_openai_weights(
    arch: ClipArch, *, downloader: Callable[[ClipArch], str | PathLike] | None = None
) -> Path | None:
    """Download OpenAI's weights for ``arch`` through open_clip (or ``downloader``); None for archs
    without an OpenAI release (e.g. "tiny"). WeightsError saying what to supply when offline
    (also when WEAKCLIP_OFFLINE=1, which skips the attempt)."""
    if arch.name not in RELEASES:
        return None
    if downloader is None and os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        raise WeightsError(
            f"no CLIP weights given and download skipped ({OFFLINE_ENV}=1): {_supply_hint(arch)}"
        )
    try:
        return Path((downloader or _open_clip_download)(arch))
    except Exception as err:
        raise WeightsError(
            f"no CLIP weights given and download failed (offline?): {_supply_hint(arch)}"
        ) from err
