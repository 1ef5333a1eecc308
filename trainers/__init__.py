"""gradsweep's trainers: models, data, gradient methods and the training loop.

Public surface for use in other loops: :mod:`trainers.methods` (``pgt_cross_entropy``,
``adaptive_clip_grad_``, ``znorm_``, ``clip_grad_norm_``), :func:`build_model`,
:func:`build_data`, :class:`Trainer`.
"""
