"""Benchmark: GPU-resident data (TensorLoader) vs a torch DataLoader with CPU workers.

ResNet-20 on CIFAR-shaped synthetic data (uint8 3x32x32, 10 classes), batch 128, trained by
our Trainer's own epoch loop (``Trainer._train_epoch``: per-step lr, the step, the loss
buffer and divergence checks). Only the ``trainer.data.train`` loader differs:

- resident: :class:`trainers.data.TensorLoader` with the whole set as one uint8 tensor on
  the device, random crop (zero pad 4) + flip done on the device as one gather per batch,
  normalised there (exactly what the cifar10/cifar100 data sets use);
- dataloader: ``torch.utils.data.DataLoader`` over the same uint8 images on the host, with
  torchvision ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, float conversion and
  ``Normalize`` per sample in worker processes, pinned memory, non-blocking copies.

Both are timed per epoch, alternating (AB, BA, ...) after one warm-up epoch each (cuDNN
autotune, worker start-up: persistent workers), median of the repeats; a data-only pass
(batches fetched to the device, no training) shows each loader's ceiling. Goal: epoch time
dataloader / resident >= 1.5 on CUDA (docs/architecture.md anchors: 4.8 s vs 4.4 s per 391-step
epoch with a plain loop, launch-bound at 11 ms/step). Usage:

    .venv/bin/python benchmarks/data_path.py [--device auto|cpu|cuda] [--quick]
        [--images N] [--workers W] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator

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
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from trainers.catalog.data import CIFAR
from trainers.config import ModelConf, RunConfig
from trainers.data import CIFAR_PAD, DataConfig, TensorLoader
from trainers.probes import FilterLog
from trainers.train import Trainer

CIFAR10_MEAN, CIFAR10_STD = CIFAR["cifar10"].mean, CIFAR["cifar10"].std

GOAL = 1.5  # dataloader epoch time / resident epoch time, on CUDA
BATCH = 128


class _CifarLike(Dataset):
    """Host uint8 images + labels, with the classic per-sample torchvision CIFAR pipeline."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels
        self.tf = T.Compose(
            [
                T.RandomCrop(32, padding=CIFAR_PAD),
                T.RandomHorizontalFlip(),
                T.ConvertImageDtype(torch.float32),  # uint8 -> [0, 1], like ToTensor
                T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.tf(self.images[i]), self.labels[i]


class DataLoaderPath:
    """A DataLoader behind the Trainer's Loader protocol (``batches(epoch)``, ``len``)."""

    def __init__(self, images: Tensor, labels: Tensor, workers: int, device: torch.device) -> None:
        self.device = device
        self.loader = DataLoader(
            _CifarLike(images, labels),
            batch_size=BATCH,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,  # start-up paid once, in the warm-up epoch
        )

    def __len__(self) -> int:
        return len(self.loader)

    def shard(self, lo: int, hi: int) -> None:  # single process here
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def build_trainer(dev: torch.device, run_dir: str) -> Trainer:
    """A ResNet-20 Trainer; its own (tiny) data set is replaced by the loaders under test."""
    cfg = RunConfig(
        model=ModelConf(name="resnet20"),
        data=DataConfig(name="synthetic", image_size=32, num_train=BATCH, num_test=BATCH),
        batch_size=BATCH,
        epochs=1,
        device=dev.type,
        precision="bf16" if dev.type == "cuda" else "fp32",
        filter_stats_every=0,
    )
    cfg.validate()
    trainer = Trainer(cfg, run_dir, log=lambda _: None)
    trainer.setup()
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(ap)
    ap.add_argument("--images", type=int, default=None, help="training images (CIFAR: 50000)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs per path")
    args = ap.parse_args()
    dev = pick_device(args.device)
    gpu = dev.type == "cuda"
    n = args.images or (
        (10_000 if args.quick else 50_000) if gpu else (512 if args.quick else 4096)
    )
    # the anchor's 8 workers on a GPU box; on a CPU box the workers share the cores with
    # the training step, so no more than there are cores
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    repeats = args.repeats or (2 if args.quick else 3)

    print(machine_line(dev))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(dev, run_dir)
        paths = {
            "resident (TensorLoader)": TensorLoader(
                images.to(dev), labels.to(dev), CIFAR10_MEAN, CIFAR10_STD, BATCH, 0, True,
                CIFAR_PAD,
            ),
            f"DataLoader ({workers} workers)": DataLoaderPath(images, labels, workers, dev),
        }  # fmt: skip
        steps = len(next(iter(paths.values())))
        print(
            f"resnet20, {n} images 3x32x32 uint8, batch {BATCH}, {steps} steps/epoch, "
            f"{trainer.precision}, channels_last={trainer.channels_last}, "
            f"{repeats} timed epochs per path after 1 warm-up"
        )
        epoch = 0
        totals: list = []

        def train_epoch(name: str) -> float:
            nonlocal epoch
            trainer.data.train = paths[name]
            trainer.steps_per_epoch = len(paths[name])
            epoch += 1
            return time_once(
                lambda: totals.append(trainer._train_epoch(epoch, 0, FilterLog())), dev
            )

        def data_epoch(name: str) -> float:
            def go() -> None:
                for x, _ in paths[name].batches(epoch):
                    if trainer.channels_last:  # as Trainer._train_epoch lays batches out
                        x = x.contiguous(memory_format=torch.channels_last)

            return time_once(go, dev)

        names = list(paths)
        for name in names:  # warm-up: cuDNN autotune, allocator, worker start-up
            train_epoch(name)
        train_t: dict[str, list[float]] = {k: [] for k in names}
        data_t: dict[str, list[float]] = {k: [] for k in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:  # AB, BA: cancels drift
                train_t[name].append(train_epoch(name))
                data_t[name].append(data_epoch(name))
        loss = totals[-1].train_loss

    rows = []
    for name in names:
        t, d = median(train_t[name]), median(data_t[name])
        rows.append(
            [name, f"{t:.3f}", f"{1e3 * t / steps:.1f}", f"{steps * BATCH / t:.0f}", f"{d:.3f}"]
        )
    print()
    print_table(["data path", "epoch s (median)", "ms/step", "img/s", "data-only s"], rows)
    ratio = median(train_t[names[1]]) / median(train_t[names[0]])
    print()
    print(f"last epoch's train loss: {loss:.4f}")
    if gpu:
        print(f"epoch time DataLoader/resident: {ratio:.2f}x  goal >= {GOAL}x  "
              f"{verdict(ratio >= GOAL)}")  # fmt: skip
    else:  # on a CPU both paths run on the same cores as the model: no goal there
        print(f"epoch time DataLoader/resident: {ratio:.2f}x (no goal on CPU: the goal is for "
              "CUDA; run with --device cuda on a GPU machine)")  # fmt: skip


if __name__ == "__main__":
    main()
