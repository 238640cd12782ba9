"""WeakCLIP: weakly-supervised semantic segmentation by adapting a frozen CLIP."""

__version__ = "0.1.0"


def load(path, device=None, *, stage=None, best=False, clip_weights=None, classes=None):
    """Load a trained network (any kind this package or the authors make) as a
    :class:`weakclip.api.Segmenter`; see :func:`weakclip.api.load`. Imported on first use, so
    ``import weakclip`` stays light."""
    from weakclip.api import load as _load

    return _load(path, device, stage=stage, best=best, clip_weights=clip_weights, classes=classes)
