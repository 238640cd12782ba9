"""WeakCLIP: weakly-supervised semantic segmentation by adapting a frozen CLIP."""

__version__ = "0.1.0"
