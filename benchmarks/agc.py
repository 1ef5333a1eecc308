"""Benchmark: our AGC (trainers.methods.adaptive_clip_grad_) vs timm's per-parameter loop.

Both run on the gradients of a torchvision ResNet-50 (one real backward at a small input, so
the gradient scales are realistic and part of the units get clipped), over the parameters
the trainer hands AGC: all but the final classifier ``fc`` (159 of 161 tensors). Timings
alternate the two implementations across repeats (AB, BA, ...) to cancel drift and report the
median ms per call. Correctness: from identical copies of the gradients, the clipped
gradients must agree to 1e-6 relative. Goal: >= 5x faster on CUDA, >= 1.5x on CPU
(docs/architecture.md: timm's loop costs 21.5 ms per call on an H200). Usage:

    .venv/bin/python benchmarks/agc.py [--device auto|cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from _common import (
    add_device_args,
    machine_line,
    median,
    pick_device,
    print_table,
    sync,
    time_once,
    verdict,
)
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from trainers.methods import adaptive_clip_grad_

CLIP_FACTOR, EPS = 0.01, 1e-3  # NFNets defaults, also MethodConf's
GOAL = {"cuda": 5.0, "cpu": 1.5}  # speed-up timm-loop / ours
REL_TOL = 1e-6


# ------------------------------------------------------------------ reference (timm)
def unitwise_norm(x: Tensor) -> Tensor:
    """timm.utils.agc.unitwise_norm: whole-tensor norm for ndim <= 1, else per output unit."""
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def timm_adaptive_clip_grad(
    parameters: list[Tensor], clip_factor: float = CLIP_FACTOR, eps: float = EPS
) -> None:
    """timm.utils.agc.adaptive_clip_grad, verbatim in behaviour: one pass per parameter."""
    for p in parameters:
        if p.grad is None:
            continue
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = unitwise_norm(p_data).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


def ours(parameters: list[Tensor]) -> None:
    """What the trainer calls: impl=auto (segmented on CUDA, per-tensor in place on CPU)."""
    adaptive_clip_grad_(parameters, CLIP_FACTOR, EPS)


def ours_segmented(parameters: list[Tensor]) -> None:
    """The CUDA implementation, forced (on a CPU box: for its correctness and op count)."""
    adaptive_clip_grad_(parameters, CLIP_FACTOR, EPS, impl="segmented")


# ------------------------------------------------------------------------- helpers
# ATen ops that only make views / wrap scalars: no kernel runs for them on a GPU.
_NO_KERNEL = {"aten.detach", "aten.unbind", "aten.select", "aten.view", "aten.alias",
              "aten.scalar_tensor", "aten.expand"}  # fmt: skip


class _OpCounter(TorchDispatchMode):
    """Counts ATen ops that launch a kernel. AGC over a ResNet-50 is launch-bound on a GPU
    (docs/architecture.md), so the ratio of these counts predicts the CUDA speed-up on a CPU box."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = str(func.overloadpacket)
        if name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    with _OpCounter() as c:
        fn()
    return sum(c.ops.values())


def make_grads(device: torch.device, size: int) -> tuple[nn.Module, list[Tensor]]:
    """A ResNet-50 with real gradients from one backward; returns it and AGC's parameters.

    At initialisation nearly every unit's gradient exceeds 1% of its weight norm, so every
    unit would be clipped and the "keep" branch never checked. Each tensor's gradient is
    rescaled so that its median unit sits at the threshold times a random factor in
    [0.3, 3]: a mix of clipped and kept units (and whole vectors) in every run.
    """
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device)
    x = torch.randn(4, 3, size, size, device=device)
    y = torch.randint(0, 1000, (4,), device=device)
    nn.functional.cross_entropy(model(x), y).backward()
    # the trainer excludes the final classifier from AGC (trainers/train.py, Trainer.setup)
    fc = {id(p) for p in model.fc.parameters()}
    params = [p for p in model.parameters() if id(p) not in fc and p.grad is not None]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            ratio = unitwise_norm(p.grad) / unitwise_norm(p.detach()).clamp(min=EPS)
            jitter = 10 ** (torch.rand((), generator=g).item() - 0.5)
            p.grad.mul_(CLIP_FACTOR * jitter / ratio.median().clamp_min(1e-30))
    return model, params


def max_rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """Max elementwise |a - b| / |b| (0 where both are 0)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        d = (x - y).abs()
        rel = torch.where(d == 0, torch.zeros_like(d), d / y.abs().clamp_min(1e-30))
        worst = max(worst, float(rel.max()))
    return worst


def clipped_fraction(params: list[Tensor]) -> float:
    """Share of units (rows/filters, or whole vectors) that AGC rescales."""
    hit = total = 0
    for p in params:
        clip = unitwise_norm(p.grad) > unitwise_norm(p.detach()).clamp(min=EPS) * CLIP_FACTOR
        hit, total = hit + int(clip.sum()), total + clip.numel()
    return hit / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(ap)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per method")
    args = ap.parse_args()
    dev = pick_device(args.device)
    gpu = dev.type == "cuda"
    # calls per timed repeat: many on a GPU (a call is ~ms), few on a CPU (a call is ~100 ms)
    calls = (20 if args.quick else 100) if gpu else (2 if args.quick else 5)
    repeats = args.repeats or (3 if args.quick else 9)
    warmup = 3 if args.quick else 10

    print(machine_line(dev))
    _, params = make_grads(dev, size=64)
    orig = [p.grad.clone() for p in params]
    n_el = sum(p.numel() for p in params)
    print(
        f"ResNet-50 (torchvision), {len(params)} tensors without fc, {n_el / 1e6:.1f} M params, "
        f"{len({(p.shape, p.dtype) for p in params})} shape groups, grads {params[0].grad.dtype}, "
        f"{100 * clipped_fraction(params):.1f}% of units clipped"
    )

    def restore() -> None:
        for p, g in zip(params, orig, strict=True):
            p.grad.copy_(g)

    # ---- correctness: the same starting gradients through both
    restore()
    timm_adaptive_clip_grad(params)
    ref = [p.grad.clone() for p in params]
    restore()
    ours(params)
    got = [p.grad.clone() for p in params]
    rel = max_rel_diff(got, ref)
    restore()
    ours_segmented(params)
    rel_seg = max_rel_diff([p.grad.clone() for p in params], ref)
    changed = sum(int(not torch.equal(r, o)) for r, o in zip(ref, orig, strict=True))

    # ---- op counts (proxy for kernel launches)
    restore()
    ops_ref = count_ops(lambda: timm_adaptive_clip_grad(params))
    ops_ours = count_ops(lambda: ours(params))
    restore()
    ops_seg = count_ops(lambda: ours_segmented(params))
    impl = "segmented" if gpu else "per-tensor in place"

    # ---- timing. AGC's cost does not depend on the values (same kernels whether a unit is
    # clipped or not), so repeated calls on already-clipped gradients time the same work.
    impls: dict[str, Callable[[], None]] = {
        "timm loop": lambda: timm_adaptive_clip_grad(params),
        f"ours ({impl})": lambda: ours(params),
    }
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    sync(dev)

    def run_many(fn: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            for _ in range(calls):
                fn()

        return go

    times: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(repeats):
        order = list(impls) if r % 2 == 0 else list(reversed(impls))  # AB, BA: cancels drift
        for name in order:
            times[name].append(1e3 * time_once(run_many(impls[name]), dev) / calls)

    mine = f"ours ({impl})"
    t_ref, t_ours = median(times["timm loop"]), median(times[mine])
    speedup = t_ref / t_ours
    print(f"{repeats} repeats x {calls} calls each, {warmup} warm-up calls\n")
    print_table(
        ["implementation", "ms/call (median)", "min", "max", "kernel ops/call"],
        [
            ["timm loop", f"{t_ref:.2f}", f"{min(times['timm loop']):.2f}",
             f"{max(times['timm loop']):.2f}", ops_ref],
            [mine, f"{t_ours:.2f}", f"{min(times[mine]):.2f}", f"{max(times[mine]):.2f}",
             ops_ours],
            *([] if gpu else [["ours (segmented, CUDA's)", "-", "-", "-", ops_seg]]),
        ],
    )  # fmt: skip
    goal = GOAL[dev.type]
    ok_eq = max(rel, rel_seg) <= REL_TOL
    print()
    print(
        f"correctness: max relative diff vs timm {rel:.2e} ({impl}), {rel_seg:.2e} "
        f"(segmented) over {len(params)} tensors ({changed} changed by clipping)  "
        f"goal <= {REL_TOL:g}  {verdict(ok_eq)}"
    )
    print(
        f"kernel ops timm/segmented: {ops_ref / ops_seg:.1f}x fewer launches (on CUDA, where "
        "the timm loop is launch-bound, this bounds the speed-up)"
    )
    print(
        f"speed-up timm/ours: {speedup:.2f}x  goal >= {goal:g}x on {dev.type}  "
        f"{verdict(speedup >= goal)}"
    )
    if not ok_eq:
        raise SystemExit(1)  # a wrong result is a bug, not noise


if __name__ == "__main__":
    main()
