"""Backward-pass gradient methods: PGT, label smoothing, GC, AGC, ZNorm.

The public functions are usable in any PyTorch loop:

* :func:`pgt_cross_entropy` -- loss-side methods (PGT, LS, and their combination).
* :func:`clip_grad_norm_` -- GC, clip by global norm.
* :func:`adaptive_clip_grad_` -- AGC, unit-wise (Brock et al. 2021, NFNets).
* :func:`znorm_` -- ZNorm, per-tensor Z-score of the gradient (Yun 2024).

:func:`apply_grad_transforms_` is what the training loop calls to apply a method's gradient
transforms, in order. :func:`method_spec` (from :mod:`trainers.specs`) turns a method's pieces
into its canonical name; :data:`METHODS` holds the nine presets.

Order inside one training step: forward -> loss (PGT/LS act here) ->
backward -> AMP unscale -> gradient transform (GC/AGC/ZNorm act here) -> optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


# --------------------------------------------------------------------------- loss side
def smoothed_targets(
    target: Tensor, num_classes: int, label_smoothing: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The target distribution q, shape (N, C), in ``dtype``.

    ``target`` is either class indices (N,) or a distribution (N, C). Label smoothing uses
    the official PGT code's (and PyTorch's) convention q = (1 - eps) * onehot + eps / C,
    i.e. the true class keeps 1 - eps + eps/C. (The paper's Eq. 7 spreads eps over the
    K - 1 off-classes instead; we follow the code so that ``ls`` runs match
    ``torch.nn.CrossEntropyLoss(label_smoothing=eps)`` exactly.)
    """
    if target.dim() == 1:
        q = F.one_hot(target.long(), num_classes).to(dtype)
    else:
        q = target.to(dtype)
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + label_smoothing / num_classes
    return q


class _PGTCrossEntropy(torch.autograd.Function):
    """Value: mean CE(z, q). Gradient w.r.t. z: (softmax(alpha * z) - q) / N  (Eq. 8-9).

    PGT replaces p by p' = p^alpha / sum_j p_j^alpha in the backward pass only. Since
    p^alpha / sum p^alpha = softmax(alpha * z) exactly (the partition function cancels),
    the transformed gradient is computed stably from the logits, never from p or from the
    incoming gradient. The incoming ``grad_output`` is the AMP loss scale S (or 1), so the
    result is S * (softmax(alpha z) - q) / N whatever S, N or the precision are: unlike the
    paper's hook (see :func:`register_paper_pgt_hook`) it needs no S = N^2 coincidence.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, q: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        # (N, C) in float32 at least: bf16/fp16 logits are upcast, float64 stays float64
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = -(q * F.log_softmax(z, dim=1)).sum(dim=1).mean()
        ctx.save_for_backward(z, q)
        ctx.alpha = alpha
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        z, q = ctx.saved_tensors
        n = z.shape[0]
        grad = (torch.softmax(ctx.alpha * z, dim=1) - q) * (grad_output.to(z.dtype) / n)
        return grad.to(ctx.in_dtype), None, None


def pgt_cross_entropy(
    logits: Tensor, target: Tensor, alpha: float, label_smoothing: float = 0.0
) -> Tensor:
    """Mean cross-entropy whose gradient is the PowerGrad Transform's (paper Eq. 8-9).

    Args:
        logits: (N, C) logits z, any floating dtype (bf16/fp16 under autocast).
        target: (N,) class indices or (N, C) target distribution.
        alpha: PGT's alpha, 0 < alpha <= 1; alpha = 1 is plain cross-entropy.
        label_smoothing: eps in [0, 1); q = (1 - eps) onehot + eps / C.

    Returns:
        A float32 scalar equal to plain CE(z, q) (mean over the batch). Its gradient
        w.r.t. ``logits`` is exactly (softmax(alpha * z) - q) / N, computed in float32 and
        cast back to the logits' dtype, independent of any AMP loss scale.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is outside (0, 1]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} is outside [0, 1)")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    q = smoothed_targets(target, logits.shape[1], label_smoothing, dtype).to(logits.device)
    return _PGTCrossEntropy.apply(logits, q, float(alpha))


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Plain mean CE (the baseline / LS loss), in float32 at least, like the PGT loss."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(z, target, label_smoothing=label_smoothing)


def register_paper_pgt_hook(logits: Tensor, onehot: Tensor, alpha: float) -> None:
    """The paper's own PGT snippet (Fig. 9), kept only for exact replication.

    It rebuilds p from the incoming gradient as ``grad / N + q``. The gradient reaching the
    logits is S * (p - q) / N with S the AMP loss scale, so the rebuild equals p only when
    S = N^2 -- true by coincidence for the official recipe (256 images per GPU and
    GradScaler's initial scale 2^16). In fp32 (S = 1), at another batch size, or once the
    scaler changes S, it computes something else (or NaN from a negative power). Use
    :func:`pgt_cross_entropy` instead; ``method.pgt_impl=paper_hook`` selects this one.
    """

    def hook(grad: Tensor) -> Tensor:
        n = grad.shape[0]
        pred = grad / n + onehot
        pred = pred**alpha
        pred = pred / pred.sum(-1, keepdim=True)
        return (pred - onehot) * n

    logits.register_hook(hook)


# ----------------------------------------------------------------- gradient transforms
def _grads(parameters: Iterable[Tensor]) -> list[Tensor]:
    return [p for p in parameters if p.grad is not None]


@torch.no_grad()
def global_grad_norm(parameters: Iterable[Tensor]) -> Tensor:
    """L2 norm of all gradients together, as a 0-d float32 tensor on their device."""
    grads = [p.grad for p in _grads(parameters)]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)  # one fused launch per device/dtype group
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """GC (paper Eq. 5): scale every gradient by min(1, max_norm / ||g||), ||g|| global.

    Thin wrapper over ``torch.nn.utils.clip_grad_norm_`` (fused foreach kernels). Note
    PyTorch adds 1e-6 to the norm in the ratio; that is the library's documented rule.
    Returns the norm before clipping.
    """
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, foreach=None)


def _unit_lengths(params: list[Tensor], device: torch.device) -> Tensor:
    """Length of every unit, in parameter order: the rows of dim 0 for ndim > 1, the whole
    tensor otherwise. Cached per (shapes, device): the parameter list is the same each step."""
    key = (tuple(tuple(p.shape) for p in params), device)
    lengths = _LENGTHS.get(key)
    if lengths is None:
        sizes = [
            n for p in params for n in ([p[0].numel()] * p.shape[0] if p.dim() > 1 else [p.numel()])
        ]
        lengths = _LENGTHS[key] = torch.tensor(sizes, dtype=torch.long).to(device)
    return lengths


_LENGTHS: dict[tuple, Tensor] = {}


def _agc_scale(w_norm: Tensor, g_norm: Tensor, clip_factor: float, eps: float) -> Tensor:
    """max_norm / ||G_i|| where ||G_i|| > max_norm = clip_factor * max(||W_i||, eps), else 1."""
    max_norm = w_norm.clamp(min=eps).mul_(clip_factor)
    return torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=1e-12), 1.0)


def _agc_per_tensor(params: list[Tensor], clip_factor: float, eps: float) -> None:
    """One tensor at a time, in place: two norm reductions and one multiply per tensor.

    timm's loop also materialises the clipped gradient and a ``where`` of it, then copies
    back: three full-size passes more. On a CPU (memory-bound, no launch cost) this minimal
    per-tensor form is the fastest (benchmarks/agc.py)."""
    for p in params:
        g = p.grad
        assert g is not None
        dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=p.dim() > 1)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=p.dim() > 1)
        g.mul_(_agc_scale(w_norm, g_norm, clip_factor, eps).to(g.dtype))


def _agc_segmented(params: list[Tensor], clip_factor: float, eps: float) -> None:
    """All tensors at once with a constant number of kernels (about 15, whatever the model).

    On a GPU the per-tensor loop is launch-bound: timm's takes ~10 launches per tensor,
    ~1,600 for a ResNet-50 (``benchmarks/agc.py`` measures both). Here every weight and gradient
    is flattened into one vector, every unit's sum of squares is one segmented reduction
    (CUB), and the per-unit scales are expanded back and applied by one multi-tensor
    ``_foreach_mul_``. Squares are summed in float64 so that the different summation order
    does not move the norms by more than float32 rounding (results equal timm's to 1e-6).
    """
    grads = [p.grad for p in params]
    lengths = _unit_lengths(params, grads[0].device)  # type: ignore[union-attr]
    w = torch.cat([p.detach().reshape(-1) for p in params]).double()
    g = torch.cat([x.reshape(-1) for x in grads]).double()  # type: ignore[union-attr]
    w_norm = torch.segment_reduce(w.square_(), "sum", lengths=lengths, unsafe=True).sqrt_()
    g_norm = torch.segment_reduce(g.square_(), "sum", lengths=lengths, unsafe=True).sqrt_()
    dtypes = {x.dtype for x in grads}  # type: ignore[union-attr]
    # one dtype (the usual case): expand the scales once in it, so .to() below is a no-op
    scale = _agc_scale(w_norm, g_norm, clip_factor, eps).to(
        dtypes.pop() if len(dtypes) == 1 else torch.float64
    )
    full = torch.repeat_interleave(scale, lengths, output_size=w.numel())
    sizes = [x.numel() for x in grads]  # type: ignore[union-attr]
    views = [v.view_as(x).to(x.dtype) for v, x in zip(full.split(sizes), grads, strict=True)]  # type: ignore[arg-type]
    torch._foreach_mul_(grads, views)  # type: ignore[arg-type]


AGCImpl = Literal["auto", "per_tensor", "segmented"]


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Iterable[Tensor],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    impl: AGCImpl = "auto",
) -> None:
    """AGC in place (paper Eq. 6; Brock et al. 2021, NFNets).

    For each parameter W with gradient G and each output unit i (row of a matrix, filter of
    a conv; the whole tensor when ndim <= 1): if ||G_i|| / max(||W_i||, eps) > clip_factor,
    G_i <- clip_factor * max(||W_i||, eps) / ||G_i|| * G_i.

    ``impl``: ``segmented`` (a constant number of kernels for all tensors: for GPUs, where
    timm's per-parameter loop is launch-bound), ``per_tensor`` (in place, tensor by tensor:
    for CPUs), ``auto`` (segmented on CUDA, per_tensor elsewhere). Both equal timm's
    ``adaptive_clip_grad`` to float32 rounding (benchmarks/agc.py, tests/test_methods.py).
    The caller excludes the final classifier layer (NFNets' rule).
    """
    params = _grads(parameters)
    if not params:
        return
    if impl == "auto":
        impl = "segmented" if params[0].grad.is_cuda else "per_tensor"  # type: ignore[union-attr]
    if impl == "segmented":
        _agc_segmented(params, clip_factor, eps)
    elif impl == "per_tensor":
        _agc_per_tensor(params, clip_factor, eps)
    else:
        raise ValueError(
            f"impl={impl!r} is not an AGC implementation; expected auto, per_tensor or segmented"
        )


@torch.no_grad()
def znorm_(parameters: Iterable[Tensor], eps: float = 1e-8) -> None:
    """ZNorm in place (Yun 2024, arXiv 2408.01215): g <- (g - mean(g)) / (std(g) + eps).

    Per parameter tensor (per layer). ``std`` is the population standard deviation
    (``unbiased=False``): the Z-score of the tensor's own elements. A tensor with a single
    element has no spread (its Z-score is 0/0), so it is left unchanged rather than zeroed
    -- zeroing would silently freeze that parameter.
    """
    for p in _grads(parameters):
        g = p.grad
        if g.numel() <= 1:
            continue
        gf = g.to(torch.promote_types(g.dtype, torch.float32))  # fp16/bf16 -> fp32
        std, mean = torch.std_mean(gf, unbiased=False)
        g.copy_((gf - mean) / (std + eps))


# ------------------------------------------------------------------- the loop's call
class GradKnobs(Protocol):
    """The transforms' knobs (``conf/method``: :class:`trainers.config.MethodConf`)."""

    gc_max_norm: float
    agc_clip_factor: float
    agc_eps: float
    znorm_eps: float


@torch.no_grad()
def apply_grad_transforms_(
    transforms: Sequence[str | Callable[[list[Tensor]], object]],
    params: list[Tensor],
    agc_params: list[Tensor],
    knobs: GradKnobs,
    norm: Tensor | None = None,
) -> Tensor | None:
    """GC / AGC / ZNorm in place, in the order given (the training loop calls this after
    backward and the AMP unscale); returns the global gradient norm after them, or None when
    ``transforms`` is empty.

    A transform is a built-in name or a callable applied as ``fn(params)`` (a researcher's
    own, :mod:`trainers.custom`, bound to its knobs). ``params``: every trained parameter;
    ``agc_params``: the same without the final
    classifier (AGC leaves it alone, as NFNets do). ``norm``: the global norm of the
    gradients as they are now, if the caller has measured it -- GC's clip factor is computed
    from it (PyTorch's rule, min(1, max_norm / (norm + 1e-6))), and the norm after GC is then
    known without another pass over every gradient.
    """
    if not transforms:
        return None
    for kind in transforms:
        if kind == "gc":
            if norm is None:
                norm = global_grad_norm(params)
            factor = (knobs.gc_max_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))
            norm = norm * factor
        elif kind == "agc":
            adaptive_clip_grad_(agc_params, knobs.agc_clip_factor, knobs.agc_eps)
            norm = None
        elif kind == "znorm":
            znorm_(params, knobs.znorm_eps)
            norm = None
        elif callable(kind):  # a custom transform, bound to its knobs: fn(params)
            kind(params)
            norm = None
        else:
            raise ValueError(f"unknown gradient transform {kind!r}; known: gc, agc, znorm")
    return norm if norm is not None else global_grad_norm(params)


# ------------------------------------------------------------------------ registry
# What each method name combines lives in the torch-free trainers.specs (configs validate and
# hash without torch); re-exported here, where the pieces it names are implemented.
from trainers.specs import (  # noqa: E402
    METHODS,
    GradTransform,
    MethodSpec,
    canonical_name,
    known_methods,
    method_spec,
)

__all__ = [
    "METHODS",
    "GradKnobs",
    "GradTransform",
    "MethodSpec",
    "adaptive_clip_grad_",
    "apply_grad_transforms_",
    "canonical_name",
    "clip_grad_norm_",
    "cross_entropy",
    "global_grad_norm",
    "known_methods",
    "method_spec",
    "pgt_cross_entropy",
    "register_paper_pgt_hook",
    "smoothed_targets",
    "znorm_",
]
