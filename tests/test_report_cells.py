"""A report cell is one configuration: runs that differ in anything but the seed are never
averaged together (tables, zeroed filters, excluded runs, α figures, the MLflow parent's
summary), and a treatment is compared only with the baseline of its own setting.

Stores are hand-made with real identities (``tests/report_stores.py``); the expected numbers
are computed here from the values written, independently of the report's grouping."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import statistics
from pathlib import Path

import pytest
from helpers import REPO, run_cli
from report_stores import add_run, make_config, seeds_only_store
from scipy import stats as sps

from analysis.__main__ import main
from analysis.plots import alpha_series
from analysis.queries import RunFilter, load_runs
from analysis.render import CELL_LEGEND, NO_BASELINE
from analysis.sweep import summarize_sweep
from sweeper.store import RunStatus, Store

GOLDEN = REPO / "tests" / "fixtures" / "report_seeds_only"
OLD_LEGEND = GOLDEN.joinpath("report.md").read_text(encoding="utf-8").splitlines()[2]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _report(results: Path, out: Path, *extra: str) -> Path:
    assert main(["--results-dir", str(results), "--out", str(out), "--formats", "md,csv,tex",
                 *extra]) == 0  # fmt: skip
    return out


# ----------------------------------------------------------------- nothing else changes
VERDICT_COL = "verdict (test top-1)"


def _drop_csv_verdict(text: str) -> str:
    """A table's CSV without its trailing ``verdict`` column (new in issue 24)."""
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][-1] == "verdict", rows[0]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(r[:-1] for r in rows)
    return buf.getvalue()


def _drop_md_verdicts(md: str) -> str:
    """report.md without its Verdicts section, the tables' notes and verdict columns."""
    lines = md.splitlines()
    start, end = (
        lines.index("## Verdicts"),
        next(i for i, ln in enumerate(lines) if ln.startswith("Cells:")),
    )
    lines = lines[:start] + lines[end:]
    out: list[str] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith(("α chosen on", "verdicts on")):
            i += 2  # the note and its blank line
            continue
        if ln.startswith("| ") and VERDICT_COL in ln:
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            head = lines[i].split(" | ")
            k = head.index(VERDICT_COL)
            out.append(" | ".join(c for n, c in enumerate(head) if n != k))
            out.append("|" + "|".join("---" for _ in range(len(head) - 1)) + "|")
            out += [" | ".join(c for n, c in enumerate(r.split(" | ")) if n != k)
                    for r in lines[i + 2 : j]]  # fmt: skip
            i = j
            continue
        out.append(ln)
        i += 1
    return "\n".join(out) + "\n"


def _drop_tex_verdict(tex: str) -> str:
    lines = tex.splitlines()
    h = next(i for i, ln in enumerate(lines) if "verdict" in ln)
    k = [c.strip() for c in lines[h].removesuffix(" \\\\").split(" & ")].index(VERDICT_COL)
    out = []
    for ln in lines:
        if ln.endswith(" \\\\") and " & " in ln:
            cells = ln.removesuffix(" \\\\").split(" & ")
            ln = " & ".join(c for n, c in enumerate(cells) if n != k) + " \\\\"
        elif ln.startswith("\\begin{tabular}{"):
            ln = ln.replace("l}", "}", 1)
        out.append(ln)
    return "\n".join(out) + "\n"


def test_a_store_of_seeds_only_reports_as_before(tmp_path: Path, capsys) -> None:
    """Every cell of this store holds one configuration: the tables, the excluded runs and
    their CSV / LaTeX are what the code before cells-by-configuration wrote, number for
    number; only the legend and the Δ of a setting without baseline say more now, and the
    verdicts (issue 24: their section, the tables' notes and verdict columns) are new."""
    out = _report(seeds_only_store(tmp_path / "results"), tmp_path / "rep")
    capsys.readouterr()
    for name in ("table1_baseline_vs_pgt", "table2_batch_size", "table3_ablation",
                 "excluded_runs"):  # fmt: skip
        new_csv = (out / f"{name}.csv").read_text()
        if name != "excluded_runs":
            new_csv = _drop_csv_verdict(new_csv)
        assert new_csv == (GOLDEN / f"{name}.csv").read_text(), name
        old = (GOLDEN / f"{name}.tex").read_text()
        new = (out / f"{name}.tex").read_text().replace(f"{NO_BASELINE} & {NO_BASELINE}",
                                                        "--- & ---")  # fmt: skip
        if name != "excluded_runs":
            new = _drop_tex_verdict(new)
        assert new == old, name
    old_md = (GOLDEN / "report.md").read_text().split("## Zeroed filters")[0]
    new_md = _drop_md_verdicts((out / "report.md").read_text()).split("## Zeroed filters")[0]
    assert f"| {NO_BASELINE} | {NO_BASELINE} |" in new_md  # resnet20 PGT: no baseline at all
    new_md = new_md.replace(f"| {NO_BASELINE} | {NO_BASELINE} |", "| — | — |")
    assert new_md.splitlines()[2].startswith(CELL_LEGEND)
    new_md = new_md.replace(new_md.splitlines()[2], OLD_LEGEND)
    assert new_md == old_md


def test_the_legend_says_what_a_cell_is(tmp_path: Path, capsys) -> None:
    out = _report(seeds_only_store(tmp_path / "results"), tmp_path / "rep", "--formats", "md,html")
    capsys.readouterr()
    assert "one configuration; mean ± sample std over its seeds" in (out / "report.md").read_text()
    assert (
        "one configuration; mean ± sample std over its seeds" in (out / "report.html").read_text()
    )


# ------------------------------------------------------------- configurations apart
# (label, config overrides, seeds, test accuracies by seed): made-up results
LR = [
    ("baseline lr 0.1", "baseline", {"lr": 0.1}, {0: 90.0, 1: 91.0, 2: 89.5}),
    ("baseline lr 0.01", "baseline", {"lr": 0.01}, {0: 48.6, 1: 52.0}),
    ("pgt lr 0.1", "pgt", {"lr": 0.1}, {0: 91.0, 1: 91.5, 2: 90.0}),
    ("pgt lr 0.01", "pgt", {"lr": 0.01}, {0: 55.0, 1: 57.5}),
]
GC = [
    ("baseline", "baseline", {}, {0: 80.0, 1: 81.0, 2: 80.5}),
    ("gc 1.0", "gc", {"method__gc_max_norm": 1.0}, {0: 80.5, 1: 81.5, 2: 80.0}),
    ("gc 0.1", "gc", {"method__gc_max_norm": 0.1}, {0: 33.0, 1: 35.0}),
]


def _piece(strength: float) -> dict:
    return {"method__grad": [{"_target_": "mylab.grads.centralize_", "strength": strength}]}


CUSTOM = [
    ("baseline", "baseline", {}, {0: 70.0, 1: 71.0}),
    ("strength 1.0", "baseline", _piece(1.0), {0: 72.0, 1: 73.0, 2: 71.0}),
    ("strength 0.5", "baseline", _piece(0.5), {0: 60.0}),
]
# held out: weight decay, on both sides; PGT at weight decay 0 has no baseline to match
WD = [
    ("baseline wd 5e-4", "baseline", {"weight_decay": 5e-4}, {0: 75.0, 1: 76.0}),
    ("pgt wd 5e-4", "pgt", {"weight_decay": 5e-4}, {0: 77.0, 1: 77.5}),
    ("pgt wd 0", "pgt", {"weight_decay": 0.0}, {0: 60.0, 1: 61.0}),
]


def _store(root: Path, cases: list, epochs: int = 2) -> Path:
    root.mkdir(parents=True)
    store = Store(f"sqlite:///{root / 'results.db'}")
    try:
        for _, method, over, tests in cases:
            for seed, test in tests.items():
                add_run(store, make_config(method, 0.25, epochs=epochs, seed=seed, **over),
                        test=test, train=test + 1)  # fmt: skip
    finally:
        store.dispose()
    return root


def _lines(rows: list[dict[str, str]], **want: str) -> list[dict[str, str]]:
    return [
        r for r in rows if r["metric"] == "test_acc" and all(r[k] == v for k, v in want.items())
    ]


def _resolved(lr: float) -> float:
    """The lr a run records (linear scaling: batch 64 of the reference 256)."""
    return lr * 64 / 256


def _check_cell(row: dict[str, str], tests: dict[int, float]) -> None:
    vals = list(tests.values())
    assert int(row["n"]) == len(vals)
    assert float(row["mean"]) == pytest.approx(statistics.mean(vals), abs=1e-9)
    if len(vals) > 1:
        assert float(row["std"]) == pytest.approx(statistics.stdev(vals), abs=1e-9)
    else:
        assert row["std"] == ""


def _check_paired(row: dict[str, str], treat: dict[int, float], base: dict[int, float]) -> None:
    seeds = sorted(treat)
    assert sorted(base) == seeds and row["ci_method"] == "paired"
    res = sps.ttest_rel([treat[s] for s in seeds], [base[s] for s in seeds])
    lo, hi = res.confidence_interval(0.95)
    assert float(row["diff"]) == pytest.approx(statistics.mean(treat[s] - base[s] for s in seeds))
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((lo, hi))


def test_two_learning_rates_are_two_rows_each_with_its_own_baseline(tmp_path: Path, capsys) -> None:
    out = _report(_store(tmp_path / "r", LR), tmp_path / "rep")
    md = capsys.readouterr().out
    for table in ("table1_baseline_vs_pgt", "table2_batch_size"):
        rows = _csv(out / f"{table}.csv")
        assert "lr" in rows[0]
        cases = {label: (over["lr"], tests) for label, _, over, tests in LR}
        for label, (lr, tests) in cases.items():
            (row,) = _lines(rows, method=label.split()[0], lr=repr(_resolved(lr)))
            _check_cell(row, tests)
        for lr in (0.1, 0.01):
            (row,) = _lines(rows, method="pgt", lr=repr(_resolved(lr)))
            _check_paired(row, cases[f"pgt lr {lr}"][1], cases[f"baseline lr {lr}"][1])
    rows = _csv(out / "table3_ablation.csv")
    assert len(_lines(rows)) == 4 and "lr" in rows[0]
    # the issue's report: the two learning rates pooled as "69.31 ± 29.27 (2)"
    assert " (5) |" not in md and "| 0.0025 |" in md and "| lr |" in md


def test_two_clipping_thresholds_are_two_gc_rows(tmp_path: Path, capsys) -> None:
    out = _report(_store(tmp_path / "r", GC), tmp_path / "rep")
    capsys.readouterr()
    rows = _csv(out / "table2_batch_size.csv")
    assert "method.gc_max_norm" in rows[0] and "lr" not in rows[0]
    base = GC[0][3]
    for _, _, over, tests in GC[1:]:
        (row,) = _lines(
            rows, method="gc", **{"method.gc_max_norm": repr(over["method__gc_max_norm"])}
        )
        _check_cell(row, tests)
        if len(tests) == 3:
            _check_paired(row, tests, base)
        else:  # seeds 0, 1 against the baseline's 0, 1, 2: Welch
            assert row["ci_method"] == "welch"
    (row,) = _lines(rows, method="baseline")
    assert row["method.gc_max_norm"] == "" and row["n"] == "3"
    # Table 1 shows no gc row, so no gc column either
    assert "method.gc_max_norm" not in _csv(out / "table1_baseline_vs_pgt.csv")[0]


def test_a_custom_pieces_knobs_are_two_rows(tmp_path: Path, capsys) -> None:
    out = _report(_store(tmp_path / "r", CUSTOM), tmp_path / "rep")
    capsys.readouterr()
    rows = _csv(out / "table2_batch_size.csv")
    assert "method.grad.strength" in rows[0]
    for _, _, over, tests in CUSTOM[1:]:
        strength = over["method__grad"][0]["strength"]
        (row,) = _lines(rows, method="centralize", **{"method.grad.strength": repr(strength)})
        _check_cell(row, tests)  # n 3 and 1, never 4
    (row,) = _lines(rows, method="centralize", **{"method.grad.strength": "1.0"})
    assert row["ci_method"] == "welch"  # seeds 0-2 vs the baseline's 0-1


def test_a_treatment_without_a_matching_baseline_says_so(tmp_path: Path, capsys) -> None:
    """Held out: weight decay. PGT at weight decay 0 is not compared with the baseline at
    5e-4 (the only one there is): its Δ says "no baseline"."""
    out = _report(_store(tmp_path / "r", WD), tmp_path / "rep")
    md = capsys.readouterr().out
    rows = _csv(out / "table1_baseline_vs_pgt.csv")
    assert "weight_decay" in rows[0]
    (row,) = _lines(rows, method="pgt", weight_decay="0.0")
    _check_cell(row, WD[2][3])
    assert row["diff"] == row["ci_low"] == row["ci_high"] == ""
    (row,) = _lines(rows, method="pgt", weight_decay="0.0005")
    _check_paired(row, WD[1][3], WD[0][3])
    (row,) = _lines(rows, method="baseline", weight_decay="0.0")
    assert row["n"] == "0"  # the missing baseline cell of that setting
    line = next(x for x in md.splitlines() if "| pgt |" in x and "| 0 |" in x)
    assert line.count(NO_BASELINE) == 2


def test_zeroed_filters_and_excluded_runs_by_configuration(tmp_path: Path, capsys) -> None:
    root = tmp_path / "r"
    root.mkdir()
    store = Store(f"sqlite:///{root / 'results.db'}")
    zeros = {(0.1, 0): 1, (0.1, 1): 3, (0.01, 0): 5, (0.01, 1): 8}
    try:
        for (lr, seed), z in zeros.items():
            add_run(store, make_config("pgt", 0.25, epochs=2, lr=lr, seed=seed),
                    filters=[(1, "conv1", 16, z)])  # fmt: skip
        for lr in (0.1, 0.01):
            add_run(store, make_config("pgt", 0.25, epochs=2, lr=lr, seed=9), RunStatus.failed,
                    error="RuntimeError: out of memory")  # fmt: skip
    finally:
        store.dispose()
    out = _report(root, tmp_path / "rep")
    capsys.readouterr()
    with (out / "zeroed_filters.csv").open(newline="") as f:
        zrows = list(csv.DictReader(f))
    assert len(zrows) == 2 and "lr" in zrows[0]
    for lr in (0.1, 0.01):
        (z,) = [r for r in zrows if float(r["lr"]) == _resolved(lr)]
        want = [n for (l_, _), n in zeros.items() if l_ == lr]
        assert float(z["zeroed (mean)"]) == pytest.approx(statistics.mean(want))
        assert int(z["zeroed (max)"]) == max(want) and z["runs"] == "2"
    ex = _csv(out / "excluded_runs.csv")
    assert [r["lr"] for r in ex] == [repr(_resolved(0.1)), repr(_resolved(0.01))]


def test_alpha_figures_and_the_sweep_summary_by_configuration(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    url = f"sqlite:///{root / 'results.db'}"
    store = Store(url)
    acc = {}
    try:
        sweep = store.create_sweep("lrs", "-m lr=0.1,0.01 alpha=0.1,0.25 seed=0,1", "local", 12)
        for lr in (0.1, 0.01):
            for seed in (0, 1):
                rid = add_run(store, make_config("baseline", 0.25, epochs=2, lr=lr, seed=seed))
                store.link_run(sweep.id, rid, f"method=baseline lr={lr} seed={seed}")
                for a in (0.1, 0.25):
                    acc[(lr, a, seed)] = 50 + 300 * lr + 10 * a + seed
                    rid = add_run(store, make_config("pgt", a, epochs=2, lr=lr, seed=seed),
                                  test=acc[(lr, a, seed)])  # fmt: skip
                    store.link_run(sweep.id, rid, f"method=pgt lr={lr} alpha={a} seed={seed}")
        runs = load_runs(store, RunFilter())
        summary = summarize_sweep(store, sweep.id)
    finally:
        store.dispose()
    series = alpha_series(runs)
    assert len(series) == 2
    for s in series:
        ((key, resolved),) = s.group.extra
        lr = min((0.1, 0.01), key=lambda x: abs(_resolved(x) - resolved))
        assert key == "lr" and s.n == [2, 2]
        for a, mean in zip(s.alphas, s.test_mean, strict=True):
            assert mean == pytest.approx(statistics.mean(acc[(lr, a, sd)] for sd in (0, 1)))
    # the parent's summary: one row per configuration (seeds together), 6 of them
    assert len(summary.rows) == 6 and all(r.test.n == 2 for r in summary.rows)
    assert "| lr |" in summary.report
    labels = [r.label for r in summary.rows]
    assert len(set(labels)) == 6


@pytest.mark.slow
def test_store_url_and_results_dir_give_one_report(tmp_path: Path) -> None:
    """``--store-url`` on the same SQLite file: the same files, byte for byte."""
    root = _store(tmp_path / "r", [*LR, *GC[1:]])
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_cli("--results-dir", str(root), "--out", str(a), "--formats", "md,csv,tex",
                  cwd=tmp_path, module="analysis")  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = run_cli("--store-url", f"sqlite:///{root / 'results.db'}", "--out", str(b),
                  "--formats", "md,csv,tex", cwd=tmp_path, module="analysis")  # fmt: skip
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.mark.slow
def test_the_issues_runs_through_the_report_cli(tmp_path: Path, capsys) -> None:
    """The issue's case: ``lr=0.1,0.01 epochs=2`` trained (in this process, as the CLI
    composes them) and ``python -m analysis``: two baseline rows, each its own run's
    accuracy with n = 1 (the issue saw them pooled as one cell of n = 2)."""
    from helpers import train

    for lr in ("0.1", "0.01"):
        out = train(f"lr={lr}", "epochs=2", "mlflow.enabled=false", f"results_dir={tmp_path}")
        assert out.status == "done"
    db = tmp_path / "results.db"
    con = sqlite3.connect(db)
    try:
        got = {json.loads(c)["lr"]: t for c, t in con.execute("SELECT config, test_acc FROM runs")}
    finally:
        con.close()
    assert len(got) == 2
    _report(tmp_path, tmp_path / "rep")
    capsys.readouterr()
    rows = _lines(_csv(tmp_path / "rep" / "table1_baseline_vs_pgt.csv"), method="baseline")
    # the lr column is the resolved lr (linear scaling: batch 64 of 256)
    shown = sorted((float(r["lr"]), float(r["mean"]), int(r["n"])) for r in rows)
    want = sorted((_resolved(lr), acc, 1) for lr, acc in got.items())
    assert [pytest.approx(x) for x in shown] == want
