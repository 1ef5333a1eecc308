"""Hand-made results stores for the report's tests: real identities (``RunConfig.identity``,
the config hash the sweeper would give), made-up but deterministic results, written as rows
of the real store. No training: the report's grouping and statistics are what is tested.

``seeds_only_store`` holds runs whose configurations differ only where the report shows them
(every cell is one configuration): the report over it must not change when the report's
grouping does (``tests/fixtures/report_seeds_only/`` holds the report that the code before
"cells by configuration" wrote over it; ``tests/fixtures/make_report_golden.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sweeper.provenance import config_hash
from sweeper.store import RunStatus, Store
from sweeper.store.models import FilterStat, Run
from trainers.config import DataConfig, MethodConf, ModelConf, RunConfig, ScheduleConf


def _u(*key: object) -> float:
    """A deterministic number in [0, 1) for ``key`` (no RNG state shared between runs)."""
    h = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def make_config(method: str = "baseline", alpha: float = 0.25, **kw: Any) -> RunConfig:
    """A RunConfig as ``python -m sweeper method=METHOD alpha=ALPHA KEY=VALUE ...`` gives it
    (dotted keys as ``method__gc_max_norm``, ``data__name``...)."""
    method_knobs = {k[8:]: v for k, v in kw.items() if k.startswith("method__")}
    data = {k[6:]: v for k, v in kw.items() if k.startswith("data__")}
    model = {k[7:]: v for k, v in kw.items() if k.startswith("model__")}
    sched = {k[10:]: v for k, v in kw.items() if k.startswith("schedule__")}
    top = {k: v for k, v in kw.items() if "__" not in k}
    grad = method_knobs.pop("grad", None)
    m = MethodConf.preset(method, **method_knobs)
    if grad is not None:
        m.grad = grad
    return RunConfig(
        model=ModelConf(**model), method=m, data=DataConfig(**data),
        schedule=ScheduleConf(**sched), alpha=alpha, **top,
    )  # fmt: skip


def add_run(
    store: Store,
    cfg: RunConfig,
    status: RunStatus = RunStatus.done,
    test: float | None = None,
    train: float | None = None,
    error: str | None = None,
    filters: list[tuple[int, str, int, int]] | None = None,
    **cols: Any,
) -> int:
    """One run row for ``cfg`` (precision fp32, as on a CPU), its results made up from its
    config hash unless given; ``filters``: (layer_index, name, n_filters, n_zero) at the
    last snapshot. Returns the run id."""
    ident = cfg.identity("fp32")
    h = config_hash(ident)
    u = _u(h)
    test = 70.0 + 10 * u if test is None else test
    train = test + 3 + 2 * _u(h, "train") if train is None else train
    row = Run(
        config_hash=h,
        model=cfg.model.effective_name,
        method=cfg.method.spec.name,
        alpha=cfg.effective_alpha(),
        data=cfg.data.effective_name,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        lr=cfg.resolved_lr(),
        schedule=cfg.schedule.name,
        label_smoothing=cfg.effective_label_smoothing(),
        seed=cfg.seed,
        config={"resolved_lr": cfg.resolved_lr(), "identity": ident},
        status=status,
        epoch=cfg.epochs if status == RunStatus.done else 1,
        precision="fp32",
        error=error,
        train_acc=train,
        test_acc=test,
        test_loss=0.3 + _u(h, "loss"),
        logit_norm=5 + 10 * _u(h, "logit"),
        gpus=0,
        train_seconds=10 + 100 * _u(h, "secs"),
        images_per_s=1000 + 500 * _u(h, "ips"),
        **cols,
    )
    with store.session() as s:
        s.add(row)
        s.flush()
        rid = row.id
        for idx, name, n, z in filters or []:
            s.add(FilterStat(run_id=rid, step=100, epoch=cfg.epochs, layer_index=idx,
                             layer_name=name, n_filters=n, n_zero=z, min_norm=0.0,
                             median_norm=1.0, max_norm=2.0))  # fmt: skip
    return rid


# (method, alpha, overrides, seeds, bump of the test accuracy)
SEEDS_ONLY: list[tuple[str, float, dict[str, Any], list[int], float]] = [
    ("baseline", 0.25, {}, [0, 1, 2], 0.0),
    ("pgt", 0.1, {}, [0, 1, 2], -2.0),
    ("pgt", 0.25, {}, [0, 1, 2], 1.0),
    ("pgt", 0.5, {}, [0, 1], 0.5),
    ("gc", 0.25, {}, [0, 1, 2], 0.3),
    ("agc", 0.25, {}, [0], -0.2),  # n = 1: no interval
    ("znorm", 0.25, {}, [3, 4], 0.1),  # other seeds than the baseline's: Welch
    ("ls", 0.25, {}, [0, 1, 2], 0.2),
    ("ls_pgt", 0.25, {}, [0, 1], 0.6),
    ("baseline", 0.25, {"batch_size": 128}, [0, 1], 0.0),
    ("pgt", 0.25, {"batch_size": 128}, [0, 1], 0.4),
    ("gc_pgt", 0.3, {"batch_size": 128}, [1, 2], 0.2),
    ("baseline", 0.25, {"schedule__name": "step", "schedule__milestones": [2]}, [0], 0.0),
    ("pgt", 0.25, {"schedule__name": "step", "schedule__milestones": [2]}, [0], 0.3),
    # a setting with PGT and no baseline
    ("pgt", 0.25, {"model__name": "resnet20", "data__name": "synthetic"}, [0, 1], 0.0),
    # a setting with a baseline and no PGT: a missing cell
    ("baseline", 0.25, {"epochs": 5}, [0, 1], 0.0),
]
LAYERS = [(1, "conv1", 16, 0), (2, "conv2", 32, 1), (3, "fc", 10, 0)]


def seeds_only_store(root: Path) -> Path:
    """A results dir whose store holds :data:`SEEDS_ONLY` (epochs 3 unless given), plus a
    failed, a diverged and a queued run; returns the results dir."""
    root.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{root / 'results.db'}")
    try:
        for method, alpha, over, seeds, bump in SEEDS_ONLY:
            for seed in seeds:
                cfg = make_config(method, alpha, **{"epochs": 3, **over}, seed=seed)
                test = 80 + bump + 2 * _u(method, alpha, sorted(over.items()).__repr__(), seed)
                zeros = [(i, n, f, z + seed % 2) for i, n, f, z in LAYERS]
                add_run(store, cfg, test=test, filters=zeros)
        add_run(store, make_config("pgt", 0.25, epochs=3, seed=7), RunStatus.failed,
                error="RuntimeError: boom\nTraceback ...")  # fmt: skip
        add_run(store, make_config("gc", 0.25, epochs=3, seed=8), RunStatus.diverged,
                error="loss is nan at step 7", diverged_step=7)  # fmt: skip
        add_run(store, make_config("baseline", 0.25, epochs=3, seed=9), RunStatus.queued)
    finally:
        store.dispose()
    return root
