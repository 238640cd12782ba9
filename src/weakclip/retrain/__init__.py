"""Stage 4: retrain a DeepLab-family segmentation network on the pseudo masks and evaluate it on val.

``retrain(cfg, masks_dir, dataset_kwargs, workdir)`` and ``evaluate_checkpoint``
(:mod:`weakclip.retrain.train`), ``build_segmenter`` (:mod:`weakclip.retrain.models`; the authors'
DeepLab-v1 / ResNet-38 in :mod:`weakclip.retrain.deeplabv1` and :mod:`weakclip.retrain.resnet38`, MXNet
weights through :mod:`weakclip.retrain.mxnet_params`), ``evaluate_segmenter``
(:mod:`weakclip.retrain.evaluate`) and the mask folder pre-flight check (:mod:`weakclip.retrain.check`).
Imported lazily: ``import weakclip.retrain`` is
cheap.
"""

from __future__ import annotations

_EXPORTS = {
    "RetrainConfig": "weakclip.retrain.train",
    "apply_retrain_overrides": "weakclip.retrain.train",
    "load_retrain_preset": "weakclip.retrain.train",
    "retrain": "weakclip.retrain.train",
    "evaluate_checkpoint": "weakclip.retrain.train",
    "build_segmenter": "weakclip.retrain.models",
    "evaluate_segmenter": "weakclip.retrain.evaluate",
    "check_masks": "weakclip.retrain.check",
    "preflight_masks": "weakclip.retrain.check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'weakclip.retrain' has no attribute {name!r}")
