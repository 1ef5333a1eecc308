"""Render tables as Markdown, CSV (raw numbers) and LaTeX (booktabs).

Markdown / LaTeX cells: ``mean ± std (n)`` (std "—" for n = 1), differences as
``+d [lo, hi]`` with the CI method marked ``p`` (paired by seed) or ``w`` (Welch); a
difference without CI (n = 1) has no bracket; a missing cell is "—".
CSV: one line per (row, metric) with ``mean, std, n, diff, ci_low, ci_high, ci_method``
at full precision; empty fields where there is no value.

Tables annotated by :func:`analysis.paper.annotate` with at least one matching paper row
also get "paper train", "paper test" and "Δ test vs paper" (our mean test - the paper's);
in CSV, ``paper`` (the paper's value of that line's metric) and ``diff_vs_paper``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from analysis.comparisons import Judged
from analysis.configs import extra_values
from analysis.inference import EQUIVALENT, LEVEL, MARGIN, POWER, TOO_FEW, UNRESOLVED
from analysis.paper import PaperRow, paper_of
from analysis.stats import Comparison, Summary
from analysis.tables import Cost, Excluded, Row, Table
from trainers.registry import first_line

DASH = "—"
LABELS = {
    "data": "data",
    "model": "model",
    "epochs": "epochs",
    "batch_size": "batch",
    "schedule": "schedule",
    "label_smoothing": "LS",
    "method": "method",
    "alpha": "α",
    "train_acc": "train top-1",
    "test_acc": "test top-1",
    "test_top5": "test top-5",
    "test_loss": "test loss",
    "val_acc": "val top-1",
    "val_loss": "val loss",
    "gap": "gap",
    # identity keys shown as extra columns, where a plain name says it
    "data.name": "data",
    "schedule.name": "schedule",
    "optimizer.name": "optimizer",
    "method.label_smoothing": "LS",
}
EXCLUDED_COLUMNS = ["id", "model", "method", "alpha", "seed", "status", "error"]


def fmt_key(v: object) -> str:
    """A key value for display; None (e.g. no alpha) is "—"."""
    if v is None:
        return DASH
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):  # a list-valued key (schedule.milestones, optimizer.betas)
        return "[" + ", ".join(fmt_key(x) for x in v) + "]"
    return str(v)


def csv_key(v: object) -> object:
    """A key value for CSV: numbers at full precision, lists as ``[a, b]``, None empty."""
    if v is None:
        return ""
    if isinstance(v, (bool, tuple)):
        return fmt_key(v) if isinstance(v, bool) else "[" + ", ".join(map(str, v)) + "]"
    return v


def fmt_summary(s: Summary | None) -> str:
    """``mean ± std (n)``; "—" for a missing cell."""
    if s is None or s.n == 0 or s.mean is None:
        return DASH
    std = DASH if s.std is None else f"{s.std:.2f}"
    return f"{s.mean:.2f} ± {std} ({s.n})"


NO_BASELINE = "no baseline"
CELL_LEGEND = (
    "Cells: one configuration; mean ± sample std over its seeds (n), `done` runs only, "
    "accuracies in %. Runs that differ in anything but the seed are never averaged: a key "
    "that tells two configurations apart gets a column of its own. Δ: vs the baseline of "
    "the same setting (the same configuration but for the method and α), 95% CI, p = paired "
    f'by seed, w = Welch; no CI when n = 1; "{NO_BASELINE}" where no baseline run matches.'
)


def fmt_diff(c: Comparison | None, no_baseline: bool = False) -> str:
    """``+d [lo, hi] p|w``; ``+d`` without CI; "no baseline" for a cell whose setting has no
    baseline run; "—" when nothing to compare."""
    if no_baseline:
        return NO_BASELINE
    if c is None:
        return DASH
    if c.ci_low is None or c.ci_high is None:
        return f"{c.diff:+.2f}"
    return f"{c.diff:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}] {c.kind[0]}"


COST_COLUMNS = ["cost", "img/s"]


def unit(metric: str) -> str:
    """ " pp" for accuracies (percentage points), "" for losses."""
    return " pp" if metric.endswith(("_acc", "_top5")) else ""


def fmt_verdict(j: Judged | None) -> str:
    """A table's verdict cell: the verdict, with the seeds per side an unresolved one needs."""
    if j is None:
        return DASH
    c = j.result
    if c.verdict == UNRESOLVED:
        return f"unresolved ({c.seeds_needed} seeds)" if c.seeds_needed else "unresolved"
    return c.verdict


def verdict_line(j: Judged) -> str:
    """``pgt α=0.25 vs baseline — model · data · b128: +0.42 pp [+0.10, +0.74], P(better)
    1.00 [0.48, 1.00] (5/5 seeds) → better``."""
    c = j.result
    u = unit(c.metric)
    head = f"{j.treatment} vs {j.baseline} — {j.setting}: "
    if c.verdict == TOO_FEW:
        d = DASH if c.diff is None else f"{c.diff:+.2f}{u}"
        return f"{head}{d} ({c.n_treatment} vs {c.n_baseline} seeds) → {TOO_FEW}"
    kind = "" if c.paired else " Welch"
    pairs = f"{c.wins:g}/{c.pairs} {'seeds' if c.paired else 'seed pairs'}"
    line = (f"{head}{c.diff:+.2f}{u} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]{kind}, P(better) "
            f"{c.p_improve:.2f} [{c.p_low:.2f}, {c.p_high:.2f}] ({pairs}) → {c.verdict}")  # fmt: skip
    if c.verdict == EQUIVALENT and c.excludes_zero:
        line += f" (within ±{c.margin:g}{u}, though the interval excludes 0)"
    if c.verdict == UNRESOLVED:
        line += (f" (≈{c.seeds_needed} seeds per side would resolve it)" if c.seeds_needed
                 else " (more than 100,000 seeds per side would be needed)")  # fmt: skip
    return line


def verdict_rules(metric: str, margin: float, splits: Sequence[str] = ("test",)) -> str:
    """The paragraph that says how the verdicts are made (``splits``: those the tables'
    α were chosen on)."""
    chosen = ("α is chosen on the test set." if set(splits) <= {"test"} else
              "α is chosen on the validation split (`data.val_split`) where every run of a "
              "table has one, on the test set otherwise (each table's note says which)."
              if "test" in splits else "α is chosen on the validation split (`data.val_split`).")  # fmt: skip
    u = unit(metric) or " (in the metric's units)"
    return (
        f"On {LABELS.get(metric, metric)} (`--metric`): treatment − baseline of the same "
        "setting, paired by seed where both hold the same seeds, Welch otherwise. The "
        f"intervals of one family (every comparison against one baseline in one table, all α "
        f"of a grid included) are simultaneous at {LEVEL:.0%} (Bonferroni: each at "
        f"1 − {1 - LEVEL:.2g}/m), so picking the best α afterwards keeps the coverage. "
        f"**equivalent**: the interval lies inside ±{margin:g}{u} (`--margin`); **better** / "
        "**worse**: otherwise, the interval excludes 0; **unresolved**: neither, with the "
        f"seeds per side that would resolve it with {POWER:.0%} power at the observed "
        "difference and spread; **too few seeds**: fewer than 2 on a side. P(better): the "
        "share of seed pairs where the treatment wins (ties half), with its Clopper-Pearson "
        f"interval at the family's level. {chosen}"
    )


def md_verdicts(tables: Sequence[Table]) -> list[str]:
    """The report's opening section: one line per comparison, per table and family."""
    judged = [t for t in tables if t.verdicts]
    metric = tables[0].metric if tables else "test_acc"
    margin = next((t.verdicts[0].result.margin for t in judged), MARGIN)
    splits = sorted({j.selected_on for t in judged for j in t.verdicts}) or ["test"]
    parts = ["## Verdicts", "", verdict_rules(metric, margin, splits)]
    if not judged:
        return [*parts, "", "(no comparisons: no setting holds a baseline and a treatment)"]
    for t in judged:
        shown = {r.config for r in t.rows if r.present}
        parts += ["", f"### {t.title}"]
        fam = None
        for j in t.verdicts:
            if j.family != fam:
                fam = j.family
                c = j.result
                parts += ["", f"Family: against the baseline of {j.setting}, "
                          f"{c.family_size} comparison(s), each interval at "
                          f"{100 * c.confidence:.3g} % ({LEVEL:.0%} jointly).", ""]  # fmt: skip
            mark = " *(shown in the table)*" if t.compared and j.config in shown else ""
            parts.append(f"- {verdict_line(j)}{mark}")
    return parts


def fmt_cost(c: Cost | None) -> str:
    """GPU-hours of the runs (all seeds), or CPU-hours for runs without a GPU; "—" if
    unrecorded."""
    if c is None:
        return DASH
    parts = []
    if c.gpu_hours is not None:
        parts.append(f"{c.gpu_hours:.3g} GPU-h")
    if c.cpu_hours is not None:
        parts.append(f"{c.cpu_hours:.3g} CPU-h")
    return " + ".join(parts) or DASH


def fmt_speed(c: Cost | None) -> str:
    if c is None or c.images_per_s is None:
        return DASH
    return f"{c.images_per_s:,.0f}"


def _header(table: Table) -> list[str]:
    cols = [LABELS.get(c, c) for c in table.key_columns]
    cols += [LABELS.get(m, m) for m in table.metrics]
    if table.compared:
        cols += [f"Δ {LABELS.get(m, m)} (95% CI)" for m in table.metrics]
    cols += [f"verdict ({LABELS.get(table.metric, table.metric)})"]
    cols += COST_COLUMNS
    if paper_of(table) is not None:
        cols += PAPER_COLUMNS
    return cols


PAPER_COLUMNS = ["paper train", "paper test", "Δ test vs paper"]


def _vs_paper(row: Row, p: PaperRow | None, metric: str) -> float | None:
    """Our mean of ``metric`` minus the paper's value; None when either is missing."""
    s = row.stats.get(metric)
    theirs = p.value(metric) if p is not None else None
    if not row.present or s is None or s.mean is None or theirs is None:
        return None
    return s.mean - theirs


def _paper_cells(row: Row, p: PaperRow | None) -> list[str]:
    if p is None:
        return [DASH, DASH, DASH]
    d = _vs_paper(row, p, "test_acc")
    return [f"{p.train_acc:g}", f"{p.test_acc:g}", DASH if d is None else f"{d:+.2f}"]


def _cells(table: Table, row: Row, i: int = 0) -> list[str]:
    out = [fmt_key(row.keys[c]) for c in table.key_columns]
    out += [fmt_summary(row.stats.get(m)) if row.present else DASH for m in table.metrics]
    if table.compared:
        out += [DASH if row.is_baseline else fmt_diff(row.diffs.get(m), row.no_baseline)
                for m in table.metrics]  # fmt: skip
    out += [fmt_verdict(row.verdict)]
    out += [fmt_cost(row.cost), fmt_speed(row.cost)] if row.present else [DASH, DASH]
    paper = paper_of(table)
    if paper is not None:
        out += _paper_cells(row, paper[i])
    return out


def grid(table: Table) -> tuple[list[str], list[list[str]]]:
    """A table's display header and cells (as in Markdown / LaTeX)."""
    return _header(table), [_cells(table, r, i) for i, r in enumerate(table.rows)]


def excluded_grid(ex: Excluded) -> tuple[list[str], list[list[str]]]:
    """The excluded runs' display header and cells."""
    return _excluded_header(ex), _excluded_rows(ex)


def _excluded_header(ex: Excluded) -> list[str]:
    """The excluded runs' columns; identity keys that tell apart runs of one model, method
    and α go before the seed."""
    i = EXCLUDED_COLUMNS.index("seed")
    return [*EXCLUDED_COLUMNS[:i], *ex.extra, *EXCLUDED_COLUMNS[i:]]


def md_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return _md_grid(header, rows)


def csv_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _md_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _excluded_rows(ex: Excluded) -> list[list[str]]:
    return [
        [
            str(r.id),
            r.model,
            r.method,
            fmt_key(r.alpha),
            *(fmt_key(v) for v in extra_values(r, ex.extra).values()),
            str(r.seed),
            r.status,
            first_line(r.error, DASH),
        ]
        for r in ex.runs
    ]


def total_cost_line(total: Cost, wasted: Cost) -> str:
    """One sentence: what every run in the report cost, and how much of it was excluded."""
    line = f"Cost of the {total.n} run(s) in this report: {fmt_cost(total)}"
    if wasted.n:
        line += f", of which {fmt_cost(wasted)} in failed, diverged or pruned runs"
    if total.peak_gpu_mem_mb is not None:
        line += f"; peak GPU memory {total.peak_gpu_mem_mb:,.0f} MiB"
    return line + "."


def markdown(tables: Sequence[Table], ex: Excluded, total: tuple[Cost, Cost] | None = None) -> str:
    """The whole report as Markdown; ``total``: (all runs, excluded runs) cost."""
    parts = ["# gradsweep report", "", *md_verdicts(tables), ""]
    parts.append(
        CELL_LEGEND + " cost: GPU-hours of the cell's runs (all seeds; wall time of their "
        "epochs x GPUs), CPU-hours for runs without a GPU; img/s: mean training throughput "
        "per run."
    )
    if total is not None:
        parts.append("")
        parts.append(total_cost_line(*total))
    if any(paper_of(t) is not None for t in tables):
        parts.append(
            "Paper columns: the paper's train / test top-1 for the same ImageNet setting; "
            "Δ test vs paper = our mean test top-1 - the paper's."
        )
    for t in tables:
        parts += ["", f"## {t.title}", ""]
        if t.note:
            parts += [f"{t.note}.", ""]
        if t.rows:
            parts.append(_md_grid(*grid(t)))
        else:
            parts.append("(no runs)")
    parts += ["", f"## Excluded runs ({len(ex.runs)} failed, diverged or pruned)", ""]
    if ex.runs:
        parts.append(_md_grid(*excluded_grid(ex)))
    else:
        parts.append("(none)")
    if ex.not_finished:
        parts += ["", f"{ex.not_finished} run(s) queued, running or interrupted, not shown."]
    return "\n".join(parts) + "\n"


def _num(v: float | int | None) -> str:
    return "" if v is None else repr(v)


def csv_table(table: Table) -> str:
    """One line per (row, metric), raw numbers."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    paper = paper_of(table)
    w.writerow([*table.key_columns, "metric", "mean", "std", "n", "diff", "ci_low", "ci_high",
                "ci_method", "gpu_hours", "cpu_hours", "images_per_s", "peak_gpu_mem_mb",
                *(["paper", "diff_vs_paper"] if paper is not None else []), "verdict"])  # fmt: skip
    for i, row in enumerate(table.rows):
        keys = [csv_key(row.keys[c]) for c in table.key_columns]
        for m in table.metrics:
            s = row.stats.get(m) or Summary(0, None, None)
            c = row.diffs.get(m)
            diff = [c.diff, c.ci_low, c.ci_high] if c else [None, None, None]
            line = [*keys, m, _num(s.mean), _num(s.std), s.n, *map(_num, diff), c.kind if c else ""]
            k = row.cost if row.present else None
            line += [_num(getattr(k, f, None)) for f in
                     ("gpu_hours", "cpu_hours", "images_per_s", "peak_gpu_mem_mb")]  # fmt: skip
            if paper is not None:
                p = paper[i]
                line += [_num(p.value(m) if p else None), _num(_vs_paper(row, p, m))]
            w.writerow([*line, row.verdict.result.verdict if row.verdict else ""])
    return buf.getvalue()


VERDICT_COLUMNS = ["table", "setting", "treatment", "baseline", "metric", "n_treatment",
                   "n_baseline", "paired", "diff", "ci_low", "ci_high", "p_improve", "verdict",
                   "seeds_needed", "selected_on", "p_improve_low", "p_improve_high",
                   "family_size", "confidence", "margin"]  # fmt: skip


def verdict_record(j: Judged) -> dict[str, object]:
    """One comparison as a :data:`VERDICT_COLUMNS` record (numbers at full precision)."""
    c = j.result
    return {"table": j.table, "setting": j.setting, "treatment": j.treatment,
            "baseline": j.baseline, "metric": c.metric, "n_treatment": c.n_treatment,
            "n_baseline": c.n_baseline, "paired": c.paired, "diff": c.diff,
            "ci_low": c.ci_low, "ci_high": c.ci_high, "p_improve": c.p_improve,
            "verdict": c.verdict, "seeds_needed": c.seeds_needed, "selected_on": j.selected_on,
            "p_improve_low": c.p_low, "p_improve_high": c.p_high,
            "family_size": c.family_size, "confidence": c.confidence, "margin": c.margin}  # fmt: skip


def csv_verdicts(tables: Sequence[Table]) -> str:
    """``verdicts.csv``: one line per comparison of every table."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(VERDICT_COLUMNS)
    for t in tables:
        for j in t.verdicts:
            rec = verdict_record(j)
            w.writerow([str(rec[k]).lower() if isinstance(rec[k], bool) else _num(rec[k])
                        if rec[k] is None or isinstance(rec[k], float) else rec[k]
                        for k in VERDICT_COLUMNS])  # fmt: skip
    return buf.getvalue()


def csv_excluded(ex: Excluded) -> str:
    """The excluded runs, one line each."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_excluded_header(ex))
    for r in ex.runs:
        err = first_line(r.error)
        extra = [csv_key(v) for v in extra_values(r, ex.extra).values()]
        w.writerow([r.id, r.model, r.method, _num(r.alpha), *extra, r.seed, r.status, err])
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}  # fmt: skip


def tex_escape(s: str) -> str:
    """Escape LaTeX specials; ±, α, Δ and — become math / dashes."""
    out = "".join(_TEX.get(ch, ch) for ch in s)
    return (
        out.replace("±", r"$\pm$")
        .replace("α", r"$\alpha$")
        .replace("Δ", r"$\Delta$")
        .replace(DASH, "---")
    )


def tex_grid(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{tex_escape(caption)}}}",
        "\\begin{tabular}{" + "l" * len(header) + "}",
        "\\toprule",
        " & ".join(tex_escape(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(tex_escape(c) for c in r) + " \\\\" for r in rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def tex_table(table: Table) -> str:
    """A booktabs ``table`` environment."""
    return tex_grid(table.title, *grid(table))


def tex_excluded(ex: Excluded) -> str:
    """The excluded runs as a booktabs table."""
    return tex_grid("Excluded runs (failed, diverged or pruned)", *excluded_grid(ex))
