"""What a training run reports, and where it reports it: plain records and the Sink.

Torch-free on purpose: the results store writes these records and the CLI reads them
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

ZERO_NORM = 1e-8  # a filter / feature with L2 norm below this counts as "zeroed out"


@dataclass
class EpochMetrics:
    """One row of ``epoch_metrics``. Accuracies in percent, like the paper."""

    epoch: int  # 0-based
    step: int  # optimiser steps done at the end of this epoch
    train_loss: float  # mean over the epoch's steps, as seen while training
    train_acc: float
    test_loss: float  # plain CE on the test set
    test_acc: float
    test_top5: float
    logit_norm: float  # mean over test images of ||z||_2
    gap: float  # train_acc - test_acc
    lr: float  # lr of the epoch's last step
    epoch_time: float  # seconds, training + evaluation
    images_per_s: float  # training images / training seconds
    grad_norm_before: float  # mean over steps of the global gradient norm before the transform
    grad_norm_after: float  # ... and after it (equal when the method has none)
    # peak GPU memory allocated by PyTorch during the epoch, MiB (this process's GPU; in DDP
    # rank 0's); None on CPU. Defaulted so checkpoints written before it still load.
    peak_mem_mb: float | None = None
    # the validation split (data.val_split), like test_acc / test_loss; None without one.
    # Defaulted, like peak_mem_mb.
    val_acc: float | None = None
    val_loss: float | None = None


@dataclass
class LayerFilterStats:
    """Per-layer summary of the L2 norms of every filter (output unit) of a weight."""

    step: int
    epoch: int
    layer_index: int  # 1-based, conv/linear weights in module order (the paper's layer ids)
    layer_name: str
    n_filters: int
    n_zero: int  # filters with norm < ZERO_NORM
    min_norm: float
    median_norm: float
    max_norm: float


@dataclass
class TrainResult:
    status: str  # done | diverged | pruned
    history: list[EpochMetrics]
    diverged_step: int | None = None
    feature_norms: list[float] = field(default_factory=list)  # per pooled-feature channel
    zero_features: int | None = None
    device: str = ""
    precision: str = ""

    @property
    def final(self) -> EpochMetrics | None:
        return self.history[-1] if self.history else None


class Sink(Protocol):
    """Where a run's metrics go.

    ``on_start`` is called once the checkpoint (if any) is loaded, with the first epoch to
    run; ``on_epoch`` at the end of each epoch, before the checkpoint is written (so after
    a kill, rows of epochs >= the resumed epoch may exist and are to be replaced).
    """

    def on_start(self, resume_epoch: int, device: str, precision: str) -> None: ...

    def on_epoch(
        self, metrics: EpochMetrics, filter_stats: list[LayerFilterStats], filter_file: Path | None
    ) -> None: ...

    def should_stop(self, metrics: EpochMetrics) -> bool:
        """Asked after each epoch's checkpoint (rank 0): True stops the run ``pruned``."""
        ...

    # Optional (a sink without them: always held, never paused):
    # hold() -- raises when the run may no longer be written by this process (before its
    #   files are written); may_replace() -> bool -- before the checkpoint replaces the last
    #   one: raises like hold(), False keeps the last one (the epoch's rows are not recorded
    #   yet); paused() -> float -- seconds the process has been stopped, left out of the
    #   epochs' recorded times.


class NullSink:
    """Reports nowhere: for a Trainer used from a script or a test."""

    def on_start(self, resume_epoch: int, device: str, precision: str) -> None:
        pass

    def on_epoch(
        self, metrics: EpochMetrics, filter_stats: list[LayerFilterStats], filter_file: Path | None
    ) -> None:
        pass

    def should_stop(self, metrics: EpochMetrics) -> bool:
        return False
