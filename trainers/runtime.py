"""Where and how a run computes: device, precision, torch.compile mode, autocast, the
optimiser and its parameter groups. Pure resolution rules, shared by the trainer and the
sweeper's pre-flight."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainers.config import RunConfig
from trainers.registry import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA name on a machine without one is a
    ConfigError (bad input, refused before anything is written)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} is not available on this machine; use device=cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA, fp32 on CPU. Part of a run's identity."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_compile_mode(cfg: RunConfig, device: torch.device, distributed: bool) -> str | None:
    """The torch.compile mode to use, or None for eager (compile=false).

    auto: ``reduce-overhead`` (CUDA graphs: a ResNet-20 step is ~100 small kernels, launch-
    bound on a big GPU) for a single-process CUDA run; ``default`` on CPU, where there are
    no CUDA graphs, and under DDP, whose gradient all-reduce hooks a graph cannot capture.
    """
    if not cfg.compile:
        return None
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    return "reduce-overhead" if device.type == "cuda" and not distributed else "default"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} {torch.cuda.get_device_name(idx)}"
    return "cpu"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on ``device``; nothing for fp32."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on tensors with ndim > 1 only (official PGT code; no decay on BN/bias)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: RunConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The run's optimiser over :func:`param_groups` (decay on ndim > 1 only), at peak ``lr``.

    SGD: momentum and Nesterov from the top-level keys (the paper's). AdamW: betas and eps
    from ``optimizer``; torch's AdamW decays decoupled from the gradient,
    ``p <- p - lr * weight_decay * p`` before the Adam step (Loshchilov & Hutter 2019).
    """
    groups = param_groups(model, cfg.weight_decay)
    o = cfg.optimizer
    if o.name == "adamw":
        return AdamW(groups, lr=lr, betas=(o.betas[0], o.betas[1]), eps=o.eps)
    if o.name == "sgd":
        return SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ConfigError(f"unknown optimizer {o.name!r}; known: sgd, adamw")


# torch.optim's functions under the wrappers described in _Eager, looked up once (not at
# every step of the training loop)
_OPT = torch.optim.Optimizer
_ADD_PARAM_GROUP = inspect.unwrap(_OPT.add_param_group)
_ZERO_GRAD = inspect.unwrap(_OPT.zero_grad)
_STATE_DICT = inspect.unwrap(_OPT.state_dict)
_LOAD_STATE_DICT = inspect.unwrap(_OPT.load_state_dict)


class _Eager(torch.optim.Optimizer):
    """torch.optim's entry points (``step``, ``zero_grad``, ``add_param_group``, the state
    dict's two) are wrapped so that torch.compile does not trace into them, and the wrappers
    import ``torch._dynamo`` on their first call: about as much CPU as importing torch itself,
    in every job process, although a job never compiles its optimiser (compile mode compiles
    the model's forward only). These call the very functions the wrappers wrap, with what the
    wrappers do in eager mode (``step`` runs with autograd off unless ``differentiable``), so
    the math, the state dict and the checkpoints are torch's own, bit for bit
    (tests/test_optimizer.py)."""

    _torch_step: Callable[..., Any]  # the optimiser class's own step, unwrapped

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _STATE_DICT(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _LOAD_STATE_DICT(self, state_dict)

    def step(self, closure: Any = None) -> Any:
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return self._torch_step(self, closure)


class SGD(_Eager, torch.optim.SGD):
    """:class:`torch.optim.SGD`, without importing ``torch._dynamo`` (see :class:`_Eager`)."""

    _torch_step = staticmethod(inspect.unwrap(torch.optim.SGD.step))


class AdamW(_Eager, torch.optim.AdamW):
    """:class:`torch.optim.AdamW`, without importing ``torch._dynamo`` (see :class:`_Eager`)."""

    _torch_step = staticmethod(inspect.unwrap(torch.optim.AdamW.step))
