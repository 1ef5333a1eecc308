"""The Hydra schema: the run's typed config plus where results go, and the settings of our
sweeper and launcher plugins (all registered once, by :func:`register_configs`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from sweeper.config.launcher import LauncherParams
from sweeper.config.search import SearchParams
from sweeper.store.url import default_tracking_uri, default_url
from trainers.catalog import DATASETS, DataConfig, data_config, data_facts, data_identity
from trainers.config import RunConfig
from trainers.registry import ConfigError

SYSTEM_METRICS = ("auto", "true", "false")
# MLflow's longest experiment name (mlflow/utils/validation.py, MAX_EXPERIMENT_NAME_LENGTH,
# MLflow 3.x), copied so that the pre-flight refuses a longer one without importing MLflow
MLFLOW_MAX_EXPERIMENT_NAME = 500
# the store's integer columns (SQLite INTEGER, PostgreSQL BIGINT) and torch's indices are
# 64-bit: a larger integer would crash the job after its row exists
INT64_LIMIT = 2**63

_PLUGINS = "hydra_plugins.gradsweep_plugins"
DATA_SCHEMAS = "gradsweep/data"  # where conf/data/NAME.yaml finds its schema


@dataclass
class StoreConf:
    url: str | None = None  # any SQLAlchemy URL; None -> sqlite:///<results_dir>/results.db
    # how long a store that stopped answering (a server restart, a lock held past the busy
    # timeout) is waited for, in seconds; None -> GRADSWEEP_STORE_RETRY_S or 120
    retry_s: float | None = None


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

    # each data set's config has its own keys (trainers.catalog): conf/data/NAME.yaml
    # extends the schema DATASETS registers as gradsweep/data/NAME; to_config makes the
    # typed DataConfig of it
    data: Any = field(default_factory=dict)
    results_dir: str = "./results"
    sweep_name: str | None = None  # multirun: the sweep's name (default sweep-<timestamp>)
    store: StoreConf = field(default_factory=StoreConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)

    def __post_init__(self) -> None:
        if not isinstance(self.data, DataConfig):  # the data set's own node, from Hydra
            node = self.data if isinstance(self.data, dict) else asdict(self.data)
            self.data = data_config(node)

    def make_results_dir(self) -> None:
        """Create the results dir: when a run or sweep starts, after its checks passed
        (refused input leaves no folder behind)."""
        Path(self.results_dir).expanduser().mkdir(parents=True, exist_ok=True)

    def store_url(self) -> str:
        """The results store: ``store.url``, or the SQLite file in the results dir."""
        return self.store.url or default_url(self.results_dir)

    def open_store(self, *, wait_open: bool = False, warn: Any = None) -> Any:
        """The results store (:class:`sweeper.store.Store`) with this config's retry bound."""
        from sweeper.store import Store

        return Store(self.store_url(), retry_s=self.store.retry_s, warn=warn, wait_open=wait_open)

    def tracking_uri(self) -> str:
        """The MLflow tracking store: ``mlflow.tracking_uri``, or SQLite in the results dir."""
        return self.mlflow.tracking_uri or default_tracking_uri(self.results_dir)

    def validate(self) -> None:
        super().validate()
        _check_int64(self)
        if self.store.retry_s is not None and not 0 <= self.store.retry_s <= 86400:
            raise ConfigError(f"store.retry_s={self.store.retry_s} is not allowed; expected "
                              "seconds between 0 and 86400")  # fmt: skip
        if str(self.mlflow.system_metrics).lower() not in SYSTEM_METRICS:
            raise ConfigError(f"mlflow.system_metrics={self.mlflow.system_metrics} is not one of "
                              f"{', '.join(SYSTEM_METRICS)}")  # fmt: skip
        name = self.mlflow.experiment
        if not name or len(name) > MLFLOW_MAX_EXPERIMENT_NAME:
            shown = f"{name[:40]}... ({len(name)} characters)" if len(name) > 60 else name
            raise ConfigError(f"mlflow.experiment={shown} is not allowed; expected a name of 1 to "
                              f"{MLFLOW_MAX_EXPERIMENT_NAME} characters (MLflow's limit)")  # fmt: skip
        self._check_data_sizes()

    def _check_data_sizes(self) -> None:
        """What a built-in data set's loader would refuse, known without loading it: the
        same lines as :mod:`trainers.data` says in the job, before anything is written."""
        d = self.data
        if d._target_:
            return  # your own data: built once by the pre-flight (sweeper.config.checks)
        if d.name == "synthetic":
            for key in ("image_size", "num_classes", "channels", "num_train", "num_test"):
                if getattr(d, key) <= 0:
                    raise ConfigError(
                        f"data.{key}={getattr(d, key)} must be positive for synthetic"
                    )
        if d.name == "imagenet" and (d.image_size <= 0 or d.num_workers < 0):
            raise ConfigError(f"imagenet needs data.image_size > 0 and data.num_workers >= 0, got "
                              f"{d.image_size} and {d.num_workers}")  # fmt: skip
        num_train = data_facts(data_identity(d)).get("num_train")
        if isinstance(num_train, int) and self.batch_size > num_train:
            raise ConfigError(
                f"batch_size={self.batch_size} exceeds the {num_train} training images of {d.name}"
            )


def _check_int64(node: object, prefix: str = "") -> None:
    """Every integer of the config (nested settings and lists included) fits in 64 bits."""
    assert is_dataclass(node)
    for f in fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if is_dataclass(value):
            _check_int64(value, key + ".")
            continue
        for v in value if isinstance(value, list) else [value]:
            if (
                isinstance(v, int)
                and not isinstance(v, bool)
                and not -INT64_LIMIT < v < INT64_LIMIT
            ):
                bound = "below 2**63" if v > 0 else "above -2**63"
                raise ConfigError(f"{key}={value} is not allowed; expected an integer {bound} "
                                  "(64 bits)")  # fmt: skip


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
    for name in DATASETS:
        cs.store(group=DATA_SCHEMAS, name=name, node=DATASETS.get(name).schema,
                 provider="gradsweep")  # fmt: skip
    cs.store(group="hydra/launcher", name="local", node=LocalLauncherConf, provider="gradsweep")
    cs.store(group="hydra/launcher", name="slurm", node=SlurmLauncherConf, provider="gradsweep")
    cs.store(group="hydra/sweeper", name="gradsweep", node=SweeperConf, provider="gradsweep")
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="gradsweep")
