"""Each gradient method against an independent formula (numpy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.methods import (
    METHODS,
    adaptive_clip_grad_,
    apply_grad_transforms_,
    clip_grad_norm_,
    method_spec,
    pgt_cross_entropy,
    register_paper_pgt_hook,
    znorm_,
)
from trainers.registry import ConfigError


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_targets(y: np.ndarray, c: int, eps: float) -> np.ndarray:
    q = np.eye(c)[y]
    return q * (1 - eps) + eps / c


def np_ce(z: np.ndarray, q: np.ndarray) -> float:
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return float(-(q * logp).sum(1).mean())


def pgt_grad_formula(z: np.ndarray, y: np.ndarray, alpha: float, eps: float = 0.0) -> np.ndarray:
    """(softmax(alpha z) - q) / N, written from p^alpha / sum p^alpha (paper Eq. 8)."""
    p = np_softmax(z)
    pa = p**alpha
    p_prime = pa / pa.sum(1, keepdims=True)
    return (p_prime - np_targets(y, z.shape[1], eps)) / z.shape[0]


@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.3, 0.92, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_pgt_gradient_float64_matches_formula(alpha: float, eps: float) -> None:
    rng = np.random.default_rng(0)
    z_np = rng.normal(scale=3.0, size=(16, 10))
    y_np = rng.integers(0, 10, 16)
    z = torch.tensor(z_np, requires_grad=True)
    loss = pgt_cross_entropy(z, torch.tensor(y_np), alpha, label_smoothing=eps)
    loss.backward()
    # value: plain CE with the smoothed targets, whatever alpha
    assert loss.item() == pytest.approx(np_ce(z_np, np_targets(y_np, 10, eps)), abs=1e-12)
    np.testing.assert_allclose(
        z.grad.numpy(), pgt_grad_formula(z_np, y_np, alpha, eps), rtol=0, atol=1e-12
    )


def test_pgt_alpha_one_equals_cross_entropy() -> None:
    torch.manual_seed(1)
    z1 = torch.randn(32, 100, dtype=torch.float64, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    y = torch.randint(0, 100, (32,))
    for eps in (0.0, 0.1):
        z1.grad = z2.grad = None
        a = pgt_cross_entropy(z1, y, 1.0, eps)
        b = F.cross_entropy(z2, y, label_smoothing=eps)
        a.backward()
        b.backward()
        assert abs(a.item() - b.item()) < 1e-12
        assert torch.allclose(z1.grad, z2.grad, rtol=0, atol=1e-12)


def test_pgt_soft_targets() -> None:
    rng = np.random.default_rng(2)
    z_np = rng.normal(size=(5, 4))
    q_np = rng.dirichlet(np.ones(4), size=5)
    z = torch.tensor(z_np, requires_grad=True)
    pgt_cross_entropy(z, torch.tensor(q_np), 0.3).backward()
    want = (np_softmax(0.3 * z_np) - q_np) / 5
    np.testing.assert_allclose(z.grad.numpy(), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pgt_low_precision_logits_computed_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    zl = (torch.randn(64, 10) * 4).to(dtype).requires_grad_(True)
    y = torch.randint(0, 10, (64,))
    loss = pgt_cross_entropy(zl, y, 0.25, 0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert zl.grad.dtype == dtype
    z64 = zl.detach().double().numpy()
    # the value is float32-accurate CE of the (upcast) low-precision logits
    assert loss.item() == pytest.approx(np_ce(z64, np_targets(y.numpy(), 10, 0.1)), rel=1e-6)
    # the gradient: the float32 formula rounded once to the logits' dtype
    exact = pgt_grad_formula(z64, y.numpy(), 0.25, 0.1)
    want32 = torch.tensor(exact, dtype=torch.float32)
    assert torch.equal(zl.grad, want32.to(dtype)) or torch.allclose(
        zl.grad.float(), want32, rtol=2**-7, atol=1e-6
    )
    np.testing.assert_allclose(zl.grad.double().numpy(), exact, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1024.0, 65536.0])
def test_pgt_independent_of_loss_scale(scale: float) -> None:
    torch.manual_seed(4)
    z = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (8,))
    (pgt_cross_entropy(z, y, 0.3) * scale).backward()
    want = scale * pgt_grad_formula(z.detach().numpy(), y.numpy(), 0.3)
    np.testing.assert_allclose(z.grad.numpy(), want, rtol=1e-12, atol=1e-12 * scale)


def _paper_hook_grad(z_np: np.ndarray, y_np: np.ndarray, alpha: float, scale: float) -> np.ndarray:
    z = torch.tensor(z_np, requires_grad=True)
    logits = z * 1.0  # a non-leaf, like a network's output
    onehot = F.one_hot(torch.tensor(y_np), z_np.shape[1]).double()
    register_paper_pgt_hook(logits, onehot, alpha)
    (F.cross_entropy(logits, torch.tensor(y_np)) * scale).backward()
    return z.grad.numpy()


def test_paper_hook_reproduces_pgt_only_at_scale_n_squared() -> None:
    """The official hook is right only when the loss scale S equals N^2 (docs/architecture.md)."""
    rng = np.random.default_rng(5)
    n, c, alpha = 16, 10, 0.3
    z_np = rng.normal(scale=2.0, size=(n, c))
    y_np = rng.integers(0, c, n)
    pgt = pgt_grad_formula(z_np, y_np, alpha)
    s = float(n * n)
    np.testing.assert_allclose(
        _paper_hook_grad(z_np, y_np, alpha, s), s * pgt, rtol=1e-9, atol=1e-12
    )
    for s in (1.0, 65536.0):  # fp32 (no scaler) and the default GradScaler scale at N=16
        got = _paper_hook_grad(z_np, y_np, alpha, s)
        rel = np.abs(got - s * pgt).max() / np.abs(s * pgt).max()
        # wrong, or NaN (a negative base raised to alpha when S > N^2)
        assert not np.isfinite(rel) or rel > 0.5, f"hook unexpectedly right at S={s}"
    # the official recipe's coincidence: 256 images per GPU and GradScaler's 2^16
    z_np = rng.normal(scale=2.0, size=(256, c))
    y_np = rng.integers(0, c, 256)
    np.testing.assert_allclose(
        _paper_hook_grad(z_np, y_np, alpha, 65536.0),
        65536.0 * pgt_grad_formula(z_np, y_np, alpha),
        rtol=1e-8,
        atol=1e-12,
    )


# ----------------------------------------------------------------- gradient transforms
def _params(
    shapes: list[tuple[int, ...]], seed: int, grad_scale: float
) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = []
    for sh in shapes:
        p = torch.nn.Parameter(torch.randn(sh, generator=g, dtype=torch.float64))
        p.grad = torch.randn(sh, generator=g, dtype=torch.float64) * grad_scale
        ps.append(p)
    return ps


SHAPES = [(8, 3, 3, 3), (8, 3, 3, 3), (16, 8, 3, 3), (10, 16), (10, 16), (10,), (8,), (8,), ()]


def agc_formula(w: np.ndarray, g: np.ndarray, lam: float, eps: float) -> np.ndarray:
    """NFNets Eq.: unit-wise over rows/filters (dim 0); the whole tensor when ndim <= 1."""
    if w.ndim <= 1:
        wn = max(np.sqrt((w**2).sum()), eps)
        gn = np.sqrt((g**2).sum())
        return g * (lam * wn / gn) if gn / wn > lam else g.copy()
    out = g.copy()
    for i in range(w.shape[0]):
        wn = max(np.sqrt((w[i] ** 2).sum()), eps)
        gn = np.sqrt((g[i] ** 2).sum())
        if gn / wn > lam:
            out[i] = g[i] * (lam * wn / gn)
    return out


@pytest.mark.parametrize("impl", ["auto", "per_tensor", "segmented"])
@pytest.mark.parametrize("lam", [0.01, 0.3, 1.0])
def test_agc_matches_formula(lam: float, impl: str) -> None:
    ps = _params(SHAPES, seed=6, grad_scale=0.2)
    ps[0].data[2].zero_()  # a zeroed filter exercises the eps floor
    want = [agc_formula(p.detach().numpy(), p.grad.numpy(), lam, 1e-3) for p in ps]
    adaptive_clip_grad_(ps, clip_factor=lam, eps=1e-3, impl=impl)  # type: ignore[arg-type]
    clipped = 0
    for p, w, g0 in zip(ps, want, _params(SHAPES, 6, 0.2), strict=True):
        np.testing.assert_allclose(p.grad.numpy(), w, rtol=1e-12, atol=1e-15)
        clipped += int(not np.allclose(w, g0.grad.numpy()))
    if lam == 0.3:  # both branches are exercised at this factor
        assert 0 < clipped < len(ps)


def test_gc_matches_formula() -> None:
    ps = _params(SHAPES, seed=7, grad_scale=1.0)
    g0 = [p.grad.numpy().copy() for p in ps]
    total = np.sqrt(sum((g**2).sum() for g in g0))
    norm = clip_grad_norm_(ps, max_norm=2.0)
    assert norm.item() == pytest.approx(total, rel=1e-12)
    factor = min(1.0, 2.0 / (total + 1e-6))  # PyTorch's documented rule
    for p, g in zip(ps, g0, strict=True):
        np.testing.assert_allclose(p.grad.numpy(), g * factor, rtol=1e-12)
    after = np.sqrt(sum((p.grad.numpy() ** 2).sum() for p in ps))
    assert after == pytest.approx(2.0, rel=1e-6)
    # below the threshold nothing changes
    small = _params(SHAPES, seed=8, grad_scale=1e-3)
    before = [p.grad.clone() for p in small]
    clip_grad_norm_(small, max_norm=100.0)
    assert all(torch.equal(p.grad, b) for p, b in zip(small, before, strict=True))


def test_znorm_matches_formula() -> None:
    ps = _params(SHAPES, seed=9, grad_scale=3.0)
    g0 = [p.grad.numpy().copy() for p in ps]
    znorm_(ps, eps=1e-8)
    for p, g in zip(ps, g0, strict=True):
        if g.size <= 1:
            np.testing.assert_array_equal(p.grad.numpy(), g)  # single element: unchanged
            continue
        want = (g - g.mean()) / (g.std() + 1e-8)  # numpy std: population (ddof=0)
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-12, atol=1e-12)
        assert abs(p.grad.mean().item()) < 1e-12
        assert p.grad.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)


def test_method_registry() -> None:
    assert METHODS.names() == [
        "baseline",
        "gc",
        "agc",
        "pgt",
        "ls",
        "znorm",
        "gc_pgt",
        "agc_pgt",
        "ls_pgt",
    ]
    assert METHODS.get("agc_pgt").pgt and METHODS.get("agc_pgt").grads == ("agc",)
    with pytest.raises(ConfigError, match="unknown method 'sgdr'.*baseline"):
        METHODS.get("sgdr")
    with pytest.raises(ValueError, match="alpha"):
        pgt_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.5)


# ------------------------------------------------------------ methods as pieces
def _mlp_grads_formula(
    x: np.ndarray, y: np.ndarray, w1, b1, w2, b2, alpha: float | None, eps: float
) -> list[np.ndarray]:
    """Backprop of a Linear-ReLU-Linear net written out: dZ is PGT's (softmax(αz) - q)/N
    (plain CE's when alpha is None), then the chain rule by hand."""
    a = x @ w1.T + b1
    h = np.maximum(a, 0.0)
    z = h @ w2.T + b2
    dz = pgt_grad_formula(z, y, 1.0 if alpha is None else alpha, eps)
    dh = dz @ w2
    da = dh * (a > 0)
    return [da.T @ x, da.sum(0), dz.T @ h, dz.sum(0)]


def _transforms_formula(
    grads: tuple[str, ...], ws: list[np.ndarray], gs: list[np.ndarray]
) -> list[np.ndarray]:
    """GC over every tensor, AGC on all but the classifier (the last two), ZNorm per tensor."""
    gs = [g.copy() for g in gs]
    for kind in grads:
        if kind == "gc":
            total = np.sqrt(sum((g**2).sum() for g in gs))
            gs = [g * min(1.0, 0.5 / (total + 1e-6)) for g in gs]
        elif kind == "agc":
            gs[:2] = [agc_formula(w, g, 0.05, 1e-3) for w, g in zip(ws[:2], gs[:2], strict=True)]
        elif kind == "znorm":
            gs = [(g - g.mean()) / (g.std() + 1e-8) for g in gs]
    return gs


COMBOS = [
    *[(grad, pgt, 0.0) for grad in ((), ("gc",), ("agc",), ("znorm",)) for pgt in (False, True)],
    (("agc",), True, 0.1),  # agc_ls_pgt
    (("gc", "znorm"), True, 0.1),  # a list, in order: gc_znorm_ls_pgt
    (("znorm", "gc"), False, 0.0),
]


@pytest.mark.parametrize(("grads", "pgt", "eps"), COMBOS,
                         ids=[method_spec(p, e, list(g)).name for g, p, e in COMBOS])  # fmt: skip
def test_combination_gradients_match_the_formula(grads: tuple, pgt: bool, eps: float) -> None:
    """Every built-in combination, as the training loop computes it (pgt_cross_entropy, then
    apply_grad_transforms_), against the gradient written out; CPU float64."""
    from types import SimpleNamespace

    spec = method_spec(pgt, eps, list(grads) or "none")
    assert spec.grads == grads and spec.pgt == pgt
    rng = np.random.default_rng(3)
    x_np, y_np = rng.normal(size=(12, 5)), rng.integers(0, 4, 12)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.tensor(rng.normal(size=tuple(p.shape))))
    alpha = 0.3 if pgt else None
    logits = net(torch.tensor(x_np))
    y = torch.tensor(y_np)
    loss = (pgt_cross_entropy(logits, y, alpha, eps) if pgt
            else F.cross_entropy(logits, y, label_smoothing=eps))  # fmt: skip
    loss.backward()
    params = list(net.parameters())
    knobs = SimpleNamespace(gc_max_norm=0.5, agc_clip_factor=0.05, agc_eps=1e-3, znorm_eps=1e-8)
    after = apply_grad_transforms_(spec.grads, params, params[:2], knobs)  # type: ignore[arg-type]
    ws = [p.detach().numpy() for p in params]
    raw = _mlp_grads_formula(x_np, y_np, *ws, alpha, eps)
    want = _transforms_formula(grads, ws, raw)
    # the loop's global norm is a float32 reduction (it is also a logged metric), and GC's
    # factor is computed from it: float32 precision wherever GC acts, float64 elsewhere
    rtol = 1e-6 if "gc" in grads else 1e-10
    for p, w in zip(params, want, strict=True):
        np.testing.assert_allclose(p.grad.numpy(), w, rtol=rtol, atol=1e-12)
    if grads:
        assert after is not None
        assert after.item() == pytest.approx(np.sqrt(sum((w**2).sum() for w in want)), rel=1e-6)
    else:
        assert after is None
    changed = any(not np.allclose(a, b) for a, b in zip(want, raw, strict=True))
    assert changed == bool(grads)  # each transform engages at these settings


def test_canonical_names_and_presets() -> None:
    assert method_spec(True, 0.0, "znorm").name == "znorm_pgt"
    assert method_spec(True, 0.1, ["agc"]).name == "agc_ls_pgt"
    assert method_spec(False, 0.0, "none").name == "baseline"
    assert method_spec(False, 0.0, ["gc", "znorm"]).name == "gc_znorm"
    for name in METHODS.names():  # each preset is its own canonical name
        s = METHODS.get(name)
        assert method_spec(s.pgt, 0.1 if s.label_smoothing else 0.0, list(s.grads)) == s
    with pytest.raises(ConfigError, match="method.grad=sam is not allowed.*none, gc, agc, znorm"):
        method_spec(False, 0.0, "sam")
    with pytest.raises(ConfigError, match="twice"):
        method_spec(False, 0.0, ["gc", "gc"])
