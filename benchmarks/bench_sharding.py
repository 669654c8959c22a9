"""Batched problems over devices: wall time of jit(vmap(fit)) on 1, 2, 4 and 8 devices.

N independent regressions (a small MLP each, with its own data, initial params
and learning rate) are trained by one ``jax.jit(jax.vmap(fit))`` whose problem
axis is split over a 1-D mesh of all devices, so each device trains N/d problems
and nothing is communicated. JAX fixes the number of devices at start-up, so
every device count runs in its own subprocess, with
``XLA_FLAGS=--xla_force_host_platform_device_count=d`` on the CPU.

Each count's results are compared with the 1-device run (in float64 they agree to
float tolerance), and the table and machine details are written to
``benchmarks/results/sharding.json``.

Fake CPU devices share the machine's cores: on a machine with c cores the
speed-up saturates near c, however many devices there are.

Usage:
  python benchmarks/bench_sharding.py [--problems 64] [--steps 200] [--hidden 128]
      [--samples 256] [--dtype float64] [--repeats 5] [--device-counts 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).parent / "results" / "sharding.json"
WORKLOAD = ("problems", "steps", "hidden", "samples", "dtype", "repeats")


def worker(args: argparse.Namespace) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import adam_jax

    jax.config.update("jax_enable_x64", args.dtype == "float64")
    n, hidden, samples, features = args.problems, args.hidden, args.samples, 8
    dt = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, samples, features)).astype(dt)
    y = np.sin(x @ rng.normal(size=(n, features, 1))).astype(dt)
    params = {
        "w1": (rng.normal(size=(n, features, hidden)) / np.sqrt(features)).astype(dt),
        "b1": np.zeros((n, hidden), dt),
        "w2": (rng.normal(size=(n, hidden, 1)) / np.sqrt(hidden)).astype(dt),
        "b2": np.zeros((n, 1), dt),
    }
    lr = np.geomspace(1e-3, 1e-2, n).astype(dt)

    def fit_one(params, x, y, lr):
        def loss_fn(p):
            h = jnp.tanh(x @ p["w1"] + p["b1"])
            return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

        return adam_jax.fit(loss_fn, params, adam_jax.adam(lr), num_steps=args.steps)

    mesh = jax.make_mesh((args.devices,), ("problems",), axis_types=(AxisType.Auto,))
    by_problem = NamedSharding(mesh, P("problems"))
    fit_all = jax.jit(jax.vmap(fit_one), in_shardings=by_problem, out_shardings=by_problem)
    inputs = jax.device_put((params, x, y, lr), by_problem)

    t0 = time.perf_counter()
    compiled = fit_all.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    result = jax.block_until_ready(compiled(*inputs))  # warm-up
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    np.savez(
        args.out,
        **{k: np.asarray(v) for k, v in result.params.items()},
        losses=np.asarray(result.losses),
    )
    shards = {str(s.device.id): s.data.shape[0] for s in result.losses.addressable_shards}
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "problems_per_device": sorted(set(shards.values())),
                "compile_s": compile_s,
                "times_s": times,
                "cpu_s": cpu,
                "final_loss_mean": float(np.mean(np.asarray(result.losses)[:, -1])),
            }
        )
    )


def machine() -> dict:
    """The step benchmark's machine record (CPU, cores, versions), plus the load now."""
    from harness.machine import loadavg, machine_info  # imports jax: not in the workers

    return machine_info() | {"load_average_at_start": loadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--device-counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--output", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import numpy as np

    info = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for d in args.device_counts:
            out = os.path.join(tmp, f"d{d}.npz")
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            cmd = [sys.executable, __file__, "--worker", f"--devices={d}", f"--out={out}"]
            cmd += [f"--{k}={getattr(args, k)}" for k in WORKLOAD]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{d} devices failed:\n{proc.stderr[-4000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            with np.load(out) as f:
                arrays = {k: f[k] for k in f.files}
            if reference is None:
                reference = arrays
            params = [k for k in reference if k != "losses"]
            row["max_abs_diff_params_vs_first"] = max(
                float(np.max(np.abs(arrays[k] - reference[k]))) for k in params
            )
            final, final_ref = arrays["losses"][:, -1], reference["losses"][:, -1]
            row["max_rel_diff_final_loss_vs_first"] = float(
                np.max(np.abs(final - final_ref) / np.abs(final_ref))
            )
            row["median_s"] = float(np.median(row["times_s"]))
            row["best_s"] = float(np.min(row["times_s"]))
            # CPU time over wall time: how many cores the run kept busy on average.
            row["cores_busy"] = float(np.median(np.array(row["cpu_s"]) / np.array(row["times_s"])))
            rows.append(row)
    for row in rows:
        row["speedup_median"] = rows[0]["median_s"] / row["median_s"]
        row["speedup_best"] = rows[0]["best_s"] / row["best_s"]

    command = "python benchmarks/bench_sharding.py " + " ".join(
        f"--{k}={getattr(args, k)}" for k in WORKLOAD
    )
    print(
        f"jit(vmap(fit)) over {args.problems} problems (MLP 8-{args.hidden}-1, {args.samples} "
        f"samples, {args.steps} full-batch Adam steps each, {args.dtype}), problem axis "
        "sharded over d CPU devices"
    )
    load = info["load_average_at_start"]
    print(
        f"{info['cpu']}, {info['usable_cores']} usable cores, "
        f"jax {info['versions']['jax']}, optax {info['versions']['optax']}, "
        f"load average at start {load[0]:.1f}"
        if load
        else ""
    )
    print(f"{command}")
    print()
    from harness.report import table

    header = ["devices", "problems/device", "compile s", "best s", "median s"]
    header += ["speed-up (best)", "cores busy", "max abs diff params", "max rel diff final loss"]
    cells = [
        [
            str(r["devices"]),
            str(r["problems_per_device"][0]),
            f"{r['compile_s']:.2f}",
            f"{r['best_s']:.3f}",
            f"{r['median_s']:.3f}",
            f"{r['speedup_best']:.2f}x",
            f"{r['cores_busy']:.2f}",
            f"{r['max_abs_diff_params_vs_first']:.1e}",
            f"{r['max_rel_diff_final_loss_vs_first']:.1e}",
        ]
        for r in rows
    ]
    print(table(header, cells, right=range(len(header))))
    print()
    note = (
        f"Fake CPU devices share the {info['usable_cores']} cores of this machine (and the "
        "machine with whatever else runs on it), so the speed-up saturates near "
        f"{info['usable_cores']}x; on accelerators each device brings its own compute. "
        "Differences are relative to the 1-device run: XLA may sum a batched matmul in a "
        "different order for a different number of problems per device, and training "
        "amplifies those last-bit differences."
    )
    print(note)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "batched fit over devices: jit(vmap(adam_jax.fit)) with the problem axis "
        "sharded over a 1-D mesh",
        "command": command,
        "workload": {k: getattr(args, k) for k in WORKLOAD},
        "machine": info,
        "rows": rows,
        "note": note,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
