"""The one error type the analysis CLI reports as ``error: ...`` with exit status 2."""

from __future__ import annotations


class AnalysisError(Exception):
    """A user-facing failure: bad store, unknown sweep, unwritable output, no runs."""
