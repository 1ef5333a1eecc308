"""What each method name combines: torch-free, so configs validate and hash without torch.

A method is a loss side (PGT on or off, label smoothing on or off) plus one gradient
transform (none, GC, AGC or ZNorm). :data:`METHODS` maps the CLI's names (``baseline, gc,
agc, pgt, ls, znorm, gc_pgt, agc_pgt, ls_pgt``) to a :class:`MethodSpec`; the functions that
implement the pieces are in :mod:`trainers.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainers.registry import Registry

GradTransform = Literal["none", "gc", "agc", "znorm"]


@dataclass(frozen=True)
class MethodSpec:
    """What a method combines: the loss-side pieces and one gradient transform."""

    name: str
    pgt: bool = False
    label_smoothing: bool = False
    grad_transform: GradTransform = "none"

    def knobs(self) -> list[str]:
        """The ``method.*`` config keys that matter for this method (others are ignored)."""
        keys: list[str] = []
        if self.pgt:
            keys.append("pgt_impl")
        if self.label_smoothing:
            keys.append("label_smoothing")
        keys += {
            "none": [],
            "gc": ["gc_max_norm"],
            "agc": ["agc_clip_factor", "agc_eps"],
            "znorm": ["znorm_eps"],
        }[self.grad_transform]
        return keys


METHODS: Registry[MethodSpec] = Registry("method")
for _spec in (
    MethodSpec("baseline"),
    MethodSpec("gc", grad_transform="gc"),
    MethodSpec("agc", grad_transform="agc"),
    MethodSpec("pgt", pgt=True),
    MethodSpec("ls", label_smoothing=True),
    MethodSpec("znorm", grad_transform="znorm"),
    MethodSpec("gc_pgt", pgt=True, grad_transform="gc"),
    MethodSpec("agc_pgt", pgt=True, grad_transform="agc"),
    MethodSpec("ls_pgt", pgt=True, label_smoothing=True),
):
    METHODS.register(_spec.name, _spec)


def known_methods() -> list[str]:
    return METHODS.names()
