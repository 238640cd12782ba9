"""The wide ResNet-38 ("model A1" of Wu et al., "Wider or deeper", 2019) used as the backbone of the
authors' DeepLab-v1 retraining, in the key layout of the WSSS projects (AffinityNet / SEAM ``resnet38d``), so
that their converted ``.pth`` files load as they are.

Layout (pre-activation residual blocks; ``bn_*`` comes before the convolution of the same branch)::

    conv1a    3x3 conv 3 -> 64                                         stride 1
    b2, b2_1, b2_2        ResBlock 128 (mid 128)     b2 strided 2      stride 2
    b3, b3_1, b3_2        ResBlock 256 (mid 256)     b3 strided 2      stride 4
    b4, b4_1 ... b4_5     ResBlock 512 (mid 512)     b4 strided 2      stride 8
    b5, b5_1, b5_2        ResBlock 1024 (mid 512)    dilation 2 (b5's first conv 1)
    b6                    bottleneck 1024 -> 2048    dilation 4, Dropout2d 0.3
    b7                    bottleneck 2048 -> 4096    dilation 4, Dropout2d 0.5
    bn7 + ReLU            4096 channels, output stride 8

A block with a different input/output shape has a 1x1 projection ``conv_branch1`` applied to the
pre-activated input. No convolution has a bias. BatchNorm momentum is PyTorch's convention (the weight of the
new batch statistic); the authors' retraining set 3e-4 everywhere.

Weights (:func:`load_resnet38_weights`): an MXNet ``.params`` file (read by
:mod:`weakclip.retrain.mxnet_params`, no MXNet needed) or a PyTorch state dict in this layout (``module.`` /
``backbone.`` prefixes accepted). There is no automatic download: without a file a one-line
:class:`~weakclip.errors.WeightsError` names ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weakclip.errors import WeakclipError, WeightsError
from weakclip.safe_load import foreign_file, safe_torch_load

__all__ = ["MXNET_FILE", "ResNet38", "load_resnet38_weights", "read_resnet38_file"]

#: The ImageNet weights the WSSS projects distribute (MXNet format).
MXNET_FILE = "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"


class ResBlock(nn.Module):
    """Two 3x3 convolutions, pre-activation; ``conv_branch1`` projects when the shape changes."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, first_dilation: int | None = None,
                 dilation: int = 1, bn_momentum: float = 3e-4) -> None:
        super().__init__()
        first = dilation if first_dilation is None else first_dilation
        self.same_shape = cin == cout and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv_branch2a = nn.Conv2d(cin, mid, 3, stride, padding=first, dilation=first, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid, momentum=bn_momentum)
        self.conv_branch2b1 = nn.Conv2d(mid, cout, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(act)
        y = self.conv_branch2a(act)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        return shortcut + y


class BottleneckBlock(nn.Module):
    """1x1 (cout/4), 3x3 dilated (cout/2), 1x1 (cout), pre-activation, channel dropout before the last two
    convolutions; always projected."""

    def __init__(self, cin: int, cout: int, dilation: int, dropout: float, bn_momentum: float = 3e-4) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4, momentum=bn_momentum)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2, momentum=bn_momentum)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(act)
        y = self.conv_branch2a(act)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return shortcut + y


class ResNet38(nn.Module):
    """ResNet-38 trunk, output stride 8, 4096 channels (after ``bn7`` and a ReLU).

    ``width_divisor`` (1, 2, 4 ... 64) divides every channel count: 1 is the authors' network; larger values
    give the same layout at a fraction of the cost, for quick tests (their weights are not ImageNet's)."""

    def __init__(self, bn_momentum: float = 3e-4, width_divisor: int = 1) -> None:
        super().__init__()
        if width_divisor < 1 or 64 % width_divisor:
            raise WeakclipError(f"ResNet-38 width divisor must divide 64, got {width_divisor}")
        m = bn_momentum

        def c(n: int) -> int:
            return n // width_divisor

        self.out_channels = c(4096)
        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
        self.b2 = ResBlock(c(64), c(128), c(128), stride=2, bn_momentum=m)
        self.b2_1 = ResBlock(c(128), c(128), c(128), bn_momentum=m)
        self.b2_2 = ResBlock(c(128), c(128), c(128), bn_momentum=m)
        self.b3 = ResBlock(c(128), c(256), c(256), stride=2, bn_momentum=m)
        self.b3_1 = ResBlock(c(256), c(256), c(256), bn_momentum=m)
        self.b3_2 = ResBlock(c(256), c(256), c(256), bn_momentum=m)
        self.b4 = ResBlock(c(256), c(512), c(512), stride=2, bn_momentum=m)
        for i in range(1, 6):
            setattr(self, f"b4_{i}", ResBlock(c(512), c(512), c(512), bn_momentum=m))
        self.b5 = ResBlock(c(512), c(512), c(1024), first_dilation=1, dilation=2, bn_momentum=m)
        self.b5_1 = ResBlock(c(1024), c(512), c(1024), dilation=2, bn_momentum=m)
        self.b5_2 = ResBlock(c(1024), c(512), c(1024), dilation=2, bn_momentum=m)
        self.b6 = BottleneckBlock(c(1024), c(2048), dilation=4, dropout=0.3, bn_momentum=m)
        self.b7 = BottleneckBlock(c(2048), c(4096), dilation=4, dropout=0.5, bn_momentum=m)
        self.bn7 = nn.BatchNorm2d(c(4096), momentum=m)
        self.blocks = ["b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", *[f"b4_{i}" for i in range(1, 6)],
                       "b5", "b5_1", "b5_2", "b6", "b7"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1a(x)
        for name in self.blocks:
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))


# ====================================================================== weights
def read_resnet38_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A ResNet-38 state dict from an MXNet ``.params`` file or a PyTorch ``.pth``/``.pt`` state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ResNet-38 weights file not found: {path}")
    if path.suffix == ".params":
        from weakclip.retrain.mxnet_params import resnet38_state_dict

        return resnet38_state_dict(path)
    loaded = state = safe_torch_load(path, what="ResNet-38 weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise foreign_file(path, loaded, f"a ResNet-38 state dict ({MXNET_FILE} or its converted .pth)")
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_resnet38_weights(backbone: ResNet38, path: str | Path) -> None:
    """Load ImageNet weights into ``backbone``: every parameter and BatchNorm statistic must be in the file
    with its shape (a one-line WeightsError says what is not); other keys (the classifier) are ignored, as
    the authors' ``load_state_dict(strict=False)`` did."""
    state = read_resnet38_file(path)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"shapes differ: {'; '.join(wrong[:2])}"
        raise WeightsError(f"{path} does not hold ResNet-38 weights ({len(missing)} missing, {len(wrong)} of "
                           f"other shapes; {detail}): pass {MXNET_FILE} or its converted .pth")
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
