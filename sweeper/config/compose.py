"""Composing configs with Hydra, and checking the command line before Hydra starts.

:func:`preflight_argv` composes the same config through Hydra's compose API and runs every
check that needs no training, before Hydra starts (and creates its output directory), so
bad input ends with one line and nothing is written. :func:`to_config` is the one boundary
where a DictConfig becomes the typed :class:`~sweeper.config.schema.Config`.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf, open_dict

from sweeper.config.schema import Config
from trainers.catalog import DATASETS
from trainers.registry import ConfigError, first_line

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "method", "data", "schedule", "optimizer", "experiment")
# hydra's own groups that we replace: Hydra's basic launcher/sweeper bypass the store
HYDRA_GROUPS = {"hydra/launcher": ["local", "slurm"], "hydra/sweeper": ["gradsweep", "optuna"]}


def group_options(group: str, search: list[Path] | None = None) -> list[str]:
    """The options of a config group: ours, and those in the ``hydra.searchpath`` dirs."""
    if group in HYDRA_GROUPS:
        return HYDRA_GROUPS[group]
    dirs = [CONF_DIR, *(search or [])]
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def search_dirs(parsed: list[Any]) -> list[Path] | None:
    """The ``file://`` dirs of a ``hydra.searchpath=[...]`` override (a researcher's own
    ``conf/``); None when it names another kind (``pkg://``), whose options Hydra checks."""
    dirs: list[Path] = []
    for ov in parsed:
        if ov.key_or_group.lstrip("+") != "hydra.searchpath":
            continue
        value = ov.value()
        for entry in value if isinstance(value, list) else [value]:
            entry = str(entry)
            if not entry.startswith("file://"):
                return None
            dirs.append(Path(entry.removeprefix("file://")).expanduser())
    return dirs


def hydra_overrides_for_compose(overrides: list[str]) -> list[str]:
    """What the compose API takes of the command line: everything but Hydra's own settings,
    except ``hydra.searchpath`` (a researcher's config groups)."""
    return [
        a
        for a in overrides
        if not a.startswith(("hydra.", "hydra/", "+hydra")) or a.startswith("hydra.searchpath=")
    ]


def to_config(cfg: DictConfig) -> Config:
    """The one boundary where a DictConfig becomes the typed Config."""
    _reject_extra_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


def compose_dict(overrides: list[str]) -> DictConfig:
    """The composed DictConfig of ``python -m sweeper OVERRIDES`` (Hydra's compose API);
    ConfigError (one line) for a composition or type error."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sweeper.config.schema import register_configs

    register_configs()  # idempotent: the schema the config files are checked against
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except Exception as e:  # Hydra/OmegaConf composition or type errors
        raise ConfigError(hydra_error_line(e)) from None


def compose(overrides: list[str]) -> Config:
    """The typed config of ``python -m sweeper OVERRIDES``."""
    return typed(compose_dict(overrides))


def typed(dcfg: DictConfig) -> Config:
    """:func:`to_config` with OmegaConf's type errors as one line (ConfigError)."""
    try:
        return to_config(dcfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf type errors
        raise ConfigError(hydra_error_line(e)) from None


def hydra_error_line(e: BaseException) -> str:
    """Hydra / OmegaConf errors are multi-line; keep what names the bad value."""
    text = str(e).strip()
    whole = text + "\n" + str(e.__cause__ or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    m = re.search(r"Could not override '([^']+)'", text)
    if m and re.search(r"Key '[^']+' (is )?not in", whole):
        kind = re.search(r"object_type=(\w+)", whole)
        return unknown_key_message(m.group(1), kind.group(1) if kind else None)
    m = re.search(r"Missing mandatory value: ?(\S+)", text)
    if m or "MissingMandatoryValue" in type(e).__name__:
        k = m.group(1) if m else key
        return f"{k} is required (no default); set it on the command line, e.g. {k}=/path"
    first = lines[0] if lines else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip():  # Hydra wraps the OmegaConf error that says why
        first = f"{first.rstrip('.')}: {first_line(cause)}"
    return f"{key}: {first}" if key and key not in first else first


def _did_you_mean(path: str, known: list[str]) -> str:
    """``; did you mean 'a.b'?`` for the known key nearest the last part of ``path``."""
    prefix, _, name = path.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""


def unknown_key_message(path: str, object_type: str | None = None) -> str:
    """'unknown key X; did you mean Y? known ...' listing the keys allowed where X was put
    (``object_type``: the schema Hydra named, e.g. a data set's own)."""
    path = path.lstrip("+~")
    parts = path.split(".")
    if parts[0] == "data" and len(parts) == 2:  # each data set has keys of its own
        entry = next((DATASETS.get(n) for n in DATASETS
                      if DATASETS.get(n).schema.__name__ == object_type), None)  # fmt: skip
        if entry is not None:
            keys = ["name", *entry.knobs, "_target_", "args"]
            hint = _did_you_mean(path, keys) or ";"
            return f"unknown key {path!r} for data={entry.name}{hint} its keys: {', '.join(keys)}"
    if parts[0] == "hydra" and len(parts) > 1:
        return _unknown_hydra_key(path, object_type)
    node: Any = Config
    for part in parts[:-1]:
        fields = getattr(node, "__dataclass_fields__", {})
        if part not in fields:
            break
        node = _schema_class(fields[part].type)
    fields = getattr(node, "__dataclass_fields__", None) or Config.__dataclass_fields__
    where = "top-level keys" if len(parts) == 1 else f"keys of {'.'.join(parts[:-1])}"
    hint = _did_you_mean(path, list(fields)) or ";"
    return f"unknown key {path!r}{hint} known {where}: {', '.join(fields)}"


def _unknown_hydra_key(path: str, object_type: str | None) -> str:
    """``hydra.*``: the keys of the node it was put in -- our launcher's or sweeper's
    settings (``object_type`` names which: local or slurm, grid or search), or Hydra's own."""
    import hydra.conf

    from sweeper.config import schema

    parts = path.split(".")
    node: Any = getattr(schema, object_type or "", None) or getattr(
        hydra.conf, object_type or "", None
    )
    if not hasattr(node, "__dataclass_fields__"):
        node = hydra.conf.HydraConf
        for part in parts[1:-1]:  # Hydra's schema has real types (no string annotations)
            sub = getattr(node, "__dataclass_fields__", {}).get(part)
            if sub is None or not hasattr(sub.type, "__dataclass_fields__"):
                break
            node = sub.type
    known = [k for k in node.__dataclass_fields__ if not k.startswith("_")]  # not _target_
    hint = _did_you_mean(path, known) or ";"
    return f"unknown key {path!r}{hint} known keys of {'.'.join(parts[:-1])}: {', '.join(known)}"


def _schema_class(name: object) -> Any:
    """Field types are strings under `from __future__ import annotations`: resolve them."""
    import trainers.config as tc

    for mod in (tc, sys.modules[Config.__module__]):
        if isinstance(name, str) and hasattr(mod, name):
            return getattr(mod, name)
    return name


def _reject_extra_keys(cfg: DictConfig, schema: Any = Config, prefix: str = "") -> None:
    """``+colour=blue`` adds a key Hydra accepts but nothing reads: refuse it."""
    fields = schema.__dataclass_fields__
    for k in cfg.keys():
        if k not in fields:
            raise ConfigError(unknown_key_message(prefix + str(k)))
        sub = _schema_class(fields[k].type)
        if hasattr(sub, "__dataclass_fields__") and isinstance(cfg[k], DictConfig):
            _reject_extra_keys(cfg[k], sub, f"{prefix}{k}.")


def check_group_choices(overrides: list[str]) -> None:
    """Unknown group options -> one line listing the known ones (Hydra prints a page)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise ConfigError(hydra_error_line(e)) from None
    search = search_dirs(parsed)
    for ov in parsed:
        group = ov.key_or_group.lstrip("+~")
        if (group not in GROUPS and group not in HYDRA_GROUPS) or ov.is_delete():
            continue
        if ov.is_sweep_override() and type(ov.value()).__name__ != "ChoiceSweep":
            raise ConfigError(
                f"{ov.input_line}: {group} is a config group; list its options or use choice(...)"
            )
        values = (
            list(ov.sweep_string_iterator())
            if ov.is_sweep_override()
            else [ov.get_value_element_as_str()]
        )
        known = group_options(group, search)
        if not values:
            raise ConfigError(f"empty choice for {group}; known: {', '.join(known)}")
        if search is None and group not in HYDRA_GROUPS:
            continue  # a pkg:// search path: Hydra knows its options
        for v in values:
            if v not in known:
                raise ConfigError(f"unknown {group} {v!r}; known: {', '.join(known)}")


def check_sweeper_settings(overrides: list[str]) -> None:
    """``hydra.sweeper.*`` of a search (sampler, pruner, metric, a wrong type), checked
    before Hydra starts: one line, no sweep directory, no study."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [ov.input_line for ov in parsed if not ov.is_sweep_override() and ov.input_line]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            dcfg = hydra_compose("config", overrides=fixed, return_hydra_config=True)
        node = OmegaConf.to_container(dcfg.hydra.sweeper)
    except Exception as e:
        msg = hydra_error_line(e)
        if "not in 'SweeperConf'" in str(e) + str(e.__cause__ or ""):
            msg += " (search settings need hydra/sweeper=optuna on the command line)"
        raise ConfigError(msg) from None
    assert isinstance(node, dict)
    if str(node.get("_target_", "")).endswith("OptunaSweeper"):
        from sweeper.config.search import SearchParams

        SearchParams(**{k: v for k, v in node.items() if k != "_target_"}).validate()


def preflight_argv(argv: list[str]) -> Config | None:
    """Compose and validate a single run's config from the command line.

    Returns the typed Config, or None for a multirun (each point is checked by the
    sweeper). Raises ConfigError with a one-line message on bad input.
    """
    from sweeper.config.identity import preflight

    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    check_group_choices(overrides)
    if multirun:
        check_sweeper_settings(overrides)
        return None
    cfg = compose(hydra_overrides_for_compose(overrides))
    preflight(cfg)
    return cfg


class PointComposer:
    """The typed config of each point of a sweep, composed at the speed of a loop.

    Hydra composes a sweep's point by re-reading and re-merging the whole defaults tree
    (``load_sweep_config``: YAML parsing included), then applies the value overrides
    (``alpha=0.3``) to the merged config (``ConfigLoaderImpl._apply_overrides_to_config``,
    in order, with their errors) and converts it to the typed Config. Three caches give the
    same configs, hashes and errors at a fraction of the cost (``tests/test_compose.py``
    compares them with Hydra's per-point composition on a large mixed grid):

    * the config-group choices (``method=pgt``, ``+experiment=smoke``, ``hydra.*``) are
      merged once per distinct combination (the *base*);
    * a *stem* is a base with the point's other value overrides applied, converted once;
    * a *leaf* override (a plain ``key=value`` of a number, string, bool or null on a value
      that the stem holds as a plain, set, non-interpolated value of a dataclass that
      :func:`to_config` builds as is) is applied once per stem by Hydra's own code, on the
      stem, and its converted value kept; a point is then its stem's typed Config with
      those values replaced (``dataclasses.replace``).

    Anything else (a list or dict value, ``+``/``~``, keys of the ``data`` node, whose
    typed form :func:`to_config` rebuilds) belongs to the stem; a stem with an
    interpolation (a leaf may be what it refers to), a leaf that a stem override also
    touches, and a point whose fast form fails
    in any way is composed as Hydra composes it, so its error is Hydra's. Points share the
    sub-configs their overrides do not change; nothing changes a Config once made."""

    def __init__(self, loader: Any, master: DictConfig) -> None:
        self.loader, self.master = loader, master
        self._bases: dict[tuple[str, ...], DictConfig] = {}
        # (groups, stem overrides) -> (stem DictConfig, its typed Config), None: no fast path
        self._stems: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[DictConfig, Config] | None] = {}  # fmt: skip
        self._leaves: dict[tuple[Any, str], Any] = {}  # (stem key, override) -> value | _SLOW
        self._leafy: dict[tuple[tuple[str, ...], str], bool] = {}  # a leaf on that base?
        self._is_group: dict[str, bool] = {}
        self._parsed: dict[str, Any] = {}  # override string -> Hydra's parsed Override
        self._repo: Any = None
        self.slow = 0  # points composed Hydra's way (the tests check the fast path is taken)

    def _group(self, ov: Any) -> bool:
        """Whether an override chooses a config group (or is Hydra's own: it may change the
        search path), as Hydra's defaults list would take it."""
        key = ov.key_or_group
        if key not in self._is_group:
            if ov.is_hydra_override() or key.startswith("hydra.") or ov.package is not None:
                self._is_group[key] = True
            else:
                if self._repo is None:
                    hydra_ovs = list(OmegaConf.to_container(self.master.hydra.overrides.hydra))
                    _, self._repo = self.loader._parse_overrides_and_create_caching_repo(
                        self.master.hydra.job.config_name, hydra_ovs
                    )
                self._is_group[key] = bool(self._repo.group_exists(key.lstrip("+~")))
        return self._is_group[key]

    def compose(self, overrides: list[str]) -> Config:
        """One point's typed config (ConfigError, one line, on bad input)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            new = [o for o in overrides if o not in self._parsed]
            if new:  # each distinct override is parsed once (a grid repeats them)
                parser = OverridesParser.create()
                for o, p in zip(new, parser.parse_overrides(new), strict=True):
                    self._parsed[o] = p
            parsed = [self._parsed[o] for o in overrides]
            groups = tuple(o.input_line for o in parsed if self._group(o))
            values = [o for o in parsed if not self._group(o)]
            base = self._bases.get(groups)
            if base is None:
                base = self.loader.load_sweep_config(self.master, list(groups))
                with open_dict(base):
                    del base["hydra"]
                self._bases[groups] = base
            try:
                cfg = self._fast(groups, base, values)
            except Exception:  # anything unforeseen: Hydra's way decides
                cfg = None
            if cfg is not None:
                return cfg
            self.slow += 1
            return self._hydra(base, values)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(hydra_error_line(e)) from None

    @staticmethod
    def _hydra(base: DictConfig, values: list[Any]) -> Config:
        """Hydra's own way: the value overrides applied to a copy of the base, converted."""
        import copy

        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        cfg = copy.deepcopy(base)
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        return to_config(cfg)

    def _fast(self, groups: tuple[str, ...], base: DictConfig, values: list[Any]) -> Config | None:
        """The point from its stem and leaves, or None where it must be composed Hydra's way."""
        leaves = [ov for ov in values if self._is_leaf(groups, base, ov)]
        if not leaves:
            return None
        rest = [ov for ov in values if not any(ov is lf for lf in leaves)]
        keys = [ov.key_or_group for ov in leaves]
        touched = [ov.key_or_group.lstrip("+~") for ov in rest]
        if any(a == b or a.startswith(b + ".") or b.startswith(a + ".")
               for a in keys for b in touched):  # fmt: skip
            return None  # a stem override changes a leaf's node: order matters
        skey = (groups, tuple(ov.input_line for ov in rest))
        if skey not in self._stems:
            self._stems[skey] = self._stem(base, rest)
        stem = self._stems[skey]
        if stem is None:
            return None
        changes: dict[str, Any] = {}  # nested by dotted key; in order: the last one wins
        for ov in leaves:
            lkey = (skey, ov.input_line)
            if lkey not in self._leaves:
                self._leaves[lkey] = self._leaf(stem, ov)
            value = self._leaves[lkey]
            if value is _SLOW:
                return None
            *path, last = ov.key_or_group.split(".")
            node = changes
            for part in path:
                node = node.setdefault(part, {})
            node[last] = _Value(value)
        return _replaced(stem[1], changes)

    def _is_leaf(self, groups: tuple[str, ...], base: DictConfig, ov: Any) -> bool:
        """Whether ``ov`` may be a leaf: ``key=value`` of a primitive on a plain set value of
        the base (checked again on the stem when its value is made)."""
        from hydra.core.override_parser.types import OverrideType

        key = (groups, ov.input_line)
        if key not in self._leafy:
            ok = ov.package is None and ov.type == OverrideType.CHANGE and _plain(ov.value())
            ok = ok and _built_as_is(ov.key_or_group)
            self._leafy[key] = ok and _leaf_node(base, ov.key_or_group) is not None
        return self._leafy[key]

    def _stem(self, base: DictConfig, rest: list[Any]) -> tuple[DictConfig, Config] | None:
        """The base with the non-leaf value overrides applied and converted; None when that
        fails (each of its points then fails, or not, Hydra's way) or when it holds an
        interpolation (a leaf may be what it refers to)."""
        import copy

        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        try:
            cfg = copy.deepcopy(base)
            ConfigLoaderImpl._apply_overrides_to_config(rest, cfg)
            if _has_interpolation(cfg):
                return None
            return cfg, to_config(cfg)
        except Exception:
            return None

    @staticmethod
    def _leaf(stem: tuple[DictConfig, Config], ov: Any) -> Any:
        """A leaf override's converted value on this stem, as :func:`to_config` would read it
        (``_SLOW`` when it is not a plain leaf here or Hydra refuses it: composed Hydra's
        way, for Hydra's error). Applied by Hydra's own code to a copy of the leaf's node,
        which is put back afterwards: the stem is unchanged."""
        import copy

        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from omegaconf.nodes import ValueNode

        cfg, typed = stem
        parts = ov.key_or_group.split(".")
        parent: Any = cfg
        obj: Any = typed
        for part in parts[:-1]:  # each dataclass on the way must be the one to_config builds
            if type(obj) is not parent._metadata.object_type:
                return _SLOW
            parent, obj = parent._get_node(part, validate_access=False), getattr(obj, part, None)
            if not isinstance(parent, DictConfig):
                return _SLOW
        if (
            type(obj) is not parent._metadata.object_type
            or _leaf_node(cfg, ov.key_or_group) is None
        ):
            return _SLOW
        last = parts[-1]
        orig = parent._get_node(last)
        parent.__dict__["_content"][last] = copy.deepcopy(orig)
        try:
            ConfigLoaderImpl._apply_overrides_to_config([ov], cfg)
            node = parent._get_node(last)
            if not isinstance(node, ValueNode) or node._is_missing() or node._is_interpolation():
                return _SLOW
            return node._value()
        except Exception:
            return _SLOW
        finally:
            parent.__dict__["_content"][last] = orig


_SLOW = object()  # a leaf that must be applied Hydra's way


def _plain(value: Any) -> bool:
    """A value a leaf may take: a number, bool, null or a string that is neither an
    interpolation nor OmegaConf's missing value."""
    if isinstance(value, str):
        return "${" not in value and value != "???"
    return value is None or isinstance(value, (bool, int, float))


def _leaf_node(cfg: DictConfig, key: str) -> Any:
    """The value node at dotted ``key`` when every step is a dict key and the value is set
    and not an interpolation; else None."""
    from omegaconf.nodes import ValueNode

    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or not part.isidentifier():
            return None
        node = node._get_node(part, validate_access=False)
    if not isinstance(node, ValueNode) or node._is_missing() or node._is_interpolation():
        return None
    return node


def _built_as_is(key: str) -> bool:
    """Whether every container above ``key`` is declared as a dataclass of the schema, which
    :func:`to_config` builds from its node as is (``data`` is not: its declared type is
    ``Any`` and Config rebuilds it as a DataConfig)."""
    schema: Any = Config
    for part in key.split(".")[:-1]:
        fields = getattr(schema, "__dataclass_fields__", None)
        if not fields or part not in fields:
            return False
        schema = _schema_class(fields[part].type)
    return hasattr(schema, "__dataclass_fields__")


def _has_interpolation(node: Any) -> bool:
    from omegaconf import ListConfig

    if isinstance(node, (DictConfig, ListConfig)):
        if node._is_missing() or node._is_none():
            return False
        if node._is_interpolation():
            return True
        children = node._content.values() if isinstance(node, DictConfig) else node._content
        return any(_has_interpolation(c) for c in children)
    return bool(node._is_interpolation())


class _Value(NamedTuple):
    """A leaf's new value in the nested changes of :func:`_replaced` (a dict is a level)."""

    value: Any


def _replaced(obj: Any, changes: dict[str, Any]) -> Any:
    """A copy of the dataclass ``obj`` with ``changes`` (``{field: _Value(v)}``, or
    ``{field: {...}}`` for a field's own fields): one ``dataclasses.replace`` per changed
    dataclass; what is not changed is shared."""
    import dataclasses

    return dataclasses.replace(obj, **{
        k: v.value if isinstance(v, _Value) else _replaced(getattr(obj, k), v)
        for k, v in changes.items()
    })  # fmt: skip
