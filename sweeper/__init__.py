"""gradsweep's sweeper: configs in, training jobs dispatched, results recorded.

Public surface: :func:`run_job` (one run from a typed Config), :class:`Store` (the
results store), :class:`Config` (the Hydra schema).
"""

from sweeper.job import JobOutcome, run_job
from sweeper.schema import Config
from sweeper.store import Run, RunStatus, Store

__all__ = ["Config", "JobOutcome", "Run", "RunStatus", "Store", "run_job"]
