"""The pre-flight checks a config's own validation cannot make, run before anything is written.

Refused input leaves nothing behind: no results folder, no store, no Hydra run folder (its
``.hydra/`` and ``gradsweep.log``). Hydra creates a single run's folder before it calls the
task, so every check runs before Hydra starts, in the CLI (:func:`check_argv`, then the
composed config's :func:`~sweeper.config.identity.preflight` and :func:`check_before_writing`);
a sweep's points are composed by our launcher and checked by ``grid.validate_points`` before
the sweep is recorded (our sweeper writes nothing before). The checks here:

- :func:`check_argv`: a number too long for Python to read (a 5,000-digit ``alpha``), named
  with what its key allows, before Hydra's parser fails on it with a message that names none.
- :func:`check_store`: the results store would open -- without creating it (a SQLite file in
  a folder that does not exist, a file that is not a database, an unknown URL scheme, a
  server that does not answer).
- :func:`check_builds`: your own models and data sets are built once per distinct
  configuration (torch; only when a point has a ``_target_``) and meet the same checks as in
  the job: the data's arrays, the ``fc`` contract, one forward of the data's shape, the batch
  size against the training images.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.config.schema import INT64_LIMIT, Config
from sweeper.store.url import display_url, sqlite_path
from trainers.catalog import data_facts, data_identity
from trainers.registry import ConfigError, first_line

if TYPE_CHECKING:
    from trainers.data import DataBundle

SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


# ------------------------------------------------------------------------ the command line
# The most digits a number on the command line may have before its decimal point: beyond
# any knob, and below both what Python reads as an integer (4300 digits, after which Hydra's
# parser fails naming no key) and what becomes a float (about 1.8e308; OmegaConf says "int
# too large to convert to float")
MAX_DIGITS = 300


def check_argv(argv: Sequence[str]) -> None:
    """A number too long to be read (a 5,000-digit ``alpha``): one line naming the key and
    what it allows, before Hydra's parser or OmegaConf fail on it."""
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg.startswith("-") or not eq:
            continue
        # integer parts only (a long fraction is a float like any other), leading zeros aside
        long = next((m for m in re.finditer(r"(?<![.\d])\d+", value)
                     if len(m.group().lstrip("0")) > MAX_DIGITS), None)  # fmt: skip
        if long is None:
            continue
        digits = long.group()
        key = key.lstrip("+~").split("@", 1)[0]
        shown = f"{digits[:4]}...{digits[-4:]} ({len(digits)} digits)"
        negative = value[: long.start()].endswith("-")
        raise ConfigError(f"{key}={'-' if negative else ''}{shown} is not allowed; "
                          f"{_allowed(key, negative)}")  # fmt: skip


def _allowed(key: str, negative: bool) -> str:
    """What ``key`` allows, in the words of the config's own check: the default config with
    an out-of-range value of the key's type in its place (infinity for a float, 2**63 for an
    integer), validated. A key without such a check: the longest number Python reads."""
    from sweeper.config.compose import compose

    fallback = f"expected a number of at most {MAX_DIGITS} digits"
    try:
        cfg: Any = compose([])
        *path, name = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        current = getattr(node, name)
    except (ConfigError, AttributeError):
        return fallback
    if isinstance(current, float):
        probe: float | int = -math.inf if negative else math.inf
    elif isinstance(current, int) and not isinstance(current, bool):
        probe = -INT64_LIMIT if negative else INT64_LIMIT
    else:
        return fallback
    setattr(node, name, probe)
    try:
        cfg.validate()
    except ConfigError as e:
        msg = str(e)
        if msg.startswith(f"{key}=") and " is not allowed; " in msg:
            return msg.split(" is not allowed; ", 1)[1]
    return fallback


# -------------------------------------------------------------------------------- store
def check_store(cfg: Config) -> None:
    """The results store would open, and nothing is created to find out: a SQLite file is
    read for its header only, another database is connected to and left as it is.

    Call it only in a process that holds no connection to that SQLite file: closing the
    descriptor that read the header drops every POSIX lock the process holds on the file,
    SQLite's included (sqlite.org/howtocorrupt.html, 2.2)."""
    url = cfg.store_url()
    db = sqlite_path(url)
    if db is not None:
        _check_sqlite(cfg, url, db.expanduser())
    elif not url.startswith("sqlite"):
        _check_server(url)


def _check_sqlite(cfg: Config, url: str, db: Path) -> None:
    cannot = f"the results store {display_url(url)} cannot be opened"
    if db.is_dir():
        raise ConfigError(f"{cannot} ({db} is a folder)")
    if db.exists():
        try:
            with open(db, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise ConfigError(f"{cannot} ({first_line(e)})") from None
        if head and head != SQLITE_HEADER:
            raise ConfigError(f"{cannot} ({db} is not a SQLite database)")
        if not os.access(db, os.W_OK) or not os.access(db.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{cannot} ({db} or its folder is not writable)")
        return
    folder = db.parent.resolve()
    results = Path(cfg.results_dir).expanduser().resolve()
    if folder == results:  # made when the run or sweep starts (checked by check_results_dir)
        return
    if not folder.is_dir():
        raise ConfigError(f"{cannot} (the folder {folder} does not exist; the store's file is "
                          "created in an existing folder)")  # fmt: skip
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{cannot} (the folder {folder} is not writable)")


def _check_server(url: str) -> None:
    """A database server's store: the URL names a driver we have and the server answers
    (connected to and closed; tables are created when the run or sweep starts)."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from sweeper.store.url import engine_url

    try:
        engine = create_engine(engine_url(url))
    except (ArgumentError, ImportError, ValueError) as e:
        raise ConfigError(f"store URL {display_url(url)} is not usable ({first_line(e)})") from None
    try:
        engine.connect().close()
    except SQLAlchemyError as e:
        raise ConfigError(
            f"the results store {display_url(url)} cannot be opened ({first_line(e)})"
        ) from None
    finally:
        engine.dispose()


# --------------------------------------------------------------- your own models and data
def check_builds(points: Sequence[tuple[str, Config]]) -> None:
    """Each distinct custom model and data set among the points, built on the CPU as its job
    would build it and checked the same way (imports torch; nothing to do, and no torch,
    when no point has a ``_target_``). A refusal names the point it was found at, unless
    every point shares what was refused."""
    custom = [(label, cfg) for label, cfg in points if cfg.model._target_ or cfg.data._target_]
    if not custom:
        return
    shapes: dict[str, DataBundle] = {}
    models: set[str] = set()
    for label, cfg in custom:
        dkey = _key(data_identity(cfg.data))
        mkey = _key([cfg.model.identity(), dkey])
        try:
            if dkey not in shapes:
                shapes[dkey] = _data_shape(cfg)
            shape = shapes[dkey]
            from trainers.data import _check_batch_size  # the job's own check and line

            _check_batch_size(cfg.data.effective_name, cfg.batch_size, shape.num_train)
            if cfg.model._target_ and mkey not in models:
                _check_model(cfg, shape)
                models.add(mkey)
        except ConfigError as e:
            shared = all(_key(data_identity(c.data)) == dkey and (not cfg.model._target_
                         or _key([c.model.identity(), dkey]) == mkey) for _, c in points)  # fmt: skip
            raise ConfigError(f"point [{label}]: {e}" if label and not shared else str(e)) from None


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _data_shape(cfg: Config) -> DataBundle:
    """The run's data as far as a model needs it (classes, channels, image size, training
    images): your own data set built (its arrays checked as in the job); a built-in one
    from what its catalog entry knows without loading it."""
    from trainers.data import DataBundle, build_data

    d = cfg.data
    if d._target_:
        try:
            return build_data(d, 1, cfg.seed, "cpu")
        except ConfigError:
            raise
        except Exception as e:  # the researcher's function raised
            raise ConfigError(
                f"data._target_={d._target_} raised {type(e).__name__}: {first_line(e)}"
            ) from None
    facts = data_facts(data_identity(d))
    m = re.match(r"(\d+)x(\d+)x(\d+)", str(facts.get("images", "")))
    assert m is not None, f"the catalog entry of {d.name} gives no image shape"
    num_classes = facts.get("num_classes")
    if num_classes is None:  # imagenet: one class per folder of train/
        from trainers.catalog.data import class_dirs

        num_classes = len(class_dirs(Path(str(d.root)).expanduser() / "train"))
    none: Any = None  # the loaders: a model's checks need only the shape
    return DataBundle(none, none, int(num_classes), int(m.group(1)), int(m.group(2)),
                      int(facts.get("num_train") or 0) or sys.maxsize, 0)  # fmt: skip


def _check_model(cfg: Config, shape: DataBundle) -> None:
    """``model._target_`` built for the data's classes and channels, with the job's checks:
    an ``nn.Module`` with an ``nn.Linear`` named ``fc``, and one forward of the data's shape
    (``trainers.train._dry_run``: the same code, so the same line)."""
    from trainers.models import build_model_from
    from trainers.train import _dry_run

    target = str(cfg.model._target_)
    try:
        model = build_model_from(cfg.model, shape.num_classes, shape.in_channels)
    except ConfigError:
        raise
    except Exception as e:  # the researcher's constructor raised
        raise ConfigError(
            f"model._target_={target} raised {type(e).__name__}: {first_line(e)} (built with "
            f"num_classes={shape.num_classes}, in_channels={shape.in_channels})"
        ) from None
    _dry_run(model, target, shape)


# ---------------------------------------------------------------------------- together
def check_before_writing(points: Sequence[tuple[str, Config]]) -> None:
    """The checks of a run or a sweep (its points as ``(label, config)``, label ``""`` for a
    single run) that need more than each point's own: custom builds, then the store."""
    if not points:
        return
    check_builds(points)
    check_store(points[0][1])  # a sweep's points share one store (grid.validate_points)
