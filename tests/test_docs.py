"""Every command in the README and docs/ works as written, so the documentation cannot drift.

Each line of a ```bash block is one command. How it is checked depends on what it needs:

* runnable here (digits, synthetic, a researcher's module written as the docs show it):
  a single run trains, made tiny (``epochs=1``, in process); a sweep or a search runs
  through the real CLI with ``hydra.launcher.dry_run=true`` (every point composed and
  checked, the jobs planned, nothing started); ``status``, ``mirror``, ``resolve``,
  ``--help``, ``--cfg job``, ``python -m analysis`` and the SQL of docs/store.md run on a
  store a real sweep made. The sweeps, searches, ``status``, ``mirror``, ``resolve``,
  ``--help``, ``--cfg`` and
  ``python -m analysis`` run through the CLIs' own entries (``sweeper.cli.main``,
  ``analysis.__main__.main``) in this process: their exit status and stderr, without a
  Python start-up each;
* needing a data path, a Slurm cluster or a PostgreSQL server: the same dry run with the
  path pointing at small files in the real on-disk format, the local launcher, a SQLite
  store; needing a GPU: composed and validated (``device=cuda`` cannot be resolved here);
* the README's quick tour and its main command run for real (``test_the_readme_tour``),
  and ``mlflow ui`` is started and stopped as docs/mlflow.md says.

A command this file does not know how to check fails the test: add its kind here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    REPO,
    cli_env,
    main_in_process,
    run_cli,
    sql,
    write_cifar10,
    write_cifar100,
    write_imagefolder,
)

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEST_COMMAND = ".venv/bin/python -m pytest -q -n 2 --dist loadfile"


def commands(path: Path) -> list[str]:
    """The command lines of a Markdown file's ```bash blocks (continuations joined, comment
    lines and trailing comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.strip())  # a trailing comment
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


# each distinct command once; the README's tour runs its own commands for real
TOUR = {"python -m sweeper -m method=pgt alpha=0.05,0.25,0.3", "python -m sweeper status",
        "python -m analysis"}  # fmt: skip
ALL = list({c: (p.name, c) for p in reversed(DOCS) for c in commands(p) if c not in TOUR}.values())


# ------------------------------------------------------------------ what the docs need
MYLAB = {
    "grads.py": """
        import torch


        @torch.no_grad()
        def centralize_(params, strength: float = 1.0):
            for p in params:
                if p.grad is not None and p.grad.ndim > 1:
                    dims = tuple(range(1, p.grad.ndim))
                    p.grad.sub_(strength * p.grad.mean(dim=dims, keepdim=True))
    """,
    "nets.py": """
        import torch
        from torch import nn


        class TinyNet(nn.Module):
            def __init__(self, num_classes: int, in_channels: int, width: int = 8):
                super().__init__()
                self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
                self.fc = nn.Linear(width, num_classes)

            def forward(self, x):
                return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
    """,
    "data.py": """
        import torch


        def bars(n_train: int = 256, n_test: int = 64):
            g = torch.Generator().manual_seed(0)
            def make(n):
                y = torch.randint(0, 4, (n,), generator=g)
                x = torch.randint(0, 60, (n, 1, 8, 8), generator=g)
                for i in range(n):
                    x[i, 0, 2 * y[i]] += 190
                return x.to(torch.uint8), y
            return (*make(n_train), *make(n_test))
    """,
}
CENTRALIZE = "name: centralize\ngrad:\n  _target_: mylab.grads.centralize_\n  strength: 1.0\n"


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    """A working folder as the docs assume one: a researcher's ``mylab`` package and small
    data sets in the real on-disk formats, standing in for ``/data/...``."""
    d = tmp_path_factory.mktemp("docs")
    # the stand-in for the PostgreSQL MLflow DB and ./results's default MLflow store: set-up
    # copies of the MLflow DB that init_tracking_store made once for this test process
    (d / "results").mkdir()
    for db in (d / "pg-mlflow.db", d / "results" / "mlflow.db"):
        shutil.copyfile(mlflow_template, db)
    lab = d / "mylab"
    (lab / "conf" / "method").mkdir(parents=True)
    (lab / "__init__.py").write_text("")
    for name, text in MYLAB.items():
        (lab / name).write_text(textwrap.dedent(text))
    (lab / "conf" / "method" / "centralize.yaml").write_text(CENTRALIZE)
    data = d / "data"
    (data / "cifar").mkdir(parents=True)
    write_cifar10(data / "cifar")
    (data / "cifar100").mkdir()
    write_cifar100(data / "cifar100")
    write_imagefolder(data / "imagenet", {"train": {"ant": 2, "bee": 2}, "val": {"ant": 1}})
    return d


@pytest.fixture(scope="module")
def store(place: Path) -> Path:
    """A results dir a real (tiny) sweep made, for the commands that read one."""
    res = run_cli("-m", "method=baseline,pgt", "alpha=0.25", "epochs=1", "mlflow.enabled=false",
                  cwd=place, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return place / "results"


def _here(cmd: str, place: Path) -> list[str]:
    """The command's arguments, with what this machine lacks replaced: /data/... -> small
    files in the real format, Slurm -> the local launcher, PostgreSQL -> SQLite."""
    cmd = cmd.replace("/data/", f"{place}/data/")
    cmd = cmd.replace("hydra/launcher=slurm", "hydra/launcher=local")
    cmd = re.sub(r"postgresql://\S+/mlflow", f"sqlite:///{place}/pg-mlflow.db", cmd)
    cmd = re.sub(r"postgresql://\S+", f"sqlite:///{place}/results/results.db", cmd)
    return shlex.split(cmd)


def _ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


def _ok_in_process(code: int, err: list[str]) -> None:
    """:func:`_ok` for a CLI run in this process: its exit status and its stderr lines."""
    assert code == 0, err[-40:]
    assert not any("Traceback" in ln for ln in err), err[-60:]


def _analysis(args: list[str], capsys) -> tuple[int, list[str]]:  # noqa: ANN001
    """``python -m analysis ARGS`` in this process, through its own entry and error boundary
    (:func:`analysis.__main__.main`): its exit status and its stderr lines."""
    from analysis.__main__ import main

    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _compose_only(args: list[str]) -> None:
    """A single run that needs a GPU: composed and validated, not resolved on this machine."""
    from helpers import compose

    compose(*[a for a in args if a not in ("-m",)]).validate()


_COLLECTED: set[tuple[str, ...]] = set()
_LISTED: set[str] = set()  # benchmarks/ scripts whose --list ran: the same check each time


def check(cmd: str, place: Path, store: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    """Run or compose one documented command (see the module docstring)."""
    words = shlex.split(cmd)
    if cmd.startswith("python3 -m venv"):  # the install: tested by .ci/run; its run below
        assert cmd.endswith("&& .venv/bin/python -m sweeper")
        return
    if "-m pytest" in cmd:
        if cmd == TEST_COMMAND:
            return  # the README's test command: test_the_test_command_is_what_ci_runs
        args = [a for a in words[words.index("pytest") + 1 :] if a not in ("-n", "2")]
        args = tuple(a for a in args if a not in ("--dist", "loadfile"))
        files = [a for a in args if a.startswith("tests/")]
        if files:  # a file (and -k): it exists and holds such tests; the suite collects it
            (name,) = files
            text = (REPO / name).read_text()
            k = args[args.index("-k") + 1] if "-k" in args else ""
            assert re.search(rf"def test_\w*{k}", text), (name, k)
            return
        if args not in _COLLECTED:  # `-n 2` or another python: the same selection
            res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args],
                                 cwd=REPO, env=cli_env(), capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
            assert res.returncode == 0 and "collected" in res.stdout, res.stdout[-2000:]
            _COLLECTED.add(args)
        return
    if words[0].endswith("ruff"):
        res = subprocess.run([sys.executable, "-m", "ruff", *words[1:]], cwd=REPO,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stdout[-2000:]
        return
    if "benchmarks/" in cmd:  # the GPU check and the wheelhouse: their plan, no download
        script = next(w for w in words if w.startswith("benchmarks/"))
        if script not in _LISTED:
            res = subprocess.run([sys.executable, str(REPO / script), "--list"], cwd=REPO,
                                 env=cli_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
            assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
            _LISTED.add(script)
        return
    if cmd.startswith("python3 -m pip install --no-index"):  # the GPU machine's install
        assert "--find-links .whl" in cmd and "--no-deps" in cmd
        return
    if "mlflow ui" in cmd:
        return  # test_mlflow_ui_starts_and_stops_as_documented
    if words[0] == "sqlite3":
        con = sqlite3.connect(store / "results.db")
        try:
            assert con.execute(words[2]).fetchall()
        finally:
            con.close()
        return
    assert words[:2] == ["python", "-m"], f"unknown kind of command: {cmd}"
    args = _here(cmd, place)[3:]
    if words[2] == "analysis":
        out = place / "report-docs"
        if "--out" not in args:
            args += ["--out", str(out)]
        if "--results-dir" not in args and "--store-url" not in args:
            args += ["--results-dir", str(store)]
        args = [str(store) if a == "results" else a for a in args]
        _ok_in_process(*_analysis(args, capsys))
        return
    # resolve on that store: its comparisons have one seed a side, so the plan adds no seed
    # (the command's own runs are tests/test_resolve.py's)
    readers = (["status"], ["mirror"], ["resolve"])
    if args[:1] in readers or "--help" in args or "--cfg" in args:
        args = [f"results_dir={store}" if a == "results_dir=results" else a for a in args]
        if args[:1] in readers and not any(a.startswith(("results_dir=",
                "store.url=", "-")) for a in args):  # fmt: skip
            args.append(f"results_dir={store}")
        _ok_in_process(*main_in_process(args, capsys, monkeypatch))
        return
    if "device=cuda" in args:
        _compose_only(args)
        return
    if "-m" not in args and any(a.startswith(("data.root=", "data.download=")) for a in args):
        from sweeper.config.compose import preflight_argv  # a data path: its full pre-flight

        preflight_argv([a for a in args if not a.startswith("data.download=")])
        return
    if "-m" in args:  # a sweep or a search: every point composed and checked, nothing run
        dry = [*args, "hydra.launcher.dry_run=true", f"results_dir={place}/dry"]
        out: list[str] = []
        code, err = main_in_process(dry, capsys, monkeypatch, out)
        assert code == 0, err
        assert any(ln.startswith("dry run of") for ln in out), out[-20:]
        assert not (place / "dry").exists()  # a dry run writes nothing
        return
    from helpers import train  # a single run: trained, made tiny, in this process

    made = [a for a in args if not a.startswith(("epochs=", "results_dir="))]
    if "data=synthetic" in made:  # made tiny: the generated set too
        made += ["data.num_train=128", "data.num_test=64", "batch_size=32"]
    out = train(*made, "epochs=1", f"results_dir={place}/single", "mlflow.enabled=false")
    assert out.status in ("done", "skipped"), out


# ------------------------------------------------------------------------------ tests
def test_the_test_command_is_what_ci_runs() -> None:
    assert commands(REPO / "README.md")[1] == TEST_COMMAND
    assert (REPO / ".ci" / "run").read_text().rstrip().splitlines()[-1] == TEST_COMMAND
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250  # a README that fits on a screen or two
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", readme):
        assert (REPO / link).is_file(), link


@pytest.mark.slow
@pytest.mark.parametrize(("doc", "cmd"), ALL, ids=[f"{d}: {c[:60]}" for d, c in ALL])
def test_a_documented_command_works(doc: str, cmd: str, place: Path, store: Path, capsys,
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(place)
    monkeypatch.syspath_prepend(str(place))  # a researcher's mylab, importable from the cwd
    for name in [m for m in sys.modules if m == "mylab" or m.startswith("mylab.")]:
        monkeypatch.delitem(sys.modules, name)  # another test file's mylab, not the docs'
    check(cmd, place, store, capsys, monkeypatch)


@pytest.mark.slow
def test_the_readme_tour(tmp_path: Path, seed_mlflow) -> None:  # noqa: ANN001
    """The README's main command and its tour, in order, for real (the sweep made tiny)."""
    seed_mlflow(tmp_path / "results")  # ./results's default MLflow store, set up once
    tour = commands(REPO / "README.md")
    main = tour[0].split("&&")[-1].split()[1:]  # .venv/bin/python -m sweeper
    res = run_cli(*main[2:], "epochs=3", cwd=tmp_path, timeout=600)  # made tiny
    _ok(res)
    assert "done: train" in res.stdout
    again = run_cli(*main[2:], "epochs=3", cwd=tmp_path)
    _ok(again)
    assert "already done" in again.stdout  # the same command again trains nothing
    sweep = next(c for c in tour if c.startswith("python -m sweeper -m method=pgt alpha="))
    res = run_cli(*shlex.split(sweep)[3:], "epochs=1", cwd=tmp_path, timeout=600)
    _ok(res)
    assert "1 fused job (3 members)" in res.stdout and "[  3/3] done" in res.stdout
    _ok(run_cli("status", cwd=tmp_path))
    rep = run_cli(cwd=tmp_path, module="analysis")
    _ok(rep)
    assert (tmp_path / "results" / "report" / "report.md").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_mlflow_ui_starts_and_stops_as_documented(store: Path, place: Path) -> None:
    """docs/mlflow.md: started in a session of its own, ``kill -- -PGID`` stops every process
    of it (MLflow's workers included)."""
    (cmd,) = [c for c in commands(REPO / "docs" / "mlflow.md") if c.startswith("setsid")]
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    # made tiny: one server worker instead of four (each imports MLflow)
    line = cmd.replace("mlflow ui", f"{mlflow} ui --port {port} --workers 1", 1)
    line = line.replace("sqlite:///results/", f"sqlite:///{store}/")
    proc = subprocess.Popen(["bash", "-c", f"{line}\necho $!"], cwd=place, env=cli_env(),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    pid = int(out.strip().splitlines()[-1])
    deadline = time.monotonic() + 30
    while os.getpgid(pid) != pid:  # setsid has made it its group's leader
        assert time.monotonic() < deadline, "mlflow ui did not start a session of its own"
        time.sleep(0.05)
    pgid = pid
    assert pgid != os.getpgrp()  # never this test's own group
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, (place / "mlflow-ui.log").read_text()[-2000:]
                time.sleep(0.2)
    finally:
        os.killpg(pgid, signal.SIGTERM)  # what `kill -- -PGID` does
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).stdout.strip():
        assert time.monotonic() < deadline, "mlflow ui left processes behind"
        time.sleep(0.1)
    assert sql(store / "results.db", "SELECT count(*) FROM runs") == [(2,)]
