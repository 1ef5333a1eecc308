"""Everything MLflow. The results store is the source of truth; MLflow shows it.

* :mod:`~sweeper.tracking.describe` -- what a run shows (params, tags, outcome), from its row;
* :mod:`~sweeper.tracking.client` -- one MLflow run, a sweep's parent, system metrics;
* :mod:`~sweeper.tracking.record` -- :func:`~sweeper.tracking.record.sync_run`, the one
  function that brings a run's MLflow record up to date from the store;
* :mod:`~sweeper.tracking.job` -- a job's MLflow thread; :mod:`~sweeper.tracking.sweep` --
  the sweeper's (fused members, the parent's summary); :mod:`~sweeper.tracking.catch_up` --
  ``python -m sweeper mirror``.
"""
