"""gradsweep's sweeper: configs in, training jobs dispatched, results recorded.

Public surface: :func:`run_job` (one run from a typed Config), :class:`Store` (the results
store), :class:`Config` (the Hydra schema). Resolved on first use, so that ``import
sweeper.<module>`` (the CLI, Hydra's plugin discovery, ``status``) never pulls in torch,
submitit or MLflow.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "Config": "sweeper.schema",
    "JobOutcome": "sweeper.job",
    "run_job": "sweeper.job",
    "RunRecord": "sweeper.store",
    "RunStatus": "sweeper.store",
    "Store": "sweeper.store",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sweeper' has no attribute {name!r}")
