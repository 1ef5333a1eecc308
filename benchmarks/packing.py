"""Benchmark: 8 small jobs on one GPU, ``jobs_per_gpu=4`` vs ``jobs_per_gpu=1``.

Eight ResNet-20 runs on CIFAR-shaped synthetic data (uint8 3x32x32, 10 classes, batch 128,
seeds 0-7) go through the real CLI and submitit's local executor twice, each time into a
fresh results dir: once one job at a time on the GPU, once four at a time sharing it. Both
wall times (from the command's start to its exit: start-up, data, training, evaluation,
store writes) and their ratio are printed, with the runs' own img/s and peak GPU memory read
back from each store. A small model at batch 128 is launch-bound: it leaves most of a big
GPU idle, which packing fills (docs/architecture.md). Goal: serial / packed >= 3 on CUDA.

Only ``CUDA_VISIBLE_DEVICES``' first GPU is used (the goal is about one GPU). On a machine
without a GPU, ``--device cpu`` runs the same script with ``max_parallel`` 2 vs 1 instead,
to check it end to end; there is no goal for that. Usage:

    .venv/bin/python benchmarks/packing.py [--device auto|cpu|cuda] [--quick]
        [--images N] [--epochs E]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, add_device_args, machine_line, pick_device, print_table, verdict

GOAL = 3.0  # wall time jobs_per_gpu=1 / jobs_per_gpu=4, on one GPU
JOBS = 8


def run_sweep(knob: str, value: int, images: int, epochs: int, gpu: bool) -> tuple[float, list]:
    """One 8-run sweep in a fresh results dir: (wall seconds, per-run rows from its store)."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if gpu:
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        args = [
            sys.executable, "-m", "sweeper", "-m", f"seed=range(0,{JOBS})",
            "model=resnet20", "data=synthetic", "data.image_size=32", "data.num_classes=10",
            f"data.num_train={images}", f"data.num_test={max(images // 5, 128)}",
            "batch_size=128", f"epochs={epochs}", "filter_stats_every=0",
            f"device={'cuda' if gpu else 'cpu'}", "mlflow.enabled=false",
            f"hydra.launcher.{knob}={value}", "hydra.launcher.fuse=off", f"results_dir={d}",
        ]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(args, cwd=d, env=env, capture_output=True, text=True)
        took = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"sweep failed ({knob}={value}):\n{res.stderr[-3000:]}")
        con = sqlite3.connect(Path(d) / "results.db")
        rows = con.execute(
            "SELECT status, images_per_s, peak_gpu_mem_mb, train_seconds FROM runs"
        ).fetchall()
        con.close()
    done = sum(1 for r in rows if r[0] == "done")
    if done != JOBS:
        sys.exit(f"expected {JOBS} runs done ({knob}={value}), found {done}")
    return took, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(ap)
    ap.add_argument("--images", type=int, default=None, help="training images per run")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args()
    dev = pick_device(args.device)
    gpu = dev.type == "cuda"
    images = args.images or ((10_000 if args.quick else 50_000) if gpu else 512)
    epochs = args.epochs or (1 if args.quick or not gpu else 2)
    knob, packed = ("jobs_per_gpu", 4) if gpu else ("max_parallel", 2)

    print(machine_line(dev))
    print(
        f"{JOBS} runs: resnet20, synthetic 3x32x32, {images} images, batch 128, {epochs} "
        f"epoch(s), {'bf16 on one GPU' if gpu else 'fp32 on CPU'}; {knob}=1 vs {packed}"
    )
    serial, rows1 = run_sweep(knob, 1, images, epochs, gpu)
    together, rows4 = run_sweep(knob, packed, images, epochs, gpu)

    def per_run(rows: list) -> tuple[str, str]:
        ips = sum(r[1] for r in rows) / len(rows)
        mem = [r[2] for r in rows if r[2] is not None]
        return f"{ips:,.0f}", f"{max(mem):,.0f}" if mem else "-"

    print()
    print_table(
        ["setting", "wall s", "mean img/s per run", "peak GPU MiB per run"],
        [[f"{knob}=1", f"{serial:.1f}", *per_run(rows1)],
         [f"{knob}={packed}", f"{together:.1f}", *per_run(rows4)]],
    )  # fmt: skip
    ratio = serial / together
    print()
    if gpu:
        print(f"speed-up {knob}=1 / {knob}={packed}: {ratio:.2f}x  goal >= {GOAL}x  "
              f"{verdict(ratio >= GOAL)}")  # fmt: skip
    else:
        print(f"speed-up max_parallel=1 / 2 on CPU: {ratio:.2f}x (no goal: packing is a GPU "
              "matter; run with --device cuda on a GPU machine)")  # fmt: skip


if __name__ == "__main__":
    main()
