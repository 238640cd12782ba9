"""A tiny WeakCLIP refinement work folder, for tests that need one without training it."""

from __future__ import annotations

from pathlib import Path


def tiny_refinement_folder(base: Path, n_val: int = 2) -> tuple[Path, Path]:
    """A synthetic dataset (3 training images, ``n_val`` val images, 32 x 40, 3 classes) and a refinement work
    folder beside it whose one checkpoint holds an untrained tiny model with its CLIP towers (as one trained
    without a weights file): ``(data root, work folder)``."""
    import torch

    from weakclip.config import Config, PseudoMaskConfig
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.models import ModelConfig, build_model

    root = make_synthetic_dataset(base / "data", n_train=3, n_val=n_val, image_size=(32, 40), n_classes=3)
    classes = (root / "classes.txt").read_text().splitlines()
    cfg = Config()
    cfg.model = ModelConfig(clip_arch="tiny", out_blocks=(1, 2, 3, 4), match_width=32, match_heads=2,
                            match_layers=1, neck_channels=32, head_channels=32)
    cfg.data.kind, cfg.data.root, cfg.classes = "folder", str(root), classes
    cfg.pseudo = PseudoMaskConfig(scales=(1.0,), flip=False, crop=64, stride=43, base_scale=(64, 48),
                                  crf="none", crf_workers=0)
    model = build_model(cfg.model, classes, pretrained_download=False)
    work = base / "refine"
    (work / "checkpoints").mkdir(parents=True)
    torch.save({"iteration": 1, "model": model.state_dict(), "config": cfg.to_dict(), "clip_weights": None},
               work / "checkpoints" / "iter_0000001.pth")
    return root, work
