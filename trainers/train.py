"""One training run: model, data, recipe, gradient method, metrics, checkpoints.

:class:`Trainer` knows nothing of the results store or MLflow: it reports through a
:class:`Sink` (the sweeper's job wires the store and the MLflow mirror to it), so it can be
used from any script. It resumes from ``<run_dir>/checkpoint.pt`` when that exists.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainers import distributed
from trainers.config import RunConfig
from trainers.data import DataBundle, build_data
from trainers.methods import (
    adaptive_clip_grad_,
    cross_entropy,
    global_grad_norm,
    pgt_cross_entropy,
    register_paper_pgt_hook,
    znorm_,
)
from trainers.models import build_model, classifier_of
from trainers.registry import ConfigError, first_line
from trainers.schedule import lr_at

ZERO_NORM = 1e-8  # a filter / feature with L2 norm below this counts as "zeroed out"


@dataclass
class EpochMetrics:
    """One row of ``epoch_metrics``. Accuracies in percent, like the paper."""

    epoch: int  # 0-based
    step: int  # optimiser steps done at the end of this epoch
    train_loss: float  # mean over the epoch's steps, as seen while training
    train_acc: float
    test_loss: float  # plain CE on the test set
    test_acc: float
    test_top5: float
    logit_norm: float  # mean over test images of ||z||_2
    gap: float  # train_acc - test_acc
    lr: float  # lr of the epoch's last step
    epoch_time: float  # seconds, training + evaluation
    images_per_s: float  # training images / training seconds
    grad_norm_before: float  # mean over steps of the global gradient norm before the transform
    grad_norm_after: float  # ... and after it (equal when the method has none)
    # peak GPU memory allocated by PyTorch during the epoch, MiB (this process's GPU; in DDP
    # rank 0's); None on CPU. Defaulted so checkpoints written before it still load.
    peak_mem_mb: float | None = None


@dataclass
class LayerFilterStats:
    """Per-layer summary of the L2 norms of every filter (output unit) of a weight."""

    step: int
    epoch: int
    layer_index: int  # 1-based, conv/linear weights in module order (the paper's layer ids)
    layer_name: str
    n_filters: int
    n_zero: int  # filters with norm < 1e-8
    min_norm: float
    median_norm: float
    max_norm: float


@dataclass
class TrainResult:
    status: str  # done | diverged | pruned
    history: list[EpochMetrics]
    diverged_step: int | None = None
    feature_norms: list[float] = field(default_factory=list)  # per pooled-feature channel
    zero_features: int | None = None
    device: str = ""
    precision: str = ""

    @property
    def final(self) -> EpochMetrics | None:
        return self.history[-1] if self.history else None


@dataclass
class _FilterLog:
    """One epoch's filter-norm snapshots: per-layer summaries and the full vectors."""

    stats: list[LayerFilterStats] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)


class Sink(Protocol):
    """Where a run's metrics go.

    ``on_start`` is called once the checkpoint (if any) is loaded, with the first epoch to
    run; ``on_epoch`` at the end of each epoch, before the checkpoint is written (so after
    a kill, rows of epochs >= the resumed epoch may exist and are to be replaced).
    """

    def on_start(self, resume_epoch: int, device: str, precision: str) -> None: ...

    def on_epoch(
        self, metrics: EpochMetrics, filter_stats: list[LayerFilterStats], filter_file: Path | None
    ) -> None: ...

    def should_stop(self, metrics: EpochMetrics) -> bool:
        """Asked after each epoch's checkpoint (rank 0): True stops the run ``pruned``."""
        ...


class NullSink:
    def on_start(self, resume_epoch: int, device: str, precision: str) -> None:
        pass

    def on_epoch(
        self, metrics: EpochMetrics, filter_stats: list[LayerFilterStats], filter_file: Path | None
    ) -> None:
        pass

    def should_stop(self, metrics: EpochMetrics) -> bool:
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from trainers.registry import ConfigError

        raise ConfigError(f"device={name} is not available on this machine; use device=cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_compile_mode(cfg: RunConfig, device: torch.device, distributed: bool) -> str | None:
    """The torch.compile mode to use, or None for eager (compile=false).

    auto: ``reduce-overhead`` (CUDA graphs: a ResNet-20 step is ~100 small kernels, launch-
    bound on a big GPU) for a single-process CUDA run; ``default`` on CPU, where there are
    no CUDA graphs, and under DDP, whose gradient all-reduce hooks a graph cannot capture.
    """
    if not cfg.compile:
        return None
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    return "reduce-overhead" if device.type == "cuda" and not distributed else "default"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} {torch.cuda.get_device_name(idx)}"
    return "cpu"


def atomic_torch_save(obj: object, path: Path, keep: Path | None = None) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``; the
    file it replaces is first renamed to ``keep`` (the previous good checkpoint)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep is not None and path.exists():
        os.replace(path, keep)
    os.replace(tmp, path)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on tensors with ndim > 1 only (official PGT code; no decay on BN/bias)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _weight_layers(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [
        (name, m.weight)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


class _ForeignCheckpoint(RuntimeError):
    """The checkpoint is readable but was written by another configuration: never used."""


class Trainer:
    """Train one configuration; resumable; emits metrics to a :class:`Sink`."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        sink: Sink | None = None,
        log: Callable[[str], None] = print,
        config_hash: str = "",
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.sink = sink or NullSink()
        self.log = log
        self.config_hash = config_hash
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.prev_ckpt_path = self.run_dir / "checkpoint.prev.pt"  # the one before
        self.dist = distributed.from_env()
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.precision = resolve_precision(cfg.precision, self.device)
        self._ready = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Build data, model and optimiser. Bad data/model settings raise ConfigError here,
        so a caller can run this before recording anything (fit() calls it if needed)."""
        cfg, info = self.cfg, self.dist
        if cfg.batch_size % info.world:
            raise ConfigError(
                f"batch_size={cfg.batch_size} is not divisible by the "
                f"{info.world} data-parallel processes"
            )
        torch.manual_seed(cfg.seed)  # model init depends on the seed only
        self.data: DataBundle = build_data(cfg.data, cfg.batch_size, cfg.seed, self.device)
        if info.enabled:
            self.data.train.shard(*distributed.shard_bounds(cfg.batch_size, info))
        model = build_model(cfg.model.name, self.data.num_classes, self.data.in_channels)
        if info.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.channels_last = cfg.channels_last and self.device.type == "cuda"
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.fc = classifier_of(model)
        fc_params = {id(p) for p in self.fc.parameters()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        # AGC excludes the final classifier (NFNets; the official code drops fc weight/bias)
        self.agc_params = [p for p in self.params if id(p) not in fc_params]
        self.peak_lr = cfg.resolved_lr()
        self.opt = torch.optim.SGD(
            _param_groups(model, cfg.weight_decay),
            lr=self.peak_lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
        )
        self.steps_per_epoch = len(self.data.train)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self._owns_group = distributed.init(info, self.device)
        fwd: nn.Module = model
        if info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            fwd = DDP(model, device_ids=ids)  # averages gradients across processes
        self.compile_mode = resolve_compile_mode(cfg, self.device, info.enabled)
        self.forward = torch.compile(fwd, mode=self.compile_mode) if self.compile_mode else fwd
        # CUDA graphs reuse their output buffers: each step must tell them a new one began
        self._graphs = self.compile_mode in ("reduce-overhead", "max-autotune")
        self.layers = _weight_layers(model)
        self._ready = True

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, self.steps_per_epoch, c.epochs, self.peak_lr, c.schedule)

    # ------------------------------------------------------------------ one step
    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        cfg, spec = self.cfg, self.cfg.method.spec
        ls = cfg.effective_label_smoothing()
        if spec.pgt and cfg.method.pgt_impl == "paper_hook":
            onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
            register_paper_pgt_hook(logits, onehot, cfg.alpha)
            return cross_entropy(logits, y, ls)
        if spec.pgt:
            return pgt_cross_entropy(logits, y, cfg.alpha, ls)
        return cross_entropy(logits, y, ls)

    def _transform(self, before: Tensor) -> Tensor | None:
        """GC / AGC / ZNorm on the (unscaled) gradients; returns the norm after, if changed.

        ``before`` is the global norm already measured for the metrics: GC's clip factor is
        computed from it (PyTorch's rule: min(1, max_norm / (norm + 1e-6))) and GC's norm
        after is then known without another pass over every gradient."""
        m, kind = self.cfg.method, self.cfg.method.spec.grad_transform
        if kind == "none":
            return None
        if kind == "gc":
            factor = (m.gc_max_norm / (before + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))
            return before * factor
        if kind == "agc":
            adaptive_clip_grad_(self.agc_params, m.agc_clip_factor, m.agc_eps)
        elif kind == "znorm":
            znorm_(self.params, m.znorm_eps)
        return global_grad_norm(self.params)

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            logits = self.forward(x)
        loss = self._loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # no-op unless fp16: transforms see true gradients
        before = global_grad_norm(self.params)
        after = self._transform(before)
        self.scaler.step(self.opt)
        self.scaler.update()
        correct = (logits.detach().argmax(1) == y).sum()
        return loss.detach(), correct, before, before if after is None else after

    # ---------------------------------------------------------------- measuring
    @torch.no_grad()
    def _filter_snapshot(self, step: int, epoch: int) -> tuple[list[LayerFilterStats], dict]:
        norms = [
            w.detach().float().flatten(1).norm(dim=1) if w.dim() > 1 else w.detach().float().abs()
            for _, w in self.layers
        ]
        flat = torch.cat(norms).cpu()  # one device->host copy for all layers
        stats, vectors, i = [], {}, 0
        for idx, ((name, _), n) in enumerate(zip(self.layers, norms, strict=True), start=1):
            v = flat[i : i + n.numel()]
            i += n.numel()
            vectors[f"L{idx:03d}"] = v.numpy()
            stats.append(
                LayerFilterStats(
                    step=step,
                    epoch=epoch,
                    layer_index=idx,
                    layer_name=name,
                    n_filters=v.numel(),
                    n_zero=int((v < ZERO_NORM).sum()),
                    min_norm=float(v.min()),
                    median_norm=float(v.median()),
                    max_norm=float(v.max()),
                )
            )
        return stats, vectors

    def _evaluate_shared(
        self, want_features: bool
    ) -> tuple[float, float, float, float, list[float]]:
        """Rank 0 evaluates the whole test set; the numbers are broadcast to every rank so
        all ranks take the same decisions (e.g. stopping on a non-finite test loss)."""
        if not self.dist.enabled:
            return self._evaluate(want_features)
        out = self._evaluate(want_features) if self.dist.is_main else (0.0, 0.0, 0.0, 0.0, [])
        t = torch.tensor(out[:4], dtype=torch.float64, device=self.device)
        a, b, c, d = distributed.broadcast(t, self.dist).tolist()
        return a, b, c, d, out[4]

    @torch.no_grad()
    def _evaluate(self, want_features: bool) -> tuple[float, float, float, float, list[float]]:
        self.model.eval()
        n = 0
        loss_sum = torch.zeros((), device=self.device)
        top1 = torch.zeros((), device=self.device)
        top5 = torch.zeros((), device=self.device)
        lnorm = torch.zeros((), device=self.device)
        feat_sq: list[Tensor] = []

        def grab(_m: nn.Module, inp: tuple[Tensor, ...]) -> None:
            f = inp[0].float()  # (N, D) pooled features entering the classifier
            sq = (f * f).sum(0)
            if feat_sq:
                feat_sq[0] += sq
            else:
                feat_sq.append(sq)

        handle = self.fc.register_forward_pre_hook(grab) if want_features else None
        try:
            for x, y in self.data.test.batches(0):
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    logits = self.model(x)
                z = logits.float()
                loss_sum += F.cross_entropy(z, y, reduction="sum")
                k = min(5, z.shape[1])
                topk = z.topk(k, dim=1).indices
                hit = topk == y[:, None]
                top1 += hit[:, 0].sum()
                top5 += hit.any(1).sum()
                lnorm += z.norm(dim=1).sum()
                n += y.numel()
        finally:
            if handle is not None:
                handle.remove()
            self.model.train()
        feats = feat_sq[0].sqrt().cpu().tolist() if feat_sq else []
        return (
            loss_sum.item() / n,
            100.0 * top1.item() / n,
            100.0 * top5.item() / n,
            lnorm.item() / n,
            feats,
        )

    # ---------------------------------------------------------------- checkpoints
    def _save(self, next_epoch: int, step: int, history: list[EpochMetrics]) -> None:
        atomic_torch_save(
            {
                "config_hash": self.config_hash,
                "epoch": next_epoch,
                "step": step,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": [asdict(h) for h in history],
            },
            self.ckpt_path,
            keep=self.prev_ckpt_path,
        )

    def _load(self) -> tuple[int, int, list[EpochMetrics]]:
        """Resume from the newest readable checkpoint: ``checkpoint.pt``, else (truncated by a
        full disk, corrupted, or lost between the two renames of a save) the previous one,
        else from scratch -- each fallback with a warning naming the file."""
        for path in (self.ckpt_path, self.prev_ckpt_path):
            if not path.exists():
                continue
            try:
                return self._load_from(path)
            except (_ForeignCheckpoint, OSError, MemoryError, torch.OutOfMemoryError):
                raise  # another run's file, or a transient I/O / memory failure: not "corrupt"
            except Exception as e:  # unreadable: say which file and why, then fall back
                why = first_line(e)
                nxt = (
                    f"falling back to {self.prev_ckpt_path}"
                    if path == self.ckpt_path and self.prev_ckpt_path.exists()
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
        return 0, 0, []

    def _load_from(self, path: Path) -> tuple[int, int, list[EpochMetrics]]:
        # weights_only: a checkpoint is data, never code (no pickle of arbitrary objects)
        ck = torch.load(path, map_location=self.device, weights_only=True)
        if self.config_hash and ck.get("config_hash") != self.config_hash:
            raise _ForeignCheckpoint(f"checkpoint {path} belongs to another configuration")
        history = [EpochMetrics(**h) for h in ck["history"]]
        epoch, step, rng = int(ck["epoch"]), int(ck["step"]), ck["torch_rng"]
        # check every part before changing anything, so a bad file leaves a clean start
        model_sd, opt_sd, scaler_sd = ck["model"], ck["optimizer"], ck["scaler"]
        missing = set(self.model.state_dict()) ^ set(model_sd)
        if missing:
            raise ValueError(f"model keys differ: {sorted(missing)[:3]}")
        self.model.load_state_dict(model_sd)
        self.opt.load_state_dict(opt_sd)
        self.scaler.load_state_dict(scaler_sd)
        torch.set_rng_state(rng)
        return epoch, step, history

    # ---------------------------------------------------------------------- fit
    def fit(self) -> TrainResult:
        """Train (or resume) to the end; returns the outcome. Only rank 0 reports/saves."""
        if not self._ready:
            self.setup()
        try:
            return self._fit()
        finally:
            if self._owns_group:
                torch.distributed.destroy_process_group()

    def _fit(self) -> TrainResult:
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        start_epoch, step, history = self._load()
        cfg = self.cfg
        result = TrainResult(
            status="done",
            history=history,
            device=describe_device(self.device)
            + (f" x{self.dist.world} processes" if self.dist.enabled else ""),
            precision=self.precision,
        )
        if main:
            self.sink.on_start(start_epoch, result.device, self.precision)
        if start_epoch and main:
            self.log(f"resuming after epoch {start_epoch}/{cfg.epochs} (step {step})")
        every = cfg.filter_stats_every
        cuda = self.device.type == "cuda"
        for epoch in range(start_epoch, cfg.epochs):
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            flog = _FilterLog()
            if every and step == 0 and main:
                self._snapshot(flog, 0, epoch)
            diverged = self._train_epoch(epoch, step, flog)
            step_end = step + self.steps_per_epoch
            if diverged is not None:
                result.status, result.diverged_step = "diverged", diverged
                self.log(
                    f"epoch {epoch + 1}/{cfg.epochs}: non-finite loss at step {diverged}; "
                    "stopping (status diverged)"
                )
                return result
            train_loss, train_acc, gn_before, gn_after, train_time = self._epoch_totals
            step = step_end
            last = epoch == cfg.epochs - 1
            test_loss, test_acc, test_top5, logit_norm, feats = self._evaluate_shared(last)
            m = EpochMetrics(
                epoch=epoch,
                step=step,
                train_loss=train_loss,
                train_acc=train_acc,
                test_loss=test_loss,
                test_acc=test_acc,
                test_top5=test_top5,
                logit_norm=logit_norm,
                gap=train_acc - test_acc,
                lr=self._lr(step - 1),
                epoch_time=time.perf_counter() - t0,
                images_per_s=self.steps_per_epoch * cfg.batch_size / max(train_time, 1e-9),
                grad_norm_before=gn_before,
                grad_norm_after=gn_after,
                peak_mem_mb=torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None,
            )
            if not all(math.isfinite(v) for v in (test_loss, logit_norm)):  # same on all ranks
                result.status, result.diverged_step = "diverged", step
                self.log(f"epoch {epoch + 1}/{cfg.epochs}: non-finite test loss; stopping")
                return result
            history.append(m)
            if last:
                result.feature_norms = feats
                result.zero_features = sum(1 for f in feats if f < ZERO_NORM)
            stop = False
            if main:
                filter_file = self._write_filter_file(epoch, flog)
                self.sink.on_epoch(m, flog.stats, filter_file)
                self._save(epoch + 1, step, history)
                self.log(
                    f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {m.train_loss:.4f} "
                    f"acc {m.train_acc:6.2f}%  test loss {m.test_loss:.4f} "
                    f"acc {m.test_acc:6.2f}% top5 {m.test_top5:6.2f}%  |z| {m.logit_norm:7.3f}  "
                    f"lr {m.lr:.4g}  {m.epoch_time:5.1f}s {m.images_per_s:7.0f} img/s"
                    + (f"  {m.peak_mem_mb:,.0f} MiB" if m.peak_mem_mb is not None else "")
                )
                # asked on the last epoch too: a search records every epoch's value
                stop = self.sink.should_stop(m) and not last
            if self.dist.enabled:  # rank 0 decides; every rank must leave the loop together
                flag = torch.tensor([float(stop)], device=self.device)
                stop = bool(distributed.broadcast(flag, self.dist).item())
            if stop:
                result.status = "pruned"
                self.log(f"epoch {epoch + 1}/{cfg.epochs}: pruned by the search; stopping")
                return result
        if start_epoch >= cfg.epochs and history and main:
            # finished before (e.g. killed after the last checkpoint): measure features again
            *_, feats = self._evaluate(want_features=True)
            result.feature_norms = feats
            result.zero_features = sum(1 for f in feats if f < ZERO_NORM)
        return result

    def _snapshot(self, flog: _FilterLog, step: int, epoch: int) -> None:
        stats, vectors = self._filter_snapshot(step, epoch)
        flog.stats.extend(stats)
        flog.steps.append(step)
        for k, v in vectors.items():
            flog.vectors.setdefault(k, []).append(v)

    def _train_epoch(self, epoch: int, step: int, flog: _FilterLog) -> int | None:
        """Run one epoch; returns the global step of the first non-finite loss, or None.

        Losses go into a device buffer and are checked every ``check_every`` steps, so the
        host syncs with the device only that often, yet the diverging step is exact.
        """
        cfg, dev = self.cfg, self.device
        k = cfg.check_every
        buf = torch.zeros(k, device=dev)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        gn_b = torch.zeros((), device=dev)
        gn_a = torch.zeros((), device=dev)
        seen, i, t0 = 0, 0, time.perf_counter()
        batches: Iterator[tuple[Tensor, Tensor]] = self.data.train.batches(epoch)
        for i, (x, y) in enumerate(batches):
            s = step + i
            for g in self.opt.param_groups:
                g["lr"] = self._lr(s)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, c, b, a = self._train_step(x, y)
            buf[i % k] = loss
            loss_sum += loss
            correct += c
            gn_b += b
            gn_a += a
            seen += y.numel()
            if (i + 1) % k == 0 or i + 1 == self.steps_per_epoch:
                n = i % k + 1
                pos = torch.arange(n, device=dev)
                first = torch.where(torch.isfinite(buf[:n]), n, pos).min()
                # every rank must stop at the same check: agree on the earliest bad step
                first = int(distributed.all_min(first, self.dist))
                if first < n:
                    return s - n + 1 + first
            main = self.dist.is_main
            if cfg.filter_stats_every and (s + 1) % cfg.filter_stats_every == 0 and main:
                self._snapshot(flog, s + 1, epoch)
        steps = i + 1
        train_time = time.perf_counter() - t0
        totals = torch.stack([loss_sum.float(), correct.float()])
        loss_total, correct_total = distributed.all_sum(totals, self.dist).tolist()
        world = self.dist.world
        self._epoch_totals = (
            loss_total / (steps * world),
            100.0 * correct_total / (seen * world),
            gn_b.item() / steps,
            gn_a.item() / steps,
            train_time,
        )
        return None

    def _write_filter_file(self, epoch: int, flog: _FilterLog) -> Path | None:
        """Full per-filter norm vectors of this epoch's snapshots: one .npz per epoch.

        Arrays: ``steps`` (S,), ``L001`` ... (S, n_filters), ``names`` (layer names).
        """
        if not flog.steps:
            return None
        d = self.run_dir / "filter_norms"
        d.mkdir(exist_ok=True)
        path = d / f"epoch_{epoch:04d}.npz"
        tmp = d / f".epoch_{epoch:04d}.tmp.npz"
        np.savez_compressed(
            tmp,
            steps=np.asarray(flog.steps),
            names=np.asarray([n for n, _ in self.layers]),
            **{k: np.stack(v) for k, v in flog.vectors.items()},
        )
        os.replace(tmp, path)
        return path
