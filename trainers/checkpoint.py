"""A run's checkpoints: atomic saves, the previous one kept, unreadable ones set aside.

``<run_dir>/checkpoint.pt`` is written atomically after every epoch (temp file, fsync,
rename); the file it replaces becomes ``checkpoint.prev.pt``. Loading falls back from the
newest to the previous one, and an unreadable file is moved to ``*.bad.pt`` (kept for
inspection, and out of the way of the next rotation) with a warning naming it. Checkpoints
load with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from trainers.files import naming
from trainers.records import EpochMetrics
from trainers.registry import first_line


class ForeignCheckpoint(RuntimeError):
    """The checkpoint is readable but was written by another configuration: never used."""


@dataclass
class Resumed:
    """Where a run continues: the next epoch, the optimiser step, the epochs so far."""

    epoch: int = 0
    step: int = 0
    history: list[EpochMetrics] | None = None


class _Recording:
    """A file whose write errors are kept: torch's zip writer turns a failed write (a full
    disk) into ``RuntimeError: ... unexpected pos``, losing the OSError that says why."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, b: bytes) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, *args: int) -> int:
        return self.f.seek(*args)


def atomic_torch_save(obj: object, path: Path, keep: Path | None = None,
                      before_replace: Callable[[], bool | None] | None = None) -> None:  # fmt: skip
    """Write to a temp file in the same directory, fsync, then rename over ``path``; the
    file it replaces is first renamed to ``keep`` (the previous good checkpoint).
    ``before_replace`` runs between the two: it may raise (a run this job no longer owns
    keeps its owner's checkpoint) or return False (not yet: the epoch's rows are not in the
    store, so the previous checkpoint stays). The temp file never outlives a failure (a
    full disk), whose OSError names ``path``."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with naming(path), open(tmp, "wb") as f:
            rec = _Recording(f)
            try:
                torch.save(obj, rec)
            except RuntimeError:
                if rec.error is not None:
                    raise rec.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None and before_replace() is False:
            tmp.unlink(missing_ok=True)  # not now: the previous checkpoint stays
            return
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if keep is not None and path.exists():
        os.replace(path, keep)
    os.replace(tmp, path)


class Checkpoints:
    """Save and restore one run's model, optimiser, scaler and RNG state."""

    def __init__(
        self, run_dir: Path, config_hash: str, device: torch.device, log: Callable[[str], None]
    ) -> None:
        self.path = Path(run_dir) / "checkpoint.pt"
        self.prev = Path(run_dir) / "checkpoint.prev.pt"  # the one before
        self.config_hash, self.device, self.log = config_hash, device, log

    def save(
        self,
        next_epoch: int,
        step: int,
        history: list[EpochMetrics],
        model: nn.Module,
        opt: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        before_replace: Callable[[], bool | None] | None = None,
    ) -> None:
        atomic_torch_save(
            {
                "config_hash": self.config_hash,
                "epoch": next_epoch,
                "step": step,
                "model": _compact(model.state_dict()),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": [asdict(h) for h in history],
            },
            self.path,
            keep=self.prev,
            before_replace=before_replace,
        )

    def load(
        self, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> Resumed:
        """Resume from the newest readable checkpoint: ``checkpoint.pt``, else (truncated by
        a full disk, corrupted, or lost between the two renames of a save) the previous one,
        else from scratch -- each fallback with a warning naming the file."""
        for path in (self.path, self.prev):
            if not path.exists():
                continue
            try:
                return self._load_from(path, model, opt, scaler)
            except (ForeignCheckpoint, OSError, MemoryError, torch.OutOfMemoryError):
                raise  # another run's file, or a transient I/O / memory failure: not "corrupt"
            except Exception as e:  # unreadable: say which file and why, then fall back
                why = first_line(e)
                nxt = (
                    f"falling back to {self.prev}"
                    if path == self.path and self.prev.exists()
                    else "starting the run from scratch"
                )
                # kept for inspection, and out of the way: the next save would otherwise
                # rotate the bad file into checkpoint.prev.pt over the good one
                bad = path.with_name(path.name.replace(".pt", ".bad.pt"))
                os.replace(path, bad)
                self.log(
                    f"warning: checkpoint {path} is unreadable ({why[:200]}; moved to "
                    f"{bad.name}); {nxt}"
                )
        # nothing usable: a clean start (the model and optimiser were not touched)
        return Resumed(0, 0, [])

    def _load_from(
        self,
        path: Path,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> Resumed:
        # weights_only: a checkpoint is data, never code (no pickle of arbitrary objects)
        ck = torch.load(path, map_location=self.device, weights_only=True)
        if self.config_hash and ck.get("config_hash") != self.config_hash:
            raise ForeignCheckpoint(f"checkpoint {path} belongs to another configuration")
        history = [EpochMetrics(**h) for h in ck["history"]]
        epoch, step, rng = int(ck["epoch"]), int(ck["step"]), ck["torch_rng"]
        # check every part before changing anything, so a bad file leaves a clean start
        model_sd, opt_sd, scaler_sd = ck["model"], ck["optimizer"], ck["scaler"]
        missing = set(model.state_dict()) ^ set(model_sd)
        if missing:
            raise ValueError(f"model keys differ: {sorted(missing)[:3]}")
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        scaler.load_state_dict(scaler_sd)
        torch.set_rng_state(rng)
        return Resumed(epoch, step, history)


def _compact(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors that are views into a larger storage -- a fused group's member
    (:mod:`trainers.fused`) holds its weights as one slice of the group's stacked tensors --
    are copied out, since ``torch.save`` writes a view's whole storage: every member's file
    would otherwise hold the weights of the whole group. The file is then the same as the
    run's alone."""
    return {
        k: v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v
        for k, v in state.items()
    }
