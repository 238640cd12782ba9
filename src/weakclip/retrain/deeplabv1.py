"""DeepLab-v1 (LargeFOV head) on ResNet-38: the network of the authors' retraining (github
Yingyue-L/deeplabv1-resnet38, ``tools/net/deeplabv1.py``), its optimiser groups, its poly schedule and the
loading of its checkpoints.

Network: :class:`~weakclip.retrain.resnet38.ResNet38` (stride 8, 4096 channels), then ``conv_fov`` (3x3,
dilation 12, 512, no bias), ``bn_fov``, ReLU, ``conv_fov2`` (1x1, 512, no bias), ``bn_fov2``, ReLU, dropout
0.5, ``cls_conv`` (1x1 to the classes, with bias), bilinear upsampling to the input size with
``align_corners=True``. New convolutions: Kaiming-normal weights (fan-out, ReLU); ``cls_conv``'s bias keeps
PyTorch's default initialisation, as in the release. State-dict keys are the release's
(``backbone.conv1a.weight``, ``conv_fov.weight``, ``bn_fov.running_mean``, ``cls_conv.bias`` ...).

Optimiser groups (:meth:`DeepLabV1Segmenter.param_groups`): only convolution parameters, in four groups, with
the release's learning-rate multipliers: backbone weights x1, backbone biases x2 (ResNet-38 has none, so the
group is empty), new-layer weights x10 (``conv_fov``, ``conv_fov2``, ``cls_conv``), new-layer biases x20
(``cls_conv.bias``). BatchNorm weights and biases are in no group: they keep their ImageNet (backbone) or
initial (head: 1 and 0) values for the whole run, while their running statistics move with momentum 3e-4.
The bias groups have their own weight decay (0 in the last runnable release version). With
``stem_frozen_after`` the first convolution ``conv1a`` gets a group of its own whose rate drops to 0 from
that iteration on (the release's ``Net.train()`` froze it at the first evaluation, i.e. after the first
epoch).

Schedule (:class:`ReleasePolySchedule`): ``lr * (1 - it / (max_itr + 1)) ** power``, note the ``+ 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weakclip.engine.schedule import PolySchedule
from weakclip.errors import WeakclipError, WeightsError
from weakclip.retrain.resnet38 import MXNET_FILE, ResNet38, load_resnet38_weights
from weakclip.retrain.segmenter import Segmenter
from weakclip.safe_load import foreign_file, safe_torch_load

__all__ = [
    "DeepLabV1",
    "DeepLabV1Segmenter",
    "ReleasePolySchedule",
    "build_deeplabv1",
    "fit_state_dict",
    "load_release_checkpoint",
    "missing_weights_error",
    "read_checkpoint",
    "state_dict_of",
]

MODEL_NAME = "deeplabv1_resnet38"


class DeepLabV1(nn.Module):
    """ResNet-38 + LargeFOV head; logits at the input's size."""

    def __init__(self, num_classes: int, bn_momentum: float = 3e-4, dropout: float = 0.5,
                 width_divisor: int = 1) -> None:
        super().__init__()
        self.backbone = ResNet38(bn_momentum, width_divisor)
        channels = 512 // width_divisor
        self.conv_fov = nn.Conv2d(self.backbone.out_channels, channels, 3, padding=12, dilation=12,
                                  bias=False)
        self.bn_fov = nn.BatchNorm2d(channels, momentum=bn_momentum)
        self.conv_fov2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn_fov2 = nn.BatchNorm2d(channels, momentum=bn_momentum)
        self.dropout1 = nn.Dropout(dropout)
        self.cls_conv = nn.Conv2d(channels, num_classes, 1)
        for conv in (self.conv_fov, self.conv_fov2, self.cls_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def new_convs(self) -> list[nn.Conv2d]:
        return [self.conv_fov, self.conv_fov2, self.cls_conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x)
        y = F.relu(self.bn_fov(self.conv_fov(y)))
        y = F.relu(self.bn_fov2(self.conv_fov2(y)))
        y = self.cls_conv(self.dropout1(y))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


class DeepLabV1Segmenter(Segmenter):
    """:class:`Segmenter` around :class:`DeepLabV1` with the release's four convolution-only groups."""

    def param_groups(self, head_lr_mult: float = 10.0, bias_lr_mult: float = 2.0,
                     weight_decay: float | None = None, bias_weight_decay: float | None = 0.0,
                     stem_frozen_after: int | None = None) -> list[dict]:
        """Groups ``backbone_weight`` (x1), ``backbone_bias`` (x ``bias_lr_mult``), ``head_weight``
        (x ``head_lr_mult``), ``head_bias`` (x ``head_lr_mult * bias_lr_mult``), and with
        ``stem_frozen_after`` a ``stem`` group (``conv1a.weight``, x1, rate 0 from that iteration). The bias
        groups carry ``bias_weight_decay`` (None: the optimizer's); ``weight_decay`` None leaves the weight
        groups at the optimizer's. Empty groups are kept, so the four indices are stable."""
        net: DeepLabV1 = self.net
        new = {id(m) for m in net.new_convs()}
        stem = net.backbone.conv1a.weight if stem_frozen_after is not None else None
        names = ("backbone_weight", "backbone_bias", "head_weight", "head_bias")
        groups: dict[str, list[nn.Parameter]] = {k: [] for k in names}
        for module in net.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            part = "head" if id(module) in new else "backbone"
            if module.weight is not stem:
                groups[f"{part}_weight"].append(module.weight)
            if module.bias is not None:
                groups[f"{part}_bias"].append(module.bias)
        mults = {"backbone_weight": 1.0, "backbone_bias": float(bias_lr_mult),
                 "head_weight": float(head_lr_mult), "head_bias": float(head_lr_mult) * float(bias_lr_mult)}
        out = []
        for name, params in groups.items():
            group: dict = {"params": params, "lr_mult": mults[name], "name": name}
            decay = bias_weight_decay if name.endswith("bias") else weight_decay
            if decay is not None:
                group["weight_decay"] = float(decay)
            out.append(group)
        if stem is not None:
            group = {"params": [stem], "lr_mult": 1.0, "name": "stem", "frozen_from": int(stem_frozen_after)}
            if weight_decay is not None:
                group["weight_decay"] = float(weight_decay)
            out.append(group)
        return out


def build_deeplabv1(num_classes: int, backbone_weights: str | Path | None = None,
                    pretrained_backbone: bool = True, bn_momentum: float = 3e-4,
                    width_divisor: int = 1) -> DeepLabV1Segmenter:
    """The release's network; ``backbone_weights``: the MXNet ``.params`` or a converted ``.pth``. Without a
    file and with ``pretrained_backbone`` a one-line WeightsError names the file to supply.
    ``width_divisor`` > 1: every channel count divided (quick tests only; see :class:`ResNet38`)."""
    if num_classes < 2:
        raise WeakclipError(f"a segmentation network needs at least 2 classes, got {num_classes}")
    if backbone_weights is None and pretrained_backbone:
        raise missing_weights_error()
    net = DeepLabV1(int(num_classes), bn_momentum=bn_momentum, width_divisor=width_divisor)
    if backbone_weights is not None:
        load_resnet38_weights(net.backbone, backbone_weights)
    return DeepLabV1Segmenter(net, MODEL_NAME, num_classes, 8)


def missing_weights_error() -> WeightsError:
    """The one-line error when the ResNet-38 ImageNet weights are needed and no file is given."""
    return WeightsError(f"ResNet-38 has no automatic download: supply {MXNET_FILE} (the MXNet ImageNet "
                        f"weights of AffinityNet / SEAM) or its converted .pth with --backbone-weights FILE "
                        f"(model.backbone_weights), or train from scratch with --no-pretrained")


@dataclass
class ReleasePolySchedule(PolySchedule):
    """``base_lr * (1 - it / (total_iters + 1)) ** power`` (the release's ``adjust_lr``), times each group's
    ``lr_mult``; a group with ``frozen_from`` gets rate 0 from that iteration on."""

    def lr_at(self, it: int) -> float:
        it = min(max(int(it), 0), self.total_iters)
        return self.base_lr * (1.0 - it / (self.total_iters + 1)) ** self.power

    def apply(self) -> float:
        lr = self.current_lr
        for group in self.optimizer.param_groups:
            frozen = group.get("frozen_from") is not None and self.iteration >= group["frozen_from"]
            group["lr"] = 0.0 if frozen else lr * group.get("lr_mult", 1.0)
        return lr


# ====================================================================== checkpoints
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A model state dict from ``path``: the release's (``torch.save(net.state_dict())``, keys
    ``backbone.conv1a.weight`` ...), with or without ``module.`` / ``net.`` prefixes, or a
    ``{"model": state dict}`` / ``{"state_dict": ...}`` wrapper. Loaded with ``weights_only=True``: a file
    that needs arbitrary pickled objects is refused with a one-line WeightsError (this package's own
    training checkpoints store plain values only, so they load too)."""
    return state_dict_of(safe_torch_load(path, what="checkpoint"), path)


def state_dict_of(obj, source: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict in a loaded checkpoint object (see :func:`read_checkpoint`): a ``{"model": ...}``
    / ``{"state_dict": ...}`` wrapper unwrapped, ``module.`` / ``net.`` prefixes removed; a one-line
    WeightsError when it holds no state dict of tensors."""
    from weakclip.methods import DEFAULT_METHOD, of_checkpoint

    method = of_checkpoint(obj) if isinstance(obj, dict) else None
    if method is not None and method.name != DEFAULT_METHOD:  # e.g. an ExCEL training checkpoint
        raise WeightsError(f"checkpoint {source} holds a trained {method.title} network, not a retrained "
                           f"segmentation network: weakclip predict, pseudo-masks and export take it")
    state = obj
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor)
                                                           for v in state.values()):
        raise foreign_file(source, obj, "a segmentation network's state dict (a retraining checkpoint)")
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "net.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_release_checkpoint(model: Segmenter, path: str | Path) -> None:
    """Load a checkpoint (see :func:`read_checkpoint`) into ``model.net``: every parameter and BN statistic of
    the network must be there with its shape, and nothing else (a one-line WeightsError otherwise; a class
    count other than the dataset's shows as a ``cls_conv`` shape mismatch)."""
    fit_state_dict(model, read_checkpoint(path), path)


def fit_state_dict(model: Segmenter, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``state`` (keys of ``model.net``, see :func:`state_dict_of`) into ``model.net``: every parameter
    and BN statistic must be there with its shape, and nothing else (a one-line WeightsError otherwise)."""
    own = model.net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or extra or wrong:
        if wrong:
            detail = f"shapes differ: {'; '.join(wrong[:2])}"
        elif missing:
            detail = f"missing {', '.join(missing[:3])}"
        else:
            detail = f"unexpected {', '.join(extra[:3])}"
        raise WeightsError(f"checkpoint {source} does not fit {model.name} with {model.num_classes} classes "
                           f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} of other shapes; "
                           f"{detail})")
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
