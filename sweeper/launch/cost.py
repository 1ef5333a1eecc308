"""What runs about to train will cost, predicted from what done runs of their kind cost.

A grid's header predicts from the store's done runs of the same model, data set, batch size
and epochs (``predicted ~0.03 CPU-h from 3 similar runs``); ``python -m sweeper resolve``
from the done runs of the very configurations it adds seeds to. A run's cost is its GPU-hours
(wall time of its epochs x GPUs held) when it held GPUs, else its CPU-hours (the wall time of
its epochs), as the report's cost column counts it. Runs of a kind that has no done run are
not predicted, and the line says how many are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sweeper.store import CostBasis, CostKey, RunRecord, Store


@dataclass(frozen=True)
class Prediction:
    """The predicted cost of ``total`` runs to train, of which ``covered`` have a basis,
    resting on ``basis_runs`` done runs."""

    gpu_hours: float
    cpu_hours: float
    covered: int
    total: int
    basis_runs: int

    @property
    def unit(self) -> str:
        """GPU-h where any predicted run holds GPUs, else CPU-h (a CPU-only store)."""
        return "GPU-h" if self.gpu_hours > 0 else "CPU-h"

    @property
    def amount(self) -> float:
        """The predicted cost in :attr:`unit` (what a budget is compared with)."""
        return self.gpu_hours if self.gpu_hours > 0 else self.cpu_hours

    def text(self) -> str:
        """``0.41 GPU-h`` (``+ 0.02 CPU-h`` where some runs held no GPU)."""
        out = f"{_hours(self.amount)} {self.unit}"
        if self.gpu_hours > 0 and self.cpu_hours > 0:
            out += f" + {_hours(self.cpu_hours)} CPU-h"
        return out

    def header_line(self) -> str:
        """The grid header's line."""
        part = "" if self.covered == self.total else f" for {self.covered} of {self.total} runs"
        return (f"predicted ~{self.text()}{part} from {self.basis_runs} similar run"
                f"{'s' if self.basis_runs != 1 else ''} (done runs of the same model, data "
                "set, batch size and epochs)")  # fmt: skip


def _hours(h: float) -> str:
    return f"{h:.2g}" if h < 0.1 else f"{h:.2f}" if h < 10 else f"{h:,.0f}"


def basis_of(runs: Iterable[RunRecord]) -> CostBasis | None:
    """What these done runs cost (those not done are ignored); None without one."""
    done = [r for r in runs if r.status == "done"]
    if not done:
        return None
    gpu = [r for r in done if (r.gpus or 0) > 0]
    return CostBasis(len(done), len(gpu), sum(r.gpu_hours or 0.0 for r in gpu),
                     sum(r.train_seconds or 0.0 for r in done if (r.gpus or 0) == 0) / 3600)  # fmt: skip


def estimate(bases: Sequence[CostBasis | None]) -> Prediction | None:
    """One run to train per entry, each costing the mean of its basis (GPU runs' GPU-hours
    where its basis held GPUs, else CPU-hours); None when no entry has a basis."""
    gpu = cpu = 0.0
    covered = 0
    seen: dict[int, int] = {}  # a basis shared by several runs counts its runs once
    for b in bases:
        if b is None or b.runs == 0:
            continue
        covered += 1
        seen[id(b)] = b.runs
        if b.gpu_runs:
            gpu += b.gpu_hours / b.gpu_runs
        else:
            cpu += b.cpu_hours / b.runs
    if not covered:
        return None
    return Prediction(gpu, cpu, covered, len(bases), sum(seen.values()))


def predict_kinds(store: Store, kinds: Sequence[CostKey]) -> Prediction | None:
    """The runs to train, one (model, data, batch size, epochs) each, predicted from the
    store's done runs of the same kind (None when it has none)."""
    basis = store.cost_basis(kinds)
    return estimate([basis.get(k) for k in kinds])
