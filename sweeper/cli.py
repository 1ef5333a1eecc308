"""``python -m sweeper``: the thin Hydra entry, and the CLI's one error boundary.

``python -m sweeper [overrides]`` trains one run; ``-m`` sweeps a grid (our Hydra sweeper
and launcher plugins) or a search (``hydra/sweeper=optuna``); ``status`` and ``mirror`` are
subcommands. Before Hydra starts, :func:`~sweeper.compose.preflight_argv` checks the command
line (bad input: one line, exit 2, nothing written). Everything below raises; only
:func:`main` prints and exits (:func:`sweeper.errors.boundary`).

Start-up matters (every job of a sweep pays it): this module imports Hydra and the config
schema only; torch, submitit and MLflow are imported where a run or a sweep needs them.
"""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import DictConfig

from sweeper.compose import CONF_DIR, preflight_argv, to_config
from sweeper.errors import Failed, boundary
from sweeper.schema import register_configs

# Hydra's own flags that print and exit: no pre-flight, no run
HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c",
                    "--shell-completion", "-sc")  # fmt: skip


class _TaskResult:
    """Hydra wraps the task and prints its own line for an exception raised there: the task
    keeps its exception here, and :func:`_run_hydra` raises it outside Hydra."""

    error: BaseException | None = None


def _task(dcfg: DictConfig) -> None:
    from sweeper.job import run_job

    try:
        outcome = run_job(to_config(dcfg))
    except BaseException as e:  # re-raised by _run_hydra, with its traceback
        _TaskResult.error = e
        return
    if outcome.status == "failed":  # diverged is a result (recorded), not a crash
        _TaskResult.error = Failed(f"run {outcome.run_id} failed; its traceback is in runs.error")


def _run_hydra(argv: list[str]) -> None:
    import hydra

    # exceptions from our plugins and from Hydra reach boundary() instead of Hydra's report
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # MLflow/alembic narrate their DB migrations at INFO; our own lines say what matters
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    register_configs()
    if not any(a in HYDRA_INFO_FLAGS for a in argv):
        preflight_argv(argv)
    sys.argv = [sys.argv[0], *argv]
    _TaskResult.error = None
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
    if _TaskResult.error is not None:
        raise _TaskResult.error


def _dispatch(argv: list[str]) -> int | None:
    if argv and argv[0] == "status":
        from sweeper.status import status

        status(argv[1:])
        return 0
    if argv and argv[0] == "mirror":  # runs that missed MLflow (an outage) -> MLflow, once
        from sweeper.mirror import mirror

        return mirror(argv[1:])
    _run_hydra(argv)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(boundary(lambda: _dispatch(argv)))
