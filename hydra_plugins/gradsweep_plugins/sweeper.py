"""``hydra/sweeper=gradsweep``: Hydra's grid expansion, then one batch to our launcher.

Unlike BasicSweeper it writes nothing (no sweep dir, no multirun.yaml) before the
launcher has validated every point, and it refuses an empty grid.
"""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser


class GradsweepSweeper(BasicSweeper):
    def __init__(self, params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=None, params=params)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(params_conf)
        batches = self.split_arguments(overrides, None)
        points = batches[0] if batches else []
        if not points:
            from trainers.registry import ConfigError

            raise ConfigError("the grid is empty: no point to run")
        return [self.launcher.launch(points, initial_job_idx=0)]
