"""A researcher's own method pieces (``_target_``): imported, checked and fingerprinted.

A custom gradient transform is ``fn(params, **knobs)``, called in place after backward (and
after the AMP unscale) on the list of every trained parameter; a custom loss is
``fn(logits, targets, alpha, **knobs)`` returning a scalar tensor. The pre-flight
(:func:`check_method`) imports each target and binds its signature to the knobs given, so a
module that does not import, a name that is not callable or knobs it does not accept are one
line and exit 2 before anything is written. The module is imported from the current
directory or ``PYTHONPATH`` (``python -m sweeper`` puts the current directory first; jobs
start in it).

Each target's source file is fingerprinted (sha256) into the run's provenance
(``runs.versions["source:<target>"]``), so ``status`` can say when a done run was made by
another version of the file. The fingerprint is not part of the config hash: editing a
comment does not start new runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from trainers.registry import ConfigError, first_line
from trainers.specs import CustomPiece, Grad, MethodSpec

SOURCE_PREFIX = "source:"
_GRAD_CALL = ("params",)
_LOSS_CALL = ("logits", "targets", "alpha")


def _key(spec: MethodSpec, piece: CustomPiece) -> str:
    return "method.loss" if piece is spec.loss else "method.grad"


def resolve(piece: CustomPiece, key: str) -> Callable[..., Any]:
    """The callable a piece names (ConfigError, one line, when it cannot be had)."""
    return resolve_target(piece.target, key)


def resolve_target(target: str, key: str) -> Callable[..., Any]:
    """The callable a dotted name names: ``key._target_=...`` in the one-line errors."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}._target_={target} is not allowed; expected module.function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # anything the user's module raises on import
        raise ConfigError(
            f"{key}._target_={target}: cannot import {module_name} ({first_line(e)}); "
            "it must be importable from the current directory or PYTHONPATH"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{key}._target_={target}: {module_name} has no {attr!r}")
    if not callable(fn):
        raise ConfigError(
            f"{key}._target_={target} is not callable (its type is {type(fn).__name__})"
        )
    return fn


def check_call(
    fn: Callable[..., Any],
    key: str,
    target: str,
    args: tuple[str, ...] = (),
    fixed: dict[str, Any] | None = None,
    knobs: dict[str, Any] | None = None,
    knobs_at: str | None = None,
) -> None:
    """``fn(*args, **fixed, **knobs)`` must bind: ``args`` are what gradsweep passes by
    position (named for the message), ``fixed`` what it passes by keyword, ``knobs`` what the
    user gave (at ``knobs_at``, default ``key``). A knob whose default is a number or a flag
    must be one too (a typo like strength=abc would otherwise fail inside the job, after its
    row exists). ConfigError, one line, otherwise."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    knobs = knobs or {}
    for name, value in knobs.items():
        p = sig.parameters.get(name)
        default = p.default if p is not None else inspect.Parameter.empty
        if isinstance(default, bool) and not isinstance(value, bool):
            kind = "true or false"
        elif (
            isinstance(default, (int, float))
            and not isinstance(default, bool)
            and (isinstance(value, bool) or not isinstance(value, (int, float)))
        ):
            kind = "a number"
        else:
            continue
        raise ConfigError(
            f"{knobs_at or key}.{name}={value} is not allowed; expected {kind} "
            f"(the default of {target}'s {name} is {default!r})"
        )
    kwargs = {**(fixed or {}), **knobs}
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        call = ", ".join([*args, *(f"{k}=..." for k in kwargs)])
        raise ConfigError(
            f"{key}._target_={target}{sig} cannot be called as fn({call}): {e}"
        ) from None


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` names the parameter ``name`` (not through ``**kwargs``)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def check_method(spec: MethodSpec) -> None:
    """Pre-flight of the custom pieces: each imports, is callable and accepts its knobs."""
    for piece in spec.custom:
        key = _key(spec, piece)
        fn = resolve(piece, key)
        call = _LOSS_CALL if piece is spec.loss else _GRAD_CALL
        check_call(fn, key, piece.target, call, knobs=dict(piece.knobs))


def bound_grads(spec: MethodSpec) -> list[str | Callable[[list[Any]], Any]]:
    """The transforms as the loop applies them: built-in names, custom ones bound to their
    knobs."""
    out: list[str | Callable[[list[Any]], Any]] = []
    g: Grad
    for g in spec.grads:
        out.append(g if isinstance(g, str) else partial(resolve(g, "method.grad"), **dict(g.knobs)))
    return out


def bound_loss(spec: MethodSpec) -> Callable[..., Any] | None:
    """The custom loss bound to its knobs, called as ``fn(logits, targets, alpha)``."""
    if spec.loss is None:
        return None
    return partial(resolve(spec.loss, "method.loss"), **dict(spec.loss.knobs))


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def fingerprints(spec: MethodSpec) -> dict[str, str]:
    """``{"source:<target>": "<file> sha256:<hex>"}`` for each custom piece (imported)."""
    out: dict[str, str] = {}
    for piece in spec.custom:
        fn = resolve(piece, _key(spec, piece))
        try:
            path = inspect.getsourcefile(inspect.unwrap(fn))
        except TypeError:
            path = None
        digest = _sha256(path) if path else None
        if path and digest:
            out[SOURCE_PREFIX + piece.target] = f"{path} sha256:{digest}"
    return out


def current_fingerprint(target: str) -> str | None:
    """The fingerprint ``target``'s source file would get now, found without importing the
    module itself (only its parent packages); None when it cannot be found."""
    module_name = target.rpartition(".")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except Exception:
        return None
    path = found.origin if found is not None else None
    digest = _sha256(path) if path else None
    return f"{path} sha256:{digest}" if path and digest else None


def model_factory(
    target: str, args: dict[str, Any] | None, num_classes: int = 1, in_channels: int = 1
) -> Callable[[], Any]:
    """``model._target_`` checked and bound: it imports and takes ``num_classes`` (and
    ``in_channels`` when it names that parameter, so a torchvision constructor works on
    3-channel data) with ``model.args``. The pre-flight calls this with placeholder sizes."""
    fn = resolve_target(target, "model")
    fixed: dict[str, Any] = {"num_classes": num_classes}
    if accepts(fn, "in_channels"):
        fixed["in_channels"] = in_channels
    check_call(fn, "model", target, fixed=fixed, knobs=args, knobs_at="model.args")
    return partial(fn, **fixed, **(args or {}))
