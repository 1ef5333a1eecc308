"""Helpers shared by the benchmark scripts in this folder (not a benchmark itself).

Each script imports this module by name: ``python benchmarks/<script>.py`` puts this folder
first on ``sys.path``. Timing rules they all follow: warm-up before timing (cuDNN autotune,
allocator growth, lazy inits), ``torch.cuda.synchronize`` on both sides of every GPU timing
(kernel launches are asynchronous, so a host clock alone measures only the launch), and the
median of several repeats (robust to a neighbour's burst on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # so `import trainers` works without installing the package
    sys.path.insert(0, str(REPO))


def add_device_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--quick", action="store_true", help="smoke mode: < 60 s on a 2-core CPU")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's marketing name (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    where = (
        f"GPU {torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"CPU {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    )
    return (
        f"machine: {platform.node()} | {where} | torch {torch.__version__} | "
        f"python {platform.python_version()}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        line = "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
        )
        print(line)
        if k == 0:
            print("  ".join("-" * w for w in widths))
