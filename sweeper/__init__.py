"""gradsweep's sweeper: configs in, training jobs dispatched, results recorded.

By concern, every import pointing down this list (``docs/architecture.md`` is the map):

* :mod:`sweeper.cli`, :mod:`sweeper.status` -- ``python -m sweeper`` and its subcommands;
* :mod:`sweeper.launch` -- jobs and where they run: the dispatcher, grids and searches,
  fused groups, local and Slurm backends, one job;
* :mod:`sweeper.tracking` -- everything MLflow: what a run shows, a run's record brought
  up to date from the store, a job's and the sweeper's MLflow threads;
* :mod:`sweeper.config` -- the Hydra schema, composition and checks, a run's identity;
* :mod:`sweeper.store` -- the results store, the source of truth;
* :mod:`sweeper.errors`, :mod:`sweeper.provenance` -- the error boundary; what every row
  records of where it was made.
"""
