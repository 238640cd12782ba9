"""Training scalars to TensorBoard when ``tensorboard`` is installed (never required).

:func:`scalar_writer` gives the training loop a writer of ``<workdir>/tensorboard/`` events, or None when
``torch.utils.tensorboard`` cannot be imported (the ``tensorboard`` package is missing) or
``WEAKCLIP_TENSORBOARD=0`` is set. The CSV log stays the record; this is only a viewer's copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


class ScalarWriter:
    """``add(step, {name: value})`` writes each value as the scalar ``<prefix>/<name>``."""

    def __init__(self, writer, prefix: str) -> None:
        self.writer = writer
        self.prefix = prefix

    def add(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            if value == value:  # nan (a loss term this step does not have) is left out
                self.writer.add_scalar(f"{self.prefix}/{name}", float(value), int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def scalar_writer(workdir: str | Path, prefix: str = "train") -> ScalarWriter | None:
    """A :class:`ScalarWriter` of ``<workdir>/tensorboard``, or None without TensorBoard."""
    if os.environ.get("WEAKCLIP_TENSORBOARD", "1") == "0":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is not installed
        return None
    return ScalarWriter(SummaryWriter(log_dir=str(Path(workdir) / "tensorboard")), prefix)
