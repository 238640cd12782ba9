"""Export a trained network to run without weakclip: ONNX (onnxruntime) or TorchScript, plus
``weakclip-model.json`` (classes, palette, normalisation, input size rule, test-time settings).

    from weakclip.export import export_segmenter
    export_segmenter(weakclip.load("work_voc"), "voc_onnx", "onnx")

Modules: :mod:`~weakclip.export.network` (what goes into the graph, which sizes it takes),
:mod:`~weakclip.export.onnx`, :mod:`~weakclip.export.torchscript`, :mod:`~weakclip.export.metadata`,
:mod:`~weakclip.export.bundle` (the folder, all or nothing, checked against PyTorch).
"""

from weakclip.export.bundle import FORMATS, export_segmenter, summary_line
from weakclip.export.errors import ExportError
from weakclip.export.metadata import METADATA_NAME

__all__ = ["FORMATS", "METADATA_NAME", "ExportError", "export_segmenter", "summary_line"]
