"""The Hydra schema: the run's typed config plus where results go, and the settings of our
sweeper and launcher plugins (all registered once, by :func:`register_configs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from sweeper.search import SearchParams
from sweeper.settings import LauncherParams
from trainers.config import RunConfig
from trainers.registry import ConfigError

SYSTEM_METRICS = ("auto", "true", "false")

_PLUGINS = "hydra_plugins.gradsweep_plugins"


@dataclass
class StoreConf:
    url: str | None = None  # any SQLAlchemy URL; None -> sqlite:///<results_dir>/results.db


@dataclass
class MlflowConf:
    enabled: bool = True
    tracking_uri: str | None = None  # None -> sqlite:///<results_dir>/mlflow.db
    experiment: str = "gradsweep"
    # MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory through
    # NVML) on each run: auto = on for jobs on a GPU | true | false
    system_metrics: str = "auto"

    def system_metrics_on(self, device_type: str) -> bool:
        v = str(self.system_metrics).lower()
        return v == "true" or (v == "auto" and device_type == "cuda")


@dataclass
class Config(RunConfig):
    """``conf/config.yaml`` is checked against this: a typo or a wrong type is an error."""

    results_dir: str = "./results"
    sweep_name: str | None = None  # multirun: the sweep's name (default sweep-<timestamp>)
    store: StoreConf = field(default_factory=StoreConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)

    def validate(self) -> None:
        super().validate()
        if str(self.mlflow.system_metrics).lower() not in SYSTEM_METRICS:
            raise ConfigError(f"mlflow.system_metrics={self.mlflow.system_metrics} is not one of "
                              f"{', '.join(SYSTEM_METRICS)}")  # fmt: skip


@dataclass
class LocalLauncherConf(LauncherParams):
    _target_: str = f"{_PLUGINS}.launcher.GradsweepLauncher"
    kind: str = "local"


@dataclass
class SlurmLauncherConf(LauncherParams):
    _target_: str = f"{_PLUGINS}.launcher.GradsweepLauncher"
    kind: str = "slurm"
    poll_s: float = 5.0


@dataclass
class SweeperConf:
    _target_: str = f"{_PLUGINS}.sweeper.GradsweepSweeper"
    params: dict | None = None  # grid given in a preset: {key: "v1,v2,..."}


@dataclass
class OptunaSweeperConf(SearchParams):
    _target_: str = f"{_PLUGINS}.optuna_sweeper.OptunaSweeper"


def register_configs() -> None:
    """The one place that registers schemas with Hydra: the run's config, and
    ``hydra/sweeper=gradsweep|optuna``, ``hydra/launcher=local|slurm`` (registered here, by
    our CLI, rather than at plugin discovery: see ``hydra_plugins/gradsweep_plugins``)."""
    cs = ConfigStore.instance()
    cs.store(name="gradsweep_schema", node=Config)
    cs.store(group="hydra/launcher", name="local", node=LocalLauncherConf, provider="gradsweep")
    cs.store(group="hydra/launcher", name="slurm", node=SlurmLauncherConf, provider="gradsweep")
    cs.store(group="hydra/sweeper", name="gradsweep", node=SweeperConf, provider="gradsweep")
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="gradsweep")
