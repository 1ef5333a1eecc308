"""Typed configuration of one training run, and its validation.

These dataclasses are the schema Hydra checks overrides against (the sweeper registers them
with Hydra's ConfigStore) and the typed object everything below the CLI receives. Values
live in ``conf/*.yaml``; defaults here only make the dataclasses usable from Python.

This module imports no torch: the CLI composes, prints, validates and hashes configs without
it (``python -m sweeper --help`` answers at once); the data sets and models it checks
against are the torch-free catalog (:mod:`trainers.catalog`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from trainers.catalog import DATASETS, MODELS, DataConfig, ModelConf, data_identity
from trainers.registry import ConfigError
from trainers.specs import METHODS, MethodSpec, method_spec

__all__ = ["DataConfig", "MethodConf", "ModelConf", "OptimizerConf", "RunConfig", "ScheduleConf"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# torch.compile modes; auto: reduce-overhead (CUDA graphs) for a single-process CUDA run,
# where small models are launch-bound, default elsewhere (CPU; DDP, whose gradient
# all-reduce hooks CUDA graphs do not capture)
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICES_HELP = "auto, cpu, cuda or cuda:N"


@dataclass
class MethodConf:
    """The ``method`` group: the pieces of a method (:func:`trainers.specs.method_spec`) and
    their knobs. Which knobs matter depends on the pieces (MethodSpec.knobs). ``name`` is
    the preset the pieces came from; the run's method is the pieces' canonical name
    (``spec.name``): ``method=znorm method.pgt=true`` is ``znorm_pgt``."""

    name: str = "baseline"
    pgt: bool = False  # PGT on the loss side; alpha is the top-level key
    grad: Any = "none"  # none | gc | agc | znorm | {_target_: ...} | a list of them, in order
    loss: Any = None  # null (CE, PGT, LS) | {_target_: ...}: fn(logits, targets, alpha, **knobs)
    pgt_impl: str = "identity"  # identity (exact, any loss scale) | paper_hook (Fig. 9 snippet)
    label_smoothing: float = 0.0  # 0 = off; q = (1 - eps) onehot + eps / C
    gc_max_norm: float = 1.0  # gc: global-norm threshold lambda
    agc_clip_factor: float = 0.01  # agc: lambda (NFNets default)
    agc_eps: float = 1e-3  # agc: floor on the weight norm
    znorm_eps: float = 1e-8  # znorm: added to the std

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.pgt, self.label_smoothing, self.grad, self.loss)

    @classmethod
    def preset(cls, name: str, **knobs: Any) -> MethodConf:
        """A preset's pieces from Python, as ``method=NAME`` composes them (``ls``/``ls_pgt``:
        label smoothing 0.1 unless given): ``MethodConf.preset("agc_pgt")``."""
        spec = METHODS.get(name)  # ConfigError listing the presets
        knobs.setdefault("label_smoothing", 0.1 if spec.label_smoothing else 0.0)
        return cls(name=name, pgt=spec.pgt, grad=list(spec.grads) or "none", **knobs)


OPTIMIZERS = ("sgd", "adamw")


@dataclass
class OptimizerConf:
    """The ``optimizer`` group. ``sgd`` (the paper's; its knobs are the top-level ``momentum``
    and ``nesterov``) or ``adamw`` (Loshchilov & Hutter: Adam with decoupled weight decay).
    Both use the top-level ``lr`` rule (:meth:`RunConfig.resolved_lr`) and ``weight_decay``,
    applied to tensors with ndim > 1 only; ``conf/optimizer/adamw.yaml`` sets AdamW's usual
    lr 1e-3 without batch scaling and weight decay 0.05."""

    name: str = "sgd"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    eps: float = 1e-8  # adamw only


@dataclass
class ScheduleConf:
    """Per-step learning-rate schedule: linear warm-up, then cosine or step decay."""

    name: str = "cosine"  # cosine | step
    warmup_epochs: float = (
        5.0  # capped at the run's epochs (a 1-epoch smoke run warms up throughout)
    )
    warmup_start_factor: float = 1e-3  # paper: 4e-4 -> 0.4, i.e. start at peak * 1e-3
    min_lr: float = 0.0  # cosine floor (absolute)
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])  # step: epochs
    gamma: float = 0.1  # step: factor at each milestone


@dataclass
class RunConfig:
    """Everything that defines one training run (the keys of ``conf/config.yaml``)."""

    model: ModelConf = field(default_factory=ModelConf)
    method: MethodConf = field(default_factory=MethodConf)
    data: DataConfig = field(default_factory=lambda: DataConfig(name="digits"))
    schedule: ScheduleConf = field(default_factory=ScheduleConf)
    optimizer: OptimizerConf = field(default_factory=OptimizerConf)
    alpha: float = 0.25  # PGT's alpha, 0 < alpha <= 1; used by methods containing PGT
    batch_size: int = 64  # global batch
    epochs: int = 30
    lr: float = 0.1  # peak lr at batch lr_ref_batch; see resolved_lr()
    lr_scaling: str = "linear"  # linear: lr * batch_size / lr_ref_batch | none
    lr_ref_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # applied to tensors with ndim > 1 only (official code)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True  # CUDA only
    compile: bool = False
    compile_mode: str = "auto"  # COMPILE_MODES; only read when compile=true
    filter_stats_every: int = 50  # steps between per-filter norm snapshots; 0 = off
    check_every: int = 50  # steps between host syncs (divergence check)

    # ----------------------------------------------------------------- derived values
    def resolved_lr(self) -> float:
        """Peak lr actually used: linear scaling (Goyal et al. 2017) by default.

        Paper recipe: lr 0.1 per 256 images -> 0.4 at batch 1024 (its stated peak).
        """
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / self.lr_ref_batch
        return self.lr

    def uses_pgt(self) -> bool:
        """Whether alpha reaches the loss: PGT, or a custom loss (it receives alpha)."""
        spec = self.method.spec
        return spec.pgt or spec.loss is not None

    def effective_alpha(self) -> float | None:
        """alpha when the method contains PGT, else None (alpha has no effect there)."""
        return self.alpha if self.uses_pgt() else None

    def effective_label_smoothing(self) -> float:
        return self.method.label_smoothing if self.method.spec.label_smoothing else 0.0

    def identity(self, precision: str) -> dict[str, Any]:
        """The values that define the run's result: the config hash is taken over these.

        Left out on purpose: where results go (results_dir, store, MLflow), speed-only
        switches (compile, compile_mode, channels_last, check_every, num_workers, download), and knobs the
        method does not use, including alpha for methods without PGT -- so a grid over
        alpha does not run the baseline once per alpha. The optimizer appears only when it is
        not SGD (SGD runs keep the hashes they had before there was a choice); AdamW has no
        momentum or nesterov.
        """
        ident: dict[str, Any] = {
            "model": self.model.identity(),
            "method": _method_identity(self.method),
            "data": data_identity(self.data),
            "schedule": {
                **asdict(self.schedule),
                "warmup_epochs": min(self.schedule.warmup_epochs, self.epochs),
            },
            "alpha": self.effective_alpha(),
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "lr": self.resolved_lr(),
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "precision": precision,
            "filter_stats_every": self.filter_stats_every,
        }
        if self.optimizer.name != "sgd":
            del ident["momentum"], ident["nesterov"]
            ident["optimizer"] = {
                "name": self.optimizer.name,
                "betas": [float(b) for b in self.optimizer.betas],
                "eps": self.optimizer.eps,
            }
        return ident

    # ---------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError (one line: the bad value and what is allowed) on bad input."""
        if not self.model._target_:
            MODELS.get(self.model.name)  # ConfigError listing the known ones
        for key, args in (("model.args", self.model.args), ("data.args", self.data.args)):
            _check(args is None or isinstance(args, dict), key, args, "a mapping, e.g. {width: 16}")
        if not self.data._target_:
            DATASETS.get(self.data.name)
        m = self.method
        method_spec(m.pgt, m.label_smoothing, m.grad, m.loss)  # raises for an unknown piece
        _check(
            _finite(self.alpha) and 0.0 < self.alpha <= 1.0,
            "alpha",
            self.alpha,
            "a number in (0, 1]",
        )
        _check(self.batch_size > 0, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        # torch seeds are 64-bit: a larger one would crash the job after its row exists
        _check(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2**32)")
        _check(
            0 <= self.data.data_seed < 2**32,
            "data.data_seed",
            self.data.data_seed,
            "an integer in [0, 2**32)",
        )
        v = self.data.val_split
        _check(
            _finite(v) and 0.0 <= v < 1.0,
            "data.val_split",
            v,
            "a fraction in [0, 1) of the training set (0 = no validation split)",
        )
        _check(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        _check(
            self.lr_scaling in ("linear", "none"), "lr_scaling", self.lr_scaling, "linear or none"
        )
        _check(self.lr_ref_batch > 0, "lr_ref_batch", self.lr_ref_batch, "an integer >= 1")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        o = self.optimizer
        _check(o.name in OPTIMIZERS, "optimizer.name", o.name, " or ".join(OPTIMIZERS))
        _check(
            len(o.betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in o.betas),
            "optimizer.betas",
            list(o.betas),
            "two numbers in [0, 1)",
        )
        _check(_finite(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "a number > 0")
        _check(self.precision in PRECISIONS, "precision", self.precision, ", ".join(PRECISIONS))
        _check(
            self.compile_mode in COMPILE_MODES,
            "compile_mode",
            self.compile_mode,
            ", ".join(COMPILE_MODES),
        )
        dev = self.device
        _check(
            dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
            "device",
            dev,
            DEVICES_HELP,
        )
        _check(
            self.filter_stats_every >= 0,
            "filter_stats_every",
            self.filter_stats_every,
            "an integer >= 0",
        )
        _check(self.check_every >= 1, "check_every", self.check_every, "an integer >= 1")
        _check(
            m.pgt_impl in ("identity", "paper_hook"),
            "method.pgt_impl",
            m.pgt_impl,
            "identity or paper_hook",
        )
        _check(
            _finite(m.label_smoothing) and 0.0 <= m.label_smoothing < 1.0,
            "method.label_smoothing",
            m.label_smoothing,
            "a number in [0, 1) (0 = off)",
        )
        _check(m.gc_max_norm > 0, "method.gc_max_norm", m.gc_max_norm, "a number > 0")
        _check(m.agc_clip_factor > 0, "method.agc_clip_factor", m.agc_clip_factor, "a number > 0")
        _check(m.agc_eps > 0, "method.agc_eps", m.agc_eps, "a number > 0")
        _check(m.znorm_eps > 0, "method.znorm_eps", m.znorm_eps, "a number > 0")
        s = self.schedule
        _check(s.name in ("cosine", "step"), "schedule", s.name, "cosine or step")
        _check(s.warmup_epochs >= 0, "schedule.warmup_epochs", s.warmup_epochs, "a number >= 0")
        _check(
            0 < s.warmup_start_factor <= 1,
            "schedule.warmup_start_factor",
            s.warmup_start_factor,
            "a number in (0, 1]",
        )
        _check(s.min_lr >= 0, "schedule.min_lr", s.min_lr, "a number >= 0")
        _check(0 < s.gamma <= 1, "schedule.gamma", s.gamma, "a number in (0, 1]")
        _check(
            list(s.milestones) == sorted(s.milestones) and all(x > 0 for x in s.milestones),
            "schedule.milestones",
            list(s.milestones),
            "increasing positive epochs",
        )


def _method_identity(m: MethodConf) -> dict[str, Any]:
    """The canonical name and the knobs its pieces use; a custom piece adds its dotted name
    and knobs (built-in-only methods keep the identity they always had)."""
    spec = m.spec
    ident: dict[str, Any] = {"name": spec.name, **{k: getattr(m, k) for k in spec.knobs()}}
    if any(not isinstance(g, str) for g in spec.grads):
        ident["grad"] = [g if isinstance(g, str) else g.identity() for g in spec.grads]
    if spec.loss is not None:
        ident["loss"] = spec.loss.identity()
    return ident


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value} is not allowed; expected {allowed}")
