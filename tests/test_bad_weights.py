"""Files that are not the weights a reader expects: every reader (and the commands over them) says in one
line what the file is -- random bytes, an image, an empty file, a truncated checkpoint, another program's
checkpoint, a pickle that would run code -- and never PyTorch's advice to load with weights_only=False."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from weakclip.cli import main
from weakclip.errors import WeakclipError, WeightsError

KINDS = ("random", "png", "empty", "truncated", "foreign", "malicious")

EXPECTED = {
    "random": r"starts with [0-9a-f]{2} [0-9a-f]{2} [0-9a-f]{2} [0-9a-f]{2} \(.*\), not a PyTorch file",
    "png": r"starts with 89 50 4e 47 \(a PNG image\), not a PyTorch file",
    "empty": r"is empty \(0 bytes\)",
    "truncated": r"is truncated or damaged",
    "foreign": r"holds a dict with keys epoch, net, best_acc",
    "malicious": r"is refused: it needs posix\.system, outside the allow-list",
}


class _RunsShell:
    """Pickles as a call of os.system that would create ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def make_bad_file(kind: str, folder, suffix: str = ".pth"):
    """A file of ``kind`` in ``folder``; for "malicious" also the marker path its payload would create."""
    from weakclip.engine.checkpoint import save_checkpoint

    path = folder / f"{kind}{suffix}"
    marker = folder / "payload_ran"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "png":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":  # a real training checkpoint, cut in the middle (an interrupted copy)
        full = save_checkpoint(folder / "work", {"iteration": 1, "model": {"w": torch.randn(64, 64)}}, 1)
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":  # another program's training checkpoint
        torch.save({"epoch": 3, "net": {"fc.weight": torch.zeros(2, 2)}, "best_acc": 0.5}, path)
    elif kind == "malicious":
        torch.save({"model": {"w": torch.zeros(1)}, "hook": _RunsShell(marker)}, path)
    return path, marker


def _check(message: str, kind: str, path) -> None:
    assert "\n" not in message, message
    assert str(path) in message, message
    assert "weights_only" not in message and "Weights only load failed" not in message, message
    assert re.search(EXPECTED[kind], message), (kind, message)


# ---------------------------------------------------------------------------- every reader of weights
def _api_load(path):
    import weakclip

    weakclip.load(path, "cpu")


def _load_trained_model(path):
    from weakclip.inference.loading import load_trained_model

    load_trained_model(path)


def _training_checkpoint(path):
    from weakclip.engine.checkpoint import load_checkpoint

    load_checkpoint(path)


def _clip_weights(path):
    from weakclip.models.clip_weights import read_clip_weights

    read_clip_weights(path)


def _resnet38(path):
    from weakclip.retrain.resnet38 import read_resnet38_file

    read_resnet38_file(path)


def _torchvision_backbone(path):
    import torchvision

    from weakclip.retrain.models import load_backbone_file

    load_backbone_file(torchvision.models.resnet18(weights=None), path, "resnet18")


def _retrained_network(path):
    from weakclip.retrain.deeplabv1 import read_checkpoint

    read_checkpoint(path)


def _release_checkpoint(path):
    from weakclip.models.release_checkpoint import load_release_checkpoint

    load_release_checkpoint(path)


READERS = {
    "weakclip.load": _api_load,
    "load_trained_model (pseudo-masks)": _load_trained_model,
    "load_checkpoint (train/retrain --resume)": _training_checkpoint,
    "read_clip_weights (--clip-weights)": _clip_weights,
    "read_resnet38_file (--backbone-weights)": _resnet38,
    "load_backbone_file (--backbone-weights)": _torchvision_backbone,
    "read_checkpoint (retrain --checkpoint)": _retrained_network,
    "load_release_checkpoint": _release_checkpoint,
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_reader_words_each_bad_file_in_one_line(reader, kind, tmp_path):
    path, marker = make_bad_file(kind, tmp_path)
    with pytest.raises(WeakclipError) as info:
        READERS[reader](path)
    message = str(info.value)
    if kind == "foreign" and reader.startswith("read_clip_weights"):
        assert "holds a dict with keys epoch, net, best_acc, no tensors" in message
        assert "\n" not in message and "weights_only" not in message
    else:
        _check(message, kind, path)
    assert isinstance(info.value, WeightsError)
    assert not marker.exists()  # the pickled os.system call never ran


@pytest.mark.parametrize("kind", ["random", "png", "empty"])
def test_mxnet_params_reader_says_what_the_file_is(kind, tmp_path):
    from weakclip.retrain.resnet38 import read_resnet38_file

    path, _ = make_bad_file(kind, tmp_path, suffix=".params")
    with pytest.raises(WeightsError) as info:
        read_resnet38_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert re.search(EXPECTED[kind].replace("a PyTorch", "an MXNet"), message), message


def test_other_formats_named_by_their_first_bytes(tmp_path):
    import gzip
    import pickle
    import zipfile

    from weakclip.safe_load import sniff_file

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(60))
    (tmp_path / "a.gz").write_bytes(gzip.compress(b"weights"))
    (tmp_path / "a.html").write_text("<!DOCTYPE html><html><body>404</body></html>")
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({"w": [1, 2]}))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
        archive.writestr("weights/readme.txt", "hello")
    assert "(a JPEG image)" in sniff_file(tmp_path / "a.jpg")
    assert sniff_file(tmp_path / "a.gz").startswith("starts with 1f 8b")
    assert "an HTML page" in sniff_file(tmp_path / "a.html")
    assert "a Python pickle, not written by torch.save" in sniff_file(tmp_path / "a.pkl")
    zipped = sniff_file(tmp_path / "a.zip")
    assert "a zip archive but not a PyTorch file (it holds weights/readme.txt)" in zipped
    # what torch.save writes passes, the legacy format included
    torch.save({"w": torch.zeros(1)}, tmp_path / "new.pth")
    torch.save({"w": torch.zeros(1)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert sniff_file(tmp_path / "new.pth") is None and sniff_file(tmp_path / "old.pth") is None


# ---------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from weakclip.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=2, n_val=0, image_size=(32, 32))


def _cli_case(command: str, path, tmp_path, synth) -> list[str]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "x.png")
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return {
        "seeds --clip-weights": ["seeds", "--data-root", str(synth), "--split", "train", "--clip-weights",
                                 str(path), "--arch", "tiny", "--out", str(tmp_path / "o"), "--device", "cpu",
                                 "--quiet"],
        "export": ["export", str(path), "--format", "torchscript", "--out", str(tmp_path / "o")],
        "weights": ["weights", str(path)],
        "predict": ["predict", str(images), "--checkpoint", str(path), "--out", str(tmp_path / "o"),
                    "--device", "cpu", "--quiet"],
        "pseudo-masks": ["pseudo-masks", "--checkpoint", str(path), "--data-root", str(data),
                         "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"],
    }[command]


@pytest.mark.parametrize("command", ["weights", "seeds --clip-weights", "predict", "pseudo-masks", "export"])
@pytest.mark.parametrize("kind", KINDS)
def test_commands_exit_2_with_one_line(command, kind, tmp_path, capsys, synth):
    path, marker = make_bad_file(kind, tmp_path)
    assert main(_cli_case(command, path, tmp_path, synth)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"weakclip {command.split()[0]}: error: ")
    if kind == "foreign" and command in ("weights", "seeds --clip-weights"):
        assert "holds a dict with keys epoch, net, best_acc" in err and "\n" not in err
    else:
        _check(err, kind, path)
    assert not marker.exists()
