"""The analysis CLI's user-facing error: ``error: ...`` and exit status 2 (bad input).

A subclass of :class:`~trainers.registry.ConfigError`, so the one boundary
(:func:`sweeper.errors.boundary`) reports it like any other bad input.
"""

from __future__ import annotations

from trainers.registry import ConfigError


class AnalysisError(ConfigError):
    """A user-facing failure: bad store, unknown sweep, unwritable output, no runs."""
