"""A run's identity: which values define its result, their hash, and the row that records it.

The config hash (sha256 of :meth:`~trainers.config.RunConfig.identity`) is what makes a run
the same run across sweeps, searches, machines and gradsweep versions: a configuration whose
hash is ``done`` in the store is never trained again. ``tests/fixtures/config_hashes.json``
pins the hashes, so a change that would move them fails the tests.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from sweeper import provenance
from sweeper.config.schema import Config
from trainers.config import RunConfig
from trainers.registry import ConfigError


@functools.cache  # asked for every point of a grid; a driver does not come or go meanwhile
def surely_no_cuda() -> bool:
    """True when torch cannot see a CUDA (or ROCm) device here: no NVIDIA or AMD kernel
    driver, and no WSL GPU. Then ``device=auto`` is the CPU without importing torch (most
    of the sweeper's start-up on a CPU machine). Anything that hints at a GPU asks torch."""
    hints = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return not any(os.path.exists(h) for h in hints)


def device_type(name: str) -> str:
    """``cpu`` or ``cuda``: what ``device=name`` resolves to on this machine (a CUDA name
    where there is none: ConfigError). Imports torch only where a GPU may be present."""
    if name == "cpu" or (name == "auto" and surely_no_cuda()):
        return "cpu"
    from trainers.runtime import resolve_device

    return resolve_device(name).type


def resolved_precision(cfg: RunConfig) -> str:
    """``precision=auto`` resolved on this machine (bf16 on CUDA, fp32 on CPU): part of the
    identity, so the device decides it (as ``trainers.runtime.resolve_precision``)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device_type(cfg.device) == "cuda" else "fp32"


def identity_of(cfg: RunConfig) -> tuple[dict[str, Any], str]:
    """The values that define the run's result, and their config hash."""
    ident = cfg.identity(resolved_precision(cfg))
    return ident, provenance.config_hash(ident)


def resolved_config(cfg: Config, identity: dict[str, Any],
                    memo: dict[int, tuple[Any, dict]] | None = None) -> dict[str, Any]:  # fmt: skip
    """What ``runs.config`` records: the whole config, the resolved lr and the identity.

    ``memo`` (one dict for the points of one grid, which share the sub-configs their
    overrides do not change: :class:`sweeper.config.compose.PointComposer`): each shared
    sub-config is turned into a dict once, not once per point. The same values as
    ``asdict(cfg)``; the dicts are shared between the results, which are only written."""
    if memo is None:
        whole = asdict(cfg)
    else:
        whole = {}
        for f in fields(cfg):
            v = getattr(cfg, f.name)
            if is_dataclass(v):
                if id(v) not in memo:  # the object is kept with its dict: its id stays its own
                    memo[id(v)] = (v, asdict(v))
                whole[f.name] = memo[id(v)][1]
            elif v is None or isinstance(v, (str, int, float, bool)):
                whole[f.name] = v
            else:  # a container: asdict's own recursion
                whole = asdict(cfg)
                break
    return {**whole, "resolved_lr": cfg.resolved_lr(), "identity": identity}


def grid_columns(cfg: RunConfig) -> dict[str, Any]:
    """The grid keys the ``runs`` table has as columns (to GROUP BY in SQL)."""
    return {
        "model": cfg.model.effective_name,
        "method": cfg.method.spec.name,
        "alpha": cfg.effective_alpha(),
        "data": cfg.data.effective_name,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "lr": cfg.resolved_lr(),
        "schedule": cfg.schedule.name,
        "label_smoothing": cfg.effective_label_smoothing(),
        "seed": cfg.seed,
    }


def check_results_dir(results_dir: str) -> Path:
    """That results_dir can be written (it, or the folder it would be made in): a one-line
    ConfigError if not. Nothing is created: refused input leaves no folder behind (the
    store creates the folder when it writes its first row)."""
    path = Path(results_dir).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        why = f"{probe} is not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = f"{probe} is not writable"
    else:
        return path
    raise ConfigError(f"results_dir={results_dir} cannot be written ({why})")


def preflight(cfg: Config) -> None:
    """Every check that needs no training: run before any row is written."""
    from trainers.catalog import check_data
    from trainers.custom import check_method

    cfg.validate()
    check_method(cfg.method.spec)  # imports the custom pieces, binds their knobs
    check_results_dir(cfg.results_dir)
    check_data(cfg.data)
    if cfg.model._target_:  # imports and its arguments (the fc contract: when built)
        from trainers.custom import model_factory

        model_factory(cfg.model._target_, cfg.model.args)
    device_type(cfg.device)


def run_dir_of(cfg: Config, config_hash: str) -> Path:
    """The run's folder (checkpoint, norm artifacts): ``<results_dir>/runs/<hash[:16]>``."""
    return Path(cfg.results_dir).expanduser().resolve() / "runs" / config_hash[:16]
