"""8-bit optimizer states: speed, memory, parity with torchao and training quality.

Usage::

    python benchmarks/bench_eight_bit.py            # everything, a few minutes
    python benchmarks/bench_eight_bit.py --quick    # smaller sizes, no torchao compile
    python benchmarks/bench_eight_bit.py --memory   # only the memory of every family

Results go to ``benchmarks/results/eight_bit.json`` (``eight_bit-quick.json`` with
``--quick``, ``eight_bit_memory.json`` with ``--memory``) or ``--json PATH``.

* Speed: the jitted, donated step ``opt.update`` + ``optax.apply_updates`` of
  ``adam_jax.adamw`` with float32 states and with ``state_bits=8``, and
  ``torchao.optim.AdamW8bit`` (compiled with ``torch.compile``, as it ships), on 1,000
  leaves of 4,096 float32 and on one leaf of 2^24. One process, contenders interleaved
  (order rotating every round), median of ``--reps``.
* Build: the trace + lowering and the XLA compile of each jitted step, once.
* Memory: state bytes per param, and XLA's peak for the donated one-leaf step
  (arguments + outputs - donated aliases + temporaries); the process's max RSS. For
  every family taking ``state_bits``, with float32 and 8-bit states, the same figures
  for the donated step of ten 1024x1024 leaves (compiled only, not run).
* Parity: ``adamw(state_bits=8)`` against the compiled ``AdamW8bit`` for 100 steps:
  the first step whose codes or scales differ, and the largest param difference.
* Quality: an MLP on scikit-learn's digits (~20k params) and a wide MLP (1.1M params),
  trained with float32 and 8-bit states from the same init on the same batches, for
  ``--orders`` batch orders: the paired final-loss ratios 8-bit / float32, their mean
  and standard error, and float32's own spread over the orders (the noise floor).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.machine import loadavg, machine_info

HERE = Path(__file__).resolve().parent


def _step(opt: Any) -> Any:
    def step(p: Any, s: Any, g: Any) -> Any:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _peak(mem: Any) -> int:
    """XLA's peak for a compiled step: arguments + outputs - donated aliases + temporaries."""
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )


def speed(shapes: dict[str, tuple[int, ...]], reps: int, with_torchao: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    host_p = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    host_g = {k: rng.standard_normal(s).astype(np.float32) * 1e-2 for k, s in shapes.items()}
    grads = jax.device_put(host_g)
    runners: dict[str, Any] = {}
    out: dict[str, Any] = {"params": int(sum(np.prod(s) for s in shapes.values()))}
    for name, bits in (("float32", 32), ("8-bit", 8)):
        opt = adam_jax.adamw(1e-3, weight_decay=1e-2, state_bits=bits)
        params = jax.device_put(host_p)
        state = opt.init(params)
        t0 = time.perf_counter()
        lowered = jax.jit(_step(opt), donate_argnums=(0, 1)).lower(params, state, grads)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        out[name] = {
            "trace_and_lower_seconds": t1 - t0,
            "compile_seconds": t2 - t1,
            "state_bytes_per_param": _nbytes(state) / out["params"],
            "xla_peak_bytes_per_param": _peak(mem) / out["params"],
            "xla_temp_bytes_per_param": mem.temp_size_in_bytes / out["params"],
        }
        box = [params, state]

        def run(box: list[Any] = box, compiled: Any = compiled) -> None:
            box[0], box[1] = compiled(box[0], box[1], grads)
            jax.block_until_ready(box[0])

        runners[name] = run
    if with_torchao:
        import torch
        from torchao.optim import AdamW8bit

        tparams = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in host_p.values()]
        for p, g in zip(tparams, host_g.values(), strict=True):
            p.grad = torch.from_numpy(g)
        topt = AdamW8bit(tparams, lr=1e-3, weight_decay=1e-2)
        runners["torchao AdamW8bit"] = topt.step
    for run in runners.values():  # compile and warm up
        run()
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out["median_seconds"] = med
    out["8-bit / float32"] = med["8-bit"] / med["float32"]
    if with_torchao:
        out["8-bit / torchao"] = med["8-bit"] / med["torchao AdamW8bit"]
    return out


FAMILIES = (
    "adamw",
    "adam",
    "amsgrad",
    "adamax",
    "nadam",
    "radam",
    "adopt",
    "ademamix",
    "stable_adamw",
    "schedule_free_adamw",
)


def family_memory() -> dict[str, Any]:
    """State bytes and XLA's peak, per param, of the donated step of each family."""
    n_leaves, leaf = 10, (1024, 1024)
    n = n_leaves * leaf[0] * leaf[1]
    params = {f"w{i}": jax.ShapeDtypeStruct(leaf, jnp.float32) for i in range(n_leaves)}
    out: dict[str, Any] = {"params": n}
    for name in FAMILIES:
        out[name] = {}
        for bits in (32, 8):
            opt = getattr(adam_jax, name)(1e-3, state_bits=bits)
            state = jax.eval_shape(opt.init, params)
            jitted = jax.jit(_step(opt), donate_argnums=(0, 1))
            mem = jitted.lower(params, state, params).compile().memory_analysis()
            out[name][f"{bits}-bit"] = {
                "state_bytes_per_param": round(_nbytes(state) / n, 3),
                "xla_peak_bytes_per_param": round(_peak(mem) / n, 2),
            }
    return out


def parity(steps: int) -> dict[str, Any]:
    """adamw(state_bits=8) against the compiled torchao AdamW8bit."""
    import torch
    from torchao.optim import AdamW8bit

    rng = np.random.default_rng(1)
    shapes = {"w": (32, 256), "b": (96,)}
    host = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in host.items()}
    topt = AdamW8bit(list(tparams.values()), lr=1e-3, weight_decay=1e-2)
    opt = adam_jax.adamw(1e-3, weight_decay=1e-2, state_bits=8)
    params = jax.device_put(host)
    state = opt.init(params)
    step = jax.jit(_step(opt))
    first_diff, worst = None, 0.0
    for t in range(steps):
        g = {k: (rng.standard_normal(s) * 10 ** rng.uniform(-3, 1)).astype(np.float32)
             for k, s in shapes.items()}  # fmt: skip
        for k, p in tparams.items():
            p.grad = torch.from_numpy(g[k])
        topt.step()
        params, state = step(params, state, g)
        ref = topt.state[tparams["w"]]
        for field, key in (("m", "exp_avg"), ("v", "exp_avg_sq")):
            q = getattr(state[0], field)["w"]
            same = np.array_equal(np.asarray(q.codes), ref[key].codes.numpy()) and np.array_equal(
                np.asarray(q.scales), ref[key].scale.numpy()
            )
            if not same and first_diff is None:
                first_diff = t + 1
        for k, p in tparams.items():
            b = p.detach().numpy()
            worst = max(worst, float(np.abs(np.asarray(params[k]) - b).max() / np.abs(b).max()))
    return {
        "steps": steps,
        "first_step_with_different_codes_or_scales": first_diff,
        "max_param_difference_relative_to_max_param": worst,
    }


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int32)


def quality(widths: list[int], epochs: int, lr: float, orders: int) -> dict[str, Any]:
    """Train the MLP with float32 and with 8-bit states, from the same init on the same
    batches, for each of ``orders`` batch orders (the shuffle's seed).

    The final loss of a run depends on the batch order as much as on the states: the
    spread of float32's own final losses over the orders is the noise floor against
    which the paired ratios 8-bit / float32 are read."""
    x_np, y_np = _digits()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    key = jax.random.key(0)
    sizes = [64, *widths, 10]
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b), jnp.float32) / np.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,), jnp.float32)

    def loss_fn(p: Any, xb: Any, yb: Any) -> Any:
        h = xb
        for i in range(len(sizes) - 1):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i < len(sizes) - 2:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, yb).mean()

    def trainer(bits: int) -> Any:
        opt = adam_jax.adamw(lr, weight_decay=1e-4, state_bits=bits)

        @jax.jit
        def train(p: Any, batches: Any) -> Any:
            def body(carry: Any, idx: Any) -> Any:
                p, s = carry
                loss, g = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss

            (p, s), _ = jax.lax.scan(body, (p, opt.init(p)), batches)
            return p, s

        return train

    trainers = {"float32": trainer(32), "8-bit": trainer(8)}
    out: dict[str, Any] = {"params": int(sum(v.size for v in params.values())), "epochs": epochs}
    runs: dict[str, list[float]] = {name: [] for name in trainers}
    for order in range(orders):
        batches = np.random.default_rng(order).permutation(np.tile(np.arange(len(x)), epochs))
        batches = batches[: len(batches) // 128 * 128].reshape(-1, 128)
        for name, train in trainers.items():
            p, s = train(params, jnp.asarray(batches))
            runs[name].append(float(loss_fn(p, x, y)))
            out[f"{name} state_bytes"] = _nbytes(s)
    f32, q8 = np.array(runs["float32"]), np.array(runs["8-bit"])
    ratios = q8 / f32
    out["final_loss per order"] = runs
    out["8-bit / float32 per order"] = ratios.tolist()
    out["8-bit / float32 mean"] = float(ratios.mean())
    out["8-bit / float32 standard error"] = float(ratios.std(ddof=1) / np.sqrt(orders))
    out["8-bit / float32 of the mean final losses"] = float(q8.mean() / f32.mean())
    out["float32 spread over orders (max / min)"] = float(f32.max() / f32.min())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--orders", type=int, default=None, help="batch orders for quality")
    ap.add_argument("--memory", action="store_true", help="only the memory of every family")
    args = ap.parse_args(argv)
    if args.memory:
        report = {"machine": machine_info(), "family_memory": family_memory()}
        path = args.json or HERE / "results" / "eight_bit_memory.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps(report["family_memory"], indent=2))
        return 0
    reps = args.reps or (5 if args.quick else 11)
    torchao = not args.quick
    log2 = 20 if args.quick else 24
    n_leaves = 100 if args.quick else 1000
    report: dict[str, Any] = {"machine": machine_info(), "loadavg_start": loadavg()}
    report["speed_many_leaves"] = speed({f"p{i}": (4096,) for i in range(n_leaves)}, reps, torchao)
    report["speed_one_leaf"] = speed({"p": (2**log2,)}, reps, torchao)
    report["family_memory"] = family_memory()
    if torchao:
        report["parity_vs_compiled_torchao"] = parity(100)
    orders = args.orders or (2 if args.quick else 8)
    report["quality_digits_mlp"] = quality([256], 10 if args.quick else 30, 3e-3, orders)
    report["quality_wide_mlp"] = quality([1024, 1024], 2 if args.quick else 10, 1e-3, orders)
    report["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["loadavg_end"] = loadavg()
    path = args.json or HERE / "results" / (
        "eight_bit-quick.json" if args.quick else "eight_bit.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
