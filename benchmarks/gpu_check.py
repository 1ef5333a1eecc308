"""Every GPU row of benchmarks/README.md in one short run (goal: <= 8 minutes on
one H100 or H200), printed as one table with PASS / FAIL.

Each row is its own benchmark script, run as a subprocess in its quick GPU mode with a time
budget; its verdict lines (``... PASS`` / ``... FAIL``) are collected, and its full output
is kept under ``--out`` (default ``gpu_check_logs/``) for benchmarks/README.md.
A row that runs out of its budget or crashes is FAIL with the reason. Usage, on a GPU
machine:

    .venv/bin/python benchmarks/gpu_check.py [--out DIR] [--only NAME ...]

Without CUDA it says so and exits 2 (nothing measured); ``--list`` prints the rows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Row:
    name: str  # the Performance table's row
    args: list[str]  # the script and its quick GPU arguments
    budget_s: int


ROWS = [
    Row("AGC (segmented) vs timm's loop", ["agc.py", "--device", "cuda", "--quick"], 45),
    Row("PGT / LS step cost", ["step_cost.py", "--device", "cuda", "--quick"], 60),
    Row("GPU-resident data vs DataLoader", ["data_path.py", "--device", "cuda", "--quick"], 60),
    Row("compiled step (ResNet-20)",
        ["plain_loop.py", "--device", "cuda", "--quick", "--compile", "--model", "resnet20"], 80),
    Row("Trainer vs plain loop (ResNet-50)", ["plain_loop.py", "--device", "cuda", "--quick"], 60),
    Row("packing jobs_per_gpu=4 vs 1", ["packing.py", "--device", "cuda", "--quick"], 80),
    Row("fused grids (8 / 21 members)", ["fused.py", "--gpu", "--quick"], 90),
]  # fmt: skip


def run_row(row: Row, out: Path, n: int) -> tuple[str, float, list[str]]:
    """(PASS | FAIL | n/a, seconds, verdict lines)."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, str(HERE / row.args[0]), *row.args[1:]],
                             capture_output=True, text=True, timeout=row.budget_s)  # fmt: skip
        text, code = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        took = time.perf_counter() - t0
        (out / f"{n}-{row.args[0]}.log").write_text(text)
        return "FAIL", took, [f"over its budget of {row.budget_s} s"]
    took = time.perf_counter() - t0
    (out / f"{n}-{row.args[0]}.log").write_text(text)
    lines = [ln.strip() for ln in text.splitlines() if ln.rstrip().endswith(("PASS", "FAIL"))]
    if code != 0 and not lines:
        return "FAIL", took, [f"exit {code}: " + (text.strip().splitlines() or ["no output"])[-1]]
    if not lines:
        return "n/a", took, ["no verdict printed"]
    return ("FAIL" if any(ln.endswith("FAIL") for ln in lines) else "PASS"), took, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check_logs"))
    ap.add_argument("--only", nargs="*", default=None, help="run only rows whose script is named")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    rows = [r for r in ROWS if a.only is None or r.args[0].removesuffix(".py") in a.only]
    if a.list:
        for r in rows:
            print(f"{r.name}: benchmarks/{' '.join(r.args)} (budget {r.budget_s} s)")
        return
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing measured (run it on a GPU "
              "machine; benchmarks/README.md's GPU rows stay 'not yet measured')")  # fmt: skip
        sys.exit(2)
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}; "
          f"budget {sum(r.budget_s for r in rows)} s; logs in {a.out}/", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    results = []
    for n, r in enumerate(rows, 1):
        v, took, lines = run_row(r, a.out, n)
        results.append((r, v, took, lines))
        print(f"[{v}] {r.name} ({took:.0f} s)", flush=True)
    print(f"\n{'row':<36} {'verdict':<7} {'s':>5}  figures")
    for r, v, took, lines in results:
        print(f"{r.name:<36} {v:<7} {took:5.0f}  {lines[0] if lines else ''}")
        for ln in lines[1:]:
            print(f"{'':<36} {'':<7} {'':>5}  {ln}")
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s (goal <= 480 s)")
    sys.exit(0 if all(v != "FAIL" for _, v, _, _ in results) else 1)


if __name__ == "__main__":
    main()
