"""Benchmark: the first call of ``jax.jit(jax.vmap(fit))`` against the same loop written by hand.

What a notebook user meets: a fresh Python process, one call (trace, compile and
run), then the same cell again with new learning rates and a freshly built
early-stopping rule. The workload is ``bench_fit.py``'s: linear regressions
(200 samples, 4 weights), each with its own data and learning rate (log-spaced
from 3e-3 to 0.3), Adam, stopping at the first step whose MSE is at most 1,
at most 5,000 steps, float32.

* ``hand``: ``jax.jit(jax.vmap(...))`` of a ``lax.while_loop`` of ``optax.adam``
  steps that stops at MSE <= 1 (``bench_fit.anchor``), what one writes by hand.
* ``fit``: ``jax.jit(jax.vmap(...))`` of a function calling ``adam_jax.fit``
  with ``adam_jax.early_stopping(None, target=1.0)``, as a new user writes it
  (default history).

Each measurement is a fresh process (``--child``); the ways alternate, and the
medians of the repetitions are reported. With ``--cache`` the processes use
JAX's persistent compilation cache (``adam_jax.enable_compilation_cache``) in a
new directory: the first process of each way fills it (cold), the next ones
read it (warm), as a restarted notebook would.

Usage::

    python benchmarks/bench_fit_compile.py             # 512 problems, 3 repetitions
    python benchmarks/bench_fit_compile.py --cache     # cold against warm cache
    python benchmarks/bench_fit_compile.py -n 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WAYS = ("hand", "fit")
FIELDS = ("trace_lower_s", "compile_s", "run_s", "first_call_s", "second_call_s")


def child(way: str, n: int, cache: str | None) -> dict:
    t0 = time.perf_counter()
    import jax
    import numpy as np

    import adam_jax

    if cache is not None:
        adam_jax.enable_compilation_cache(cache)
    sys.path.insert(0, str(HERE))
    import bench_fit

    t_import = time.perf_counter() - t0
    xs, ys, lrs = bench_fit.problems(n, 3e-3, 0.3)
    if way == "hand":
        f = bench_fit.anchor(5_000, 1.0)
    else:

        def one(x, y, lr):
            return adam_jax.fit(
                lambda w: bench_fit.linear_regression.loss(w, x, y),
                jax.numpy.zeros((1, x.shape[1]), x.dtype),
                adam_jax.adam(lr),
                num_steps=5_000,
                has_aux=True,
                early_stopping=adam_jax.early_stopping(None, target=1.0),
            )

        f = jax.jit(jax.vmap(one))
    t = time.perf_counter()
    lowered = f.lower(xs, ys, lrs)
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t
    t = time.perf_counter()
    first = jax.block_until_ready(compiled(xs, ys, lrs))
    t_run = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(compiled(xs, ys, lrs * np.float32(0.9)))
    t_again = time.perf_counter() - t
    steps = first[1] if way == "hand" else first.num_steps
    return {
        "way": way,
        "import_s": t_import,
        "trace_lower_s": t_lower,
        "compile_s": t_compile,
        "run_s": t_run,
        "first_call_s": t_lower + t_compile + t_run,
        "second_call_s": t_again,
        "max_steps": int(np.max(steps)),
    }


def run_child(way: str, n: int, cache: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", way, "-n", str(n)]
    if cache is not None:
        cmd += ["--cache-dir", cache]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", action="store_true", help="cold against warm persistent cache")
    parser.add_argument("--child", choices=WAYS)
    parser.add_argument("--cache-dir")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.cache_dir)))
        return
    import jax

    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.2f}, {args.n} problems",
        flush=True,
    )
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats + (1 if args.cache else 0)):
            for way in WAYS:
                cache = os.path.join(tmp, way) if args.cache else None
                key = way if not args.cache else (f"{way} cold" if rep == 0 else f"{way} warm")
                r = run_child(way, args.n, cache)
                runs.setdefault(key, []).append(r)
                print(f"  {key:10s} " + ", ".join(f"{f} {r[f]:.2f}" for f in FIELDS), flush=True)
    print(f"load {os.getloadavg()[0]:.2f} at the end")
    med = {k: {f: statistics.median(r[f] for r in v) for f in FIELDS} for k, v in runs.items()}
    print(f"medians (s) of {args.repeats} fresh processes:")
    for k, m in med.items():
        print(f"{k:10s} " + "  ".join(f"{f} {m[f]:.2f}" for f in FIELDS))
    if not args.cache:
        for f in ("trace_lower_s", "compile_s", "first_call_s"):
            print(f"fit / hand, {f}: {med['fit'][f] / med['hand'][f]:.2f}x")


if __name__ == "__main__":
    main()
