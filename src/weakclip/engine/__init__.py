"""Training engine: schedule (warm-up + cosine), atomic checkpoints, the (DDP) training loop."""

from weakclip.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from weakclip.engine.schedule import WarmupCosineSchedule, lr_at


def train(*args, **kwargs):
    """:func:`weakclip.engine.trainer.train` (imported on first use: it pulls in the model)."""
    from weakclip.engine.trainer import train as _train

    return _train(*args, **kwargs)


__all__ = [
    "WarmupCosineSchedule", "latest_checkpoint", "load_checkpoint", "lr_at", "save_checkpoint", "train",
]
