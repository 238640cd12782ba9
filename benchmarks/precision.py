"""Training step and logits in fp32, bf16 and fp16 (with the gradient scaler): finite, speed, distance.

For each precision the same refinement model (a preset's ``model`` section, RANDOM weights, 21
classes) starts from the same weights and takes ``--steps`` training steps
(:func:`weakclip.engine.trainer.train_step`: forward, WeakCLIP loss with its boundary CRF, backward,
AdamW) on the same batch under that precision's autocast; fp16 goes through ``torch.amp.GradScaler``
as the training loop does. Printed per precision: whether every loss was finite, the first and last
loss, seconds a step, peak memory, and, before any step, the eval-mode logits against fp32's on the
same batch (max |difference|, and the share of pixels whose argmax class agrees).

    python benchmarks/precision.py                          # CUDA when visible: batch 8 of 512 x 512
    python benchmarks/precision.py --device cpu --arch tiny --crop-size 64 --batch-size 2   # a smoke run

On CPU, fp16 autocast runs (slowly) where this torch supports it; bf16 is the CPU's autocast type. The
scaler starts at 2^16 and skips the steps whose gradients overflow while it lowers the scale, so fp16's
loss may not move in the first steps.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="voc-plus", help="model and loss settings (default voc-plus)")
    ap.add_argument("--arch", default=None, help="CLIP architecture (default the preset's, ViT-B/16)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 on CUDA, 1 on CPU")
    ap.add_argument("--crop-size", type=int, default=None, help="default 512 on CUDA, 256 on CPU")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from weakclip.config import load_preset
    from weakclip.data.classes import VOC_CLASSES
    from weakclip.engine.trainer import norm_constants, train_step
    from weakclip.losses import WeakCLIPLoss
    from weakclip.models.weakclip import build_model

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (8 if cuda else 1)
    crop = args.crop_size or (512 if cuda else 256)
    cfg = load_preset(args.preset)
    if args.arch:  # another depth: the arch's own output blocks
        from weakclip.models.clip_arch import get_arch

        cfg.model.clip_arch = args.arch
        cfg.model.out_blocks = get_arch(args.arch).out_blocks
    torch.manual_seed(0)
    base = build_model(cfg.model, VOC_CLASSES, pretrained_download=False).to(device)
    mean_c, std_c = norm_constants(cfg.data.normalize)
    mean = torch.tensor(mean_c, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std_c, device=device).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, crop, crop, generator=gen) * 255).to(device)
    seeds = torch.randint(0, len(VOC_CLASSES), (batch, crop, crop), generator=gen)
    seeds[:, : crop // 4] = 255
    seeds = seeds.to(device)
    norm = (images - mean) / std  # what the model and train_step take (the loss un-normalises it)
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), torch {torch.__version__}, preset {args.preset}, "
          f"{cfg.model.clip_arch} random weights, batch {batch} of {crop} x {crop}, {args.steps} steps")

    reference = None
    rows = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = copy.deepcopy(base)
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                    else torch.autocast(device.type, enabled=False))
        try:
            model.eval()
            with torch.inference_mode(), autocast:
                logits = model(norm)["logits"].float()
        except RuntimeError as exc:  # e.g. a dtype this device's autocast does not support
            rows.append((name, f"not run: {' '.join(str(exc).split())[:80]}"))
            continue
        if reference is None:
            reference = logits
        diff = float((logits - reference).abs().max())
        agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
        model.train()
        loss_fn = WeakCLIPLoss(loss_size=cfg.loss.loss_size, boundary_crf=cfg.loss.boundary_crf,
                               identity_weight=cfg.loss.identity_weight,
                               identity_mean=cfg.loss.identity_mean).to(device)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=1e-2)
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        losses, seconds = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            try:
                terms = train_step(model, loss_fn, optimizer, norm, seeds, mean, std, autocast=autocast,
                                   scaler=scaler)
            except FloatingPointError as exc:
                losses.append(float("nan"))
                print(f"  {name}: {exc}")
                break
            if cuda:
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
            losses.append(float(terms["loss"].detach()))
        finite = all(torch.isfinite(torch.tensor(losses)).tolist())
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if cuda else "-"
        step_s = sorted(seconds)[len(seconds) // 2] if seconds else float("nan")
        rows.append((name, f"{'yes' if finite else 'NO':>6} {losses[0]:9.4f} {losses[-1]:9.4f} {step_s:8.3f} "
                           f"{peak:>9} {diff:12.2e} {100 * agree:9.2f}%"))
        del model, optimizer
    print(f"\n{'amp':5} {'finite':>6} {'loss 1':>9} {'loss n':>9} {'s/step':>8} {'peak MiB':>9} "
          f"{'max |dlogit|':>12} {'argmax eq':>10}")
    for name, text in rows:
        print(f"{name:5} {text}")
    print("logits: eval mode, the same batch, before any step, against fp32")


if __name__ == "__main__":
    main()
