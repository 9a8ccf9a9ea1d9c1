"""The paper's method as component families, laid out as pytorch-metric-learning lays out its own.

* :mod:`~maxmatch_cli.method.similarity` -- set similarities (eq. 1-4), one module per member, a name-keyed
  table, and the blockwise entry points (``set_similarity``); PML's ``distances/``.
* :mod:`~maxmatch_cli.method.assignment` -- the exact max-trace solvers behind MaxMatch.
* :mod:`~maxmatch_cli.method.miners` -- which candidates each ranking query sees: directions, the same-image
  mask, hardest / all negatives.
* :mod:`~maxmatch_cli.method.reducers` -- per-query terms to one number (sum / mean, directions combined).
* :mod:`~maxmatch_cli.method.losses` -- one module per loss (eq. 5-8) and the weighted total; a ranking loss
  composes a similarity's scores, a miner and a reducer.

Everything is a pure function of tensors; besides its own modules the package imports only ``errors``.
"""
