"""The functional core: plain torch, no Lightning.

The loss family and its presets (``losses``), how free values map to its tables (``parametrization``), the upper
objectives (``objectives``), the hypergradient (``hypergradient``: one call; ``problem``: its pieces on a network
seen as a function of its weights; ``solvers``: the methods, one table; ``linear_solve``: Neumann and conjugate
gradient; ``head``: the classifier head's equilibrium on fixed features, used by the ``"head"`` method and the
held-back check), the estimator settings (``estimator``), reduction over processes (``reduce``), the (group, class)
cell index (``cells``), group error metrics (``metrics``), the model optimizer's schedule (``lr_schedule``) and two
small helpers (``coerce``, ``random_state``).
"""
