"""Jobs and where they run: the dispatcher and its sources (:mod:`~sweeper.launch.grid`,
:mod:`~sweeper.launch.study` with :mod:`~sweeper.launch.trials`), fused groups
(:mod:`~sweeper.launch.fuse`), local and Slurm backends (:mod:`~sweeper.launch.backends`,
:mod:`~sweeper.launch.slurm`), and one job (:mod:`~sweeper.launch.job`)."""
