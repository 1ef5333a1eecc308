"""Hydra plugins of gradsweep: thin shims over sweeper/launch.py.

No `from __future__ import annotations` here: Hydra executes this module during plugin
discovery without registering it in sys.modules, and dataclasses then cannot resolve
string annotations.

Hydra finds plugins in the ``hydra_plugins`` namespace package. Registered here:
``hydra/sweeper=gradsweep`` (the default for ``-m``: grids), ``hydra/sweeper=optuna``
(searches) and ``hydra/launcher=local|slurm``.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from sweeper.launch import LauncherParams
from sweeper.search import SearchParams


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
