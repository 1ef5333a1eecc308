"""``hydra/sweeper=optuna``: read the search space, hand the study to :mod:`sweeper.launch.study`.

A thin shim: parsing and validation live in :mod:`sweeper.launch.trials`, the ask / tell source in
:mod:`sweeper.launch.study`; trials go through our own launcher (``hydra/launcher=local|slurm``),
whose settings apply unchanged.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

_MISSING = object()


class OptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from sweeper.config.search import SearchParams

        kwargs = {
            k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items()
        }
        self.search = SearchParams(**kwargs)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from sweeper.config.compose import hydra_error_line
        from sweeper.launch.grid import format_command
        from sweeper.launch.study import run_search
        from sweeper.launch.trials import default_study_name, parse_space
        from trainers.registry import ConfigError

        self.search.validate()
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        try:
            given = parser.parse_overrides(arguments)
            # the command line wins over the preset's space for the same key
            keys = {ov.key_or_group for ov in given}
            preset = [f"{k}={v}" for k, v in (self.search.params or {}).items() if k not in keys]
            overrides = [*parser.parse_overrides(preset), *given]
        except Exception as e:
            raise ConfigError(hydra_error_line(e)) from None

        def value_of(key: str) -> Any:
            value = OmegaConf.select(self.config, key, default=_MISSING)
            if value is _MISSING:
                raise KeyError(key)
            return value

        dims, fixed = parse_space(overrides, value_of)
        name = (
            self.search.study_name
            or self.config.get("sweep_name")
            or default_study_name(dims, fixed, self.search)
        )
        source = run_search(dims, fixed, self.launcher.compose, self.search,
                            self.launcher.params, name, format_command(sys.argv[1:]))  # fmt: skip
        return source.outcomes
