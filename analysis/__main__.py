"""``python -m analysis``: rebuild the paper's tables (and the HTML report) from the store.

Thin argparse entry; the work is in :mod:`analysis.report`. Failures print one line
``error: ...`` on stderr and exit with status 2 (the CLI's one boundary,
:func:`sweeper.errors.boundary`). Nothing heavy is imported before the arguments are read,
so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.errors import AnalysisError


def _split(values: Sequence[str] | None) -> list[str]:
    """Repeatable options that also accept comma lists: ["a,b", "c"] -> [a, b, c]."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Rebuild the paper's tables (mean ± std over seeds, diffs with 95 % CI) and "
        "a verdict on each comparison (better, worse, equivalent, unresolved) "
        "from a gradsweep results store.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--results-dir", type=Path, default=Path("results"),
                     help="results directory; the store is DIR/results.db (default ./results)")  # fmt: skip
    src.add_argument("--store-url", help="any SQLAlchemy URL (overrides --results-dir)")
    p.add_argument("--sweep", action="append", metavar="ID", help="only runs of these sweep ids")
    p.add_argument("--model", action="append", help="only these models")
    p.add_argument("--method", action="append", help="only these methods")
    p.add_argument("--data", action="append", help="only these data sets")
    p.add_argument("--alpha", default="best",
                   help="PGT alpha in Tables 1-2: best (by mean top-1 on the validation split "
                   "where every run of the table has one, else on the test set), all, or a value")  # fmt: skip
    p.add_argument("--metric", default="test_acc",
                   help="what the verdicts compare: test_acc (default), train_acc, test_top5, "
                   "test_loss; val_acc, val_loss for runs with data.val_split")  # fmt: skip
    p.add_argument("--margin", default="0.2",
                   help="differences within ± this are 'equivalent' (percentage points of "
                   "top-1; the metric's units; default 0.2)")  # fmt: skip
    p.add_argument("--study-storage", metavar="URL",
                   help="Optuna storage of the searches (default: the results store)")  # fmt: skip
    p.add_argument("--out", type=Path, help="output directory (default <results-dir>/report)")
    p.add_argument("--formats", default="md,csv,tex,html",
                   help="comma list of md, csv, tex, html (default all)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    from sweeper.errors import boundary

    args = parser().parse_args(argv)
    return boundary(lambda: _report(args))


def _margin(text: str) -> float:
    """``--margin``: a finite number >= 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise AnalysisError(f"--margin must be a number >= 0 (e.g. 0.2 percentage points), "
                            f"got {text!r}")  # fmt: skip
    return value


def _report(args: argparse.Namespace) -> None:
    from analysis.queries import RunFilter
    from analysis.report import FORMATS, ReportRequest, make_report

    formats = _split([args.formats])
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise AnalysisError(f"unknown format(s) {bad or formats}; choose from md, csv, tex, html")
    if args.alpha not in ("best", "all"):
        try:
            float(args.alpha)
        except ValueError as e:
            msg = f"--alpha must be best, all or a number, got {args.alpha!r}"
            raise AnalysisError(msg) from e
    margin = _margin(args.margin)
    from analysis.comparisons import metric_choices

    if args.metric not in metric_choices():
        raise AnalysisError(
            f"unknown --metric {args.metric!r}; choose from {', '.join(metric_choices())}"
        )
    try:
        sweeps = [int(s) for s in _split(args.sweep)]
    except ValueError as e:
        raise AnalysisError(f"--sweep takes integer ids: {e}") from e
    from sweeper.store import default_url

    results_dir: Path = args.results_dir
    req = ReportRequest(
        store_url=args.store_url or default_url(results_dir),
        out=args.out if args.out is not None else results_dir / "report",
        formats=formats,
        flt=RunFilter(sweeps, _split(args.model), _split(args.method), _split(args.data)),
        alpha=args.alpha,
        study_storage=args.study_storage,
        metric=args.metric,
        margin=margin,
    )
    make_report(req)


if __name__ == "__main__":
    sys.exit(main())
