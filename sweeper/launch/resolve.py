"""``python -m sweeper resolve sweep=ID``: the seeds that unresolved comparisons need, planned
once, trained like any grid, then the final verdicts (docs/resolve.md).

1. The pilot: the done runs of the sweep(s) (``model=``, ``data=`` narrow the runs,
   ``method=`` the treatments; a baseline is always read).
2. Its families and the plan (:mod:`analysis.planning`): the pilot look, Stein's total per
   side for each unresolved comparison (capped at ``max_seeds``), the same new seeds for a
   treatment and its baseline.
3. The points: each planned seed composed from the pilot sweep's own command -- its grid
   expanded as our sweeper expands it, each point matched to its run by config hash -- with
   ``seed=K``. A configuration the command no longer composes is refused, so nothing that
   exists is trained under a new hash.
4. The plan printed, with its predicted cost (:mod:`sweeper.launch.cost`); ``budget``
   checked; ``dry_run=true`` stops here. Nothing is written before this point.
5. A grid sweep linked to its parent (``sweeps.parent_id``), run by
   :func:`~sweeper.launch.grid.run_grid`: fused, local or Slurm, ``hydra.launcher.*``;
   a run that exists is never trained again, so a killed resolve resumes by running the
   same command.
6. The final verdicts, the report's lines: the pilot's are final where nothing was planned.
   The same command again plans the same seeds (the plan reads only the pilot), trains
   nothing and prints the same verdicts.
"""

from __future__ import annotations

import datetime as dt
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.inference import MARGIN
from analysis.planning import LEVEL_FINAL, LEVEL_PILOT, MAX_SEEDS, SeedPlan, final_look, plan_family
from sweeper.config.launcher import LauncherParams
from sweeper.config.schema import Config
from sweeper.errors import Failed
from sweeper.launch.cost import Prediction
from sweeper.launch.dispatch import Point
from sweeper.store import RunRecord, RunStatus, Store, StoreError, SweepRecord, display_url
from trainers.registry import ConfigError

USAGE = (
    "usage: python -m sweeper resolve sweep=ID[,ID] [max_seeds=10] [margin=0.2] "
    "[metric=test_acc] [budget=HOURS] [dry_run=true] [model=M] [method=M] [data=D] "
    "[results_dir=DIR] [store.url=URL] [hydra/launcher=slurm] [hydra.launcher.KEY=VALUE ...]"
)
KEYS = ("sweep", "model", "method", "data", "max_seeds", "margin", "metric", "budget",
        "dry_run", "results_dir", "store.url")  # fmt: skip
# a pilot command's settings that resolve replaces with its own
_DROPPED = ("hydra.launcher.", "hydra/launcher=", "hydra.sweeper.", "hydra/sweeper=", "-")

HELP = f"""{USAGE}

For each comparison of the sweep(s) that is unresolved (treatment vs the baseline of its
setting, on the report's metric), plan once the total seeds per side from the pilot's spread
(Stein's two-stage rule, capped at max_seeds), add the missing seeds of the treatment and its
baseline as a new sweep linked to the first, train them like any grid, and print the final
verdicts. Comparisons resolved by the pilot get no seed; a run that exists is never trained
again. The plan and its predicted cost (GPU-h, or CPU-h on a CPU-only store) are printed
before anything starts; budget=HOURS refuses a plan predicted to cost more; dry_run=true
prints the plan and stops. The pilot look and the final look each spend half of the 5 %
error budget, so better/worse on A/A comparisons stays under 5 % (docs/resolve.md)."""


@dataclass
class ResolveArgs:
    sweeps: list[int]
    models: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    datas: list[str] = field(default_factory=list)
    max_seeds: int = MAX_SEEDS
    margin: float = MARGIN
    metric: str = "test_acc"
    budget: float | None = None
    dry_run: bool = False
    results_dir: str | None = None
    store_url: str | None = None
    launcher: list[str] = field(default_factory=list)  # hydra/launcher=, hydra.launcher.*

    def url(self) -> str:
        from sweeper.store import default_url

        return self.store_url or default_url(self.results_dir or "./results")


def _number(key: str, value: str, allowed: str, ok: Callable[[float], bool]) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and ok(x)):
        shown = value if len(value) <= 40 else f"{value[:8]}...({len(value)} characters)"
        raise ConfigError(f"{key}={shown} is not allowed; expected {allowed}")
    return x


def parse_args(argv: Sequence[str]) -> ResolveArgs:
    """The command line, checked: one line naming a bad value and what is allowed."""
    from analysis.comparisons import metric_choices

    vals: dict[str, str] = {}
    launcher: list[str] = []
    for a in argv:
        if a.startswith(("hydra.launcher.", "hydra/launcher=")):
            launcher.append(a)
            continue
        key, eq, value = a.partition("=")
        if not eq or key not in KEYS:
            raise ConfigError(f"resolve does not take {a!r}; {USAGE}")
        if key in vals:
            raise ConfigError(f"{key} is given twice ({key}={vals[key]} and {a})")
        vals[key] = value
    if "sweep" not in vals:
        raise ConfigError(
            f"resolve needs sweep=ID (the sweep whose comparisons it resolves); {USAGE}"
        )
    ids = vals["sweep"].split(",")
    if not all(i.strip().isdigit() and len(i.strip()) <= 18 for i in ids):
        raise ConfigError(f"sweep={vals['sweep']} is not allowed; expected sweep ids "
                          "(numbers, comma-separated)")  # fmt: skip
    out = ResolveArgs(sweeps=list(dict.fromkeys(int(i) for i in ids)), launcher=launcher)
    for key, attr in (("model", "models"), ("method", "methods"), ("data", "datas")):
        if key in vals:
            setattr(out, attr, [v for v in vals[key].split(",") if v])
    if "max_seeds" in vals:
        v = vals["max_seeds"]
        if not (v.isdigit() and len(v) <= 6 and int(v) >= 2):
            shown = v if len(v) <= 40 else f"{v[:8]}...({len(v)} characters)"
            raise ConfigError(f"max_seeds={shown} is not allowed; expected an integer >= 2 "
                              "(seeds per side, at most 999999)")  # fmt: skip
        out.max_seeds = int(v)
    if "margin" in vals:
        out.margin = _number("margin", vals["margin"], "a number > 0 (in the metric's units: "
                             "percentage points for accuracies)", lambda x: x > 0)  # fmt: skip
    if "metric" in vals:
        if vals["metric"] not in metric_choices():
            raise ConfigError(f"metric={vals['metric']} is not allowed; expected one of "
                              f"{', '.join(metric_choices())}")  # fmt: skip
        out.metric = vals["metric"]
    if "budget" in vals:
        out.budget = _number("budget", vals["budget"], "a number of hours >= 0 (GPU-h, or "
                             "CPU-h on a CPU-only store)", lambda x: x >= 0)  # fmt: skip
    if "dry_run" in vals:
        if vals["dry_run"] not in ("true", "false"):
            raise ConfigError(f"dry_run={vals['dry_run']} is not allowed; expected true or false")
        out.dry_run = vals["dry_run"] == "true"
    out.results_dir = vals.get("results_dir")
    out.store_url = vals.get("store.url")
    return out


# ---------------------------------------------------------------------------- the plan
@dataclass
class Side:
    """One configuration whose seeds the plan adds to: its pilot runs, the overrides that
    compose it, and the seeds it needs."""

    runs: list[RunRecord]
    overrides: list[str]
    label: str  # its pilot point's label, seed left out
    seeds: set[int] = field(default_factory=set)


@dataclass
class Planned:
    """One comparison: who against whom, its plan, and its sides."""

    setting: str
    family: int
    family_size: int
    treatment: str
    key: str
    config: Any
    plan: SeedPlan
    treat: Side
    base: Side


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _with_seed(label: str, seed: int) -> str:
    kept = [t for t in label.split() if _key(t) != "seed"]
    return " ".join([*kept, f"seed={seed}"])


class Composer:
    """Configs composed as ``python -m sweeper OVERRIDES`` composes them, inside one Hydra
    context (a context per point would re-read the config directory each time); a point's
    typed config by the launcher's own :class:`~sweeper.config.compose.PointComposer`, which
    merges each combination of config groups once instead of once a point."""

    def __init__(self) -> None:
        from hydra import initialize_config_dir
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.utils import create_config_search_path
        from hydra.types import RunMode

        from sweeper.config.compose import CONF_DIR, PointComposer, hydra_error_line
        from sweeper.config.schema import register_configs

        register_configs()
        self._ctx = initialize_config_dir(str(CONF_DIR), version_base="1.3")
        self._ctx.__enter__()
        loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
        try:
            master = loader.load_configuration("config", [], run_mode=RunMode.MULTIRUN)
        except Exception as e:
            raise ConfigError(hydra_error_line(e)) from None
        self._points = PointComposer(loader, master)

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)

    def dict(self, overrides: list[str], hydra: bool = False) -> Any:
        from hydra import compose as hydra_compose

        from sweeper.config.compose import hydra_error_line

        try:
            return hydra_compose("config", overrides=overrides, return_hydra_config=hydra)
        except Exception as e:
            raise ConfigError(hydra_error_line(e)) from None

    def config(self, overrides: list[str]) -> Config:
        from sweeper.config.compose import hydra_overrides_for_compose

        return self._points.compose(hydra_overrides_for_compose(overrides))

    def launcher(self, overrides: list[str]) -> LauncherParams:
        """``hydra/launcher=`` and ``hydra.launcher.*`` as our launcher plugin reads them."""
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(self.dict(overrides, hydra=True).hydra.launcher, resolve=True)
        assert isinstance(node, dict)
        node.pop("_target_", None)
        params = LauncherParams(**{str(k): v for k, v in node.items()})
        params.validate()
        return params

    def grid(self, sweep: SweepRecord) -> list[list[str]]:
        """The points of a grid sweep's command, expanded as our sweeper expands them (its
        preset's ``hydra.sweeper.params`` first, then the command line)."""
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        argv = shlex.split(sweep.command)
        search = any(a.startswith("hydra/sweeper=") and not a.endswith("=gradsweep") for a in argv)
        if search or any(a.startswith("hydra.sweeper.") and not a.startswith("hydra.sweeper.params")
                         for a in argv):  # fmt: skip
            raise ConfigError(f"sweep {sweep.id} is a search: resolve adds seeds to a grid sweep's "
                              "comparisons (run its best configurations as a grid, then resolve)")  # fmt: skip
        kept = [a for a in argv if not a.startswith(_DROPPED)]
        parser = OverridesParser.create()
        try:
            parsed = parser.parse_overrides(kept)
        except Exception as e:
            raise ConfigError(f"sweep {sweep.id}'s command cannot be read again: {e}") from None
        fixed = [ov.input_line for ov in parsed if not ov.is_sweep_override() and ov.input_line]
        params = self.dict(fixed, hydra=True).hydra.sweeper.get("params")
        grid = OmegaConf.to_container(params) if OmegaConf.is_config(params) else None
        preset = [f"{k}={v}" for k, v in grid.items()] if isinstance(grid, dict) else []
        batches = BasicSweeper.split_arguments(parser.parse_overrides(preset + kept), None)
        return [list(p) for p in batches[0]] if batches else []


@dataclass
class Plan:
    pilot: list[SweepRecord]
    comparisons: list[Planned]
    points: list[Point]
    todo: list[Point]  # the points whose run is not done yet
    launcher: LauncherParams
    side_of: dict[str, Side]  # a point's config hash -> the configuration it adds a seed to


def _pilot_templates(store: Store, composer: Composer, sweeps: list[SweepRecord],
                     args: ResolveArgs, url: str) -> dict[str, tuple[list[str], str]]:  # fmt: skip
    """config hash -> (the overrides that compose it, its point's label), for every point
    of the pilot sweeps' commands; the store's own overrides given to resolve replace the
    pilot's, and a point that composes to another store is refused."""
    from sweeper.config.identity import identity_of, preflight

    own = ([f"results_dir={args.results_dir}"] if args.results_dir else []) + (
        [f"store.url={args.store_url}"] if args.store_url else [])  # fmt: skip
    out: dict[str, tuple[list[str], str]] = {}
    for sw in sweeps:
        labels = {r.config_hash: link.point for link, r in store.sweep_runs(sw.id)}
        for ov in composer.grid(sw):
            ov = [o for o in ov if not (own and _key(o) in ("results_dir", "store.url"))] + own
            cfg = composer.config(ov)
            if cfg.store_url() != url:
                raise ConfigError(f"sweep {sw.id}'s points write to {display_url(cfg.store_url())}, "
                                  f"not to {display_url(url)}: pass the store they were written to "
                                  "(results_dir= or store.url=)")  # fmt: skip
            preflight(cfg)
            _, chash = identity_of(cfg)
            if chash in labels:
                out.setdefault(chash, (ov, labels[chash]))
    return out


def make_plan(args: ResolveArgs, store: Store) -> Plan:
    """Read the pilot, plan, compose the points. Writes nothing."""
    from analysis.comparisons import families, values_of
    from sweeper.config.identity import identity_of, preflight
    from sweeper.store import RunQuery

    known = {s.id: s for s in store.sweeps()}
    unknown = [i for i in args.sweeps if i not in known]
    if unknown:
        listed = ", ".join(map(str, known)) or "none"
        raise ConfigError(f"unknown sweep {', '.join(map(str, unknown))}; known: {listed}")
    pilot = [known[i] for i in args.sweeps]
    for sw in pilot:
        if sw.parent_id is not None:
            raise ConfigError(f"sweep {sw.id} is a resolve sweep (of sweep {sw.parent_id}): "
                              f"resolve sweep={sw.parent_id} instead")  # fmt: skip
    runs = store.runs(RunQuery(sweeps=args.sweeps, models=args.models, datas=args.datas))
    done = [r for r in runs if r.status == RunStatus.done]
    fams = families(done, lambda r: not args.methods or r.method in args.methods)
    named = ", ".join(map(str, args.sweeps))
    if not fams:
        raise ConfigError(f"sweep {named} has no comparison to resolve: it needs done runs of "
                          "method=baseline and of a treatment in the same setting"
                          + (" among the runs model=/method=/data= select"
                             if args.models or args.methods or args.datas else ""))  # fmt: skip
    composer = Composer()
    try:
        launcher = composer.launcher(args.launcher)
        url = args.url()
        templates = _pilot_templates(store, composer, pilot, args, url)
        comparisons: list[Planned] = []
        for fam in fams:
            base_vals = values_of(fam.baseline, args.metric)
            plans = plan_family([values_of(c.runs, args.metric) for c in fam.cells], base_vals,
                                args.metric, args.margin, args.max_seeds)  # fmt: skip
            base = _side(fam.baseline, templates, named)
            for c, plan in zip(fam.cells, plans, strict=True):
                treat = _side(c.runs, templates, named)
                if plan.planned:
                    treat.seeds |= set(plan.seeds)
                    base.seeds |= set(plan.seeds)
                comparisons.append(Planned(fam.setting, fam.index, len(fam.cells), c.label,
                                           c.key, c.config, plan, treat, base))  # fmt: skip
        sides = list({id(s): s for p in comparisons for s in (p.treat, p.base)}.values())
        points: list[Point] = []
        side_of: dict[str, Side] = {}
        for side in sides:
            have = {r.seed for r in side.runs}
            for seed in sorted(side.seeds - have):
                ov = [o for o in side.overrides if _key(o) != "seed"] + [f"seed={seed}"]
                cfg = composer.config(ov)
                preflight(cfg)
                ident, chash = identity_of(cfg)
                points.append(Point(_with_seed(side.label, seed), cfg, chash, ident))
                side_of[chash] = side
    finally:
        composer.close()
    existing = store.runs_by_hash([p.config_hash for p in points])
    todo = [p for p in points if (r := existing.get(p.config_hash)) is None
            or r.status != RunStatus.done]  # fmt: skip
    return Plan(pilot, comparisons, points, todo, launcher, side_of)


def _side(runs: list[RunRecord], templates: dict[str, tuple[list[str], str]], named: str) -> Side:
    for r in runs:
        if r.config_hash in templates:
            ov, label = templates[r.config_hash]
            return Side(runs, ov, " ".join(t for t in label.split() if _key(t) != "seed"))
    r = runs[0]
    raise ConfigError(f"sweep {named}'s command no longer composes run {r.id} "
                      f"({r.method}{f' α={r.alpha:g}' if r.alpha is not None else ''}, seed "
                      f"{r.seed}): its seeds would be new configurations, so resolve adds none")  # fmt: skip


# ------------------------------------------------------------------------- printing
def _pct(level: float) -> str:
    return f"{level * 100:g} %"


def _ranges(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


def print_plan(plan: Plan, args: ResolveArgs, say: Callable[[str], None]) -> Prediction | None:
    """The plan, comparison by comparison, and the predicted cost (returned)."""
    from sweeper.launch.cost import basis_of, estimate

    names = ", ".join(str(s.id) for s in plan.pilot)
    say(f"resolve sweep {names}: {len(plan.comparisons)} comparison(s) on {args.metric}, margin "
        f"±{args.margin:g}, at most {args.max_seeds} seeds per side; intervals simultaneous per "
        f"family at {_pct(LEVEL_PILOT)} for the pilot look and {_pct(LEVEL_FINAL)} for the "
        "final look (half the 5 % error budget each)")  # fmt: skip
    adds: dict[int, int] = {}
    for q in plan.todo:
        side = plan.side_of[q.config_hash]
        adds[id(side)] = adds.get(id(side), 0) + 1
    for c in plan.comparisons:
        p = c.plan
        head = (f"  {c.treatment} vs baseline — {c.setting}: {p.pilot.verdict} at "
                f"{p.n_pilot} seed{'s' if p.n_pilot != 1 else ''}")  # fmt: skip
        if not p.planned:
            why = "" if p.resolved else " (a pilot needs 2 seeds per side)"
            say(f"{head} → no new seed{why}")
            continue
        stein = f"Stein's rule asks {p.n_stein:,}" + ("; capped by max_seeds" if p.capped else "")
        say(f"{head} → {p.n_planned} seeds per side ({stein}): seeds {_ranges(p.seeds)}, "
            f"+{adds.get(id(c.treat), 0)} treatment run(s)")  # fmt: skip
    seen: set[int] = set()
    for c in plan.comparisons:
        if c.plan.planned and id(c.base) not in seen:
            seen.add(id(c.base))
            say(f"  baseline — {c.setting}: +{adds.get(id(c.base), 0)} run(s)")
    sides = {id(s): s for s in plan.side_of.values()}
    bases = {k: basis_of(s.runs) for k, s in sides.items()}
    pred = estimate([bases[id(plan.side_of[q.config_hash])] for q in plan.todo])
    used = {id(plan.side_of[q.config_hash]) for q in plan.todo}
    n_basis = sum(b.runs for k, b in bases.items() if b is not None and k in used)
    if not plan.todo:
        say("0 runs to train: every planned seed has its run")
    elif pred is None:
        say(f"{len(plan.todo)} runs to train (no done run of these configurations recorded "
            "its cost)")  # fmt: skip
    else:
        say(f"{len(plan.todo)} runs to train, predicted {pred.text()} (from {n_basis} done run"
            f"{'s' if n_basis != 1 else ''} of these configurations)")  # fmt: skip
    return pred


def final_verdicts(plan: Plan, args: ResolveArgs, store: Store, say: Callable[[str], None]) -> None:
    """The verdicts after the plan, the report's lines, family by family."""
    from analysis.comparisons import Judged, values_of
    from analysis.render import verdict_line

    hashes = [p.config_hash for p in plan.points]
    fresh = store.runs_by_hash(hashes)
    more: dict[int, list[RunRecord]] = {}
    for h, r in fresh.items():
        if r.status == RunStatus.done:
            more.setdefault(id(plan.side_of[h]), []).append(r)
    say(f"verdicts on {args.metric} after resolve (each family's intervals simultaneous at "
        f"{_pct(LEVEL_FINAL)}; where nothing was planned, the pilot look's at "
        f"{_pct(LEVEL_PILOT)}):")  # fmt: skip
    family = None
    for c in plan.comparisons:
        if c.family != family:
            family = c.family
            say(f"{c.setting} ({c.family_size} comparison{'s' if c.family_size != 1 else ''} "
                "against its baseline):")  # fmt: skip
        tv = values_of(c.treat.runs + more.get(id(c.treat), []), args.metric)
        bv = values_of(c.base.runs + more.get(id(c.base), []), args.metric)
        res = final_look(c.plan, tv, bv, args.metric, args.margin, c.family_size)
        j = Judged("resolve", c.setting, c.treatment, "baseline", c.config, c.key, res, "test",
                   (c.family, c.setting))  # fmt: skip
        say(f"- {verdict_line(j)}")


# ------------------------------------------------------------------------- the command
def resolve(argv: list[str], out: Callable[[str], None] | None = None) -> int:
    """``python -m sweeper resolve ...``: 0 when every planned run is done and the verdicts
    printed; bad input is a ConfigError (exit 2, nothing written), a failed point Failed."""
    from sweeper.launch.grid import format_command, run_grid, validate_points

    say = out or (lambda s: print(s, flush=True))
    if any(a in ("-h", "--help") for a in argv):
        say(HELP)
        return 0
    args = parse_args(argv)
    url = args.url()
    store = _open(url)
    try:
        plan = make_plan(args, store)
        pred = print_plan(plan, args, say)
        if args.budget is not None and plan.todo:
            if pred is None:
                raise ConfigError(f"budget={args.budget:g} cannot be checked: no done run of "
                                  "these configurations recorded its cost")  # fmt: skip
            if pred.amount > args.budget:
                raise ConfigError(f"budget={args.budget:g} {pred.unit} is less than the plan's "
                                  f"predicted {pred.text()} for {len(plan.todo)} runs; raise "
                                  "budget= or lower max_seeds=")  # fmt: skip
        if args.dry_run:
            say("dry run: nothing is started or written")
            return 0
    finally:
        # no connection of this process may be open while the points' pre-flight reads the
        # store file's header: closing any descriptor of a file drops every POSIX lock the
        # process holds on it, SQLite's included, and another process could then checkpoint
        # the WAL under our feet (sqlite.org/howtocorrupt.html, 2.2)
        store.dispose()
    failed: Failed | None = None
    if plan.todo:
        points = validate_points([(p.label, p.cfg) for p in plan.points])
        name = f"resolve-{'-'.join(map(str, args.sweeps))}-" + dt.datetime.now().strftime(
            "%Y%m%d-%H%M%S"
        )
        try:
            run_grid(points, plan.launcher, format_command(["resolve", *argv]), name, out=say,
                     parent_id=args.sweeps[0])  # fmt: skip
        except Failed as e:  # the verdicts of what did finish, then the failure
            failed = e
    store = _open(url)
    try:
        final_verdicts(plan, args, store, say)
    finally:
        store.dispose()
    if failed is not None:
        raise failed
    return 0


def _open(url: str) -> Store:
    try:
        return Store(url, create=False, missing_hint="pass results_dir= or store.url=")
    except StoreError as e:
        raise ConfigError(str(e)) from None
