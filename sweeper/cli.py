"""``python -m sweeper``: the thin Hydra entry, and the CLI's one error boundary.

``python -m sweeper [overrides]`` trains one run; ``-m`` sweeps a grid (our Hydra sweeper
and launcher plugins) or a search (``hydra/sweeper=optuna``); ``status`` and ``mirror`` are
subcommands. Before Hydra starts, :func:`~sweeper.config.compose.preflight_argv` and
:mod:`sweeper.config.checks` check the command line (bad input: one line, exit 2, nothing
written: Hydra makes a single run's folder before it calls the task, so no check is left
to the task). Everything below raises; only
:func:`main` prints and exits (:func:`sweeper.errors.boundary`).

Start-up matters (every job of a sweep pays it): this module imports Hydra and the config
schema only; torch, submitit and MLflow are imported where a run or a sweep needs them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from omegaconf import DictConfig

from sweeper.config.checks import check_argv, check_before_writing
from sweeper.config.compose import CONF_DIR, preflight_argv, to_config
from sweeper.config.schema import register_configs
from sweeper.errors import ConfigError, Failed, boundary

# Hydra's own flags that print and exit: no pre-flight, no run
SUBCOMMANDS = ("status", "mirror", "resolve")
HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c",
                    "--shell-completion", "-sc")  # fmt: skip


class _TaskResult:
    """Hydra wraps the task and prints its own line for an exception raised there: the task
    keeps its exception here, and :func:`_run_hydra` raises it outside Hydra."""

    error: BaseException | None = None


def _task(dcfg: DictConfig) -> None:
    from sweeper.launch.job import run_job

    try:
        outcome = run_job(to_config(dcfg))
    except BaseException as e:  # re-raised by _run_hydra, with its traceback
        _TaskResult.error = e
        return
    if outcome.status == "failed":  # diverged is a result (recorded), not a crash
        _TaskResult.error = Failed(f"run {outcome.run_id} failed; its traceback is in runs.error")
    elif outcome.status == "interrupted":  # a full disk, the store away, its trainer gone
        why = f": {outcome.why}" if outcome.why else ""
        _TaskResult.error = Failed(f"run {outcome.run_id} interrupted{why}; the same command "
                                   "resumes it from its last checkpoint")  # fmt: skip


def _check_flags(argv: list[str]) -> None:
    """Hydra's own flag conflicts, in one line (Hydra raises a ValueError with a traceback)."""
    modes = [a for a in argv if a in ("-m", "--multirun", "--cfg", "-c", "--info", "-i")]
    if len({m.lstrip("-")[:1] for m in modes}) > 1:
        raise ConfigError(f"{' and '.join(modes)} do not combine: --cfg prints one run's config "
                          "(drop -m; a sweep's plan is -m ... hydra.launcher.dry_run=true)")  # fmt: skip


def _run_hydra(argv: list[str]) -> None:
    import hydra

    _check_flags(argv)
    # exceptions from our plugins and from Hydra reach boundary() instead of Hydra's report
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # MLflow/alembic narrate their DB migrations at INFO; our own lines say what matters
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    register_configs()
    if not any(a in HYDRA_INFO_FLAGS for a in argv):
        cfg = preflight_argv(argv)
        if cfg is not None:  # a single run: Hydra makes its run folder before the task runs
            check_before_writing([("", cfg)])
    sys.argv = [sys.argv[0], *argv]
    _TaskResult.error = None
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
    if _TaskResult.error is not None:
        raise _TaskResult.error


HELP = """gradsweep: run, record and analyse sweeps of backward-pass gradient methods.

usage:
  python -m sweeper [KEY=VALUE ...]             one run (default: digits on this machine)
  python -m sweeper -m KEY=V1,V2 [KEY=VALUE ...]  a grid of runs (hydra.launcher.* settings)
  python -m sweeper -m hydra/sweeper=optuna KEY=interval(LO,HI) ...   a search
  python -m sweeper --cfg job [KEY=VALUE ...]   print the composed config, run nothing
  python -m sweeper status [--help]             sweeps and runs in the results store
  python -m sweeper mirror [--help]             copy finished runs that missed MLflow into it
  python -m sweeper resolve sweep=ID [--help]   add the seeds unresolved comparisons need
  python -m analysis [--help]                   the report: tables and figures

Reference: docs/cli.md (every key), docs/sweeps.md, docs/methods.md, docs/store.md.

== Config groups (GROUP=OPTION) ==
{groups}

== Config (override anything: KEY=VALUE) ==
{config}"""


def _help(argv: list[str]) -> None:
    """``--help``: our usage, the config groups and the composed config (Hydra's own help
    would list the schema nodes our configs extend as groups of their own)."""
    from omegaconf import OmegaConf

    from sweeper.config.compose import GROUPS, compose_dict, group_options

    overrides = [a for a in argv if not a.startswith("-")]
    dcfg = compose_dict(overrides)
    groups = "\n".join(f"{g}: {', '.join(group_options(g))}" for g in GROUPS)
    print(HELP.format(groups=groups, config=OmegaConf.to_yaml(dcfg)), end="")


def _dispatch(argv: list[str]) -> int | None:
    if not argv or argv[0] not in SUBCOMMANDS:
        check_argv(argv)  # before Hydra's parser, which would fail naming no key
    if any(a in ("--help", "-h") for a in argv) and (not argv or argv[0] not in SUBCOMMANDS):
        _help(argv)
        return 0
    if argv and argv[0] == "status":
        from sweeper.status import status

        status(argv[1:])
        return 0
    if argv and argv[0] == "mirror":  # runs that missed MLflow (an outage) -> MLflow, once
        from sweeper.tracking.catch_up import catch_up

        return catch_up(argv[1:])
    if argv and argv[0] == "resolve":  # the seeds unresolved comparisons need, then verdicts
        from sweeper.launch.resolve import resolve

        return resolve(argv[1:])
    _run_hydra(argv)
    return 0


def _terminate_as_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> None:
    from sweeper.config.compose import hydra_error_line

    argv = sys.argv[1:] if argv is None else argv
    # SIGTERM (kill, a batch system, a closing session) is Ctrl-C for every command, at any
    # moment -- planning included: one line, exit 130, and a running job records its runs
    # interrupted instead of leaving them running
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    # and SIGINT is Ctrl-C even where the shell started us with it ignored (a command put in
    # the background of a script): whoever sends it wants the command to stop
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(boundary(lambda: _dispatch(argv), hydra_error_line))
