"""What the benchmark scripts beside this folder share.

* :mod:`harness.cases`: the same step in adam_jax, optax and torch, a bandwidth floor,
  interleaved timing, and the step benchmark's four cases;
* :mod:`harness.hlo`: what XLA made of a compiled step (kernels, bytes per parameter,
  buffer accounting);
* :mod:`harness.machine`: the machine and versions a result was measured with;
* :mod:`harness.report`: Markdown tables.

The scripts import it as ``harness`` because Python puts a script's own folder first on
``sys.path``; run them from a checkout, e.g. ``python benchmarks/bench_update.py``.
"""
