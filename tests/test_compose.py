"""A sweep's points composed at the speed of a loop (``sweeper.config.compose.PointComposer``)
give exactly what Hydra's per-point composition gives: the same configs, hashes and errors."""

from __future__ import annotations

import itertools
import random

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
# them refused for some groups only (synthetic's keys on digits, alpha out of range), leaves
# (numbers given as ints for floats, a bool, a string, null where none is allowed, a key
# twice) and values that are not leaves (a list, the data set's own keys)
AXES = [
    ["method=baseline", "method=pgt", "method=gc_pgt", "method=ls"],
    ["alpha=0.05", "alpha=0.5", "alpha=1.5"],
    ["data=digits", "data=synthetic"],
    ["", "data.num_train=128", "data.data_seed=3"],
    ["schedule=cosine", "schedule=step"],
    ["", "+experiment=smoke", "method.gc_max_norm=0.5", "'method.grad=[gc,znorm]'"],
    ["seed=0", "seed=1", "batch_size=32 lr=1", "nesterov=false device=cpu", "alpha=null",
     "batch_size=abc", "sweep_name=s1 momentum=0", "alpha=0.3 schedule.min_lr=0"],
]  # fmt: skip


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
    grid = [[o.strip("'") for p in combo for o in p.split()] for combo in itertools.product(*AXES)]
    points = random.Random(23).sample(grid, 140)  # of 9,216; each axis value seen many times
    checked = errors = 0
    for point in points:
        want = _hydra_per_point(loader, master, point)
        try:
            got = fast.compose(point)
        except ConfigError as e:
            got = ("error", str(e))
        # repr: 1 and 1.0 are equal but hash differently; every field and its type match
        assert repr(got) == repr(want), point
        if isinstance(want, tuple):
            errors += 1
        else:
            assert identity_of(got) == identity_of(want)
        checked += 1
    assert 20 < errors < checked - 50  # both kinds of outcome were compared
    assert len(fast._bases) < 40  # one composition per distinct combination of groups
    # the fast path served the points that compose: Hydra's way only for refused ones
    assert fast.slow <= errors, (fast.slow, errors)


def test_a_large_grid_composes_at_the_speed_of_a_loop() -> None:
    """4 stems (method x data seed) of 100 points each: a point costs a few dictionary
    look-ups and a dataclasses.replace, not a copy of the config; each has its own values."""
    register_configs()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    master = loader.load_configuration("config", FIXED, run_mode=RunMode.MULTIRUN)
    fast = PointComposer(loader, master)
    cfgs = {}
    for method in ("method=pgt", "method=ls"):
        for data in ("data.data_seed=0", "data.data_seed=1"):
            for bs in ("batch_size=32", "batch_size=64"):
                for seed in range(50):
                    pt = [method, data, bs, f"seed={seed}", f"alpha={0.1 + seed % 5 / 10}"]
                    cfgs[tuple(pt)] = fast.compose(pt)
    assert fast.slow == 0 and len(fast._stems) == 4  # batch_size and seed are leaves
    for pt, c in cfgs.items():
        assert c.method.name == pt[0].split("=")[1] and c.data.data_seed == int(pt[1][-1])
        assert c.batch_size == int(pt[2].split("=")[1]) and c.seed == int(pt[3].split("=")[1])
        assert c.alpha == float(pt[4].split("=")[1]) and isinstance(c.alpha, float)
    assert len({identity_of(c)[1] for c in cfgs.values()}) == len(cfgs)


def test_a_bad_override_is_named_like_hydra_names_it() -> None:
    register_configs()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    master = loader.load_configuration("config", FIXED, run_mode=RunMode.MULTIRUN)
    fast = PointComposer(loader, master)
    for bad, named in (("batch_size=abc", "batch_size"), ("alpah=0.3", "did you mean 'alpha'"),
                       ("data.num_train=5", "for data=digits")):  # fmt: skip
        with pytest.raises(ConfigError, match=named):
            fast.compose([bad])
