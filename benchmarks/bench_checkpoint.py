"""Benchmark: what periodic checkpoints cost a fit.

A small MLP (2 hidden layers of 64, tanh, 256 samples of 8 features, full batch,
float32) is trained with Adam for ``--steps`` steps, side by side in one process:

* ``plain``: ``adam_jax.fit`` in one compiled loop;
* ``every N``: the same fit with ``checkpoint_dir=..., checkpoint_every=N``
  (orbax-checkpoint, synchronous saves of params, Adam state and history), for
  N = 100 and 1,000, each time into a fresh directory.

The same for ``adam_jax.fit_batched``: ``--problems`` linear regressions (those of
``benchmarks/bench_fit.py``: 200 samples, 4 weights, learning rates 3e-3 to 0.3, each
stopping at MSE <= 1.0, at most 5,000 steps; default lanes and history), plain and with
``checkpoint_every`` = 100 and 1,000 iterations (one step in every lane each).

The variants run in turn, ``--repeats`` rounds after a warm-up round (compiles);
the median times and their ratio to plain are reported, with the time per save.
Every checkpointed result is checked bit for bit against the plain one.

Usage::

    python benchmarks/bench_checkpoint.py              # 5,000 steps, 1,024 problems, 5 rounds
    python benchmarks/bench_checkpoint.py --quick      # 2,000 steps, 256 problems, 3 rounds

Results go to ``benchmarks/results/checkpoint.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import adam_jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from references import linear_regression

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


def regressions(n: int) -> tuple[jax.Array, ...]:
    xs, ys = zip(*(linear_regression.data(n=200, seed=k) for k in range(n)), strict=True)
    lrs = np.geomspace(3e-3, 0.3, n)
    return tuple(jnp.asarray(np.stack(a), jnp.float32) for a in (xs, ys, lrs))


def make_regression(p):
    x, y, lr = p
    return (
        (lambda w: linear_regression.loss(w, x, y)),
        jnp.zeros((1, x.shape[1]), x.dtype),
        adam_jax.adam(lr),
    )


def interleaved(run, repeats: int) -> dict[str, list[float]]:
    """``repeats`` rounds of every variant in turn: plain (None) and each interval."""
    variants = [None, *INTERVALS]
    times: dict[str, list[float]] = {str(v): [] for v in variants}
    _, reference = run(None)
    for every in INTERVALS:  # warm-up: compiles, and checks the result bit for bit
        _, result = run(every)
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(result), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), "results differ"
    for _ in range(repeats):
        for every in variants:
            times[str(every)].append(run(every)[0])
    return times


def summary(times: dict[str, list[float]], saves: dict[int, int], label: str) -> dict:
    plain = statistics.median(times["None"])
    out: dict = {"plain_median_s": plain, "plain_times_s": times["None"], "intervals": {}}
    print(f"{label}; plain {plain * 1e3:.1f} ms (median of {len(times['None'])})")
    for every in INTERVALS:
        median = statistics.median(times[str(every)])
        out["intervals"][str(every)] = {
            "median_s": median,
            "times_s": times[str(every)],
            "ratio_to_plain": median / plain,
            "saves": saves[every],
            "overhead_per_save_ms": (median - plain) / saves[every] * 1e3,
        }
        print(
            f"checkpoint_every={every:>5}: {median * 1e3:8.1f} ms, {median / plain:5.2f}x plain, "
            f"{saves[every]} saves, {(median - plain) / saves[every] * 1e3:.1f} ms per save"
        )
    return out


def _saves(directory: Path) -> int:
    """The checkpoints a run wrote: the number of the newest (they are numbered 1, 2, ...)."""
    return max(int(p.name) for p in (directory / "steps").iterdir() if p.name.isdigit())


def bench_fit(steps: int, repeats: int) -> dict:
    loss_fn, params = mlp_problem()
    optimizer = adam_jax.adam(1e-3)

    def run(every: int | None) -> tuple[float, adam_jax.FitResult]:
        with tempfile.TemporaryDirectory() as tmp:
            kw = {} if every is None else dict(checkpoint_dir=tmp, checkpoint_every=every)
            start = time.perf_counter()
            result = adam_jax.fit(loss_fn, params, optimizer, num_steps=steps, **kw)
            jax.block_until_ready(result)
            return time.perf_counter() - start, result

    times = interleaved(run, repeats)
    workload = f"MLP 8-64-64-1 tanh, 256 samples full batch, float32, Adam, {steps} steps"
    saves = {every: -(-steps // every) for every in INTERVALS}
    return {"workload": workload, "repeats": repeats, **summary(times, saves, workload)}


def bench_batched(n: int, repeats: int) -> dict:
    inputs = regressions(n)
    kw = dict(
        num_steps=5_000, has_aux=True, early_stopping=adam_jax.early_stopping(None, target=1.0)
    )
    saves: dict[int, int] = {}

    def run(every: int | None) -> tuple[float, adam_jax.FitResult]:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = {} if every is None else dict(checkpoint_dir=tmp, checkpoint_every=every)
            start = time.perf_counter()
            result = adam_jax.fit_batched(make_regression, inputs, **kw, **ckpt)
            jax.block_until_ready(result)
            elapsed = time.perf_counter() - start
            if every is not None:
                saves[every] = _saves(Path(tmp))
            return elapsed, result

    times = interleaved(run, repeats)
    work = adam_jax.fit_batched(make_regression, inputs, **kw).work
    workload = (
        f"fit_batched: {n} linear regressions (200 samples, 4 weights), float32, Adam, "
        f"target MSE 1.0, at most 5000 steps, {adam_jax.default_slots(n)} lanes, "
        f"{work.computed} lane-steps"
    )
    return {"workload": workload, "repeats": repeats, **summary(times, saves, workload)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--problems", type=int, default=None, help="fit_batched problems")
    parser.add_argument("--quick", action="store_true", help="2,000 steps, 256 problems, 3 rounds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/checkpoint.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 2_000, 3
    n_batched = args.problems or (256 if args.quick else 1024)
    report = {
        **bench_fit(args.steps, args.repeats),
        "fit_batched": bench_batched(n_batched, args.repeats),
        **machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
