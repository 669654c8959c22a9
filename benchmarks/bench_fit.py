"""Benchmark: many small trainings at once: fit_batched, jit(vmap(fit)) and a hand-written loop.

The problems are "Adam from scratch on a linear regression" (200 samples, 4 weights
including the intercept; ``tests/references/linear_regression.py``), stopping at the
first step whose MSE is at most 1.
Each problem has its own data and its own learning rate (log-spaced).

* ``fit``: one ``jax.jit(jax.vmap(...))`` call over a function calling
  ``adam_jax.fit``; every problem stops on its own.
* ``loop``: the usual way, one problem at a time: a jitted optax training step
  called from Python, checking the MSE on the host at every step as the NumPy
  loop does. Only a subset of the problems (spread over the learning rates) is
  timed; the time for all is extrapolated by step count, and the output says so.

* ``anchor``: what a JAX user writes by hand: ``jax.jit(jax.vmap(...))`` of a
  ``lax.while_loop`` of ``optax.adam`` steps in which each problem stops at
  MSE <= 1 and then stays frozen while the others run on.
* ``fit_batched``: ``adam_jax.fit_batched``, the problems streaming through
  lanes refilled as they stop (default lanes and a few other counts).

These three run side by side in one process, their repetitions interleaved
(medians reported), on three workloads: (a) the problems above, each stopping on
its own; (b) every problem taking the same number of steps (no early stopping);
(c) notebook 06's sweep (1,024 runs: learning rate x b2 x data set, cap 2,000).
For each: wall time, compile time, problem-steps computed and needed (under
``vmap`` every problem runs until the slowest stops), the cost per computed
problem-step, and the distance from the limit: the time over the needed steps,
each at the hand-written loop's cost per computed step. No contender keeps
a loss history (``adam_jax.History.none()``), as the hand-written loop keeps none.

Also measured: what ``progress=True, log_every=100`` costs a single fit.

Usage::

    python benchmarks/bench_fit.py            # 1,024 problems, under a minute
    python benchmarks/bench_fit.py --quick    # 128 problems, a few seconds
    python benchmarks/bench_fit.py --only-batched   # the three-way comparison alone
    python benchmarks/bench_fit.py --only-batched --shuffle --out FILE  # problems mixed

Results go to ``benchmarks/results/fit.json``. Times are float32 on the default
JAX device.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from harness.machine import machine_info

import adam_jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from references import linear_regression


def machine() -> dict:
    """The benchmark suite's machine record, plus the load at the start of this run,
    with the versions (and Python's) on their own."""
    info = machine_info()
    versions = {"python": platform.python_version()} | info.pop("versions")
    info["load_average_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"machine": info, "versions": versions}


def problems(n: int, lr_min: float, lr_max: float) -> tuple[np.ndarray, ...]:
    xs, ys = zip(*(linear_regression.data(n=200, seed=k) for k in range(n)), strict=True)
    lrs = np.geomspace(lr_min, lr_max, n)
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.float32), lrs.astype(np.float32)


def fit_one(x, y, lr, num_steps):
    return adam_jax.fit(
        lambda w: linear_regression.loss(w, x, y),
        jnp.zeros((1, x.shape[1]), x.dtype),
        adam_jax.adam(lr),
        num_steps=num_steps,
        has_aux=True,
        early_stopping=adam_jax.early_stopping(None, target=1.0),
    )


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def bench_vmap(xs, ys, lrs, num_steps, repeats):
    batched = jax.jit(jax.vmap(lambda x, y, lr: fit_one(x, y, lr, num_steps)))
    t = time.perf_counter()
    result = jax.block_until_ready(batched(xs, ys, lrs))
    compile_and_first = time.perf_counter() - t
    median, times = timed(lambda: jax.block_until_ready(batched(xs, ys, lrs)), repeats)
    return result, compile_and_first, median, times


def bench_loop(xs, ys, lrs, num_steps, repeats):
    """A Python loop of a jitted optax step per problem, stopping as fit does."""

    @jax.jit
    def step(w, opt_state, x, y, lr):
        (_, mse), g = jax.value_and_grad(linear_regression.loss, has_aux=True)(w, x, y)
        updates, opt_state = optax.adam(lr).update(g, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, mse

    def train(x, y, lr):
        w = jnp.zeros((1, x.shape[1]), jnp.float32)
        opt_state = optax.adam(lr).init(w)
        for i in range(num_steps):
            new_w, new_state, mse = step(w, opt_state, x, y, lr)
            if float(mse) <= 1.0:  # measured at w, before this step's update
                return i
            w, opt_state = new_w, new_state
        return num_steps

    def run_all():
        return [train(x, y, lr) for x, y, lr in zip(xs, ys, lrs, strict=True)]

    xs, ys, lrs = (list(map(jnp.asarray, a)) for a in (xs, ys, lrs))
    train(xs[0], ys[0], lrs[0])  # compile
    steps = run_all()
    median, times = timed(run_all, repeats)
    return steps, median, times


def anchor(num_steps: int, target: float | None, compiler_options: dict | None = None):
    """``jit(vmap(while_loop(optax.adam step)))``; each problem stops at MSE <= target, frozen.

    ``compiler_options`` go to ``jax.jit`` (None: JAX's defaults)."""

    def one(x, y, lr):
        opt = optax.adam(lr)
        w = jnp.zeros((1, x.shape[1]), x.dtype)
        grad = jax.value_and_grad(lambda w: linear_regression.loss(w, x, y), has_aux=True)

        def cond(carry):
            _, _, i, done = carry
            return (i < num_steps) & ~done

        def body(carry):
            w, state, i, _ = carry
            (_, mse), g = grad(w)
            stop = (mse <= target) if target is not None else jnp.bool_(False)
            updates, new_state = opt.update(g, state, w)
            w, state = jax.tree.map(
                lambda old, new: jnp.where(stop, old, new),
                (w, state),
                (optax.apply_updates(w, updates), new_state),
            )
            return w, state, jnp.where(stop, i, i + 1), stop

        w, _, steps, stopped = jax.lax.while_loop(
            cond, body, (w, opt.init(w), jnp.int32(0), jnp.bool_(False))
        )
        return w, steps, stopped

    return jax.jit(jax.vmap(one), compiler_options=compiler_options)


def lanes_by_hand(num_steps: int, target: float, slots: int):
    """The smallest lanes loop written by hand, the bar for ``fit_batched``'s first call.

    ``slots`` problems step at once (``vmap`` of ``anchor``'s optax step); when
    problems stop (MSE <= target, or ``num_steps``), up to ``max(4, slots // 32)``
    of them per iteration write their params and steps by problem number, and
    their lanes take the next queued problems. No narrowed tail, no history,
    no early-stopping object: what a user would write for this one sweep.
    Returns ``(params, steps, stopped)`` in input order, as ``anchor`` does.
    """

    def step(x, y, lr, w, state, i, done):
        grad = jax.value_and_grad(lambda w: linear_regression.loss(w, x, y), has_aux=True)
        (_, mse), g = grad(w)
        stop = done | (mse <= target) | (i >= num_steps)
        updates, new_state = optax.adam(lr).update(g, state, w)
        w, state = jax.tree.map(
            lambda old, new: jnp.where(stop, old, new),
            (w, state),
            (optax.apply_updates(w, updates), new_state),
        )
        return w, state, jnp.where(stop, i, i + 1), stop

    @jax.jit
    def run(xs, ys, lrs):
        n, width = xs.shape[0], min(slots, xs.shape[0])
        k = max(4, width // 32)
        w0 = jnp.zeros((width, 1, xs.shape[2]), xs.dtype)
        first = (xs[:width], ys[:width], lrs[:width], w0, jax.vmap(optax.adam(1.0).init)(w0))
        lanes = (jnp.arange(width), *first, jnp.zeros(width, jnp.int32), jnp.zeros(width, bool))
        out = (jnp.zeros((n + 1, *w0.shape[1:]), xs.dtype), jnp.zeros(n + 1, jnp.int32))

        def swap(c, finished):
            (ids, x, y, lr, w, state, i, done), (out_w, out_i), queue = c
            lane = jnp.sum(jnp.cumsum(finished)[None, :] <= jnp.arange(k)[:, None], axis=1)
            valid, at = lane < width, jnp.minimum(lane, width - 1)
            row = jnp.where(valid, ids[at], n)  # row n: a row for nothing
            out_w, out_i = out_w.at[row].set(w[at]), out_i.at[row].set(i[at])
            queued = queue + jnp.arange(k)
            load = valid & (queued < n)
            to, source = jnp.where(valid, lane, width), jnp.minimum(queued, n - 1)

            def put(a, v):
                return a.at[to].set(v, mode="drop")

            ids = put(ids, jnp.where(load, queued, n))
            x, y, lr = put(x, xs[source]), put(y, ys[source]), put(lr, lrs[source])
            w = put(w, jnp.zeros_like(w[:k]))
            state = jax.tree.map(lambda a: put(a, jnp.zeros_like(a[:k])), state)
            i, done = put(i, jnp.zeros(k, jnp.int32)), put(done, ~load)
            return (ids, x, y, lr, w, state, i, done), (out_w, out_i), queue + jnp.sum(load)

        def body(c):
            (ids, x, y, lr, w, state, i, done), out, queue = c
            w, state, i, done = jax.vmap(step)(x, y, lr, w, state, i, done)
            c = ((ids, x, y, lr, w, state, i, done), out, queue)
            finished = done & (ids < n)
            return jax.lax.cond(jnp.any(finished), swap, lambda c, _: c, c, finished)

        _, (out_w, out_i), _ = jax.lax.while_loop(
            lambda c: jnp.any(c[0][0] < n), body, (lanes, out, jnp.int32(width))
        )
        return out_w[:n], out_i[:n], out_i[:n] < num_steps

    return run


def vmap_fit(num_steps: int, target: float | None):
    def one(x, y, lr):
        return adam_jax.fit(
            lambda w: linear_regression.loss(w, x, y),
            jnp.zeros((1, x.shape[1]), x.dtype),
            adam_jax.adam(lr),
            num_steps=num_steps,
            has_aux=True,
            early_stopping=None if target is None else adam_jax.early_stopping(None, target=target),
            history=adam_jax.History.none(),
        )

    return jax.jit(jax.vmap(one))


def make_problem(p):
    x, y, lr = p
    return (
        (lambda w: linear_regression.loss(w, x, y)),
        jnp.zeros((1, x.shape[1]), x.dtype),
        adam_jax.adam(lr),
    )


def compile_time(jitted, *args) -> dict:
    t = time.perf_counter()
    lowered = jitted.lower(*args)
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    return {"trace_lower_s": t_lower, "compile_s": time.perf_counter() - t}, compiled


def batched_rows(rows: dict, runs: dict, slot_counts, make_problem, inputs, **options) -> None:
    """Add a ``fit_batched`` row (first call, stop steps, work) and its timed call to
    ``rows`` and ``runs`` for each lane count (None: the default), no loss history."""
    n = jax.tree.leaves(inputs)[0].shape[0]
    for slots in slot_counts:
        name = "fit_batched_default" if slots is None else f"fit_batched_{slots}"

        def run(slots=slots):
            return adam_jax.fit_batched(
                make_problem, inputs, slots=slots, history=adam_jax.History.none(), **options
            )

        t = time.perf_counter()
        result = run()
        first = time.perf_counter() - t
        rows[name] = {
            "slots": slots or adam_jax.default_slots(n, options.get("early_stopping") is not None),
            "first_call_s": first,
            "steps": np.asarray(result.num_steps, np.int64),
            "computed": result.work.computed,
            "needed": result.work.needed,
        }
        runs[name] = run


def bench_three_ways(xs, ys, lrs, num_steps, target, slot_counts, repeats) -> dict:
    """The anchor, jit(vmap(fit)) and fit_batched at each lane count, interleaved."""
    n = len(lrs)
    args = tuple(jnp.asarray(a) for a in (xs, ys, lrs))
    es = None if target is None else adam_jax.early_stopping(None, target=target)
    rows: dict[str, dict] = {}
    runs = {}
    for name, build in (("anchor", anchor), ("vmap_fit", vmap_fit)):
        times, compiled = compile_time(build(num_steps, target), *args)
        out = jax.block_until_ready(compiled(*args))
        steps = np.asarray(out[1] if name == "anchor" else out.num_steps, np.int64)
        # Under vmap the loop runs until the slowest problem is done: the last
        # iteration of each loop evaluates the stopping step of the slowest problem.
        iters = int(steps.max()) + (1 if target is not None and steps.max() < num_steps else 0)
        stopped = (steps < num_steps) if target is not None else np.zeros(n, bool)
        if name == "vmap_fit":
            stopped = np.asarray(out.stop_reason) != 0
        rows[name] = {
            **times,
            "steps": steps,
            "computed": n * iters,
            "needed": int(steps.sum() + stopped.sum()),
        }
        runs[name] = lambda c=compiled: jax.block_until_ready(c(*args))
    batched_rows(rows, runs, slot_counts, make_problem, args, num_steps=num_steps,
                 early_stopping=es, has_aux=True)  # fmt: skip
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    reference = rows["anchor"]["steps"]
    for name, row in rows.items():
        row["median_s"] = statistics.median(times[name])
        row["times_s"] = times[name]
    add_costs(rows)
    for row in rows.values():
        row["problem_steps_per_s"] = row["needed"] / row["median_s"]
        row["ratio_to_anchor"] = row["median_s"] / rows["anchor"]["median_s"]
        row["ratio_to_vmap_fit"] = row["median_s"] / rows["vmap_fit"]["median_s"]
        row["stop_step_mismatches_vs_anchor"] = int((row.pop("steps") != reference).sum())
        if "first_call_s" in row:
            row["compile_estimate_s"] = row["first_call_s"] - row["median_s"]
    return rows


def add_costs(rows: dict) -> None:
    """Cost per computed problem-step, and the distance from the limit: the time over the
    needed steps each at the hand-written loop's cost per computed step."""
    anchor_cost = rows["anchor"]["median_s"] / rows["anchor"]["computed"]
    for row in rows.values():
        row["computed_over_needed"] = row["computed"] / row["needed"]
        row["us_per_computed_step"] = 1e6 * row["median_s"] / row["computed"]
        row["distance_from_limit"] = row["median_s"] / (row["needed"] * anchor_cost)


def print_three_ways(title: str, rows: dict) -> None:
    print(title)
    print(
        f"  {'contender':32s} {'median s':>9s} {'/anchor':>8s} {'/vmap':>7s} {'computed':>10s} "
        f"{'needed':>10s} {'comp/need':>9s} {'us/step':>8s} {'distance':>8s} {'compile s':>9s}"
    )
    for name, row in rows.items():
        compile_s = row.get("compile_s", row.get("compile_estimate_s"))
        label = name + (f" ({row['slots']} lanes)" if name == "fit_batched_default" else "")
        print(
            f"  {label:32s} {row['median_s']:9.3f} {row['ratio_to_anchor']:8.3f} "
            f"{row['ratio_to_vmap_fit']:7.3f} {row['computed']:10,d} {row['needed']:10,d} "
            f"{row['computed_over_needed']:9.2f} {row['us_per_computed_step']:8.2f} "
            f"{row['distance_from_limit']:8.2f} {compile_s:9.2f}"
        )


def sweep_inputs() -> dict:
    """Notebook 06's sweep: 16 learning rates x 8 values of b2 x 8 data sets = 1,024 runs."""
    lrs, b2s = (
        np.geomspace(1e-3, 0.5, 16),
        np.array([0.5, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999]),
    )
    lr, b2, k = (a.ravel() for a in np.meshgrid(lrs, b2s, np.arange(8), indexing="ij"))
    xs, ys = [], []
    for i in k:
        rng = np.random.default_rng(int(i))
        x = np.concatenate([np.ones((64, 1)), rng.standard_normal((64, 3))], axis=1)
        xs.append(x)
        ys.append(x @ np.array([4.0, 2.0, -3.0, 1.5]) + 0.5 * rng.standard_normal(64))
    as32 = lambda a: jnp.asarray(np.asarray(a), jnp.float32)
    return {"x": as32(xs), "y": as32(ys), "lr": as32(lr), "b2": as32(b2)}


def sweep_mse(w, x, y):
    return jnp.mean((x @ w - y) ** 2)


def sweep_problem(p):
    loss = lambda w: sweep_mse(w, p["x"], p["y"])
    return loss, jnp.zeros(4, jnp.float32), adam_jax.adam(p["lr"], b2=p["b2"])


def bench_sweep(
    repeats: int, slot_counts: tuple = (None,), num_steps: int = 2_000, target: float = 0.5
) -> dict:
    """Notebook 06's sweep: by hand, jit(vmap(fit)) and fit_batched (default lanes and
    ``slot_counts``), interleaved."""
    inputs = sweep_inputs()
    n = inputs["lr"].shape[0]
    es = adam_jax.early_stopping(None, target=target)

    def by_hand(p):
        opt = optax.adam(p["lr"], b2=p["b2"])
        value_and_grad = jax.value_and_grad(lambda w: sweep_mse(w, p["x"], p["y"]))

        def body(carry):
            w, state, step, _ = carry
            loss, g = value_and_grad(w)
            done = loss <= target
            updates, new_state = opt.update(g, state, w)
            w, state = jax.tree.map(
                lambda old, new: jnp.where(done, old, new), (w, state), (w + updates, new_state)
            )
            return w, state, jnp.where(done, step, step + 1), done

        w = jnp.zeros(4, jnp.float32)
        cond = lambda c: (c[2] < num_steps) & ~c[3]
        return jax.lax.while_loop(cond, body, (w, opt.init(w), 0, False))[2:]

    def with_fit(p):
        loss, w, opt = sweep_problem(p)
        return adam_jax.fit(
            loss, w, opt, num_steps=num_steps, early_stopping=es, history=adam_jax.History.none()
        )

    rows: dict[str, dict] = {}
    runs = {}
    for name, fn in (("anchor", by_hand), ("vmap_fit", with_fit)):
        times, compiled = compile_time(jax.jit(jax.vmap(fn)), inputs)
        out = jax.block_until_ready(compiled(inputs))
        steps = np.asarray(out[0] if name == "anchor" else out.num_steps, np.int64)
        stopped = np.asarray(out[1]) if name == "anchor" else np.asarray(out.stop_reason) != 0
        iters = int(steps.max()) + (1 if steps.max() < num_steps else 0)
        rows[name] = {**times, "computed": n * iters, "needed": int(steps.sum() + stopped.sum())}
        runs[name] = lambda c=compiled: jax.block_until_ready(c(inputs))

    batched_rows(rows, runs, slot_counts, sweep_problem, inputs, num_steps=num_steps,
                 early_stopping=es)  # fmt: skip
    for row in rows.values():
        row.pop("steps", None)
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    for name, row in rows.items():
        row["median_s"] = statistics.median(times[name])
        row["times_s"] = times[name]
    for row in rows.values():
        row["ratio_to_anchor"] = row["median_s"] / rows["anchor"]["median_s"]
        row["ratio_to_vmap_fit"] = row["median_s"] / rows["vmap_fit"]["median_s"]
        if "first_call_s" in row:
            row["compile_estimate_s"] = row["first_call_s"] - row["median_s"]
    add_costs(rows)
    return rows


def bench_progress(num_steps: int, repeats: int) -> dict:
    """One fit with and without ``progress=True, log_every=100``, on two problem sizes."""
    out = {}
    rng = np.random.default_rng(0)
    x1, y1 = (jnp.asarray(a, jnp.float32) for a in linear_regression.data())
    x2 = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    y2 = jnp.asarray(rng.standard_normal((256, 1)), jnp.float32)
    w2 = {
        "w1": jnp.asarray(rng.standard_normal((64, 128)) / 8, jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((128, 1)) / 11, jnp.float32),
    }
    cases = {
        "linear_regression": (
            lambda w: linear_regression.loss(w, x1, y1)[1],
            jnp.zeros((1, 4), jnp.float32),
            num_steps,
        ),
        "mlp_64_128_1_batch_256": (
            lambda p: jnp.mean((jnp.tanh(x2 @ p["w1"]) @ p["w2"] - y2) ** 2),
            w2,
            max(num_steps // 10, 100),
        ),
    }
    opt = adam_jax.adam(1e-3)
    for name, (loss_fn, params, steps) in cases.items():

        def run(loss_fn=loss_fn, params=params, steps=steps, **kw):
            return jax.block_until_ready(adam_jax.fit(loss_fn, params, opt, num_steps=steps, **kw))

        row = {"num_steps": steps}
        variants = {"plain": {}, "progress_log100": dict(progress=True, log_every=100)}
        times = {label: [] for label in variants}
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            for kw in variants.values():
                run(**kw)  # compile
            # Interleaved, so that a change in the machine's load hits both alike.
            for _ in range(max(repeats, 7)):
                for label, kw in variants.items():
                    times[label].append(timed(lambda kw=kw: run(**kw), 1)[0])
        for label, ts in times.items():
            row[label + "_median_s"] = statistics.median(ts)
            row[label + "_min_s"] = min(ts)
        row["us_per_step"] = 1e6 * row["plain_min_s"] / steps
        row["overhead_median"] = row["progress_log100_median_s"] / row["plain_median_s"] - 1
        row["overhead_min"] = row["progress_log100_min_s"] / row["plain_min_s"] - 1
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 problems, fewer repeats")
    parser.add_argument(
        "--problems", type=int, default=None, help="default 1024 (128 with --quick)"
    )
    parser.add_argument(
        "--loop-problems",
        type=int,
        default=None,
        help="problems timed in the Python loop, extrapolated to all (default 64; 16 with --quick)",
    )
    parser.add_argument("--num-steps", type=int, default=5000, help="step cap per problem")
    parser.add_argument("--lr-min", type=float, default=3e-3, help="smallest learning rate")
    parser.add_argument("--lr-max", type=float, default=0.3, help="largest learning rate")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument(
        "--same-steps", type=int, default=500, help="steps of every problem in workload (b)"
    )
    parser.add_argument(
        "--slots",
        default="64,128,512,1024",
        help="lane counts for fit_batched besides the default (comma-separated)",
    )
    parser.add_argument(
        "--shuffle",
        action="store_true",
        help="the problems in a random order (seed 0), not by learning rate",
    )
    parser.add_argument(
        "--only-batched",
        action="store_true",
        help="the three-way comparison alone (no Python loop, no progress overhead)",
    )
    parser.add_argument(
        "--only-sweep", action="store_true", help="notebook 06's sweep alone (workload c)"
    )
    parser.add_argument(
        "--no-sweep", action="store_true", help="without notebook 06's sweep (workload c)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit.json"))
    args = parser.parse_args(argv)

    n = args.problems or (128 if args.quick else 1024)
    n_loop = min(n, args.loop_problems or (16 if args.quick else 64))
    repeats = args.repeats or (2 if args.quick else 5)
    xs, ys, lrs = problems(n, args.lr_min, args.lr_max)
    if args.shuffle:  # long and short problems mixed, as a sweep's grid may come
        order = np.random.default_rng(0).permutation(n)
        xs, ys, lrs = xs[order], ys[order], lrs[order]

    info = machine()
    print(
        f"machine: {info['machine']['cpu']}, {info['machine']['cores']} cores "
        f"({info['machine']['usable_cores']} usable), load {info['machine']['load_average_1min']}, "
        f"devices {info['machine']['jax_devices']}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(
        f"{n} linear regressions, learning rates {lrs.min():.3g}..{lrs.max():.3g}"
        f"{' (shuffled)' if args.shuffle else ''}, float32, "
        f"stop at MSE <= 1, at most {args.num_steps} steps"
    )
    slot_counts = [None, *sorted({min(n, int(k)) for k in args.slots.split(",") if k})]
    if args.only_sweep:
        sweep = bench_sweep(repeats, tuple(slot_counts))
        print_three_ways("(c) notebook 06's sweep: 1,024 runs, MSE <= 0.5, cap 2,000:", sweep)
        return _write({**info, "repeats": repeats, "notebook_06_sweep": sweep}, args.out)
    early = bench_three_ways(xs, ys, lrs, args.num_steps, 1.0, slot_counts, repeats)
    print_three_ways(f"(a) {n} problems, each stopping at MSE <= 1 (cap {args.num_steps}):", early)
    same = bench_three_ways(xs, ys, lrs, args.same_steps, None, [None], repeats)
    print_three_ways(f"(b) {n} problems, {args.same_steps} steps each (no early stopping):", same)
    batched: dict = {}
    if not args.no_sweep:
        batched["notebook_06_sweep"] = sweep = bench_sweep(repeats, tuple(slot_counts))
        print_three_ways(
            "(c) notebook 06's sweep: 1,024 runs (learning rate x b2 x data set), MSE <= 0.5, "
            "cap 2,000:",
            sweep,
        )
    batched |= {
        "early_stopping": {"num_steps_cap": args.num_steps, "target_mse": 1.0, **early},
        "same_steps": {"num_steps": args.same_steps, **same},
        "method": (
            "one process; repetitions interleaved with a rotating order; medians; "
            "jitted contenders compiled ahead (trace+lower and compile timed), fit_batched's "
            "compile estimated as first call minus median; no loss history kept; "
            "distance from the limit = time / (needed steps x the anchor's time per computed step)"
        ),
    }
    out = {
        **info,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "problems": n,
        "learning_rates": [float(lrs.min()), float(lrs.max())],
        "shuffled": args.shuffle,
        "dtype": "float32",
        "repeats": repeats,
        "batched": batched,
    }
    if args.only_batched:
        return _write(out, args.out)

    result, first, t_vmap, vmap_times = bench_vmap(xs, ys, lrs, args.num_steps, repeats)
    steps_fit = np.asarray(result.num_steps)
    print(
        f"jit(vmap(fit)): median {t_vmap:.3f} s over {repeats} runs "
        f"(first call with compilation {first:.2f} s); "
        f"steps per problem {steps_fit.min()}..{steps_fit.max()}, total {steps_fit.sum()}"
    )

    # Every (n / n_loop)-th problem, so the subset spans the learning rates.
    subset = np.linspace(0, n - 1, n_loop).round().astype(int)
    steps_loop, t_loop_subset, loop_times = bench_loop(
        xs[subset], ys[subset], lrs[subset], args.num_steps, max(1, repeats // 2)
    )
    # Extrapolate by steps: the loop's cost is per step, and the subset's share
    # of all steps (taken from fit's counts) is known exactly.
    share = steps_fit[subset].sum() / steps_fit.sum()
    t_loop = t_loop_subset / share
    mismatches = int((np.asarray(steps_loop) != steps_fit[subset]).sum())
    extrapolated = n_loop < n
    print(
        f"python loop of a jitted optax step: median {t_loop_subset:.3f} s for {n_loop} "
        f"problems ({int(steps_fit[subset].sum())} steps, "
        f"{1e6 * t_loop_subset / max(1, steps_fit[subset].sum()):.1f} us/step)"
        + (f"; extrapolated by step count to all {n}: {t_loop:.2f} s" if extrapolated else "")
    )
    if mismatches:
        print(
            f"  note: {mismatches} of {n_loop} problems stopped at a different step in the "
            "loop than in fit (float32 rounding near MSE = 1)"
        )
    ratio = t_loop / t_vmap
    useful = steps_fit.sum() / (n * (steps_fit.max() + 1))
    print(
        f"  under vmap every problem runs until the last one stops: {n} x "
        f"{steps_fit.max() + 1} steps computed, {100 * useful:.0f}% of them needed; "
        f"{1e9 * t_vmap / (n * (steps_fit.max() + 1)):.0f} ns per problem-step"
    )
    print(f"speed-up of jit(vmap(fit)) over the python loop: {ratio:.0f}x (goal >= 100x)")

    progress = bench_progress(num_steps=20_000 if not args.quick else 5_000, repeats=repeats)
    for name, row in progress.items():
        print(
            f"progress=True, log_every=100 on {name} ({row['us_per_step']:.1f} us/step, "
            f"{row['num_steps']} steps): median {row['plain_median_s']:.3f} s -> "
            f"{row['progress_log100_median_s']:.3f} s ({100 * row['overhead_median']:+.1f}%), "
            f"min {row['plain_min_s']:.3f} s -> {row['progress_log100_min_s']:.3f} s "
            f"({100 * row['overhead_min']:+.1f}%)"
        )

    out |= {
        "num_steps_cap": args.num_steps,
        "vmap_fit": {
            "median_s": t_vmap,
            "times_s": vmap_times,
            "first_call_with_compile_s": first,
            "steps_min": int(steps_fit.min()),
            "steps_max": int(steps_fit.max()),
            "steps_total": int(steps_fit.sum()),
            "share_of_computed_steps_needed": float(useful),
        },
        "python_loop": {
            "problems_timed": n_loop,
            "median_s_timed": t_loop_subset,
            "times_s_timed": loop_times,
            "extrapolated": extrapolated,
            "extrapolation": "by step count: timed subset / (its share of fit's total steps)",
            "median_s_all": t_loop,
            "stop_step_mismatches": mismatches,
        },
        "ratio": ratio,
        "progress_overhead": progress,
    }
    return _write(out, args.out)


def _write(out: dict, path: str) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
