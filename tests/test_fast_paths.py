"""Speed never changes results: the Trainer's fast paths against a plain PyTorch loop.

The fast paths are the GPU-resident data with batched on-device crop + flip
(:class:`trainers.data.TensorLoader`), our AGC (per-tensor in place on CPU, segmented on
CUDA), the PGT loss as a custom autograd function and device-side loss buffers (and
``compile=true``, against the eager Trainer). The plain path below is what a researcher would write by hand: images read
straight from the CIFAR pickles, cropped and flipped one by one, normalised per sample;
``F.cross_entropy`` with the PGT gradient put on the logits by a hook; timm's
per-parameter AGC loop; an eager model. Both start from the same initial weights and see
the same batches (the data stream is defined by ``epoch_generator(seed, epoch)``), so their
per-epoch metrics must agree to float tolerance.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.catalog.data import CIFAR
from trainers.config import MethodConf, ModelConf, RunConfig
from trainers.data import DataConfig
from trainers.models import build_model
from trainers.runtime import resolve_compile_mode
from trainers.schedule import lr_at
from trainers.train import Trainer

N_TRAIN, N_TEST, BATCH, EPOCHS, ALPHA, PAD = 200, 40, 50, 2, 0.3, 4


def _write_cifar10(root: Path) -> None:
    """cifar-10-batches-py: 5 training batches of 40 images, a test batch of 40."""
    rng = np.random.default_rng(5)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    # class-dependent means, so the net learns something in 8 steps
    for name, n in [*((f"data_batch_{k}", N_TRAIN // 5) for k in range(1, 6)),
                    ("test_batch", N_TEST)]:  # fmt: skip
        y = rng.integers(0, 10, n)
        x = np.clip(rng.normal(60 + 15 * y[:, None], 40, (n, 3072)), 0, 255).astype(np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y.tolist()}, f, protocol=2)


def _cfg(root: Path | None, **kw: object) -> RunConfig:
    """ResNet-20 on the CIFAR-10 files under ``root``; ``kw`` replaces any field."""
    fields: dict[str, Any] = {
        "model": ModelConf(name="resnet20"),
        "data": DataConfig(name="cifar10", root=str(root)),
        "batch_size": BATCH,
        **kw,
    }
    cfg = RunConfig(
        method=MethodConf.preset("agc_pgt"),
        alpha=ALPHA,
        epochs=EPOCHS,
        device="cpu",
        precision="fp32",
        filter_stats_every=0,
        check_every=3,
        **fields,
    )
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------- the plain path
def _read(path: Path) -> tuple[Tensor, Tensor]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).copy())
    return x, torch.tensor(d[b"labels"])


def _normalise(img: Tensor) -> Tensor:
    mean = torch.tensor(CIFAR["cifar10"].mean).view(3, 1, 1)
    std = torch.tensor(CIFAR["cifar10"].std).view(3, 1, 1)
    return (img.float() / 255 - mean) / std


@torch.no_grad()
def _timm_agc(params: list[nn.Parameter], clip_factor: float, eps: float) -> None:
    """timm.utils.agc.adaptive_clip_grad: one parameter at a time."""
    for p in params:
        g = p.grad
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        w_norm = p.norm(2.0, dim=dims, keepdim=p.ndim > 1).clamp_(min=eps)
        g_norm = g.norm(2.0, dim=dims, keepdim=p.ndim > 1)
        max_norm = w_norm * clip_factor
        clipped = g * (max_norm / g_norm.clamp(min=1e-6))
        g.copy_(torch.where(g_norm < max_norm, g, clipped))


def _plain_loop(cfg: RunConfig, root: Path) -> list[tuple[float, float, float]]:
    """(train_loss, test_loss, test_acc) per epoch, by hand."""
    d = root / "cifar-10-batches-py"
    parts = [_read(d / f"data_batch_{k}") for k in range(1, 6)]
    xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xte, yte = _read(d / "test_batch")
    torch.manual_seed(cfg.seed)  # the Trainer's init rule: the seed alone
    model = build_model("resnet20", 10, 3)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    peak = cfg.resolved_lr()
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=peak, momentum=cfg.momentum, nesterov=cfg.nesterov,
    )  # fmt: skip
    fc = {id(p) for p in model.fc.parameters()}
    agc_params = [p for p in model.parameters() if id(p) not in fc]
    steps = N_TRAIN // BATCH
    out = []
    for epoch in range(EPOCHS):
        # the data stream's definition: order, crop offsets, flips, drawn in this order
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) % 2**63)
        order = torch.randperm(N_TRAIN, generator=g)[: steps * BATCH]
        offsets = torch.randint(0, 2 * PAD + 1, (steps * BATCH, 2), generator=g)
        flips = torch.rand(steps * BATCH, generator=g) < 0.5
        losses = []
        model.train()
        for s in range(steps):
            imgs = []
            for j in range(s * BATCH, (s + 1) * BATCH):
                img = F.pad(xtr[order[j]], (PAD, PAD, PAD, PAD))
                oy, ox = offsets[j].tolist()
                img = img[:, oy : oy + 32, ox : ox + 32]
                imgs.append(_normalise(img.flip(-1) if flips[j] else img))
            x, y = torch.stack(imgs), ytr[order[s * BATCH : (s + 1) * BATCH]]
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + s, steps, EPOCHS, peak, cfg.schedule)
            z = model(x)
            q = F.one_hot(y, 10).float()
            # PGT (paper Eq. 8-9): the gradient reaching the logits is (softmax(alpha z) - q)/N
            z.register_hook(
                lambda _g, z=z, q=q: (torch.softmax(ALPHA * z.detach(), 1) - q) / len(q)
            )
            loss = F.cross_entropy(z, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _timm_agc(agc_params, cfg.method.agc_clip_factor, cfg.method.agc_eps)
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            z = torch.cat([model(_normalise(xte[i : i + BATCH])) for i in range(0, N_TEST, BATCH)])
        test_loss = F.cross_entropy(z, yte).item()
        test_acc = 100.0 * (z.argmax(1) == yte).float().mean().item()
        out.append((sum(losses) / len(losses), test_loss, test_acc))
    return out


def _trainer(cfg: RunConfig, run_dir: Path) -> list[tuple[float, float, float]]:
    result = Trainer(cfg, run_dir, log=lambda _: None).fit()
    assert result.status == "done"
    return [(m.train_loss, m.test_loss, m.test_acc) for m in result.history]


def _agree(
    a: list[tuple[float, float, float]], b: list[tuple[float, float, float]], n_test: int = N_TEST
) -> None:
    assert len(a) == len(b) == EPOCHS
    for (tl_a, vl_a, acc_a), (tl_b, vl_b, acc_b) in zip(a, b, strict=True):
        assert math.isclose(tl_a, tl_b, rel_tol=1e-4), (a, b)
        assert math.isclose(vl_a, vl_b, rel_tol=1e-4), (a, b)
        # an image whose top two logits tie to float rounding may flip: allow one test image
        assert abs(acc_a - acc_b) <= 100 / n_test + 1e-9, (a, b)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    _write_cifar10(root)
    return root


@pytest.fixture(scope="module")
def plain(cifar: Path) -> list[tuple[float, float, float]]:
    return _plain_loop(_cfg(cifar), cifar)


@pytest.mark.slow
def test_trainer_equals_a_plain_loop(cifar: Path, plain, tmp_path: Path) -> None:
    fast = _trainer(_cfg(cifar), tmp_path / "eager")
    _agree(fast, plain)
    assert plain[-1][0] < plain[0][0] * 1.5  # it trained (finite, no blow-up)


@pytest.mark.slow
def test_compiled_trainer_equals_the_eager_one(tmp_path: Path) -> None:
    """compile=true (torch.compile of forward and backward; compile_mode auto -> default
    on CPU) gives the run the eager Trainer gives, which equals the plain loop (above). On
    the digits CNN: with a cold cache, building inductor's C++ kernels for ResNet-20 takes
    about a minute of CPU, the digits CNN's about half that; ResNet-20 compiled on CUDA is
    tests/test_gpu.py's."""
    digits = {"model": ModelConf(name="digits_cnn"), "data": DataConfig(name="digits"),
              "batch_size": 64}  # fmt: skip
    eager = _trainer(_cfg(None, **digits), tmp_path / "eager")
    compiled_trainer = Trainer(_cfg(None, compile=True, **digits), tmp_path / "compiled",
                               log=lambda _: None)  # fmt: skip
    result = compiled_trainer.fit()
    assert result.status == "done" and compiled_trainer.compile_mode == "default"
    compiled = [(m.train_loss, m.test_loss, m.test_acc) for m in result.history]
    _agree(compiled, eager, n_test=360)
    assert compiled[-1][0] < compiled[0][0]  # it trained


def test_compile_mode_resolution(cifar: Path) -> None:
    """auto: CUDA graphs (reduce-overhead) for one CUDA process; default on CPU and in DDP."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on = _cfg(cifar, compile=True)
    assert resolve_compile_mode(_cfg(cifar), cuda, False) is None  # compile=false: eager
    assert resolve_compile_mode(on, cuda, False) == "reduce-overhead"
    assert resolve_compile_mode(on, cuda, True) == "default"
    assert resolve_compile_mode(on, cpu, False) == "default"
    pinned = _cfg(cifar, compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert resolve_compile_mode(pinned, cuda, False) == "max-autotune-no-cudagraphs"


@pytest.mark.parametrize("method", ["gc", "gc_pgt", "baseline"])
def test_step_gradient_clipping_matches_torch(method: str, tmp_path: Path) -> None:
    """The Trainer's GC reuses the norm it measures for the metrics instead of a second
    pass: the gradients it leaves equal ``torch.nn.utils.clip_grad_norm_`` on the raw ones,
    and the step's before / after norms are the raw and clipped global norms."""
    cfg = RunConfig(
        model=ModelConf(name="digits_cnn"),
        method=MethodConf.preset(method, gc_max_norm=0.05),  # small: clipping engages
        data=DataConfig(name="digits"),
        device="cpu",
        filter_stats_every=0,
    )
    cfg.validate()
    t = Trainer(cfg, tmp_path, log=lambda _: None)
    t.setup()
    x, y = next(iter(t.data.train.batches(0)))
    # reference: the same model state, plain backward, torch's clip
    torch.manual_seed(0)
    t.opt.zero_grad(set_to_none=True)
    t._loss(t.model(x), y).backward()
    raw = [p.grad.clone() for p in t.params]
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw])).item()
    ref = [g.clone() for g in raw]
    for p, g in zip(t.params, ref, strict=True):
        p.grad = g
    if method != "baseline":
        torch.nn.utils.clip_grad_norm_(t.params, 0.05)
    _, _, before, after = t._train_step(x, y)  # recomputes the same raw gradients
    assert before.item() == pytest.approx(raw_norm, rel=1e-5)
    for p, want in zip(t.params, ref, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8)
    want_after = min(raw_norm, 0.05) if method != "baseline" else raw_norm
    assert after.item() == pytest.approx(want_after, rel=1e-4)
