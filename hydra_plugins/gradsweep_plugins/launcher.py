"""``hydra/launcher=local|slurm``: compose each point, hand them to sweeper.launch."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from sweeper.cli import _one_line, to_config
from sweeper.launch import (
    LauncherParams,
    SweepRunner,
    format_command,
    summary_table,
    validate_points,
)
from sweeper.schema import Config
from trainers.registry import ConfigError


class GradsweepLauncher(Launcher):
    def __init__(self, **kwargs: Any) -> None:
        kwargs = {
            k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items()
        }
        self.params = LauncherParams(**kwargs)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config

    def compose(self, overrides: list[str]) -> Config:
        """One point's typed config: the sweep's config with these overrides applied."""
        try:
            sc = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(sc):
                del sc["hydra"]
            return to_config(sc)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(_one_line(e)) from None

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        self.params.validate()
        labels = _labels(job_overrides)
        points = []
        for label, ov in zip(labels, job_overrides, strict=True):
            try:
                points.append((label, self.compose(list(ov))))
            except ConfigError as e:
                raise ConfigError(f"point [{label}]: {e}") from None
        validated = validate_points(points)
        name = validated[0].cfg.sweep_name
        runner = SweepRunner(validated, self.params, format_command(sys.argv[1:]), name)
        finished = runner.run()
        print(summary_table(finished), flush=True)
        failed = [p for p in finished if p.status == "failed"]
        rets = []
        for p in finished:
            r = JobReturn()
            r.overrides = p.label.split()
            r.status = JobStatus.FAILED if p.status == "failed" else JobStatus.COMPLETED
            r._return_value = p.status
            rets.append(r)
        if failed:
            print(
                "error: failed points: "
                + "; ".join(f"[{p.label}] (run {p.run.id})" for p in failed),
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
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
