"""Images/s of single-scale prediction with the retrained DeepLab-v1 ResNet-38: PyTorch eager vs the exported
ONNX model on onnxruntime, side by side.

The full-size network of the ``voc`` preset (124M parameters, 21 classes, RANDOM weights: speed does not
depend on them) is exported with :func:`weakclip.export.export_segmenter` (what ``weakclip export --format
onnx`` writes, opset 20) into a temporary folder. Each runtime predicts the same ``--images`` photos
(skimage.data, resized to 512 x 512) one at a time: normalise the uint8 image, one forward pass, argmax to a
uint8 mask. PyTorch runs under ``torch.inference_mode``; onnxruntime with its default graph optimisations
(``ORT_ENABLE_ALL``) and as many intra-op threads as torch. One warm-up image, then ONE timed run over the
images. On CUDA (when PyTorch sees a GPU) also PyTorch on CUDA, and onnxruntime's CUDA provider when the
installed onnxruntime has it (``onnxruntime-gpu``). The masks of the two runtimes are compared too.

    python benchmarks/predict.py                    # CPU: about 2 minutes on 2 cores
    python benchmarks/predict.py --images 32        # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from weakclip.data.classes import VOC_CLASSES, voc_palette
from weakclip.export import export_segmenter
from weakclip.retrain.models import build_segmenter
from weakclip.retrain.train import load_retrain_preset, norm_stats

SIZE = 512


def _photos(n: int) -> list[np.ndarray]:
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
    return [np.array(Image.fromarray(getattr(data, names[i % len(names)])()).convert("RGB")
                       .resize((SIZE, SIZE), Image.BILINEAR)) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_runner(net, device, mean, std):
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def run(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float()
        logits = net((x - m) / s)
        return logits[0].argmax(0).to(torch.uint8).cpu().numpy()

    return run


def _onnx_runner(path, providers, threads, mean, std):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=providers)
    m, s = np.float32(mean), np.float32(std)

    def run(image: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(((image.astype(np.float32) - m) / s).transpose(2, 0, 1)[None])
        logits = session.run(None, {"image": x})[0]
        return logits[0].argmax(0).astype(np.uint8)

    return run, session.get_providers()[0]


def _time(run, images, device: torch.device) -> tuple[float, list[np.ndarray]]:
    run(images[0])  # warm-up
    _sync(device)
    start = time.perf_counter()
    masks = [run(image) for image in images]
    _sync(device)
    return time.perf_counter() - start, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images per timed run (default 4 on CPU "
                        "only, 32 with CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime CPU threads "
                        "(default: torch's)")
    parser.add_argument("--cpu", action="store_true", help="CPU only, even with a GPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available() and not args.cpu
    n = args.images or (32 if cuda else 4)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    cfg = load_retrain_preset("voc")
    mean, std = norm_stats(cfg.data.normalize)
    net = build_segmenter(cfg.model.name, len(VOC_CLASSES), pretrained_backbone=False).eval()
    seg = SimpleNamespace(kind="deeplabv1-resnet38", description="DeepLab-v1 ResNet-38, random weights",
                          classes=list(VOC_CLASSES), palette=voc_palette(256), mean=mean, std=std,
                          settings={"scales": [1.0], "flip": False, "crf": False}, network=net)
    images = _photos(n)
    print(f"torch {torch.__version__}, {threads} CPU thread(s)"
          + (f", {torch.cuda.get_device_name(0)}" if cuda else "") + f"; {n} images of {SIZE} x {SIZE}, one "
          "scale, no flip, no CRF, one image at a time; one timed run after a warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = export_segmenter(seg, os.path.join(tmp, "onnx"), "onnx")
        print(f"export: {time.perf_counter() - start:.1f} s, {result['bytes'] / 2 ** 20:.0f} MiB, opset "
              f"{result['opset']}")
        import onnxruntime as ort

        rows = []
        cpu = torch.device("cpu")
        seconds, ref = _time(_torch_runner(net, cpu, mean, std), images, cpu)
        rows.append(("cpu", "pytorch eager", seconds, None))
        run, provider = _onnx_runner(result["model"], ["CPUExecutionProvider"], threads, mean, std)
        seconds, masks = _time(run, images, cpu)
        rows.append(("cpu", f"onnxruntime ({provider})", seconds, masks))
        base = {"cpu": rows[0][2]}
        if cuda:
            gpu = torch.device("cuda")
            net.to(gpu)
            seconds, _ = _time(_torch_runner(net, gpu, mean, std), images, gpu)
            rows.append(("cuda", "pytorch eager", seconds, None))
            base["cuda"] = seconds
            if "CUDAExecutionProvider" in ort.get_available_providers():
                run, provider = _onnx_runner(result["model"], ["CUDAExecutionProvider"], threads, mean, std)
                seconds, masks = _time(run, images, gpu)
                rows.append(("cuda", f"onnxruntime ({provider})", seconds, masks))
            else:
                print("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu): CUDA "
                      "row of onnxruntime skipped")
    print(f"\n{'device':6} {'runtime':36} {'images':>6} {'seconds':>8} {'images/s':>9} {'x eager':>8} "
          f"{'mask = eager':>12}")
    for device, runtime, seconds, masks in rows:
        agree = None if masks is None else np.mean([(a == b).mean() for a, b in zip(masks, ref)])
        same = "-" if agree is None else f"{100 * agree:.2f}%"
        print(f"{device:6} {runtime:36} {n:6d} {seconds:8.2f} {n / seconds:9.3f} "
              f"{base[device] / seconds:7.2f}x {same:>12}")
    print(f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs; other processes slow the wall-clock figures)")


if __name__ == "__main__":
    main()
