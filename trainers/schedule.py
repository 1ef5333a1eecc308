"""Learning-rate schedules, per optimiser step: linear warm-up, then cosine or step decay."""

from __future__ import annotations

import bisect
import math

from trainers.config import ScheduleConf


def lr_at(step: int, steps_per_epoch: int, epochs: int, peak_lr: float, s: ScheduleConf) -> float:
    """The lr used for optimiser step ``step`` (0-based).

    Warm-up: linear from ``peak * warmup_start_factor`` to ``peak`` over ``warmup_epochs``
    (paper: 4e-4 -> 0.4 over 5 epochs). Cosine (Loshchilov & Hutter 2016): from peak to
    ``min_lr`` over the remaining steps. Step: peak * gamma ** (number of milestones
    passed), milestones in epochs (paper: /10 at 30, 60, 90).
    """
    total = max(1, steps_per_epoch * epochs)
    warm = int(round(min(s.warmup_epochs, epochs) * steps_per_epoch))  # capped at the run
    if step < warm:
        f = s.warmup_start_factor
        return peak_lr * (f + (1.0 - f) * step / warm)
    if s.name == "cosine":
        t = (step - warm) / max(1, total - warm)
        return s.min_lr + (peak_lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if s.name == "step":
        epoch = step // max(1, steps_per_epoch)
        return peak_lr * s.gamma ** bisect.bisect_right(list(s.milestones), epoch)
    raise ValueError(f"unknown schedule {s.name!r}; known: cosine, step")
