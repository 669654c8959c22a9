"""Benchmark: time to first result of a batched sweep, as a notebook user meets it.

Five ways to train N linear regressions of ``benchmarks/bench_fit.py``'s kind
(each with its own data and learning rate, stopping at MSE <= 1, cap 5,000
steps, no loss history):

* ``by_hand``: ``jax.jit(jax.vmap(...))`` of a ``lax.while_loop`` of
  ``optax.adam`` steps, written by hand (``bench_fit.anchor``);
* ``by_hand_elemental``: the same, compiled with the options adam_jax's loops
  use on CPU (``compiler_options={"xla_cpu_use_fusion_emitters": False}``,
  XLA's elemental emitters): what a user who knows the option gets;
* ``vmap_fit``: ``jax.jit(jax.vmap(adam_jax.fit))``;
* ``fit_batched``: ``adam_jax.fit_batched`` with its default lanes;
* ``lanes_by_hand``: the smallest lanes loop written by hand
  (``bench_fit.lanes_by_hand``, as many lanes as ``fit_batched``'s default):
  the bar a lanes engine's first call can reach on this machine.

Each way runs in a FRESH Python process (nothing compiled before): the first
call (tracing, compilation and the run), then, in the same process, the cell
run again with new learning rates and data and a freshly built
``adam_jax.early_stopping(...)``, then once more unchanged (the run alone).
Compile is reported as first call minus the run alone. Three processes per way
and size, interleaved; medians, with the load average before and after.

Usage::

    python benchmarks/bench_first_call.py                 # 512 and 1,024 problems
    python benchmarks/bench_first_call.py --problems 512 --repeats 1

Results go to ``benchmarks/results/first_call.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WAYS = ("by_hand", "by_hand_elemental", "vmap_fit", "fit_batched", "lanes_by_hand")
ELEMENTAL = {"xla_cpu_use_fusion_emitters": False}


def child(way: str, n: int) -> dict:
    """One fresh process: first call, rerun with new values and a fresh rule, plain rerun."""
    t_import = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import adam_jax

    sys.path.insert(0, str(HERE))
    import bench_fit

    imported = time.perf_counter() - t_import
    xs, ys, lrs = bench_fit.problems(n, 3e-3, 0.3)
    first_args = tuple(jnp.asarray(a) for a in (xs, ys, lrs))
    # The cell run again: new learning rates and data of the same shapes.
    new_args = tuple(jnp.asarray(a) for a in (xs[::-1], ys[::-1], lrs * 0.9))
    jax.block_until_ready((first_args, new_args))

    rule = lambda: adam_jax.early_stopping(None, target=1.0)  # built in the cell
    if way in ("by_hand", "by_hand_elemental"):
        run = bench_fit.anchor(5000, 1.0, ELEMENTAL if way == "by_hand_elemental" else None)
        call = lambda args, es: run(*args)
    elif way == "vmap_fit":
        run = bench_fit.vmap_fit(5000, 1.0)
        call = lambda args, es: run(*args)
    elif way == "lanes_by_hand":
        run = bench_fit.lanes_by_hand(5000, 1.0, adam_jax.default_slots(n))
        call = lambda args, es: run(*args)
    else:

        def call(args, es):
            return adam_jax.fit_batched(
                bench_fit.make_problem, args, num_steps=5000, has_aux=True,
                early_stopping=es, history=adam_jax.History.none(),
            )  # fmt: skip

    def timed(args, es) -> tuple[float, object]:
        t = time.perf_counter()
        out = jax.block_until_ready(call(args, es))
        return time.perf_counter() - t, out

    first, out = timed(first_args, rule())
    es = rule()
    rerun, _ = timed(new_args, es)
    run_alone, _ = timed(new_args, es)  # the same rule object: the run alone
    steps = np.asarray(out.num_steps if way in ("vmap_fit", "fit_batched") else out[1])
    return {
        "import_s": imported,
        "first_call_s": first,
        "rerun_new_values_fresh_rule_s": rerun,
        "run_s": run_alone,
        "compile_estimate_s": first - run_alone,
        "total_steps": int(steps.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="512,1024", help="comma-separated sizes")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per way and size")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "first_call.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0

    sizes = [int(k) for k in args.problems.split(",") if k]
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict]]] = {str(n): {w: [] for w in WAYS} for n in sizes}
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    for r in range(args.repeats):
        for n in sizes:
            # Rotated, so load drifts hit all alike.
            order = WAYS[r % len(WAYS) :] + WAYS[: r % len(WAYS)]
            for way in order:
                cmd = [sys.executable, __file__, "--child", way, str(n)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                runs[str(n)][way].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()

    keys = ("first_call_s", "compile_estimate_s", "run_s", "rerun_new_values_fresh_rule_s")
    table: dict[str, dict[str, dict[str, float]]] = {}
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    for n in sizes:
        table[str(n)] = {w: {k: statistics.median(x[k] for x in runs[str(n)][w]) for k in keys}
                         for w in WAYS}  # fmt: skip
        hand = table[str(n)]["by_hand"]
        print(f"{n} problems (medians of {args.repeats} fresh processes; x = / by hand):")
        print(
            f"  {'':17s} {'first call':>16s} {'compile':>8s} {'run':>16s} {'rerun, new rule':>18s}"
        )
        for way in WAYS:
            row = table[str(n)][way]
            x = {k: row[k] / hand[k] for k in keys}
            print(
                f"  {way:17s} {row['first_call_s']:7.2f} s {x['first_call_s']:5.2f}x"
                f" {row['compile_estimate_s']:7.2f}s {row['run_s']:7.3f} s {x['run_s']:5.2f}x"
                f" {row['rerun_new_values_fresh_rule_s']:8.3f} s "
                f"{x['rerun_new_values_fresh_rule_s']:5.2f}x"
            )
    sys.path.insert(0, str(HERE))
    from bench_fit import machine

    out = {
        **machine(),
        "load_average_1min_before_after": [load_before[0], load_after[0]],
        "method": (
            "each way in a fresh process per repetition, ways rotated between repetitions; "
            "first call = trace + compile + run; rerun = same process, new learning rates and "
            "data, a freshly built early_stopping rule; run = the rerun again; "
            "compile estimate = first call - run; medians"
        ),
        "medians": table,
        "runs": runs,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
