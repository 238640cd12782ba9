"""``weakclip demo``: the whole pipeline on the embedded synthetic dataset, on CPU, in minutes.

What it runs: the synthetic dataset (textured shapes, ground truth, and deliberately incomplete,
noisy seed masks standing in for a CAM method's seeds) -> a tiny CLIP built on the spot with random
weights (no download) -> refinement training -> pseudo masks with flip and dense CRF -> retraining of a
small DeepLabV3 from scratch -> val evaluation. It writes ``report.json`` (``seeds_miou``,
``pseudo_miou``, ``final_miou``: mIoU in percent against the synthetic ground truth), overlay
pictures (image | seed | pseudo mask | ground truth), a plot of the refinement's training losses and, like
every ``weakclip run``, the page ``report.html`` (:mod:`weakclip.report`).

A random CLIP has no knowledge of the classes, so the built-in CLIP-ES seeds would be noise: the demo
uses the dataset's own seeds, the way a user brings MCTformer or any CAM method's seeds. On real data
with real CLIP weights, ``weakclip run`` without ``--seeds`` makes the seeds itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weakclip.report.panels import panel_row

DEMO_ARCH = "tiny-p8"


@dataclass
class DemoSize:
    """How big the demo is; ``small()`` is the reduced size the test suite runs."""

    n_train: int = 24
    n_val: int = 12
    refine_iters: int = 300
    retrain_iters: int = 400
    image_size: tuple[int, int] = (64, 96)

    @classmethod
    def small(cls) -> DemoSize:
        return cls(n_train=12, n_val=6, refine_iters=120, retrain_iters=150)


def refine_overrides(size: DemoSize) -> list[str]:
    crop = size.image_size[0]
    return [
        f"model.clip_arch={DEMO_ARCH}", "model.out_blocks=1,2,3,4", "model.neck_channels=64",
        "model.head_channels=64", "model.match_width=64", "model.match_layers=1", "model.drop_path_rate=0",
        "data.split=train", f"data.crop_size={crop}", f"data.scale={size.image_size[1]},{crop}",
        "data.ratio_range=0.75,1.5", "classes=none",
        f"train.iters={size.refine_iters}", "train.batch_size=4", "train.lr=1e-3", "train.warmup_iters=20",
        "train.min_lr=1e-5", f"train.checkpoint_every={max(10, size.refine_iters // 4)}", "train.log_every=5",
        "loss.loss_size=32",
        # pseudo masks at one scale with flip, the VOC CRF in the preset's worker processes; the data
        # loader and CRF worker counts are the preset's too: the demo runs the pools users run
        "pseudo.scales=1.0", "pseudo.flip=true", f"pseudo.crop={crop}",
        f"pseudo.stride={max(1, (2 * crop) // 3)}", f"pseudo.base_scale={size.image_size[1]},{crop}",
        "pseudo.crf=voc",
    ]


def retrain_overrides(size: DemoSize) -> list[str]:
    crop = size.image_size[0]
    return [
        "model.name=deeplabv3_resnet18", "model.pretrained_backbone=false", "model.output_stride=8",
        "model.head_channels=64", "data.split=train", "data.val_split=val", f"data.crop_size={crop}",
        "data.scale_range=0.75,1.5",
        f"train.iters={size.retrain_iters}", "train.batch_size=8", "train.optimizer=adamw", "train.lr=2e-3",
        f"train.checkpoint_every={max(10, size.retrain_iters // 4)}", "train.log_every=10",
        "eval.scales=1.0", "eval.flip=true",
    ]


def make_tiny_clip(path: Path, seed: int = 0, arch: str = DEMO_ARCH) -> Path:
    """A tiny CLIP (``arch``; the demo's: patch 8) with random weights, saved as an open_clip state dict."""
    import torch

    from weakclip.models.clip import get_arch, make_open_clip_model

    if path.is_file():
        return path
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make_open_clip_model(get_arch(arch))
    from weakclip.write_errors import writing

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path, what="demo CLIP weights"):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------- pictures
def plot_losses(log_csv: Path, out_png: Path, title: str = "refinement training losses") -> Path:
    """A training's curves (loss terms and learning rate against the iteration), matplotlib."""
    from weakclip.report.analysis import read_log_csv
    from weakclip.report.plots import plot_training

    return plot_training(read_log_csv(log_csv), title, out_png)


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_overlays(data_root: Path, out_dir: Path, columns: Sequence[tuple[str, Path | None]],
                   count: int = 4) -> list[Path]:
    """Image | one mask per column | ground truth, for the first ``count`` training images of the synthetic
    folder dataset at ``data_root``: ``columns`` are ``(title, folder of <id>.png)``, a folder of None being
    the dataset's own seeds."""
    from weakclip.data.datasets import build_dataset
    from weakclip.data.io import read_label_png, write_bytes_atomic

    dataset = build_dataset("folder", data_root, split="train")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(count, len(dataset))):
        ident = dataset.ids[i]
        gt = dataset.read_gt(i)
        masks = [dataset.read_seed(i) if folder is None else
                 read_label_png(folder / f"{ident}.png", expected_hw=gt.shape, what=title,
                                reference=f"its ground-truth mask {dataset.gt_path(i)}")
                 for title, folder in columns]
        row = panel_row(dataset.read_image(i), [*masks, gt], [*(t for t, _ in columns), "ground truth"])
        written.append(write_bytes_atomic(out_dir / f"{ident}.png", _png_bytes(row)))
    return written


# ---------------------------------------------------------------------- the demo
def run_demo(workdir: str | Path, size: DemoSize | None = None, *, device: str | None = None,
             progress: bool = True, log=print) -> dict[str, Any]:
    """Run the demo in ``workdir`` (resumable like ``weakclip run``) and return its report."""
    from weakclip.data.io import write_json_atomic
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.distributed import barrier, init_distributed
    from weakclip.pipeline import Pipeline, PipelineConfig

    size = size or DemoSize()
    workdir = Path(workdir)
    data_root = workdir / "data"
    clip_file = workdir / "tiny_clip.pt"
    info = init_distributed(device)  # under torchrun: the first process writes the data, the others wait
    if info.is_main:
        if not (data_root / "labels.json").is_file():
            make_synthetic_dataset(data_root, n_train=size.n_train, n_val=size.n_val,
                                   image_size=size.image_size)
        make_tiny_clip(clip_file)
    barrier()
    cfg = PipelineConfig(workdir=workdir, data_root=data_root, preset="voc", dataset="folder",
                         train_split="train", val_split="val", clip_weights=clip_file,
                         seeds=data_root / "seeds", refine_overrides=refine_overrides(size),
                         retrain_overrides=retrain_overrides(size), retrain_preset="voc-plus",
                         device=device, progress=progress)
    report = Pipeline(cfg, log=log).run()
    if not info.is_main:
        return report
    overlays = write_overlays(data_root, workdir / "overlays", [("seed", None),
                                                                ("pseudo mask", workdir / "pseudo_masks")])
    plot = plot_losses(workdir / "refine" / "log.csv", workdir / "losses.png")
    gain = None
    if report["pseudo_miou"] is not None and report["seeds_miou"] is not None:
        gain = round(report["pseudo_miou"] - report["seeds_miou"], 2)
    report.update({"pseudo_gain_over_seeds": gain, "overlays": [str(p) for p in overlays],
                   "loss_plot": str(plot)})
    write_json_atomic(workdir / "report.json", report)
    if gain is not None:
        verdict = "beat" if gain > 0 else "do NOT beat"
        log(f"the refined pseudo masks {verdict} the seeds by {gain:+.2f} mIoU points "
            f"({report['seeds_miou']:.2f}% -> {report['pseudo_miou']:.2f}%)")
    log(f"overlays: {workdir / 'overlays'}; loss plot: {plot}; page: {workdir / 'report.html'}")
    return report


def run_method_demo(workdir: str | Path, small: bool = False, *, device: str | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """WeakCLIP's ``"demo"`` entry point (:mod:`weakclip.methods`): ``weakclip demo [--small]``."""
    return run_demo(workdir, DemoSize.small() if small else DemoSize(), device=device, progress=progress)
