"""Independent references for four classic Adam exercises, in NumPy (and torch).

Each module transcribes one exercise's own algorithm, as close to its published text
as runnable Python allows, so that the tests and ``examples/demo.py`` can compare
adam_jax against code that does not use it:

* :mod:`references.linear_regression`: Adam written out in NumPy on a linear
  regression, stopping once the MSE falls below 1;
* :mod:`references.worked_example`: one Adam step worked by hand, w = 0.5 -> 0.6;
* :mod:`references.amsgrad_mlp`: a two-layer MLP trained with
  ``torch.optim.Adam(amsgrad=True)``, lr 1e-4, eps 1e-8;
* :mod:`references.adamax`: an Adamax function with eps outside the max;
* :mod:`references.early_stopping`: a regression that overfits, and the patience rule
  as a plain loop.

Where an exercise leaves something out (the regression's data, Adamax's gradient),
the choice made here is stated where it is made. Import as ``references`` with
``tests/`` on ``sys.path`` (pytest puts it there).
"""
