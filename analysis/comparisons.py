"""Which comparisons the report makes, grouped in families, and their verdicts.

A **family** is every comparison against one baseline in one table: the treatments of one
setting (:func:`analysis.configs.setting_of`) that the table shows, *all* their α included
even where the table shows only the best, so the best α keeps the family's simultaneous
coverage (:mod:`analysis.inference`). Families per table:

* Table 1: PGT's configurations (every α), label smoothing 0;
* Table 2: every method's configurations, label smoothing 0;
* Table 3: the ablation's (pgt, ls, ls_pgt), any label smoothing;
* ``sweep`` (:func:`sweep_verdicts`, the MLflow summary): every configuration of a sweep.

A treatment is a configuration (its seeds together); its baseline is the ``baseline``
configuration of its setting (the first, as the tables take it). A setting without baseline
runs makes no comparison. ``selected_on`` names the split α was chosen on (``test`` until
data sets have a validation split): one parameter of :func:`judge_tables`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from analysis.configs import (
    Key,
    config_key,
    config_of,
    extra_columns,
    flat_identity,
    is_method_key,
    method_of,
    setting_of,
)
from analysis.inference import DIRECTIONS, MARGIN, Comparison, compare, direction
from analysis.queries import RunRecord

ABLATION = ("pgt", "ls", "ls_pgt")
# the run's columns a setting's label always names
_SHOWN = ["model", "data", "batch_size", "epochs", "schedule", "optimizer"]


def metric_choices() -> list[str]:
    """The metrics a verdict can be on: those of :data:`DIRECTIONS` the runs record."""
    return [m for m in DIRECTIONS if m in RunRecord.__dataclass_fields__]


@dataclass(frozen=True)
class Judged:
    """One comparison of a table: who against whom, and the verdict."""

    table: str  # a table's name, or "sweep"
    setting: str  # a readable setting: model · data · b64 · 3 ep · cosine
    treatment: str  # method, α and the knobs that tell it apart: pgt α=0.25
    baseline: str
    config: Key  # the treatment's configuration (config_of)
    key: str  # its config_key (16 hex digits, as the sweep's summary names it)
    result: Comparison
    selected_on: str  # the split α is chosen on: test (val once data sets have one)
    family: tuple[int, str]  # (index of the family in its table, setting label)


def values_of(runs: Sequence[RunRecord], metric: str) -> list[tuple[int, float]]:
    """(seed, value of ``metric``) of each run that has one."""
    return [(r.seed, float(getattr(r, metric))) for r in runs if getattr(r, metric) is not None]


def _group(runs: Sequence[RunRecord], key: Callable[[RunRecord], Hashable]) -> dict:
    out: dict[Hashable, list[RunRecord]] = defaultdict(list)
    for r in runs:
        out[key(r)].append(r)
    return dict(out)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def setting_label(r: RunRecord, extra: Sequence[str] = ()) -> str:
    """model · data · b64 · 3 ep · cosine (· optimizer) (· key=value for ``extra``)."""
    parts = [r.model, r.data, f"b{r.batch_size}", f"{r.epochs} ep", r.schedule]
    if r.optimizer != "sgd":
        parts.append(r.optimizer)
    flat = flat_identity(r)
    parts += [f"{k}={_fmt(flat.get(k))}" for k in extra]
    return " · ".join(parts)


def treatment_label(r: RunRecord, knobs: Sequence[str] = ()) -> str:
    """pgt α=0.25 (method.gc_max_norm=0.001 ...)."""
    flat = flat_identity(r)
    parts = [r.method]
    if r.alpha is not None:
        parts.append(f"α={r.alpha:g}")
    parts += [f"{k}={_fmt(flat.get(k))}" for k in knobs]
    return " ".join(parts)


@dataclass(frozen=True)
class Cell:
    """One treatment configuration of a family: its runs (one per seed) and names."""

    config: Key  # config_of
    key: str  # its config_key
    label: str  # pgt α=0.25 (and the knobs that tell it apart)
    runs: list[RunRecord]


@dataclass(frozen=True)
class Family:
    """Every treatment of one setting that a table shows, against the setting's baseline."""

    index: int  # in the table's order
    setting: str  # the readable setting
    baseline: list[RunRecord]  # the baseline configuration's runs
    cells: list[Cell]  # in the readable order


def families(done: Sequence[RunRecord], treated: Callable[[RunRecord], bool]) -> list[Family]:
    """The families of ``done`` runs: one per setting that has baseline runs and treatments
    (those ``treated`` accepts), in the settings' and treatments' readable order."""
    by_setting = _group(done, setting_of)
    # the setting keys the label's columns do not determine (lr follows the batch size)
    setting_extra = extra_columns(done, _SHOWN, lambda k: not is_method_key(k))
    out: list[Family] = []
    labelled = sorted(((setting_label(rs[0], setting_extra), s) for s, rs in by_setting.items()),
                      key=lambda x: x[0])  # fmt: skip
    for fam, (slabel, setting) in enumerate(labelled):
        runs = by_setting[setting]
        bases = _group([r for r in runs if r.method == "baseline"], method_of)
        if not bases:
            continue
        base = next(iter(bases.values()))
        cells = _group([r for r in runs if r.method != "baseline" and treated(r)], config_of)
        if not cells:
            continue
        # the knobs that tell apart configurations of one method at one α
        knobs = extra_columns([r for rs in cells.values() for r in rs], ["method", "alpha"],
                              lambda k: k.startswith("method.") and k != "method.name")  # fmt: skip
        made = []
        for cfg, rs in cells.items():
            ident = (rs[0].config or {}).get("identity", {})
            made.append(Cell(cfg, config_key(ident), treatment_label(rs[0], knobs), rs))
        made.sort(key=lambda c: (c.label.split(" ")[0], _alpha_of(c.runs[0]), c.label))
        out.append(Family(fam, slabel, base, made))
    return out


def judge(
    done: Sequence[RunRecord],
    table: str,
    treated: Callable[[RunRecord], bool],
    metric: str = "test_acc",
    margin: float = MARGIN,
    selected_on: str = "test",
) -> list[Judged]:
    """Every treatment among ``done`` (those ``treated`` accepts) against the baseline of its
    setting, one family per setting, in the settings' and treatments' readable order."""
    direction(metric)
    out: list[Judged] = []
    for fam in families(done, treated):
        m = len(fam.cells)
        bvals = values_of(fam.baseline, metric)
        for c in fam.cells:
            res = compare(values_of(c.runs, metric), bvals, metric, margin, m)
            out.append(Judged(table, fam.setting, c.label, "baseline", c.config, c.key, res,
                              selected_on, (fam.index, fam.setting)))  # fmt: skip
    return out


def _alpha_of(r: RunRecord) -> float:
    return -1.0 if r.alpha is None else r.alpha


@dataclass(frozen=True)
class SweepVerdicts:
    """A sweep's verdict lines and, per configuration (its config key), its verdict."""

    lines: list[str]
    by_config: dict[str, Judged]


def sweep_verdicts(
    runs: Sequence[RunRecord], metric: str = "test_acc", margin: float = MARGIN
) -> SweepVerdicts:
    """Every configuration of a sweep's ``done`` runs against the baseline of its setting
    (one family per setting): what the sweep's MLflow parent shows."""
    from analysis.render import verdict_line

    done = [r for r in runs if r.status == "done"]
    judged = judge(done, "sweep", lambda r: True, metric, margin)
    return SweepVerdicts([verdict_line(j) for j in judged], {j.key: j for j in judged})
