"""gradsweep's analysis: tables, verdicts and plots rebuilt from the results store.

In a notebook: ``from analysis import load_runs, load_epochs, verdicts`` (pandas DataFrames,
:mod:`analysis.notebook`). They are loaded on first use, so ``import analysis`` (and
``python -m analysis --help``) imports neither pandas nor the store.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_epochs", "load_runs", "verdicts"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from analysis import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
