"""Fused groups: several runs of one architecture trained together in one process.

A sweep's points that differ only in what each run does with its own copy of the model --
seed, alpha, the method's pieces and knobs, learning rate, momentum, weight decay, label
smoothing -- can share one job (``hydra.launcher.fuse``, :mod:`sweeper.launch.fuse`). Each member
is a full :class:`~trainers.train.Trainer`: its own initialisation (its seed), data order
and augmentation (its seed, from the one resident copy of the data), loss, gradient
transforms (its own GC / AGC / ZNorm reductions), optimiser, schedule, BatchNorm running
statistics, filter statistics, checkpoint and sink. What is shared is the process (one
start-up, one copy of the data) and, when ``stacked``, the kernels:

* **stacked** (the default on CUDA): the members' parameters and buffers are stacked into
  one tensor each, and the forward and backward run once for the whole group with
  ``torch.func.functional_call`` under ``torch.vmap`` (which lowers a batch of convolutions
  to one grouped convolution); each member's parameters are views into the stacks, so its
  own optimiser, transforms, evaluation and checkpoint work on them unchanged. A small
  network on a GPU is launch-bound, and K members cost about the kernels of one.
* **interleaved** (the default on a CPU): each member takes its step in turn, exactly as it
  would alone. On a CPU a stacked step is slower than the members' separate steps
  (``benchmarks/fused.py`` measures both), so there the gain is the start-ups saved, and
  the arithmetic is that of the separate runs.

Members may leave the group at any step: a member whose loss turns non-finite is
``diverged`` at that step, one its search prunes is ``pruned``; the stacks are rebuilt
without it, so it stops costing the group. Members resume from their own checkpoints (a
group killed mid-way resumes each unfinished member; members at different epochs join the
group when it reaches theirs). Each member's epoch time is its share of the group's
training time plus its own evaluation, so the members' times add up to the job's.

The group never asks for more memory than the device has: the members' footprint is
measured (parameters, gradients, optimiser state, and the activations one forward saves
for backward) and the group is trained in chunks of at most :meth:`FusedTrainer.capacity`
members at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from trainers.data import DataBundle
from trainers.methods import global_grad_norm
from trainers.probes import FilterLog
from trainers.records import TrainResult
from trainers.train import Diverged, EpochTotals, Trainer

__all__ = ["FusedTrainer", "reseeded"]

# share of the device's free memory a group may plan to use (the rest: allocator slack,
# evaluation, the CUDA context and what other processes take meanwhile)
MEMORY_SHARE = 0.7


def reseeded(data: DataBundle, seed: int) -> DataBundle:
    """The same data set (the same resident tensors) whose training loader draws ``seed``'s
    order and augmentation: a run's batches depend on its seed and epoch only
    (:func:`trainers.data.epoch_generator`)."""
    train = copy.copy(data.train)
    train.seed = seed  # type: ignore[attr-defined]
    return dataclasses.replace(data, train=train)


class FusedTrainer:
    """Train ``members`` (Trainers of one architecture, data set, batch size, epochs,
    schedule shape, optimiser, precision and device) together; see the module docstring."""

    def __init__(
        self,
        members: list[Trainer],
        stacked: bool | None = None,
        log: Callable[[str], None] = print,
        max_members: int | None = None,
    ) -> None:
        if not members:
            raise ValueError("a fused group needs at least one member")
        self.members = members
        dev = members[0].device
        self.stacked = dev.type == "cuda" if stacked is None else stacked
        self.log = log
        self.max_members = max_members
        self._ready = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Build every member; the data set is built once and shared (each member draws its
        own batches from it). Bad settings raise ConfigError before anything is recorded."""
        first = self.members[0]
        if not first._ready:
            first.setup()
        for m in self.members[1:]:
            if not m._ready:
                m.setup(data=reseeded(first.data, m.cfg.seed))
        self._ready = True

    def capacity(self) -> int:
        """How many members fit on the device at once, from the measured footprint of one
        (at least 1; ``max_members`` caps it)."""
        if not self._ready:
            self.setup()
        need = footprint_bytes(self.members[0])
        free = free_memory_bytes(self.members[0].device)
        fit = max(1, int(MEMORY_SHARE * free // max(need, 1))) if free else len(self.members)
        return min(fit, self.max_members or fit)

    # ---------------------------------------------------------------------- fit
    def fit(self, on_end: Callable[[int, TrainResult], None] | None = None) -> list[TrainResult]:
        """Train (or resume) every member to its end; ``on_end(i, result)`` is called as soon
        as member ``i`` is over (so its outcome is recorded while the others train on)."""
        if not self._ready:
            self.setup()
        n = len(self.members)
        cap = self.capacity()
        if cap < n:
            self.log(
                f"fused group of {n}: {cap} member(s) fit in memory at once; "
                f"training {-(-n // cap)} chunks one after another"
            )
        results: list[TrainResult | None] = [None] * n
        for lo in range(0, n, cap):
            idx = list(range(lo, min(n, lo + cap)))
            for i, r in self._fit_chunk(idx, on_end).items():
                results[i] = r
        return [r for r in results if r is not None]

    def _fit_chunk(
        self, idx: list[int], on_end: Callable[[int, TrainResult], None] | None
    ) -> dict[int, TrainResult]:
        ms = self.members
        starts: dict[int, int] = {}
        steps: dict[int, int] = {}
        results: dict[int, TrainResult] = {}
        for i in idx:
            starts[i], steps[i], results[i] = ms[i].begin()
        epochs = ms[idx[0]].cfg.epochs
        alive = [i for i in idx if starts[i] < epochs]

        def end(i: int) -> None:
            if on_end is not None:
                on_end(i, results[i])

        for i in idx:
            if i not in alive:
                ms[i].finish(results[i], starts[i])
                end(i)
        for epoch in range(min((starts[i] for i in alive), default=epochs), epochs):
            act = [i for i in alive if starts[i] <= epoch]
            if not act:
                continue
            flogs = {i: ms[i].epoch_filter_log(epoch, steps[i]) for i in act}
            t0, p0 = time.perf_counter(), ms[act[0]].sink_paused()
            out = self._train_epoch(epoch, act, steps, flogs)
            trained = [i for i in act if isinstance(out[i], EpochTotals)]
            # the group's training time (less the time the process was stopped), shared by
            # the members that trained the whole epoch
            took = time.perf_counter() - t0 - (ms[act[0]].sink_paused() - p0)
            share = took / max(1, len(trained))
            for i in act:
                m, o = ms[i], out[i]
                if isinstance(o, Diverged):
                    m.mark_diverged(results[i], epoch, o.step)
                    alive.remove(i)
                    end(i)
                    continue
                assert isinstance(o, EpochTotals)
                o.train_time = share
                steps[i] += m.steps_per_epoch
                if m.end_epoch(epoch, steps[i], o, flogs[i], results[i], share):
                    alive.remove(i)  # diverged on its test set, or pruned
                    end(i)
        for i in alive:
            ms[i].finish(results[i], starts[i])
            end(i)
        return results

    def _train_epoch(
        self, epoch: int, act: list[int], steps: dict[int, int], flogs: dict[int, FilterLog]
    ) -> dict[int, EpochTotals | Diverged]:
        ms = self.members
        sums = {i: ms[i].new_epoch_sums() for i in act}
        its: dict[int, Iterator[tuple[Tensor, Tensor]]] = {
            i: ms[i].data.train.batches(epoch) for i in act
        }
        live = list(act)
        out: dict[int, EpochTotals | Diverged] = {}
        if self.stacked:
            self._stack(live)
        t0 = time.perf_counter()
        for k in range(ms[act[0]].steps_per_epoch):
            batch = {i: next(its[i]) for i in live}
            for i in live:
                lr = ms[i]._lr(steps[i] + k)
                for g in ms[i].opt.param_groups:
                    g["lr"] = lr
            if self.stacked:
                res = self._stacked_step(live, batch)
            else:
                res = {i: ms[i]._train_step(*self._input(i, batch[i])) for i in live}
            gone = []
            for i in live:
                loss, c, b, a = res[i]
                try:
                    sums[i].add(k, steps[i] + k, ms[i].guard(loss, a), c, b, a, batch[i][1].numel())
                except Diverged as d:
                    out[i] = d
                    gone.append(i)
                    continue
                ms[i].snapshot_due(flogs[i], steps[i] + k, epoch)
            if gone:  # it stops costing the group at once
                live = [i for i in live if i not in gone]
                if not live:
                    break
                if self.stacked:
                    self._stack(live)
        for i in live:
            out[i] = sums[i].totals(time.perf_counter() - t0)
        return out

    def _input(self, i: int, xy: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = xy
        if self.members[i].channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    # --------------------------------------------------------------- stacked mode
    def _stack(self, live: list[int]) -> None:
        """Stack the live members' parameters and buffers (a copy of their current values)
        and make each member's own tensors views into the stacks, so that its optimiser,
        transforms, evaluation, filter norms and checkpoint see and change its slice."""
        models = [self.members[i].model for i in live]
        base = models[0]
        self._pnames = [n for n, p in base.named_parameters() if p.requires_grad]
        bnames = [n for n, _ in base.named_buffers()]
        with torch.no_grad():
            params = {
                n: torch.stack([m.get_parameter(n).detach() for m in models]).requires_grad_()
                for n in self._pnames
            }
            buffers = {n: torch.stack([m.get_buffer(n) for m in models]) for n in bnames}
        for j, m in enumerate(models):
            for n in self._pnames:
                m.get_parameter(n).data = params[n].detach()[j]
            for n in bnames:
                m.get_buffer(n).data = buffers[n][j]
        self._params, self._buffers = params, buffers
        self._member_params = [[m.get_parameter(n) for n in self._pnames] for m in models]
        if not hasattr(self, "_forward"):
            skeleton = copy.deepcopy(base).to("meta")  # shapes and code only; no memory

            def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
                return torch.func.functional_call(skeleton, (p, b), (x,))

            self._forward = torch.vmap(one, randomness="different")

    def _stacked_step(
        self, live: list[int], batch: dict[int, tuple[Tensor, Tensor]]
    ) -> dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]:
        ms = self.members
        x = torch.stack([batch[i][0] for i in live])  # (K, N, C, H, W)
        y = torch.stack([batch[i][1] for i in live])
        with ms[live[0]]._autocast():
            logits = self._forward(self._params, self._buffers, x)  # (K, N, classes)
        losses = [ms[i]._loss(logits[j], y[j]) for j, i in enumerate(live)]
        for p in self._params.values():
            p.grad = None
        # d(sum of the members' losses) / d(member j's weights) = d(loss_j) / d(its weights)
        torch.stack(losses).sum().backward()
        res = {}
        for j, i in enumerate(live):
            m = ms[i]
            for n, p in zip(self._pnames, self._member_params[j], strict=True):
                p.grad = self._params[n].grad[j]  # type: ignore[index]
            before = global_grad_norm(m.params)
            after = m._transform(before)
            m.opt.step()
            correct = (logits[j].detach().argmax(1) == y[j]).sum()
            res[i] = (losses[j].detach(), correct, before, before if after is None else after)
        return res


# ------------------------------------------------------------------------- memory
def footprint_bytes(member: Trainer) -> int:
    """One member's memory while it trains, measured: its parameters three times (weights,
    gradients, the optimiser's state: momentum, or AdamW's two moments counted as two),
    plus the activations one training forward of a real batch saves for backward (counted
    with ``saved_tensors_hooks`` on a copy of the model, so no state changes), plus the
    batch itself."""
    model = copy.deepcopy(member.model)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    states = 2 if member.cfg.optimizer.name == "adamw" else 1
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        saved[id(t)] = t.numel() * t.element_size()
        return t

    x, _ = next(iter(member.data.train.batches(0)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), member._autocast():
        out = model(x)
    del out
    return pbytes * (2 + states) + sum(saved.values()) + x.numel() * x.element_size()


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` now: CUDA's free bytes, or the host's MemAvailable (Linux);
    None when unknown (no cap)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
