"""The paper's zeroed filters (Sec. 5.2, Figs. 5-7) as a table: filters whose L2 norm is
below 1e-8 at each run's last snapshot, per layer and configuration (seeds averaged). Plain Python over the store's
records (no matplotlib): the report keeps this table even when figures cannot be drawn."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from analysis.configs import config_of, extra_columns, extra_values
from analysis.render import LABELS, fmt_key
from sweeper.store import FilterStatRecord, RunRecord


def _done(records: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.status == "done"]


def zeroed_filters_table(
    records: Sequence[RunRecord], last_stats: Sequence[FilterStatRecord]
) -> list[dict]:
    """Zeroed filters (L2 norm < 1e-8) per layer at the LAST snapshot of each done run.

    ``last_stats``: each run's last filter snapshot (:meth:`Store.last_filter_stats`).
    Rows ``{method, model, layer_index, layer_name, n_filters, n_zero}`` plus ``run_id``,
    ``alpha`` and ``seed`` (one row per run and layer), ordered by method, model, alpha,
    seed, run id, layer index; [] when no done run has a snapshot (the paper's zeroed-filter
    counts, Figs. 5-7).
    """
    done = {r.id: r for r in _done(records)}
    rows: list[dict] = []
    for fs in last_stats:
        r = done.get(fs.run_id)
        if r is None:
            continue
        rows.append(
            {
                "method": r.method,
                "model": r.model,
                "layer_index": fs.layer_index,
                "layer_name": fs.layer_name,
                "n_filters": fs.n_filters,
                "n_zero": fs.n_zero,
                "run_id": r.id,
                "alpha": r.alpha,
                "seed": r.seed,
            }
        )
    rows.sort(
        key=lambda d: (
            d["method"],
            d["model"],
            -1.0 if d["alpha"] is None else d["alpha"],
            d["seed"],
            d["run_id"],
            d["layer_index"],
        )
    )
    return rows


ZEROED_HEADER = [
    "model",
    "method",
    "layer",
    "layer name",
    "filters",
    "zeroed (mean)",
    "zeroed (max)",
    "runs",
]


def zeroed_by_layer(
    rows: Sequence[dict], runs: Sequence[RunRecord]
) -> tuple[list[str], list[list[str]]]:
    """The report's "zeroed filters per layer x configuration" table (paper Sec. 5.2): the
    rows of :func:`zeroed_filters_table` averaged over the seeds of each configuration
    (:mod:`analysis.configs`), per layer. Configurations of one model and method are told
    apart by extra columns (α, batch size, a method's knobs...) placed after ``method``.
    Returns the header and the cells ([] when there are no rows)."""
    by_id = {r.id: r for r in runs}
    done = [by_id[i] for i in dict.fromkeys(r["run_id"] for r in rows)]
    extra = extra_columns(done, ["model", "method"])
    groups: dict[tuple, list[dict]] = defaultdict(list)
    shown: dict[tuple, tuple] = {}
    for r in rows:
        run = by_id[r["run_id"]]
        key = (run.model, run.method, config_of(run))
        shown[key] = tuple(extra_values(run, extra).values())
        groups[(key, r["layer_index"], r["layer_name"])].append(r)

    def order(g: tuple) -> tuple:
        (model, method, cfg), idx, name = g
        vals = tuple((v is None, str(v) if isinstance(v, (str, tuple)) else v)
                     for v in shown[(model, method, cfg)])  # fmt: skip
        return (model, method, vals, repr(cfg), idx, name)

    out = []
    for g in sorted(groups, key=order):
        (model, method, cfg), idx, name = g
        rs = groups[g]
        zs = [int(r["n_zero"]) for r in rs]
        out.append(
            [
                model,
                method,
                *(fmt_key(v) for v in shown[(model, method, cfg)]),
                str(idx),
                name,
                str(rs[0]["n_filters"]),
                f"{float(np.mean(zs)):.2f}",
                str(max(zs)),
                str(len(rs)),
            ]
        )
    header = [*ZEROED_HEADER[:2], *(LABELS.get(k, k) for k in extra), *ZEROED_HEADER[2:]]
    return (header, out) if out else ([], [])
