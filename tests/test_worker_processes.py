"""Worker processes on real photos: the pseudo-mask stage's CRF pool with the presets' default worker count,
after the parent ran the model on several torch threads, and what Ctrl-C, SIGTERM and ``kill -9`` leave.

Before, a CRF worker forked from a parent that had used torch's OpenMP thread pool waited forever inside
its first parallel torch op (``gomp_team_barrier_wait_end``): the first test hung there (measured: it
failed at its timeout on the code before the change). Forked workers now run no torch at all, and a
job that does is spawned. Both tests run real processes under a timeout that fails instead of hanging CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakclip.config import load_preset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

SRC = str(Path(__file__).resolve().parents[1] / "src")

# runs in a fresh interpreter: the model on 2 threads first, then the stage with the voc preset's pseudo
# section as it is (its CRF workers, the release's pydensecrf), then the same with no workers
_STAGE_SCRIPT = textwrap.dedent('''
    import sys

    import torch
    from torch import nn

    class Net(nn.Module):
        num_classes = 4

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 5, padding=2)

        def forward(self, x):
            return {"logits": self.conv(x)}

    class Photos:
        kind, has_gt, classes = "voc", False, ["background", "a", "b", "c"]

        def __init__(self, n):
            from skimage import data
            photos = [data.astronaut(), data.coffee(), data.chelsea()]
            self.images = [photos[i % 3] for i in range(n)]
            self.ids = [f"im{i:02d}" for i in range(n)]

        def __len__(self):
            return len(self.ids)

        def read_image(self, i):
            return self.images[i]

        def get_labels(self, i):
            return None

    if __name__ == "__main__":
        from weakclip.config import load_preset
        from weakclip.inference.pseudo_masks import generate_pseudo_masks

        torch.set_num_threads(2)
        model = Net().eval()
        with torch.no_grad():  # the parent's OpenMP thread pool is used before any worker starts
            for _ in range(3):
                model(torch.randn(2, 3, 512, 512))
        settings = load_preset("voc").pseudo
        assert settings.crf_workers >= 2 and settings.crf_backend == "pydensecrf", settings
        settings.scales, settings.flip = (0.25,), False
        out = sys.argv[1]
        pooled = generate_pseudo_masks(model, Photos(6), out + "/pooled", settings, progress=False)
        spawned = generate_pseudo_masks(model, Photos(6), out + "/spawned", settings, start_method="spawn",
                                        progress=False)
        # a CRF backend that runs torch, in (spawned) workers
        settings.crf_backend = "lattice"
        torch_job = generate_pseudo_masks(model, Photos(3), out + "/lattice_pooled", settings,
                                          crf_on_device=False, progress=False)
        settings.crf_workers = 0
        generate_pseudo_masks(model, Photos(3), out + "/lattice_inline", settings, progress=False)
        settings.crf_backend = "pydensecrf"
        inline = generate_pseudo_masks(model, Photos(6), out + "/inline", settings, progress=False)
        print("written", pooled["written"], spawned["written"], torch_job["written"], inline["written"],
              flush=True)
        for name in ("coco", "voc-plus", "coco-plus"):  # every preset's defaults, on the CPU
            other = load_preset(name).pseudo
            assert other.crf_workers >= 2 and other.crf != "none", (name, other)
            other.scales, other.flip = (0.25,), False
            done = generate_pseudo_masks(model, Photos(3), out + "/" + name, other, progress=False)
            assert done["written"] == 3 and not done["settings"]["crf_on_device"], (name, done)
        print("presets done", flush=True)
''')


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_or_fail(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... did not finish in {timeout} s (hung?): {err[-1500:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_pseudo_masks_finish_with_the_presets_workers_after_a_threaded_model(tmp_path):
    pytest.importorskip("skimage.data")
    pytest.importorskip("pydensecrf")
    script = tmp_path / "stage.py"
    script.write_text(_STAGE_SCRIPT)
    done = _run_or_fail([sys.executable, str(script), str(tmp_path)], 300, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "written 6 6 3 6" in done.stdout and "presets done" in done.stdout
    names = sorted(p.name for p in (tmp_path / "inline").glob("*.png"))
    assert len(names) == 6
    for name in names:  # the workers write what the inline CRF writes, forked or spawned
        inline = np.asarray(Image.open(tmp_path / "inline" / name))
        for pool in ("pooled", "spawned"):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / pool / name)), inline)
        assert len(np.unique(inline)) >= 2  # a real segmentation of the photo, not a blank mask
    for name in names[:3]:  # and the torch lattice CRF in spawned workers what it does inline
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "lattice_pooled" / name)),
                                      np.asarray(Image.open(tmp_path / "lattice_inline" / name)))


def test_the_release_crf_job_runs_no_torch():
    """The job forked workers run imports no torch (so no torch op can meet a stale thread pool)."""
    code = ("import sys, weakclip.inference.crf_worker, weakclip.crf.params, weakclip.worker_pool; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- signals and orphans
def _children() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            out[int(entry)] = int(fields[1])
    return out


def _descendants(pid: int) -> set[int]:
    table = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in table.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    table = _children()
    return {p for p in pids if p in table}


def _kill_tree(pid: int) -> None:
    for p in _descendants(pid) | {pid}:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


@pytest.fixture(scope="module")
def photo_job(tmp_path_factory):
    """A folder dataset of real photos and a tiny refinement checkpoint whose pseudo section is the voc
    preset's (two CRF workers, pydensecrf), only the windows made small."""
    pytest.importorskip("skimage.data")
    pytest.importorskip("pydensecrf")
    import torch
    from skimage import data

    from weakclip.models import ModelConfig, build_model

    root = tmp_path_factory.mktemp("photos")
    classes = ["background", "person", "cup", "cat"]
    (root / "images").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    labels = {}
    photos = [("astronaut", ["person"]), ("coffee", ["cup"]), ("chelsea", ["cat"])]
    for i in range(48):
        name, tags = photos[i % 3]
        Image.fromarray(getattr(data, name)()).resize((320, 240), Image.BILINEAR).save(
            root / "images" / f"p{i:02d}.jpg")
        labels[f"p{i:02d}"] = tags
    (root / "labels.json").write_text(json.dumps(labels))
    cfg = load_preset("voc")
    cfg.model = ModelConfig(clip_arch="tiny", out_blocks=(1, 2, 3, 4), match_width=32, match_heads=2,
                            match_layers=1, neck_channels=32, head_channels=32)
    cfg.data.kind, cfg.data.root, cfg.classes = "folder", str(root), classes
    cfg.pseudo.scales, cfg.pseudo.flip = (1.0,), True
    cfg.pseudo.crop, cfg.pseudo.stride, cfg.pseudo.base_scale = 128, 85, (320, 240)
    assert cfg.pseudo.crf_workers >= 2 and cfg.pseudo.crf_backend == "pydensecrf"
    torch.manual_seed(0)
    model = build_model(cfg.model, classes, pretrained_download=False)
    ckpt = root / "refine.pth"
    torch.save({"iteration": 1, "model": model.state_dict(), "config": cfg.to_dict(), "clip_weights": None},
               ckpt)
    return root, ckpt


def _start(photo_job, out: Path) -> subprocess.Popen:
    root, ckpt = photo_job
    cmd = [sys.executable, "-m", "weakclip", "pseudo-masks", "--checkpoint", str(ckpt), "--data-root",
           str(root), "--out", str(out), "--device", "cpu", "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)


def _wait_for_workers(proc: subprocess.Popen, out: Path, timeout: float = 180) -> set[int]:
    """The main process's descendants once the CRF workers have written a mask."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the command ended early ({proc.returncode}): {proc.stderr.read()[-1500:]}")
        kids = _descendants(proc.pid)
        if len(kids) >= 2 and any(out.glob("*.png")):
            return kids
        time.sleep(0.2)
    _kill_tree(proc.pid)
    pytest.fail("no CRF worker wrote a mask in time")


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "kill-9"])
def test_a_stopped_stage_leaves_no_worker_behind(photo_job, tmp_path, how):
    out = tmp_path / "masks"
    proc = _start(photo_job, out)
    try:
        kids = _wait_for_workers(proc, out)
        sent = time.monotonic()
        if how == "ctrl-c":  # the terminal sends SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{how}: the command did not stop within 20 s")
        stopped = time.monotonic() - sent
        left = _wait_gone(kids, 10)
        assert not left, f"{how}: processes {sorted(left)} outlived the main process"
        expected = {"ctrl-c": (130, "interrupted"), "sigterm": (143, "terminated"), "kill-9": (-9, "")}[how]
        assert proc.returncode == expected[0], err[-1500:]
        assert expected[1] in err and "Traceback" not in err, err[-1500:]
        assert stopped < 20
        # the work-folder lock goes with a clean stop; kill -9 leaves it for the next run to take over
        assert (out / ".weakclip.lock").exists() == (how == "kill-9")
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    # what was written is whole: every mask reads back at the photo's size
    written = list(out.glob("*.png"))
    assert written
    for path in written:
        assert np.asarray(Image.open(path)).shape == (240, 320)
