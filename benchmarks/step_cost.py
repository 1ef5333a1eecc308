"""Benchmark: training-step time with method pgt and ls_pgt vs baseline, through our Trainer.

One :class:`trainers.train.Trainer` is set up on synthetic data and its real step function
(``Trainer._train_step``: forward under autocast, the method's loss, backward, unscale,
gradient norm, optimiser step) is called on pre-drawn batches. The method is switched
between timed blocks by swapping ``trainer.cfg.method`` (the step reads it every call), so
all methods share one model, optimiser and data; block order rotates every repeat
(ABC, BCA, CAB, ...) to cancel drift. Reports the median step time per method and the median
of the paired ratios (each method's block over the baseline block of the same repeat: on a
shared VM the machine's speed drifts by several % between repeats, far more than the 1% to
resolve). Goal: <= 1.01 (on an H200 PGT costs nothing measurable: docs/architecture.md).

A second, sharper measurement isolates the only code that differs between the methods, the
loss's forward and backward on the step's (N, C) logits, and states its extra time over
plain cross-entropy as a fraction of the baseline step. Setups:

- CUDA: ResNet-50, 224x224, batch 256, bf16 autocast, channels-last (the paper's recipe).
- CPU:  ResNet-18, 32x32, batch 64, fp32.

Usage:

    .venv/bin/python benchmarks/step_cost.py [--device auto|cpu|cuda] [--quick]
        [--model M --image-size S --batch B] [--repeats R --steps K]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
from collections.abc import Callable

import torch
from _common import (
    add_device_args,
    machine_line,
    median,
    pick_device,
    print_table,
    time_once,
    verdict,
)
from torch import Tensor

from trainers.config import MethodConf, ModelConf, RunConfig
from trainers.data import DataConfig
from trainers.train import Trainer

GOAL = 1.01  # step time of a method / baseline
METHODS = {  # what the sweeps run; alpha from the paper's ResNet-18 choice
    "baseline": MethodConf.preset("baseline"),
    "pgt": MethodConf.preset("pgt"),
    "ls_pgt": MethodConf.preset("ls_pgt", label_smoothing=0.1),
}


def build_trainer(
    dev: torch.device, model: str, size: int, batch: int, n_batches: int, run_dir: str
) -> Trainer:
    gpu = dev.type == "cuda"
    cfg = RunConfig(
        model=ModelConf(name=model),
        method=METHODS["baseline"],
        data=DataConfig(
            name="synthetic",
            image_size=size,
            num_classes=1000,  # ImageNet-sized classifier: the loss works on (N, 1000) logits
            num_train=batch * n_batches,
            num_test=batch,
        ),
        alpha=0.25,
        batch_size=batch,
        epochs=1,
        device=dev.type,
        precision="bf16" if gpu else "fp32",
        channels_last=True,  # the Trainer applies it on CUDA only
        filter_stats_every=0,
    )
    for m in METHODS.values():  # every variant must be a valid run config
        dataclasses.replace(cfg, method=m).validate()
    trainer = Trainer(cfg, run_dir, log=lambda _: None)
    trainer.setup()
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(ap)
    ap.add_argument("--model", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed blocks per method")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed block")
    args = ap.parse_args()
    dev = pick_device(args.device)
    gpu = dev.type == "cuda"
    model = args.model or ("resnet50" if gpu else "resnet18")
    size = args.image_size or (224 if gpu else 32)
    batch = args.batch or (256 if gpu else 64)
    repeats = args.repeats or ((6 if gpu else 8) if args.quick else (12 if gpu else 16))
    steps = args.steps or ((5 if gpu else 2) if args.quick else (10 if gpu else 4))
    warmup = 3 if args.quick else 5

    print(machine_line(dev))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(dev, model, size, batch, 4, run_dir)
        print(
            f"{model}, {size}x{size}, batch {batch}, {trainer.precision}, "
            f"channels_last={trainer.channels_last}, alpha={trainer.cfg.alpha}, "
            f"{repeats} repeats x {steps} steps per method, {warmup} warm-up steps each"
        )
        # pre-drawn batches, laid out as Trainer._train_epoch hands them to the step
        batches: list[tuple[Tensor, Tensor]] = []
        for x, y in trainer.data.train.batches(0):
            if trainer.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batches.append((x, y))
        losses: list[Tensor] = []

        def block(name: str, n: int) -> Callable[[], None]:
            def go() -> None:
                trainer.cfg.method = METHODS[name]  # read by Trainer._loss on every step
                for i in range(n):
                    loss, *_ = trainer._train_step(*batches[i % len(batches)])
                losses.append(loss)

            return go

        names = list(METHODS)
        for name in names:
            time_once(block(name, warmup), dev)
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: ABC, BCA, ..
            for name in order:
                times[name].append(1e3 * time_once(block(name, steps), dev) / steps)
        finite = all(math.isfinite(float(v)) for v in losses)

        # the loss alone, forward + backward, on logits shaped and typed like the step's
        with trainer._autocast():
            z0 = trainer.forward(batches[0][0]).detach()
        y0 = batches[0][1]
        loss_calls = 50 if args.quick else 200

        def loss_block(name: str) -> Callable[[], None]:
            def go() -> None:
                trainer.cfg.method = METHODS[name]
                for _ in range(loss_calls):
                    z = z0.clone().requires_grad_(True)
                    trainer._loss(z, y0).backward()

            return go

        loss_ms: dict[str, list[float]] = {k: [] for k in names}
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                loss_ms[name].append(1e3 * time_once(loss_block(name), dev) / loss_calls)

    base = median(times["baseline"])
    base_loss = median(loss_ms["baseline"])
    rows, ok, worst = [], True, 0.0
    for name in names:
        t = median(times[name])
        paired = median([a / b for a, b in zip(times[name], times["baseline"], strict=True)])
        extra = (median(loss_ms[name]) - base_loss) / base
        if name != "baseline":
            ok &= paired <= GOAL
            worst = max(worst, paired)
        rows.append(
            [name, f"{t:.2f}", f"{min(times[name]):.2f}", f"{max(times[name]):.2f}",
             f"{batch / t * 1e3:.0f}", f"{paired:.4f}", f"{median(loss_ms[name]):.3f}",
             f"{100 * extra:+.3f}%"]
        )  # fmt: skip
    print()
    print_table(
        ["method", "ms/step (median)", "min", "max", "img/s", "paired ratio",
         "loss fwd+bwd ms", "loss extra / step"],
        rows,
    )  # fmt: skip
    print()
    print(f"losses finite: {finite}")
    worst_extra = max((median(loss_ms[n]) - base_loss) / base for n in names if n != "baseline")
    # a 1% verdict on whole steps needs block-to-block noise well under 1%
    q = statistics.quantiles(times["baseline"], n=4) if repeats > 1 else [base] * 3
    spread = (q[2] - q[0]) / 2 / base
    print(
        f"whole step: worst paired ratio method/baseline {worst:.4f} (baseline blocks vary by "
        f"+-{100 * spread:.1f}%, half the interquartile range)"
    )
    print(f"loss side alone: worst extra {100 * worst_extra:+.3f}% of a baseline step")
    if spread <= (GOAL - 1) / 2:
        print(f"verdict on whole steps: {worst:.4f}  goal <= {GOAL}  {verdict(ok)}")
    else:
        ok = 1 + worst_extra <= GOAL
        print(
            f"verdict on the loss side (whole steps too noisy here for 1%; the rest of the step "
            f"is the same code for every method): 1 + {worst_extra:.5f}  goal <= {GOAL}  "
            f"{verdict(ok)}"
        )


if __name__ == "__main__":
    main()
