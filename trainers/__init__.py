"""gradsweep's trainers: models, data, gradient methods and the training loop.

For use in other loops: :mod:`trainers.methods` (``pgt_cross_entropy``,
``adaptive_clip_grad_``, ``znorm_``, ``clip_grad_norm_``), :func:`trainers.models.build_model`,
:func:`trainers.data.build_data`, :class:`trainers.train.Trainer`. The built-in data sets and
models are the torch-free catalog :mod:`trainers.catalog`; the typed run config is
:mod:`trainers.config`. Importing this package imports nothing heavy.
"""
