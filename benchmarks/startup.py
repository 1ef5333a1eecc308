"""Benchmark: start-up time of the CLI, now (this working tree) vs a baseline commit.

Each figure is the median of N runs (5; ``--quick`` 2) of whole-process wall time (perf_counter
around ``subprocess.run``; stdout to /dev/null, stderr to a file read only on failure), after
one untimed warm-up per side (.pyc files, page cache); sides alternate A B A B ... so drift
cancels. Goals: ``python -m sweeper --help``, ``--cfg job``, ``status results_dir=S`` (S a
copy of tests/fixtures/store_v3 per side), ``python -m analysis --help`` and the default
command run again once its run is done (it says so without importing torch) <= 1.5 s each; a
bare five-line Hydra app's ``--help`` <= 0.6 s (Hydra imports every ``hydra_plugins`` plugin
at discovery: what installing gradsweep costs other Hydra apps; the same app with gradsweep
taken off the import system is the reference row); a job's start-up, process
start -> first optimiser step, for ``python -m sweeper results_dir=NEW`` <= 3 s, and the same
without MLflow (whose run the job opens before its first epoch). A probe imports torch, hooks
the first optimiser step, then runs the module; every run gets a fresh results dir, so pays
its stores' first-time set-up. Rows without a goal:
``import torch`` alone; a plain PyTorch script's start -> first ``torch.optim.SGD`` step (the
first call into ``torch.optim`` imports ``torch._dynamo``, whether or not anything is
compiled; a job's optimiser does not, ``trainers/runtime.py``); the whole ``epochs=1`` run (not with ``--quick``). A
run whose Hydra plugin fails to import counts as failed. Figures: benchmarks/README.md.

The baseline is a ``git worktree`` of REF (default 11732bc) with a
``sitecustomize.py`` shim that takes this checkout's editable install off the import system,
so only the worktree's code (and Hydra plugins) is imported there. Usage:

    .venv/bin/python benchmarks/startup.py [--quick] [--repeats N] [--baseline REF | --no-baseline]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "store_v3"
TIMEOUT = 300.0
SHIM = """import sys
sys.meta_path[:] = [
    f for f in sys.meta_path if "__editable__" not in repr(f) and "_EditableFinder" not in repr(f)
]
sys.path_hooks[:] = [
    h for h in sys.path_hooks if "__editable__" not in repr(h) and "Editable" not in repr(h)
]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
"""
APP = """import hydra
@hydra.main(version_base=None)
def app(cfg) -> None:
    print(cfg)
app()
"""
PROBE = """import os, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
def _first_step(opt, args, kwargs):
    with open(os.environ["PROBE_OUT"], "w") as f:
        f.write(repr(time.time() - float(os.environ["PROBE_T0"])))
    os._exit(0)
register_optimizer_step_pre_hook(_first_step)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


FLOOR = """import os, time
import torch
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
model(torch.ones(4, 8)).sum().backward()
with open(os.environ["PROBE_OUT"], "w") as f:
    f.write(repr(time.time() - float(os.environ["PROBE_T0"])))
opt.step()
"""


class Failed(Exception):
    """A measured command failed: its message names the command and ends with stderr's tail."""


@dataclass
class Side:
    name: str
    root: Path  # the checkout whose code runs
    env: dict[str, str]
    store: Path = field(default=Path())  # this side's own copy of the fixture store
    done: Path = field(default=Path())  # a results dir where the default run is done


def run(cmd: list[str], cwd: Path, env: dict[str, str], tmp: Path) -> float:
    """Wall seconds of one process; raises Failed on a timeout, a non-zero exit status or a
    Hydra plugin that failed to import (Hydra only warns, and the time would mean nothing)."""
    err = tmp / "stderr.txt"
    with open(err, "wb") as ef:
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(
                cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=ef, timeout=TIMEOUT
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -999
        took = time.perf_counter() - t0
    text = err.read_text(errors="replace")
    if rc != 0 or "Error importing 'hydra_plugins" in text:
        why = {-999: f"timed out after {TIMEOUT:.0f} s", 0: "a Hydra plugin failed to import"}
        raise Failed(
            f"`{' '.join(cmd[1:])}` ({why.get(rc, f'exit status {rc}')}):\n{text[-1500:].strip()}"
        )
    return took


def fresh_job(side: Side, tmp: Path, overrides: list[str], probe: Path | None,
              script: Path | None = None) -> float:  # fmt: skip
    """A job in a new results dir: seconds to its first step (probe) or to its exit; with
    ``script``, that plain script's seconds to its first step instead."""
    d = Path(tempfile.mkdtemp(dir=tmp))
    try:
        args = [f"results_dir={d / 'results'}", *overrides]
        if probe is None and script is None:
            return run([sys.executable, "-m", "sweeper", *args], side.root, side.env, d)
        out = d / "probe.txt"
        env = dict(side.env, PROBE_OUT=str(out), PROBE_T0=str(time.time()))
        argv = [str(script)] if script is not None else [str(probe), "sweeper", *args]
        run([sys.executable, *argv], side.root, env, d)
        if not out.exists():
            tail = (d / "stderr.txt").read_text(errors="replace")[-1500:].strip()
            raise Failed(f"job exited without an optimiser step:\n{tail}")
        return float(out.read_text())
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Figure:
    what: str
    goal: float | None
    measure: Callable[[Side], float]
    times: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def figures(tmp: Path, quick: bool) -> list[Figure]:
    app, probe, floor = tmp / "app", tmp / "probe.py", tmp / "floor.py"
    app.mkdir()
    (app / "app.py").write_text(APP)
    probe.write_text(PROBE)
    floor.write_text(FLOOR)
    py = sys.executable

    def cmd(*args: str, in_app: bool = False) -> Callable[[Side], float]:
        def go(s: Side) -> float:
            argv = [py, *(x.format(store=s.store, done=s.done) for x in args)]
            return run(argv, app if in_app else s.root, s.env, tmp)

        return go

    shim = tmp / "shim-only"  # an environment where gradsweep is not installed at all
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM)

    def bare_without(s: Side) -> float:
        env = dict(s.env, PYTHONPATH=str(shim))
        return run([py, "app.py", "--help"], app, env, tmp)

    def job(*overrides: str, to_step: bool = True) -> Callable[[Side], float]:
        return lambda s: fresh_job(s, tmp, list(overrides), probe if to_step else None)

    figs = [
        Figure("import torch (reference)", None, cmd("-c", "import torch", in_app=True)),
        Figure(
            "plain torch: start -> 1st torch.optim.SGD step",
            None,
            lambda s: fresh_job(s, tmp, [], None, floor),
        ),  # fmt: skip
        Figure("sweeper --help", 1.5, cmd("-m", "sweeper", "--help")),
        Figure("sweeper --cfg job", 1.5, cmd("-m", "sweeper", "--cfg", "job")),
        Figure(
            "sweeper status store_v3", 1.5, cmd("-m", "sweeper", "status", "results_dir={store}")
        ),
        Figure("analysis --help", 1.5, cmd("-m", "analysis", "--help")),
        # the default command again, its run done: recognised before torch is imported
        Figure("sweeper again, its run done", 1.5, cmd("-m", "sweeper", "results_dir={done}")),
        Figure("bare Hydra app --help", 0.6, cmd("app.py", "--help", in_app=True)),
        Figure("  same, gradsweep not installed (reference)", None, bare_without),
        Figure("job: start -> 1st step", 3.0, job()),
        # the job opens its MLflow run before the first epoch (sweeper.tracking.job.JobTracker)
        Figure("  same, mlflow.enabled=false", None, job("mlflow.enabled=false")),
    ]
    if not quick:
        figs.append(Figure("job epochs=1: whole run", None, job("epochs=1", to_step=False)))
        figs.append(Figure("  same, mlflow.enabled=false", None,
                           job("epochs=1", "mlflow.enabled=false", to_step=False)))  # fmt: skip
    return figs


def measure(fig: Figure, sides: list[Side], n: int) -> None:
    """One untimed warm-up per side, then n timed runs per side, alternating A B A B ..."""
    print(f"  {fig.what} ...", flush=True)
    for i in range(n + 1):
        for s in sides:
            if s.name in fig.errors:
                continue
            try:
                t = fig.measure(s)
            except Failed as e:
                fig.errors[s.name] = str(e)
                continue
            if i > 0:
                fig.times.setdefault(s.name, []).append(t)


def cell(fig: Figure, side: str) -> str:
    if side in fig.errors:
        return "FAILED"
    xs = fig.times.get(side, [])
    return f"{statistics.median(xs):.2f} s [{min(xs):.2f}-{max(xs):.2f}]" if xs else "-"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    cells = [headers, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        rest = (c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))
        print(r[0].ljust(widths[0]), *rest, sep="  ")
        if k == 0:
            print(*("-" * w for w in widths), sep="  ")


def git(*args: str, check: bool = True) -> str:
    """Run git in this repository; exits with git's message when it fails and check is set."""
    res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        sys.exit(f"git {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout.strip()


def add_baseline(ref: str, tmp: Path, env: dict[str, str]) -> Side:
    """A detached worktree of ref, run with the editable install of this checkout shimmed out."""
    wt, shim = tmp / "baseline", tmp / "shim"
    git("worktree", "add", "--detach", str(wt), ref)
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    return Side("baseline", wt, dict(env, PYTHONPATH=f"{wt}{os.pathsep}{shim}"))


def report(figs: list[Figure], names: list[str], ref: str) -> None:
    base = "baseline" in names
    label = {"baseline": f"baseline ({ref})", "now": "now"}
    headers = ["what", "goal", *(f"{label[x]} median [min-max]" for x in names)]
    rows = []
    for f in figs:
        row = [f.what, f"<= {f.goal:g} s" if f.goal else "-", *(cell(f, x) for x in names)]
        if base:
            b, c = f.times.get("baseline", []), f.times.get("now", [])
            ok = b and c and not f.errors
            row.append(f"{statistics.median(c) / statistics.median(b):.2f}x" if ok else "-")
        rows.append(row)
    print()
    print_table(headers + (["now/baseline"] if base else []), rows)
    print()
    for f in (f for f in figs if f.goal is not None):
        if "now" in f.errors or not f.times.get("now"):
            print(f"FAIL  {f.what}: the command failed (see below)")
            continue
        m = statistics.median(f.times["now"])
        print(f"{'PASS' if m <= f.goal else 'FAIL'}  {f.what}: now {m:.2f} s, goal <= {f.goal:g} s")
    for f in figs:
        for side, msg in f.errors.items():
            print(f"\nerror [{side}] {f.what}: {msg}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Start-up time of the CLI, now vs a baseline.")
    ap.add_argument("--quick", action="store_true", help="2 repeats, no whole-run row")
    ap.add_argument("--repeats", type=int, default=None, help="runs per figure and side (5)")
    ap.add_argument("--baseline", default="11732bc", help="git ref to compare with (11732bc)")
    ap.add_argument("--no-baseline", action="store_true", help="measure this tree only")
    a = ap.parse_args()
    n = a.repeats or (2 if a.quick else 5)
    torch_v = importlib.metadata.version("torch")  # the parent process never imports torch
    print(f"machine: {os.cpu_count()} CPUs | {platform.platform()}")
    print(f"python {platform.python_version()} ({sys.executable}) | torch {torch_v}")
    tmp = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROBE_")}
    sides = [Side("now", REPO, dict(env, PYTHONPATH=str(REPO)))]
    ref = ""
    try:
        if not a.no_baseline:
            ref = git("rev-parse", "--short", a.baseline)
            sides.append(add_baseline(ref, tmp, env))
        for s in sides:
            s.store = tmp / f"store-{s.name}"
            shutil.copytree(FIXTURE, s.store)
            s.done = tmp / f"done-{s.name}"
            print(f"training the default run once ({s.name}) ...", flush=True)
            run([sys.executable, "-m", "sweeper", f"results_dir={s.done}"], s.root, s.env, tmp)
        figs = figures(tmp, a.quick)
        order = " / ".join(s.name for s in sides)
        print(f"{n} runs per figure and side after a warm-up, alternating {order}")
        for f in figs:
            measure(f, sides, n)
    finally:
        if (tmp / "baseline").exists():
            git("worktree", "remove", "--force", str(tmp / "baseline"), check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    report(figs, [s.name for s in reversed(sides)], ref)


if __name__ == "__main__":
    main()
