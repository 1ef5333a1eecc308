"""Verdicts (issue 24): every comparison says better, worse, equivalent, unresolved (with the
seeds that would resolve it) or too few seeds.

* the interval and P(improvement) against SciPy and a plain computation written here;
* the error rates the docs state, by simulation of thousands of synthetic families through
  the module's own array functions (``-k simulation -s`` prints the measured rates);
* the report, verdicts.csv, the CLI's bad input and the notebook API on hand-made stores;
  end to end through the CLI on digits (slow).
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, cli_env, run_cli
from report_stores import add_run, make_config, seeds_only_store
from scipy import stats as sps

from analysis.__main__ import main
from analysis.comparisons import sweep_verdicts
from analysis.configs import config_key
from analysis.inference import (
    EQUIVALENT,
    TOO_FEW,
    UNRESOLVED,
    classify,
    compare,
    family_confidence,
    paired_intervals,
    resolve_power,
    seeds_needed,
    stein_n,
    welch_intervals,
)
from analysis.queries import RunFilter, load_runs, open_store
from analysis.render import VERDICT_COLUMNS, verdict_line
from sweeper.store import Store

RNG = np.random.default_rng(20240)


def _pairs(values: list[float], seeds: list[int] | None = None) -> list[tuple[int, float]]:
    return list(zip(seeds or range(len(values)), values, strict=True))


# ------------------------------------------------------------ against SciPy
@pytest.mark.parametrize("m", [1, 3, 7])
def test_paired_interval_is_scipys_at_the_familys_level(m: int) -> None:
    t = [81.2, 80.4, 82.0, 81.7, 80.9]
    b = [80.1, 80.6, 80.9, 80.2, 80.8]
    c = compare(_pairs(t), _pairs(b), family_size=m)
    conf = 1 - 0.05 / m
    ref = sps.ttest_rel(t, b).confidence_interval(conf)
    assert c.paired and c.confidence == pytest.approx(conf)
    assert c.diff == pytest.approx(np.mean(np.subtract(t, b)), abs=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx((ref.low, ref.high), abs=1e-10)


def test_welch_interval_is_scipys_when_the_seeds_differ() -> None:
    t, b = [70.0, 71.5, 69.0, 72.2], [68.0, 69.9, 70.1]
    c = compare(_pairs(t, [3, 4, 5, 6]), _pairs(b), family_size=4)
    ref = sps.ttest_ind(t, b, equal_var=False).confidence_interval(1 - 0.05 / 4)
    assert not c.paired
    assert (c.ci_low, c.ci_high) == pytest.approx((ref.low, ref.high), abs=1e-10)


def test_p_improvement_paired_counts_seeds_and_its_interval_is_clopper_pearson() -> None:
    t = [81.0, 80.0, 82.0, 80.5, 79.0, 81.0]
    b = [80.0, 80.5, 81.0, 80.5, 79.5, 80.0]  # wins at seeds 0, 2, 5; a tie at seed 3
    c = compare(_pairs(t), _pairs(b), family_size=2)
    wins = sum(x > y for x, y in zip(t, b, strict=True))
    ties = sum(x == y for x, y in zip(t, b, strict=True))
    assert (wins, ties) == (3, 1)
    assert c.p_improve == pytest.approx((wins + ties / 2) / len(t))
    lo = sps.binomtest(wins, len(t)).proportion_ci(c.confidence, "exact").low
    hi = sps.binomtest(wins + ties, len(t)).proportion_ci(c.confidence, "exact").high
    assert (c.p_low, c.p_high) == pytest.approx((lo, hi), abs=1e-10)


def test_p_improvement_unpaired_is_mann_whitney_u_over_all_pairs() -> None:
    t, b = [70.0, 71.5, 69.0, 72.2, 70.0], [68.0, 70.0, 70.1]
    c = compare(_pairs(t, [5, 6, 7, 8, 9]), _pairs(b))
    u = sps.mannwhitneyu(t, b).statistic
    assert c.p_improve == pytest.approx(u / (len(t) * len(b)))
    assert c.pairs == 15 and 0 <= c.p_low <= c.p_improve <= c.p_high <= 1


def test_lower_is_better_for_a_loss() -> None:
    t, b = [0.50, 0.52, 0.49], [0.80, 0.81, 0.83]
    c = compare(_pairs(t), _pairs(b), metric="test_loss", margin=0.01)
    assert c.verdict == "better" and c.diff < 0 and c.p_improve == 1.0


# ------------------------------------------------------------------ the rules
def test_the_verdict_rules() -> None:
    base = _pairs([80.0, 80.4, 79.8, 80.1])
    up = _pairs([81.0, 81.5, 80.9, 81.0])
    assert compare(up, base).verdict == "better"
    assert compare(base, up).verdict == "worse"
    # identical runs: zero spread, a point interval at 0 -> equivalent, not an error
    same = compare(base, base)
    assert same.verdict == EQUIVALENT and (same.ci_low, same.ci_high) == (0.0, 0.0)
    # a small sure difference is still equivalent, and its line says the interval excludes 0
    tiny = compare(_pairs([80.1, 80.5, 79.9, 80.2]), _pairs([80.0, 80.39, 79.8, 80.1]))
    assert tiny.verdict == EQUIVALENT and tiny.excludes_zero
    # a wide interval across 0: unresolved, with the seeds that would resolve it
    wide = compare(_pairs([81.0, 79.0, 82.0]), _pairs([80.0, 80.5, 80.0]))
    assert wide.verdict == UNRESOLVED and wide.seeds_needed > 3
    one = compare(_pairs([81.0]), _pairs([80.0, 80.5]))
    assert one.verdict == TOO_FEW and one.ci_low is None and one.seeds_needed is None


def test_a_verdict_line_reads_as_the_issue_shows_it() -> None:
    from analysis.comparisons import Judged

    c = compare(_pairs([81.0, 81.5, 80.9, 81.0, 81.2]), _pairs([80.6, 81.0, 80.5, 80.7, 80.7]))
    j = Judged("t", "resnet20 · cifar10 · b128", "pgt α=0.25", "baseline", (), "k", c, "test",
               (0, ""))  # fmt: skip
    line = verdict_line(j)
    assert re.fullmatch(r"pgt α=0\.25 vs baseline — resnet20 · cifar10 · b128: \+0\.42 pp "
                        r"\[\+0\.\d\d, \+0\.\d\d\], P\(better\) 1\.00 \[0\.\d\d, 1\.00\] "
                        r"\(5/5 seeds\) → better", line), line  # fmt: skip


def test_seeds_needed_is_where_the_power_crosses_80_percent() -> None:
    conf = family_confidence(7)
    n = seeds_needed(0.5, 1.0, 0.2, conf)
    assert resolve_power(n, 0.5, 1.0, 0.2, conf) >= 0.8 > resolve_power(n - 1, 0.5, 1.0, 0.2, conf)
    assert seeds_needed(0.0, 1.0, 0.0, conf) is None  # no difference, no margin: never
    # Stein: max(n0, ceil((t_{n0-1} s / h)^2))
    t = sps.t.ppf(0.975, 4)
    assert stein_n(1.3, 5, 0.5) == max(5, math.ceil((t * 1.3 / 0.5) ** 2))


# ------------------------------------------------------------------ simulation
SIMS = 20_000  # families per scenario; the rates below are measured with these


def _aa_rate(m: int, n: int, sd: float, paired: bool, corrected: bool = True) -> float:
    """Share of A/A families (no true difference) with any comparison called better/worse."""
    conf = family_confidence(m) if corrected else 0.95
    seed_effect = RNG.normal(0, sd, (SIMS, 1, n))  # what a seed does to both sides
    base = seed_effect[:, 0] + RNG.normal(0, sd, (SIMS, n))
    treat = (seed_effect if paired else 0) + RNG.normal(0, sd, (SIMS, m, n))
    if paired:
        _, lo, hi = paired_intervals(treat - base[:, None, :], conf)
    else:
        _, lo, hi = welch_intervals(treat, base[:, None, :], conf)
    v = classify(lo, hi, 0.2)
    return float(np.mean(np.any((v == "better") | (v == "worse"), axis=1)))


def test_aa_families_are_called_better_or_worse_at_most_5_percent_simulation() -> None:
    rates = {
        "paired m=7 n=5": _aa_rate(7, 5, 1.0, True),
        "paired m=3 n=3": _aa_rate(3, 3, 1.0, True),
        "welch m=7 n=5": _aa_rate(7, 5, 1.0, False),
        "paired m=7 n=5, uncorrected": _aa_rate(7, 5, 1.0, True, corrected=False),
    }
    print("\nA/A family-wise better/worse rate:", {k: round(v, 4) for k, v in rates.items()})
    se = math.sqrt(0.05 * 0.95 / SIMS)
    for k, v in rates.items():
        if "uncorrected" not in k:
            assert v <= 0.05 + 3 * se, (k, v)
    assert rates["paired m=7 n=5, uncorrected"] > 0.15  # why the family is corrected


def _resolved_rate(
    diff: float, sd_t: float, sd_b: float, m: int, paired: bool
) -> tuple[int, float]:
    """Seeds needed at the true difference and spread, and the share of fresh experiments
    with that many seeds per side whose verdict is resolved."""
    conf = family_confidence(m)
    if paired:
        sd, df_factor = math.hypot(sd_t, sd_b), 1.0
    else:
        v = sd_t**2 + sd_b**2
        sd, df_factor = math.sqrt(v), v**2 / (sd_t**4 + sd_b**4)
    n = seeds_needed(diff, sd, 0.2, conf, df_factor=df_factor)
    t = diff + RNG.normal(0, sd_t, (SIMS, n))
    b = RNG.normal(0, sd_b, (SIMS, n))
    _, lo, hi = paired_intervals(t - b, conf) if paired else welch_intervals(t, b, conf)
    return n, float(np.mean(classify(lo, hi, 0.2) != UNRESOLVED))


def test_seeds_needed_resolve_a_true_difference_80_percent_simulation() -> None:
    cases = {
        "paired +0.5 pp, sd 1.0/side, m=7": (0.5, 1.0, 1.0, 7, True),
        "paired -1.0 pp, sd 1.5/side, m=1": (-1.0, 1.5, 1.5, 1, True),
        "paired +0.05 pp (equivalence), sd 0.2/side, m=7": (0.05, 0.2, 0.2, 7, True),
        "welch +0.8 pp, sd 1.0 / 0.5, m=3": (0.8, 1.0, 0.5, 3, False),
    }
    rates = {k: _resolved_rate(*v) for k, v in cases.items()}
    print("\n(seeds needed, resolved share):", rates)
    for k, (_, rate) in rates.items():
        assert rate >= 0.78, (k, rate)


# ------------------------------------------------------------------ the report
def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_report_leads_with_verdicts_and_writes_verdicts_csv(tmp_path: Path, capsys) -> None:
    res = seeds_only_store(tmp_path / "results")
    out = tmp_path / "rep"
    assert main(["--results-dir", str(res), "--out", str(out)]) == 0
    capsys.readouterr()
    md = (out / "report.md").read_text()
    assert md.splitlines()[2] == "## Verdicts"
    assert "±0.2 pp" in md and "Bonferroni" in md and "α is chosen on the test set" in md
    rows = _csv(out / "verdicts.csv")
    assert list(rows[0]) == VERDICT_COLUMNS
    assert {r["selected_on"] for r in rows} == {"test"}
    t1 = [r for r in rows if r["table"] == "table1_baseline_vs_pgt"]
    # digits cosine b64: every PGT α (0.1, 0.25, 0.5) is judged, one family of 3
    fam = [r for r in t1 if r["setting"].startswith("digits_cnn · digits · b64 · 3 ep · cosine")]
    assert sorted(r["treatment"] for r in fam) == ["pgt α=0.1", "pgt α=0.25", "pgt α=0.5"]
    assert {r["family_size"] for r in fam} == {"3"}
    for r in fam:  # the numbers are the module's, at the family's level
        assert float(r["confidence"]) == pytest.approx(1 - 0.05 / 3)
        line = next(ln for ln in md.splitlines() if ln.startswith(f"- {r['treatment']} vs")
                    and r["setting"] in ln)  # fmt: skip
        assert f"→ {r['verdict']}" in line
    # the table shows the best α with its family's verdict; the tables have notes
    t1_rows = _csv(out / "table1_baseline_vs_pgt.csv")
    best = next(r for r in t1_rows if r["method"] == "pgt" and r["batch_size"] == "64"
                and r["schedule"] == "cosine" and r["epochs"] == "3")  # fmt: skip
    assert best["verdict"] == next(r["verdict"] for r in fam if r["treatment"] == "pgt α=0.25")
    assert "α chosen on the test set" in md
    assert (out / "zeroed_filters.tex").read_text().count("\\toprule") == 1
    html = (out / "report.html").read_text()
    assert html.index('id="verdicts"') < html.index('id="t1"')
    # agc has 1 seed: too few; znorm's seeds differ from the baseline's: Welch
    t2 = {r["treatment"]: r for r in rows if r["table"] == "table2_batch_size"
          and "b64 · 3 ep · cosine" in r["setting"]}  # fmt: skip
    assert t2["agc"]["verdict"] == TOO_FEW and t2["znorm"]["paired"] == "false"


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--margin", "-1"], "--margin must be a number >= 0"),
     (["--margin", "abc"], "--margin must be a number >= 0"),
     (["--metric", "nope"], "unknown --metric 'nope'; choose from test_acc")],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, args, says,
                                                     capsys) -> None:  # fmt: skip
    """The first case through a real ``python -m analysis`` process; the others through the
    same entry (:func:`analysis.__main__.main`, which the process's ``sys.exit`` calls, with
    its error boundary) in this process: the same status, line and untouched output dir."""
    res = seeds_only_store(tmp_path / "results") if args[0] == "--metric" else tmp_path / "r"
    out = tmp_path / "out"
    argv = ["--results-dir", str(res), "--out", str(out), *args]
    if args == ["--margin", "-1"]:
        proc = subprocess.run([sys.executable, "-m", "analysis", *argv], cwd=REPO, env=cli_env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        code, err = proc.returncode, proc.stderr
    else:
        capsys.readouterr()
        code, err = main(argv), capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), lines
    assert not out.exists()


def test_the_metric_option_judges_another_metric(tmp_path: Path, capsys) -> None:
    res = seeds_only_store(tmp_path / "results")
    out = tmp_path / "rep"
    assert main(["--results-dir", str(res), "--out", str(out), "--formats", "csv",
                 "--metric", "test_loss", "--margin", "0.05"]) == 0  # fmt: skip
    capsys.readouterr()
    rows = _csv(out / "verdicts.csv")
    assert rows and {r["metric"] for r in rows} == {"test_loss"}
    assert {r["margin"] for r in rows} == {"0.05"}


def test_sweep_verdicts_name_configurations_as_the_sweep_summary_does(tmp_path: Path) -> None:
    res = seeds_only_store(tmp_path / "results")
    store = open_store(f"sqlite:///{res / 'results.db'}")
    try:
        runs = load_runs(store, RunFilter([], [], [], []))
    finally:
        store.dispose()
    sv = sweep_verdicts(runs)
    keys = {config_key(r.config["identity"]) for r in runs if r.method != "baseline"}
    assert set(sv.by_config) <= keys and len(sv.lines) == len(sv.by_config)
    assert any("→ " in ln for ln in sv.lines)


# ------------------------------------------------------------------ notebook
def _notebook_code() -> str:
    text = (REPO / "docs" / "notebook.md").read_text(encoding="utf-8")
    return "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))


def test_the_notebook_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/notebook.md's code, as written, on a results dir in the working directory."""
    seeds_only_store(tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_notebook_code(), "docs/notebook.md", "exec"), scope)  # noqa: S102
    runs, v = scope["runs"], scope["v"]
    assert len(runs) == 37 and {"config_key", "status", "test_acc", "gpu_hours"} <= set(runs)
    assert list(v.columns) == VERDICT_COLUMNS and len(v) > 0


def test_the_notebook_api_takes_a_url_and_imports_pandas_only_when_called(tmp_path: Path) -> None:
    res = seeds_only_store(tmp_path / "results")
    code = ("import sys, analysis; from analysis.__main__ import parser; parser(); "
            "assert 'pandas' not in sys.modules; "
            f"from analysis import load_runs, verdicts; "
            f"r = load_runs('sqlite:///{res}/results.db', method=['gc']); "
            "print(len(r), sorted(set(r.method)), 'pandas' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["4", "['gc']", "True"]


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_harmful_method_is_worse_and_an_identical_one_equivalent_on_digits(
    tmp_path: Path,
) -> None:
    """Through the real CLI: GC clipping the global norm at 1e-4 cripples training (worse);
    at 1e9 it never clips, so it trains exactly as the baseline (equivalent, zero spread).
    Two epochs: the crippled runs stay near chance while the baseline passes 80 %, and the
    identical ones are identical at any length."""
    common = ["seed=0,1,2", "epochs=2", "mlflow.enabled=false"]
    for method in (["method=baseline"], ["method=gc", "method.gc_max_norm=1e-4"],
                   ["method=gc", "method.gc_max_norm=1e9"]):  # fmt: skip
        res = run_cli("-m", *method, *common, cwd=tmp_path, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rep = run_cli("--out", str(tmp_path / "rep"), cwd=tmp_path, module="analysis")
    assert rep.returncode == 0, rep.stderr[-2000:]
    rows = {r["treatment"]: r for r in _csv(tmp_path / "rep" / "verdicts.csv")}
    harm, same = rows["gc method.gc_max_norm=0.0001"], rows["gc method.gc_max_norm=1e+09"]
    assert harm["verdict"] == "worse" and float(harm["ci_high"]) < 0, harm
    assert same["verdict"] == "equivalent" and float(same["diff"]) == 0.0, same
    assert harm["n_treatment"] == harm["n_baseline"] == "3" and harm["paired"] == "true"
    assert "→ worse" in rep.stdout and "→ equivalent" in rep.stdout
    from analysis import load_epochs, load_runs

    runs = load_runs(tmp_path / "results")
    epochs = load_epochs(tmp_path / "results", runs[runs.method == "gc"])
    assert len(runs) == 9 and len(epochs) == 6 * 2 and set(epochs.epoch) == {0, 1}


def test_identical_results_are_equivalent_through_the_cli(tmp_path: Path) -> None:
    """Two configurations with the same value at every seed: zero spread, equivalent."""
    res = tmp_path / "results"
    res.mkdir()
    store = Store(f"sqlite:///{res / 'results.db'}")
    try:
        for seed in (0, 1):
            add_run(store, make_config("baseline", epochs=2, seed=seed), test=80.0 + seed)
            add_run(store, make_config("pgt", 0.25, epochs=2, seed=seed), test=80.0 + seed)
    finally:
        store.dispose()
    proc = run_cli("--results-dir", str(res), "--formats", "csv", cwd=tmp_path, module="analysis")
    assert proc.returncode == 0, proc.stderr
    rows = _csv(res / "report" / "verdicts.csv")
    assert [r["verdict"] for r in rows if r["table"] == "table1_baseline_vs_pgt"] == [EQUIVALENT]


PILOTS = 200  # unresolved pilots per case (each a seeds-needed search: about 1 s per 100)


def _pilot_rate(diff: float, sd: float, n0: int, m: int) -> float:
    """Seeds needed computed from each unresolved ``n0``-seed pilot (as the report does), then
    the share of fresh experiments with that many seeds that resolve, averaged over pilots."""
    rng = np.random.default_rng(7)
    conf = family_confidence(m)
    rates = []
    while len(rates) < PILOTS:
        t, b = diff + rng.normal(0, sd, n0), rng.normal(0, sd, n0)
        c = compare(list(enumerate(t)), list(enumerate(b)), family_size=m)
        if c.verdict != UNRESOLVED or c.seeds_needed is None or c.seeds_needed > 2000:
            continue
        d = (
            diff
            + rng.normal(0, sd, (200, c.seeds_needed))
            - rng.normal(0, sd, (200, c.seeds_needed))
        )
        _, lo, hi = paired_intervals(d, conf)
        rates.append(np.mean(classify(lo, hi, 0.2) != UNRESOLVED))
    return float(np.mean(rates))


def test_seeds_needed_from_a_pilot_is_a_first_guess_simulation() -> None:
    """From a pilot the seeds needed take the pilot's noisy difference for the truth: fewer
    resolve than at the true values (the docs state these rates)."""
    rates = {"3-seed pilots, +0.5 pp, sd 1.0, m=7": _pilot_rate(0.5, 1.0, 3, 7),
             "5-seed pilots, +1.0 pp, sd 1.0, m=3": _pilot_rate(1.0, 1.0, 5, 3)}  # fmt: skip
    print(
        "\nresolved at the seeds needed from a pilot:", {k: round(v, 3) for k, v in rates.items()}
    )
    assert (
        0.3
        < rates["3-seed pilots, +0.5 pp, sd 1.0, m=7"]
        < rates["5-seed pilots, +1.0 pp, sd 1.0, m=3"]
    )


def test_an_older_store_reports_its_verdicts_selected_on_test(tmp_path: Path, capsys) -> None:
    """The schema-3 store (no validation columns) opens, reports and judges: one seed each,
    so too few seeds, α chosen on the test set."""
    import shutil

    res = tmp_path / "results"
    shutil.copytree(REPO / "tests" / "fixtures" / "store_v3", res)
    assert main(["--results-dir", str(res), "--formats", "md,csv,tex"]) == 0
    capsys.readouterr()
    rows = _csv(res / "report" / "verdicts.csv")
    assert rows and {r["selected_on"] for r in rows} == {"test"}
    assert {r["verdict"] for r in rows} == {TOO_FEW}
    assert (res / "report" / "zeroed_filters.tex").is_file()
