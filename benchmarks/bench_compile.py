"""Trace, lowering and compile time of a many-leaf optimizer step, and its run time,
side by side with optax in one process.

The step is ``opt.update`` then ``optax.apply_updates`` under ``jax.jit`` (the optimizer
closed over, as most users write it), on ``--leaves`` float32 leaves of ``--size``
elements. Each repetition jits a fresh function, so nothing is reused from the last
one except JAX's caches of its own small helpers (one warm-up repetition fills them).
Reported: medians over ``--reps`` repetitions of trace (``jit(...).trace``), lowering
(``.lower()``) and compile (``.compile()``), the median time of one step, and the ratio
ours/optax of each. Ours and optax's repetitions (and steps) alternate, so a change in
the machine's load falls on both. A last case runs one leaf of 2**24 elements (step time only).

Usage::

    python benchmarks/bench_compile.py            # 1,000 leaves x 4,096, a few minutes
    python benchmarks/bench_compile.py --quick    # 100 leaves, well under a minute

Results go to ``benchmarks/results/compile.json`` (``compile-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import adam_jax

PAIRS = {
    "adam": (lambda: adam_jax.adam(1e-3), lambda: optax.adam(1e-3)),
    "amsgrad": (
        lambda: adam_jax.amsgrad(1e-3, max_of="corrected"),
        lambda: optax.amsgrad(1e-3),
    ),
    "adamax": (
        lambda: adam_jax.adamax(2e-3, eps_in_max=True),
        lambda: optax.adamax(2e-3),
    ),
}


def machine() -> dict[str, object]:
    import jaxlib

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "adam_jax": adam_jax.__version__,
        "device": str(jax.devices()[0].device_kind),
    }


def tree(n_leaves: int, size: int, value: float) -> dict[str, jax.Array]:
    return {f"w{i}": jnp.full(size, value + i, jnp.float32) for i in range(n_leaves)}


def make_step(opt: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def build_times(opt, params, state, grads) -> tuple[dict[str, float], object]:
    step = jax.jit(make_step(opt))
    t0 = time.perf_counter()
    traced = step.trace(params, state, grads)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2}, compiled


def step_time(compiled, params, state, grads) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, state, grads))
    return time.perf_counter() - t0


def measure(
    makes, n_leaves: int, size: int, reps: int, step_repeats: int
) -> list[dict[str, float]]:
    """Build and step times for each of ``makes``, their repetitions interleaved so
    that a change in the machine's load falls on all of them alike."""
    params, grads = tree(n_leaves, size, 0.5), tree(n_leaves, size, -0.25)
    states = [make().init(params) for make in makes]
    for make, state in zip(makes, states, strict=True):
        build_times(make(), params, state, grads)  # warm-up: JAX's own helper caches
    runs: list[list[dict[str, float]]] = [[] for _ in makes]
    compiled: list[object] = [None for _ in makes]
    for _ in range(reps):
        for i, (make, state) in enumerate(zip(makes, states, strict=True)):
            times, compiled[i] = build_times(make(), params, state, grads)
            runs[i].append(times)
    steps: list[list[float]] = [[] for _ in makes]
    for i, state in enumerate(states):
        jax.block_until_ready(compiled[i](params, state, grads))  # type: ignore[operator]
    for _ in range(step_repeats):
        for i, state in enumerate(states):
            steps[i].append(step_time(compiled[i], params, state, grads))
    results = []
    for i in range(len(makes)):
        result = {k: statistics.median(r[k] for r in runs[i]) for k in runs[i][0]}
        result["build_s"] = result["trace_s"] + result["lower_s"] + result["compile_s"]
        result["step_s"] = statistics.median(steps[i])
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 leaves, 2 repetitions")
    parser.add_argument("--leaves", type=int, default=None)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", choices=list(PAIRS), default=None, help="one optimizer")
    args = parser.parse_args(argv)
    n_leaves = args.leaves or (100 if args.quick else 1000)
    reps = args.reps or (2 if args.quick else 3)
    out = args.out or Path(__file__).parent / "results" / (
        "compile-quick.json" if args.quick else "compile.json"
    )

    report: dict[str, object] = {
        "machine": machine(),
        "leaves": n_leaves,
        "size": args.size,
        "reps": reps,
        "cases": {},
    }
    keys = ("trace_s", "lower_s", "compile_s", "build_s", "step_s")
    print(f"{n_leaves} leaves x {args.size} float32, medians of {reps}")
    print(f"{'case':<18}" + "".join(f"{k:>12}" for k in keys))
    pairs = {k: v for k, v in PAIRS.items() if args.only in (None, k)}
    for name, (ours, theirs) in pairs.items():
        a, b = measure((ours, theirs), n_leaves, args.size, reps, 20)
        ratio = {k: a[k] / b[k] for k in keys}
        report["cases"][name] = {"adam_jax": a, "optax": b, "ratio": ratio}  # type: ignore[index]
        for label, row in (("adam_jax", a), ("optax", b)):
            print(f"{name + ' ' + label:<18}" + "".join(f"{row[k]:>12.4f}" for k in keys))
        print(f"{name + ' ratio':<18}" + "".join(f"{ratio[k]:>12.2f}" for k in keys))

    big = 2**20 if args.quick else 2**24
    for name, (ours, theirs) in pairs.items():
        a, b = (r["step_s"] for r in measure((ours, theirs), 1, big, 1, 10))
        report["cases"][f"{name}-one-leaf-{big}"] = {  # type: ignore[index]
            "adam_jax": {"step_s": a},
            "optax": {"step_s": b},
            "ratio": {"step_s": a / b},
        }
        print(f"{name} one leaf of {big}: step {a:.5f}s vs optax {b:.5f}s, ratio {a / b:.2f}")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
