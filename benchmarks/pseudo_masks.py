"""Seconds per image of pseudo-mask generation: model inference and full-resolution CRF, timed apart.

Model: the full-size ViT-B/16 refinement model with RANDOM weights (the cost does not depend on the
values), VOC's 21 classes, through :func:`weakclip.inference.sliding.multiscale_inference` at the
release's settings (sliding window 512 / stride 341; scales 0.5 ... 1.75 of (2048, 512), each with a
flip: 52 windows for a 500 x 375 image). ``--quick`` uses scale 1.0 + flip (4 windows) instead.
CRF: :func:`weakclip.crf.dense_crf_numpy` on the 500 x 375 image at VOC's parameters, with all 21
classes (``--no-restrict``, as the release) and with 3 classes (background + 2 labels, our default
label restriction). Runs on CPU and, when one is visible, CUDA (model only; the CRF is CPU code).

    python benchmarks/pseudo_masks.py --quick        # a couple of minutes on 2 CPU cores
    python benchmarks/pseudo_masks.py                # release settings (slow on CPU)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from weakclip.crf import VOC_CRF, dense_crf_numpy
from weakclip.data.classes import VOC_CLASSES
from weakclip.inference.sliding import RELEASE_SCALES, multiscale_inference, scaled_size, window_grid
from weakclip.models.weakclip import ModelConfig, build_model


def _image(h: int, w: int) -> np.ndarray:
    """A smooth synthetic photo-like image (the CRF's cost depends a little on the colours)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 37 + c) * np.cos(yy / 29 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _windows(h: int, w: int, scales, flip: bool) -> int:
    n = sum(len(window_grid(*scaled_size(h, w, s), 512, 341)) for s in scales)
    return n * (2 if flip else 1)


def _time_model(device: torch.device, image: np.ndarray, scales, repeats: int, window_batch: int,
                amp: bool) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(), VOC_CLASSES, pretrained_download=False, device=device).eval()
    dtype = torch.bfloat16 if (amp and device.type == "cuda") else None
    with torch.inference_mode():  # warm-up: one window (kernels, allocator, the cached text embeddings)
        model(torch.zeros(1, 3, 512, 512, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        multiscale_inference(model, image, scales, True, 512, 341, device=device, window_batch=window_batch,
                             autocast_dtype=dtype).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _time_crf(image: np.ndarray, k: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(k), size=image.shape[:2]).transpose(2, 0, 1).astype(np.float32)
    dense_crf_numpy(image, probs, VOC_CRF)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        dense_crf_numpy(image, probs, VOC_CRF)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="scale 1.0 + flip instead of the 6 release scales")
    parser.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=1, help="timed images on CPU (after a warm-up window)")
    parser.add_argument("--gpu-repeats", type=int, default=5, help="timed images on CUDA")
    parser.add_argument("--crf-repeats", type=int, default=3, help="timed CRF runs")
    parser.add_argument("--window-batch", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = (1.0,) if args.quick else RELEASE_SCALES
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    h, w = args.size
    image = _image(h, w)
    n_windows = _windows(h, w, scales, True)
    load_before = os.getloadavg()[0]
    rows = []
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"cpu x{torch.get_num_threads()} threads"
        repeats = max(1, args.gpu_repeats if device.type == "cuda" else args.repeats)
        secs = _time_model(device, image, scales, repeats, args.window_batch, args.amp)
        what = f"model, {len(scales)} scale(s) + flip ({n_windows} windows)"
        rows.append((label, what, secs))
        print(f"  {label}: {what}: {secs:.3f} s/image", flush=True)
    crf_cases = ((len(VOC_CLASSES), "CRF, 21 classes (--no-restrict)"), (3, "CRF, 3 classes (restricted)"))
    for k, what in crf_cases:
        secs = _time_crf(image, k, max(1, args.crf_repeats))
        rows.append(("cpu (pydensecrf2, 1 thread)", what, secs))
        print(f"  {what}: {secs:.3f} s/image", flush=True)
    print(f"\nPseudo masks, WeakCLIP ViT-B/16 (random weights), {w}x{h} image, crop 512 stride 341, "
          f"scales {', '.join(f'{s:g}' for s in scales)} + flip; VOC CRF 10 iterations "
          f"(torch {torch.__version__})")
    print(f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs; other processes slow the wall-clock figures)")
    print(f"{'device':<30}  {'stage':<46}  {'s/image':>8}")
    for label, what, secs in rows:
        print(f"{label:<30}  {what:<46}  {secs:8.3f}")


if __name__ == "__main__":
    main()
