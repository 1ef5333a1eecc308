"""A self-contained ``report.html``: every table and every figure in one file.

Tables use the same cells as the Markdown / LaTeX output (paper columns included when
present); figures come from :func:`analysis.plots.make_figures` and are embedded as
``data:image/png;base64`` images with their title and caption. The CSS is inline and
nothing is loaded from elsewhere, so the file opens offline.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis import render
from analysis.errors import AnalysisError
from analysis.tables import Excluded, Table
from sweeper.store import RunRecord
from trainers.registry import first_line

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d2733; background: #fff; margin: 0 auto; padding: 1.5rem 2rem;
       max-width: 1600px; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; }
h2 { font-size: 1.2rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #d8dee6;
     padding-bottom: .25rem; }
p.note { color: #52606d; max-width: 70rem; }
nav a { margin-right: 1rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: .4rem 0 1rem; }
th, td { padding: .28rem .6rem; border-bottom: 1px solid #e4e8ee; text-align: left;
         white-space: nowrap; }
thead th { background: #f2f5f8; border-bottom: 2px solid #c5ced8; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #eef4fb; }
th.paper, td.paper { background: #fbf8ee; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e8ee; }
figcaption { color: #3e4c59; margin-top: .4rem; max-width: 70rem; }
figcaption strong { display: block; color: #1d2733; }
.unavailable { color: #8a5a00; background: #fff7e0; padding: .5rem .8rem;
               border-left: 3px solid #e0a800; }
"""

NOTE = (
    render.CELL_LEGEND.replace("`", "") + " Paper columns: the "
    "paper's value for the same ImageNet setting, and our mean test top-1 minus the paper's. "
    "cost: GPU-hours of the cell's runs (all seeds; wall time of their epochs x GPUs), "
    "CPU-hours for runs without a GPU; img/s: mean training throughput per run."
)


def make_figures(records: Sequence[RunRecord], out_dir: Path):
    """``analysis.plots.make_figures``, or (None, reason) when figures cannot be made.

    Returns ``(figures, None)`` on success. A missing plots module or a failure while
    plotting does not stop the report: the HTML says "figures unavailable" and a warning
    line goes to stderr. An :class:`AnalysisError` from the plots propagates.
    """
    try:
        from analysis.plots import make_figures as _make
    except ImportError as e:
        return None, f"figures unavailable: the plots module cannot be imported ({e})"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return list(_make(records, out_dir)), None
    except AnalysisError:
        raise
    except Exception as e:  # noqa: BLE001 - a plotting bug must not cost the tables
        first = first_line(e)
        print(f"warning: figures unavailable: {first}", file=sys.stderr)
        return None, f"figures unavailable: {type(e).__name__}: {first}"


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], n_paper: int = 0) -> str:
    def cls(j: int) -> str:
        return ' class="paper"' if n_paper and j >= len(header) - n_paper else ""

    head = "".join(f"<th{cls(j)}>{_esc(h)}</th>" for j, h in enumerate(header))
    body = "\n".join(
        "<tr>" + "".join(f"<td{cls(j)}>{_esc(c)}</td>" for j, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return (
        f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody>\n</table></div>"
    )


def _figure(fig: Any) -> str:
    data = base64.b64encode(Path(fig.path).read_bytes()).decode("ascii")
    title = _esc(getattr(fig, "title", "") or Path(fig.path).stem)
    caption = _esc(getattr(fig, "caption", "") or "")
    return (
        f'<figure>\n<img src="data:image/png;base64,{data}" alt="{title}">\n'
        f"<figcaption><strong>{title}</strong>{caption}</figcaption>\n</figure>"
    )


def _verdicts(tables: Sequence[Table]) -> list[str]:
    """The opening section: the rules, then one line per comparison (as in report.md)."""
    lines = render.md_verdicts(tables)[2:]  # past "## Verdicts" and its blank line
    out = ['<h2 id="verdicts">Verdicts</h2>']
    items: list[str] = []

    def flush() -> None:
        if items:
            out.append("<ul>\n" + "\n".join(items) + "\n</ul>")
            items.clear()

    for ln in lines:
        if ln.startswith("- "):
            items.append(f"<li>{_esc(ln[2:].replace('*', ''))}</li>")
            continue
        flush()
        if ln.startswith("### "):
            out.append(f"<h3>{_esc(ln[4:])}</h3>")
        elif ln:
            out.append(f'<p class="note">{_esc(ln.replace("**", "").replace("`", ""))}</p>')
    flush()
    return out


def report_html(
    tables: Sequence[Table],
    ex: Excluded,
    figures: Sequence[Any] | None,
    figures_note: str | None = None,
    source: str = "",
    extra: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]]]] = (),
    cost_line: str = "",
) -> str:
    """The whole report as one HTML document; ``cost_line``: the total cost sentence."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [("verdicts", "Verdicts"), *((f"t{i}", t.title) for i, t in enumerate(tables, 1))]
    sections += [("excluded", "Excluded runs"), ("figures", "Figures")]
    nav = " ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>gradsweep report</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<h1>gradsweep report</h1>",
        f'<p class="note">{_esc(source)}{" · " if source else ""}generated {now}</p>',
        f"<nav>{nav}</nav>",
    ]
    parts += _verdicts(tables)
    parts += [
        f'<p class="note">{_esc(NOTE)}</p>',
        *([f'<p class="cost">{_esc(cost_line)}</p>'] if cost_line else []),
    ]
    for i, t in enumerate(tables, 1):
        parts.append(f'<h2 id="t{i}">{_esc(t.title)}</h2>')
        if t.note:
            parts.append(f'<p class="note">{_esc(t.note)}.</p>')
        if t.rows:
            header, rows = render.grid(t)
            n_paper = len(render.PAPER_COLUMNS) if header[-1:] == render.PAPER_COLUMNS[-1:] else 0
            parts.append(_table(header, rows, n_paper))
        else:
            parts.append('<p class="note">(no runs)</p>')
    parts.append(
        f'<h2 id="excluded">Excluded runs ({len(ex.runs)} failed, diverged or pruned)</h2>'
    )
    if ex.runs:
        parts.append(_table(*render.excluded_grid(ex)))
    else:
        parts.append('<p class="note">(none)</p>')
    if ex.not_finished:
        parts.append(
            f'<p class="note">{ex.not_finished} run(s) queued, running or interrupted, not shown.</p>'
        )
    for j, (title, header, rows) in enumerate(extra, 1):
        parts.append(f'<h2 id="x{j}">{_esc(title)}</h2>')
        parts.append(_table(header, rows))
    parts.append('<h2 id="figures">Figures</h2>')
    if figures is None:
        parts.append(f'<p class="unavailable">{_esc(figures_note or "figures unavailable")}</p>')
    elif not figures:
        parts.append('<p class="note">(no figures for these runs)</p>')
    else:
        parts += [_figure(f) for f in figures]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
