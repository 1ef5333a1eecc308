"""What a run or a sweep is asked to do: the Hydra schema (:mod:`~sweeper.config.schema`),
the launcher's and a search's settings (:mod:`~sweeper.config.launcher`,
:mod:`~sweeper.config.search`), composition and the checks before anything is written
(:mod:`~sweeper.config.compose`), and a run's identity and config hash
(:mod:`~sweeper.config.identity`). Imports Hydra, never torch, submitit or MLflow."""
