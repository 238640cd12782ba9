"""Regression warnings: a stage that made things worse than the one before it, or a class that vanished.

- the pseudo masks (after CRF) score below the seeds on the training split;
- the final network scores below the pseudo masks it was trained on (val against train: the splits
  differ, so this compares what the run can measure; a drop of a few points is common);
- a class present in the seeds (confident pixels) is absent from every pseudo mask;
- a class present in the val ground truth and in the pseudo masks is never predicted by the final network.

Each check needs both of its sides; one that is missing (a stage not run, no ground truth) is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Regression:
    """One warning: ``stage`` is the stage that made things worse (pseudo_masks or retrain)."""

    stage: str
    message: str

    def __str__(self) -> str:
        return self.message


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"


def find_regressions(analysis: dict[str, Any]) -> list[Regression]:
    """The warnings of an :func:`~weakclip.report.analysis.analyse` result (see the module docstring)."""
    out: list[Regression] = []
    sets = analysis.get("sets") or {}
    classes = analysis.get("classes") or []
    seeds, pseudo, final = sets.get("seeds"), sets.get("pseudo"), analysis.get("final")
    pseudo_done = (analysis.get("stages", {}).get("pseudo_masks", {}).get("status") == "complete")
    if seeds and pseudo and pseudo_done:
        s, p = seeds.get("miou"), pseudo.get("miou")
        if s is not None and p is not None and round(p, 4) < round(s, 4):
            out.append(Regression("pseudo_masks", f"the pseudo masks ({_pct(p)} mIoU) are worse than the "
                                                  f"seeds ({_pct(s)}) they were refined from"))
        for c, name in enumerate(classes):
            if seeds["pixels"][c] > 0 and pseudo["pixels"][c] == 0:
                out.append(Regression("pseudo_masks", f"class {name!r} vanished: {seeds['pixels'][c]} seed "
                                                      "pixels, none in the pseudo masks"))
    if final and pseudo:
        p, f = pseudo.get("miou"), final.get("miou")
        if p is not None and f is not None and round(f, 4) < round(p, 4):
            out.append(Regression("retrain", f"the final network ({_pct(f)} mIoU on val) is below the pseudo "
                                             f"masks it was trained on ({_pct(p)} on the training split)"))
        for c, name in enumerate(classes):
            iou, fp = final["iou"][c], final["fp"][c]
            if iou is not None and iou == 0 and not fp and pseudo["pixels"][c] > 0:
                out.append(Regression("retrain", f"class {name!r} vanished: in the val ground truth and the "
                                                 "pseudo masks, never predicted by the final network"))
    return out
