"""Benchmark of one optimizer step against optax, torch.optim and a bandwidth floor.

Usage::

    python benchmarks/bench_update.py            # full run, a few minutes
    python benchmarks/bench_update.py --quick    # smaller sizes, under a minute
    python benchmarks/bench_update.py --help

The tables go to the terminal, with each goal marked met or missed; ``--out FILE``
also writes the whole run as JSON (``benchmarks/results/update.json`` is the committed
full run, written with ``--out benchmarks/results/update.json``).

An Adam step is a memory-bound pass over the parameters: it reads p, g, m and v and
writes p, m and v (28 bytes per float32 parameter; 36 for AMSGrad's extra ``v_max``).
This module times the step a user writes -- ``opt.update`` then
``optax.apply_updates`` inside ``jax.jit`` with params and state donated -- against:

* the optax optimizer with the same math (``optax.adam``; ``optax.amsgrad``, which is
  our ``max_of="corrected"``; ``optax.adamax``, our ``eps_in_max=True``; ``optax.nadam``,
  our ``momentum_decay=inf``; ``optax.radam``, our ``form="optax"``), one entry a
  family in ``harness.cases.FAMILIES``;
* ``torch.optim`` (``fused=True`` and ``foreach=True``) when torch is installed;
* a bandwidth floor measured in the same run: the fastest in-place read-modify-write
  of an array holding as many bytes as the step reads plus writes, from JAX, NumPy and
  torch.

Cases:

* ``one_leaf``: one leaf of 2^24 float32 (``--one-leaf-log2``);
* ``many_leaves``: 1,000 leaves of 4,096 float32; compile time reported separately;
* ``vmap``: one ``jit(vmap(step))`` over 1,024 small problems against a Python loop of
  per-problem jitted optax steps (the loop is timed over ``--loop-subset`` problems
  and extrapolated linearly, which the output says);
* ``bf16``: ``mu_dtype=nu_dtype=bfloat16`` moments on the one-leaf problem.

Method: one process; every contender is compiled and run twice before timing; then
the contenders run interleaved (the order rotates every round), each call is timed
to ``block_until_ready``, and the median of ``--reps`` (>= 10 by default) is
reported. JAX steps are ahead-of-time compiled once, so compile time is measured on
its own (trace + lower, then XLA compile) and never enters a step time. The machine
is usually shared: read the ratios, which come from the same interleaved rounds,
rather than the absolute times.

torch runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set: with
spinning OpenMP threads next to XLA's thread pool on a two-core machine, a fused
step over many leaves stalls for seconds. With bfloat16 moments the step is also
timed compiled with ``xla_cpu_copy_insertion_use_region_analysis``, which lets XLA
update the donated moments in place instead of copying them first.

Besides the times, every compiled JAX step is inspected: the number of kernels
(fusions and copies) over parameter-sized arrays, the bytes they move per parameter
according to the optimized HLO, and XLA's own buffer accounting (temporary bytes, and
the peak = arguments + outputs - donated aliases + temporaries).

The pieces live in ``harness/``: ``cases`` (optimizers, contenders, cases), ``hlo``
(HLO and memory accounting), ``machine`` and ``report`` (the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.cases import (
    FAMILIES,
    Settings,
    case_many_leaves,
    case_one_leaf,
    case_vmap,
    have_torch,
)
from harness.machine import loadavg, machine_env, machine_info
from harness.report import format_report, table

CASES = ("one_leaf", "many_leaves", "vmap", "bf16")
OPTIMIZERS = tuple(FAMILIES)  # every family of the library, one entry each in FAMILIES
GOALS = {
    "one_leaf": "adam_jax <= 0.8x optax and <= 1.0x torch fused",
    "many_leaves": "compile <= 0.2x optax; step <= 0.8x optax",
    "vmap": ">= 100x faster than a Python loop of per-problem optax steps",
    "bf16": "state bytes halved; peak <= params + grads + state + 10%",
}


def _at_most(value: float | None, bound: float) -> tuple[str, bool | None]:
    return ("-", None) if value is None else (f"{value:.2f}x", value <= bound)


def _goal_checks(row: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """(goal, measured, met) for each goal of the row's case; met is None where not measured."""
    r = row.get("ratios", {})
    case = row["case"]
    if case == "one_leaf":
        return [
            ("adam_jax <= 0.8x optax", *_at_most(r.get("adam_jax/optax"), 0.8)),
            ("adam_jax <= 1.0x torch fused", *_at_most(r.get("adam_jax/torch_fused"), 1.0)),
        ]
    if case == "many_leaves":
        c = row["compile"]
        return [
            ("compile <= 0.2x optax", *_at_most(c.get("ratio_trace_plus_compile"), 0.2)),
            ("step <= 0.8x optax", *_at_most(r.get("adam_jax/optax"), 0.8)),
        ]
    if case == "vmap":
        speedup = r.get("optax_python_loop/adam_jax")
        shown = "-" if speedup is None else f"{speedup:.0f}x"
        return [(">= 100x a Python loop of optax steps", shown, speedup and speedup >= 100)]
    if case == "bf16":
        ours = row["results"]["adam_jax"]
        full = [
            x["results"]["adam_jax"]["state_bytes"]
            for x in rows
            if x["case"] == "one_leaf" and x["optimizer"] == row["optimizer"]
        ]
        share = None if not full else ours["state_bytes"] / full[0]
        # + 64 bytes: the step count, which stays int32.
        halved = (
            ("-", None)
            if not full
            else (f"{share:.2f}x", ours["state_bytes"] <= 0.5 * full[0] + 64)
        )
        peak = row["memory"]["adam_jax"]["peak/budget"]
        return [
            ("state bytes <= 0.5x float32's", *halved),
            ("peak <= 1.1x params + grads + state", f"{peak:.2f}x", peak <= 1.1),
        ]
    return []


def check_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of every row, measured, with whether it holds."""
    return [
        {"case": row["case"], "optimizer": row["optimizer"], "goal": goal, "measured": m,
         "met": None if met is None else bool(met)}
        for row in report["cases"]
        for goal, m, met in _goal_checks(row, report["cases"])
    ]  # fmt: skip


def format_goals(results: list[dict[str, Any]]) -> str:
    word = {True: "met", False: "MISSED", None: "not measured"}
    rows = [[g["case"], g["optimizer"], g["goal"], g["measured"], word[g["met"]]] for g in results]
    met = sum(g["met"] is True for g in results)
    missed = sum(g["met"] is False for g in results)
    return "\n".join(
        [
            f"Goals: {met} met, {missed} missed",
            table(["case", "optimizer", "goal", "measured", ""], rows),
        ]
    )


FULL = Settings(24, 1000, 4096, 1024, (8, 8), 128, 15, 2)
QUICK = Settings(22, 200, 4096, 1024, (8, 8), 32, 10, 2)


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_update.py",
        description=(
            "Time one user-style optimizer step (update + optax.apply_updates, jitted, "
            "donated) against optax, torch.optim and a bandwidth floor."
        ),
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs (< 1 min)")
    p.add_argument(
        "--cases",
        type=_csv(CASES),
        default=list(CASES),
        help=f"comma-separated, from {','.join(CASES)} (default: all)",
    )
    p.add_argument(
        "--optimizers",
        type=_csv(OPTIMIZERS),
        default=list(OPTIMIZERS),
        help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: all)",
    )
    p.add_argument("--reps", type=int, help="timed runs per contender (median reported)")
    p.add_argument("--warmup", type=int, help="untimed runs per contender first")
    p.add_argument("--one-leaf-log2", type=int, help="one_leaf/bf16 size is 2**N (full: 24)")
    p.add_argument("--leaves", type=int, help="number of leaves in many_leaves (full: 1000)")
    p.add_argument("--leaf-size", type=int, help="elements per leaf in many_leaves (4096)")
    p.add_argument("--batch", type=int, help="problems in the vmap case (1024)")
    p.add_argument("--loop-subset", type=int, help="problems timed in the Python loop")
    p.add_argument("--no-torch", action="store_true", help="leave torch out even if installed")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="also write the whole run, goals included, as JSON to FILE (default: none)",
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    over = {
        "one_leaf_log2": args.one_leaf_log2,
        "leaves": args.leaves,
        "leaf_size": args.leaf_size,
        "batch": args.batch,
        "loop_subset": args.loop_subset,
        "reps": args.reps,
        "warmup": args.warmup,
    }
    s = dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})
    for k in ("leaves", "leaf_size", "batch", "loop_subset", "reps"):
        if getattr(s, k) < 1:
            raise SystemExit(f"bench_update.py: --{k.replace('_', '-')} must be >= 1")
    if s.warmup < 1:
        raise SystemExit("bench_update.py: --warmup must be >= 1 (the first call compiles)")
    return s


def run(
    settings: Settings,
    cases: list[str],
    optimizers: list[str],
    with_torch: bool,
    quick: bool,
    argv: list[str],
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "schema": 1,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": argv,
        "quick": quick,
        "machine": machine_info(),
        "load_average_before": loadavg(),
        "settings": dataclasses.asdict(settings),
        "method": (
            "one process; warm-up runs first; contenders interleaved with a rotating order; "
            "each run timed to block_until_ready; median reported; JAX steps compiled ahead "
            "of time (compile time separate); floor = fastest in-place read-modify-write "
            "moving the step's bytes (JAX, NumPy, torch)"
        ),
        "goals": GOALS,
        "cases": [],
    }
    fns = {
        "one_leaf": lambda o: case_one_leaf(o, settings, with_torch),
        "many_leaves": lambda o: case_many_leaves(o, settings, with_torch),
        "vmap": lambda o: case_vmap(o, settings, with_torch),
        "bf16": lambda o: case_one_leaf(o, settings, with_torch, bf16=True),
    }
    t0 = time.perf_counter()
    for case in cases:
        for name in optimizers:
            print(f"  {case} / {name} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            row = fns[case](name)
            row["wall_s"] = round(time.perf_counter() - t, 2)
            report["cases"].append(row)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["load_average"] = loadavg()
    report["goal_results"] = check_goals(report)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    if not args.no_torch and "torch" not in sys.modules:
        # torch's OpenMP threads spin between parallel regions by default. Next to
        # XLA's thread pool on a machine with few cores, a fused step over 200 leaves
        # then stalls for seconds (one scheduler slice per region); sleeping threads
        # cost torch a little instead. Set OMP_WAIT_POLICY yourself to choose.
        # OpenMP reads it once, when torch loads, so the process environment is
        # put back right after.
        chosen = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = chosen or "PASSIVE"
        with_torch = have_torch()
        machine_env["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
        if chosen is None:
            del os.environ["OMP_WAIT_POLICY"]
    else:
        with_torch = not args.no_torch and have_torch()
    report = run(settings, args.cases, args.optimizers, with_torch, args.quick, argv)
    print(format_report(report))
    print("\n" + format_goals(report["goal_results"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nJSON: {args.out}  (wall {report['wall_s']} s)")
    else:
        print(f"\n(wall {report['wall_s']} s; --out FILE writes the whole run as JSON)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
