"""Which points of a sweep train together: fused groups (``hydra.launcher.fuse``).

Points whose configurations differ only in *fusible* keys -- what each run does with its
own copy of the model: seed, alpha, the method's built-in pieces and knobs, learning rate
(and its scaling), momentum, Nesterov, weight decay, label smoothing -- and agree on
everything else (model, data, batch size, epochs, schedule, optimizer, precision, device,
speed switches, where results go) form groups; each group is one job that trains its
members together (:mod:`trainers.fused`). Each member is still its own run, with its own
config hash and rows, so a fused point and an unfused point of one configuration are the
same run.

Not fused (each runs alone, as without fusing): a researcher's own method piece, model or
data set (``_target_``: we cannot know that it is safe to stack or to share), ImageNet
(a DataLoader over files, not a resident tensor each member can draw its own batches
from), fp16 (one loss scaler per member), and data-parallel jobs (several processes per
job). This module is torch-free: the sweeper decides the groups before any job starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from sweeper.config.schema import Config

# top-level Config keys that may differ inside a group (method: all of its pieces/knobs)
FUSIBLE = (
    "seed",
    "alpha",
    "method",
    "lr",
    "lr_scaling",
    "lr_ref_batch",
    "momentum",
    "nesterov",
    "weight_decay",
    "sweep_name",
)

# auto on Slurm (no slot count to share the points among): at most this many per job
SLURM_AUTO_GROUP = 16


def why_alone(cfg: Config) -> str | None:
    """Why this point cannot join a fused group, or None when it can."""
    if cfg.method.spec.custom:
        return "a custom method piece"
    if cfg.model._target_:
        return "a custom model"
    if cfg.data._target_:
        return "a custom data set"
    if cfg.data.name == "imagenet":
        return "ImageNet is read from files by a DataLoader"
    if cfg.precision == "fp16":
        return "fp16 needs a loss scaler per run"
    return None


def fuse_key(cfg: Config) -> str | None:
    """What must agree inside a group (a canonical JSON string), or None if not fusible."""
    if why_alone(cfg) is not None:
        return None
    d: dict[str, Any] = asdict(cfg)
    for k in FUSIBLE:
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def plan_groups(points: list[Any], limit: int | None, slots: float, ddp: bool) -> list[list[Any]]:
    """Split ``points`` (each with a ``cfg``) into jobs, in the points' order.

    ``limit``: the largest group (None: auto; 1: no fusing). ``auto`` shares each set of
    compatible points evenly among the backend's ``slots`` (one group per slot, so every
    slot is busy; inf on Slurm: groups of :data:`SLURM_AUTO_GROUP`). A job then caps its
    group again from the members' measured memory footprint (:mod:`trainers.fused`).
    """
    if limit == 1 or ddp:
        return [[p] for p in points]
    by_key: dict[str, list[Any]] = {}
    order: list[tuple[str | None, Any]] = []
    for p in points:
        key = fuse_key(p.cfg)
        order.append((key, p))
        if key is not None:
            by_key.setdefault(key, []).append(p)
    size: dict[str, int] = {}
    for key, ps in by_key.items():
        if limit is not None:
            size[key] = limit
        elif math.isinf(slots):
            size[key] = SLURM_AUTO_GROUP
        else:
            size[key] = max(1, math.ceil(len(ps) / max(1, int(slots))))
    jobs: list[list[Any]] = []
    open_group: dict[str, list[Any]] = {}
    for key, p in order:
        if key is None:
            jobs.append([p])
            continue
        g = open_group.get(key)
        if g is None or len(g) >= size[key]:
            g = open_group[key] = []
            jobs.append(g)
        g.append(p)
    return jobs


def describe(n_points: int, jobs: list[list[Any]]) -> str:
    """The header's line: ``6 points → 2 fused jobs (3, 3 members)``."""
    fused = [j for j in jobs if len(j) > 1]
    alone = len(jobs) - len(fused)
    sizes = ", ".join(str(len(j)) for j in fused)
    points = f"{n_points} point{'s' if n_points != 1 else ''}"
    if not fused:
        return f"{points} → {len(jobs)} job{'s' if len(jobs) != 1 else ''} (none fused)"
    if not alone:
        s = "s" if len(fused) > 1 else ""
        return f"{points} → {len(fused)} fused job{s} ({sizes} members)"
    return f"{points} → {len(jobs)} jobs: {len(fused)} fused ({sizes} members), {alone} alone"
