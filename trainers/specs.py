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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
class MethodSpec:
    """A combination of pieces and its canonical name."""

    name: str
    pgt: bool = False
    label_smoothing: bool = False
    grads: tuple[str, ...] = ()  # gradient transforms, applied in this order

    @property
    def grad_transform(self) -> str:
        """The transforms as one string (``none``, ``gc``, ``gc+znorm``, ...)."""
        return "+".join(self.grads) or "none"

    def knobs(self) -> list[str]:
        """The ``method.*`` config keys that matter for this method (others are ignored)."""
        keys: list[str] = []
        if self.pgt:
            keys.append("pgt_impl")
        if self.label_smoothing:
            keys.append("label_smoothing")
        for g in self.grads:
            keys += [k for k in GRAD_KNOBS[g] if k not in keys]
        return keys


def canonical_name(pgt: bool, label_smoothing: bool, grads: Sequence[str]) -> str:
    parts = [*grads, *(["ls"] if label_smoothing else []), *(["pgt"] if pgt else [])]
    return "_".join(parts) or "baseline"


def parse_grads(grad: object) -> tuple[str, ...]:
    """``method.grad`` -> the transforms in order: a name, ``none``, or a list of names."""
    allowed = "none, " + ", ".join(GRAD_TRANSFORMS) + " or a list of them"
    items = list(grad) if isinstance(grad, (list, tuple)) else [grad]
    out: list[str] = []
    for g in items:
        if not isinstance(g, str) or (g != "none" and g not in GRAD_TRANSFORMS):
            raise ConfigError(f"method.grad={grad} is not allowed; expected {allowed}")
        if g == "none":
            continue
        if g in out:
            raise ConfigError(f"method.grad={grad} names {g} twice; each transform at most once")
        out.append(g)
    return tuple(out)


def method_spec(pgt: bool, label_smoothing: float, grad: object) -> MethodSpec:
    """The pieces of ``conf/method`` -> their MethodSpec (ConfigError on an unknown piece)."""
    grads = parse_grads(grad)
    ls = label_smoothing != 0.0
    return MethodSpec(canonical_name(bool(pgt), ls, grads), bool(pgt), ls, grads)


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
