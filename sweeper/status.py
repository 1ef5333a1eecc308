"""``python -m sweeper status``: every sweep and run with its state, progress and time.

Reads the results store (SQLite in WAL mode lets it read while jobs write), so it works
while a sweep is running, from any shell, for local and Slurm sweeps alike. Its one write:
``running`` runs whose job stopped sending heartbeats (killed) are marked ``interrupted``.

    python -m sweeper status                       # ./results/results.db
    python -m sweeper status results_dir=/scratch/results
    python -m sweeper status store.url=postgresql://...  sweep=3
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

from rich.console import Console
from rich.table import Table

from sweeper.store import RunRecord, RunStatus, Store, default_url, display_url
from trainers.registry import ConfigError

USAGE = "usage: python -m sweeper status [results_dir=DIR] [store.url=URL] [sweep=ID] [all=true]"


def _elapsed(run: RunRecord, now: dt.datetime) -> str:
    if run.started_at is None:
        return "—"
    end = run.ended_at or now
    s = int((end - run.started_at).total_seconds())
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


HELP = f"""{USAGE}

Every sweep in the results store with its runs by state, then the runs of the latest sweep
(sweep=ID: of that sweep; all=true: every run) with their progress, elapsed time and test
accuracy. Works while sweeps run, from any shell, for local and Slurm sweeps alike. Its one
write: runs whose job stopped sending heartbeats are marked interrupted."""


def parse_args(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in ("results_dir", "store.url", "sweep", "all"):
            raise ConfigError(f"status does not take {a!r}; {USAGE}")
        out[key] = value
    if "sweep" in out and not out["sweep"].isdigit():
        raise ConfigError(f"sweep={out['sweep']} is not allowed; expected a sweep id (a number)")
    return out


def status(argv: list[str], console: Console | None = None) -> None:
    from sqlalchemy.exc import SQLAlchemyError

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
        try:
            store.expire_leases()  # killed jobs' runs: interrupted (the one write of status)
        except SQLAlchemyError:  # a read-only or busy store: list it as it is
            pass
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        sweeps = store.sweeps()
        t = Table(title=f"sweeps in {display_url(url)}")
        for col in (
            "sweep",
            "name",
            "created (UTC)",
            "launcher",
            "points",
            "jobs",
            "done",
            "failed",
            "diverged",
            "pruned",
            "running",
            "interrupted",
            "queued",
            "elapsed",
        ):
            t.add_column(col)
        for sw in sweeps:
            links = store.sweep_runs(sw.id)
            runs = [r for _, r in links]
            per_job = Counter(link.job_id for link, _ in links if link.job_id)
            fused = sum(1 for n in per_job.values() if n > 1)  # members share their job's id
            c = {st: sum(1 for r in runs if r.status == st) for st in RunStatus}
            end = sw.ended_at or now
            secs = int((end - sw.created_at).total_seconds())
            t.add_row(
                str(sw.id),
                sw.name,
                sw.created_at.strftime("%Y-%m-%d %H:%M"),
                sw.launcher,
                str(sw.n_points),
                f"{len(per_job)}" + (f" ({fused} fused)" if fused else ""),
                str(c[RunStatus.done]),
                str(c[RunStatus.failed]),
                str(c[RunStatus.diverged]),
                str(c[RunStatus.pruned]),
                str(c[RunStatus.running]),
                str(c[RunStatus.interrupted]),
                str(c[RunStatus.queued]),
                f"{secs // 60}m{secs % 60:02d}s",
            )
        console.print(t)
        if "sweep" in args:
            sid = int(args["sweep"])
            if not any(s.id == sid for s in sweeps):
                raise ConfigError(
                    f"unknown sweep id {sid}; known: "
                    f"{', '.join(str(s.id) for s in sweeps) or 'none'}"
                )
            rows = [(link.point, r) for link, r in store.sweep_runs(sid)]
            title = f"runs of sweep {sid}"
        elif sweeps and args.get("all") != "true":
            rows = [(link.point, r) for link, r in store.sweep_runs(sweeps[-1].id)]
            title = f"runs of the latest sweep ({sweeps[-1].id}); all=true lists every run"
        else:
            rows = [("", r) for r in store.runs()]
            title = "all runs"
        rt = Table(title=title)
        for col in (
            "run",
            "point",
            "model",
            "method",
            "alpha",
            "batch",
            "seed",
            "status",
            "epoch",
            "elapsed",
            "test %",
            "host",
        ):
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
