"""Benchmark: what periodic checkpoints cost a fit.

A small MLP (2 hidden layers of 64, tanh, 256 samples of 8 features, full batch,
float32) is trained with Adam for ``--steps`` steps, side by side in one process:

* ``plain``: ``adam_jax.fit`` in one compiled loop;
* ``every N``: the same fit with ``checkpoint_dir=..., checkpoint_every=N``
  (orbax-checkpoint, synchronous saves of params, Adam state and history), for
  N = 100 and 1,000, each time into a fresh directory.

The variants run in turn, ``--repeats`` rounds after a warm-up round (compiles);
the median times and their ratio to plain are reported, with the time per save.
Every checkpointed result is checked bit for bit against the plain one.

Usage::

    python benchmarks/bench_checkpoint.py              # 5,000 steps, 5 rounds
    python benchmarks/bench_checkpoint.py --quick      # 2,000 steps, 3 rounds

Results go to ``benchmarks/results/checkpoint.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import adam_jax

INTERVALS = (100, 1_000)


def machine() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "optax", "numpy", "orbax-checkpoint"):
        versions[package] = metadata.version(package)
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "device": str(jax.devices()[0]),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "versions": versions,
    }


def mlp_problem() -> tuple:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 8)), jnp.float32)
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    sizes = [8, 64, 64, 1]
    params = [
        {
            "w": jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(m), jnp.float32),
            "b": jnp.zeros(n, jnp.float32),
        }
        for m, n in itertools.pairwise(sizes)
    ]

    def loss_fn(params):
        h = x
        for layer in params[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        out = h @ params[-1]["w"] + params[-1]["b"]
        return jnp.mean((out - y) ** 2)

    return loss_fn, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 steps, 3 rounds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/checkpoint.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 2_000, 3
    loss_fn, params = mlp_problem()
    optimizer = adam_jax.adam(1e-3)

    def run(every: int | None) -> tuple[float, adam_jax.FitResult]:
        with tempfile.TemporaryDirectory() as tmp:
            kw = {} if every is None else dict(checkpoint_dir=tmp, checkpoint_every=every)
            start = time.perf_counter()
            result = adam_jax.fit(loss_fn, params, optimizer, num_steps=args.steps, **kw)
            jax.block_until_ready(result)
            return time.perf_counter() - start, result

    variants = [None, *INTERVALS]
    times: dict[str, list[float]] = {str(v): [] for v in variants}
    _, reference = run(None)
    for every in INTERVALS:  # warm-up: compiles every segment length
        _, result = run(every)
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(result), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), "results differ"
    for _ in range(args.repeats):
        for every in variants:
            times[str(every)].append(run(every)[0])

    plain = statistics.median(times["None"])
    report = {
        "workload": (
            f"MLP 8-64-64-1 tanh, 256 samples full batch, float32, Adam, {args.steps} steps"
        ),
        "repeats": args.repeats,
        "plain_median_s": plain,
        "plain_times_s": times["None"],
        "intervals": {},
        **machine(),
    }
    print(f"{report['workload']}; plain fit {plain * 1e3:.1f} ms (median of {args.repeats})")
    for every in INTERVALS:
        median = statistics.median(times[str(every)])
        saves = -(-args.steps // every)
        report["intervals"][str(every)] = {
            "median_s": median,
            "times_s": times[str(every)],
            "ratio_to_plain": median / plain,
            "saves": saves,
            "overhead_per_save_ms": (median - plain) / saves * 1e3,
        }
        print(
            f"checkpoint_every={every:>5}: {median * 1e3:8.1f} ms, {median / plain:5.2f}x plain, "
            f"{saves} saves, {(median - plain) / saves * 1e3:.1f} ms per save"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
