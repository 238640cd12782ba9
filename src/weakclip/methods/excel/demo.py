"""``weakclip demo --method excel``: ExCEL's whole chain on the embedded synthetic dataset, on CPU, in
minutes.

What it runs: the synthetic dataset (textured shapes with ground truth; its seed masks are not used) -> a tiny
CLIP built on the spot with random weights (the ``tiny-excel`` arch: 12 blocks as ViT-B/16, patch 16, width
128; no download) and a small descriptors file written for the synthetic classes -> ExCEL's ``weakclip run``:
training-free masks, the single-stage training (both phases: the second CLIP pass and the affinity target from
the prediction start inside the demo's iterations), the trained network's masks of the training split, the val
evaluation. It writes ``report.json`` (``seeds_miou``: training-free masks, ``pseudo_miou``, ``final_miou``:
mIoU in percent against the synthetic ground truth), overlay pictures (image | training-free mask | pseudo
mask | ground truth), the training curves ``losses.png`` and ``report.html``.

A CLIP with random weights knows nothing of the classes, and ExCEL takes all it knows from CLIP: its masks are
near chance here. The demo shows that every stage runs, resumes and reports on this machine; it measures
nothing about ExCEL (the README says so next to its table).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_ARCH = "tiny-excel"

#: Sentences describing the synthetic classes (the descriptors file the demo writes; ExCEL's format:
#: ``{class: [sentences]}``).
DEMO_DESCRIPTORS: dict[str, list[str]] = {
    "disk": ["a round flat shape", "a filled circle", "a smooth coloured spot", "a coin seen from above"],
    "square": ["a shape with four equal sides", "a block with right angles", "a flat tile", "a box outline"],
    "triangle": ["a shape with three corners", "a pointed wedge", "a flat pyramid outline", "a road sign"],
    "ring": ["a circle with a hole", "a hollow round band", "a loop", "a donut shape"],
    "cross": ["two bars crossing", "a plus sign", "a shape of four arms", "an x mark"],
    "star": ["a shape with pointed arms", "a five-pointed figure", "a spiky outline", "a sheriff badge"],
}


@dataclass
class ExcelDemoSize:
    """How big the demo is; ``small()`` is the reduced size the test suite runs."""

    n_train: int = 24
    n_val: int = 12
    iters: int = 120
    image_size: tuple[int, int] = (64, 96)

    @classmethod
    def small(cls) -> ExcelDemoSize:
        return cls(n_train=8, n_val=4, iters=24)


def demo_overrides(size: ExcelDemoSize) -> list[str]:
    """The ``excel-voc`` preset's settings scaled to the tiny CLIP and the small images: crops and test size
    of 64 (4 x 4 patches), 12 text clusters (ExCEL's aggregation drops the lowest tenth: at least 11), a
    small decoder; the two switches of the schedule placed at a half and three quarters of the iterations so
    that both phases run."""
    crop = size.image_size[0]
    iters = size.iters
    return [
        f"model.clip_arch={DEMO_ARCH}", "model.embedding_dim=64", "model.decoder_heads=4",
        "text.num_clusters=12", f"data.crop_size={crop}", "data.scale_range=0.75,1.5",
        f"train.iters={iters}", "train.batch_size=4", "train.lr=5e-4", "train.warmup_iters=5",
        f"train.checkpoint_every={max(10, iters // 4)}", "train.log_every=5",
        f"labels.switch_iter={iters // 2}", f"labels.aff_from_pred_iter={(3 * iters) // 4}",
        f"infer.size={crop}", "infer.scales=1.0,1.5", f"free.size={crop}",
    ]


def write_descriptors(path: Path, classes: list[str]) -> Path:
    from weakclip.data.io import write_json_atomic

    return write_json_atomic(path, {c: DEMO_DESCRIPTORS[c] for c in classes if c in DEMO_DESCRIPTORS})


def run_demo(workdir: str | Path, small: bool = False, *, device: str | None = None, progress: bool = True,
             size: ExcelDemoSize | None = None, log=print) -> dict[str, Any]:
    """Run the ExCEL demo in ``workdir`` (resumable like ``weakclip run``) and return its report (the
    ``"demo"`` entry point of :mod:`weakclip.methods`)."""
    from weakclip.data.classes import read_class_file
    from weakclip.data.io import write_json_atomic
    from weakclip.data.synthetic import make_synthetic_dataset
    from weakclip.demo import make_tiny_clip, plot_losses, write_overlays
    from weakclip.distributed import barrier, init_distributed
    from weakclip.pipeline import PipelineConfig, build_pipeline

    size = size or (ExcelDemoSize.small() if small else ExcelDemoSize())
    workdir = Path(workdir)
    data_root = workdir / "data"
    clip_file = workdir / "tiny_excel_clip.pt"
    descriptors = workdir / "descriptors.json"
    info = init_distributed(device)  # under torchrun: the first process writes the data, the others wait
    if info.is_main:
        if not (data_root / "labels.json").is_file():
            make_synthetic_dataset(data_root, n_train=size.n_train, n_val=size.n_val,
                                   image_size=size.image_size)
        make_tiny_clip(clip_file, arch=DEMO_ARCH)
        if not descriptors.is_file():
            write_descriptors(descriptors, read_class_file(data_root / "classes.txt")[1:])
    barrier()
    cfg = PipelineConfig(workdir=workdir, data_root=data_root, preset="excel-voc", dataset="folder",
                         train_split="train", val_split="val", clip_weights=clip_file,
                         descriptors=descriptors,
                         refine_overrides=demo_overrides(size), device=device, progress=progress)
    report = build_pipeline(cfg, log=log).run()
    if not info.is_main:
        return report
    overlays = write_overlays(data_root, workdir / "overlays", [("training-free", workdir / "seeds"),
                                                                ("pseudo mask", workdir / "pseudo_masks")])
    plot = plot_losses(workdir / "train" / "log.csv", workdir / "losses.png", title="ExCEL training losses")
    report.update({"overlays": [str(p) for p in overlays], "loss_plot": str(plot)})
    write_json_atomic(workdir / "report.json", report)
    log(f"overlays: {workdir / 'overlays'}; loss plot: {plot}; page: {workdir / 'report.html'}")
    return report
