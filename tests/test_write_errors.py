"""A full or read-only disk: one line saying what could not be written, the free space and what was kept;
no temporary file left behind; the same command resumes once the space is there again."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakclip.cli import main
from weakclip.data.io import read_label_png, write_json_atomic, write_label_png
from weakclip.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from weakclip.errors import OutputError
from weakclip.write_errors import check_writable, free_space, is_write_failure

# what torch.save says when the file under its zip writer fails (a full disk)
_TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 8640 vs 8528"


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _full_torch_save(real, fail_on: int, error: BaseException):
    """torch.save that writes part of the file and fails on its ``fail_on``-th call (1-based)."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on:
            f.write(b"PK\x03\x04" + bytes(100))  # a partial file, as the disk filled up
            if error is None:  # what torch.save into a file object does: its own error while handling ENOSPC
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError:
                    raise RuntimeError(_TORCH_FULL) from None
            raise error
        return real(obj, f, *args, **kwargs)

    return save


@pytest.mark.parametrize("error, reason", [
    (RuntimeError(_TORCH_FULL), "the write failed"),
    (None, "no space left on the device"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
])
def test_a_checkpoint_on_a_full_disk_is_one_line_keeping_the_last(tmp_path, monkeypatch, error, reason):
    state = {"iteration": 1, "model": {"w": torch.arange(6.0)}}
    first = save_checkpoint(tmp_path, state, 1)
    monkeypatch.setattr(torch, "save", _full_torch_save(torch.save, 1, error))
    with pytest.raises(OutputError) as info:
        save_checkpoint(tmp_path, {**state, "iteration": 2}, 2)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"could not write checkpoint {tmp_path / 'checkpoints' / 'iter_0000002.pth'}: "
                              f"{reason} (")
    assert " free on its disk); the last complete checkpoint, iter_0000001.pth, is kept" in message
    assert _temps(tmp_path) == []  # the partial file is gone
    assert latest_checkpoint(tmp_path) == first
    assert torch.equal(load_checkpoint(first)["model"]["w"], torch.arange(6.0))


def test_a_first_checkpoint_on_a_full_disk_says_none_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _full_torch_save(torch.save, 1, RuntimeError(_TORCH_FULL)))
    with pytest.raises(OutputError, match="no complete checkpoint exists yet: free some space"):
        save_checkpoint(tmp_path, {"iteration": 1}, 1)
    assert _temps(tmp_path) == [] and latest_checkpoint(tmp_path) is None


def test_other_errors_inside_a_writer_are_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _full_torch_save(torch.save, 1, RuntimeError("a bug in the writer")))
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        save_checkpoint(tmp_path, {"iteration": 1}, 1)
    assert _temps(tmp_path) == []
    assert not is_write_failure(OSError(errno.ENOENT, "missing"))
    assert is_write_failure(OSError(errno.EROFS, "Read-only file system"))


def test_json_and_masks_on_a_full_disk(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "stage.json", {"status": "complete"})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the write is only refused when flushed to the disk
    with pytest.raises(OutputError) as info:
        write_json_atomic(path, {"status": "other"})
    message = str(info.value)
    assert message.startswith(f"could not write {path}: no space left on the device (")
    assert "what was written before is kept" in message and "finished outputs are skipped" in message
    assert json.loads(path.read_text()) == {"status": "complete"} and _temps(tmp_path) == []
    monkeypatch.undo()

    real_save = Image.Image.save

    def png_on_full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_label_png(tmp_path / "masks" / "a.png", mask)
    monkeypatch.setattr(Image.Image, "save", png_on_full_disk)
    with pytest.raises(OutputError, match=r"could not write .*b\.png: no space left on the device"):
        write_label_png(tmp_path / "masks" / "b.png", mask)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["a.png"]  # a.png kept, no b.png part
    assert np.array_equal(read_label_png(tmp_path / "masks" / "a.png"), mask)


def test_free_space_is_measured_on_the_nearest_existing_folder(tmp_path):
    assert free_space(tmp_path / "not" / "yet" / "there").endswith(" free")
    assert free_space(tmp_path)[0].isdigit()


# ---------------------------------------------------------------------- through the CLI
def _train_args(root: Path, workdir: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "folder", "--data-root", str(root), "--split", "train", "--seeds",
            str(root / "seeds"), "--workdir", str(workdir), "--device", "cpu", "--quiet", "--iters", "4",
            "--checkpoint-every", "2", "--batch-size", "2", "--crop-size", "64", "--num-workers", "0",
            "--set", "model.clip_arch=tiny", "--set", "model.out_blocks=1,2,3,4", "--set", "data.scale=96,64",
            "--set", "model.neck_channels=32", "--set", "model.head_channels=32",
            "--set", "loss.loss_size=16", "--set", "classes=none", *extra]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from weakclip.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=4, n_val=0, image_size=(64, 96))


def test_train_stops_in_one_line_on_a_full_disk_and_resumes(synth, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    work = tmp_path / "w"
    monkeypatch.setattr(torch, "save", _full_torch_save(torch.save, 2, RuntimeError(_TORCH_FULL)))
    assert main(_train_args(synth, work)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("weakclip train: error: could not write checkpoint ")
    assert "iter_0000004.pth: the write failed" in err and "iter_0000002.pth, is kept" in err
    assert _temps(work) == [] and latest_checkpoint(work).name == "iter_0000002.pth"
    assert not (work / ".weakclip.lock").exists()
    monkeypatch.undo()  # the space is there again
    assert main(_train_args(synth, work, "--resume")) == 0
    out = capsys.readouterr().out
    assert '"start_iter": 2,' in out and '"end_iter": 4,' in out  # on from the kept checkpoint
    assert latest_checkpoint(work).name == "iter_0000004.pth"
    assert load_checkpoint(latest_checkpoint(work))["iteration"] == 4


def _read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` refuse new files the way a read-only mount does (EROFS), also for root."""
    real_open, real_mkdir = os.open, Path.mkdir
    inside = str(folder.resolve()) + os.sep

    def ro_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(Path(path).resolve()).startswith(inside):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(self, *args, **kwargs):
        if str(self.resolve()).startswith(inside):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(Path, "mkdir", ro_mkdir)


def test_a_read_only_folder_fails_before_the_work(synth, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    # train: at the start (the lock), before a model is built
    assert main(_train_args(synth, ro / "w")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"weakclip train: error: could not write the folder {ro / 'w'}: the file system is "
                          "read-only (") and "nothing was written" in err and "\n" not in err
    # evaluate --json: before any mask is read (no table printed)
    gt = tmp_path / "gt"
    write_label_png(gt / "a.png", np.zeros((4, 4), np.uint8))
    assert main(["evaluate", "--pred", str(gt), "--gt", str(gt), "--classes", "voc", "--quiet",
                 "--json", str(ro / "scores.json")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("weakclip evaluate: error: could not write into the --json folder ")
    # synth --out
    assert main(["synth", "--out", str(ro / "data")]) == 2
    assert "could not write into the --out folder" in capsys.readouterr().err
    assert list(ro.iterdir()) == []


def test_a_read_only_folder_by_its_permissions(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        with pytest.raises(OutputError, match="permission denied"):
            check_writable(ro / "out")
        assert main(["report", str(ro)]) == 2
        assert "could not write the lock file" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_the_cli_turns_any_disk_refusal_into_one_line(tmp_path, monkeypatch, capsys):
    import weakclip.report.analysis as analysis

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w" / "log.csv"))

    monkeypatch.setattr(analysis, "analyse", full)
    assert main(["report", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"weakclip report: error: could not write {tmp_path / 'w' / 'log.csv'}: no space")
    assert "\n" not in err


def test_the_writability_check_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # neither the folders nor the probe file
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=r"could not write into the output folder .*f/out: .*f is a file"):
        check_writable(tmp_path / "f" / "out")


def test_check_space_refuses_a_write_the_disk_cannot_hold(tmp_path, monkeypatch):
    import shutil

    from weakclip.write_errors import check_space

    check_space(tmp_path / "new" / "f", 1024)  # plenty here: nothing happens, nothing is made
    assert list(tmp_path.iterdir()) == []
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=3 * 2 ** 20))
    with pytest.raises(OutputError) as exc:
        check_space(tmp_path / "out", 5 * 2 ** 20, "nothing was written", what="the export folder")
    assert str(exc.value) == (f"could not write the export folder {tmp_path / 'out'}: no space left on the "
                              "device (3.0 MiB free on its disk, it needs about 5.0 MiB); nothing was "
                              "written")
