"""The results store: the source of truth for every run (SQLite by default, any SQLAlchemy
URL, PostgreSQL for clusters). Imports neither torch nor submitit.

One object, :class:`Store`, with one concern per module:

* :mod:`~sweeper.store.models` -- the tables; :mod:`~sweeper.store.migrations` -- numbered
  schema upgrades; :mod:`~sweeper.store.db` -- opening a store (create or require).
* :mod:`~sweeper.store.lifecycle` -- a run's writes: claimed, started, epochs, finished;
  sweeps and the runs they ask for.
* :mod:`~sweeper.store.lease` -- one owner per run: claims and fencing tokens, heartbeats,
  a dead job's run ``interrupted``, a dead sweeper's sweep ``abandoned``.
* :mod:`~sweeper.store.read` -- the read API, returning plain frozen records
  (:mod:`~sweeper.store.records`): runs, epochs, filter stats, sweeps.
* :mod:`~sweeper.store.retry` -- a store that stops answering (a server restart, a lock
  held past the busy timeout) is waited for, up to ``store.retry_s``.
* :func:`default_url` -- where the store is when ``store.url`` is not given.
"""

from __future__ import annotations

from sweeper.store.db import StoreError
from sweeper.store.lease import HEARTBEAT_S, KILLED_TWICE, LEASE_S, Leases, LostRun, pid_alive
from sweeper.store.lifecycle import Lifecycle
from sweeper.store.migrations import SCHEMA_VERSION
from sweeper.store.models import RunStatus
from sweeper.store.read import CostBasis, CostKey, Reads, RunQuery
from sweeper.store.records import (
    EpochRecord,
    FilterStatRecord,
    RunRecord,
    SweepRecord,
    SweepRunRecord,
)
from sweeper.store.retry import RETRY_S, StoreFull, StoreUnavailable, retry_api
from sweeper.store.url import default_tracking_uri, default_url, display_url, engine_url


class Store(Lifecycle, Leases, Reads):
    """A results store at any SQLAlchemy URL. ``Store(url)`` creates a missing store;
    ``Store(url, create=False)`` requires an existing one (readers). Every call of its API
    waits out a store that stopped answering, up to ``retry_s`` (:mod:`sweeper.store.retry`)."""


retry_api(Store, Lifecycle, Leases, Reads)


__all__ = [
    "HEARTBEAT_S",
    "KILLED_TWICE",
    "LEASE_S",
    "LostRun",
    "RETRY_S",
    "StoreFull",
    "StoreUnavailable",
    "SCHEMA_VERSION",
    "CostBasis",
    "CostKey",
    "EpochRecord",
    "FilterStatRecord",
    "RunQuery",
    "RunRecord",
    "RunStatus",
    "Store",
    "StoreError",
    "SweepRecord",
    "SweepRunRecord",
    "default_tracking_uri",
    "default_url",
    "display_url",
    "engine_url",
    "pid_alive",
]
