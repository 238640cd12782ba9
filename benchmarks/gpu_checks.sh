#!/usr/bin/env bash
# The device checks of issues 13, 15 and 29 as ONE prepared command for a lent GPU (NVIDIA H200 here):
# environment, the CUDA-only tests, the benchmark suite (the release's path vs ours), its ExCEL rows
# (against the authors' code), window batches and precision; every output is tee'd to $OUT (or
# ./gpu_checks_out), so what ran comes back even when a step hits its time limit. At most about 9.5
# minutes (one device command may take 10): the pydensecrf2 build about 1, the steps' limits 8.5 together.
#
#   here, once (network):  bash benchmarks/gpu_checks.sh --fetch     # wheels + pydensecrf2 sdist -> .whl/
#   on the device:         bash benchmarks/gpu_checks.sh             # with .whl carried along
#
# The device image has python3 with torch, torchvision, numpy, scipy, scikit-image, matplotlib, timm,
# safetensors and pytest, but not open_clip_torch, ftfy, wcwidth, pycocotools or pydensecrf2: those
# travel in .whl/ (pydensecrf2 as its sdist, built there with the image's cython and compiler). The
# package itself runs from src/ (PYTHONPATH): the image's torch may be older than our declared range.
# The authors' ExCEL snapshot (../shared/refs/ExCEL-2cd7f51, which does not travel: only the checkout does)
# is copied by --fetch into .whl/refs/ (ignored by git, carried with .whl); the ExCEL rows' release side
# runs it from there (WEAKCLIP_REFS) and is skipped, saying so, without it. OpenCV, scikit-learn, joblib,
# imageio and tqdm, which it and our ExCEL code import, are in the device image.
set -uo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
if [[ "${1:-}" == "--fetch" ]]; then
    exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file: ask git where it is
    mkdir -p "$(dirname "$exclude")"
    grep -qx "/$WHL/" "$exclude" 2>/dev/null || echo "/$WHL/" >> "$exclude"
    mkdir -p "$WHL"
    for pkg in open_clip_torch ftfy wcwidth pycocotools; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHL" "$pkg"
    done
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$WHL" pydensecrf2
    # the authors' ExCEL snapshot, found as tests/excel_ref.py finds it, copied to travel with .whl
    ref=""
    for candidate in "${WEAKCLIP_EXCEL_REF:-}" "${WEAKCLIP_REFS:+$WEAKCLIP_REFS/ExCEL-2cd7f51}" \
            ../shared/refs/ExCEL-2cd7f51; do
        [[ -n "$candidate" && -f "$candidate/model/model_excel.py" ]] && { ref=$candidate; break; }
    done
    rm -rf "$WHL/refs"
    if [[ -n "$ref" ]]; then
        mkdir -p "$WHL/refs" && cp -r "$ref" "$WHL/refs/ExCEL-2cd7f51" && echo "ExCEL snapshot: $ref"
    else
        echo "no ExCEL snapshot found: the ExCEL rows' release side will be skipped on the device"
    fi
    ls -la "$WHL"
    exit 0
fi

OUT=${OUT:-gpu_checks_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WEAKCLIP_OFFLINE=1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt and stdout
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

echo "== install (wheels and pydensecrf2 into /tmp/site)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHL"/*.whl || echo "wheel install failed" | tee -a "$OUT/summary.txt"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
    "$WHL"/pydensecrf2-*.tar.gz || echo "pydensecrf2 build failed: the release rows need it" \
    | tee -a "$OUT/summary.txt"
export PYTHONPATH=/tmp/site:$PWD/src
[[ -d "$WHL/refs/ExCEL-2cd7f51" ]] && export WEAKCLIP_REFS=$PWD/$WHL/refs

step env 30 bash -c 'nvidia-smi; python3 -c "import torch, open_clip, weakclip, pydensecrf; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), \
\"| open_clip\", open_clip.__version__, \"| weakclip\", weakclip.__version__)"'
# the tests that need CUDA (skipped on CPU machines) and the batching / CRF / inference tests on a GPU box
step tests 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_crf.py tests/test_batching.py
# issue 13's table: seeds, training step, pseudo masks, CRF at 64x64 x 16 and at 500x375
step suite 240 python3 benchmarks/suite.py --repeats 2 --only seeds train masks crf64 crffull
# issue 29, point 5: ExCEL's training step (batch 4 of 320), training-free masks and test-time inference
# (4 images of 500x375), ViT-B/16, the authors' code vs ours (a minute: three CLIPs built, 3 runs a row)
step excel 75 python3 benchmarks/suite.py --repeats 2 --excel-images 4 \
    --only excel-train excel-free excel-infer
# what pseudo.window_batch buys on the GPU, and what window_batch 0 chooses
step window_batch 45 python3 benchmarks/window_batch.py --presets voc-plus --batches 1 8 32
# issue 15, point 2: fp32 / bf16 / fp16 + scaler on the same batch
step precision 60 python3 benchmarks/precision.py --steps 3
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
echo "== ddp: $gpus GPU(s); NCCL DDP (issue 15, point 3) needs two: NCCL refuses two ranks on one device," \
    "so it is not part of this script" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
