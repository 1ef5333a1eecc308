"""What a method combines: torch-free, so configs validate and hash without torch.

A method is three pieces: **PGT** on or off (α is the top-level ``alpha``), **label
smoothing** ε (0 = off), and a **gradient transform** -- ``none``, ``gc``, ``agc``, ``znorm``
or a list of them, applied in that order after backward. :func:`method_spec` turns the
pieces into a :class:`MethodSpec` whose ``name`` is the combination's one canonical name:
the transforms in order, then ``ls``, then ``pgt``, joined by ``_`` (``baseline`` when
nothing is on; ``znorm_pgt``, ``agc_ls_pgt``, ``gc_znorm``). That name is what
``runs.method`` stores and the report shows, so two spellings of one combination
(``method=gc_pgt`` and ``method=gc method.pgt=true``) are one run.

:data:`METHODS` holds the nine presets of ``conf/method/`` (``baseline, gc, agc, pgt, ls,
znorm, gc_pgt, agc_pgt, ls_pgt``); each preset's canonical name is its own name, so its runs
keep the config hashes they had when methods were a closed list. The functions that
implement the pieces are in :mod:`trainers.methods`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from trainers.registry import ConfigError, Registry

GradTransform = Literal["none", "gc", "agc", "znorm"]
GRAD_TRANSFORMS: tuple[str, ...] = ("gc", "agc", "znorm")
# the method.* knobs each piece reads (others are ignored and left out of the run's identity)
GRAD_KNOBS: dict[str, list[str]] = {
    "gc": ["gc_max_norm"],
    "agc": ["agc_clip_factor", "agc_eps"],
    "znorm": ["znorm_eps"],
}


@dataclass(frozen=True)
class CustomPiece:
    """A researcher's own piece: ``{_target_: mylab.grads.centralize_, strength: 1.0}``.

    A gradient transform is called in place after backward as ``fn(params, **knobs)``; a
    loss as ``fn(logits, targets, alpha, **knobs)`` and returns the loss. Its dotted name and
    knobs are part of the run's identity; :mod:`trainers.custom` imports and checks it."""

    target: str
    knobs: tuple[tuple[str, Any], ...] = ()

    @property
    def short(self) -> str:
        """Its part of the canonical name: the function's name without a trailing ``_``."""
        return self.target.rsplit(".", 1)[-1].rstrip("_") or self.target

    def identity(self) -> dict[str, Any]:
        return {"_target_": self.target, **dict(self.knobs)}


Grad = str | CustomPiece


@dataclass(frozen=True)
class MethodSpec:
    """A combination of pieces and its canonical name."""

    name: str
    pgt: bool = False
    label_smoothing: bool = False
    grads: tuple[Grad, ...] = ()  # gradient transforms, applied in this order
    loss: CustomPiece | None = None  # a custom loss side (instead of CE / PGT / LS)

    @property
    def custom(self) -> list[CustomPiece]:
        """The custom pieces (loss first), for their identity and pre-flight."""
        out = [self.loss] if self.loss is not None else []
        return out + [g for g in self.grads if isinstance(g, CustomPiece)]

    def knobs(self) -> list[str]:
        """The ``method.*`` config keys that matter for this method (others are ignored)."""
        keys: list[str] = []
        if self.pgt:
            keys.append("pgt_impl")
        if self.label_smoothing:
            keys.append("label_smoothing")
        for g in self.grads:
            if isinstance(g, str):
                keys += [k for k in GRAD_KNOBS[g] if k not in keys]
        return keys


def canonical_name(
    pgt: bool, label_smoothing: bool, grads: Sequence[Grad], loss: CustomPiece | None = None
) -> str:
    parts = [
        *([loss.short] if loss is not None else []),
        *(g if isinstance(g, str) else g.short for g in grads),
        *(["ls"] if label_smoothing else []),
        *(["pgt"] if pgt else []),
    ]
    return "_".join(parts) or "baseline"


def _custom(key: str, value: Mapping[str, Any]) -> CustomPiece:
    target = value.get("_target_")
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", target):
        raise ConfigError(
            f"{key}._target_={target} is not allowed; expected a dotted name, module.function"
        )
    knobs = tuple(sorted((str(k), v) for k, v in value.items() if k != "_target_"))
    for k, v in knobs:
        if not isinstance(v, (bool, int, float, str)) and v is not None:
            raise ConfigError(f"{key}.{k}={v} is not allowed; expected a number, string or boolean")
    return CustomPiece(target, knobs)


def parse_grads(grad: object) -> tuple[Grad, ...]:
    """``method.grad`` -> the transforms in order: a name, ``none``, a ``_target_`` mapping,
    or a list of them."""
    allowed = "none, " + ", ".join(GRAD_TRANSFORMS) + ", a {_target_: ...} or a list of them"
    items = list(grad) if isinstance(grad, (list, tuple)) else [grad]
    out: list[Grad] = []
    for g in items:
        if isinstance(g, Mapping):
            piece: Grad = _custom("method.grad", g)
        elif isinstance(g, str) and (g == "none" or g in GRAD_TRANSFORMS):
            piece = g
        else:
            raise ConfigError(f"method.grad={grad} is not allowed; expected {allowed}")
        if piece == "none":
            continue
        if piece in out:
            raise ConfigError(
                f"method.grad={grad} names {piece if isinstance(piece, str) else piece.target} "
                "twice; each transform at most once"
            )
        out.append(piece)
    return tuple(out)


def method_spec(pgt: bool, label_smoothing: float, grad: object, loss: object = None) -> MethodSpec:
    """The pieces of ``conf/method`` -> their MethodSpec (ConfigError on an unknown piece)."""
    grads = parse_grads(grad)
    ls = label_smoothing != 0.0
    custom_loss = None
    if loss is not None:
        if not isinstance(loss, Mapping):
            raise ConfigError(
                f"method.loss={loss} is not allowed; expected null or a {{_target_: ...}}"
            )
        custom_loss = _custom("method.loss", loss)
        if pgt or ls:
            raise ConfigError(
                f"method.loss._target_={custom_loss.target} is the whole loss side (it "
                "receives alpha); use it with method.pgt=false and method.label_smoothing=0"
            )
    return MethodSpec(
        canonical_name(bool(pgt), ls, grads, custom_loss), bool(pgt), ls, grads, custom_loss
    )


METHODS: Registry[MethodSpec] = Registry("method")
for _spec in (
    MethodSpec("baseline"),
    MethodSpec("gc", grads=("gc",)),
    MethodSpec("agc", grads=("agc",)),
    MethodSpec("pgt", pgt=True),
    MethodSpec("ls", label_smoothing=True),
    MethodSpec("znorm", grads=("znorm",)),
    MethodSpec("gc_pgt", pgt=True, grads=("gc",)),
    MethodSpec("agc_pgt", pgt=True, grads=("agc",)),
    MethodSpec("ls_pgt", pgt=True, label_smoothing=True),
):
    assert _spec.name == canonical_name(_spec.pgt, _spec.label_smoothing, _spec.grads)
    METHODS.register(_spec.name, _spec)


def known_methods() -> list[str]:
    """The presets (``method=NAME``); any other combination is spelled with its pieces."""
    return METHODS.names()
