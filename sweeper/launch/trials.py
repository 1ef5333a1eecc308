"""An Optuna search's space, sampler and trials (``hydra/sweeper=optuna``; its settings are
:class:`sweeper.config.search.SearchParams`).

Why not hydra-optuna-sweeper: it pins optuna < 3, whose RDB storage breaks with
SQLAlchemy 2, and it cannot prune (docs/architecture.md, "Known traps"). Here the space is
read from Hydra's own sweep syntax, the study lives in Optuna's RDB storage on the results
store's database, trials are ordinary runs dispatched like grid points
(:mod:`sweeper.launch.study`), and a running job reports each epoch's metric to its trial
(:class:`TrialReporter`) so that the pruner can stop it.

Search space, from the command line or ``hydra.sweeper.params`` in a preset:

==========================================  =========================================
``alpha=interval(0.01,1)``                  float, uniform (int if the key is an int)
``alpha=tag(log,interval(0.01,1))``         log-uniform
``batch_size=range(32,257,32)``             int (or float) with a step; stop excluded
``method=pgt,ls_pgt`` / ``choice(...)``     categorical (config groups too)
==========================================  =========================================

Any other override is fixed for every trial.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweeper.config.search import PrunerParams, SearchParams
from trainers.registry import ConfigError

if TYPE_CHECKING:
    import optuna
    from hydra.core.override_parser.types import Override

    from trainers.records import EpochMetrics


# ------------------------------------------------------------------------------- space
@dataclass
class Dimension:
    """One searched key and its Optuna distribution."""

    key: str
    distribution: Any  # optuna.distributions.BaseDistribution
    text: str  # as typed, e.g. "alpha=tag(log,interval(0.01,1))"
    values: list[Any] | None = None  # the finite set of values (choices, ranges) or None

    def override(self, value: Any) -> str:
        return f"{self.key}={format_value(value)}"


def format_value(value: Any) -> str:
    """A suggested value as Hydra reads it back (floats round-trip through repr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def parse_space(
    overrides: Sequence[Override], value_of: Callable[[str], Any]
) -> tuple[list[Dimension], list[str]]:
    """Split parsed overrides into searched dimensions and fixed overrides.

    ``value_of(key)`` returns the key's value in the composed base config (its type decides
    whether an interval is int or float), or raises KeyError for an unknown key.
    """
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    dims: list[Dimension] = []
    fixed: list[str] = []
    for ov in overrides:
        if not ov.is_sweep_override():
            fixed.append(ov.input_line or f"{ov.key_or_group}={ov.get_value_element_as_str()}")
            continue
        key, text, sweep = ov.key_or_group, ov.input_line or ov.key_or_group, ov.value()
        if any(d.key == key for d in dims):
            raise ConfigError(f"{text}: {key} is searched twice")
        tags = set(getattr(sweep, "tags", set()) or set())
        unknown_tags = tags - {"log"}
        if unknown_tags:
            raise ConfigError(f"{text}: unknown tag {sorted(unknown_tags)[0]!r}; known: log")
        if isinstance(sweep, ChoiceSweep):
            choices = [v if isinstance(v, (bool, int, float, str)) else str(v) for v in sweep.list]
            if not choices:
                raise ConfigError(f"{text}: an empty choice")
            if len(set(map(str, choices))) != len(choices):
                raise ConfigError(f"{text}: a value is listed twice")
            if "log" in tags:
                raise ConfigError(f"{text}: log applies to interval/range, not to a choice")
            dims.append(Dimension(key, CategoricalDistribution(choices), text, choices))
            continue
        is_int = _is_int_key(key, value_of, text)
        log = "log" in tags
        if isinstance(sweep, IntervalSweep):
            low, high = sweep.start, sweep.end
            if is_int and not (float(low).is_integer() and float(high).is_integer()):
                raise ConfigError(f"{text}: {key} is an integer; the bounds must be integers")
            _check_bounds(text, low, high, log)
            dist = (
                IntDistribution(int(low), int(high), log=log)
                if is_int
                else FloatDistribution(float(low), float(high), log=log)
            )
            dims.append(Dimension(key, dist, text))
        elif isinstance(sweep, RangeSweep):
            start, stop, step = sweep.start, sweep.stop, sweep.step
            if step is None or step <= 0:
                raise ConfigError(f"{text}: the step must be > 0")
            n = math.ceil((stop - start) / step - 1e-9)
            if n < 1:
                raise ConfigError(f"{text}: the range is empty (start must be below stop)")
            if log:
                raise ConfigError(f"{text}: log does not combine with a stepped range")
            values = [start + i * step for i in range(n)]
            if is_int:
                if not all(float(v).is_integer() for v in (start, step)):
                    raise ConfigError(f"{text}: {key} is an integer; start and step must be too")
                values = [int(v) for v in values]
                dist = IntDistribution(int(start), values[-1], step=int(step))
            else:
                values = [round(float(v), 12) for v in values]
                dist = FloatDistribution(float(start), values[-1], step=float(step))
            dims.append(Dimension(key, dist, text, values))
        else:
            raise ConfigError(f"{text}: not a search dimension; use interval, range or choice")
    if not dims:
        raise ConfigError(
            "nothing to search: give at least one dimension, e.g. 'alpha=interval(0.01,1)'"
        )
    return dims, fixed


def _is_int_key(key: str, value_of: Callable[[str], Any], text: str) -> bool:
    from sweeper.config.compose import GROUPS

    if key.lstrip("+") in GROUPS:
        raise ConfigError(f"{text}: {key} is a config group; search it with choice(...)")
    try:
        value = value_of(key)
    except KeyError:
        raise ConfigError(f"{text}: unknown key {key!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{text}: {key} is not a number; search names or flags with choice(...)")
    return isinstance(value, int)


def _check_bounds(text: str, low: float, high: float, log: bool) -> None:
    if not low < high:
        raise ConfigError(f"{text}: the lower bound {low:g} must be below the upper bound {high:g}")
    if log and low <= 0:
        raise ConfigError(f"{text}: a log interval needs a lower bound > 0, got {low:g}")


def grid_of(dims: Sequence[Dimension]) -> dict[str, list[Any]]:
    """The grid sampler's space: every dimension must be finite (choice or range)."""
    bad = [d.text for d in dims if d.values is None]
    if bad:
        raise ConfigError(
            f"hydra.sweeper.sampler=grid needs choice(...) or range(...) dimensions; got {bad[0]}"
        )
    return {d.key: list(d.values or []) for d in dims}


def build_sampler(
    params: SearchParams, dims: Sequence[Dimension], n_existing: int = 0
) -> optuna.samplers.BaseSampler:
    """The sampler; with a seed, a fresh study always suggests the same sequence.

    A continued study (``n_existing`` trials already in it) offsets the seed by that count:
    the same seed again would replay the first suggestions, i.e. repeat finished trials.
    """
    import optuna

    seed = None if params.seed is None else params.seed + n_existing
    if params.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if params.sampler == "grid":
        return optuna.samplers.GridSampler(grid_of(dims), seed=seed)
    if params.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def default_study_name(
    dims: Sequence[Dimension], fixed: Sequence[str], params: SearchParams
) -> str:
    """Stable across re-runs of the same search: n_trials/n_jobs/sampler are not part of it,
    so raising ``n_trials`` continues the same study."""
    what = {
        "space": [d.text for d in dims],
        "fixed": sorted(fixed),
        "metric": params.metric,
        "direction": params.resolved_direction(),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
    return "search-" + "-".join(d.key.replace(".", "_") for d in dims) + "-" + digest


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # jobs report while others write: wait for the lock instead of failing at once
        kwargs["connect_args"] = {"timeout": 60}
    from sweeper.store.url import engine_url

    return optuna.storages.RDBStorage(engine_url(url), engine_kwargs=kwargs)


def quiet_optuna() -> None:
    import optuna

    # our own lines say what happens to each trial; Optuna's INFO lines repeat them
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------- the worker
@dataclass
class TrialLink:
    """What a job needs to report to its trial (pickled into the submitit job)."""

    storage: str
    study: str
    trial_id: int
    number: int
    metric: str
    pruner: PrunerParams


class TrialReporter:
    """Reports each epoch's metric to the trial and asks its pruner whether to stop.

    Optuna errors are warnings, never a failed run: the run's results are in the store
    either way.
    """

    def __init__(self, link: TrialLink, warn: Callable[[str], None]) -> None:
        import optuna

        quiet_optuna()
        self.link, self.warn = link, warn
        study = optuna.load_study(
            study_name=link.study,
            storage=rdb_storage(link.storage),
            sampler=optuna.samplers.RandomSampler(),  # never asked to sample here
            pruner=link.pruner.build(),
        )
        self.trial = optuna.trial.Trial(study, link.trial_id)

    def report(self, m: EpochMetrics) -> bool:
        value = float(getattr(m, self.link.metric))
        try:
            self.trial.report(value, m.epoch)
            return bool(self.trial.should_prune())
        except Exception as e:
            self.warn(f"warning: trial {self.link.number} of {self.link.study}: {e}")
            return False
