"""The three paper-style tables (and the excluded-runs list) built from ``done`` runs.

A *cell* is one configuration: the runs that share their whole identity but the seed
(:mod:`analysis.configs`), so only seeds are averaged. Each table shows the columns below;
where its runs differ in keys it does not show (``lr``, ``momentum``, ``method.gc_max_norm``,
``method.grad.strength``...), those keys become extra columns, so two configurations are
two rows. Every table row is one cell, or a missing cell (``present=False``) where the table
expects one, e.g. a PGT arm without runs; missing cells render as "—". A treatment is
compared with the baseline of its own setting: the same configuration in every key but the
method's and α; where no baseline run matches, its Δ says so (``no_baseline``).

* Table 1: per (data, model, epochs, batch_size, schedule), label smoothing 0: baseline
  and PGT (the best alpha by mean test accuracy, a given alpha, or all alphas); PGT rows
  carry the difference vs the baseline.
* Table 2: per (data, model, epochs, schedule, batch_size), label smoothing 0: every
  method (alpha selected as for Table 1 per method) vs the same batch size's baseline.
* Table 3 (ablation): baseline / pgt / ls / ls_pgt per (data, model, epochs, batch_size,
  schedule, label_smoothing, alpha): train, test and gap (train - test, per run).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.comparisons import ABLATION, Judged, judge
from analysis.configs import (
    Key,
    config_of,
    extra_columns,
    extra_values,
    is_method_key,
    method_of,
    setting_of,
)
from analysis.inference import MARGIN
from analysis.queries import RunRecord
from analysis.stats import Comparison, Summary, compare, summarize

METRICS = ("train_acc", "test_acc")
ABLATION_METHODS = ("baseline", "pgt", "ls", "ls_pgt")
EXCLUDED_STATUSES = ("failed", "diverged", "pruned")  # pruned: stopped early by a search


@dataclass(frozen=True)
class Cost:
    """What a set of runs cost: GPU-hours (sum), CPU-hours (sum, runs without a GPU),
    mean training images/s, peak GPU memory (max, MiB). None where no run recorded it
    (runs from a store older than v3)."""

    gpu_hours: float | None
    cpu_hours: float | None
    images_per_s: float | None
    peak_gpu_mem_mb: float | None
    n: int  # runs counted


def cost_of(runs: Sequence[RunRecord]) -> Cost:
    timed = [r for r in runs if r.train_seconds is not None]
    gpu = [r.gpu_hours or 0.0 for r in timed if (r.gpus or 0) > 0]
    cpu = [(r.train_seconds or 0.0) / 3600 for r in timed if not r.gpus]
    ips = [r.images_per_s for r in runs if r.images_per_s is not None]
    mem = [r.peak_gpu_mem_mb for r in runs if r.peak_gpu_mem_mb is not None]
    return Cost(
        gpu_hours=sum(gpu) if gpu else None,
        cpu_hours=sum(cpu) if cpu else None,
        images_per_s=sum(ips) / len(ips) if ips else None,
        peak_gpu_mem_mb=max(mem) if mem else None,
        n=len(timed),
    )


@dataclass
class Row:
    """One cell of a table: its key columns, its stats per metric and diffs vs baseline."""

    keys: dict[str, object]
    present: bool
    stats: dict[str, Summary] = field(default_factory=dict)
    diffs: dict[str, Comparison | None] = field(default_factory=dict)
    is_baseline: bool = False
    cost: Cost | None = None  # of the cell's runs (all seeds)
    no_baseline: bool = False  # a treatment whose setting has no baseline run: no Δ
    config: Key | None = None  # the cell's configuration (None for a missing cell)
    verdict: Judged | None = None  # vs its setting's baseline, on the report's metric


@dataclass
class Table:
    """A built table: ``key_columns`` name the entries of each row's ``keys``."""

    name: str
    title: str
    key_columns: list[str]
    metrics: list[str]
    compared: bool
    rows: list[Row]
    verdicts: list[Judged] = field(default_factory=list)  # every comparison, all α
    metric: str = "test_acc"  # what the verdicts are on
    note: str = ""  # how α was chosen, and on which split


@dataclass
class Excluded:
    """Failed and diverged runs: never averaged, listed instead."""

    runs: list[RunRecord]
    not_finished: int  # queued, running or interrupted: neither averaged nor listed
    extra: list[str] = field(default_factory=list)  # identity keys shown for each run


def metric_values(runs: Sequence[RunRecord], metric: str) -> list[tuple[int, float]]:
    """(seed, value) of ``metric`` over ``runs`` with a value; ``gap`` = train - test."""
    out: list[tuple[int, float]] = []
    for r in runs:
        if metric == "gap":
            if r.train_acc is not None and r.test_acc is not None:
                out.append((r.seed, r.train_acc - r.test_acc))
        else:
            v = getattr(r, metric)
            if v is not None:
                out.append((r.seed, float(v)))
    return out


def _sort_key(key: Sequence[object]) -> tuple[object, ...]:
    out: list[object] = []
    for k in key:
        if k == "baseline":
            out.append((0, 0, ""))
        elif k is None:
            out.append((1, 0, ""))
        elif isinstance(k, (int, float)):
            out.append((1, 1, k))
        else:
            out.append((1, 2, str(k)))
    return tuple(out)


def _optimizer_col(runs: Sequence[RunRecord]) -> list[str]:
    """``["optimizer"]`` when the runs used more than one optimiser (each is a setting of its
    own, compared with its own baseline); no column for SGD-only stores (the paper's)."""
    return ["optimizer"] if len({r.optimizer for r in runs}) > 1 else []


def _group(runs: Sequence[RunRecord], key: Callable[[RunRecord], Hashable]) -> dict[Any, list]:
    groups: dict[Hashable, list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[key(r)].append(r)
    return dict(groups)


def _mean_of(runs: Sequence[RunRecord], metric: str) -> float:
    s = summarize([v for _, v in metric_values(runs, metric)])
    return -math.inf if s.mean is None else s.mean


def _pick_alphas(alphas: dict[float | None, list[RunRecord]], alpha: str,
                 select_on: str = "test") -> list:  # fmt: skip
    """The alphas to show for one (setting, method): best (by mean top-1 on the
    ``select_on`` split), all, or one value."""
    if None in alphas or alpha == "all":
        return sorted(alphas, key=lambda a: (a is None, a))
    if alpha == "best":
        metric = f"{select_on}_acc"
        return [max(sorted(alphas), key=lambda a: _mean_of(alphas[a], metric))]
    want = float(alpha)
    return [a for a in alphas if math.isclose(a, want, rel_tol=1e-9, abs_tol=1e-12)] or [want]


def _row(
    keys: dict[str, object],
    runs: Sequence[RunRecord] | None,
    base: Sequence[RunRecord] | None,
    metrics: Sequence[str],
    is_baseline: bool,
) -> Row:
    row = Row(keys=keys, present=bool(runs), is_baseline=is_baseline, cost=cost_of(runs or []),
              no_baseline=bool(runs) and not is_baseline and not base,
              config=config_of(runs[0]) if runs else None)  # fmt: skip
    for m in metrics:
        vals = metric_values(runs or [], m)
        row.stats[m] = summarize([v for _, v in vals])
        if not is_baseline:
            row.diffs[m] = compare(vals, metric_values(base or [], m))
    return row


def _compared_table(
    done: Sequence[RunRecord],
    name: str,
    title: str,
    setting_cols: list[str],
    methods: Callable[[list[str]], list[str]],
    alpha: str,
    select_on: str = "test",
) -> Table:
    """Rows per setting × method configuration × alpha, each compared with the baseline of
    its own setting (the same configuration in every key but the method's and α)."""
    runs = [r for r in done if r.label_smoothing == 0]
    setting_cols = [*setting_cols, *_optimizer_col(runs)]
    # keys that tell settings apart beyond the shown columns, then method knobs that tell
    # configurations of one method apart within a setting
    s_extra = extra_columns(runs, setting_cols, lambda k: not is_method_key(k))
    shown_methods = {"baseline", *methods(sorted({r.method for r in runs}))}
    m_extra = extra_columns([r for r in runs if r.method in shown_methods], ["method"],
                            lambda k: is_method_key(k) and k != "alpha", within=setting_of)  # fmt: skip
    by_setting = _group(runs, setting_of)

    def shown(setting: Key) -> tuple[object, ...]:
        r = by_setting[setting][0]
        return (*(getattr(r, c) for c in setting_cols), *extra_values(r, s_extra).values())

    rows: list[Row] = []
    for setting in sorted(by_setting, key=lambda s: (_sort_key(shown(s)), repr(s))):
        first = by_setting[setting][0]
        keys = {
            **{c: getattr(first, c) for c in setting_cols},
            **extra_values(first, s_extra),
        }
        cells = _group(by_setting[setting], lambda r: (r.method, method_of(r), r.alpha))
        present = sorted({m for m, _, _ in cells})
        base = next((rs for (m, _, _), rs in cells.items() if m == "baseline"), None)
        for method in ["baseline", *[m for m in methods(present) if m != "baseline"]]:
            configs = _group([r for (m, _, _), rs in cells.items() if m == method for r in rs],
                             method_of)  # fmt: skip
            if method == "baseline" or not configs:
                configs = {(): (base or []) if method == "baseline" else []}
            for mkey in sorted(configs, key=lambda k: _sort_key(_mvalues(configs[k], m_extra))):
                alphas = _group(configs[mkey], lambda r: r.alpha)
                if not alphas:
                    alphas = {None: []}
                knobs = dict(zip(m_extra, _mvalues(configs[mkey], m_extra), strict=True))
                for a in _pick_alphas(alphas, alpha, select_on):
                    k = {**keys, "method": method, "alpha": a, **knobs}
                    rows.append(_row(k, alphas.get(a), base, METRICS, method == "baseline"))
    cols = [*setting_cols, *s_extra, "method", "alpha", *m_extra]
    return Table(name, title, cols, list(METRICS), True, rows)


def _mvalues(runs: Sequence[RunRecord] | None, extra: Sequence[str]) -> tuple[object, ...]:
    """The method-side extra columns' values of a cell's runs (None for an empty cell)."""
    if not runs:
        return tuple(None for _ in extra)
    return tuple(extra_values(runs[0], extra).values())


def table1(done: Sequence[RunRecord], alpha: str = "best", select_on: str = "test") -> Table:
    """Baseline vs PGT per (data, model, epochs, batch_size, schedule)."""
    return _compared_table(
        done,
        "table1_baseline_vs_pgt",
        "Table 1: baseline vs PGT",
        ["data", "model", "epochs", "batch_size", "schedule"],
        lambda present: ["pgt"],
        alpha,
        select_on,
    )


def table2(done: Sequence[RunRecord], alpha: str = "best", select_on: str = "test") -> Table:
    """Every method vs the same batch size's baseline, per model."""
    return _compared_table(
        done,
        "table2_batch_size",
        "Table 2: methods vs baseline per batch size",
        ["data", "model", "epochs", "schedule", "batch_size"],
        lambda present: present,
        alpha,
        select_on,
    )


def table3(done: Sequence[RunRecord]) -> Table:
    """Ablation: schedule × label smoothing × alpha, with the train - test gap."""
    runs = [r for r in done if r.method in ABLATION_METHODS]
    cols = ["data", "model", "epochs", "batch_size", "schedule", *_optimizer_col(runs),
            "label_smoothing", "alpha"]  # fmt: skip
    extra = extra_columns(runs, cols)
    cells = _group(runs, config_of)

    def shown(k: Key) -> tuple[object, ...]:
        r = cells[k][0]
        return (*(getattr(r, c) for c in cols), *extra_values(r, extra).values())

    metrics = [*METRICS, "gap"]
    rows = [
        _row(dict(zip([*cols, *extra], shown(k), strict=True)), cells[k], None, metrics, True)
        for k in sorted(cells, key=lambda k: (_sort_key(shown(k)), repr(k)))
    ]
    return Table("table3_ablation", "Table 3: ablation", [*cols, *extra], metrics, False, rows)


def excluded(runs: Sequence[RunRecord]) -> Excluded:
    """Failed / diverged / pruned runs, and how many are still queued or running; ``extra``:
    the identity keys that tell apart excluded runs of one model, method and α."""
    bad = [r for r in runs if r.status in EXCLUDED_STATUSES]
    waiting = sum(1 for r in runs if r.status in ("queued", "running", "interrupted"))
    return Excluded(bad, waiting, extra_columns(bad, ["model", "method", "alpha"]))


SPLITS = {"test": "the test set", "val": "the validation split"}
SELECT_ON = ("auto", "test", "val")


def split_for(runs: Sequence[RunRecord], select_on: str = "auto") -> str:
    """The split a table's α is chosen on: ``auto`` picks ``val`` when every one of its
    runs has a validation result (``data.val_split``), else ``test`` (older stores, runs
    without one: the selection is then on the data the verdict is on, which the family's
    simultaneous intervals account for)."""
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on={select_on!r}; expected one of {', '.join(SELECT_ON)}")
    if select_on != "auto":
        return select_on
    return "val" if runs and all(r.val_acc is not None for r in runs) else "test"


def _judge_table(t: Table, done: Sequence[RunRecord], metric: str, margin: float,
                 select_on: str, alpha: str) -> None:  # fmt: skip
    """Attach the verdicts of ``t``'s comparisons (:mod:`analysis.comparisons`) to the
    table and to its rows, and the note on how α was chosen."""
    if t.name == "table3_ablation":
        judged = judge(done, t.name, lambda r: r.method in ABLATION, metric, margin, select_on)
    else:
        ls0 = [r for r in done if r.label_smoothing == 0]
        pgt_only = t.name == "table1_baseline_vs_pgt"
        judged = judge(ls0, t.name, lambda r: not pgt_only or r.method == "pgt", metric,
                       margin, select_on)  # fmt: skip
    t.verdicts, t.metric = judged, metric
    by_config = {j.config: j for j in judged}
    for row in t.rows:  # baseline rows are in no family: no verdict
        row.verdict = by_config.get(row.config) if row.config is not None else None
    n = len({j.family for j in judged})
    sizes = " / ".join(map(str, sorted({j.result.family_size for j in judged})))
    fams = f"{n} {'family' if n == 1 else 'families'} of {sizes}"
    chosen = (f"α chosen on {SPLITS.get(select_on, select_on)} (best mean top-1 per method); "
              if alpha == "best" and t.compared else "")  # fmt: skip
    t.note = (f"{chosen}verdicts on {metric}: {fams} comparison(s) against one baseline each, "
              "intervals simultaneous at 95 % per family (Bonferroni), every α counted"
              if judged else "")  # fmt: skip


def build_tables(runs: Sequence[RunRecord], alpha: str = "best", metric: str = "test_acc",
                 margin: float = MARGIN, select_on: str = "auto",
                 ) -> tuple[list[Table], Excluded]:  # fmt: skip
    """All three tables over the ``done`` runs, with the verdicts of their comparisons on
    ``metric`` (α chosen on the ``select_on`` split; ``auto``: per table, :func:`split_for`
    its runs), and the excluded runs."""
    done = [r for r in runs if r.status == "done"]
    ls0 = [r for r in done if r.label_smoothing == 0]
    on = [split_for(ls0, select_on), split_for(ls0, select_on),
          split_for([r for r in done if r.method in ABLATION_METHODS], select_on)]  # fmt: skip
    tables = [table1(done, alpha, on[0]), table2(done, alpha, on[1]), table3(done)]
    for t, split in zip(tables, on, strict=True):
        _judge_table(t, done, metric, margin, split, alpha)
    return tables, excluded(runs)
