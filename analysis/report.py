"""Orchestration: open the store, check the request, build the tables, write the files."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis import html, render
from analysis.errors import AnalysisError
from analysis.inference import MARGIN
from analysis.paper import annotate
from analysis.queries import RunFilter, load_runs, open_store
from analysis.studies import (
    IMPORTANCE_HEADER,
    STUDIES_HEADER,
    TRIALS_HEADER,
    StudySummary,
    importance_grid,
    load_studies,
    studies_grid,
    study_figures,
    trials_grid,
)
from analysis.tables import build_tables, cost_of
from analysis.zeroed import zeroed_by_layer, zeroed_filters_table
from sweeper.store import display_url

FORMATS = ("md", "csv", "tex", "html")
ZEROED_TITLE = "Zeroed filters per layer x method"


@dataclass(frozen=True)
class ReportRequest:
    """What ``python -m analysis`` was asked to do."""

    store_url: str
    out: Path
    formats: Sequence[str]
    flt: RunFilter
    alpha: str = "best"
    study_storage: str | None = None  # Optuna storage; None -> the store's database
    metric: str = "test_acc"  # what the verdicts are on
    margin: float = MARGIN  # ± this is "equivalent" (the metric's units: pp of top-1)
    # the split the best α is chosen on: auto = val for a table whose runs all have a
    # validation split (data.val_split), else test
    select_on: str = "auto"


def prepare_out(out: Path) -> None:
    """Create ``out`` and prove it is writable, or raise AnalysisError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise AnalysisError(f"output directory {out} is not writable: {e.strerror or e}") from e


def _source(req: ReportRequest) -> str:
    """Where the runs came from, for the HTML header (no password)."""
    return f"store {display_url(req.store_url)}"


def _zeroed(runs: list, last_stats: list) -> tuple[list[str], list[list[str]]]:
    """Last-snapshot zeroed filters per layer x method (from the store's filter_stats)."""
    return zeroed_by_layer(zeroed_filters_table(runs, last_stats), runs)


def _study_tables(studies: list[StudySummary]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The searches' best trials and parameter importances (Markdown and HTML)."""
    if not studies:
        return []
    return [
        ("Optuna studies: best trials", STUDIES_HEADER, studies_grid(studies)),
        ("Optuna studies: parameter importances", IMPORTANCE_HEADER, importance_grid(studies)),
    ]


def make_report(req: ReportRequest) -> list[Path]:
    """Build and write the report; returns the files written. Prints the Markdown."""
    store = open_store(req.store_url)
    try:
        if store.count_runs() == 0:
            raise AnalysisError(f"the store {display_url(req.store_url)} has no runs")
        if req.flt.sweeps:
            known = [s.id for s in store.sweeps()]
            unknown = sorted(set(req.flt.sweeps) - set(known))
            if unknown:
                listed = ", ".join(map(str, known)) or "none"
                raise AnalysisError(
                    f"unknown sweep id(s) {', '.join(map(str, unknown))}; known: {listed}"
                )
        runs = load_runs(store, req.flt)
        names = {s.name for s in store.sweeps(req.flt.sweeps)} if req.flt.sweeps else None
        last_stats = store.last_filter_stats([r.id for r in runs if r.status == "done"])
    finally:
        store.dispose()
    if not runs:
        raise AnalysisError("no runs match the filters")
    prepare_out(req.out)
    built, ex = build_tables(runs, req.alpha, req.metric, req.margin, req.select_on)
    tables = annotate(built)
    total = (cost_of(runs), cost_of(ex.runs))
    md = render.markdown(tables, ex, total)
    zeroed_header, zeroed = _zeroed(runs, last_stats)
    if zeroed:
        md += f"\n## {ZEROED_TITLE}\n\n" + render.md_grid(zeroed_header, zeroed) + "\n"
    studies = load_studies(req.study_storage or req.store_url, names)
    study_tables = _study_tables(studies)
    for title, header, rows in study_tables:
        md += f"\n## {title}\n\n" + render.md_grid(header, rows) + "\n"
    figures, note = None, None
    if "html" in req.formats:
        figures, note = html.make_figures(runs, req.out / "figures")
        if studies:
            figures = [*(figures or []), *study_figures(studies, req.out / "figures")]
        if figures:  # captions carry the numbers (e.g. Fig. 8's slope, intercept and r)
            md += "\n## Figures (in report.html and figures/)\n\n" + "".join(
                f"- **{f.title}** ({f.path.name}): {f.caption}\n" for f in figures
            )
    files: dict[str, str] = {}
    if "md" in req.formats:
        files["report.md"] = md
    if "csv" in req.formats:
        files.update({f"{t.name}.csv": render.csv_table(t) for t in tables})
        files["excluded_runs.csv"] = render.csv_excluded(ex)
        files["verdicts.csv"] = render.csv_verdicts(tables)
        if zeroed:
            files["zeroed_filters.csv"] = render.csv_grid(zeroed_header, zeroed)
        if studies:
            files["optuna_studies.csv"] = render.csv_grid(STUDIES_HEADER, studies_grid(studies))
            files["optuna_trials.csv"] = render.csv_grid(TRIALS_HEADER, trials_grid(studies))
            files["optuna_importances.csv"] = render.csv_grid(
                IMPORTANCE_HEADER, importance_grid(studies)
            )
    if "tex" in req.formats:
        files.update({f"{t.name}.tex": render.tex_table(t) for t in tables})
        files["excluded_runs.tex"] = render.tex_excluded(ex)
        if zeroed:
            files["zeroed_filters.tex"] = render.tex_grid(ZEROED_TITLE, zeroed_header, zeroed)
    if "html" in req.formats:
        extra = [(ZEROED_TITLE, zeroed_header, zeroed)] if zeroed else []
        if studies:
            extra += [
                *study_tables,
                ("Optuna trials", TRIALS_HEADER, trials_grid(studies)),
            ]
        files["report.html"] = html.report_html(
            tables, ex, figures, note, _source(req), extra, render.total_cost_line(*total)
        )
    written = []
    try:
        for name, text in files.items():
            path = req.out / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    except OSError as e:
        raise AnalysisError(f"cannot write {req.out}: {e.strerror or e}") from e
    sys.stdout.write(md)
    sys.stdout.write(f"\nwrote {len(written)} file(s) to {req.out}\n")
    return written
