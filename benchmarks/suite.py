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

ExCEL (weakclip.methods.excel) against the authors' own code, run from its snapshot as the tests run it
(benchmarks/excel_release.py, tests/excel_ref.py; without the snapshot the release's rows are skipped, saying
why). Both sides get the same random CLIP (--excel-arch, ViT-B/16), the same random enriched text features
(VOC: 20 classes and the background words), the same decoder weights and the same inputs; after the table
a line per stage says how far the two sides' results agree (losses, pseudo labels, masks):

  excel-train  one training step, batch 4 of 320x320 crops (--excel-batch, --excel-crop), at iteration
               --excel-iter (0: the first phase; from 14000 the second CLIP pass with the decoder's features);
               release: the body of scripts/train_voc.py's loop with its model, PAR and PolyWarmupAdamW;
               ours: ExcelStep + the AdamW of build_excel_optimizer (train.train_step)
  excel-free   training-free masks of 500x375 images resized to 320 (--excel-size), one at a time
               (--excel-images: 1 on CPU, 8 on GPU); release: tools/infer_lam.py build_validation
               (--training_free true); ours: training_free.training_free_mask
  excel-infer  test-time inference of the same images: squares of 224, 320, 384 and 480 with flip, logits
               averaged, argmax (no CRF, as tools/infer_seg_voc.py); release: its _validate; ours:
               infer.infer_image (ExcelNet.segment: the logits alone)

--quick runs only the ExCEL rows (unless --only names others) with the tiny-excel CLIP at 96 px and one timed
run: a check that they run, in about a minute on a CPU, not a measurement.

Models have RANDOM weights (speed does not depend on them) and are built from ``load_preset("voc")``
with the overrides named above, so the rows follow the preset as it is.
Inputs are real photos (scikit-image's sample images, resized) with photo-like probability maps
(blurred, shifted, noisy regions of the photo); without scikit-image, a smooth synthetic image.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the row; on CPU the growth of the
process's resident memory over the row, warm-up included (sampled every 2 ms), both in MiB.
Each row runs once to warm up, then ``--repeats`` times; the figure is the best of those (the
least disturbed by other processes on a shared machine). The ExCEL rows on CPU run once after the
warm-up unless ``--repeats`` is given (a full-size training step takes 10 to 30 s there).

    python benchmarks/suite.py            # on the GPU (at most a few minutes on one GPU)
    python benchmarks/suite.py --cpu      # CPU only, smaller batches (machines without a GPU)
    python benchmarks/suite.py --cpu --only excel-train excel-free excel-infer   # ExCEL, a few minutes
    python benchmarks/suite.py --cpu --quick                                     # ExCEL rows, tiny CLIP
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakclip.data.classes import VOC_CLASSES

STAGES = ("seeds", "train", "masks", "crf64", "crffull", "excel-train", "excel-free", "excel-infer")
EXCEL_STAGES = ("excel-train", "excel-free", "excel-infer")


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
    print(f"  {stage:<11} {path:<8} {setting:<68} {row.images_per_s:9.3f} images/s", flush=True)
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
# ExCEL: the release's path (its own code from the snapshot, benchmarks/excel_release.py) vs ours


class _ExcelWorld:
    """What both sides of the ExCEL rows share: one random CLIP (``--excel-arch``), its OpenAI-layout state
    dict for the release, random enriched text features (VOC: 20 classes + the background words), the
    release's snapshot importable, and the checks' notes."""

    def __init__(self, device: torch.device, args, stack) -> None:
        from weakclip.models.clip import get_arch, make_open_clip_model
        from weakclip.seeds.names import BACKGROUND_VOC

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import excel_release  # benchmarks/excel_release.py

        self.release_mod = excel_release
        self.device = device
        self.arch = get_arch(args.excel_arch)
        torch.manual_seed(0)
        clip = make_open_clip_model(self.arch).eval().requires_grad_(False)
        self.state = clip.state_dict()  # the release's CLIP copies it
        self.visual = clip.visual.to(device)
        self.texts = F.normalize(torch.randn(20 + len(BACKGROUND_VOC), self.arch.embed_dim), dim=1)
        self.why_not = excel_release.available()
        self.ref = None if self.why_not else stack.enter_context(excel_release.release(device))
        self.notes: list[str] = []

    def pair(self, size: int, mode: str):
        """The release's ``ExCEL_model`` (``mode``: "train" or "val", its ``reload_self_attn`` mode; None
        without the snapshot) and ours (``ExcelNet``, position mode "crop" / "clip"), same weights."""
        from weakclip.methods.excel.model import ExcelNet, ExcelSettings
        from weakclip.methods.excel.text import PROMPT_TEMPLATE, TextBank
        from weakclip.models.clip import CLIPImageTower
        from weakclip.seeds.names import BACKGROUND_VOC, VOC_NAMES

        torch.manual_seed(1)
        reference = None
        if self.ref is not None:
            reference = self.release_mod.release_model(self.ref, self.state, self.texts, self.arch.width,
                                                       size, mode, self.device)
        bank = TextBank(class_names=list(VOC_CLASSES), names=list(VOC_NAMES), background=list(BACKGROUND_VOC),
                        template=PROMPT_TEMPLATE, text_features=self.texts, enriched=self.texts,
                        centres=torch.zeros(0, self.arch.embed_dim), flags=torch.zeros(20, 0))
        tower = CLIPImageTower(self.visual, self.arch).eval().requires_grad_(False)
        settings = ExcelSettings(arch=self.arch.name, crop=size,
                                 position_mode="crop" if mode == "train" else "clip")
        ours = ExcelNet(tower, bank, settings).eval()
        if reference is not None:
            ours.load_trainable_state_dict(reference.state_dict(), release=True)
        return reference, ours

    def usable(self, stage: str, script: str) -> bool:
        """Whether the release's ``script`` module imports here; prints why its row is skipped if not."""
        why = self.why_not
        if why is None:
            try:
                self.ref.module(script)
            except ImportError as exc:  # e.g. pydensecrf, which its inference scripts import
                why = f"{script} does not import here ({exc})"
        if why is not None:
            print(f"  {stage:<11} release  skipped: {why}", flush=True)
        return why is None


def _excel_labels(n: int, classes: int = 20) -> list[np.ndarray]:
    """1 to 3 foreground classes an image (multi-hot without background, as the release's cls_label)."""
    g = np.random.default_rng(0)
    out = []
    for i in range(n):
        v = np.zeros(classes, np.float32)
        v[g.choice(classes, size=1 + i % 3, replace=False)] = 1
        out.append(v)
    return out


def _equal_share(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    same = sum(int((np.asarray(x) == np.asarray(y)).sum()) for x, y in zip(a, b))
    return 100.0 * same / max(1, sum(np.asarray(x).size for x in a))


def excel_train_rows(world: _ExcelWorld, device: torch.device, args) -> list[Row]:
    from weakclip.methods.excel.config import apply_excel_overrides, load_excel_preset
    from weakclip.methods.excel.train import ExcelStep, build_excel_optimizer, build_par, train_step

    batch, crop, it = args.excel_batch, args.excel_crop, args.excel_iter
    reference, ours = world.pair(crop, "train")
    _, images = photo_batch(batch, crop, crop, 2)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    images = ((images - mean) / std).to(device)
    cls = torch.from_numpy(np.stack(_excel_labels(batch))).to(device)
    phase = "first phase" if it < 14000 else "second CLIP pass"
    what = f"iteration {it} ({phase}), batch {batch} of {crop}x{crop}, {world.arch.name}"
    rows, losses = [], {}

    def seeded(key: str, step):  # the same dropout masks on both sides: torch's seed set per call
        calls = [0]

        def run() -> None:
            calls[0] += 1
            torch.manual_seed(calls[0])
            losses[key] = step()
        return run

    if world.usable("excel-train", "scripts.train_voc"):
        release_step = world.release_mod.ReleaseStep(world.ref, reference, crop, batch, device)
        rows.append(measure("excel-train", "release", f"train_voc.py loop body, {what}", device, batch,
                            seeded("release", lambda: release_step(images.clone(), cls.clone(), it)),
                            args.excel_repeats))
        theirs = release_step.pseudo_labels
        del release_step, reference
    cfg = apply_excel_overrides(load_excel_preset("excel-voc"), [
        f"model.clip_arch={world.arch.name}", f"data.crop_size={crop}", f"train.batch_size={batch}"])
    ours.train()
    optimizer = build_excel_optimizer(ours, cfg)
    step = ExcelStep(cfg, build_par(cfg, device), ours.clip_pass.patch_size)
    batch_dict = {"image": images, "cls_label": cls}
    rows.append(measure("excel-train", "ours", f"ExcelStep + AdamW, {what}", device, batch,
                        seeded("ours", lambda: train_step(ours, optimizer, step, batch_dict, it)["loss"]
                               .item()),
                        args.excel_repeats))
    if "release" in losses:
        same = _equal_share([theirs.numpy()], [step.last.pseudo_labels.cpu().numpy()])
        world.notes.append(f"excel-train: last step (same weights, batch and dropout seeds on both sides): "
                           f"loss release {losses['release']:.6f}, ours {losses['ours']:.6f}; online pseudo "
                           f"labels equal on {same:.2f}% of the pixels")
    return rows


def excel_free_rows(world: _ExcelWorld, device: torch.device, args) -> list[Row]:
    from weakclip.methods.excel.par import PAR
    from weakclip.methods.excel.training_free import FreeSettings, training_free_mask

    size, n = args.excel_size, args.excel_images
    reference, ours = world.pair(size, "train")  # infer_lam's model: mode = its --infer_set, "train"
    images = _photos_uint8(n, 375, 500)
    labels = _excel_labels(n)
    what = f"{n} x 500x375 resized to {size}, {world.arch.name}, one image at a time"
    rows, masks = [], {}
    if world.usable("excel-free", "tools.infer_lam"):
        par = world.release_mod.release_par(world.ref, device)

        def release() -> None:
            masks["release"] = world.release_mod.release_training_free(world.ref, reference, par, images,
                                                                       labels, size, device)
        rows.append(measure("excel-free", "release", f"infer_lam.py --training_free true, {what}", device, n,
                            release, args.excel_repeats))
        del reference
    settings = FreeSettings(size=size)
    par = PAR(settings.par_dilations, settings.par_iters).to(device)

    def run() -> None:
        masks["ours"] = [training_free_mask(ours, image, cls, settings, par=par)
                         for image, cls in zip(images, labels)]
    rows.append(measure("excel-free", "ours", f"training_free_mask, {what}", device, n, run,
                        args.excel_repeats))
    if "release" in masks:
        world.notes.append(f"excel-free: masks equal to the release's on "
                           f"{_equal_share(masks['release'], masks['ours']):.2f}% of the pixels")
    return rows


def excel_infer_rows(world: _ExcelWorld, device: torch.device, args) -> list[Row]:
    from weakclip.methods.excel.infer import VOC_INFERENCE, InferenceSettings, infer_image

    size, n = args.excel_size, args.excel_images
    reference, ours = world.pair(size, "val")  # infer_seg_voc.py's model: mode "val"
    images = _photos_uint8(n, 375, 500)
    settings = InferenceSettings(size=size, scales=VOC_INFERENCE.scales)
    sides = ", ".join(str(int(size * s)) for s in settings.scales)
    what = f"{n} x 500x375, squares {sides} + flip, {world.arch.name}"
    rows, labels = [], {}
    if world.usable("excel-infer", "tools.infer_seg_voc"):
        def release() -> None:
            labels["release"] = world.release_mod.release_inference(world.ref, reference, images, size)
        rows.append(measure("excel-infer", "release", f"infer_seg_voc.py _validate, {what}", device, n,
                            release, args.excel_repeats))
        del reference

    def run() -> None:
        labels["ours"] = [infer_image(ours, image, settings, device=device).labels for image in images]
    rows.append(measure("excel-infer", "ours", f"infer_image (VOC settings), {what}", device, n, run,
                        args.excel_repeats))
    if "release" in labels:
        world.notes.append(f"excel-infer: labels equal to the release's on "
                           f"{_equal_share(labels['release'], labels['ours']):.2f}% of the pixels")
    return rows


# ----------------------------------------------------------------------------------------------


def print_table(rows: list[Row], device: torch.device) -> None:
    mem = "peak CUDA MiB" if device.type == "cuda" else "peak +RSS MiB"
    width = max([9] + [len(r.stage) for r in rows])
    setting = max([68] + [len(r.setting) for r in rows])
    print(f"\n{'stage':<{width}} {'path':<8} {'setting':<{setting}} {'device':<7} {'images/s':>9} {mem:>14} "
          f"{'x release':>10}")
    for row in rows:
        release = next((r for r in rows if r.stage == row.stage and r.path == "release"), None)
        ratio = f"{row.images_per_s / release.images_per_s:.2f}x" if release else "-"
        print(f"{row.stage:<{width}} {row.path:<8} {row.setting:<{setting}} {row.device:<7} "
              f"{row.images_per_s:9.3f} {row.peak_mib:14.0f} {ratio:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU with smaller sizes")
    ap.add_argument("--only", nargs="+", choices=STAGES, default=None, help="stages to run")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per row (default 3 GPU, 2 CPU; the ExCEL rows on CPU: 1)")
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
    ap.add_argument("--quick", action="store_true",
                    help="ExCEL rows only (unless --only says otherwise), with the tiny-excel CLIP, crop 96, "
                         "one timed run: a check that they run, not a measurement")
    ap.add_argument("--excel-arch", default=None,
                    help="CLIP of the ExCEL rows (ViT-B/16; --quick: tiny-excel)")
    ap.add_argument("--excel-batch", type=int, default=4, help="ExCEL training batch (the release's 4)")
    ap.add_argument("--excel-crop", type=int, default=None,
                    help="ExCEL training crop (the release's 320; --quick: 96)")
    ap.add_argument("--excel-iter", type=int, default=0,
                    help="ExCEL training iteration (0: first phase; from 14000 the second CLIP pass)")
    ap.add_argument("--excel-size", type=int, default=None,
                    help="ExCEL test and training-free square (the release's 320; --quick: 96)")
    ap.add_argument("--excel-images", type=int, default=None,
                    help="500x375 images of the ExCEL training-free and inference rows (8 GPU, 1 CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device visible: pass --cpu")
    device = torch.device("cpu" if args.cpu else "cuda")
    args.excel_repeats = args.repeats or (1 if args.cpu or args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 2 if args.cpu else 3)
    args.excel_arch = args.excel_arch or ("tiny-excel" if args.quick else "ViT-B/16")
    args.excel_crop = args.excel_crop or (96 if args.quick else 320)
    args.excel_size = args.excel_size or (96 if args.quick else 320)
    args.excel_images = args.excel_images or (1 if args.cpu else 8)
    stages = args.only or (EXCEL_STAGES if args.quick else STAGES)
    args.crf_full_images = args.crf_full_images or (1 if args.cpu else 8)
    args.seed_images = args.seed_images or (2 if args.cpu else 16)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    excel = f" (ExCEL rows: {args.excel_repeats})" if any(st in EXCEL_STAGES for st in stages) else ""
    print(f"weakclip benchmark suite on {where}; torch {torch.__version__}; best of {args.repeats}{excel}")
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    runners = {"seeds": seeds_rows, "train": train_rows, "masks": masks_rows,
               "crf64": lambda d, a: crf_rows("crf64", d, a),
               "crffull": lambda d, a: crf_rows("crffull", d, a),
               "excel-train": excel_train_rows, "excel-free": excel_free_rows,
               "excel-infer": excel_infer_rows}
    with contextlib.ExitStack() as stack:
        world = None
        for stage in stages:
            if stage in EXCEL_STAGES:
                world = world or _ExcelWorld(device, args, stack)
                rows += runners[stage](world, device, args)
            else:
                rows += runners[stage](device, args)
    print_table(rows, device)
    for note in world.notes if world is not None else []:
        print(note)
    print(f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs; other processes slow the wall-clock figures)")


if __name__ == "__main__":
    main()
