"""Hydra plugins of gradsweep: thin shims over the sweeper package.

Hydra imports every module of every ``hydra_plugins`` package at plugin discovery, for any
Hydra app in the environment, so these modules import only Hydra and light dataclasses
(:mod:`sweeper.settings`, :mod:`sweeper.search`); the sweep machinery (submitit, the store,
torch) is imported when a sweep starts, as Hydra's own submitit plugin does. The plugins
raise (:class:`~trainers.registry.ConfigError`, :class:`~sweeper.errors.Failed`); the CLI's
boundary prints and exits.

No `from __future__ import annotations` here: Hydra executes this module during plugin
discovery without registering it in sys.modules, and dataclasses then cannot resolve
string annotations.

Registered here: ``hydra/sweeper=gradsweep`` (the default for ``-m``: grids),
``hydra/sweeper=optuna`` (searches) and ``hydra/launcher=local|slurm``.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from sweeper.search import SearchParams
from sweeper.settings import LauncherParams


@dataclass
class LocalLauncherConf(LauncherParams):
    _target_: str = "hydra_plugins.gradsweep_plugins.launcher.GradsweepLauncher"
    kind: str = "local"


@dataclass
class SlurmLauncherConf(LauncherParams):
    _target_: str = "hydra_plugins.gradsweep_plugins.launcher.GradsweepLauncher"
    kind: str = "slurm"
    poll_s: float = 5.0


@dataclass
class SweeperConf:
    _target_: str = "hydra_plugins.gradsweep_plugins.sweeper.GradsweepSweeper"
    params: dict | None = None  # grid given in a preset: {key: "v1,v2,..."}


@dataclass
class OptunaSweeperConf(SearchParams):
    _target_: str = "hydra_plugins.gradsweep_plugins.optuna_sweeper.OptunaSweeper"


_cs = ConfigStore.instance()
_cs.store(group="hydra/launcher", name="local", node=LocalLauncherConf, provider="gradsweep")
_cs.store(group="hydra/launcher", name="slurm", node=SlurmLauncherConf, provider="gradsweep")
_cs.store(group="hydra/sweeper", name="gradsweep", node=SweeperConf, provider="gradsweep")
_cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="gradsweep")
