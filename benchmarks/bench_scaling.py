"""Benchmark: how fit, fit_batched and the optimizer step scale.

Four measurements, each against one size:

* ``cap``: ``adam_jax.fit`` against its step cap ``num_steps`` (10^3 ... 10^9),
  on a problem that stops early after the same few thousand steps whatever the
  cap: wall time and peak memory (RSS of a fresh process per point) should stay
  flat, because the loop is a ``lax.while_loop`` and the loss history is bounded
  (``History.every(1, max_len=100_000)`` by default).
* ``problems``: ``adam_jax.fit_batched`` against the number of problems N
  (1 ... 16,384 linear regressions, each stopping at its own step): wall time and
  peak memory, a fresh process per point; the time is fitted as a line in the
  problem-steps the problems needed, whose slope is stated in problem-steps per
  second.
* ``params``: one Adam step (``update`` then ``optax.apply_updates``, jitted,
  params and state donated) against the number of float32 parameters, in one
  leaf and in 1,000 leaves, side by side with ``optax.adam`` and a bandwidth
  floor (the fastest in-place pass over the 28 bytes per parameter an Adam step
  must move), all interleaved in one process.
* ``leaves``: the step's trace+lower and compile times against the number of
  leaves (10 ... 3,000 small leaves), side by side with ``optax.adam``; the
  growth is fitted as a power law.

Usage::

    python benchmarks/bench_scaling.py            # the full run (minutes)
    python benchmarks/bench_scaling.py --quick    # tiny sizes: checks the script, not a speed

Results: ``benchmarks/results/scaling.json`` (``scaling-quick.json`` with
``--quick``) and ``scaling.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from harness.cases import floor_contenders, interleave, jax_contender, summarize
from harness.machine import loadavg, machine_info

import adam_jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from references import linear_regression

RESULTS = Path(__file__).resolve().parent / "results"
ADAM_BYTES_PER_PARAM = 28  # reads p, g, m, v and writes p, m, v, float32


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def regressions(n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    xs, ys = zip(*(linear_regression.data(n=200, seed=k) for k in range(n)), strict=True)
    lrs = np.geomspace(3e-3, 0.3, n) if n > 1 else np.array([0.03])
    return (
        jnp.asarray(np.stack(xs), jnp.float32),
        jnp.asarray(np.stack(ys), jnp.float32),
        jnp.asarray(lrs, jnp.float32),
    )


def make_problem(p):
    x, y, lr = p
    params = jnp.zeros((1, x.shape[1]), x.dtype)
    return (lambda w: linear_regression.loss(w, x, y)), params, adam_jax.adam(lr)


# --------------------------------------------------------------------------
# One point in a fresh process: python bench_scaling.py --point KIND VALUE
# --------------------------------------------------------------------------


def point_cap(cap: int, repeats: int) -> dict:
    x, y, _ = regressions(1)
    # A learning rate at which MSE <= 1 takes a few thousand steps.
    run = jax.jit(
        lambda x, y: adam_jax.fit(
            lambda w: linear_regression.loss(w, x, y),
            jnp.zeros((1, 4), jnp.float32),
            adam_jax.adam(3e-3),
            num_steps=cap,
            has_aux=True,
            early_stopping=adam_jax.early_stopping(None, target=1.0),
        )
    )
    t = time.perf_counter()
    result = jax.block_until_ready(run(x[0], y[0]))
    first = time.perf_counter() - t
    median, times = _timed(lambda: jax.block_until_ready(run(x[0], y[0])), repeats)
    return {
        "cap": cap,
        "steps_run": int(result.num_steps),
        "stop_reason": str(result.stop_reason_names()),
        "history_len": int(result.losses.shape[0]),
        "first_call_s": first,
        "median_s": median,
        "times_s": times,
        "peak_rss_bytes": _peak_rss(),
    }


def point_problems(n: int, cap: int, repeats: int) -> dict:
    inputs = regressions(n)
    es = adam_jax.early_stopping(None, target=1.0)

    def run():
        return adam_jax.fit_batched(
            make_problem, inputs, num_steps=cap, early_stopping=es, has_aux=True,
            history=adam_jax.History.none(),
        )  # fmt: skip

    t = time.perf_counter()
    work = run().work
    first = time.perf_counter() - t
    median, times = _timed(run, repeats)
    return {
        "problems": n,
        "slots": adam_jax.default_slots(n, True),
        "computed": work.computed,
        "needed": work.needed,
        "first_call_s": first,
        "median_s": median,
        "times_s": times,
        "peak_rss_bytes": _peak_rss(),
    }


def in_fresh_process(kind: str, value: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--point", kind, str(value)]
    cmd += ["--repeats", str(args.repeats), "--batched-cap", str(args.batched_cap)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# In this process: the step against param count, compile against leaf count.
# --------------------------------------------------------------------------


def _tree(total: int, leaves: int) -> tuple[list[jax.Array], list[jax.Array]]:
    size = max(total // leaves, 1)
    rng = np.random.default_rng(0)
    params = [jnp.asarray(0.1 * rng.standard_normal(size), jnp.float32) for _ in range(leaves)]
    grads = [jnp.asarray(rng.standard_normal(size), jnp.float32) for _ in range(leaves)]
    return params, grads


def step_vs_params(sizes: list[int], leaf_counts: list[int], reps: int) -> list[dict]:
    rows = []
    for leaves in leaf_counts:
        for total in sizes:
            if total < leaves:
                continue
            params, grads = _tree(total, leaves)
            n = sum(int(p.size) for p in params)
            contenders = {
                "adam_jax": jax_contender(adam_jax.adam(1e-3), params, grads),
                "optax": jax_contender(optax.adam(1e-3), params, grads),
            }
            contenders.update(floor_contenders(ADAM_BYTES_PER_PARAM * n, with_torch=False))
            times = interleave(contenders, reps, warmup=2)
            res = {k: summarize(v) for k, v in times.items()}
            floor = min(v["median_ms"] for k, v in res.items() if k.startswith("floor_"))
            row = {"leaves": leaves, "n_params": n, "floor_ms": floor}
            for name in ("adam_jax", "optax"):
                ms = res[name]["median_ms"]
                row[name] = {
                    **res[name],
                    "ns_per_param": 1e6 * ms / n,
                    # The bytes per param a pass at the floor's bandwidth moves in this time.
                    "bytes_per_param_at_floor_bandwidth": ADAM_BYTES_PER_PARAM * ms / floor,
                    "hlo_bytes_per_param": contenders[name].info.get("hlo_bytes_per_param"),
                }
            row["floor_gb_per_s"] = ADAM_BYTES_PER_PARAM * n / (floor * 1e-3) / 1e9
            row["adam_jax/optax"] = row["adam_jax"]["median_ms"] / row["optax"]["median_ms"]
            rows.append(row)
            print(
                f"  {leaves:5d} leaves, {n:>11,d} params: adam_jax "
                f"{row['adam_jax']['median_ms']:9.3f} ms, "
                f"optax {row['optax']['median_ms']:9.3f} ms, "
                f"floor {floor:9.3f} ms "
                f"({row['floor_gb_per_s']:.1f} GB/s); adam_jax "
                f"{row['adam_jax']['bytes_per_param_at_floor_bandwidth']:.0f} B/param at the "
                f"floor's bandwidth (28 is the floor)"
            )
            del contenders, params, grads
    return rows


def compile_vs_leaves(leaf_counts: list[int], leaf_size: int) -> list[dict]:
    rows = []
    for leaves in leaf_counts:
        params, grads = _tree(leaves * leaf_size, leaves)
        row = {"leaves": leaves}
        for name, opt in (("adam_jax", adam_jax.adam(1e-3)), ("optax", optax.adam(1e-3))):
            info = jax_contender(opt, params, grads).info
            row[name] = {"trace_lower_s": info["trace_lower_s"], "compile_s": info["compile_s"]}
        rows.append(row)
        print(
            f"  {leaves:5d} leaves: adam_jax trace+lower {row['adam_jax']['trace_lower_s']:.2f} s,"
            f" compile {row['adam_jax']['compile_s']:.2f} s; optax "
            f"{row['optax']['trace_lower_s']:.2f} s, {row['optax']['compile_s']:.2f} s"
        )
    return rows


def power_law(x: list[float], y: list[float]) -> float:
    """The exponent k of y ~ x^k, fitted on log-log axes."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept)."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


# --------------------------------------------------------------------------
# The run, its summary and its plots.
# --------------------------------------------------------------------------


def summarize_run(report: dict) -> dict:
    out = {}
    # Caps below the steps the problem needs stop it there: left out of the summary.
    cap = [r for r in report["cap"] if r["steps_run"] == report["cap"][-1]["steps_run"]]
    if len(cap) > 1:
        rss = [r["peak_rss_bytes"] for r in cap]
        t = [r["median_s"] for r in cap]
        out["cap"] = {
            "peak_rss_max_over_min": max(rss) / min(rss),
            "time_max_over_min": max(t) / min(t),
            "time_exponent_in_cap": power_law([r["cap"] for r in cap], t),
        }
    probs = report["problems"]
    if len(probs) > 1:
        slope, intercept = line([r["needed"] for r in probs], [r["median_s"] for r in probs])
        out["problems"] = {
            "problem_steps_per_s": 1 / slope if slope > 0 else None,
            "intercept_s": intercept,
            "time_exponent_in_needed": power_law(
                [r["needed"] for r in probs], [r["median_s"] for r in probs]
            ),
            "peak_rss_growth_bytes_per_problem": line(
                [r["problems"] for r in probs], [r["peak_rss_bytes"] for r in probs]
            )[0],
        }
    comp = report["leaves"]
    if len(comp) > 1:
        x = [r["leaves"] for r in comp]
        out["leaves"] = {
            f"{name}_{phase}_exponent": power_law(x, [r[name][phase] for r in comp])
            for name in ("adam_jax", "optax")
            for phase in ("trace_lower_s", "compile_s")
        }
        last = comp[-1]
        out["leaves"]["adam_jax/optax_trace_plus_compile_at_most_leaves"] = sum(
            last["adam_jax"].values()
        ) / sum(last["optax"].values())
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), dpi=72)
    ax = axes[0, 0]
    cap = report["cap"]
    if cap:
        caps = [r["cap"] for r in cap]
        ax.semilogx(caps, [r["median_s"] * 1e3 for r in cap], "o-", label="wall time (ms)")
        ax.semilogx(caps, [r["peak_rss_bytes"] / 2**20 for r in cap], "s-", label="peak RSS (MiB)")
        steps = cap[-1]["steps_run"]
        ax.set(xlabel="num_steps cap", title=f"fit: {steps} steps run at any cap above {steps}")
        ax.set_ylim(bottom=0)
        ax.legend()
    ax = axes[0, 1]
    probs = report["problems"]
    if probs:
        needed = [r["needed"] for r in probs]
        ax.loglog(needed, [r["median_s"] for r in probs], "o-", label="wall time (s)")
        ax2 = ax.twinx()
        ax2.semilogx(needed, [r["peak_rss_bytes"] / 2**20 for r in probs], "s--", color="C1")
        ax2.set_ylabel("peak RSS (MiB)", color="C1")
        for r in probs:
            ax.annotate(f"N={r['problems']}", (r["needed"], r["median_s"]), fontsize=7)
        ax.set(xlabel="problem-steps needed", ylabel="s", title="fit_batched against N problems")
    ax = axes[1, 0]
    for k, leaves in enumerate(sorted({r["leaves"] for r in report["params"]})):
        rows = [r for r in report["params"] if r["leaves"] == leaves]
        n = [r["n_params"] for r in rows]
        for name, style in (("adam_jax", "o-"), ("optax", "x--")):
            ax.loglog(
                n,
                [r[name]["bytes_per_param_at_floor_bandwidth"] for r in rows],
                style,
                color=f"C{k}",
                label=f"{name}, {leaves} " + ("leaves" if leaves > 1 else "leaf"),
            )
    ax.axhline(ADAM_BYTES_PER_PARAM, color="k", lw=0.8, label="floor: 28 B/param")
    ax.set(
        xlabel="float32 params",
        ylabel="step time x floor bandwidth (B/param)",
        title="the Adam step against the bandwidth floor",
    )
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    comp = report["leaves"]
    if comp:
        x = [r["leaves"] for r in comp]
        for name, color in (("adam_jax", "C0"), ("optax", "C1")):
            for phase, style in (("trace_lower_s", "--"), ("compile_s", "-")):
                ax.loglog(
                    x, [r[name][phase] for r in comp], style, marker="o", color=color,
                    label=f"{name} {phase[:-2].replace('_', '+')}",
                )  # fmt: skip
        ax.set(xlabel="leaves", ylabel="s", title="compile time of the step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, in this process")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point (3; 1)")
    parser.add_argument("--batched-cap", type=int, default=5000, help="step cap of each problem")
    parser.add_argument("--max-problems", type=int, default=16_384)
    parser.add_argument("--max-params", type=int, default=10**7, help="largest step size")
    parser.add_argument("--max-leaves", type=int, default=3000, help="most leaves compiled")
    parser.add_argument("--point", nargs=2, metavar=("KIND", "VALUE"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="where the results go")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)

    if args.point:
        kind, value = args.point[0], int(args.point[1])
        if kind == "cap":
            row = point_cap(value, args.repeats)
        else:
            row = point_problems(value, args.batched_cap, args.repeats)
        print(json.dumps(row))
        return 0

    info = machine_info()
    load_start = loadavg()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {load_start}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    if args.quick:
        args.batched_cap = 300
        caps, ns = [10**3, 10**9], [1, 8]
        sizes, leaf_counts, compile_leaves = [10**3, 10**4], [1, 10], [10, 30]
        point = {
            "cap": lambda v: point_cap(v, args.repeats),
            "problems": lambda v: point_problems(v, args.batched_cap, args.repeats),
        }
    else:
        caps = [10**k for k in range(3, 10)]
        ns = [n for n in (1, 16, 128, 1024, 4096, 16_384) if n <= args.max_problems]
        sizes = [10**k for k in range(3, 9) if 10**k <= args.max_params]
        leaf_counts = [1, 1000]
        compile_leaves = [n for n in (10, 30, 100, 300, 1000, 3000) if n <= args.max_leaves]
        point = {kind: (lambda v, kind=kind: in_fresh_process(kind, v, args)) for kind in ("cap",)}
        point["problems"] = lambda v: in_fresh_process("problems", v, args)

    report: dict = {"cap": [], "problems": [], "params": [], "leaves": []}
    print("fit against its step cap (fresh process per point):" if not args.quick else "fit:")
    for cap in caps:
        row = point["cap"](cap)
        report["cap"].append(row)
        print(
            f"  cap {cap:>13,d}: {row['steps_run']} steps run, {row['median_s'] * 1e3:.1f} ms, "
            f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    print(f"fit_batched against the number of problems (cap {args.batched_cap}):")
    for n in ns:
        row = point["problems"](n)
        report["problems"].append(row)
        print(
            f"  N {n:>6,d} ({row['slots']} lanes): {row['needed']:>11,d} problem-steps needed, "
            f"{row['computed'] / row['needed']:.2f}x computed; {row['median_s']:.3f} s, "
            f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    print("the Adam step against param count (interleaved with optax and the floor):")
    report["params"] = step_vs_params(sizes, leaf_counts, reps=5 if args.quick else 15)
    print("compile time against leaf count (leaves of 16 floats):")
    report["leaves"] = compile_vs_leaves(compile_leaves, leaf_size=16)

    summary = summarize_run(report)
    for what, values in summary.items():
        print(f"{what}: " + ", ".join(f"{k} {v:.3g}" for k, v in values.items() if v is not None))
    name = "scaling-quick" if args.quick else "scaling"
    path = Path(args.json) if args.json else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": info,
        "python": platform.python_version(),
        "load_average_start": load_start,
        "load_average_end": loadavg(),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "method": (
            "cap and problems: a fresh process per point, median of the timed runs after a "
            "first (compiling) call, peak RSS from getrusage; params: contenders interleaved "
            "in one process, medians; leaves: one trace+lower and compile per point"
            + (" (quick: every point in this process)" if args.quick else "")
        ),
        "summary": summary,
        **report,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, path.with_suffix(".png"))
    print(f"JSON: {path}\nplot: {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
