"""The paper presets expand to exactly the paper's runs (the paper's tables as data, analysis/paper/)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from sweeper.config.compose import CONF_DIR, PointComposer
from sweeper.config.schema import Config, register_configs

PAPER = Path(__file__).resolve().parent.parent / "analysis" / "paper"


def expand(preset: str, *extra: str) -> list[Config]:
    """Every point of a preset's grid, composed like the sweeper composes them (its
    launcher's :class:`~sweeper.config.compose.PointComposer` over Hydra's own loader)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = [f"+experiment={preset}", *extra]
        hcfg = compose("config", overrides=base, return_hydra_config=True)
        params = hcfg.hydra.sweeper.params or {}
        args = [f"{k}={v}" for k, v in params.items()]
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        points = BasicSweeper.split_arguments(parser.parse_overrides(args), None)
        master = loader.load_configuration("config", base, run_mode=RunMode.MULTIRUN)
        composer = PointComposer(loader, master)
        return [composer.compose([*base, *p]) for p in (points[0] if points else [[]])]


def rows(name: str) -> list[dict[str, str]]:
    with open(PAPER / name) as f:
        return list(csv.DictReader(f))


def _alpha(v: str) -> float | None:
    return float(v) if v else None


def _common_imagenet(cfgs: list[Config]) -> None:
    for c in cfgs:
        assert c.data.name == "imagenet" and c.data.image_size == 224
        assert c.epochs == 100 or c.epochs == 50
        assert c.resolved_lr() == pytest.approx(0.1 * c.batch_size / 256)
        assert c.schedule.warmup_epochs == 5 and c.schedule.warmup_start_factor == 1e-3
        assert (c.momentum, c.nesterov, c.weight_decay) == (0.9, True, 5e-4)


@pytest.mark.slow
def test_table1_preset_is_the_papers_table1() -> None:
    cfgs = expand("table1", "data.root=/data/imagenet")
    _common_imagenet(cfgs)
    got = {(c.model.name, c.schedule.name, c.method.name, c.effective_alpha()) for c in cfgs}
    want = {
        (r["model"], r["scheduler"], r["method"], _alpha(r["alpha"]))
        for r in rows("table1_bn_imagenet.csv")
    }
    assert got == want
    assert all(c.batch_size == 1024 and c.epochs == 100 for c in cfgs)
    assert cfgs[0].resolved_lr() == pytest.approx(0.4)  # the paper's peak at batch 1024


@pytest.mark.slow
def test_table2_preset_is_the_papers_table2() -> None:
    cfgs = expand("table2", "data.root=/data/imagenet")
    _common_imagenet(cfgs)
    assert {c.model.name for c in cfgs} == {"resnet18_nobn"}
    assert {c.schedule.name for c in cfgs} == {"cosine"}
    got = sorted((c.batch_size, c.method.name, c.effective_alpha() or 0) for c in cfgs)
    want = sorted(
        (int(r["batch_size"]), r["method"], _alpha(r["alpha"]) or 0)
        for r in rows("table2_nobn_resnet18_imagenet.csv")
    )
    assert got == want


def test_table3_preset_is_the_papers_ablation() -> None:
    cfgs = expand("table3", "data.root=/data/imagenet")
    _common_imagenet(cfgs)
    assert {c.model.name for c in cfgs} == {"resnet50"}
    got = sorted(
        (c.schedule.name, c.effective_label_smoothing(), c.effective_alpha() or 0) for c in cfgs
    )
    want = sorted(
        (r["scheduler"], float(r["label_smoothing"] or 0), _alpha(r["alpha"]) or 0)
        for r in rows("table3_ablation_resnet50_imagenet.csv")
    )
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["alpha_grid_resnet18", "alpha_grid_resnet50"])
def test_imagenet_alpha_grids(preset: str) -> None:
    cfgs = expand(preset, "data.root=/data/imagenet")
    _common_imagenet(cfgs)
    assert all(c.epochs == 50 for c in cfgs)  # "each datapoint ... over a 50 epoch budget"
    alphas = {c.effective_alpha() for c in cfgs}
    assert None in alphas and {0.05, 0.25, 0.3} <= alphas


@pytest.mark.slow
def test_cifar_presets() -> None:
    grid = expand("alpha_grid_resnet20_cifar10", "data.root=/data/cifar")
    assert {(c.model.name, c.data.name, c.epochs) for c in grid} == {("resnet20", "cifar10", 360)}
    cifar = expand("cifar100", "data.root=/data/cifar")
    assert len(cifar) == 3 * 9 * 3 and {c.data.name for c in cifar} == {"cifar100"}


def test_smoke_preset_is_small() -> None:
    (c,) = expand("smoke")
    assert c.data.name == "digits" and c.epochs <= 5
