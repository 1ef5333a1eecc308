"""``hydra/launcher=local|slurm`` settings: a plain dataclass, light to import (Hydra's plugin
discovery reads it; nothing here imports torch, submitit or the store)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainers.registry import ConfigError


@dataclass
class LauncherParams:
    """``hydra.launcher.*`` (docs/sweeps.md, "Launchers")."""

    kind: str = "local"  # local | slurm
    max_parallel: int | None = None  # local: None -> (GPUs x jobs_per_gpu) or 1 on CPU
    jobs_per_gpu: int = 1  # local: pack several small jobs on one GPU
    retry_failed: bool = False  # re-run points whose run ended failed / diverged
    dry_run: bool = False  # print the plan (the header and the jobs), start and write nothing
    # fuse compatible points into one job (sweeper.launch.fuse): auto | off | the largest group size
    fuse: Any = "auto"
    timeout_min: int = 60 * 24 * 3  # per job (local and Slurm time limit)
    poll_s: float = 0.5
    # Slurm
    partition: str | None = None
    gpus_per_job: int = 0  # GPUs per job (DDP over them when > 1); local and Slurm
    tasks_per_job: int | None = None  # processes per job (DDP); None -> max(1, gpus_per_job)
    cpus_per_task: int = 2
    mem_gb: int = 8
    array_parallelism: int = 64
    max_requeues: int = 3  # pre-emption / time-out requeues per job (submitit checkpointing)
    setup: list[str] = field(default_factory=list)  # shell lines run before each Slurm job
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch parameters

    def validate(self) -> None:
        """One line naming the bad setting (whether a Slurm cluster answers is the
        launcher's check, :func:`sweeper.launch.backends.check_launcher`)."""
        if self.kind not in ("local", "slurm"):
            raise ConfigError(
                f"hydra.launcher.kind={self.kind} is not allowed; expected local or slurm"
            )
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ConfigError(
                f"hydra.launcher.max_parallel={self.max_parallel} is not allowed; expected >= 1"
            )
        for key, low in (
            ("jobs_per_gpu", 1),
            ("timeout_min", 1),
            ("cpus_per_task", 1),
            ("mem_gb", 1),
            ("gpus_per_job", 0),
            ("array_parallelism", 1),
            ("max_requeues", 0),
            ("tasks", 1),
        ):
            if getattr(self, key) < low:
                raise ConfigError(
                    f"hydra.launcher.{key}={getattr(self, key)} is not allowed; expected >= {low}"
                )
        self.fuse_limit()  # raises on a bad value
        if not self.poll_s > 0:
            raise ConfigError(
                f"hydra.launcher.poll_s={self.poll_s} is not allowed; expected a number > 0"
            )

    def fuse_limit(self) -> int | None:
        """The largest fused group: None for ``auto`` (sized by the backend's slots), 1 for
        ``off`` (no fusing), else the number given."""
        f = self.fuse
        if isinstance(f, str) and f.strip().lower() == "auto":
            return None
        if f is False or (isinstance(f, str) and f.strip().lower() == "off"):
            return 1
        if isinstance(f, int) and not isinstance(f, bool) and f >= 1:
            return f
        if isinstance(f, str) and f.strip().isdigit() and int(f) >= 1:
            return int(f)
        raise ConfigError(
            f"hydra.launcher.fuse={f} is not allowed; expected auto, off or a group size >= 1"
        )

    @property
    def tasks(self) -> int:
        """Processes per job: one per GPU for DDP, or tasks_per_job (e.g. gloo on CPUs)."""
        return self.tasks_per_job if self.tasks_per_job is not None else max(1, self.gpus_per_job)
