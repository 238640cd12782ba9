"""Windows/s of the refinement model at each sliding-window batch size (what ``pseudo.window_batch`` buys).

The full-size ViT-B/16 model of each preset (RANDOM weights: speed does not depend on them), VOC's 21
classes, windows of 512 x 512 (the release's crop) in eval mode under ``torch.inference_mode``: the
same ``--windows`` windows are run in batches of each size; the figure is the best of ``--repeats``
timed runs after a warm-up. On CUDA also with bf16 autocast (``pseudo.amp: bf16``), the peak memory
of each batch, and the batch ``pseudo.window_batch: 0`` would choose
(:class:`weakclip.inference.batching.WindowRunner`).

    python benchmarks/window_batch.py                        # CPU: a minute or two on 2 cores
    python benchmarks/window_batch.py --batches 1 8 32 64    # on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from weakclip.config import load_preset
from weakclip.data.classes import VOC_CLASSES
from weakclip.inference.batching import WindowRunner
from weakclip.models.weakclip import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["voc", "voc-plus"])
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes (default 1 2 4 on CPU, 1 4 16 64 on CUDA)")
    parser.add_argument("--windows", type=int, default=None, help="windows per timed run (default: the "
                        "largest batch, at least 4)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    batches = args.batches or ([1, 4, 16, 64] if cuda else [1, 2, 4])
    windows = args.windows or max(4, max(batches))
    where = (f" ({torch.cuda.get_device_name(device)})" if cuda
             else f", {torch.get_num_threads()} torch threads")
    print(f"device {device}{where}, torch {torch.__version__}")
    print(f"{'preset':10} {'amp':5} {'batch':>5} {'windows/s':>10} {'x batch 1':>9} {'peak MiB':>9}")
    for preset in args.presets:
        torch.manual_seed(0)
        model = build_model(load_preset(preset).model, VOC_CLASSES, pretrained_download=False,
                            device=device).eval()
        x = torch.randn(windows, 3, 512, 512, device=device)
        for amp in ([None, torch.bfloat16] if cuda else [None]):
            base = None
            for b in batches:
                runner = WindowRunner(model, len(VOC_CLASSES), window_batch=b, autocast_dtype=amp)
                with torch.inference_mode():
                    runner(x[:b])  # warm-up
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    best = float("inf")
                    for _ in range(args.repeats):
                        _sync(device)
                        start = time.perf_counter()
                        runner(x)
                        _sync(device)
                        best = min(best, time.perf_counter() - start)
                rate = windows / best
                base = base or rate
                peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:9.0f}" if cuda else f"{'-':>9}"
                print(f"{preset:10} {'bf16' if amp else 'fp32':5} {b:5d} {rate:10.3f} {rate / base:8.2f}x "
                      f"{peak}", flush=True)
            if cuda:
                auto = WindowRunner(model, len(VOC_CLASSES), window_batch=0, autocast_dtype=amp)
                with torch.inference_mode():
                    chosen = auto.resolve(device, (512, 512))
                print(f"{preset:10} {'bf16' if amp else 'fp32':5} window_batch 0 chooses {chosen} windows "
                      f"(free memory now)")
        del model, x
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
