"""One training run: the loop. Model, data, recipe and gradient method are set up here and
trained epoch by epoch; metrics go to a :class:`~trainers.records.Sink`.

:class:`Trainer` knows nothing of the results store or MLflow (the sweeper's job wires them
to the Sink), so it can be used from any script. Its parts live beside it, one concern each:
:mod:`trainers.records` (what a run reports), :mod:`trainers.runtime` (device, precision,
compile), :mod:`trainers.checkpoint` (resume from ``<run_dir>/checkpoint.pt``),
:mod:`trainers.probes` (filter norms, evaluation), :mod:`trainers.methods` (PGT, LS, GC,
AGC, ZNorm).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainers import distributed
from trainers.checkpoint import Checkpoints
from trainers.config import RunConfig
from trainers.custom import bound_grads, bound_loss
from trainers.data import DataBundle, build_data
from trainers.methods import (
    apply_grad_transforms_,
    cross_entropy,
    global_grad_norm,
    pgt_cross_entropy,
    register_paper_pgt_hook,
)
from trainers.models import build_model_from, classifier_of
from trainers.probes import FilterLog, FilterNorms, TestMetrics, evaluate
from trainers.records import (
    ZERO_NORM,
    EpochMetrics,
    LayerFilterStats,
    NullSink,
    Sink,
    TrainResult,
)
from trainers.registry import ConfigError, first_line
from trainers.runtime import (
    autocast,
    build_optimizer,
    describe_device,
    resolve_compile_mode,
    resolve_device,
    resolve_precision,
)
from trainers.schedule import lr_at

__all__ = [
    "EpochMetrics",
    "LayerFilterStats",
    "NullSink",
    "Sink",
    "TrainResult",
    "Trainer",
]


@dataclass
class EpochTotals:
    """What one epoch of training measured (every rank agrees on these numbers)."""

    train_loss: float  # mean over the epoch's steps
    train_acc: float  # percent
    grad_norm_before: float  # mean over steps
    grad_norm_after: float
    train_time: float  # seconds


class Diverged(Exception):
    """A non-finite training loss; ``step`` is the exact global step of the first one."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


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
        self.dist = distributed.from_env()
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.precision = resolve_precision(cfg.precision, self.device)
        self.checkpoints = Checkpoints(self.run_dir, config_hash, self.device, log)
        self._ready = False

    # ------------------------------------------------------------------ set-up
    def setup(self, data: DataBundle | None = None) -> None:
        """Build data, model and optimiser. Bad data/model settings raise ConfigError here,
        so a caller can run this before recording anything (fit() calls it if needed).

        ``data``: an already built bundle of the same data set whose training loader draws
        this run's own order and augmentation (a fused group shares one copy of the data,
        :mod:`trainers.fused`)."""
        cfg, info = self.cfg, self.dist
        if cfg.batch_size % info.world:
            raise ConfigError(
                f"batch_size={cfg.batch_size} is not divisible by the "
                f"{info.world} data-parallel processes"
            )
        torch.manual_seed(cfg.seed)  # model init depends on the seed only
        self.data: DataBundle = (
            data
            if data is not None
            else build_data(cfg.data, cfg.batch_size, cfg.seed, self.device)
        )
        if info.enabled:
            self.data.train.shard(*distributed.shard_bounds(cfg.batch_size, info))
        model = build_model_from(cfg.model, self.data.num_classes, self.data.in_channels)
        if cfg.model._target_:
            _dry_run(model, cfg.model._target_, self.data)
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
        # the gradient transforms in order (custom ones bound to their knobs), a custom loss
        self.grads = bound_grads(cfg.method.spec)
        self.custom_loss = bound_loss(cfg.method.spec)
        self._custom_grads = any(callable(g) for g in self.grads)
        self.peak_lr = cfg.resolved_lr()
        self.opt = build_optimizer(cfg, model, self.peak_lr)
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
        self.filters = FilterNorms(model, self.run_dir)
        self._ready = True

    def _autocast(self):  # noqa: ANN202 - a context manager
        return autocast(self.precision, self.device)

    def _lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, self.steps_per_epoch, c.epochs, self.peak_lr, c.schedule)

    # ------------------------------------------------------------------ one step
    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        cfg, spec = self.cfg, self.cfg.method.spec
        if self.custom_loss is not None:
            return self.custom_loss(logits, y, cfg.alpha)
        ls = cfg.effective_label_smoothing()
        if spec.pgt and cfg.method.pgt_impl == "paper_hook":
            onehot = torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
            register_paper_pgt_hook(logits, onehot, cfg.alpha)
            return cross_entropy(logits, y, ls)
        if spec.pgt:
            return pgt_cross_entropy(logits, y, cfg.alpha, ls)
        return cross_entropy(logits, y, ls)

    def _transform(self, before: Tensor) -> Tensor | None:
        """The method's gradient transforms on the (unscaled) gradients, in order; the norm
        after, if they changed it. ``before`` is the global norm already measured for the
        metrics (GC uses it)."""
        m = self.cfg.method
        return apply_grad_transforms_(self.grads, self.params, self.agc_params, m, before)

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
    def _evaluate(self, want_features: bool, split: str = "test") -> TestMetrics:
        """Rank 0 evaluates the whole test set (``split="val"``: the validation split); the
        numbers are broadcast to every rank so all ranks take the same decisions (e.g.
        stopping on a non-finite test loss)."""
        loader = self.data.val if split == "val" else self.data.test
        if self.dist.enabled and not self.dist.is_main:
            m = TestMetrics(0.0, 0.0, 0.0, 0.0)
        else:
            m = evaluate(self.model, self.fc, loader, self.device, self._autocast,
                         self.channels_last, want_features)  # fmt: skip
        if self.dist.enabled:
            t = torch.tensor([m.loss, m.top1, m.top5, m.logit_norm], dtype=torch.float64,
                             device=self.device)  # fmt: skip
            a, b, c, d = distributed.broadcast(t, self.dist).tolist()
            m = TestMetrics(a, b, c, d, m.features)
        return m

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
        start_epoch, step, result = self.begin()
        for epoch in range(start_epoch, self.cfg.epochs):
            t0, p0 = time.perf_counter(), self.sink_paused()
            flog = self.epoch_filter_log(epoch, step)
            try:
                totals = self._train_epoch(epoch, step, flog)
            except Diverged as d:
                self.mark_diverged(result, epoch, d.step)
                return result
            step += self.steps_per_epoch
            took = time.perf_counter() - t0 - (self.sink_paused() - p0)
            if self.end_epoch(epoch, step, totals, flog, result, took):
                return result
        self.finish(result, start_epoch)
        return result

    # The parts of an epoch that are the same whether this run trains alone or as a member
    # of a fused group (trainers.fused): the group calls them for each of its members.
    def begin(self) -> tuple[int, int, TrainResult]:
        """Resume from the checkpoint (if any) and tell the sink the run started: returns
        (first epoch to train, global step, the result being built)."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.checkpoints.load(self.model, self.opt, self.scaler)
        start_epoch, step = resumed.epoch, resumed.step
        result = TrainResult(
            status="done",
            history=resumed.history or [],
            device=describe_device(self.device)
            + (f" x{self.dist.world} processes" if self.dist.enabled else ""),
            precision=self.precision,
        )
        if self.dist.is_main:
            self.sink.on_start(start_epoch, result.device, self.precision)
        if start_epoch and self.dist.is_main:
            self.log(f"resuming after epoch {start_epoch}/{self.cfg.epochs} (step {step})")
        self._start_epoch = start_epoch
        return start_epoch, step, result

    def epoch_filter_log(self, epoch: int, step: int) -> FilterLog:
        """A new epoch's filter-norm log (with the step-0 snapshot on the very first one)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        flog = FilterLog()
        if self.cfg.filter_stats_every and step == 0 and self.dist.is_main:
            self.filters.snapshot(flog, 0, epoch)
        return flog

    def mark_diverged(self, result: TrainResult, epoch: int, step: int) -> None:
        result.status, result.diverged_step = "diverged", step
        self.log(
            f"epoch {epoch + 1}/{self.cfg.epochs}: non-finite loss at step {step}; "
            "stopping (status diverged)"
        )

    def end_epoch(
        self,
        epoch: int,
        step: int,
        totals: EpochTotals,
        flog: FilterLog,
        result: TrainResult,
        charged: float,
    ) -> bool:
        """Evaluate, record, checkpoint and log a trained epoch; True when the run stops
        here (a non-finite test loss: diverged; its search's pruner: pruned). ``charged``:
        the seconds of training charged to this run (a fused member: its share of the
        group's); the evaluation's own time is added to it as the epoch's time."""
        cfg, main = self.cfg, self.dist.is_main
        t0, p0 = time.perf_counter(), self.sink_paused()
        last = epoch == cfg.epochs - 1
        test = self._evaluate(want_features=last)
        val = self._evaluate(False, "val") if self.data.val is not None else None
        cuda = self.device.type == "cuda"
        m = EpochMetrics(
            epoch=epoch,
            step=step,
            train_loss=totals.train_loss,
            train_acc=totals.train_acc,
            test_loss=test.loss,
            test_acc=test.top1,
            test_top5=test.top5,
            logit_norm=test.logit_norm,
            gap=totals.train_acc - test.top1,
            lr=self._lr(step - 1),
            epoch_time=charged + time.perf_counter() - t0 - (self.sink_paused() - p0),
            images_per_s=self.steps_per_epoch * cfg.batch_size / max(totals.train_time, 1e-9),
            grad_norm_before=totals.grad_norm_before,
            grad_norm_after=totals.grad_norm_after,
            peak_mem_mb=torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None,
            val_acc=None if val is None else val.top1,
            val_loss=None if val is None else val.loss,
        )
        if not all(math.isfinite(v) for v in (test.loss, test.logit_norm)):  # on all ranks
            result.status, result.diverged_step = "diverged", step
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: non-finite test loss; stopping")
            return True
        result.history.append(m)
        if last:
            _set_features(result, test.features)
        stop = False
        if main:
            self._hold()  # a run another job took over gets no file of this one's
            filter_file = self.filters.write(epoch, flog, before_replace=self._hold)
            self.sink.on_epoch(m, flog.stats, filter_file)
            self.checkpoints.save(
                epoch + 1,
                step,
                result.history,
                self.model,
                self.opt,
                self.scaler,
                before_replace=self._may_replace,
            )
            self.log(
                f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {m.train_loss:.4f} "
                f"acc {m.train_acc:6.2f}%  test loss {m.test_loss:.4f} "
                f"acc {m.test_acc:6.2f}% top5 {m.test_top5:6.2f}%  "
                + (f"val loss {m.val_loss:.4f} acc {m.val_acc:6.2f}%  " if val is not None else "")
                + f"|z| {m.logit_norm:7.3f}  "
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
        return stop

    def sink_paused(self) -> float:
        """Seconds this process has been stopped (SIGSTOP, a suspended Slurm job), as the
        sink counts them: left out of an epoch's recorded time."""
        paused = getattr(self.sink, "paused", None)
        return float(paused()) if paused is not None else 0.0

    def _hold(self) -> None:
        hold = getattr(self.sink, "hold", None)
        if hold is not None:
            hold()

    def _may_replace(self) -> bool:
        """Whether the new checkpoint may replace the last one now (the sink's word)."""
        may = getattr(self.sink, "may_replace", None)
        return bool(may()) if may is not None else True

    def finish(self, result: TrainResult, start_epoch: int) -> None:
        """After the last epoch. A run that had finished before (e.g. killed after its last
        checkpoint) measures its features again."""
        if start_epoch >= self.cfg.epochs and result.history and self.dist.is_main:
            _set_features(result, self._evaluate(want_features=True).features)

    def new_epoch_sums(self) -> EpochSums:
        return EpochSums(self.cfg.check_every, self.steps_per_epoch, self.device, self.dist)

    def guard(self, loss: Tensor, after: Tensor) -> Tensor:
        """A custom transform that breaks the gradients diverges at that step."""
        if self._custom_grads:
            return torch.where(torch.isfinite(after), loss, torch.nan)
        return loss

    def snapshot_due(self, flog: FilterLog, s: int, epoch: int) -> None:
        """Filter norms after global step ``s`` when they are due."""
        every = self.cfg.filter_stats_every
        if every and (s + 1) % every == 0 and self.dist.is_main:
            self.filters.snapshot(flog, s + 1, epoch)

    def _train_epoch(self, epoch: int, step: int, flog: FilterLog) -> EpochTotals:
        """Run one epoch from global step ``step``; raises :class:`Diverged` at the first
        non-finite loss."""
        sums = self.new_epoch_sums()
        t0 = time.perf_counter()
        batches: Iterator[tuple[Tensor, Tensor]] = self.data.train.batches(epoch)
        for i, (x, y) in enumerate(batches):
            s = step + i
            for g in self.opt.param_groups:
                g["lr"] = self._lr(s)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, c, b, a = self._train_step(x, y)
            sums.add(i, s, self.guard(loss, a), c, b, a, y.numel())
            self.snapshot_due(flog, s, epoch)
        return sums.totals(time.perf_counter() - t0)


class EpochSums:
    """One epoch's running sums of one run, kept on the device.

    Losses go into a device buffer and are checked every ``check_every`` steps, so the host
    syncs with the device only that often, yet the diverging step is exact (every rank of a
    data-parallel run agrees on it)."""

    def __init__(
        self, check_every: int, steps: int, device: torch.device, dist: distributed.DistInfo
    ) -> None:
        self.k, self.steps, self.device, self.dist = check_every, steps, device, dist
        self.buf = torch.zeros(check_every, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.gn_b = torch.zeros((), device=device)
        self.gn_a = torch.zeros((), device=device)
        self.seen = self.done = 0

    def add(self, i: int, s: int, loss: Tensor, c: Tensor, b: Tensor, a: Tensor, n: int) -> None:
        """Step ``i`` of the epoch (global step ``s``); raises :class:`Diverged`."""
        k = self.k
        self.buf[i % k] = loss
        self.loss_sum += loss
        self.correct += c
        self.gn_b += b
        self.gn_a += a
        self.seen += n
        self.done = i + 1
        if (i + 1) % k == 0 or i + 1 == self.steps:
            m = i % k + 1
            pos = torch.arange(m, device=self.device)
            first = torch.where(torch.isfinite(self.buf[:m]), m, pos).min()
            # every rank must stop at the same check: agree on the earliest bad step
            first = int(distributed.all_min(first, self.dist))
            if first < m:
                raise Diverged(s - m + 1 + first)

    def totals(self, train_time: float) -> EpochTotals:
        steps, world = self.done, self.dist.world
        t = torch.stack([self.loss_sum.float(), self.correct.float()])
        loss_total, correct_total = distributed.all_sum(t, self.dist).tolist()
        return EpochTotals(
            train_loss=loss_total / (steps * world),
            train_acc=100.0 * correct_total / (self.seen * world),
            grad_norm_before=self.gn_b.item() / steps,
            grad_norm_after=self.gn_a.item() / steps,
            train_time=train_time,
        )


def _dry_run(model: nn.Module, target: str, data: DataBundle) -> None:
    """A researcher's model meets the data before any row is written: one forward of two
    zero images of the data's shape (eval mode, no grad: no state changes), which must give
    (2, num_classes) logits."""
    shape = (2, data.in_channels, data.image_size, data.image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as e:
        raise ConfigError(
            f"model._target_={target} cannot take a batch of the data's shape {shape}: "
            f"{first_line(e)}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, data.num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(
            f"model._target_={target} returns {got} for {shape}; expected (2, {data.num_classes})"
        )


def _set_features(result: TrainResult, feats: list[float]) -> None:
    result.feature_norms = feats
    result.zero_features = sum(1 for f in feats if f < ZERO_NORM)
