"""``hydra/launcher=local|slurm``: compose each point, hand the grid to :mod:`sweeper.launch.grid`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # imported when a sweep starts, not at Hydra's plugin discovery
    from sweeper.config.schema import Config


class GradsweepLauncher(Launcher):
    def __init__(self, **kwargs: Any) -> None:
        from sweeper.config.launcher import LauncherParams

        kwargs = {
            k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items()
        }
        self.params = LauncherParams(**kwargs)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self._composer: Any = None

    def compose(self, overrides: list[str]) -> Config:
        """One point's typed config: the sweep's config with these overrides applied
        (:class:`sweeper.config.compose.PointComposer`)."""
        if self._composer is None:
            from sweeper.config.compose import PointComposer

            self._composer = PointComposer(self.hydra_context.config_loader, self.config)
        return self._composer.compose(overrides)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from sweeper.launch.backends import check_launcher
        from sweeper.launch.grid import format_command, run_grid, validate_points
        from trainers.registry import ConfigError

        check_launcher(self.params)
        points = []
        for label, ov in zip(_labels(job_overrides), job_overrides, strict=True):
            try:
                points.append((label, self.compose(list(ov))))
            except ConfigError as e:
                raise ConfigError(f"point [{label}]: {e}") from None
        validated = validate_points(points)
        name = validated[0].cfg.sweep_name
        finished = run_grid(validated, self.params, format_command(sys.argv[1:]), name)
        rets = []
        for p in finished:
            r = JobReturn()
            r.overrides = p.label.split()
            r.status = JobStatus.COMPLETED
            r._return_value = p.status
            rets.append(r)
        return rets


def _labels(job_overrides: Sequence[Sequence[str]]) -> list[str]:
    """Each point named by the overrides that vary across the grid."""
    if len(job_overrides) <= 1:
        return [" ".join(ov) for ov in job_overrides]
    varying = [
        i
        for i in range(len(job_overrides[0]))
        if len({tuple(ov)[i] if i < len(ov) else None for ov in job_overrides}) > 1
    ]
    return [" ".join(ov[i] for i in varying if i < len(ov)) for ov in job_overrides]
