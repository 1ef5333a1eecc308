"""The Hydra schema: the run's typed config plus where results go (registered once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from trainers.config import RunConfig


@dataclass
class StoreConf:
    url: str | None = None  # any SQLAlchemy URL; None -> sqlite:///<results_dir>/results.db


@dataclass
class MlflowConf:
    enabled: bool = True
    tracking_uri: str | None = None  # None -> sqlite:///<results_dir>/mlflow.db
    experiment: str = "gradsweep"


@dataclass
class Config(RunConfig):
    """``conf/config.yaml`` is checked against this: a typo or a wrong type is an error."""

    results_dir: str = "./results"
    sweep_name: str | None = None  # multirun: the sweep's name (default sweep-<timestamp>)
    store: StoreConf = field(default_factory=StoreConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)


def register_configs() -> None:
    """The one place that registers schemas with Hydra."""
    ConfigStore.instance().store(name="gradsweep_schema", node=Config)
