"""Segmentation networks for the retraining stage.

Names understood by :func:`build_segmenter`:

``deeplabv1_resnet38``       the authors' DeepLab-v1 (LargeFOV) on the wide ResNet-38
                             (:mod:`weakclip.retrain.deeplabv1`; the ``voc`` / ``coco`` presets); its backbone
                             weights are the MXNet ``.params`` file or a converted ``.pth`` (no download).

``deeplabv3_<resnet>``       DeepLabV3 (ASPP head) on any torchvision ResNet: ``deeplabv3_resnet101`` (the
                             default), ``deeplabv3_resnet50``, ``deeplabv3_resnet18`` ...
``deeplabv3plus_<resnet>``   DeepLabV3+ (torchvision has none): the same ASPP plus a decoder that fuses the
                             stride-4 features of ``layer1`` through a 48-channel 1x1 projection and two 3x3
                             convs.
``fcn_<resnet>``             FCN head on a ResNet (``fcn_resnet50``, ``fcn_resnet101``).
any other builder of ``torchvision.models.segmentation`` by name (``lraspp_mobilenet_v3_large``,
``deeplabv3_mobilenet_v3_large``); their output stride is torchvision's (16), ``output_stride`` is ignored.

ResNet models take ``output_stride`` 16 (layer4 dilated, ASPP rates 6/12/18, the DeepLabV3 paper's training
setting) or 8 (layer3 and layer4 dilated, rates 12/24/36); 32 leaves the ResNet as it is. Bottleneck ResNets
are dilated with torchvision's ``replace_stride_with_dilation``; BasicBlock ones (resnet18/34, which
torchvision refuses to dilate) by setting the strides and dilations of their convolutions in place.

Backbone weights: ``backbone_weights`` is a local file holding a torchvision ImageNet state dict of the same
architecture (e.g. ``resnet101-63fe2227.pth``; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and
``module.`` prefixes are accepted, the ``fc`` classifier is dropped). Without a file and with
``pretrained_backbone=True`` torchvision downloads the ImageNet weights (or finds them in the torch hub
cache); when that fails a one-line :class:`~weakclip.errors.WeightsError` names the file to supply and the
options ``--backbone-weights FILE`` / ``--no-pretrained``. BatchNorm layers are ordinary (trained); convert
to SyncBN for DDP with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

Every model is wrapped in :class:`~weakclip.retrain.segmenter.Segmenter`: ``forward(x) -> logits``
(B x K x H x W, the input's size) and ``param_groups()`` separating the pretrained backbone from the
freshly initialised head.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weakclip.errors import WeakclipError, WeightsError
from weakclip.retrain.deeplabv1 import build_deeplabv1
from weakclip.retrain.segmenter import Segmenter
from weakclip.safe_load import foreign_file, safe_torch_load

__all__ = ["DeepLabV3Plus", "Segmenter", "available_models", "build_segmenter", "load_backbone_file"]

DEFAULT_MODEL = "deeplabv3_resnet101"
#: The authors' retraining network (:mod:`weakclip.retrain.deeplabv1`); output stride 8, its own head.
RELEASE_MODEL = "deeplabv1_resnet38"
_FAMILIES = ("deeplabv3plus", "deeplabv3", "fcn")
_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def _resnet_names() -> list[str]:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    return sorted(n for n in names if "resnet" in n or n.startswith("resnext"))


def available_models() -> list[str]:
    """Every name :func:`build_segmenter` accepts (family x ResNet, and torchvision's segmentation models)."""
    import torchvision.models as tvm

    seg = tvm.list_models(module=tvm.segmentation)
    resnets = _resnet_names()
    ours = [f"{fam}_{r}" for fam in _FAMILIES for r in resnets]
    return sorted(set(ours) | set(seg) | {RELEASE_MODEL})


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al., ECCV 2018) on a ResNet: ASPP on layer4, decoder fusing layer1 (stride 4)."""

    def __init__(self, backbone: nn.Module, low_channels: int, high_channels: int, num_classes: int,
                 rates: tuple[int, ...], channels: int = 256, low_proj: int = 48) -> None:
        from torchvision.models.segmentation.deeplabv3 import ASPP

        super().__init__()
        self.backbone = backbone  # returns {"low": layer1, "out": layer4}
        self.aspp = ASPP(high_channels, list(rates), channels)
        self.low_proj = nn.Sequential(nn.Conv2d(low_channels, low_proj, 1, bias=False),
                                      nn.BatchNorm2d(low_proj), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Conv2d(channels + low_proj, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        low = self.low_proj(feats["low"])
        high = self.aspp(feats["out"])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.decoder(torch.cat([high, low], dim=1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ====================================================================== weights
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    loaded = state = safe_torch_load(path, what="backbone weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise foreign_file(path, loaded, "an ImageNet state dict of the backbone (torchvision layout)")
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.", "features."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_backbone_file(module: nn.Module, path: str | Path, arch: str) -> None:
    """Load an ImageNet state dict (``arch``'s torchvision layout) into ``module``; classifier keys ignored.

    Every parameter and buffer of ``module`` must be in the file, with its shape: a file of another
    architecture raises WeightsError naming it.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    extra = [k for k in state if k not in own and not k.startswith(("fc.", "classifier."))]
    if missing or wrong or extra:
        if missing:
            detail = f"missing {', '.join(missing[:3])}"
        elif wrong:
            detail = f"shapes differ: {'; '.join(wrong[:2])}"
        else:
            detail = f"unexpected {', '.join(extra[:3])}"
        raise WeightsError(f"backbone weights {path} do not fit a torchvision {arch} ({len(missing)} "
                           f"missing, {len(wrong)} of other shapes, {len(extra)} unexpected; {detail}): pass "
                           f"the ImageNet file of {arch}")
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def _download_hint(arch: str, url: str | None) -> str:
    name = url.rsplit("/", 1)[-1] if url else f"the torchvision ImageNet weights of {arch}"
    where = f" ({url})" if url else ""
    return (f"supply {name}{where} with --backbone-weights FILE, or train from scratch with --no-pretrained "
            f"(much lower mIoU)")


def _fetch_weights(weights_enum, arch: str) -> dict[str, torch.Tensor]:
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # noqa: BLE001 - URLError, socket errors, hash errors ...
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise WeightsError(f"the ImageNet weights of {arch} could not be downloaded ({reason}): "
                           f"{_download_hint(arch, getattr(weights_enum, 'url', None))}") from exc


# ====================================================================== ResNet backbones
def _dilate_basic_layer(layer: nn.Sequential, dilation: int, previous: int) -> None:
    """Turn a strided BasicBlock stage into a dilated one (replace_stride_with_dilation does Bottlenecks)."""
    for i, block in enumerate(layer):
        d = previous if i == 0 else dilation
        if i == 0:
            block.conv1.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        for conv in (block.conv1, block.conv2):
            conv.dilation = (d, d)
            conv.padding = (d, d)


def _resnet(arch: str, output_stride: int, weights_file, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    if output_stride not in _RATES:
        raise WeakclipError(f"output stride must be 8, 16 or 32, got {output_stride}")
    replace = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
    builder = getattr(tvm, arch)
    basic = arch in ("resnet18", "resnet34")  # the BasicBlock ResNets, which torchvision will not dilate
    net = builder(weights=None) if basic else builder(weights=None, replace_stride_with_dilation=replace)
    if weights_file is not None:
        load_backbone_file(net, weights_file, arch)
    elif pretrained:
        enum = tvm.get_model_weights(arch)
        choice = enum["IMAGENET1K_V1"] if "IMAGENET1K_V1" in enum.__members__ else enum.DEFAULT
        state = _fetch_weights(choice, arch)
        net.load_state_dict(state)
    if basic and output_stride < 32:
        if output_stride == 8:
            _dilate_basic_layer(net.layer3, 2, 1)
            _dilate_basic_layer(net.layer4, 4, 2)
        else:
            _dilate_basic_layer(net.layer4, 2, 1)
    return net


def _resnet_model(family: str, arch: str, num_classes: int, output_stride: int, weights_file,
                  pretrained: bool, channels: int) -> nn.Module:
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    net = _resnet(arch, output_stride, weights_file, pretrained)
    high = net.fc.in_features
    last = net.layer1[-1]
    low = last.conv3.out_channels if hasattr(last, "conv3") else last.conv2.out_channels
    if family == "deeplabv3plus":
        body = IntermediateLayerGetter(net, {"layer1": "low", "layer4": "out"})
        return DeepLabV3Plus(body, low, high, num_classes, _RATES[output_stride], channels)
    body = IntermediateLayerGetter(net, {"layer4": "out"})
    if family == "fcn":
        return FCN(body, FCNHead(high, num_classes), None)
    head = nn.Sequential(
        ASPP(high, list(_RATES[output_stride]), channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True), nn.Conv2d(channels, num_classes, 1),
    )
    return DeepLabV3(body, head, None)


def _torchvision_model(name: str, num_classes: int, weights_file, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    builder = getattr(tvm.segmentation, name)
    params = inspect.signature(builder).parameters
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if "aux_loss" in params:
        kwargs["aux_loss"] = False
    default = params["weights_backbone"].default if "weights_backbone" in params else None
    if weights_file is None and pretrained and default is not None:
        try:
            return builder(weights_backbone=default, **kwargs)
        except Exception as exc:  # noqa: BLE001
            reason = " ".join(str(exc).split())[:120] or type(exc).__name__
            raise WeightsError(f"the ImageNet backbone weights of {name} could not be downloaded ({reason}): "
                               f"{_download_hint(name, getattr(default, 'url', None))}") from exc
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    model = builder(**kwargs)
    if weights_file is not None:
        load_backbone_file(model.backbone, weights_file, name)
    return model


def build_segmenter(name: str = DEFAULT_MODEL, num_classes: int = 21,
                    backbone_weights: str | Path | None = None, pretrained_backbone: bool = True,
                    output_stride: int = 16, head_channels: int = 256, width_divisor: int = 1) -> Segmenter:
    """Build a segmentation network by name (module docstring) with ``num_classes`` outputs.

    ``backbone_weights``: a local ImageNet state dict for the backbone (takes precedence); otherwise
    ``pretrained_backbone=True`` downloads torchvision's (WeightsError with the file name when offline) and
    ``False`` starts from random weights. ``head_channels``: width of the ASPP / decoder (256 in the papers).
    ``width_divisor``: ``deeplabv1_resnet38`` only, every channel count divided (1 = the authors' network).
    """
    import torchvision.models as tvm

    key = str(name).strip().lower()
    if num_classes < 2:
        raise WeakclipError(f"a segmenter needs at least 2 classes, got {num_classes}")
    if key == RELEASE_MODEL:
        return build_deeplabv1(num_classes, backbone_weights, pretrained_backbone,
                               width_divisor=width_divisor)
    for family in _FAMILIES:
        prefix = family + "_"
        if key.startswith(prefix) and key[len(prefix):] in _resnet_names():
            net = _resnet_model(family, key[len(prefix):], num_classes, int(output_stride), backbone_weights,
                                pretrained_backbone, int(head_channels))
            return Segmenter(net, key, num_classes, int(output_stride))
    if key in tvm.list_models(module=tvm.segmentation):
        net = _torchvision_model(key, num_classes, backbone_weights, pretrained_backbone)
        return Segmenter(net, key, num_classes, None)
    import difflib

    close = difflib.get_close_matches(key, available_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise WeakclipError(f"unknown segmentation model {name!r}{hint}; names look like deeplabv1_resnet38, "
                        f"deeplabv3_resnet101, "
                        f"deeplabv3plus_resnet50, fcn_resnet50, lraspp_mobilenet_v3_large")
