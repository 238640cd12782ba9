"""Peak memory of pydensecrf2 (:func:`weakclip.crf.dense_crf_numpy`, VOC parameters) by image size and class
count: the bytes a pixel that ``weakclip.crf.pydensecrf_backend.CRF_BYTES_PER_PIXEL`` (+ ``_CLASS`` times K)
must stay above, so that its memory check runs before the C++ ``std::bad_alloc`` that aborts the process.

Each case runs in a process of its own and reports its peak resident memory (``ru_maxrss``) over what it
held before the CRF (the image and the probabilities), per pixel. Images: uniform noise (the worst case: the
bilateral lattice gets the most points) or scikit-image's astronaut resized (a photo). Probabilities: random,
normalised. The memory check is switched off inside (it would refuse the larger cases on a small machine).

    python benchmarks/crf_memory.py                         # the default cases, about 2 minutes
    python benchmarks/crf_memory.py --case 2000 1500 2 noise
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

_CASE = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {src!r})
import weakclip.memory
from weakclip.crf import VOC_CRF, dense_crf_numpy
weakclip.memory.available_bytes = lambda: None  # measure, do not refuse
w, h, k, kind = {w}, {h}, {k}, {kind!r}
rng = np.random.default_rng(0)
if kind == "photo":
    import cv2
    from skimage import data
    image = cv2.resize(data.astronaut(), (w, h), interpolation=cv2.INTER_LINEAR)
else:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
probs = rng.random((k, h, w), dtype=np.float32)
probs /= probs.sum(0, keepdims=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
dense_crf_numpy(image, probs, VOC_CRF)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("@@" + json.dumps({{"over": peak - before, "seconds": seconds}}))
"""

DEFAULT_CASES = [(500, 375, 2, "noise"), (500, 375, 21, "noise"), (1000, 750, 2, "noise"),
                 (1000, 750, 5, "noise"), (1000, 750, 21, "noise"), (2000, 1500, 2, "noise"),
                 (1000, 750, 2, "photo"), (1000, 750, 21, "photo")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=4, action="append", metavar=("WIDTH", "HEIGHT", "K", "noise|photo"),
                        help="a case to run (repeatable; default: the cases of benchmarks/README.md)")
    args = parser.parse_args()
    cases = [(int(w), int(h), int(k), kind) for w, h, k, kind in args.case] if args.case else DEFAULT_CASES
    sys.path.insert(0, str(SRC))
    from weakclip.crf.pydensecrf_backend import CRF_BYTES_PER_PIXEL, CRF_BYTES_PER_PIXEL_CLASS

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    print(f"{'image':>10} {'K':>3} {'kind':>5} {'MiB over inputs':>15} {'bytes/pixel':>11} {'bound':>6} "
          f"{'seconds':>7}")
    for w, h, k, kind in cases:
        code = _CASE.format(src=str(SRC), w=w, h=h, k=k, kind=kind)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("@@")), None)
        if line is None:
            print(f"{w}x{h} K={k} {kind}: failed (exit {run.returncode}): {run.stderr.strip()[-300:]}")
            continue
        result = json.loads(line[2:])
        bound = CRF_BYTES_PER_PIXEL + CRF_BYTES_PER_PIXEL_CLASS * k
        print(f"{f'{w}x{h}':>10} {k:3d} {kind:>5} {result['over'] / 2 ** 20:15.0f} "
              f"{result['over'] / (w * h):11.0f} {bound:6d} {result['seconds']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
