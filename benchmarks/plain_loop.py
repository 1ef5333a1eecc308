"""Benchmark: our Trainer's images/s vs a minimal hand-written PyTorch loop, same model/batch.

The Trainer runs through ``Trainer.fit()`` on synthetic data and its ``images_per_s`` is read
from the returned history (training time only: the metric a sweep records). The plain loop
is the bare minimum: one pre-built batch on the device, autocast, ``F.cross_entropy``,
``backward``, SGD (Nesterov, momentum 0.9, weight decay) -- no augmentation, no metrics,
so it is the ceiling. The two are interleaved epoch by epoch: a :class:`Sink` runs one
plain-loop epoch of the same number of steps after each Trainer epoch (T P T P ...), and
the first epoch of each is a warm-up (cuDNN autotune, allocator; compilation with
``--compile``). Goal: Trainer / plain >= 0.97. Setups:

- CUDA: ResNet-50, 224x224, batch 256, bf16 autocast, channels-last (docs/architecture.md anchors on
  the H200: 4,700 img/s eager, 6,600 img/s with torch.compile).
- CPU:  ResNet-50, 64x64 (32x32 with --quick), batch 32, fp32.

``--compile`` adds a second round with ``compile=true`` for the Trainer and
``torch.compile(model)`` for the plain loop (the Trainer's ``compile_mode=auto``: CUDA
graphs on one GPU). ``--model resnet20`` measures the CIFAR ResNet-20 instead (32x32, 10
classes, batch 128). Usage:

    .venv/bin/python benchmarks/plain_loop.py [--device auto|cpu|cuda] [--quick] [--compile]
        [--model resnet50|resnet20] [--image-size S --batch B --steps K --epochs E]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    add_device_args,
    machine_line,
    median,
    pick_device,
    print_table,
    time_once,
    verdict,
)
from torch import Tensor, nn

from trainers.config import ModelConf, RunConfig
from trainers.data import DataConfig
from trainers.models import build_model
from trainers.records import EpochMetrics, LayerFilterStats
from trainers.train import Trainer

GOAL = 0.97  # Trainer img/s / plain-loop img/s
ANCHOR = {False: 4700, True: 6600}  # H200 img/s, ResNet-50 bf16 b256, eager / compiled
CLASSES = 1000


@dataclass
class Setup:
    model: str
    device: torch.device
    image_size: int
    batch: int
    steps: int  # per epoch
    epochs: int  # including the warm-up epoch
    compile: bool

    @property
    def classes(self) -> int:
        return 10 if self.model == "resnet20" else CLASSES

    @property
    def precision(self) -> str:
        return "bf16" if self.device.type == "cuda" else "fp32"


class PlainLoop:
    """The minimal loop: fixed batch, autocast, CE, backward, SGD step."""

    def __init__(self, s: Setup) -> None:
        dev = s.device
        torch.manual_seed(0)
        model = build_model(s.model, s.classes, 3).to(dev)  # the Trainer's exact network
        self.channels_last = dev.type == "cuda"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.forward: nn.Module = torch.compile(model) if s.compile else model  # type: ignore[assignment]
        self.opt = torch.optim.SGD(
            model.parameters(), lr=0.1 * s.batch / 256, momentum=0.9, nesterov=True,
            weight_decay=5e-4,
        )  # fmt: skip
        x = torch.randn(s.batch, 3, s.image_size, s.image_size, device=dev)
        self.x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        self.y = torch.randint(0, s.classes, (s.batch,), device=dev)
        self.autocast: contextlib.AbstractContextManager = (
            torch.autocast(dev.type, dtype=torch.bfloat16)
            if s.precision == "bf16"
            else contextlib.nullcontext()
        )
        self.steps, self.device = s.steps, dev

    def step(self) -> Tensor:
        with self.autocast:
            loss = F.cross_entropy(self.forward(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def epoch(self) -> float:
        """Seconds for one epoch of ``steps`` steps (device drained on both sides)."""

        def go() -> None:
            for _ in range(self.steps):
                self.step()

        return time_once(go, self.device)


@dataclass
class InterleavingSink:
    """Trainer sink that runs one plain-loop epoch after every Trainer epoch (T P T P ...)."""

    plain: PlainLoop
    batch: int
    plain_ips: list[float] = field(default_factory=list)

    def on_start(self, resume_epoch: int, device: str, precision: str) -> None:
        pass

    def on_epoch(
        self, metrics: EpochMetrics, filter_stats: list[LayerFilterStats], filter_file: Path | None
    ) -> None:
        self.plain_ips.append(self.plain.steps * self.batch / self.plain.epoch())

    def should_stop(self, metrics: EpochMetrics) -> bool:
        return False


def run_round(s: Setup) -> tuple[list[float], list[float], str]:
    """(trainer img/s per epoch, plain img/s per epoch, trainer device) for one setup."""
    cfg = RunConfig(
        model=ModelConf(name=s.model),
        data=DataConfig(
            name="synthetic",
            image_size=s.image_size,
            num_classes=s.classes,
            num_train=s.batch * s.steps,
            num_test=s.batch,
        ),
        batch_size=s.batch,
        epochs=s.epochs,
        device=s.device.type,
        precision=s.precision,
        channels_last=True,  # CUDA only, in the Trainer
        compile=s.compile,
    )  # everything else at the defaults a sweep runs with (metrics, snapshots, checks)
    cfg.validate()
    sink = InterleavingSink(PlainLoop(s), s.batch)
    with tempfile.TemporaryDirectory() as run_dir:
        result = Trainer(cfg, Path(run_dir), sink=sink, log=lambda _: None).fit()
    if result.status != "done":
        raise SystemExit(f"trainer run ended {result.status}")
    return [m.images_per_s for m in result.history], sink.plain_ips, result.device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(ap)
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    ap.add_argument("--model", choices=("resnet50", "resnet20"), default="resnet50")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=None, help="epochs, first one is warm-up")
    args = ap.parse_args()
    dev = pick_device(args.device)
    gpu = dev.type == "cuda"
    small = args.model == "resnet20"
    size = args.image_size or (32 if small else (224 if gpu else (32 if args.quick else 64)))
    batch = args.batch or (128 if small else (256 if gpu else 32))
    steps = args.steps or ((10 if args.quick else 25) if gpu else (6 if args.quick else 8))
    epochs = args.epochs or (4 if args.quick else (5 if gpu else 11))

    print(machine_line(dev))
    print(
        f"{args.model}, {size}x{size}, batch {batch}, {'bf16' if gpu else 'fp32'}, "
        f"channels_last={gpu}, {steps} steps/epoch, {epochs} epochs (first is warm-up)"
    )
    rows, ok = [], True
    per_epoch: list[str] = []
    spreads: list[float] = []
    for compiled in [False, True] if args.compile else [False]:
        s = Setup(args.model, dev, size, batch, steps, epochs, compiled)
        trainer_ips, plain_ips, _ = run_round(s)
        t, p = median(trainer_ips[1:]), median(plain_ips[1:])  # drop the warm-up epochs
        # each Trainer epoch against the plain epoch right after it: a shared VM's speed
        # drifts by several % over a minute, which pairing cancels
        ratio = median([a / b for a, b in zip(trainer_ips[1:], plain_ips[1:], strict=True)])
        q = statistics.quantiles(plain_ips[1:], n=4) if len(plain_ips) > 2 else [p] * 3
        spreads.append((q[2] - q[0]) / 2 / p)
        ok &= ratio >= GOAL
        mode = "compiled" if compiled else "eager"
        anchor = f"{ANCHOR[compiled]:,}" if gpu and not small else "-"
        rows.append([mode, f"{t:.1f}", f"{p:.1f}", f"{ratio:.3f}", anchor])
        # per-epoch values, warm-up first: shows how noisy the machine was
        per_epoch.append(
            f"{mode}: Trainer {' '.join(f'{v:.1f}' for v in trainer_ips)} | "
            f"plain {' '.join(f'{v:.1f}' for v in plain_ips)} img/s"
        )
    print()
    print_table(
        ["mode", "Trainer img/s (median)", "plain img/s (median)", "paired ratio", "H200 anchor"],
        rows,
    )
    print("per epoch (first is warm-up):")
    for line in per_epoch:
        print(f"  {line}")
    print()
    worst = min(float(r[3]) for r in rows)
    print(f"worst paired ratio Trainer/plain: {worst:.3f}  goal >= {GOAL}  {verdict(ok)}")
    if max(spreads) > (1 - GOAL) / 2:
        print(
            f"note: plain-loop epochs vary by +-{100 * max(spreads):.1f}% (half the interquartile "
            f"range): too noisy to resolve {100 * (1 - GOAL):.0f}%; use more --epochs or a quiet "
            "machine"
        )


if __name__ == "__main__":
    main()
