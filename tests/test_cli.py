"""The real CLI: every method runs; bad input is refused with one line and no row.

Bad input is checked in this process through :func:`sweeper.cli.main` (the CLI's pre-flight
and its one error boundary: ``SystemExit`` with the status, one line on stderr); a few cases
go through a real process too, where the exit status and the whole stderr are the point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import error_lines, main_in_process, run_cli, sql, train

from trainers.methods import known_methods

FAST = ["epochs=1", "filter_stats_every=10", "mlflow.enabled=false"]


@pytest.fixture(scope="module")
def every_method(shared_results: Path) -> Path:
    """Each of the nine methods trained as a job (in this process, composed exactly as the
    CLI composes it: the process is not what is tested here; test_sweep runs real sweeps)."""
    for method in known_methods():
        out = train(f"method={method}", f"results_dir={shared_results}", *FAST)
        assert out.status == "done", (method, out)
    return shared_results


@pytest.mark.slow
@pytest.mark.parametrize("method", known_methods())
def test_every_method_runs(method: str, every_method: Path) -> None:
    rows = sql(
        every_method / "results.db",
        "SELECT status, alpha, label_smoothing, epoch, test_acc, config FROM runs WHERE method = ?",
        method,
    )
    assert len(rows) == 1
    status, alpha, ls, epoch, test_acc, config = rows[0]
    assert status == "done" and epoch == 1
    assert 0.0 <= test_acc <= 100.0
    assert (alpha == 0.25) == ("pgt" in method)  # alpha is NULL for methods without PGT
    assert (ls == 0.1) == method.startswith("ls")
    cfg = json.loads(config)
    assert cfg["method"]["name"] == method and cfg["resolved_lr"] == pytest.approx(0.1 * 64 / 256)


BAD = [
    (["alpha=0"], "alpha=0", "(0, 1]"),
    (["alpha=1.5"], "alpha=1.5", "(0, 1]"),
    (["method=pgtx"], "'pgtx'", "agc_pgt"),
    (["model=resnet99"], "'resnet99'", "resnet20"),
    (["data=mnist"], "'mnist'", "digits"),
    (["batch_size=0"], "batch_size=0", ">= 1"),
    (["batch_size=-8"], "batch_size=-8", ">= 1"),
    (["batch_size=abc"], "batch_size", "Integer"),
    (["batch_size=5000"], "5000", "1437"),
    (["epochs=0"], "epochs=0", ">= 1"),
    (["data=cifar10"], "data.root", "required"),
    (["data=cifar10", "data.root=/nonexistent/cifar"], "/nonexistent/cifar", "cifar"),
    (["data=imagenet", "data.root=/nonexistent/imnet"], "/nonexistent/imnet", "train"),
    (["colour=blue"], "colour", "known top-level keys"),
    (["+colour=blue"], "colour", "known top-level keys"),
    (["method.gc_max=2"], "method.gc_max", "gc_max_norm"),
    (["method=ls", "method.label_smoothing=1.5"], "1.5", "[0, 1)"),
    (["compile=true", "compile_mode=fast"], "compile_mode=fast", "reduce-overhead"),
    (["method.grad=centralise"], "method.grad=centralise", "none, gc, agc, znorm"),
    (["method.grad=[gc,gc]"], "gc twice", "at most once"),
    (["optimizer=adam"], "'adam'", "adamw, sgd"),
    (["optimizer=adamw", "optimizer.betas=[0.9,1.2]"], "optimizer.betas=[0.9, 1.2]", "[0, 1)"),
    (["optimizer=adamw", "optimizer.eps=0"], "optimizer.eps=0", "> 0"),
    # each data set has its own keys: a knob another data set reads is refused, by name
    (
        ["data.num_train=100"],
        "'data.num_train' for data=digits",
        "name, data_seed, val_split, _target_, args",
    ),  # fmt: skip
    (["data.augment=false"], "'data.augment' for data=digits", "data_seed"),
    (
        ["data=imagenet", "data.root=/x", "data.download=true"],
        "'data.download' for data=imagenet",
        "num_workers",
    ),  # fmt: skip
    (["data=synthetic", "data.num_trian=5"], "did you mean 'data.num_train'?", "num_classes"),
    (["alpah=0.3"], "unknown key 'alpah'; did you mean 'alpha'?", "known top-level keys"),
]


@pytest.mark.parametrize(("args", "names", "allowed"), BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_one_line_no_row(
    args: list[str], names: str, allowed: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, lines = main_in_process([*args, f"results_dir={tmp_path / 'res'}"], capsys, monkeypatch)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert names in lines[0] and allowed in lines[0], lines[0]
    assert sql(tmp_path / "res" / "results.db", "SELECT count(*) FROM runs") in ([], [(0,)])
    assert not (tmp_path / "res" / "mlflow.db").exists()


@pytest.mark.parametrize(
    "args", [["alpha=1.5"], ["batch_size=5000"], ["-m", "method=pgt,wat"], ["--cfg", "job", "x=1"]]
)
def test_bad_input_through_a_real_process(args: list[str], tmp_path: Path) -> None:
    res = run_cli(*args, f"results_dir={tmp_path / 'res'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = error_lines(res)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert sql(tmp_path / "res" / "results.db", "SELECT count(*) FROM runs") in ([], [(0,)])


@pytest.mark.parametrize("kind", ["empty", "wrong_files"])
def test_dataset_dir_without_data(kind: str, tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "cifar"
    root.mkdir()
    if kind == "wrong_files":
        (root / "readme.txt").write_text("not cifar")
    args = ["data=cifar10", f"data.root={root}", f"results_dir={tmp_path / 'res'}"]
    code, lines = main_in_process(args, capsys, monkeypatch)
    assert code == 2
    assert len(lines) == 1 and str(root) in lines[0], lines
    assert sql(tmp_path / "res" / "results.db", "SELECT count(*) FROM runs") in ([], [(0,)])


def test_unwritable_results_dir(tmp_path: Path, capsys, monkeypatch) -> None:
    # a path below a regular file can be created by nobody, root included
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, lines = main_in_process([f"results_dir={blocker / 'results'}"], capsys, monkeypatch)
    assert code == 2
    assert len(lines) == 1 and "results_dir=" in lines[0] and "cannot be written" in lines[0]
    assert not (blocker.parent / "results").exists()


def test_the_digits_config_shows_only_its_own_keys(tmp_path: Path, capsys, monkeypatch) -> None:
    """``--cfg job`` through the CLI's entry in this process (what it prints is the point;
    ``--cfg`` in a real process: test_bad_input_through_a_real_process, test_store)."""
    monkeypatch.chdir(tmp_path)
    out: list[str] = []
    code, err = main_in_process(["--cfg", "job"], capsys, monkeypatch, out)
    assert code == 0 and err == [], err
    data = "\n".join(["", *out]).split("\ndata:\n", 1)[1].split("\nschedule:", 1)[0]
    assert [ln.split(":")[0].strip() for ln in data.splitlines()] == [
        "name", "data_seed", "val_split", "_target_", "args"]  # fmt: skip
    out.clear()
    code, err = main_in_process(["--cfg", "job", "data=synthetic"], capsys, monkeypatch, out)
    text = "\n".join(out)
    assert code == 0 and err == [] and "num_train: 1024" in text and "root:" not in text


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["mirror", "--help"]])
def test_help_answers_and_a_closed_pipe_ends_quietly(args: list[str], tmp_path: Path, capsys,
                                                     monkeypatch) -> None:  # fmt: skip
    """``python -m sweeper [status|mirror] --help | head -1``: the usage, no traceback."""
    import subprocess
    import sys

    from helpers import cli_env

    from sweeper import cli

    # `| true` closes the pipe before the command has started: its writes always meet a
    # closed pipe (what `| head` does to a longer output)
    cmd = f"{sys.executable} -m sweeper {' '.join(args)} | true"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    # the whole text through the same entry in this process (the process, its exit status
    # and its stderr, are checked just above)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    full = capsys.readouterr()
    assert int(exit_.value.code or 0) == 0 and full.err == ""
    first = full.out.strip().splitlines()[0]
    assert first.startswith("gradsweep") if args == ["--help"] else first.startswith("usage:")
    if args == ["--help"]:
        for word in ("status", "mirror", "== Config groups", "method: agc", "alpha: 0.25"):
            assert word in full.out, word
    assert not (tmp_path / "results").exists()  # help writes nothing
