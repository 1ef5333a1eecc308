"""Hydra plugins of gradsweep: thin shims over the sweeper package.

Hydra imports every module of every ``hydra_plugins`` package at plugin discovery, for any
Hydra app in the environment, so these modules import only Hydra and OmegaConf; everything of
ours (settings, the sweep machinery, submitit, the store, torch) is imported when a sweep
starts, as Hydra's own submitit plugin does. Their configs (``hydra/sweeper=gradsweep|optuna``, ``hydra/launcher=local|slurm``) are
registered by gradsweep's own CLI (:func:`sweeper.config.schema.register_configs`), not here: Hydra
deep-copies its whole ConfigStore for every config group it lists, so nodes registered at
discovery would slow every other Hydra app's ``--help``.

The plugins raise (:class:`~trainers.registry.ConfigError`, :class:`~sweeper.errors.Failed`);
the CLI's boundary prints and exits.
"""
