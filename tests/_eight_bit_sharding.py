"""8-bit states of sharded params on 8 CPU devices, run by tests/test_eight_bit.py in a
subprocess (the device count is fixed when JAX starts). Prints one JSON report."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def main() -> None:
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P("x", None))
    rng = np.random.default_rng(0)
    host = {
        "w": rng.standard_normal((1024, 64)).astype(np.float32),
        "b": rng.standard_normal(64).astype(np.float32),
    }
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
    shardings = {"w": rows, "b": NamedSharding(mesh, P())}
    opt = adam_jax.adamw(1e-2, weight_decay=1e-2, state_bits=8)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    params = jax.device_put(host, shardings)
    state = jax.jit(opt.init)(params)
    compiled = jax.jit(step, donate_argnums=(1,)).lower(params, state, params).compile()
    g = jax.device_put(grads, shardings)
    for _ in range(3):
        params, state = compiled(params, state, g)
    m = state[0].m["w"]
    codes_ok = all(q.codes.sharding.is_equivalent_to(rows, 2) for q in (m, state[0].v["w"]))
    scales_ok = m.scales.sharding.is_equivalent_to(NamedSharding(mesh, P("x")), 1)
    text = compiled.as_text()
    canary = jax.jit(jnp.sum).lower(params["w"]).compile().as_text()

    ref_p = {k: jnp.asarray(v) for k, v in host.items()}
    ref_s = opt.init(ref_p)
    one = jax.jit(step)
    for _ in range(3):
        ref_p, ref_s = one(ref_p, ref_s, {k: jnp.asarray(v) for k, v in grads.items()})
    diff = max(float(np.abs(np.asarray(params[k]) - np.asarray(ref_p[k])).max()) for k in host)
    print(
        json.dumps(
            {
                "codes_sharding_matches_params": bool(codes_ok),
                "scales_sharded": bool(scales_ok),
                "update_collectives": [c for c in COLLECTIVES if c in text],
                "canary_collectives": [c for c in COLLECTIVES if c in canary],
                "max_abs_diff_vs_one_device": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
