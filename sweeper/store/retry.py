"""Transient store errors, retried: a store that goes away for a while is waited for.

A PostgreSQL server restarting (connection refused, "terminating connection due to
administrator command", "the database system is starting up"), a connection reset, or a
SQLite file locked past its busy timeout is not a result: each call of the store's API
(:class:`~sweeper.store.Store`) is retried with exponential backoff (0.2 s doubling to 5 s)
for up to ``retry_s`` seconds in all (``store.retry_s``, default :data:`RETRY_S`), then the
error is raised as :class:`StoreUnavailable`. Every call is one transaction that commits or
rolls back, so a retried call never half-applies; the writes that are not idempotent are
compare-and-sets on the run's token (:mod:`sweeper.store.lease`), so a retry of one that
committed before its connection broke changes nothing and says so (the caller sees "not
claimed" / :class:`~sweeper.store.LostRun`, never a second claim).

Only the outermost call retries (a call made inside another, e.g. ``expire_leases`` ->
``mark_killed``, fails through to it), so the bound holds. Errors that are not transient (a
constraint, a missing table, a full disk) are raised at once: a full disk is
:class:`StoreFull`, which a job treats like any other full disk (its run ``interrupted``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from sweeper.errors import Failed
from trainers.registry import first_line

RETRY_S = float(os.environ.get("GRADSWEEP_STORE_RETRY_S", "120"))
F = TypeVar("F", bound=Callable[..., Any])

# lower-cased pieces of the driver messages that mean "the server or the file is not there
# right now" (psycopg / psycopg2 / sqlite3)
_TRANSIENT = (
    "connection refused",
    "could not connect",
    "connection reset",
    "connection timed out",
    "server closed the connection",
    "terminating connection",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "no connection to the server",
    "connection already closed",
    "connection is closed",
    "ssl syscall error",
    "broken pipe",
    "database is locked",
    "database table is locked",
    "consuming input failed",
    "server conn crashed",
    "cannot connect now",
)
_FULL = ("database or disk is full", "no space left on device", "disk full", "disk quota")


class StoreUnavailable(Failed):
    """The store did not answer within ``store.retry_s``: nothing of the call was written
    (a command ends with this one line, exit 1)."""


class StoreFull(OSError):
    """The store's disk is full (SQLite's "database or disk is full", PostgreSQL's ENOSPC):
    nothing of the call was written. Its file name is the store (its file, or its URL)."""


def is_transient(e: BaseException) -> bool:
    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return True
    if not isinstance(e, (OperationalError, DBAPIError)):
        return False
    text = str(e).lower()
    return any(t in text for t in _TRANSIENT)


def is_full(e: BaseException) -> bool:
    return isinstance(e, DBAPIError) and any(t in str(e).lower() for t in _FULL)


_depth = threading.local()


def retrying(fn: F) -> F:
    """``fn`` (a store method) retried on transient errors for up to ``self.retry_s``."""

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_depth, "n", 0):  # inside another store call: that one retries
            return fn(self, *args, **kwargs)
        budget = getattr(_depth, "patience", None)
        if budget is None:
            budget = getattr(self, "retry_s", RETRY_S)
        end = time.monotonic() + budget
        wait, warned = 0.2, False
        while True:
            _depth.n = 1
            try:
                return fn(self, *args, **kwargs)
            except DBAPIError as e:
                if is_full(e):
                    raise StoreFull(errno.ENOSPC, "No space left on device", self.where) from None
                if not is_transient(e):
                    raise
                left = end - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(
                        f"the results store did not answer for {budget:g} s "
                        f"(store.retry_s): {first_line(e)}"
                    ) from None
                if not warned and budget > 0 and getattr(self, "warn", None) is not None:
                    self.warn(f"the results store is not answering ({first_line(e)}); "
                              f"retrying for up to {budget:g} s")  # fmt: skip
                    warned = True
                time.sleep(min(wait, left))
                wait = min(wait * 2, 5.0)
            finally:
                _depth.n = 0

    return call  # type: ignore[return-value]


@contextlib.contextmanager
def patience(seconds: float) -> Iterator[None]:
    """Store calls of this thread inside the block retry for ``seconds`` at most (0: one
    attempt): a job's write-behind tries without stopping its training."""
    old = getattr(_depth, "patience", None)
    _depth.patience = seconds
    try:
        yield
    finally:
        _depth.patience = old


def retry_api(cls: type, *bases: type) -> type:
    """Every public method that ``bases`` define, on ``cls``, retried (:func:`retrying`)."""
    for base in bases:
        for name, attr in vars(base).items():
            if name.startswith("_") or not callable(attr) or isinstance(attr, type):
                continue
            if isinstance(attr, (staticmethod, classmethod)):
                continue
            setattr(cls, name, retrying(attr))
    return cls
