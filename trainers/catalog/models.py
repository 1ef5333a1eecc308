"""The built-in models, one catalog entry each (torch-free): its name, what it is, and the
factory that builds it (imported only when a job builds the model).

Every factory builds a randomly initialised network (nothing is ever downloaded) mapping
``(N, in_channels, H, W)`` images to ``(N, num_classes)`` logits, whose final classifier is
an ``nn.Linear`` named ``fc`` (the trainer measures its input's per-channel norms; AGC leaves
it alone). **Adding a model**: its factory (in :mod:`trainers.models` or a module of its
own), an entry in :data:`MODELS` below, and ``conf/model/NAME.yaml``.

:class:`ModelConf` is the ``model`` config: a built-in ``name`` or your own ``_target_``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainers.registry import Registry


@dataclass
class ModelConf:
    name: str = "digits_cnn"
    # your own model: any callable taking num_classes (and in_channels, if it names it)
    # returning an nn.Module whose final classifier is an nn.Linear named ``fc``
    _target_: str | None = None
    args: Any = None  # keyword arguments for _target_, e.g. model.args={width: 16}

    @property
    def effective_name(self) -> str:
        """``name``, or for a ``_target_`` the callable's name (what runs.model records)."""
        return self._target_.rsplit(".", 1)[-1] if self._target_ else self.name

    def identity(self) -> Any:
        if not self._target_:
            return self.name  # the identity registered models always had
        return {"_target_": self._target_, **(self.args or {})}


@dataclass(frozen=True)
class Model:
    """One built-in model: ``factory`` is ``"module:callable"``, called as
    ``callable(num_classes=..., in_channels=..., **kwargs)``."""

    name: str
    summary: str
    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def builder(self) -> Callable[..., Any]:
        """``(num_classes, in_channels) -> nn.Module`` (imports the factory's module)."""
        module, fn = self.factory.split(":")
        make = getattr(importlib.import_module(module), fn)

        def build(num_classes: int, in_channels: int = 3) -> Any:
            return make(num_classes=num_classes, in_channels=in_channels, **self.kwargs)

        return build


MODELS: Registry[Model] = Registry("model")
_TV = "trainers.imagenet_models:torchvision_resnet"  # torchvision's ImageNet ResNets
for _d in (18, 34, 50, 101):  # BN variants first: registration order is the listing order
    MODELS.register(f"resnet{_d}", Model(f"resnet{_d}", f"ResNet-{_d} (torchvision, ImageNet)",
                                         _TV, {"depth": _d}))  # fmt: skip
for _d in (18, 34, 50, 101):
    MODELS.register(f"resnet{_d}_nobn", Model(
        f"resnet{_d}_nobn", f"ResNet-{_d} with every BatchNorm replaced by identity (the "
        "paper's non-BN ResNets)", _TV, {"depth": _d, "batchnorm": False}))  # fmt: skip
for _d in (18, 50):
    MODELS.register(f"seresnet{_d}", Model(f"seresnet{_d}", f"SE-ResNet-{_d} (Hu et al. 2018)",
                                           "trainers.imagenet_models:se_resnet",
                                           {"depth": _d}))  # fmt: skip
for _d in (20, 32, 56):
    MODELS.register(f"resnet{_d}", Model(
        f"resnet{_d}", f"CIFAR ResNet-{_d} (He et al. 2016, option-A shortcuts)",
        "trainers.models:CifarResNet", {"n": (_d - 2) // 6}))  # fmt: skip
MODELS.register("digits_cnn", Model("digits_cnn", "small CNN for 8x8 digits (the CPU default)",
                                    "trainers.models:DigitsCNN"))  # fmt: skip


def known_models() -> list[str]:
    """Built-in model names, in catalog order."""
    return MODELS.names()
