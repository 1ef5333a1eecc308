"""The paper's Tables 1-3 (package data ``analysis/paper/*.csv``) next to ours.

:func:`annotate` returns our tables as :class:`PaperTable` objects: the same rows plus,
per row, the matching paper row (or None). A row matches a paper row when the data set is
ImageNet and model, schedule, method and alpha agree (alpha None for methods without PGT);
Table 2 also matches the batch size (the paper's Table 2 has one schedule), Table 3 the
label smoothing (empty in the paper's CSV = 0) and has no method column. Renderers add
"paper train", "paper test" and "Δ test vs paper" (our mean test - paper test) to a table
with at least one match.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources

from analysis.tables import Row, Table

PAPER_DATA = "imagenet"
FILES = {
    "table1_baseline_vs_pgt": "table1_bn_imagenet.csv",
    "table2_batch_size": "table2_nobn_resnet18_imagenet.csv",
    "table3_ablation": "table3_ablation_resnet50_imagenet.csv",
}
# our key column -> the paper CSV's column, per table
MATCH = {
    "table1_baseline_vs_pgt": {"model": "model", "schedule": "scheduler", "method": "method",
                               "alpha": "alpha"},
    "table2_batch_size": {"model": "model", "batch_size": "batch_size", "method": "method",
                          "alpha": "alpha"},
    "table3_ablation": {"model": "model", "schedule": "scheduler",
                        "label_smoothing": "label_smoothing", "alpha": "alpha"},
}  # fmt: skip
_NUMERIC = {"alpha", "label_smoothing", "batch_size"}


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's table: its key values and reported accuracies (%)."""

    keys: dict[str, object]
    train_acc: float
    test_acc: float
    gap: float | None = None

    def value(self, metric: str) -> float | None:
        """The paper's value of ``train_acc``, ``test_acc`` or ``gap`` (train - test)."""
        if metric == "gap":
            return self.gap if self.gap is not None else self.train_acc - self.test_acc
        return getattr(self, metric, None)


@dataclass
class PaperTable(Table):
    """A :class:`Table` with, per row (same order), the matching paper row or None."""

    paper: list[PaperRow | None] = None  # type: ignore[assignment]

    @property
    def has_paper(self) -> bool:
        return any(p is not None for p in self.paper or [])


def _parse(col: str, v: str) -> object:
    v = v.strip()
    if col in _NUMERIC:
        if v == "":
            return 0.0 if col == "label_smoothing" else None
        return float(v)
    return v


@cache
def paper_rows(table_name: str) -> tuple[PaperRow, ...]:
    """The paper's rows for one of our tables (empty for an unknown table)."""
    fname = FILES.get(table_name)
    if fname is None:
        return ()
    text = resources.files("analysis").joinpath("paper", fname).read_text(encoding="utf-8")
    cols = MATCH[table_name].values()
    out = []
    for r in csv.DictReader(io.StringIO(text)):
        gap = r.get("gap", "").strip()
        out.append(
            PaperRow(
                keys={c: _parse(c, r[c]) for c in cols},
                train_acc=float(r["train_acc"]),
                test_acc=float(r["test_acc"]),
                gap=float(gap) if gap else None,
            )
        )
    return tuple(out)


def _same(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def match(table_name: str, row: Row) -> PaperRow | None:
    """The paper row matching ``row`` of our table ``table_name``, if any."""
    if row.keys.get("data") != PAPER_DATA or row.keys.get("optimizer", "sgd") != "sgd":
        return None  # the paper trained ImageNet with SGD only
    cols = MATCH.get(table_name, {})
    for p in paper_rows(table_name):
        if all(ours in row.keys and _same(row.keys[ours], p.keys[theirs])
               for ours, theirs in cols.items()):  # fmt: skip
            return p
    return None


def annotate(tables: Sequence[Table]) -> list[PaperTable]:
    """Our tables with the matching paper row of each row attached."""
    out = []
    for t in tables:
        base = {f.name: getattr(t, f.name) for f in fields(Table)}
        out.append(PaperTable(**base, paper=[match(t.name, r) for r in t.rows]))
    return out


def paper_of(table: Table) -> list[PaperRow | None] | None:
    """The per-row paper matches of an annotated table with any match, else None."""
    if isinstance(table, PaperTable) and table.has_paper:
        return table.paper
    return None
