"""Image classifiers for the sweeps: the networks behind the model catalog
(:mod:`trainers.catalog.models`, where each built-in model's name points at its factory).

Every factory builds a randomly initialised network (``weights=None``;
nothing is ever downloaded) that maps ``(N, in_channels, H, W)`` images to ``(N, num_classes)``
logits. Contract relied on by the trainer: the final classifier is an ``nn.Linear`` attribute
named ``fc`` whose input is the pooled feature vector. The trainer hooks that input to measure
per-channel feature norms, and adaptive gradient clipping skips ``fc.weight``/``fc.bias``, as
NFNets and the official PGT code do.

References:

- K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
  (arXiv:1512.03385). ImageNet ResNets (Sec. 3.4) and CIFAR ResNets (Sec. 4.2).
- J. Hu, L. Shen, G. Sun, "Squeeze-and-Excitation Networks", CVPR 2018 (arXiv:1709.01507).
- B. Das, M. Mondal, B. Lall, S. D. Joshi, S. Dutta Roy, "Altering Backward Pass Gradients
  improves Convergence" (the paper this tool reproduces): non-BN ResNets with BN replaced by identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.catalog.models import MODELS, ModelConf, known_models
from trainers.registry import ConfigError

__all__ = [
    "MODELS",
    "build_model",
    "build_model_from",
    "classifier_of",
    "count_parameters",
    "known_models",
]

# --- CIFAR ResNets (He et al. 2016, Sec. 4.2) --------------------------------------------------


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels.

    Parameter-free, which is why ResNet-20 has 0.27 M parameters and not more.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        # Split the zero channels evenly on both sides, as the common reference code does.
        self.pad = (0, 0, 0, 0, extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], self.pad)


class _CifarBlock(nn.Module):
    """BasicBlock: 3x3 conv-BN-ReLU-3x3 conv-BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = (
            _ShortcutA(in_planes, planes, stride)
            if stride != 1 or in_planes != planes
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: conv 16 -> 3 stages of n blocks (16/32/64) -> pool -> fc.

    Kaiming-normal (fan_in) init of convs and the linear layer, as in He et al. 2015
    ("Delving Deep into Rectifiers"), which the CIFAR ResNets use.
    """

    def __init__(self, n: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_CifarBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- Small CNN for scikit-learn's 8x8 digits ---------------------------------------------------


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 greyscale digits (the CPU default; works for any input >= 8x8).

    conv3x3(in,32)-BN-ReLU-conv3x3(32,64)-BN-ReLU-maxpool2-conv3x3(64,128)-BN-ReLU -> global
    avg pool -> fc(128, C). Padding keeps 8x8 maps until the single pool, so the last conv
    still sees 4x4; global pooling makes ``fc``'s input the pooled features, like the ResNets.
    """

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int) -> list[nn.Module]:
            # No conv bias: BN's shift makes it redundant.
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv_bn(in_channels, 32),
            *conv_bn(32, 64),
            nn.MaxPool2d(2),
            *conv_bn(64, 128),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


# --- Public helpers ----------------------------------------------------------------------------


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the registered model ``name``; raises :class:`ConfigError` for bad arguments."""
    factory = MODELS.get(name).builder()  # ConfigError listing the known names
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    model = factory(num_classes=num_classes, in_channels=in_channels)
    classifier_of(model)  # enforce the fc contract at build time, not mid-run
    return model


def build_model_from(conf: ModelConf, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The run's model: a registered one (``conf.name``) or ``conf._target_`` called as
    ``fn(num_classes=..., [in_channels=...,] **conf.args)`` (in_channels only when the
    callable names it, so a torchvision constructor works for 3-channel data). The
    classifier contract -- a final ``nn.Linear`` named ``fc`` -- is checked here, at build
    time, before any row is written."""
    if not conf._target_:
        return build_model(conf.name, num_classes, in_channels)
    from trainers.custom import model_factory

    model = model_factory(conf._target_, conf.args, num_classes, in_channels)()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={conf._target_} returned a {type(model).__name__}, not an nn.Module"
        )
    try:
        classifier_of(model)
    except TypeError as e:
        raise ConfigError(
            f"model._target_={conf._target_}: {e} (the final classifier, which AGC leaves "
            "alone and whose input the feature norms measure)"
        ) from None
    return model


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final classifier ``model.fc``; its input is the pooled feature vector."""
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no nn.Linear attribute 'fc'")
    return fc


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not; shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
