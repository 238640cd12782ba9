"""``weakclip export``: a trained network as ONNX or TorchScript plus ``weakclip-model.json``, to run without
weakclip (:mod:`weakclip.export`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from weakclip.commands.flags import add_classes, add_stage

FORMATS = ("onnx", "torchscript")


def run(args: argparse.Namespace) -> int:
    from weakclip.api import load
    from weakclip.export import export_segmenter, summary_line
    from weakclip.export.bundle import check_folder
    from weakclip.export.errors import ExportError

    check_folder(args.out)  # an existing folder, a missing extra or a bad opset fail before loading
    if args.format == "onnx":
        from weakclip.export.onnx import OPSETS, check_onnx_available

        check_onnx_available()
        if args.opset is not None and args.opset not in OPSETS:
            raise ExportError(f"--opset {args.opset}: PyTorch's ONNX exporter writes opsets "
                              f"{OPSETS.start}-{OPSETS.stop - 1}")
    elif args.opset is not None:
        raise ExportError("--opset applies to --format onnx only")
    seg = load(args.checkpoint, "cpu", stage=args.stage, best=args.best, clip_weights=args.clip_weights,
               classes=args.classes)
    result = export_segmenter(seg, args.out, args.format, opset=args.opset, source=str(args.checkpoint))
    print(f"{summary_line(result)} ({seg.description})")
    rule = result["rule"]
    if rule.multiple_of > 1:
        why = f" ({rule.reason})" if rule.reason else ""
        print(f"note: the exported {seg.kind} network takes {rule.describe()} only{why}: pad windows with "
              f"zeros after normalisation and crop the logits; {result['metadata'].name} 'input' and README "
              f"say how")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a trained network to ONNX or TorchScript, to run without weakclip",
        description="Export any trained network (the kinds `weakclip predict` takes: a retraining checkpoint "
                    "or work folder, a `weakclip run` work folder (--stage refine: its refinement model), a "
                    "refinement checkpoint or work folder, an ExCEL checkpoint, training or run folder "
                    "(frozen CLIP + decoder, any image size), the authors' released WeakCLIP or DeepLab-v1 "
                    "ResNet-38 checkpoint) into the new folder OUT: model.onnx (dynamic batch and image "
                    "size; run it with onnxruntime) or model.pt (TorchScript; torch.jit.load), and "
                    "weakclip-model.json (classes, palette, normalisation, input size rule, the test-time "
                    "settings). The graph is one forward pass: one scale, no flip, no CRF, no sliding "
                    "windows. The exported file is checked against PyTorch before the folder appears.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="checkpoint file or work folder of any kind above (loaded with weights_only=True)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (needs pip install 'weakclip[export]') or torchscript")
    p.add_argument("--out", required=True, type=Path, help="new (or empty) output folder")
    add_stage(p)
    p.add_argument("--best", action="store_true",
                   help="the work folder's checkpoints/best.pth instead of the latest checkpoint")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="the CLIP weights file a refinement checkpoint was trained with (default: the file "
                        "it records; not needed when the checkpoint holds the towers)")
    add_classes(p)
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, 18-23 (default 20, which onnxruntime >= 1.17 runs)")
    p.set_defaults(func=run)
