"""Training-step throughput and peak memory of the full-size model, each optimisation toggled off in turn.

One training step of our engine (``weakclip.engine.trainer.train_step``: forward, loss with the CRF
boundary term, backward, AdamW) on the ViT-B/16 model with frozen towers (``model.freeze_towers``,
the ``-plus`` setting; ``benchmarks/suite.py`` compares with the release's path), RANDOM weights
(speed does not depend on the values). The baseline has every optimisation on; each other row switches
ONE off, and the ratio column is baseline images/s over the row's images/s (> 1: the optimisation helps
by that factor).

Toggles:
  frozen_no_grad   ModelConfig.frozen_no_grad: the frozen image tower under torch.no_grad()
  sdpa             the towers' attention via F.scaled_dot_product_attention; "off" runs the explicit
                   softmax(QK^T)V path of weakclip.models.clip_blocks (the towers have no public switch: the
                   benchmark routes every block through the path used for attention maps)
  crf_batched      boundary-loss CRF through weakclip.crf.dense_crf (loss.boundary_crf=fast, auto backend:
                   the PyTorch lattice batched on a GPU, pydensecrf2 on CPU); "off" makes the target as
                   the release (loss.boundary_crf=release: scipy zoom, uint8, pydensecrf2 per image)
  bf16             bf16 autocast (CUDA only; skipped on CPU)

Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS (VmHWM, reset before
each row where the kernel allows it, else the lifetime peak, which only grows).

    python benchmarks/train_step.py --iters 2 --batch-size 1 --crop-size 256 --threads 1   # CPU, minutes
    python benchmarks/train_step.py --device cuda --batch-size 8 --crop-size 512 --iters 10

On a busy machine pass --threads 1: two OpenMP threads competing with other processes for 2 cores can
run several times slower than one, which swamps every ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch


def _rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def explicit_attention(enabled: bool):
    """Route the towers' self-attention through the explicit (non-SDPA) path while enabled."""
    from weakclip.models import clip_blocks, clip_image

    if not enabled:
        yield
        return
    original = clip_blocks._self_attention

    def explicit(attn, x, mask, need_weights):
        return original(attn, x, mask, True)

    # the block forward looks the function up in clip_blocks, the image tower's Grad-CAM step in clip_image
    modules = (clip_blocks, clip_image)
    for module in modules:
        module._self_attention = explicit
    try:
        yield
    finally:
        for module in modules:
            module._self_attention = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="ViT-B/16")
    ap.add_argument("--batch-size", type=int, default=None, help="default 1 on CPU, 8 on GPU")
    ap.add_argument("--crop-size", type=int, default=None, help="default 256 on CPU, 512 on GPU")
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--loss-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=2, help="timed steps per row (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--only", nargs="*", default=None,
                    help="rows to run: baseline frozen_no_grad sdpa crf_batched bf16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from weakclip.engine.trainer import train_step
    from weakclip.losses import WeakCLIPLoss
    from weakclip.models.weakclip import ModelConfig, build_model

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (8 if cuda else 1)
    crop = args.crop_size or (512 if cuda else 256)
    torch.manual_seed(0)
    classes = ["background"] + [f"class {i}" for i in range(1, args.classes)]
    cfg = ModelConfig(clip_arch=args.arch, freeze_towers=True)
    t0 = time.perf_counter()
    model = build_model(cfg, classes, pretrained_download=False).to(device)
    model.train()
    build_s = time.perf_counter() - t0
    loss_fn = WeakCLIPLoss(loss_size=args.loss_size, boundary_crf="fast").to(device)
    release_loss = WeakCLIPLoss(loss_size=args.loss_size, boundary_crf="release").to(device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=3e-5)
    from weakclip.data.transforms import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=gen).to(device)
    seeds = torch.randint(0, args.classes, (batch, crop, crop), generator=gen)
    seeds[:, : crop // 4] = 255
    seeds = seeds.to(device)

    rows = [("baseline", {}), ("frozen_no_grad", {"frozen_no_grad": False}), ("sdpa", {"sdpa": False}),
            ("crf_batched", {"crf_batched": False})]
    if cuda:
        rows.append(("bf16", {"bf16": False}))
    if args.only:
        rows = [r for r in rows if r[0] in args.only]
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), {args.arch} random weights, batch {batch}, crop {crop}, "
          f"{args.classes} classes, loss size "
          f"{args.loss_size}; model built in {build_s:.1f} s; {args.warmup} warm-up + {args.iters} timed "
          "steps")
    print(model.parameter_summary().splitlines()[-1])

    results = []
    for name, off in rows:
        settings = {"frozen_no_grad": True, "sdpa": True, "crf_batched": True, "bf16": cuda} | off
        model.cfg.frozen_no_grad = settings["frozen_no_grad"]
        loss = loss_fn if settings["crf_batched"] else release_loss
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if settings["bf16"] and cuda
                    else torch.autocast(device.type, enabled=False))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        reset = _rss_reset()
        times = []
        with explicit_attention(not settings["sdpa"]):
            for i in range(args.warmup + args.iters):
                t = time.perf_counter()
                train_step(model, loss, optimizer, images, seeds, mean, std, autocast=autocast)
                if cuda:
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t)
        step = float(np.median(times))
        mem = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _rss_peak_mib()
        results.append((name, "off" if off else "all on", batch / step, step, mem, reset or cuda))
    model.cfg.frozen_no_grad = True

    base = next((r for r in results if r[0] == "baseline"), None)
    mem_kind = "peak CUDA MiB" if cuda else "peak RSS MiB"
    print(f"\n{'row':<16}{'setting':>8}{'images/s':>11}{'s/step':>9}{mem_kind:>15}{'speed-up of opt.':>18}"
          f"{'memory ratio':>14}")
    for name, setting, ips, step, mem, exact in results:
        ratio = f"{base[2] / ips:.2f}x" if base and name != "baseline" else "-"
        mratio = f"{mem / base[4]:.2f}" if base and name != "baseline" else "-"
        mark = "" if exact else "*"
        print(f"{name:<16}{setting:>8}{ips:>11.3f}{step:>9.3f}{mem:>14.0f}{mark:1}{ratio:>18}{mratio:>14}")
    if not cuda:
        print("bf16 autocast: GPU only, not measured on CPU")
        if not all(r[5] for r in results):
            print("* lifetime peak RSS (the kernel refused the reset): grows monotonically over the rows")
    print("speed-up = baseline images/s / row images/s: the gain of the optimisation that row turns off")


if __name__ == "__main__":
    main()
