"""What a report cell is: **one configuration**, a run's identity without its seed.

Every table, figure and list of the report groups runs by their configuration, so only the
seeds of one configuration are ever averaged. Two runs that differ in anything else that
defines a run -- lr, momentum, a method's knobs, a custom piece's knobs, the data set's
knobs, the optimizer's -- are two cells, whatever columns a table shows.

* :func:`flat_identity`: a run's identity (``runs.config["identity"]``, what its config hash
  is taken over) without the seed, as dotted keys (``lr``, ``method.gc_max_norm``,
  ``method.grad.strength``); runs of hand-made or very old stores without a recorded identity
  fall back to their grid columns.
* :func:`setting_of` / :func:`method_of`: the two halves of a configuration. A treatment is
  compared with the baseline of the **same setting** (every key but the method's and α).
* :func:`extra_columns`: the identity keys a table must show besides its own columns so that
  two configurations are two rows: the keys that vary between runs the table's columns do not
  tell apart, minus those the others already determine (``lr`` follows ``batch_size`` under
  linear scaling). No extra column where every cell holds one configuration.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from sweeper.store import RunRecord

Flat = dict[str, Hashable]
Key = tuple[tuple[str, Hashable], ...]
_MISSING = object()

# display priority of identity keys (extra columns appear in this order; a key further down
# is the first to be dropped when the others determine it)
ORDER = ("data", "model", "epochs", "batch_size", "schedule", "optimizer", "method", "alpha",
         "lr", "momentum", "nesterov", "weight_decay", "precision", "filter_stats_every")  # fmt: skip


def _freeze(v: Any) -> Hashable:
    if isinstance(v, dict):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _flatten(value: Any, prefix: str, out: Flat) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)) and any(isinstance(x, dict) for x in value):
        # a list of pieces (method.grad): one piece is spelled without an index
        if len(value) == 1:
            _flatten(value[0], prefix, out)
        else:
            for i, v in enumerate(value):
                _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = _freeze(value)


def _fallback_identity(r: RunRecord) -> dict[str, Any]:
    """The identity of a run whose row has none: its grid columns."""
    method: dict[str, Any] = {"name": r.method}
    if r.label_smoothing:
        method["label_smoothing"] = r.label_smoothing
    ident: dict[str, Any] = {
        "model": r.model, "method": method, "data": {"name": r.data},
        "schedule": {"name": r.schedule}, "alpha": r.alpha, "batch_size": r.batch_size,
        "epochs": r.epochs, "lr": r.lr,
    }  # fmt: skip
    if r.precision is not None:
        ident["precision"] = r.precision
    if r.optimizer != "sgd":
        ident["optimizer"] = {"name": r.optimizer}
    return ident


# run.config (the dict object) -> (that dict, its flat identity): a report asks for each run's
# configuration many times; holding the dict keeps its id from being reused
_cache: dict[int, tuple[dict, Flat]] = {}


def flat_identity(r: RunRecord) -> Flat:
    """The run's configuration: its identity without the seed, flattened to dotted keys."""
    cfg = r.config or {}
    hit = _cache.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    ident = cfg.get("identity")
    recorded = isinstance(ident, dict)
    if not recorded:
        ident = _fallback_identity(r)
    flat: Flat = {}
    _flatten({k: v for k, v in ident.items() if k != "seed"}, "", flat)
    if recorded:  # the fallback reads the row's columns, not the dict: not cached
        if len(_cache) > 200_000:
            _cache.clear()
        _cache[id(cfg)] = (cfg, flat)
    return flat


def is_method_key(key: str) -> bool:
    """Whether an identity key belongs to the method side (its pieces, their knobs, α)."""
    return key == "alpha" or key == "method" or key.startswith("method.")


def config_of(r: RunRecord) -> Key:
    """The run's configuration as a hashable key: the seeds of one configuration share it."""
    return tuple(sorted(flat_identity(r).items()))


def setting_of(r: RunRecord) -> Key:
    """Every key of the configuration but the method's and α: a treatment's baseline is the
    baseline run(s) with the same setting."""
    return tuple(sorted((k, v) for k, v in flat_identity(r).items() if not is_method_key(k)))


def method_of(r: RunRecord) -> Key:
    """The method's pieces and knobs (α left out)."""
    return tuple(sorted((k, v) for k, v in flat_identity(r).items()
                        if is_method_key(k) and k != "alpha"))  # fmt: skip


def _rank(key: str) -> tuple[int, int, str]:
    top, _, rest = key.partition(".")
    # a group's name before its knobs (schedule.name before schedule.milestones)
    return (ORDER.index(top) if top in ORDER else len(ORDER), rest not in ("", "name"), key)


def _varying(runs: Iterable[RunRecord], group: Callable[[RunRecord], Hashable],
             keys: Callable[[str], bool]) -> set[str]:  # fmt: skip
    """Identity keys (those ``keys`` accepts) whose value differs between two runs of one
    ``group`` (a key a run lacks counts as a value of its own)."""
    first: dict[Hashable, Flat] = {}
    out: set[str] = set()
    for r in runs:
        f = flat_identity(r)
        g = group(r)
        f0 = first.setdefault(g, f)
        if f0 is f:
            continue
        for k in f0.keys() | f.keys():
            if k not in out and keys(k) and f0.get(k, _MISSING) != f.get(k, _MISSING):
                out.add(k)
    return out


def _value(r: RunRecord, k: str) -> Hashable:
    return flat_identity(r).get(k)


def extra_columns(
    runs: Sequence[RunRecord],
    shown: Sequence[str],
    keys: Callable[[str], bool] = lambda k: True,
    within: Callable[[RunRecord], Hashable] | None = None,
) -> list[str]:
    """The identity keys to show besides the ``shown`` columns (RunRecord attributes), so
    that runs of different configurations (among the keys ``keys`` accepts) never share a
    row: keys that vary between runs with the same shown values (and the same ``within``),
    then, lowest priority first, dropped where the shown values and the other extras
    already determine them. In display order."""

    def base(r: RunRecord) -> Hashable:
        return (tuple(getattr(r, c) for c in shown), within(r) if within else None)

    extra = sorted(_varying(runs, base, keys), key=_rank)
    for k in reversed(list(extra)):
        rest = [x for x in extra if x != k]
        if not _varying(runs, lambda r, rest=rest: (base(r), *(_value(r, x) for x in rest)),
                        lambda x, k=k: x == k):  # fmt: skip
            extra = rest
    return extra


def extra_values(r: RunRecord, extra: Sequence[str]) -> dict[str, Hashable]:
    """The run's values of the ``extra`` columns (None where its configuration lacks one)."""
    return {k: _value(r, k) for k in extra}


def group_by(runs: Iterable[RunRecord], key: Callable[[RunRecord], Hashable]) -> dict:
    """Runs grouped by ``key``, each group in the order given."""
    out: dict[Hashable, list[RunRecord]] = defaultdict(list)
    for r in runs:
        out[key(r)].append(r)
    return dict(out)


# ------------------------------------------------------------ naming configurations
def config_key(identity: dict[str, Any]) -> str:
    """16 hex digits naming a configuration whatever its seed: the seeds of one
    configuration share it (and only they)."""
    rest = {k: v for k, v in identity.items() if k != "seed"}
    blob = json.dumps(rest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# config keys that never change what a run computes: where results go, how it is launched,
# speed-only switches (``RunConfig.identity`` leaves them out)
NOT_RUN_KEYS = frozenset({"results_dir", "sweep_name", "store", "mlflow", "hydra", "device",
                          "channels_last", "compile", "compile_mode", "check_every"})  # fmt: skip
# ``method.*`` keys that choose the method's pieces: they matter even where the identity
# shows only their result (``method.pgt=true`` makes ``gc`` into ``gc_pgt``); every other
# ``method.*`` key is a piece's knob, which matters only when the identity holds it
PIECE_KEYS = frozenset({"name", "pgt", "grad", "loss", "label_smoothing"})
DATA_NOT_RUN = frozenset({"num_workers", "download"})  # how data is fed, not what it is


def _matters(token: str, identity: dict[str, Any]) -> bool:
    """Whether a point's override ``key=value`` can change the run of ``identity`` (only
    keys known not to are dropped; an unknown key is kept)."""
    key = token.partition("=")[0].lstrip("+~")
    top, _, rest = key.partition(".")
    first = rest.partition(".")[0]
    if top == "seed" or top in NOT_RUN_KEYS:
        return False
    if key == "alpha":  # only a method with PGT (or a custom loss) reads alpha
        return identity.get("alpha") is not None
    if key in ("momentum", "nesterov"):  # SGD's knobs: gone from an AdamW run's identity
        return key in identity
    if top == "method" and first and first not in PIECE_KEYS:
        method = identity.get("method")
        return isinstance(method, dict) and first in method
    if top == "data" and first in DATA_NOT_RUN:
        return False
    if top == "optimizer" and first:  # AdamW's knobs: an SGD run has none
        return "optimizer" in identity
    return True


def point_label(point: str, identity: dict[str, Any] | None = None) -> str:
    """A sweep point's label without its seed (``method=pgt seed=1`` -> ``method=pgt``):
    the name of its configuration within the sweep ('' when only the seed was swept). Given
    the run's recorded ``identity``, the keys that do not change that run go too:
    ``method=baseline alpha=0.25`` -> ``method=baseline`` (no PGT: alpha has no effect),
    ``lr=0.1 data.num_workers=4`` -> ``lr=0.1``."""
    return " ".join(t for t in point.split() if not t.startswith("seed=")
                    and (identity is None or _matters(t, identity)))  # fmt: skip


def _model_name(model: Any) -> str:
    return (
        str(model.get("_target_", "?")).rsplit(".", 1)[-1]
        if isinstance(model, dict)
        else str(model)
    )


def config_label(identity: dict[str, Any]) -> str:
    """A short readable name of a configuration (no seed): model, method, alpha, data,
    batch, e.g. ``digits_cnn pgt a0.25 digits b64``."""
    method = identity.get("method") or {}
    data = identity.get("data") or {}
    alpha = identity.get("alpha")
    parts = [_model_name(identity.get("model")), str(method.get("name", "?"))]
    if alpha is not None:
        parts.append(f"a{alpha:g}")
    parts.append(str(data.get("_target_") or data.get("name", "?")).rsplit(".", 1)[-1])
    parts.append(f"b{identity.get('batch_size')}")
    return " ".join(parts)
