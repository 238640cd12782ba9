"""One command, one table: each stage's speed on the release's path and on our fastest settings.

For every stage the suite runs the authors' path (the ``voc`` preset as the release runs it) and our
faster settings side by side in the same process, and prints images/s, peak memory and the ratio
to the release's row (> 1: faster than the release). Stages (``--only`` picks some):

  seeds     CLIP-ES seeds (ViT-B/16) of 500x375 images; release: one image at a time; ours: batches of
            images (8 on GPU; 1 on CPU, where batching measured slower)
  train     one refinement training step (ViT-B/16, 21 classes) at batch 8 of 512x512 (--cpu: batch 1
            of 256x256); release (the voc preset): fp32, the towers in the optimizer with gradients,
            BN in train mode, explicit attention, the boundary-loss CRF target as the release (scipy
            zoom, uint8, pydensecrf2 per image); ours (voc-plus): frozen towers without autograd,
            scaled_dot_product_attention, bf16 on GPU, the loss's CRF through dense_crf
  masks     pseudo masks of one 500x375 image at the release's six scales with flip (--cpu: scale
            1.0 + flip), model and full-resolution CRF; release (voc): one window at a time, fp32,
            logits averaged, CRF of the argmax's classes with pydensecrf2; ours (voc-plus): the
            windows of all scales and flips batched (window_batch 0: as many as the free memory
            allows on GPU, 1 on CPU), bf16 on GPU, CRF of the image's labels (+ background) through
            dense_crf on the device; on GPU a further row with 4 images (image_batch) sharing batches
  crf64     dense CRF of the boundary loss: 16 maps of 64x64, 21 classes, training parameters;
            release: pydensecrf2 per image on the CPU; ours: every backend of weakclip.crf.dense_crf
            (exact N x N kernels, the PyTorch permutohedral lattice, pydensecrf2, and "auto")
  crffull   full-resolution CRF of the pseudo masks: 500x375, 21 classes, VOC parameters;
            release: pydensecrf2 per image; ours: the lattice batched on the device, and "auto"

Models have RANDOM weights (speed does not depend on them) and are built from ``load_preset("voc")``
with the overrides named above, so the rows follow the preset as it is.
Inputs are real photos (scikit-image's sample images, resized) with photo-like probability maps
(blurred, shifted, noisy regions of the photo); without scikit-image, a smooth synthetic image.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the row; on CPU the growth of the
process's resident memory over the row, warm-up included (sampled every 2 ms), both in MiB.
Each row runs once to warm up, then ``--repeats`` times; the figure is the best of those (the
least disturbed by other processes on a shared machine).

    python benchmarks/suite.py            # on the GPU (at most a few minutes on one GPU)
    python benchmarks/suite.py --cpu      # CPU only, smaller batches (machines without a GPU)
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.data.classes import VOC_CLASSES

STAGES = ("seeds", "train", "masks", "crf64", "crffull")


# ----------------------------------------------------------------------------------------------
# Measurement


class PeakMemory:
    """Peak memory over a block, MiB: CUDA allocations, or growth of the resident set on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss_bytes() -> int:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # not Linux: no per-row figure
            return 0

    def _sample(self, start: int) -> None:
        peak = start
        while not self._stop.wait(0.002):
            peak = max(peak, self._rss_bytes())
        peak = max(peak, self._rss_bytes())
        self.peak_mib = (peak - start) / 2**20

    def __enter__(self) -> PeakMemory:
        _release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, args=(self._rss_bytes(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def _release_free_heap() -> None:
    """Hand freed heap pages back to the system (glibc), so a row's resident growth is its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Row:
    stage: str
    path: str  # "release" or "ours"
    setting: str
    device: str
    images: int
    seconds: float
    peak_mib: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def measure(stage: str, path: str, setting: str, device: torch.device, images: int,
            fn: Callable[[], object], repeats: int) -> Row:
    """Best wall time of ``repeats`` calls of ``fn`` (after one warm-up call) and the peak memory
    (warm-up included)."""
    best = float("inf")
    with PeakMemory(device) as mem:
        fn()
        for _ in range(max(1, repeats)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    row = Row(stage, path, setting, str(device), images, best, mem.peak_mib)
    print(f"  {stage:<9} {path:<8} {setting:<68} {row.images_per_s:9.3f} images/s", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# Inputs


def photo_batch(n: int, h: int, w: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n photos resized to h x w (n x 3 x h x w, 0..255) and photo-like k-class probabilities."""
    try:
        from skimage import data

        photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    except ImportError:  # scikit-image is a dev extra: fall back to a smooth synthetic image
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        photos = [np.stack([128 + 100 * np.sin(xx / 37 + c) * np.cos(yy / 29 - c) for c in range(3)], -1)]
    g = torch.Generator().manual_seed(seed)
    images, probs = [], []
    for i in range(n):
        rgb = torch.from_numpy(np.ascontiguousarray(photos[i % len(photos)])).permute(2, 0, 1).float()[None]
        image = F.interpolate(rgb, (h, w), mode="bilinear", antialias=True).clamp(0, 255).round()
        grey = F.avg_pool2d(image.mean(1, keepdim=True), 5, 1, 2, count_include_pad=False)[0, 0]
        edges = torch.quantile(grey.flatten()[::7], torch.linspace(0, 1, 5)[1:-1])
        labels = torch.bucketize(grey, edges) * ((k - 1) // 4) + i % 2  # 4 regions, spread over k
        onehot = F.one_hot(labels.clamp_max(k - 1), k).permute(2, 0, 1).float()[None]
        shift = max(1, min(h, w) // 32)
        onehot = torch.roll(onehot, shifts=(shift, -shift), dims=(2, 3))
        logits = 3 * F.avg_pool2d(onehot, 7, 1, 3, count_include_pad=False)
        probs.append((logits + 1.2 * torch.randn(1, k, h, w, generator=g)).softmax(1))
        images.append(image)
    return torch.cat(probs), torch.cat(images)


# ----------------------------------------------------------------------------------------------
# Stages


def _photos_uint8(n: int, h: int, w: int) -> list[np.ndarray]:
    _, images = photo_batch(n, h, w, 2)
    return [im.permute(1, 2, 0).to(torch.uint8).numpy() for im in images]


def seeds_rows(device: torch.device, args) -> list[Row]:
    from weakclip.models.clip import build_clip
    from weakclip.seeds.clip_es import ClipEsConfig, ClipEsSeeder

    torch.manual_seed(0)
    image_tower, text_tower = build_clip("ViT-B/16", pretrained_download=False, device=device)
    seeder = ClipEsSeeder(image_tower, VOC_CLASSES, text_tower=text_tower, config=ClipEsConfig())
    n = args.seed_images
    images = _photos_uint8(n, 375, 500)
    labels = [[1 + i % 20, 1 + (i * 7 + 3) % 20] for i in range(n)]

    def run(batch: int) -> None:
        for k in range(0, n, batch):
            for cams, keys in seeder.cams_and_keys_batch(images[k:k + batch], labels[k:k + batch]):
                seeder.seed_from(cams, keys)

    ours = args.seed_batch or (8 if device.type == "cuda" else 1)
    return [measure("seeds", "release", f"CLIP-ES, one image at a time, {n} x 500x375", device, n,
                    lambda: run(1), args.repeats),
            measure("seeds", "ours", f"batches of {ours} images" if ours > 1 else
                    "one image at a time (batching measured slower on CPU)", device, n, lambda: run(ours),
                    args.repeats)]


def train_rows(device: torch.device, args) -> list[Row]:
    import sys

    from weakclip.config import load_preset
    from weakclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from weakclip.engine.trainer import optimizer_groups, train_step
    from weakclip.losses import WeakCLIPLoss
    from weakclip.models.weakclip import build_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import explicit_attention  # benchmarks/train_step.py

    cuda = device.type == "cuda"
    batch = args.train_batch or (8 if cuda else 1)
    crop = args.train_crop or (512 if cuda else 256)
    classes = list(VOC_CLASSES)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=g).to(device)
    seeds = torch.randint(0, len(classes), (batch, crop, crop), generator=g)
    seeds[:, : crop // 4] = 255
    seeds = seeds.to(device)

    def setup(preset: str):
        """Model, loss and AdamW (the preset's groups) of one preset."""
        cfg = load_preset(preset)
        torch.manual_seed(0)
        model = build_model(cfg.model, classes, pretrained_download=False).to(device).train()
        loss = WeakCLIPLoss(loss_size=cfg.loss.loss_size, identity_weight=cfg.loss.identity_weight,
                            boundary_crf=cfg.loss.boundary_crf, identity_mean=cfg.loss.identity_mean)
        groups = optimizer_groups(model, cfg.train.weight_decay, tower_lr_mult=cfg.train.tower_lr_mult,
                                  adapter_lr_mult=cfg.train.adapter_lr_mult)
        return model, loss.to(device), torch.optim.AdamW(groups, lr=cfg.train.lr,
                                                          weight_decay=cfg.train.weight_decay)

    rows = []
    what = f"batch {batch} of {crop}x{crop}"
    # the release (voc): towers in the optimizer with gradients, BN in train mode, explicit attention, fp32,
    # the boundary-loss CRF target made as the release (scipy zoom, uint8, pydensecrf2 per image)
    model, loss, opt = setup("voc")

    def release() -> None:
        with explicit_attention(True):
            train_step(model, loss, opt, images, seeds, mean, std)

    rows.append(measure("train", "release", f"fp32, towers train, release CRF target, {what}", device, batch,
                        release, args.repeats))
    del model, loss, opt
    # ours (voc-plus): frozen towers without autograd, sdpa, dense_crf, bf16 on GPU
    model, loss, opt = setup("voc-plus")

    def ours() -> None:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
        train_step(model, loss, opt, images, seeds, mean, std, autocast=autocast)

    rows.append(measure("train", "ours", f"voc-plus: frozen no-grad, sdpa{', bf16' if cuda else ''}, "
                        f"dense_crf, {what}", device, batch, ours, args.repeats))
    return rows


def masks_rows(device: torch.device, args) -> list[Row]:
    from weakclip.config import load_preset
    from weakclip.crf import VOC_CRF, dense_crf, dense_crf_numpy
    from weakclip.inference.batching import WindowRunner
    from weakclip.inference.pseudo_masks import argmax_probs, restrict_probs
    from weakclip.inference.sliding import multiscale_inference, multiscale_inference_batch
    from weakclip.models.weakclip import build_model

    cuda = device.type == "cuda"
    labels = np.zeros(len(VOC_CLASSES), np.float32)
    labels[[8, 15]] = 1  # the image's labels (cat, person)

    def build(preset: str):
        cfg = load_preset(preset)
        torch.manual_seed(0)
        model = build_model(cfg.model, list(VOC_CLASSES), pretrained_download=False).to(device).eval()
        p = cfg.pseudo
        scales = p.scales if not args.cpu else (1.0,)
        return model, p, scales

    model_r, p_r, scales = build("voc")
    model_o, p_o, _ = build("voc-plus")
    group = args.mask_images or (p_o.image_batch if cuda else 1)
    images = _photos_uint8(max(1, group), 375, 500)

    def release() -> None:  # one image and one window at a time, fp32; the CRF over the argmax's classes
        with torch.inference_mode():
            probs = multiscale_inference(model_r, images[0], scales, True, device=device, window_batch=1,
                                         average=p_r.average, size_divisor=p_r.size_divisor)
            _, kept = argmax_probs(probs.cpu().numpy())
            dense_crf_numpy(images[0], kept, VOC_CRF)

    window_batch = args.window_batch if args.window_batch is not None else p_o.window_batch
    runner = WindowRunner(model_o, len(VOC_CLASSES), window_batch=window_batch,
                          autocast_dtype=p_o.autocast_dtype(device))

    def ours(batch: list[np.ndarray]) -> Callable[[], None]:
        def run() -> None:  # the windows of all images, scales and flips batched; the CRF on the device
            with torch.inference_mode():
                all_probs = multiscale_inference_batch(model_o, batch, scales, True, device=device,
                                                       window_batch=runner, average=p_o.average,
                                                       size_divisor=p_o.size_divisor)
                for image, probs in zip(batch, all_probs):
                    _, kept = restrict_probs(probs, labels)
                    rgb = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float()
                    dense_crf(kept[None], rgb, VOC_CRF).argmax(1).cpu()
        return run

    what = f"{len(scales)} scale(s) + flip"
    rows = [measure("masks", "release", f"1 x {what}, 1 window, fp32, CRF of the argmax classes", device, 1,
                    release, args.repeats)]
    with torch.inference_mode():
        limit = runner.resolve(device, (p_o.crop, p_o.crop))  # window_batch 0: from free memory, untimed
    amp = ", bf16" if p_o.autocast_dtype(device) is not None else ""
    for n in sorted({1, group}):
        rows.append(measure("masks", "ours", f"voc-plus: {n} x {what}, {limit} windows{amp}, CRF 3 classes "
                            "on device", device, n, ours(images[:n]), args.repeats))
    return rows


def crf_rows(stage: str, device: torch.device, args) -> list[Row]:
    from weakclip.crf import TRAIN_CRF, VOC_CRF, choose_backend, dense_crf, pydensecrf_available

    if stage == "crf64":
        n, (h, w), params, what = args.crf_images, (64, 64), TRAIN_CRF, "64x64"
    else:
        n = args.crf_full_images
        (h, w), params, what = (375, 500), VOC_CRF, "500x375"
    probs, images = photo_batch(n, h, w, 21)
    cpu = torch.device("cpu")
    rows = []
    if pydensecrf_available():
        rows.append(measure(stage, "release", f"pydensecrf2 per image, {n} x {what}", cpu, n,
                            lambda: dense_crf(probs, images, params, backend="pydensecrf"), args.repeats))
    else:
        print("  pydensecrf2 not installed: no release row")
    dp, di = probs.to(device), images.to(device)
    backends = ["lattice", "auto"] + (["exact"] if stage == "crf64" else [])
    for backend in backends:
        if backend == "auto":
            label = f"auto (= {choose_backend(device, h, w)}) on {device.type}, batch {n}"
        else:
            label = f"{backend} on {device.type}, batch {n}"
        rows.append(measure(stage, "ours", label, device, n,
                            lambda b=backend: dense_crf(dp, di, params, backend=b), args.repeats))
    return rows


# ----------------------------------------------------------------------------------------------


def print_table(rows: list[Row], device: torch.device) -> None:
    mem = "peak CUDA MiB" if device.type == "cuda" else "peak +RSS MiB"
    print(f"\n{'stage':<9} {'path':<8} {'setting':<68} {'device':<7} {'images/s':>9} {mem:>14} "
          f"{'x release':>10}")
    for row in rows:
        release = next((r for r in rows if r.stage == row.stage and r.path == "release"), None)
        ratio = f"{row.images_per_s / release.images_per_s:.2f}x" if release else "-"
        print(f"{row.stage:<9} {row.path:<8} {row.setting:<68} {row.device:<7} {row.images_per_s:9.3f} "
              f"{row.peak_mib:14.0f} {ratio:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU with smaller sizes")
    ap.add_argument("--only", nargs="+", choices=STAGES, default=None, help="stages to run")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3 GPU, 2 CPU)")
    ap.add_argument("--seed-images", type=int, default=None, help="images in the seeds rows (16 GPU, 2 CPU)")
    ap.add_argument("--seed-batch", type=int, default=None, help="our seeds batch (8 GPU, 1 CPU)")
    ap.add_argument("--train-batch", type=int, default=None, help="training batch (8 GPU, 1 CPU)")
    ap.add_argument("--train-crop", type=int, default=None, help="training crop (512 GPU, 256 CPU)")
    ap.add_argument("--window-batch", type=int, default=None,
                    help="our windows per forward (default voc-plus's: 0, by free memory on GPU, 1 on CPU)")
    ap.add_argument("--mask-images", type=int, default=None,
                    help="images whose windows share batches in a further masks row (default voc-plus's "
                         "image_batch, 4, on GPU; none on CPU)")
    ap.add_argument("--crf-images", type=int, default=16, help="64x64 maps in the crf64 rows")
    ap.add_argument("--crf-full-images", type=int, default=None,
                    help="500x375 images in the crffull rows (default 8 on GPU, 1 with --cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device visible: pass --cpu")
    device = torch.device("cpu" if args.cpu else "cuda")
    args.repeats = args.repeats or (2 if args.cpu else 3)
    args.crf_full_images = args.crf_full_images or (1 if args.cpu else 8)
    args.seed_images = args.seed_images or (2 if args.cpu else 16)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    print(f"weakclip benchmark suite on {where}; torch {torch.__version__}; best of {args.repeats}")
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    runners = {"seeds": seeds_rows, "train": train_rows, "masks": masks_rows,
               "crf64": lambda d, a: crf_rows("crf64", d, a),
               "crffull": lambda d, a: crf_rows("crffull", d, a)}
    for stage in args.only or STAGES:
        rows += runners[stage](device, args)
    print_table(rows, device)
    print(f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs; other processes slow the wall-clock figures)")


if __name__ == "__main__":
    main()
