"""``python -m sweeper status``: every sweep with its runs by state and its outcome, then
the latest runs with their progress, elapsed time and test accuracy.

Reads the results store (SQLite in WAL mode lets it read while jobs write), so it works
while a sweep is running, from any shell, for local and Slurm sweeps alike. The counts are
the database's (GROUP BY), and only the latest runs are read: a store of 100,000 runs
answers in about a second (benchmarks/sweep_scale.py). Its writes, first: sweeps whose
sweeper died are recorded ``abandoned``, and ``running`` runs whose job is gone (no
heartbeat, no process, not listed by Slurm) are marked ``interrupted``.

    python -m sweeper status                       # ./results/results.db
    python -m sweeper status results_dir=/scratch/results
    python -m sweeper status store.url=postgresql://...  sweep=3 all=true
"""

from __future__ import annotations

import datetime as dt

from rich.console import Console
from rich.table import Table

from sweeper.store import RunRecord, RunStatus, Store, default_url, display_url
from trainers.registry import ConfigError

USAGE = "usage: python -m sweeper status [results_dir=DIR] [store.url=URL] [sweep=ID] [all=true]"
LATEST = 20  # runs listed without all=true
STATES = [RunStatus.done, RunStatus.failed, RunStatus.diverged, RunStatus.pruned,
          RunStatus.running, RunStatus.interrupted, RunStatus.queued]  # fmt: skip


def _elapsed(run: RunRecord, now: dt.datetime) -> str:
    if run.started_at is None:
        return "—"
    end = run.ended_at or now
    s = int((end - run.started_at).total_seconds())
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


HELP = f"""{USAGE}

Every sweep in the results store with its runs by state and its outcome (running,
finished, failed, interrupted, abandoned), then the {LATEST} latest runs of the latest
sweep (sweep=ID: of that sweep), running ones first, with their progress, elapsed time and
test accuracy; all=true lists every run (of sweep=ID if given, else of the store). Works
while sweeps run, from any shell, for local and Slurm sweeps alike. Its writes: sweeps
whose sweeper died are recorded abandoned, runs whose job is gone interrupted."""


def parse_args(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in ("results_dir", "store.url", "sweep", "all"):
            raise ConfigError(f"status does not take {a!r}; {USAGE}")
        out[key] = value
    if "sweep" in out and not out["sweep"].isdigit():
        raise ConfigError(f"sweep={out['sweep']} is not allowed; expected a sweep id (a number)")
    if out.get("all", "true") not in ("true", "false"):
        raise ConfigError(f"all={out['all']} is not allowed; expected true or false")
    return out


def _record_the_dead(store: Store) -> None:
    """Status's writes: abandoned sweeps and dead jobs' runs recorded, with what the
    backend knows (a Slurm job squeue still lists is not dead). A read-only or busy store
    is listed as it is."""
    from sqlalchemy.exc import SQLAlchemyError

    from sweeper.launch.slurm import job_alive_elsewhere

    try:
        store.close_abandoned()
        store.expire_leases(alive=job_alive_elsewhere(store))
    except SQLAlchemyError:
        pass


def status(argv: list[str], console: Console | None = None) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return
    args = parse_args(argv)
    url = args.get("store.url") or default_url(args.get("results_dir", "./results"))
    console = console or Console(width=max(170, Console().width))  # every header in full
    store = Store(
        url, create=False, missing_hint="run a sweep first or pass results_dir=/store.url="
    )
    try:
        _record_the_dead(store)
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        sweeps = store.sweeps()
        counts, jobs = store.sweep_counts(), store.sweep_jobs()
        t = Table(title=f"sweeps in {display_url(url)}")
        for col in ("sweep", "name", "created (UTC)", "launcher", "points", "jobs",
                    *(st.value for st in STATES), "outcome", "elapsed"):  # fmt: skip
            t.add_column(col)
        for sw in sweeps:
            c = counts.get(sw.id, {})
            n_jobs, fused = jobs.get(sw.id, (0, 0))
            secs = int(((sw.ended_at or now) - sw.created_at).total_seconds())
            t.add_row(
                str(sw.id),
                sw.name + (f" (resolves sweep {sw.parent_id})" if sw.parent_id else ""),
                sw.created_at.strftime("%Y-%m-%d %H:%M"),
                sw.launcher,
                str(sw.n_points),
                f"{n_jobs}" + (f" ({fused} fused)" if fused else ""),
                *(str(c.get(st, 0)) for st in STATES),
                "running" if sw.ended_at is None else (sw.outcome or "ended"),
                f"{secs // 60}m{secs % 60:02d}s",
            )
        console.print(t)
        everything = args.get("all") == "true"
        limit = None if everything else LATEST
        if "sweep" in args:
            sid: int | None = int(args["sweep"])
            if not any(s.id == sid for s in sweeps):
                raise ConfigError(
                    f"unknown sweep id {sid}; known: "
                    f"{', '.join(str(s.id) for s in sweeps) or 'none'}"
                )
            title = f"runs of sweep {sid}"
        elif sweeps and not everything:
            sid = sweeps[-1].id
            title = f"runs of the latest sweep ({sid})"
        else:
            sid, title = None, "all runs"
        rows = store.latest_sweep_runs(sid, limit)
        total = (sum(counts.get(sid, {}).values()) if sid is not None
                 else store.count_runs())  # fmt: skip
        if limit is not None and total > len(rows):
            title += f": the {len(rows)} latest of {total}, running ones first"
        rt = Table(title=title)
        for col in ("run", "point", "model", "method", "alpha", "batch", "seed", "status",
                    "epoch", "elapsed", "test %", "host"):  # fmt: skip
            rt.add_column(col)
        for point, r in rows:
            rt.add_row(
                str(r.id),
                point,
                r.model,
                r.method,
                "—" if r.alpha is None else f"{r.alpha:g}",
                str(r.batch_size),
                str(r.seed),
                r.status.value,
                f"{r.epoch}/{r.epochs}",
                _elapsed(r, now),
                "—" if r.test_acc is None else f"{r.test_acc:.2f}",
                r.host or "—",
            )
        console.print(rt)
        if limit is not None and total > len(rows):
            which = f"sweep={sid} all=true" if sid is not None else "all=true"
            console.print(f"{total - len(rows)} more run(s) not listed; {which} lists them all",
                          markup=False, highlight=False)  # fmt: skip
        for line in source_changes([r for _, r in rows]):
            console.print(line, markup=False, highlight=False)
    finally:
        store.dispose()


def source_changes(runs: list[RunRecord]) -> list[str]:
    """One line per done run made by another version of a custom piece's source file than
    the one found now (``runs.versions["source:<target>"]``, trainers.custom)."""
    from trainers.custom import SOURCE_PREFIX, current_fingerprint

    out: list[str] = []
    now: dict[str, str | None] = {}
    for r in runs:
        if r.status != RunStatus.done:
            continue
        for key, then in (r.versions or {}).items():
            if not key.startswith(SOURCE_PREFIX):
                continue
            target = key.removeprefix(SOURCE_PREFIX)
            if target not in now:
                now[target] = current_fingerprint(target)
            if now[target] != then:
                path = then.rsplit(" sha256:", 1)[0]
                state = "is gone" if now[target] is None else "has changed since"
                out.append(
                    f"note: run {r.id} ({r.method}) was made by another version of {target}: "
                    f"{path} {state} (a rerun skips it; a parameter with a default added to the function and set in its config, or a new name, makes a new run)"
                )
    return out
