"""ImageNet-style ResNets on torchvision's ``ResNet`` class: BN, non-BN and SE variants.

Kept apart from :mod:`trainers.models` because importing torchvision is slow: a
digits or CIFAR run never pays it; :mod:`trainers.models` imports this module only when one
of these models is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap ``model.conv1`` for a conv with ``in_channels`` inputs and the same config.

    The new conv is initialised as torchvision initialises convs (Kaiming normal, fan_out),
    so a 1-channel ResNet starts from the same distribution as the RGB one.
    """
    old = model.conv1
    assert isinstance(old, nn.Conv2d)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        groups=old.groups,
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = new


# --- torchvision ResNets, with and without BatchNorm -------------------------------------------

_TV_RESNETS: dict[int, Callable[..., tv_resnet.ResNet]] = {
    18: tv_resnet.resnet18,
    34: tv_resnet.resnet34,
    50: tv_resnet.resnet50,
    101: tv_resnet.resnet101,
}


def torchvision_resnet(
    depth: int, num_classes: int, in_channels: int = 3, *, batchnorm: bool = True
) -> nn.Module:
    """torchvision ResNet-``depth`` (He et al. 2016), randomly initialised.

    With ``batchnorm=False`` every BatchNorm2d (stem, blocks, downsample shortcuts) is an
    ``nn.Identity``: the paper's "non-BN ResNet", no Fixup, no SkipInit, no scalar gains.
    The convs keep torchvision's ``bias=False`` on purpose, so this is exactly "BN replaced by
    identity" and the only bias left is ``fc``'s. ``norm_layer=nn.Identity`` works because
    torchvision calls ``norm_layer(planes)`` and Identity ignores its arguments; the module
    tree stays that of the BN model. Without BN the residual sums grow with depth at init;
    the paper only trains ResNet-18 this way, the deeper ones are here for completeness.
    """
    kwargs: dict[str, object] = {}
    if not batchnorm:
        kwargs["norm_layer"] = nn.Identity
    model = _TV_RESNETS[depth](weights=None, num_classes=num_classes, **kwargs)
    _replace_stem(model, in_channels)
    return model


# --- Squeeze-and-Excitation ResNets (Hu et al. 2018) -------------------------------------------


class SqueezeExcite(nn.Module):
    """SE module: global avg pool -> 1x1 conv C->C/r -> ReLU -> 1x1 conv C/r->C -> sigmoid.

    The two FC layers of Hu et al. (Fig. 3) are 1x1 convs with bias, as in the reference
    Caffe models and timm, so no reshaping is needed. ``C // r`` is not rounded up to a
    multiple of 8 (timm does that; it only changes SE-ResNet-18's 64-channel stage).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.fc2(self.relu(self.fc1(scale)))
        return x * torch.sigmoid(scale)


class _SEBasicBlock(tv_resnet.BasicBlock):
    """torchvision BasicBlock with SE on the residual branch, before the addition."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.se = SqueezeExcite(self.conv2.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class _SEBottleneck(tv_resnet.Bottleneck):
    """torchvision Bottleneck (stride on the 3x3, "ResNet v1.5") with SE before the addition."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.se = SqueezeExcite(self.conv3.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


_SE_LAYERS: dict[int, tuple[type[tv_resnet.BasicBlock | tv_resnet.Bottleneck], list[int]]] = {
    18: (_SEBasicBlock, [2, 2, 2, 2]),
    50: (_SEBottleneck, [3, 4, 6, 3]),
}


def se_resnet(depth: int, num_classes: int, in_channels: int = 3) -> nn.Module:
    """SE-ResNet-``depth`` on torchvision's ``ResNet`` class, reduction 16.

    Parameter counts at 1000 classes: SE-ResNet-50 28,088,024 (the standard 28.09 M, same
    as timm's ``seresnet50``; timm is not installed here, the figure is checked by
    arithmetic in the tests), SE-ResNet-18 11,778,592.
    """
    block, layers = _SE_LAYERS[depth]
    model = tv_resnet.ResNet(block, layers, num_classes=num_classes)
    _replace_stem(model, in_channels)
    return model
