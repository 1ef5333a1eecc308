"""Paper-style figures from ``done`` runs: PNGs written with matplotlib's Agg backend.

Figures (numbers refer to "Altering Backward Pass Gradients improves Convergence"):

* **α grid** (Figs. 10-13): per (data, model, epochs, batch_size, schedule) group with PGT
  runs at >= 2 distinct α: test and train top-1 (%) vs α, mean over seeds with the sample
  std as error bars (n >= 2), the baseline's mean as a horizontal line, the best α (highest
  mean test top-1) marked.
* **Fig. 8**: final logit norm and final test loss vs α (same groups), and test loss
  against logit norm with the least-squares line (:func:`logit_norm_regression`).
* **Norm profiles** (Figs. 5-7, 14-17), from each run's artifacts in its own folder
  (``RunRecord.run_dir``, where its job wrote them, whichever store the run is in):
  per-filter L2 norm vs optimiser step of one layer, a grid of every layer, and the sorted
  per-channel pooled-feature norms.

:func:`zeroed_filters_table` lists zeroed filters (norm < 1e-8) per layer at each run's
last snapshot, from the store's ``filter_stats`` rows (:meth:`Store.last_filter_stats`).
Missing data never raises: the figure is skipped.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.configs import (  # noqa: E402
    extra_columns,
    extra_values,
    group_by,
    is_method_key,
    method_of,
    setting_of,
)
from analysis.render import fmt_key  # noqa: E402
from analysis.stats import summarize  # noqa: E402
from analysis.zeroed import ZEROED_HEADER, zeroed_by_layer, zeroed_filters_table  # noqa: E402, F401
from sweeper.store import RunRecord  # noqa: E402

DPI = 110
ZERO_NORM = 1e-8  # same threshold as trainers.records.ZERO_NORM
MAX_PROFILE_RUNS = 6
MAX_GROUPS = 12  # settings (data, model, epochs, batch, schedule) drawn per figure kind
PAPER_FIT = (0.01074, 0.25816)  # Fig. 8: loss = 0.01074 * logit_norm + 0.25816
SETTING_COLUMNS = ["data", "model", "epochs", "batch_size", "schedule", "optimizer"]


class GroupKey(NamedTuple):
    """What one α figure (or Fig. 8) is drawn for: a setting and one PGT configuration.
    ``extra``: the identity keys that tell it apart from others with the same data, model,
    epochs, batch and schedule (``lr``, ``method.pgt_impl``...; :mod:`analysis.configs`)."""

    data: str
    model: str
    epochs: int
    batch_size: int
    schedule: str
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Figure:
    """One PNG written by :func:`make_figures`."""

    path: Path  # the PNG written
    title: str
    caption: str  # one or two sentences: what it shows, units


@dataclass(frozen=True)
class Regression:
    """Least-squares line ``y = slope * x + intercept`` and Pearson's r over n points."""

    slope: float
    intercept: float
    r: float  # Pearson correlation
    n: int


@dataclass(frozen=True)
class AlphaSeries:
    """One group's PGT accuracies per α (the plotted series of the α-grid figure).

    Lists are aligned with ``alphas`` (ascending); std is None where n < 2; accuracies in
    percent. ``baseline_*`` are None when the group has no done baseline run.
    """

    group: GroupKey
    alphas: list[float]
    n: list[int]
    test_mean: list[float]
    test_std: list[float | None]
    train_mean: list[float | None]
    train_std: list[float | None]
    baseline_test: float | None
    baseline_train: float | None
    baseline_n: int
    best_alpha: float


# ----------------------------------------------------------------------------- helpers
def logit_norm_regression(x: Sequence[float], y: Sequence[float]) -> Regression:
    """Fit ``y = slope * x + intercept`` (``numpy.polyfit`` degree 1), r = Pearson (Fig. 8).

    Needs >= 2 points with distinct x; r is NaN when y is constant.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError("x and y must be 1-d sequences of the same length")
    if xa.size < 2 or np.ptp(xa) == 0:
        raise ValueError("need at least 2 points with distinct x")
    slope, intercept = np.polyfit(xa, ya, 1)
    r = float(np.corrcoef(xa, ya)[0, 1]) if np.ptp(ya) > 0 else math.nan
    return Regression(float(slope), float(intercept), r, int(xa.size))


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _done(records: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.status == "done"]


def _group(r: RunRecord, extra: Sequence[str] = ()) -> GroupKey:
    # runs of another optimiser than the paper's SGD are a setting of their own
    sched = r.schedule if r.optimizer == "sgd" else f"{r.schedule}, {r.optimizer}"
    more = tuple(extra_values(r, extra).items())
    return GroupKey(r.data, r.model, r.epochs, r.batch_size, sched, more)


def _group_order(g: GroupKey) -> tuple[object, ...]:
    return (*g[:5], tuple((k, v is None, repr(v)) for k, v in g.extra))


def _group_label(g: GroupKey) -> str:
    more = "".join(f", {k} {fmt_key(v)}" for k, v in g.extra)
    return f"{g.data} / {g.model}, {g.epochs} epochs, batch {g.batch_size}, {g.schedule}{more}"


def _slug_of(g: GroupKey) -> str:
    return _slug(*g[:5], *(f"{k}-{fmt_key(v)}" for k, v in g.extra))


def _pgt_groups(
    records: Sequence[RunRecord], ok: Callable[[RunRecord], bool]
) -> tuple[dict[GroupKey, list[RunRecord]], dict[GroupKey, list[RunRecord]]]:
    """The done PGT runs per (setting, PGT configuration), and each group's baseline: the
    baseline runs of the same setting (every key but the method's and α). Runs failing
    ``ok`` are left out; a setting with baseline runs only is a group of its own."""
    done = [r for r in _done(records) if ok(r)]
    pgt = [r for r in done if r.method == "pgt" and r.alpha is not None]
    base = [r for r in done if r.method == "baseline"]
    s_extra = extra_columns(pgt + base, SETTING_COLUMNS, lambda k: not is_method_key(k))
    m_extra = extra_columns(pgt, ["method"], lambda k: is_method_key(k) and k != "alpha",
                            within=setting_of)  # fmt: skip
    extra = [*s_extra, *m_extra]
    bases = group_by(base, setting_of)
    groups: dict[GroupKey, list[RunRecord]] = {}
    baselines: dict[GroupKey, list[RunRecord]] = {}
    for (setting, _), runs in group_by(pgt, lambda r: (setting_of(r), method_of(r))).items():
        g = _group(runs[0], extra)
        groups[g], baselines[g] = runs, bases.get(setting, [])
    with_pgt = {setting_of(r) for r in pgt}
    for setting, runs in bases.items():
        if setting not in with_pgt:
            g = _group(runs[0], extra)
            groups[g], baselines[g] = [], runs
    return groups, baselines


def _slug(*parts: object) -> str:
    s = "_".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")


def _fmt(v: float) -> str:
    return f"{v:g}"


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _label_axes(ax: plt.Axes, xlabel: str, ylabel: str, legend: int | None = 8) -> None:
    """Axis labels, a light grid and (font size ``legend``) the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend is not None:
        ax.legend(fontsize=legend)


def _run_label(r: RunRecord) -> str:
    a = f" α={_fmt(r.alpha)}" if r.alpha is not None else ""
    return f"{r.method}{a} seed {r.seed}"


# ----------------------------------------------------------------------------- α grid
def alpha_series(records: Sequence[RunRecord]) -> list[AlphaSeries]:
    """Per setting and PGT configuration, mean / std test and train top-1 per α over done
    runs (Figs. 10-13): only the seeds of one configuration are averaged.

    Only groups with done ``pgt`` runs (finite test accuracy) at >= 2 distinct α; the
    baseline is the done ``baseline`` runs of the same setting. Ordered by group key.
    """
    groups, baselines = _pgt_groups(records, lambda r: _finite(r.test_acc))
    out: list[AlphaSeries] = []
    for g in sorted(groups, key=_group_order):
        by_alpha: dict[float, list[RunRecord]] = defaultdict(list)
        for r in groups[g]:
            by_alpha[float(r.alpha)].append(r)  # type: ignore[arg-type]
        if len(by_alpha) < 2:
            continue
        alphas = sorted(by_alpha)
        test = [summarize([float(r.test_acc) for r in by_alpha[a]]) for a in alphas]  # type: ignore[arg-type]
        train = [
            summarize([float(r.train_acc) for r in by_alpha[a] if _finite(r.train_acc)])  # type: ignore[arg-type]
            for a in alphas
        ]
        base = baselines[g]
        b_test = summarize([float(r.test_acc) for r in base])  # type: ignore[arg-type]
        b_train = summarize([float(r.train_acc) for r in base if _finite(r.train_acc)])  # type: ignore[arg-type]
        means = [float(t.mean) for t in test]  # type: ignore[arg-type]
        out.append(
            AlphaSeries(
                group=g,
                alphas=alphas,
                n=[t.n for t in test],
                test_mean=means,
                test_std=[t.std for t in test],
                train_mean=[t.mean for t in train],
                train_std=[t.std for t in train],
                baseline_test=b_test.mean,
                baseline_train=b_train.mean,
                baseline_n=b_test.n,
                best_alpha=alphas[int(np.argmax(means))],
            )
        )
    return out


def _errbar(
    ax: plt.Axes, x: list[float], mean: list[float | None], std: list[float | None], **kw: object
) -> None:
    pts = [(a, m, s) for a, m, s in zip(x, mean, std, strict=True) if m is not None]
    if not pts:
        return
    xs, ms, ss = zip(*pts, strict=True)
    err = [0.0 if s is None else s for s in ss]
    ax.errorbar(xs, ms, yerr=err if any(s is not None for s in ss) else None, capsize=3, **kw)  # type: ignore[arg-type]


def _alpha_figure(s: AlphaSeries, out_dir: Path) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _errbar(ax, s.alphas, list(s.test_mean), s.test_std, marker="o", color="C0", label="PGT test")
    _errbar(ax, s.alphas, s.train_mean, s.train_std, marker="s", color="C1", label="PGT train")
    if s.baseline_test is not None:
        ax.axhline(s.baseline_test, color="C0", ls="--", lw=1, label="baseline test")
    if s.baseline_train is not None:
        ax.axhline(s.baseline_train, color="C1", ls="--", lw=1, label="baseline train")
    i = s.alphas.index(s.best_alpha)
    ax.plot([s.best_alpha], [s.test_mean[i]], marker="*", ms=16, color="C3", ls="none",
            label=f"best α = {_fmt(s.best_alpha)}")  # fmt: skip
    _label_axes(ax, "PGT α", "top-1 accuracy (%)")
    title = f"Top-1 vs α: {_group_label(s.group)}"
    ax.set_title(title, fontsize=9)
    path = _save(fig, out_dir / f"alpha_grid_{_slug_of(s.group)}.png")
    base = (
        f"dashed: baseline mean (n={s.baseline_n})" if s.baseline_test is not None
        else "no baseline run"
    )  # fmt: skip
    caption = (
        f"PGT test and train top-1 accuracy (%) vs α, mean over seeds (n per α: "
        f"{', '.join(map(str, s.n))}; error bars: sample std where n ≥ 2); {base}. "
        f"Best α = {_fmt(s.best_alpha)} with mean test top-1 {s.test_mean[i]:.2f} % "
        "(cf. the paper's Figs. 10-13)."
    )
    return Figure(path, title, caption)


# ----------------------------------------------------------------------------- Fig. 8
class Fig8Point(NamedTuple):
    """One done baseline or PGT run of a Fig. 8 group."""

    method: str
    alpha: float | None
    logit_norm: float
    test_loss: float


def _fig8_groups(records: Sequence[RunRecord]) -> list[tuple[GroupKey, list[Fig8Point]]]:
    """Per setting and PGT configuration, its done PGT runs and the setting's baseline runs
    with a finite logit norm and test loss."""
    groups, baselines = _pgt_groups(
        records, lambda r: _finite(r.logit_norm) and _finite(r.test_loss)
    )
    out = []
    for g in sorted(groups, key=_group_order):
        pts = [Fig8Point(r.method, r.alpha, float(r.logit_norm), float(r.test_loss))  # type: ignore[arg-type]
               for r in [*baselines[g], *groups[g]]]  # fmt: skip
        out.append((g, pts))
    return out


def _fig8(g: GroupKey, pts: list[Fig8Point], out_dir: Path) -> list[Figure]:
    """One group's Fig. 8: logit norm and test loss vs α, and loss against logit norm."""
    figs: list[Figure] = []
    slug = _slug_of(g)
    by_alpha: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for p in pts:
        if p.method == "pgt" and p.alpha is not None:
            by_alpha[float(p.alpha)].append((p.logit_norm, p.test_loss))
    base = [(p.logit_norm, p.test_loss) for p in pts if p.method == "baseline"]
    if len(by_alpha) >= 2:
        alphas = sorted(by_alpha)
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
        for ax, col, name in ((axes[0], 0, "logit norm"), (axes[1], 1, "test loss")):
            sums = [summarize([p[col] for p in by_alpha[a]]) for a in alphas]
            _errbar(ax, alphas, [s.mean for s in sums], [s.std for s in sums],
                    marker="o", color="C0", label="PGT")  # fmt: skip
            if base:
                ax.axhline(float(np.mean([b[col] for b in base])), color="k", ls="--",
                           lw=1, label="baseline")  # fmt: skip
            _label_axes(ax, "PGT α", name)
        title = f"Logit norm and test loss vs α: {_group_label(g)}"
        fig.suptitle(title, fontsize=9)
        path = _save(fig, out_dir / f"fig8_alpha_{slug}.png")
        caption = (
            "Final logit norm (mean L2 norm of the logit vector over the test set) and final "
            "test cross-entropy loss vs PGT α, mean over seeds with sample std "
            "(the paper's Fig. 8)."
        )
        figs.append(Figure(path, title, caption))
    x = [p.logit_norm for p in pts]
    y = [p.test_loss for p in pts]
    if len(pts) < 3 or np.ptp(x) == 0:
        return figs
    reg = logit_norm_regression(x, y)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, color in (("baseline", "k"), ("pgt", "C0")):
        xs = [p.logit_norm for p in pts if p.method == method]
        ys = [p.test_loss for p in pts if p.method == method]
        if xs:
            ax.scatter(xs, ys, color=color, s=22, label=method)
    xx = np.linspace(min(x), max(x), 50)
    ax.plot(xx, reg.slope * xx + reg.intercept, color="C3",
            label=f"fit: {reg.slope:.4g} x + {reg.intercept:.4g}")  # fmt: skip
    _label_axes(ax, "logit norm", "test loss")
    title = f"Test loss vs logit norm: {_group_label(g)}"
    ax.set_title(title, fontsize=9)
    path = _save(fig, out_dir / f"fig8_regression_{slug}.png")
    caption = (
        f"Final test loss against final logit norm of done baseline and PGT runs "
        f"(n {reg.n}) with the least-squares line: slope {reg.slope:.4g}, intercept "
        f"{reg.intercept:.4g}, r {reg.r:.3g} (paper's Fig. 8: "
        f"{PAPER_FIT[0]} x + {PAPER_FIT[1]})."
    )
    figs.append(Figure(path, title, caption))
    return figs


# ----------------------------------------------------------------------------- norms
def _load_filter_norms(run_dir: Path) -> tuple[np.ndarray, list[str], list[np.ndarray]] | None:
    """All snapshots of a run: steps (S,), layer names, per-layer (S, n_filters) arrays."""
    files = sorted((run_dir / "filter_norms").glob("epoch_*.npz"))
    steps: list[np.ndarray] = []
    layers: list[list[np.ndarray]] = []
    names: list[str] = []
    try:
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                keys = sorted(k for k in z.files if re.fullmatch(r"L\d+", k))
                if not keys:
                    continue
                if not layers:
                    layers = [[] for _ in keys]
                    names = [str(n) for n in z["names"]] if "names" in z.files else keys
                if len(keys) != len(layers):
                    return None
                steps.append(np.asarray(z["steps"]).reshape(-1))
                for i, k in enumerate(keys):
                    layers[i].append(np.asarray(z[k], dtype=float).reshape(len(steps[-1]), -1))
    except (OSError, ValueError, KeyError):
        return None
    if not steps:
        return None
    try:
        arrays = [np.concatenate(parts, axis=0) for parts in layers]
    except ValueError:
        return None
    if len(names) != len(arrays):
        names = [f"L{i:03d}" for i in range(1, len(arrays) + 1)]
    return np.concatenate(steps), names, arrays


def _pick_layer(names: list[str], arrays: list[np.ndarray]) -> int:
    zeros = [int((a[-1] < ZERO_NORM).sum()) for a in arrays]
    if max(zeros) > 0:
        return int(np.argmax(zeros))
    for i, n in enumerate(names):
        if "conv" in n.lower():
            return i
    return 0


def _profile_runs(records: Sequence[RunRecord]) -> list[tuple[RunRecord, Path]]:
    """At most MAX_PROFILE_RUNS done runs with an artifact folder, one per method."""
    chosen: dict[str, tuple[RunRecord, Path]] = {}
    order = sorted(
        _done(records),
        key=lambda r: (r.method, -1.0 if r.alpha is None else r.alpha, r.seed, r.id),
    )
    for r in order:
        if r.method in chosen or not r.run_dir:
            continue
        d = Path(r.run_dir)
        if d.is_dir():
            chosen[r.method] = (r, d)
        if len(chosen) >= MAX_PROFILE_RUNS:
            break
    return list(chosen.values())


def _norm_figures(r: RunRecord, run_dir: Path, out_dir: Path) -> list[Figure]:
    loaded = _load_filter_norms(run_dir)
    if loaded is None:
        return []
    steps, names, arrays = loaded
    label = _run_label(r)
    slug = _slug("run", r.id, r.method)
    figs: list[Figure] = []
    li = _pick_layer(names, arrays)
    a = arrays[li]
    nz = int((a[-1] < ZERO_NORM).sum())
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(steps, a, lw=0.6, alpha=0.7)
    _label_axes(ax, "optimiser step", "filter L2 norm", legend=None)
    title = f"Filter norms, layer {li + 1} ({names[li]}): {r.model} {label}"
    ax.set_title(title, fontsize=9)
    path = _save(fig, out_dir / f"filter_norms_{slug}_L{li + 1:03d}.png")
    figs.append(
        Figure(
            path,
            title,
            f"L2 norm of each of the {a.shape[1]} filters of layer {li + 1} ({names[li]}) vs "
            f"optimiser step, one line per filter; {nz} filter(s) below 1e-8 at the last "
            "snapshot (cf. the paper's Figs. 5-7).",
        )
    )
    n = len(arrays)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.plot(steps, arrays[i], lw=0.4, alpha=0.7)
        z = int((arrays[i][-1] < ZERO_NORM).sum())
        ax.set_title(f"{i + 1}" + (f" ({z} zero)" if z else ""), fontsize=7)
        ax.tick_params(labelsize=5)
    title = f"Filter norms of all layers: {r.model} {label}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = _save(fig, out_dir / f"filter_norms_grid_{slug}.png")
    total_zero = sum(int((x[-1] < ZERO_NORM).sum()) for x in arrays)
    figs.append(
        Figure(
            path,
            title,
            f"Per-filter L2 norm vs optimiser step for each of the {n} conv/linear layers "
            f"(layer index in each title); {total_zero} filter(s) below 1e-8 at the last "
            "snapshot (cf. the paper's Figs. 14-17).",
        )
    )
    return figs


def _feature_figure(runs: list[tuple[RunRecord, Path]], out_dir: Path) -> Figure | None:
    curves: list[tuple[str, np.ndarray, int]] = []
    for r, d in runs:
        f = d / "feature_norms.json"
        try:
            v = np.asarray(json.loads(f.read_text(encoding="utf-8")), dtype=float).reshape(-1)
        except (OSError, ValueError, TypeError):
            continue
        if v.size == 0:
            continue
        curves.append((_run_label(r), np.sort(v)[::-1], int((v < ZERO_NORM).sum())))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, v, z in curves:
        ax.plot(np.arange(1, v.size + 1), v, lw=1.2, label=f"{label}: {z}/{v.size} zeroed")
    _label_axes(ax, "channel (sorted by norm)", "L2 norm over the test set", legend=7)
    title = "Pooled-feature norms per channel"
    ax.set_title(title, fontsize=9)
    path = _save(fig, out_dir / "feature_norms.png")
    caption = (
        "Per-channel L2 norm over the test set of the pooled feature vector before the "
        "classifier, sorted in descending order; the legend counts channels below 1e-8 "
        "(cf. the paper's Figs. 5-7)."
    )
    return Figure(path, title, caption)


# ----------------------------------------------------------------------------- entry
def make_figures(records: Sequence[RunRecord], out_dir: Path) -> list[Figure]:
    """Write every figure the data allows into ``out_dir`` (created) and return them.

    Only ``done`` runs are plotted. α grids (Figs. 10-13) need PGT at >= 2 α; Fig. 8 needs
    final logit norm and test loss; norm profiles (Figs. 5-7, 14-17) need the runs'
    artifact folders (``RunRecord.run_dir``). Figures whose data is absent are skipped; []
    when nothing can be drawn.
    """
    done = _done(records)
    if not done:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A big store has hundreds of settings; each figure costs matplotlib time and a page
    # of hundreds is unreadable: draw the settings with the most runs, say so.
    sizes = Counter(_group(r) for r in done)
    shown = {g for g, _ in sizes.most_common(MAX_GROUPS)}
    capped = [r for r in done if _group(r) in shown]
    runs = _profile_runs(done)
    tasks: list[_Task] = [(_alpha_figures, (s, out_dir)) for s in alpha_series(capped)]
    tasks += [(_fig8, (g, pts, out_dir)) for g, pts in _fig8_groups(capped)]
    tasks += [(_norm_figures, (r, d, out_dir)) for r, d in runs]
    tasks.append((_feature_figures, (runs, out_dir)))
    figs = _draw(tasks)
    if len(sizes) > MAX_GROUPS and figs:
        figs[0] = replace(
            figs[0],
            caption=figs[0].caption
            + (
                f" Figures show the {MAX_GROUPS} of {len(sizes)} settings with the most runs; "
                "narrow the report with --model, --data, --method or --sweep for the others."
            ),
        )
    return figs


_Task = tuple[Callable[..., list[Figure]], tuple[Any, ...]]


def _alpha_figures(s: AlphaSeries, out_dir: Path) -> list[Figure]:
    return [_alpha_figure(s, out_dir)]


def _feature_figures(runs: list[tuple[RunRecord, Path]], out_dir: Path) -> list[Figure]:
    f = _feature_figure(runs, out_dir)
    return [] if f is None else [f]


def _draw(tasks: list[_Task]) -> list[Figure]:
    """Run the figure tasks in order and concatenate their figures.

    Why processes: matplotlib draws one figure at a time under the GIL, and the figures are
    most of a big report's time (benchmarks/analysis_report.py). Each task writes its own
    files, so forked workers
    (the parent's imports and data come for free) draw them side by side. Serial when
    there is one CPU, few tasks, no ``fork`` (macOS/Windows default to spawn, whose
    start-up costs more than it saves here) or other threads in this process (forking a
    threaded process can deadlock on a lock held by a thread that does not exist in the
    child).
    """
    workers = min(os.cpu_count() or 1, len(tasks) // 2, 4)
    if workers < 2 or threading.active_count() > 1 or "fork" not in mp.get_all_start_methods():
        return [f for fn, args in tasks for f in fn(*args)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(fn, *args) for fn, args in tasks]
        return [f for fut in futures for f in fut.result()]
