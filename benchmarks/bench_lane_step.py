"""Benchmark: where a batched iteration's time goes, layer by layer, at 128, 256 and 1,024 lanes.

The problem is notebook 06's (a 4-weight linear regression on 64 samples, Adam with its
own learning rate and b2; ``bench_fit.sweep_problem``). Each row adds one layer to the
one before and reports the cost per problem-step (time / (lanes x steps)), all rows
side by side in one process, their repetitions interleaved (medians):

* ``grad``: a hand-written ``jit(vmap(fori_loop))`` of the loss, its gradient and a
  plain ``p - lr * g`` update;
* ``+adam``: the update is ``optax.adam``'s;
* ``+stop_rule``: an ``adam_jax.early_stopping`` rule (one that never stops) is updated
  every step, and a stopped problem's params and state are frozen (a select), as a
  hand-written loop with early stopping does;
* ``fit``: ``jit(vmap(adam_jax.fit))`` with the same rule and no history (fit's loop:
  step counters, the finite check of the gradient, the stop bookkeeping);
* ``fit+history``: the same, keeping every value (``History.every(1, max_len=1_000)``,
  ``fit_batched``'s default);
* ``lanes``: ``fit_batched`` with that many lanes on 4x as many problems (at most
  1,024) that all take the same number of steps: lanes refill once every ``steps``
  iterations; the cost is per lane-step computed;
* ``lanes_staggered``: ``fit_batched`` on notebook 06's sweep with its real stop
  (MSE <= 0.5, cap 2,000), each problem stopping on its own, so lanes are handed over
  and refilled on most iterations; the cost is per lane-step computed;
* ``lanes_staggered+history``: the same with ``fit_batched``'s default history (the
  first 1,000 values of each problem).

The difference between two rows is what that layer costs. Usage::

    python benchmarks/bench_lane_step.py [--steps 500] [--repeats 7] [--out FILE]

Results go to ``benchmarks/results/lane_step.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from bench_fit import machine, sweep_inputs, sweep_mse, sweep_problem

import adam_jax

NEVER = adam_jax.early_stopping(None, target=-1.0)  # an MSE is never below -1
NO_HISTORY = adam_jax.History.none()
DEFAULT_HISTORY = adam_jax.History.every(1, max_len=1_000)  # fit_batched's
WIDTHS = (128, 256, 1024)


def take(tree: dict, n: int) -> dict:
    return jax.tree.map(lambda x: x[:n], tree)


def by_hand(steps: int, layer: str):
    """A hand-written ``jit(vmap(fori_loop))`` up to ``layer`` (grad, +adam, +stop_rule)."""

    def one(p):
        value_and_grad = jax.value_and_grad(lambda w: sweep_mse(w, p["x"], p["y"]))
        opt = optax.adam(p["lr"], b2=p["b2"])
        w = jnp.zeros(4, jnp.float32)

        def body(_, carry):
            w, state, es = carry
            loss, g = value_and_grad(w)
            if layer == "grad":
                return w - p["lr"] * g, state, es
            updates, new_state = opt.update(g, state, w)
            new = (w + updates, new_state)
            if layer == "+adam":
                return (*new, es)
            es = NEVER.update(es, loss, w)
            w, state = jax.tree.map(
                lambda old, n: jnp.where(es.should_stop, old, n), (w, state), new
            )
            return w, state, es

        return jax.lax.fori_loop(0, steps, body, (w, opt.init(w), NEVER.init(w)))[0]

    return jax.jit(jax.vmap(one))


def with_fit(steps: int, history: adam_jax.History):
    def one(p):
        loss, w, opt = sweep_problem(p)
        return adam_jax.fit(
            loss, w, opt, num_steps=steps, early_stopping=NEVER, history=history
        ).params

    return jax.jit(jax.vmap(one))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument(
        "--problems", type=int, default=1024, help="runs of the sweep in lanes_staggered"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lane_step.json"))
    args = parser.parse_args(argv)
    sweep = take(sweep_inputs(), args.problems)
    steps = args.steps
    runs: dict[str, tuple] = {}  # name -> (callable, problem-steps computed)
    for width in args.widths:
        inputs = take(sweep, width)
        for layer in ("grad", "+adam", "+stop_rule"):
            f = by_hand(steps, layer)
            runs[f"{width}/{layer}"] = (lambda f=f, x=inputs: f(x), width * steps)
        for name, history in (
            ("fit", NO_HISTORY),
            ("fit+history", DEFAULT_HISTORY),
        ):
            f = with_fit(steps, history)
            runs[f"{width}/{name}"] = (lambda f=f, x=inputs: f(x), width * steps)

        n = min(4 * width, args.problems)

        def lanes(width=width, n=n):
            return adam_jax.fit_batched(
                sweep_problem, take(sweep, n), num_steps=steps, slots=width,
                early_stopping=NEVER, history=NO_HISTORY,
            )  # fmt: skip

        def staggered(width=width, history=NO_HISTORY):
            return adam_jax.fit_batched(
                sweep_problem, sweep, num_steps=2_000, slots=width,
                early_stopping=adam_jax.early_stopping(None, target=0.5), history=history,
            )  # fmt: skip

        def staggered_history(width=width):
            return staggered(width, DEFAULT_HISTORY)

        for name, fn in (
            ("lanes", lanes),
            ("lanes_staggered", staggered),
            ("lanes_staggered+history", staggered_history),
        ):
            work = jax.block_until_ready(fn()).work
            runs[f"{width}/{name}"] = (fn, work.computed)
    for fn, _ in runs.values():  # compile and warm up
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            jax.block_until_ready(runs[name][0]())
            times[name].append(time.perf_counter() - t)
    rows = {}
    for name, (_, computed) in runs.items():
        median = statistics.median(times[name])
        rows[name] = {
            "median_s": median,
            "computed": computed,
            "us_per_step": 1e6 * median / computed,
        }
    print(f"{'lanes/layer':28s} {'median s':>9s} {'steps':>10s} {'us/step':>8s} {'layer us':>9s}")
    previous = None
    for name, row in rows.items():
        width = name.split("/")[0]
        step = row["us_per_step"]
        delta = "" if previous is None or previous[0] != width else f"{step - previous[1]:+9.3f}"
        print(f"{name:28s} {row['median_s']:9.3f} {row['computed']:10,d} {step:8.3f} {delta:>9s}")
        previous = (width, step)
    out = {**machine(), "steps": steps, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
