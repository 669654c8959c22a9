"""Prototype: float32 Adam as one XLA FFI CPU call for all leaves (not part of the package).

Builds ``adam_ffi.cc`` with the system C++ compiler, registers it with JAX, and
defines ``scale_by_adam_ffi``: same ``init``, same ``AdamState``, same math as
``adam_jax.scale_by_adam()`` with its defaults, but the whole per-leaf pass is one
custom call that reads g, m and v once and writes u, m and v (m and v in place).

Then it checks the results bitwise against the jitted ``adam_jax`` step and times
the user-style step (update + ``optax.apply_updates``, donated) for one leaf of
2**24 and for 1,000 leaves of 4,096, interleaved with adam_jax and optax.

Usage::

    python benchmarks/proto_ffi/proto_ffi.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from adam_jax import _bench, _bench_inspect, _common

HERE = Path(__file__).resolve().parent
TARGET = "adam_jax_proto_adam_f32"
GROUP = 16


def build() -> Path:
    out = Path(tempfile.gettempdir()) / "adam_jax_proto_ffi" / "libadam_ffi.so"
    src = HERE / "adam_ffi.cc"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            "g++",
            "-O3",
            "-march=native",
            "-ffp-contract=off",
            "-fno-fast-math",
            "-fno-math-errno",
            "-fPIC",
            "-shared",
            "-std=c++17",
            "-w",
            f"-I{jax.ffi.include_dir()}",
            str(src),
            "-o",
            str(out),
        ]
        subprocess.run(cmd, check=True)
    return out


def register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.AdamF32Handler), platform="cpu")


def scale_by_adam_ffi(b1=0.9, b2=0.999, eps=1e-8) -> optax.GradientTransformation:
    base = adam_jax.scale_by_adam(b1, b2, eps)

    def update_fn(updates, state, params=None):
        del params
        _common.prepare_update(updates, state, adam_jax.AdamState, "scale_by_adam_ffi")
        count = _common.increment(state.count)
        treedef = jax.tree.structure(updates)
        gs = treedef.flatten_up_to(updates)
        ms = treedef.flatten_up_to(state.m)
        vs = treedef.flatten_up_to(state.v)
        if any(x.dtype != jnp.float32 for x in (*gs, *ms, *vs)):
            raise NotImplementedError("the prototype covers float32 only")
        f32 = jnp.float32
        b1_, b2_ = _common.decay_pair(b1, f32), _common.decay_pair(b2, f32)
        # 1/c as XLA's simplifier forms it from ``x / broadcast(c)``.
        r1 = 1 / _common.correction(b1_, count)
        r2 = 1 / _common.correction(b2_, count)
        scalars = jnp.stack([b1_[0], b1_[1], b2_[0], b2_[1], r1, r2, jnp.asarray(eps, f32)])
        us, ms_new, vs_new = [], [], []
        # XLA's compile time grows faster than linearly with the operands of one
        # custom call, so the leaves go in groups.
        for lo in range(0, len(gs), GROUP):
            g_, m_, v_ = gs[lo : lo + GROUP], ms[lo : lo + GROUP], vs[lo : lo + GROUP]
            L = len(g_)
            shapes = [jax.ShapeDtypeStruct(g.shape, f32) for g in g_]
            aliases = {1 + L + i: L + i for i in range(L)}
            aliases |= {1 + 2 * L + i: 2 * L + i for i in range(L)}
            outs = jax.ffi.ffi_call(
                TARGET, shapes * 3, input_output_aliases=aliases, vmap_method="sequential"
            )(scalars, *g_, *m_, *v_)
            us += outs[:L]
            ms_new += outs[L : 2 * L]
            vs_new += outs[2 * L :]
        u, m, v = (treedef.unflatten(x) for x in (us, ms_new, vs_new))
        return u, adam_jax.AdamState(count=count, m=m, v=v)

    return optax.GradientTransformation(base.init, update_fn)


def ffi_adam(learning_rate=1e-3) -> optax.GradientTransformation:
    """``adam_jax.adam(learning_rate)``'s chain with the FFI scaler."""
    return optax.chain(
        optax.add_decayed_weights(0.0),
        scale_by_adam_ffi(),
        optax.scale_by_learning_rate(learning_rate),
    )


def check_bitwise(shapes: list[tuple[int, ...]], steps: int = 5) -> bool:
    rng = np.random.default_rng(0)
    params = {
        f"w{i}": jnp.asarray(rng.standard_normal(s).astype(np.float32))
        for i, s in enumerate(shapes)
    }
    grads = [
        jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)), params)
        for _ in range(steps)
    ]
    results = []
    for opt in (adam_jax.adam(1e-3), ffi_adam(1e-3)):
        step = jax.jit(_bench.user_step(opt))
        p, s = params, opt.init(params)
        for g in grads:
            p, s = step(p, s, g)
        results.append((p, s))
    a, b = (jax.tree.leaves(r) for r in results)
    return all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b, strict=True)
    )


def time_case(params, grads, reps: int) -> dict:
    conts = {
        "adam_jax": _bench.jax_contender(adam_jax.adam(1e-3), params, grads),
        "optax": _bench.jax_contender(optax.adam(1e-3), params, grads),
        "ffi": _bench.jax_contender(ffi_adam(1e-3), params, grads),
    }
    times = _bench.interleave(conts, reps, 2)
    out = {}
    for k, c in conts.items():
        keep = ("trace_lower_s", "compile_s", "kernels", "hlo_bytes_per_param", "temp_bytes")
        out[k] = {**_bench.summarize(times[k]), **{x: c.info.get(x) for x in keep}}
    med = {k: v["median_ms"] for k, v in out.items()}
    out["ratios"] = {
        "ffi/optax": round(med["ffi"] / med["optax"], 3),
        "ffi/adam_jax": round(med["ffi"] / med["adam_jax"], 3),
        "adam_jax/optax": round(med["adam_jax"] / med["optax"], 3),
        "compile ffi/optax": round(out["ffi"]["compile_s"] / out["optax"]["compile_s"], 3),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", type=Path, default=HERE.parent / "results" / "proto_ffi.json")
    args = ap.parse_args(argv)
    register()
    report: dict = {"machine": _bench.machine_info(), "load_before": _bench_inspect.loadavg()}
    report["bitwise_one_leaf"] = check_bitwise([(4099,)])
    report["bitwise_many_leaves"] = check_bitwise([(7,), (3, 5), (300,), ()] + [(64,)] * 50)
    print(
        "bitwise identical to adam_jax jit:",
        report["bitwise_one_leaf"],
        report["bitwise_many_leaves"],
    )
    rng = np.random.default_rng(0)
    n = 2 ** (22 if args.quick else 24)
    p = jnp.asarray((0.1 * rng.standard_normal(n)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal(n).astype(np.float32))
    report["one_leaf"] = time_case(p, g, args.reps)
    print("one leaf", n, json.dumps(report["one_leaf"], indent=1))
    L = 200 if args.quick else 1000
    ps = {
        f"l{i:04d}": jnp.asarray((0.1 * rng.standard_normal(4096)).astype(np.float32))
        for i in range(L)
    }
    gs = {k: jnp.asarray(rng.standard_normal(4096).astype(np.float32)) for k in ps}
    report["many_leaves"] = time_case(ps, gs, args.reps)
    print("many leaves", L, json.dumps(report["many_leaves"], indent=1))
    report["load_after"] = _bench_inspect.loadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
