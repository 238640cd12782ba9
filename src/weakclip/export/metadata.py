"""``weakclip-model.json``: everything a program needs, beside the exported network, to turn a photo into a
mask with onnxruntime (or ``torch.jit.load``) and numpy alone.

Keys (``format_version`` 1):

``format_version``, ``weakclip_version``
``kind``, ``description``   what was exported, from where (:func:`weakclip.api.load`'s ``Segmenter``)
``format``, ``file``        ``"onnx"`` / ``"model.onnx"`` or ``"torchscript"`` / ``"model.pt"``; ``opset``
``classes``                 K class names, index = class id (0: background)
``palette``                 K RGB colours (0..255), class id -> colour (the VOC colour map)
``mean``, ``std``           normalisation on the 0..255 scale, RGB order
``input``                   ``name`` ("image"), ``layout`` NCHW, ``dtype`` float32, ``channels`` RGB,
                            ``value`` ``(pixel - mean) / std``; the size rule ``multiple_of`` / ``min_side``
                            (any batch); ``pad``: how to meet the rule; ``fit``: null (predict at the image's
                            own size, the retrained networks) or ``[long, short]``: resize keeping the aspect
                            ratio to fit it first (the refinement model's base scale; the release's
                            ``[2048, 512]``)
``output``                  ``name`` ("logits"), B x K x H x W float32 at the input's size
``test_time``               the network's own evaluation settings (scales, flip, CRF and its parameters, fuse,
                            resize, align_corners; for the refinement model the window crop/stride, averaging,
                            base scale ...), as :func:`weakclip.api.load` applies them: NOT part of the graph
``check``                   the export's own comparison with PyTorch (input shape, max abs difference, logit
                            scale, argmax agreement)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from weakclip.export.network import SizeRule

__all__ = ["FORMAT_VERSION", "METADATA_NAME", "build_metadata"]

FORMAT_VERSION = 1
METADATA_NAME = "weakclip-model.json"

_OUTSIDE = ("one pass of the network is one scale, no flip, no CRF, no windows: the test-time settings are "
            "the caller's (resize to each scale, run, resize the logits back, average softmaxes or logits "
            "as 'fuse' says, flip, sliding windows for the refinement model, then the dense CRF)")


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def build_metadata(segmenter: Any, *, fmt: str, file: str, rule: SizeRule, export_info: dict,
                   check: dict) -> dict[str, Any]:
    """The JSON-able metadata of an export of ``segmenter`` (duck-typed :class:`weakclip.api.Segmenter`:
    ``kind``, ``description``, ``classes``, ``palette``, ``mean``, ``std``, ``settings``)."""
    from weakclip import __version__
    from weakclip.data.io import jsonable

    classes = [str(c) for c in segmenter.classes]
    palette = np.asarray(segmenter.palette, dtype=np.uint8).reshape(-1, 3)
    if len(palette) < len(classes):
        from weakclip.data.classes import voc_palette

        palette = voc_palette(max(256, len(classes)))
    settings = jsonable(dict(segmenter.settings or {}))
    fit = settings.get("base_scale") if rule.multiple_of > 1 else None
    k = len(classes)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "weakclip_version": __version__,
        "kind": str(segmenter.kind),
        "description": str(segmenter.description),
        "format": fmt,
        "file": file,
    }
    if "opset" in export_info:
        meta["opset"] = export_info["opset"]
    meta.update({
        "classes": classes,
        "palette": palette[:k].astype(int).tolist(),
        "mean": _floats(segmenter.mean),
        "std": _floats(segmenter.std),
        "input": {
            "name": "image", "layout": "NCHW", "dtype": "float32", "channels": "RGB",
            "value": "(pixel - mean) / std, pixels on the 0..255 scale",
            "batch": "any", **rule.to_dict(), "size_rule": rule.describe(),
            "pad": ("none needed" if rule.multiple_of == 1 else
                    f"zeros after normalisation (the mean colour), bottom and right, to the next multiple of "
                    f"{rule.multiple_of}; crop the logits back"),
            "fit": [int(v) for v in fit] if fit else None,
            "shape": export_info.get("input_shape", ["batch", 3, "height", "width"]),
        },
        "output": {
            "name": "logits", "layout": "NCHW", "dtype": "float32",
            "shape": export_info.get("output_shape", ["batch", k, "height", "width"]),
            "value": "class logits at the input's size: softmax over axis 1 = probabilities, "
                     "argmax = class id",
        },
        "test_time": settings,
        "test_time_note": _OUTSIDE,
        "check": check,
    })
    return meta
