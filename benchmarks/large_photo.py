"""Peak memory and time of ``weakclip predict`` on one very large photo (48 MP by default), per network.

Each network is a checkpoint of RANDOM weights (memory and time do not depend on the values) at its preset's
default test-time settings, saved as ``weakclip predict`` takes it:

* ``retrained``: the authors' DeepLab-v1 ResNet-38 (``retrain --preset voc``, 124M parameters, 21 classes):
  5 scales 0.5 ... 1.5 with flip, OpenCV bicubic rescaling, CRF over the classes of the argmax;
* ``refine``: the WeakCLIP refinement model (``--preset voc``, ViT-B/16, 21 classes): the release's sliding
  windows (512 / 341) at 6 scales 0.5 ... 1.75 of the base scale 2048 x 512 with flip, CRF (pydensecrf2)
  over the classes of the argmax.

The photo: scikit-image's astronaut enlarged (bicubic) to ``--size`` with a little grain, a JPEG of quality
92. Each network runs ``python -m weakclip predict PHOTO --checkpoint CKPT --out DIR --device cpu`` in a
process of its own, started by a small wrapper that reports the child's peak resident memory (``ru_maxrss``
of ``RUSAGE_CHILDREN``: what ``/usr/bin/time -v`` calls "Maximum resident set size") and its wall time; the
mask is checked to be at the photo's full size. ``--max-side`` is passed on when given (default: the
command's own). Nothing else should run beside it: the figure is one process's peak.

    python benchmarks/large_photo.py                              # both networks, 48 MP, about 10 minutes
    python benchmarks/large_photo.py --networks retrained --size 4000 3000 --max-side 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"

_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
scale = 1 if sys.platform == "darwin" else 1024
print("@@" + json.dumps({"rc": rc, "peak_bytes": peak * scale, "seconds": time.perf_counter() - start}))
"""


def _photo(path: Path, width: int, height: int) -> None:
    import cv2
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    big = cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_CUBIC)
    for y in range(0, height, 512):  # grain, in strips (no float copy of the whole photo)
        part = big[y:y + 512].astype(np.int16) + rng.integers(-6, 7, big[y:y + 512].shape, dtype=np.int16)
        big[y:y + 512] = np.clip(part, 0, 255).astype(np.uint8)
    Image.fromarray(big).save(path, quality=92)


def _retrained_checkpoint(path: Path) -> None:
    import torch

    from weakclip.data.classes import VOC_CLASSES
    from weakclip.retrain.train import apply_retrain_overrides, build_model, load_retrain_preset

    cfg = apply_retrain_overrides(load_retrain_preset("voc"), ["model.pretrained_backbone=false"])
    torch.manual_seed(0)
    model = build_model(cfg, len(VOC_CLASSES), pretrained=False)
    torch.save({"iteration": 0, "model": model.state_dict(), "config": cfg.to_dict()}, path)


def _refine_checkpoint(path: Path) -> None:
    import torch

    from weakclip.config import load_preset
    from weakclip.data.classes import VOC_CLASSES
    from weakclip.models import build_model

    cfg = load_preset("voc")
    cfg.classes = list(VOC_CLASSES)
    torch.manual_seed(0)
    model = build_model(cfg.model, list(VOC_CLASSES), pretrained_download=False)
    torch.save({"iteration": 0, "model": model.state_dict(), "config": cfg.to_dict(), "clip_weights": None},
               path)


def _measure(photo: Path, checkpoint: Path, out: Path, max_side: int | None, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "weakclip", "predict", str(photo), "--checkpoint", str(checkpoint),
           "--out", str(out), "--device", "cpu", "--quiet"]
    if max_side is not None:
        cmd += ["--max-side", str(max_side)]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    run = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], env=env, capture_output=True, text=True)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("@@")), None)
    if line is None:
        raise SystemExit(f"the wrapper failed: {run.stderr[-2000:]}")
    result = json.loads(line[2:])
    result["stderr"] = run.stderr.strip().splitlines()[-1:] if run.stderr.strip() else []
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(8000, 6000), metavar=("WIDTH", "HEIGHT"),
                        help="the photo's size (default 8000 6000: 48 MP)")
    parser.add_argument("--networks", nargs="+", choices=["retrained", "refine"],
                        default=["retrained", "refine"])
    parser.add_argument("--max-side", type=int, default=None,
                        help="passed to weakclip predict (default: its own default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the command")
    parser.add_argument("--keep", type=Path, default=None, help="keep the photo and outputs in this folder")
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    from weakclip.memory import DEFAULT_MAX_SIDE

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        width, height = args.size
        photo = base / f"photo_{width}x{height}.jpg"
        start = time.perf_counter()
        _photo(photo, width, height)
        print(f"photo {photo.name}: {width}x{height} ({width * height / 1e6:.0f} MP), "
              f"{photo.stat().st_size / 2 ** 20:.1f} MiB JPEG, made in {time.perf_counter() - start:.0f} s",
              flush=True)
        rows = []
        for name in args.networks:
            checkpoint = base / f"{name}.pth"
            (_retrained_checkpoint if name == "retrained" else _refine_checkpoint)(checkpoint)
            out = base / f"out_{name}"
            load = os.getloadavg()[0]
            result = _measure(photo, checkpoint, out, args.max_side, args.threads)
            mask = out / f"{photo.stem}.png"
            size = "-"
            if mask.is_file():
                from PIL import Image

                with Image.open(mask) as im:
                    size = f"{im.width}x{im.height}"
                    classes = len(np.unique(np.asarray(im)))
            else:
                classes = 0
            rows.append((name, result, size, classes, load))
            print(f"{name}: exit {result['rc']}, peak {result['peak_bytes'] / 2 ** 30:.2f} GiB, "
                  f"{result['seconds']:.0f} s" + (f"; {result['stderr'][0]}" if result["stderr"] else ""),
                  flush=True)
            checkpoint.unlink()
    side = args.max_side if args.max_side is not None else f"{DEFAULT_MAX_SIDE} (default)"
    print(f"\nweakclip predict, one {width}x{height} JPEG, --device cpu, --max-side {side}, "
          f"{args.threads or 'default'} thread(s)")
    print(f"{'network':10} {'exit':>4} {'peak RSS GiB':>12} {'seconds':>8} {'mask size':>11} {'classes':>7} "
          f"{'load before':>11}")
    for name, result, size, classes, load in rows:
        print(f"{name:10} {result['rc']:4d} {result['peak_bytes'] / 2 ** 30:12.2f} {result['seconds']:8.0f} "
              f"{size:>11} {classes:7d} {load:11.2f}")
    print(f"{os.cpu_count()} CPUs; 1-min load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
