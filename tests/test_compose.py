"""A sweep's points composed at the speed of a loop (``sweeper.config.compose.PointComposer``)
give exactly what Hydra's per-point composition gives: the same configs, hashes and errors."""

from __future__ import annotations

import itertools

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.types import RunMode
from omegaconf import open_dict

from sweeper.config.compose import CONF_DIR, PointComposer, hydra_error_line, to_config
from sweeper.config.identity import identity_of
from sweeper.config.schema import register_configs
from trainers.registry import ConfigError

FIXED = ["epochs=2", "mlflow.enabled=false"]
# a mixed grid: groups (method, data, schedule, an experiment preset) and values, some of
# them refused for some groups only (synthetic's keys on digits, alpha out of range)
AXES = [
    ["method=baseline", "method=pgt", "method=gc_pgt", "method=ls"],
    ["alpha=0.05", "alpha=0.5", "alpha=1.5"],
    ["data=digits", "data=synthetic"],
    ["", "data.num_train=128", "data.data_seed=3"],
    ["schedule=cosine", "schedule=step"],
    ["", "+experiment=smoke", "method.gc_max_norm=0.5", "'method.grad=[gc,znorm]'"],
    ["seed=0", "seed=1"],
]


def _hydra_per_point(loader: ConfigLoaderImpl, master, point: list[str]):  # noqa: ANN001, ANN202
    """What the launcher did before: Hydra's own composition of every point."""
    try:
        sc = loader.load_sweep_config(master, point)
        with open_dict(sc):
            del sc["hydra"]
        return to_config(sc)
    except ConfigError as e:
        return ("error", str(e))
    except Exception as e:
        return ("error", hydra_error_line(e))


@pytest.mark.slow  # Hydra's own composition takes ~0.15 s a point
def test_points_equal_hydras_own_composition() -> None:
    register_configs()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    master = loader.load_configuration("config", FIXED, run_mode=RunMode.MULTIRUN)
    fast = PointComposer(loader, master)
    points = [[p.strip("'") for p in combo if p] for combo in itertools.product(*AXES)]
    checked = errors = 0
    for point in points[::11]:  # 1,152 points; every 11th (each axis value seen many times)
        want = _hydra_per_point(loader, master, point)
        try:
            got = fast.compose(point)
        except ConfigError as e:
            got = ("error", str(e))
        assert got == want, point
        if isinstance(want, tuple):
            errors += 1
        else:
            assert identity_of(got) == identity_of(want)
        checked += 1
    assert checked > 100 and 10 < errors < checked  # both kinds of outcome were compared
    assert len(fast._bases) < 40  # one composition per distinct combination of groups


def test_a_bad_override_is_named_like_hydra_names_it() -> None:
    register_configs()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    master = loader.load_configuration("config", FIXED, run_mode=RunMode.MULTIRUN)
    fast = PointComposer(loader, master)
    for bad, named in (("batch_size=abc", "batch_size"), ("alpah=0.3", "did you mean 'alpha'"),
                       ("data.num_train=5", "for data=digits")):  # fmt: skip
        with pytest.raises(ConfigError, match=named):
            fast.compose([bad])
