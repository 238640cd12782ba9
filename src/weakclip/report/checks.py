"""Regression warnings: a stage that made things worse than the one before it, or a class that vanished.

- the pseudo masks (after CRF) score below the seeds on the training split;
- the final network scores more than :data:`FINAL_TOLERANCE` (5 mIoU points) below the pseudo masks it
  was trained on. Val against train: the splits differ, and a drop of a few points is normal (the paper's
  own: 77.2 -> 74.0 on VOC, 48.4 -> 46.1 on COCO), so a smaller drop is no warning;
- a class present in the seeds (confident pixels) is absent from every pseudo mask;
- a class present in the val ground truth and in the pseudo masks is never predicted by the final network.

Each check needs both of its sides; one that is missing (a stage not run, no ground truth) is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: How far (mIoU, 0..1) the final network on val may fall below the pseudo masks on the training split
#: before it is a warning: more than the paper's own gaps (3.2 points VOC, 2.3 COCO).
FINAL_TOLERANCE = 0.05


@dataclass
class Regression:
    """One warning: ``stage`` is the stage that made things worse (pseudo_masks, or the final network's:
    retrain, or ExCEL's evaluate)."""

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
    final_stage = analysis.get("final_stage") or "retrain"
    # what the final network learnt from: the pseudo masks (a retraining) or nothing of them (ExCEL's own)
    trained_on = " it was trained on" if final_stage == "retrain" else ""
    stage_facts = analysis.get("stages") or {}
    pseudo_done = (stage_facts.get("pseudo_masks", {}).get("status") == "complete")
    if seeds and pseudo and pseudo_done:
        s, p = seeds.get("miou"), pseudo.get("miou")
        if s is not None and p is not None and round(p, 4) < round(s, 4):
            # WeakCLIP refines its pseudo masks from the seeds; ExCEL's come from the network it trained
            origin = " they were refined from" if "refine" in stage_facts else " (its training-free masks)"
            out.append(Regression("pseudo_masks", f"the pseudo masks ({_pct(p)} mIoU) are worse than the "
                                                  f"seeds ({_pct(s)}){origin}"))
        for c, name in enumerate(classes):
            if seeds["pixels"][c] > 0 and pseudo["pixels"][c] == 0:
                out.append(Regression("pseudo_masks", f"class {name!r} vanished: {seeds['pixels'][c]} seed "
                                                      "pixels, none in the pseudo masks"))
    if final and pseudo:
        p, f = pseudo.get("miou"), final.get("miou")
        if p is not None and f is not None and round(p - f, 4) > FINAL_TOLERANCE:
            out.append(Regression(final_stage, f"the final network ({_pct(f)} mIoU on val) is more than "
                                               f"{100 * FINAL_TOLERANCE:.0f} points below the pseudo "
                                               f"masks{trained_on} ({_pct(p)} on the training split)"))
        for c, name in enumerate(classes):
            iou, fp = final["iou"][c], final["fp"][c]
            if iou is not None and iou == 0 and not fp and pseudo["pixels"][c] > 0:
                out.append(Regression(final_stage, f"class {name!r} vanished: in the val ground truth and "
                                                   "the pseudo masks, never predicted by the final network"))
    return out
