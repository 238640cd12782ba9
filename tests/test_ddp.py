"""Two gloo processes under ``torchrun`` with global batch 4 == one process with global batch 4."""

import os
import socket
import subprocess
import sys

import pytest

from weakclip.cli import main
from weakclip.data.synthetic import make_synthetic_dataset
from weakclip.engine.checkpoint import latest_checkpoint, load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(root, workdir):
    # Dropout and stochastic depth off: their random masks differ between 1 and 2 processes. BatchNorm in
    # eval mode: with batch statistics (the release) each CPU process would normalise by its own half
    # batch (on CUDA they become SyncBatchNorm, as the release's). The identity CE averages over ALL pixels
    # (the release's mmseg), so two equal half-batches average exactly to the full batch.
    return ["train", "--preset", "voc", "--dataset", "folder", "--data-root", str(root), "--split", "train",
            "--workdir", str(workdir), "--device", "cpu", "--quiet", "--iters", "4", "--batch-size", "4",
            "--crop-size", "64", "--num-workers", "0", "--lr", "1e-3",
            "--set", "train.warmup_iters=1", "--set", "model.clip_arch=tiny",
            "--set", "model.out_blocks=1,2,3,4", "--set", "data.scale=96,64",
            "--set", "model.neck_channels=32", "--set", "model.head_channels=32",
            "--set", "loss.loss_size=16", "--set", "classes=none", "--set", "model.drop_path_rate=0",
            "--set", "model.match_dropout=0", "--set", "model.head_dropout=0",
            "--set", "model.bn_eval=true", "--set", "train.log_every=1", "--set", "model.match_width=32",
            "--set", "model.match_layers=1", "--checkpoint-every", "1", "--set", "train.keep_checkpoints=10"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_match_one(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n_train=6, n_val=0, image_size=(64, 96))

    assert main(_args(root, tmp_path / "one")) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "weakclip",
           *_args(root, tmp_path / "two")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "DDP over 2 processes (gloo)" in res.stdout + res.stderr
    assert not (tmp_path / "two" / ".weakclip.lock").exists()  # rank 0 held it, the job's ranks shared it

    one = load_checkpoint(latest_checkpoint(tmp_path / "one"))
    two = load_checkpoint(latest_checkpoint(tmp_path / "two"))
    assert one["iteration"] == two["iteration"] == 4
    assert two["world_size"] == 2 and len(two["rng"]) == 2
    assert one["model"].keys() == two["model"].keys()
    # iteration 1 runs at lr 1e-3 x 1e-6 (warm-up start): its checkpoint is the initial model to 1e-8
    start = load_checkpoint(tmp_path / "one" / "checkpoints" / "iter_0000001.pth")["model"]
    start_two = load_checkpoint(tmp_path / "two" / "checkpoints" / "iter_0000001.pth")["model"]
    assert _max_diff(start, start_two) < 1e-6
    moved = _max_diff(one["model"], start)
    gap = _max_diff(one["model"], two["model"])
    print(f"\nlargest weight change over the run {moved:.2e}; largest 1-vs-2-process difference {gap:.2e}")
    assert moved > 1e-3
    # Same samples, same augmentation, averaged gradients: only float summation order differs. Adam
    # divides by sqrt(v), which magnifies that noise in near-zero gradients, so the bound is relative
    # to how far the weights moved (a different data order would differ by about `moved` itself).
    assert gap < 0.02 * moved
    assert gap < 1e-5

    # the logged losses agree (mean over the processes), iteration by iteration
    log_one = (tmp_path / "one" / "log.csv").read_text().splitlines()
    log_two = (tmp_path / "two" / "log.csv").read_text().splitlines()
    assert len(log_one) == len(log_two) == 5
    for a, b in zip(log_one[1:], log_two[1:]):
        loss_a, loss_b = float(a.split(",")[2]), float(b.split(",")[2])
        assert loss_a == pytest.approx(loss_b, abs=1e-4)


_HOLDER = """
import sys, time
from weakclip.workdir_lock import workdir_lock
with workdir_lock(sys.argv[1], "weakclip train"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_torchrun_job_on_a_held_folder_stops_at_once(tmp_path):
    work = tmp_path / "w"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(work)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "weakclip",
               *_args(tmp_path / "no-data", work)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode != 0
        assert f"is in use by 'weakclip train' (pid {holder.pid} on host" in res.stderr
        assert sorted(p.name for p in work.iterdir()) == [".weakclip.lock"]
    finally:
        holder.kill()
        holder.wait()
