"""Seconds per image of the built-in CLIP-ES style seeds (``weakclip seeds``) on a full-size ViT-B/16.

Random weights (the cost does not depend on the values), VOC's 20 classes plus the 25 background
prompts, VOC-sized images (500 x 375 by default) with one to three labelled classes. Times the whole
``seeder.cams_and_keys_batch`` + ``seed_from`` per image after one warm-up batch, one image at a time
and in batches of ``--batch-size`` (the command's default, 8), on CPU and, when one is visible, on
CUDA. Prints a table.

    python benchmarks/seeds.py                       # default settings, CPU (+ CUDA when present)
    python benchmarks/seeds.py --images 3 --multiscale
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from weakclip.data.classes import VOC_CLASSES
from weakclip.models.clip import build_clip
from weakclip.seeds.clip_es import ClipEsConfig, ClipEsSeeder


def _images(n: int, height: int, width: int) -> list[tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        labels = rng.choice(np.arange(1, len(VOC_CLASSES)), size=int(rng.integers(1, 4)), replace=False)
        out.append((image, sorted(int(c) for c in labels)))
    return out


def _time(seeder: ClipEsSeeder, images, device: torch.device, batch: int = 1) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per image, after one warm-up batch; ``batch`` images of the
    (one) size go through ``cams_and_keys_batch`` together, as ``weakclip seeds --batch-size`` does."""
    def run(chunk):
        results = seeder.cams_and_keys_batch([im for im, _ in chunk], [lab for _, lab in chunk])
        for cams, keys in results:
            seeder.seed_from(cams, keys)

    run(images[:batch])  # warm-up (allocator, kernels), not timed
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timed = images[batch:]
    start, cpu_start = time.perf_counter(), time.process_time()
    for k in range(0, len(timed), batch):
        run(timed[k:k + batch])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(timed), (time.process_time() - cpu_start) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="timed images per setting (after 1 warm-up)")
    parser.add_argument("--gpu-images", type=int, default=20, help="timed images per setting on CUDA")
    parser.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    parser.add_argument("--multiscale", action="store_true", help="also time scales 0.75,1,1.25 + flip")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch of the batched rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    settings = [("default (scale 1.0, CAA)", ClipEsConfig())]
    if args.multiscale:
        settings.append(("scales 0.75,1,1.25 + flip", ClipEsConfig(scales=(0.75, 1.0, 1.25), flip=True)))
    h, w = args.size
    load_before = os.getloadavg()[0]
    rows = []
    for name in devices:
        device = torch.device(name)
        torch.manual_seed(0)
        image_tower, text_tower = build_clip("ViT-B/16", pretrained_download=False, device=device)
        n = max(1, args.gpu_images if device.type == "cuda" else args.images)
        batches = sorted({1, max(1, args.batch_size)})
        if device.type == "cuda":
            label = torch.cuda.get_device_name(device)
        else:
            label = f"cpu x{torch.get_num_threads()} threads"
        for setting, config in settings:
            seeder = ClipEsSeeder(image_tower, VOC_CLASSES, text_tower=text_tower, config=config)
            for batch in batches:
                timed = max(n, batch)
                wall, cpu = _time(seeder, _images(timed + batch, h, w), device, batch)
                rows.append((label, f"{setting}, batch {batch}", wall, cpu, timed))
                print(f"  {label}: {setting}, batch {batch}: {wall:.3f} s/image ({cpu:.3f} CPU s)",
                      flush=True)
    print(f"\nCLIP-ES style seeds, ViT-B/16, {w}x{h} images, 1-3 labels each (torch {torch.__version__})")
    print(f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs; other processes slow the wall-clock column)")
    print(f"{'device':<28}  {'setting':<37}  {'s/image':>8}  {'CPU s/img':>9}  {'images':>6}")
    for label, setting, wall, cpu, n in rows:
        print(f"{label:<28}  {setting:<37}  {wall:8.3f}  {cpu:9.3f}  {n:6d}")


if __name__ == "__main__":
    main()
