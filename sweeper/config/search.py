"""``hydra/sweeper=optuna`` settings: the metric, sampler, pruner and budget of a search (a
plain dataclass, light to import: nothing here imports Optuna; the pruner is built where a job
needs it). The search space and the trials are in :mod:`sweeper.launch.trials`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trainers.registry import ConfigError

if TYPE_CHECKING:
    import optuna

# Metrics a run records every epoch (epoch_metrics) and so can be reported to a pruner;
# the objective is the value of the last epoch. None: no natural direction, say it.
METRIC_DIRECTIONS: dict[str, str | None] = {
    "test_acc": "maximize",
    "test_top5": "maximize",
    "train_acc": "maximize",
    "test_loss": "minimize",
    "train_loss": "minimize",
    "gap": "minimize",
    "logit_norm": None,
    "grad_norm_before": None,
    "grad_norm_after": None,
    "images_per_s": "maximize",
    "epoch_time": "minimize",
    "val_acc": "maximize",  # on the validation split: only with data.val_split > 0
    "val_loss": "minimize",
}
VAL_METRICS = ("val_acc", "val_loss")
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("none", "median", "successive_halving", "hyperband")


@dataclass
class PrunerParams:
    """The pruner, rebuilt in every job from these settings (Optuna does not store it)."""

    name: str = "none"
    n_startup_trials: int = 2  # median: trials that must finish before any is pruned
    n_warmup_steps: int = 1  # median: epochs a trial runs before it may be pruned
    min_resource: int = 1  # successive halving / hyperband: epochs before the first rung
    reduction_factor: int = 3  # successive halving / hyperband

    def build(self) -> optuna.pruners.BasePruner:
        import optuna

        if self.name == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=self.n_startup_trials, n_warmup_steps=self.n_warmup_steps
            )
        if self.name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=self.min_resource, reduction_factor=self.reduction_factor
            )
        if self.name == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=self.min_resource, reduction_factor=self.reduction_factor
            )
        return optuna.pruners.NopPruner()


@dataclass
class SearchParams:
    """``hydra.sweeper.*`` of ``hydra/sweeper=optuna`` (docs/searches.md)."""

    n_trials: int = 20  # the study's total: a re-run continues up to this many
    n_jobs: int = 1  # trials in flight at once (a new one starts whenever one ends)
    sampler: str = "tpe"  # tpe | random | grid | cmaes
    seed: int | None = None  # sampler seed: the same seed suggests the same sequence
    metric: str = "test_acc"  # any per-epoch metric (METRIC_DIRECTIONS); the last epoch's
    direction: str | None = None  # maximize | minimize; None -> the metric's natural one
    pruner: str = "none"  # none | median | successive_halving | hyperband
    n_startup_trials: int = 2
    n_warmup_steps: int = 1
    min_resource: int = 1
    reduction_factor: int = 3
    storage: str | None = None  # Optuna RDB URL; None -> the results store's database
    study_name: str | None = None  # None -> sweep_name, else derived from the search
    params: dict[str, str] | None = field(
        default=None
    )  # space from a preset: {key: "interval(0,1)"}

    def check_data(self, val_splits: list[float]) -> None:
        """A validation metric needs every trial to hold out a validation split
        (``val_splits``: ``data.val_split`` of the space's corners)."""
        if self.metric in VAL_METRICS and not all(val_splits):
            raise ConfigError(
                f"hydra.sweeper.metric={self.metric} needs a validation split, but "
                "data.val_split=0; set data.val_split to a fraction in (0, 1), e.g. 0.1"
            )

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"hydra.sweeper.sampler={self.sampler} is not allowed; known: {', '.join(SAMPLERS)}"
            )
        if self.pruner not in PRUNERS:
            raise ConfigError(
                f"hydra.sweeper.pruner={self.pruner} is not allowed; known: {', '.join(PRUNERS)}"
            )
        if self.metric not in METRIC_DIRECTIONS:
            raise ConfigError(
                f"hydra.sweeper.metric={self.metric} is not a metric the store records; "
                f"known: {', '.join(METRIC_DIRECTIONS)}"
            )
        if self.direction is not None and self.direction not in ("maximize", "minimize"):
            raise ConfigError(
                f"hydra.sweeper.direction={self.direction} is not allowed; "
                "expected maximize or minimize"
            )
        if self.resolved_direction() is None:
            raise ConfigError(
                f"hydra.sweeper.metric={self.metric} has no natural direction; "
                "set hydra.sweeper.direction=maximize or minimize"
            )
        for key, low in (
            ("n_trials", 1),
            ("n_jobs", 1),
            ("n_startup_trials", 0),
            ("n_warmup_steps", 0),
            ("min_resource", 1),
            ("reduction_factor", 2),
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"hydra.sweeper.{key}={value} is not allowed; expected an integer >= {low}"
                )

    def resolved_direction(self) -> str | None:
        return self.direction or METRIC_DIRECTIONS.get(self.metric)

    def pruner_params(self) -> PrunerParams:
        return PrunerParams(
            self.pruner,
            self.n_startup_trials,
            self.n_warmup_steps,
            self.min_resource,
            self.reduction_factor,
        )
