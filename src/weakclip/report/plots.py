"""The report's figures, drawn with matplotlib (Agg backend: no display) and saved as PNGs.

- :func:`plot_per_class`: per-class IoU of the seeds, the pseudo masks and the final network side by side,
  with their FP (up) and FN (down) below;
- :func:`plot_shares`: without ground truth, each class's share of the pixels of the seeds and pseudo masks;
- :func:`plot_training`: the loss terms of a training ``log.csv`` against the iteration, learning rate on the
  right axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

COLOURS = {"seeds": "#8c8c8c", "pseudo_no_crf": "#9ecae1", "pseudo": "#2171b5", "final": "#e6550d"}
LOSS_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed over it."""
    from weakclip.data.io import write_bytes_atomic as write

    return write(path, data)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def _values(column: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100.0 * v for v in column], dtype=np.float64)


def _grouped_bars(n_series: int, k: int) -> tuple[np.ndarray, float, list[float]]:
    """Bar positions of ``n_series`` side by side at each of ``k`` classes: (x, width, offsets)."""
    width = 0.8 / max(1, n_series)
    return np.arange(k), width, [(j - (n_series - 1) / 2) * width for j in range(n_series)]


def plot_per_class(classes: Sequence[str], series: dict[str, dict], titles: dict[str, str],
                   path: Path) -> Path:
    """Grouped bars per class: IoU on top; FP (up) and FN (down) of each series below (percent)."""
    plt = _pyplot()
    names = list(series)
    k = len(classes)
    x, width, offsets = _grouped_bars(len(names), k)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.55 * k * max(1, len(names)) / 2 + 3), 6.4),
                                      sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for name, offset in zip(names, offsets):
        colour = COLOURS.get(name)
        top.bar(x + offset, _values(series[name]["iou"]), width, label=titles.get(name, name), color=colour)
        bottom.bar(x + offset, _values(series[name]["fp"]), width, color=colour)
        bottom.bar(x + offset, -_values(series[name]["fn"]), width, color=colour, alpha=0.55, hatch="//",
                   edgecolor="white", linewidth=0)
    top.set_ylabel("IoU %")
    top.set_ylim(0, 100)
    top.grid(axis="y", alpha=0.3)
    top.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(names), frameon=False)
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("FP % (up) / FN % (down)")
    bottom.set_ylim(-100, 100)
    bottom.set_yticks([-100, -50, 0, 50, 100], ["100", "50", "0", "50", "100"])
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(x, list(classes), rotation=45 if k > 8 else 0, ha="right" if k > 8 else "center")
    fig.tight_layout()
    return _save(fig, path)


def plot_shares(classes: Sequence[str], pixels: dict[str, Sequence[int]], titles: dict[str, str],
                path: Path) -> Path:
    """Each class's share of the predicted pixels, per mask set (no ground truth needed)."""
    plt = _pyplot()
    names = list(pixels)
    k = len(classes)
    x, width, offsets = _grouped_bars(len(names), k)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.4 * k + 3), 3.8))
    for name, offset in zip(names, offsets):
        counts = np.asarray(pixels[name], dtype=np.float64)
        shares = 100.0 * counts / max(1.0, counts.sum())
        ax.bar(x + offset, shares, width, label=titles.get(name, name),
               color=COLOURS.get(name))
    ax.set_ylabel("% of the labelled pixels")
    ax.set_xticks(x, list(classes), rotation=45 if k > 8 else 0, ha="right" if k > 8 else "center")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title("class pixel shares (no ground truth)")
    fig.tight_layout()
    return _save(fig, path)


def plot_training(columns: dict[str, list[float]], title: str, path: Path,
                  size: tuple[float, float] = (5.4, 3.4)) -> Path:
    """The loss terms of a training log (``iter``, ``lr``, terms...) against the iteration."""
    plt = _pyplot()
    skip = {"iter", "lr", "seconds", "images_per_s"}
    terms = [t for t in columns if t not in skip]
    iters = columns.get("iter", [])
    fig, ax = plt.subplots(figsize=size)
    for n, term in enumerate(terms):
        ax.plot(iters, columns[term], label=term, color=LOSS_COLOURS[n % len(LOSS_COLOURS)], linewidth=1.6)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if "lr" in columns:
        lr_ax = ax.twinx()
        (line,) = lr_ax.plot(iters, columns["lr"], color="black", linestyle=":", linewidth=1.2, label="lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        handles.append(line)
        labels.append("lr")
    if handles:
        ax.legend(handles, labels, fontsize=8, frameon=False, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)
