"""The modern optimizers' states on sharded params, on 8 CPU devices; run by
tests/test_modern_sharding.py in a subprocess (the device count is fixed when JAX
starts). Prints one JSON report: per optimizer, the state leaves shaped like a param
whose sharding is not that param's, the collectives in the compiled step, and the
largest difference from the same steps on one device."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json

import jax
import numpy as np
import optax
from _sharding_checks import collectives_in, leaf_errors, make_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax

jax.config.update("jax_enable_x64", True)

N_STEPS = 4
# Weight decay everywhere so that the params take part in every update; warmups so
# that the schedules' code paths run.
OPTIMIZERS = {
    "schedule_free_adamw": lambda: adam_jax.schedule_free_adamw(
        1e-2, weight_decay=1e-2, warmup_steps=2
    ),
    "adopt": lambda: adam_jax.adopt(1e-2, weight_decay=1e-2),
    "stable_adamw": lambda: adam_jax.stable_adamw(1e-2, weight_decay=1e-2),
    "ademamix": lambda: adam_jax.ademamix(
        1e-2, b3=0.999, weight_decay=1e-2, alpha_warmup=3, b3_warmup=3
    ),
    "adamw_cautious": lambda: adam_jax.adamw(1e-2, weight_decay=1e-2, cautious=True),
}
# Mixed dtypes and layouts on a ("data", "model") mesh of 2 x 4 devices.
PARAM_SPECS = {
    "w": ((8, 16), np.float64, P("data", "model")),
    "b": ((16,), np.float32, P("model")),
    "e": ((6, 4), np.float64, P(None, "model")),
    "s": ((), np.float64, P()),
}


def host_grads(step: int) -> dict[str, np.ndarray]:
    # A spike on the last step, so that StableAdamW's rms clipping fires there.
    rng = np.random.default_rng(100 + step)
    scale = 50.0 if step == N_STEPS - 1 else 1.0
    return {
        k: (scale * rng.standard_normal(shape)).astype(dt)
        for k, (shape, dt, _) in PARAM_SPECS.items()
    }


def make_step(opt):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


def shaped_like_a_param(state, params):
    """``(path, leaf, param key)`` for every state leaf whose path names a param key
    and whose shape is that param's."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        key = getattr(path[-1], "key", None) if path else None
        if key in params and np.shape(leaf) == np.shape(params[key]):
            yield jax.tree_util.keystr(path), leaf, key


def mismatches(state, params, shardings):
    bad, seen = [], 0
    for where, leaf, key in shaped_like_a_param(state, params):
        seen += 1
        if not leaf.sharding.is_equivalent_to(shardings[key], leaf.ndim):
            bad.append(f"{where}: {leaf.sharding} != {shardings[key]}")
    return bad, seen


def tree_mismatches(tree, shardings, what):
    return [
        f"{what}[{k!r}]: {x.sharding} != {shardings[k]}"
        for k, x in tree.items()
        if not x.sharding.is_equivalent_to(shardings[k], x.ndim)
    ]


def main() -> None:
    mesh = make_mesh((2, 4), ("data", "model"), "auto")
    shardings = {k: NamedSharding(mesh, spec) for k, (_, _, spec) in PARAM_SPECS.items()}
    rng = np.random.default_rng(0)
    params0 = {
        k: rng.standard_normal(shape).astype(dt) for k, (shape, dt, _) in PARAM_SPECS.items()
    }
    report = {}
    for name, make in OPTIMIZERS.items():
        opt = make()
        params = jax.device_put(params0, shardings)
        state = jax.jit(opt.init)(params)
        init_bad, init_seen = mismatches(state, params, shardings)
        state_on_host = jax.device_get(state)  # the one-device run starts from it
        g0 = jax.device_put(host_grads(0), shardings)
        step = jax.jit(make_step(opt), donate_argnums=(1,)).lower(params, state, g0).compile()
        for i in range(N_STEPS):
            params, state, updates = step(params, state, jax.device_put(host_grads(i), shardings))
        update_bad, update_seen = mismatches(state, params, shardings)
        update_bad += tree_mismatches(params, shardings, "params")
        update_bad += tree_mismatches(updates, shardings, "updates")
        if name == "schedule_free_adamw":
            evaluated = jax.jit(adam_jax.schedule_free_eval_params)(state, params)
            update_bad += tree_mismatches(evaluated, shardings, "eval params")

        one_step = jax.jit(make_step(opt))
        ref_p, ref_s = params0, state_on_host
        for i in range(N_STEPS):
            ref_p, ref_s, ref_u = one_step(ref_p, ref_s, host_grads(i))
        report[name] = {
            "init_mismatches": init_bad,
            "init_leaves_checked": init_seen,
            "update_mismatches": update_bad,
            "update_leaves_checked": update_seen,
            "collectives": collectives_in(step.as_text()),
            "smallest_lr_scale": min(
                (
                    float(x)
                    for p, x in jax.tree_util.tree_leaves_with_path(state)
                    if "lr_scale" in jax.tree_util.keystr(p)
                ),
                default=1.0,
            ),
            "param_errors": leaf_errors(jax.device_get(params), jax.device_get(ref_p)),
            "update_errors": leaf_errors(jax.device_get(updates), jax.device_get(ref_u)),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
