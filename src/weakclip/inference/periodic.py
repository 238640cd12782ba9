"""The periodic evaluation of refinement training (``train.eval_every``): the model at one scale, no flip, on
images with ground truth, mIoU over all processes. Passed to :func:`weakclip.engine.trainer.train` by the
callers above it (``weakclip train``, the pipeline), so the engine never imports inference."""

from __future__ import annotations

from collections.abc import Sequence

from weakclip.config import Config
from weakclip.errors import WeakclipError

__all__ = ["build_evaluator"]


def build_evaluator(cfg: Config, info, mean: Sequence[float], std: Sequence[float]):
    """``evaluate(model, iteration) -> {"miou", "images"}`` for ``train.eval_every``: the model at one scale
    (``pseudo.base_scale``), no flip, sliding window as ``pseudo`` sets it, on the first
    ``train.eval_max_images`` images of ``train.eval_split`` (default: the training split), which must have
    ground truth; the images are shared among the processes and the confusion matrices summed. Ground
    truth is opened here, so a split without it fails before training starts."""
    from weakclip.data.datasets import build_dataset
    from weakclip.inference.sliding import multiscale_inference
    from weakclip.metrics import ConfusionMatrix

    t, p = cfg.train, cfg.pseudo
    split = t.eval_split or cfg.data.split
    dataset = build_dataset(cfg.data.kind, cfg.data.root, split=split, with_gt=True,
                            image_reader=cfg.data.image_reader, image_orientation=cfg.data.image_orientation)
    if not dataset.has_gt:
        raise WeakclipError(f"train.eval_every needs ground truth, and split {split!r} has none")
    count = len(dataset) if t.eval_max_images is None else min(len(dataset), t.eval_max_images)
    mine = range(info.rank, count, info.world_size)

    def evaluate(model, iteration: int) -> dict[str, float]:
        cm = ConfusionMatrix(dataset.classes)
        for i in mine:
            image = dataset.read_image(i)
            probs = multiscale_inference(model, image, (1.0,), False, p.crop, p.stride, mean, std,
                                         p.base_scale, num_classes=len(dataset.classes), device=info.device,
                                         average=p.average, size_divisor=p.size_divisor, resize=p.resize)
            cm.update(probs.argmax(0).cpu().numpy(), dataset.read_gt(i, image.shape[:2]),
                      name=str(dataset.image_path(i)))
        if info.distributed:
            cm.all_reduce()
        return {"miou": float(cm.scores().miou), "images": count}

    return evaluate
