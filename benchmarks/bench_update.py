"""Benchmark of one optimizer step against optax, torch.optim and a bandwidth floor.

The same as ``adam-jax bench``; see :mod:`adam_jax._bench` for the method and cases.

Usage::

    python benchmarks/bench_update.py            # full run, a few minutes
    python benchmarks/bench_update.py --quick    # smaller sizes, under a minute
    python benchmarks/bench_update.py --help

Results go to ``benchmarks/results/update.json`` (``update-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import sys

from adam_jax._bench import main

if __name__ == "__main__":
    sys.exit(main())
