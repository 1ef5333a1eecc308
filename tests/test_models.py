"""Tests for trainers.models: the registry, the fc contract, parameter counts, one train step."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainers.imagenet_models import SqueezeExcite
from trainers.models import (
    MODELS,
    build_model,
    classifier_of,
    count_parameters,
    known_models,
)
from trainers.registry import ConfigError

EXPECTED_NAMES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet18_nobn",
    "resnet34_nobn",
    "resnet50_nobn",
    "resnet101_nobn",
    "seresnet18",
    "seresnet50",
    "resnet20",
    "resnet32",
    "resnet56",
    "digits_cnn",
]

TV_DEPTHS = [18, 34, 50, 101]


def _input_for(name: str, batch: int) -> torch.Tensor:
    if name == "digits_cnn":
        return torch.randn(batch, 1, 8, 8)
    return torch.randn(batch, 3, 32, 32)


def _bn_params(model: nn.Module) -> int:
    return sum(
        p.numel() for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters()
    )


def test_registry_names() -> None:
    assert known_models() == EXPECTED_NAMES
    assert all(name in MODELS for name in EXPECTED_NAMES)


def test_every_catalog_entry_has_its_config_and_no_config_is_unknown() -> None:
    """One catalog entry per model and data set, each with its ``conf/<group>/NAME.yaml``."""
    from helpers import REPO

    from trainers.catalog import known_datasets

    for group, names in (("model", known_models()), ("data", known_datasets())):
        files = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert files == sorted(names), group


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_contract_and_one_train_step(name: str) -> None:
    torch.manual_seed(0)
    in_channels = 1 if name == "digits_cnn" else 3
    model = build_model(name, num_classes=5, in_channels=in_channels)
    fc = classifier_of(model)
    assert fc is model.fc and isinstance(fc, nn.Linear) and fc.out_features == 5

    # Batch of 4: with 2 images the ImageNet BN models see 2 values per channel in layer4
    # (1x1 maps at 32x32 input) and their gradients blow up; 4 keeps them sane.
    x = _input_for(name, 4).float()
    y = torch.tensor([0, 1, 2, 3])
    seen: list[torch.Size] = []
    handle = fc.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].shape))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    logits = model(x)
    handle.remove()
    assert logits.shape == (4, 5) and logits.dtype == torch.float32
    # The trainer measures per-channel norms of fc's input: it must be the pooled features.
    assert seen == [torch.Size([4, fc.in_features])]
    loss = nn.functional.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


@pytest.mark.parametrize("depth", TV_DEPTHS)
def test_torchvision_counts_and_nobn(depth: int) -> None:
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    ours = build_model(f"resnet{depth}", 1000)
    assert count_parameters(ours) == count_parameters(tv)

    nobn = build_model(f"resnet{depth}_nobn", 1000)
    assert not any(isinstance(m, _BatchNorm) for m in nobn.modules())
    assert count_parameters(nobn) == count_parameters(tv) - _bn_params(tv)
    # Exactly "BN replaced by identity": same module tree, BN slots are nn.Identity.
    tv_types = {n: type(m) for n, m in tv.named_modules()}
    nobn_types = {n: type(m) for n, m in nobn.named_modules()}
    assert tv_types.keys() == nobn_types.keys()
    for n, t in tv_types.items():
        expected = nn.Identity if issubclass(t, nn.BatchNorm2d) else t
        assert nobn_types[n] is expected, n
    assert all(m.bias is None for m in nobn.modules() if isinstance(m, nn.Conv2d))


def _se_params(channels: list[int]) -> int:
    # Two 1x1 convs with bias: C*C/16 + C/16 (squeeze) and C/16*C + C (excite).
    return sum(2 * c * (c // 16) + c // 16 + c for c in channels)


def test_seresnet_counts_and_se_modules() -> None:
    se50 = build_model("seresnet50", 1000)
    se50_out = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    tv50 = count_parameters(torchvision.models.resnet50(weights=None))  # 25,557,032
    # 25,557,032 + 2,530,992 = 28,088,024, the standard 28.09 M (timm's seresnet50 figure).
    assert count_parameters(se50) == tv50 + _se_params(se50_out) == 28_088_024
    assert 28.0e6 <= count_parameters(se50) <= 28.2e6
    assert sum(isinstance(m, SqueezeExcite) for m in se50.modules()) == 16

    se18 = build_model("seresnet18", 1000)
    se18_out = [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2
    assert count_parameters(se18) == 11_689_512 + _se_params(se18_out) == 11_778_592
    assert sum(isinstance(m, SqueezeExcite) for m in se18.modules()) == 8


def _cifar_params(n: int, num_classes: int) -> int:
    # Independent arithmetic (option A: shortcuts have no parameters; BN has 2C params).
    # stem: 3*16*9 + 32 = 464; fc: 64*C + C.
    # stage 1: n blocks of 2*(16*16*9) + 2*32 = 4,672.
    # stage 2: first 16*32*9 + 32*32*9 + 128 = 13,952, then n-1 of 2*(32*32*9) + 128 = 18,560.
    # stage 3: first 32*64*9 + 64*64*9 + 256 = 55,552, then n-1 of 2*(64*64*9) + 256 = 73,984.
    # n=3: 464 + 14,016 + 51,072 + 203,520 + 650 = 269,722 (resnet20);
    # n=5 gives 464,154 (resnet32), n=9 gives 853,018 (resnet56): all as the brief states.
    stages = 4_672 * n + 13_952 + 18_560 * (n - 1) + 55_552 + 73_984 * (n - 1)
    return 464 + stages + 64 * num_classes + num_classes


@pytest.mark.parametrize(("depth", "expected"), [(20, 269_722), (32, 464_154), (56, 853_018)])
def test_cifar_resnet_counts(depth: int, expected: int) -> None:
    n = (depth - 2) // 6
    assert _cifar_params(n, 10) == expected
    model = build_model(f"resnet{depth}", 10)
    assert count_parameters(model) == expected
    assert count_parameters(build_model(f"resnet{depth}", 100)) == _cifar_params(n, 100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n+2 weighted layers: convs plus fc


def test_cifar_option_a_shortcut_zero_pads() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    assert isinstance(model.layer2, nn.Sequential)
    shortcut = model.layer2[0].shortcut
    assert isinstance(shortcut, nn.Module)
    x = torch.randn(2, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert count_parameters(shortcut) == 0


def test_unknown_model_and_bad_arguments() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("nope", 10)
    assert "nope" in str(err.value) and "resnet20" in str(err.value)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet20", 0)
    with pytest.raises(ConfigError, match="in_channels"):
        build_model("resnet20", 10, in_channels=0)


def test_in_channels_and_input_sizes() -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name in ("resnet18", "resnet18_nobn", "seresnet18"):
            model = build_model(name, 7, in_channels=1).eval()
            assert isinstance(model.conv1, nn.Conv2d) and model.conv1.in_channels == 1
            assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
        cifar = build_model("resnet20", 10, in_channels=1).eval()
        assert cifar(torch.randn(2, 1, 32, 32)).shape == (2, 10)
        digits = build_model("digits_cnn", 10, in_channels=1).eval()
        for size in (8, 9, 28):
            assert digits(torch.randn(2, 1, size, size)).shape == (2, 10)
        assert build_model("digits_cnn", 10).eval()(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_classifier_of_rejects_models_without_fc() -> None:
    with pytest.raises(TypeError):
        classifier_of(nn.Sequential(nn.Linear(2, 2)))
