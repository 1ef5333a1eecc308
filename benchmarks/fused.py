"""Benchmark: fused grids (``hydra.launcher.fuse``) against one job per point.

1. **The used-by command on the CPU** (``--sweep``): ``python -m sweeper -m method=pgt
   alpha=0.05,0.25,0.3`` (digits, 30 epochs, MLflow on: the defaults) through the real CLI
   and submitit's local executor, in fresh results dirs, with ``fuse=auto`` and with
   ``fuse=off``, alternating, ``--repeats`` times each. Printed: each command's wall time,
   the summed ``train_seconds`` of its runs (a fused member records its share of the job's
   time, so the sum never exceeds the wall), and the ratios. Goals: wall <= 1.25 x the
   summed training time (fused), and fused no slower than ``fuse=off``.
2. **One step, K members, in one process** (``--steps``): one stacked step of K digits CNNs
   (or ResNet-20s) -- ``torch.func.functional_call`` under ``vmap``, one backward, each
   member's own SGD -- against K separate steps. No goal: it decides what ``fuse=auto``
   does on each device (trainers/fused.py: stacked on CUDA, interleaved on a CPU).
3. **GPU** (``--gpu``, CUDA only): 8 and 21 ResNet-20 members on CIFAR-shaped synthetic
   data (7 alpha x 3 seeds), bf16: summed images/s of one fused group against one job at a
   time and against ``jobs_per_gpu=8`` packing (``benchmarks/packing.py``'s runs), and the
   projected time of the 200-epoch 21-member grid. Goals: >= 10x one job, >= 2x packing,
   <= 30 minutes.

    .venv/bin/python benchmarks/fused.py [--sweep] [--steps] [--gpu] [--repeats N] [--quick]

With no section named, it runs the CPU sections (1 and 2), and 3 when CUDA is present.
"""

from __future__ import annotations

import argparse
import copy
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO, machine_line, print_table, sync, verdict

SWEEP = ["-m", "method=pgt", "alpha=0.05,0.25,0.3"]
WALL_GOAL = 1.25  # wall / summed train_seconds, fused
GPU_ONE_GOAL, GPU_PACK_GOAL, GRID_MINUTES_GOAL = 10.0, 2.0, 30.0


# ------------------------------------------------------------------ 1. the used-by sweep
def run_sweep(fuse: str, extra: list[str]) -> tuple[float, float, int]:
    """(wall s, summed train_seconds, jobs) of the used-by command in a fresh dir."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        args = [sys.executable, "-m", "sweeper", *SWEEP, *extra, f"hydra.launcher.fuse={fuse}"]
        t0 = time.perf_counter()
        res = subprocess.run(args, cwd=d, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"sweep failed (fuse={fuse}):\n{res.stderr[-3000:]}")
        con = sqlite3.connect(Path(d) / "results" / "results.db")
        (train,) = con.execute("SELECT sum(train_seconds) FROM runs WHERE status='done'").fetchone()
        (jobs,) = con.execute("SELECT count(DISTINCT job_id) FROM sweep_runs").fetchone()
        con.close()
    return wall, float(train), int(jobs)


def sweep_section(repeats: int, quick: bool) -> bool:
    extra = ["epochs=5"] if quick else []
    print(f"\n1. `python -m sweeper {' '.join(SWEEP + extra)}` on the defaults, "
          f"fuse=auto vs fuse=off, {repeats} alternating run(s) each")  # fmt: skip
    got: dict[str, list[tuple[float, float, int]]] = {"auto": [], "off": []}
    for _ in range(repeats):
        for fuse in ("auto", "off"):
            got[fuse].append(run_sweep(fuse, extra))
    rows = []
    for fuse, xs in got.items():
        wall = statistics.median(x[0] for x in xs)
        train = statistics.median(x[1] for x in xs)
        rows.append(
            [f"fuse={fuse}", xs[0][2], f"{wall:.1f}", f"{train:.1f}", f"{wall / train:.2f}"]
        )
    print_table(["setting", "jobs", "wall s", "summed train s", "wall / train"], rows)
    wf = statistics.median(x[0] for x in got["auto"])
    tf = statistics.median(x[1] for x in got["auto"])
    wo = statistics.median(x[0] for x in got["off"])
    shares = all(x[1] <= x[0] for x in got["auto"])
    ok = wf / tf <= WALL_GOAL and wf <= wo and shares
    print(f"fused: wall / summed train {wf / tf:.2f} (goal <= {WALL_GOAL}) "
          f"{verdict(wf / tf <= WALL_GOAL)}; fused / off wall {wf / wo:.2f} (goal <= 1) "
          f"{verdict(wf <= wo)}; members' times within the wall: {verdict(shares)}")  # fmt: skip
    return ok


# ----------------------------------------------------------------- 2. one step, K members
def _members(name: str, k: int, shape: tuple[int, ...], dev: torch.device) -> list:
    from trainers.models import build_model

    out = []
    for s in range(k):
        torch.manual_seed(s)
        out.append(build_model(name, 10, shape[0]).to(dev))
    return out


def step_times(name: str, k: int, shape: tuple[int, ...], batch: int, dev: torch.device,
               steps: int, bf16: bool = False) -> tuple[float, float]:  # fmt: skip
    """(stacked, separate) seconds per step of K members."""
    from torch.func import functional_call, stack_module_state

    models = _members(name, k, shape, dev)
    x = torch.randn(k, batch, *shape, device=dev)
    y = torch.randint(0, 10, (k, batch), device=dev)
    ce = torch.nn.functional.cross_entropy
    ac = torch.autocast("cuda", torch.bfloat16, enabled=bf16)
    params, bufs = stack_module_state(models)
    skel = copy.deepcopy(models[0]).to("meta")
    fwd = torch.vmap(lambda p, b, xx: functional_call(skel, (p, b), (xx,)), randomness="different")
    opt = torch.optim.SGD(list(params.values()), lr=0.01, momentum=0.9)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]

    def stacked() -> None:
        with ac:
            out = fwd(params, bufs, x)
        loss = ce(out.float().flatten(0, 1), y.flatten()) * k  # = the sum of the K mean losses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def separate() -> None:
        for i, m in enumerate(models):
            with ac:
                out = m(x[i])
            loss = ce(out.float(), y[i])
            opts[i].zero_grad(set_to_none=True)
            loss.backward()
            opts[i].step()

    res = {}
    for fn in (stacked, separate, stacked, separate):  # warm-up, then measured
        fn()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(dev)
        res[fn.__name__] = (time.perf_counter() - t0) / steps
    return res["stacked"], res["separate"]


def steps_section(quick: bool) -> None:
    dev = torch.device("cpu")
    print(f"\n2. one step of K members in one process (CPU, {torch.get_num_threads()} threads, "
          "fp32, batch 64): stacked (vmap) vs K separate steps")  # fmt: skip
    rows = []
    cases = [
        ("digits_cnn", 3, (1, 8, 8)),
        ("digits_cnn", 9, (1, 8, 8)),
        ("resnet20", 3, (3, 32, 32)),
    ]
    for name, k, shape in cases[:2] if quick else cases:
        st, sp = step_times(name, k, shape, 64, dev, 3 if name == "resnet20" else 20)
        rows.append([f"{name} K={k}", f"{st * 1e3:.1f}", f"{sp * 1e3:.1f}", f"{sp / st:.2f}"])
    print_table(["members", "stacked ms", "separate ms", "separate / stacked"], rows)
    print("no goal; fuse=auto on a CPU trains a group interleaved (each member's own step, "
          "exactly its separate run) since a stacked step is not faster here: the gain is "
          "the start-ups saved")  # fmt: skip


# ------------------------------------------------------------------------------ 3. GPU
def trainer_rate(k: int, images: int) -> float:
    """Summed training images/s of K ResNet-20 members trained by the real FusedTrainer
    (stacked, bf16, 7 alphas x seeds) -- or, for K=1, by a Trainer alone; the last of two
    epochs (the first pays CUDA's and cuDNN's warm-up)."""
    from trainers.config import DataConfig, MethodConf, ModelConf, RunConfig
    from trainers.fused import FusedTrainer
    from trainers.train import Trainer

    alphas = (0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75)
    data = DataConfig(name="synthetic", num_train=images, num_test=512)
    cfgs = [RunConfig(model=ModelConf(name="resnet20"), data=data, batch_size=128, epochs=2,
                      method=MethodConf.preset("pgt"), alpha=alphas[i % 7], seed=i // 7,
                      filter_stats_every=0, device="cuda") for i in range(k)]  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        members = [Trainer(c, Path(d) / str(i), log=lambda s: None) for i, c in enumerate(cfgs)]
        if k == 1:
            hist = members[0].fit().history
        else:
            hist = FusedTrainer(members, stacked=True, log=lambda s: None).fit()[0].history
    # a member's images/s is its images over its share of the group's time: the group's rate
    return hist[-1].images_per_s


def gpu_section(quick: bool) -> bool:
    print(f"\n3. GPU: ResNet-20 members, CIFAR-shaped synthetic data, bf16, batch 128 "
          f"({torch.cuda.get_device_name(0)}), the real trainers")  # fmt: skip
    images = 128 * (20 if quick else 60)
    one = trainer_rate(1, images)
    rows, ok, rate = [["one job", "1", f"{one:,.0f}", "1.0x"]], True, {}
    for k in (8, 21):
        rate[k] = trainer_rate(k, images)
        rows.append([f"fused K={k}", str(k), f"{rate[k]:,.0f}", f"{rate[k] / one:.1f}x"])
    pack = packing_rate(quick)
    if pack is not None:
        rows.append(["jobs_per_gpu=8 packing", "8", f"{pack:,.0f}", f"{pack / one:.1f}x"])
    print_table(["setting", "runs", "images/s (all runs)", "vs one job"], rows)
    r8 = rate[8] / one
    ok &= r8 >= GPU_ONE_GOAL
    print(
        f"8 fused vs one job at a time: {r8:.1f}x (goal >= {GPU_ONE_GOAL}x) {verdict(r8 >= GPU_ONE_GOAL)}"
    )
    if pack is not None:
        rp = rate[8] / pack
        ok &= rp >= GPU_PACK_GOAL
        print(f"8 fused vs jobs_per_gpu=8 packing: {rp:.2f}x (goal >= {GPU_PACK_GOAL}x) "
              f"{verdict(rp >= GPU_PACK_GOAL)}")  # fmt: skip
    grid_min = 200 * 50_000 * 21 / rate[21] / 60
    ok &= grid_min <= GRID_MINUTES_GOAL
    print(f"projected 200-epoch grid, 21 members fused (50,000 images an epoch): {grid_min:.1f} "
          f"min (goal <= {GRID_MINUTES_GOAL:.0f}) {verdict(grid_min <= GRID_MINUTES_GOAL)}; "
          f"one job at a time: {200 * 50_000 * 21 / one / 3600:.1f} h")  # fmt: skip
    return ok


def packing_rate(quick: bool) -> float | None:
    """Summed img/s of 8 unfused ResNet-20 jobs packed on one GPU (the real CLI)."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        args = [sys.executable, "-m", "sweeper", "-m", "seed=range(0,8)", "model=resnet20",
                "data=synthetic", f"data.num_train={5_000 if quick else 20_000}",
                "data.num_test=512", "batch_size=128", "epochs=1", "filter_stats_every=0",
                "mlflow.enabled=false", "hydra.launcher.jobs_per_gpu=8",
                "hydra.launcher.fuse=off", f"results_dir={d}"]  # fmt: skip
        res = subprocess.run(args, cwd=d, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"packing run failed: {res.stderr[-500:]}")
            return None
        con = sqlite3.connect(Path(d) / "results.db")
        (ips,) = con.execute("SELECT sum(images_per_s) FROM runs").fetchone()
        con.close()
    return float(ips)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--steps", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke mode (5 epochs, fewer steps)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    if a.gpu and not cuda:
        sys.exit("--gpu: no CUDA device on this machine")
    every = not (a.sweep or a.steps or a.gpu)
    print(machine_line(torch.device("cuda" if cuda else "cpu")))
    ok = True
    if a.sweep or every:
        ok &= sweep_section(a.repeats, a.quick)
    if a.steps or every:
        steps_section(a.quick)
    if a.gpu or (every and cuda):
        ok &= gpu_section(a.quick)
    elif every:
        print("\n3. GPU: not measured (no CUDA device here)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
