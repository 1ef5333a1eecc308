"""Helpers shared by the test modules (imported as ``helpers``; no test module imports
another): the real CLI in a subprocess, configs composed in process, plain-SQL reads of the
real stores, and writers of the real on-disk data formats."""

from __future__ import annotations

import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ the CLI, in a process
def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # one torch thread a process: two test files run at once on two cores, and a job's own
    # thread count (TrainJob sets it) never oversubscribes the machine
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path, timeout: float = 300, module: str = "sweeper", **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m sweeper ARGS`` (or ``-m analysis``) exactly as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.strip()]


def main_in_process(args: list[str], capsys, monkeypatch,  # noqa: ANN001
                    out: list[str] | None = None) -> tuple[int, list[str]]:  # fmt: skip
    """``python -m sweeper ARGS`` in this process, through the CLI's own entry and error
    boundary (:func:`sweeper.cli.main`): its exit status and its stderr lines (its stdout
    lines go to ``out``). Where the process itself is not what is tested."""
    import pytest

    from sweeper import cli

    monkeypatch.setattr(sys, "argv", ["sweeper", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    got = capsys.readouterr()
    if out is not None:
        out.extend(ln for ln in got.out.splitlines() if ln.strip())
    return int(exit_.value.code or 0), [ln for ln in got.err.splitlines() if ln.strip()]


# ----------------------------------------------------------- configs and runs, in process
def compose(*overrides: str):  # -> sweeper.config.schema.Config
    """The typed config of ``python -m sweeper OVERRIDES``, composed with Hydra's compose
    API in this process (the same composition and checks as the CLI)."""
    from sweeper.config.compose import compose as _compose
    from sweeper.config.schema import register_configs

    register_configs()
    return _compose(list(overrides))


def train(*overrides: str):  # -> sweeper.launch.job.JobOutcome
    """``python -m sweeper OVERRIDES`` in this process: compose, pre-flight, run_job."""
    from sweeper.config.compose import preflight_argv
    from sweeper.launch.job import run_job

    cfg = preflight_argv(list(overrides))
    assert cfg is not None
    return run_job(cfg)


# ------------------------------------------------------------------- reading the stores
def sql(db: Path, query: str, *params: object) -> list[tuple]:
    """Read a results store with plain SQL, as a user would (independent of our ORM)."""
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    try:
        return con.execute(query, params).fetchall()
    finally:
        con.close()


def poll_sql(db: Path, query: str, *params: object) -> list[tuple]:
    """Like :func:`sql` for polling a store another process is still creating."""
    try:
        return sql(db, query, *params)
    except sqlite3.OperationalError:  # tables not created yet, or a writer holds the lock
        return []


# ------------------------------------------------------ writers of the real on-disk formats
def write_pickle(path: Path, obj: object, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(parent: Path) -> dict[str, np.ndarray]:
    """cifar-10-batches-py with 5 x 20 training images and 10 test images."""
    rng = np.random.default_rng(0)
    d = parent / "cifar-10-batches-py"
    d.mkdir()
    xs, ys = [], []
    for k in range(1, 6):
        x = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, 20).tolist()
        names = [f"img_{k}_{i}.png".encode() for i in range(20)]
        batch = {
            b"batch_label": f"training batch {k} of 5".encode(),
            b"labels": y,
            b"data": x,
            b"filenames": names,
        }
        write_pickle(d / f"data_batch_{k}", batch, protocol=2)  # like the py2-era originals
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, 10).tolist()
    test = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": yt,
        b"data": xt,
        b"filenames": [f"t{i}.png".encode() for i in range(10)],
    }
    write_pickle(d / "test_batch", test, protocol=2)
    meta = {
        b"label_names": [f"c{i}".encode() for i in range(10)],
        b"num_cases_per_batch": 20,
        b"num_vis": 3072,
    }
    write_pickle(d / "batches.meta", meta, protocol=2)
    return {"xtr": np.concatenate(xs), "ytr": np.array(ys), "xte": xt, "yte": np.array(yt)}


def write_cifar100(parent: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    d = parent / "cifar-100-python"
    d.mkdir()
    out = {}
    for split, n in (("train", 30), ("test", 10)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 60, n).tolist()  # labels present < 100: num_classes is still 100
        obj = {
            b"filenames": [f"{split}{i}.png".encode() for i in range(n)],
            b"batch_label": split.encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": x,
        }
        write_pickle(d / split, obj, protocol=pickle.DEFAULT_PROTOCOL)
        out["x" + split[:2]], out["y" + split[:2]] = x, np.array(fine)
    meta = {
        b"fine_label_names": [f"f{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
    }
    write_pickle(d / "meta", meta, protocol=pickle.DEFAULT_PROTOCOL)
    return out


def write_imagefolder(root: Path, classes: dict[str, dict[str, int]]) -> None:
    """root/<split>/<class>/*.png|jpg; class k images are dominated by colour channel k."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, counts in classes.items():
        for k, (cls, n) in enumerate(sorted(counts.items())):
            d = root / split / cls
            d.mkdir(parents=True)
            colour = {"ant": 0, "bee": 1, "cat": 2}[cls]
            for i in range(n):
                h, w = 36 + 4 * i, 48 - 2 * i  # varied sizes and aspect ratios
                img = rng.integers(10, 50, (h, w, 3), dtype=np.uint8)
                img[..., colour] = 230
                ext = "png" if (i + k) % 2 else "jpg"
                Image.fromarray(img).save(d / f"{cls}_{i}.{ext}")
            (d / "notes.txt").write_text("not an image")  # ImageFolder must skip it
