"""Sharding checks on 8 CPU devices, run by tests/test_sharding.py in a subprocess.

The device count is fixed when JAX starts, so these checks cannot run in the
pytest process (one CPU device). This script sets the flags before importing
JAX, runs every check, and prints one JSON report on stdout; the tests assert on
the report, one test per property.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import re
import sys
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
warnings.simplefilter("error")

COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
)

# Optimizers whose `update` must compile to purely local code. The aliases get a
# nonzero weight decay so that the params take part in the update.
OPTIMIZERS = {
    "scale_by_adam": lambda: adam_jax.scale_by_adam(),
    "scale_by_amsgrad": lambda: adam_jax.scale_by_amsgrad(),
    "scale_by_adamax": lambda: adam_jax.scale_by_adamax(),
    "adam": lambda: adam_jax.adam(1e-2, weight_decay=1e-3),
    "adamw": lambda: adam_jax.adamw(1e-2, weight_decay=1e-2),
    "amsgrad": lambda: adam_jax.amsgrad(1e-2, weight_decay=1e-3),
    "adamax": lambda: adam_jax.adamax(1e-2, weight_decay=1e-3),
    "adamaxw": lambda: adam_jax.adamaxw(1e-2, weight_decay=1e-2),
    # Options whose code paths differ: schedules, Nesterov, masks, the corrected max.
    "adam_schedule": lambda: adam_jax.adam(
        optax.exponential_decay(1e-2, transition_steps=2, decay_rate=0.8), weight_decay=1e-3
    ),
    "nadam": lambda: adam_jax.adam(1e-2, nesterov=True),
    "adamw_masked": lambda: adam_jax.adamw(
        1e-2, weight_decay=1e-2, mask={k: k != "b" for k in PARAM_SPECS}
    ),
    "amsgrad_corrected_maximize": lambda: adam_jax.amsgrad(1e-2, max_of="corrected", maximize=True),
    "adamaxw_eps_in_max": lambda: adam_jax.adamaxw(2e-3, eps_in_max=True),
    "nadamw": lambda: adam_jax.nadamw(1e-2, weight_decay=1e-2),
    "radam": lambda: adam_jax.radam(1e-2, weight_decay=1e-3),
}
N_STEPS = 3
STATE_TYPES = (
    adam_jax.AdamState,
    adam_jax.AMSGradState,
    adam_jax.AdamaxState,
    adam_jax.NAdamState,
    adam_jax.RAdamState,
)

# Params of mixed dtypes and layouts on a ("data", "model") mesh of 2 x 4 devices.
PARAM_SPECS = {
    "w": ((8, 16), np.float64, P("data", "model")),
    "b": ((16,), np.float32, P("model")),
    "e": ((6, 4), np.float64, P(None, "model")),
    "h": ((4, 8), jnp.bfloat16, P("data", "model")),
    "z": ((4, 4), np.complex64, P("data", None)),
    "s": ((), np.float64, P()),
}


def collectives_in(compiled_text: str) -> list[str]:
    return [name for name in COLLECTIVES if name in compiled_text]


def collective_result_types(compiled_text: str) -> list[str]:
    """The result type of every collective instruction, such as ``pred[]``."""
    ops = "|".join(COLLECTIVES)
    return re.findall(rf"= (.+?) (?:{ops})(?:-start)?\(", compiled_text)


def make_mesh(shape, names, mode):
    kind = AxisType.Auto if mode == "auto" else AxisType.Explicit
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def mesh_context(mesh, mode):
    """``jax.set_mesh`` on both axis types: Explicit axes need it, Auto axes allow it."""
    del mode
    return jax.set_mesh(mesh)


def host_params(rng):
    return {
        k: (rng.normal(size=shape) + (1j * rng.normal(size=shape) if k == "z" else 0)).astype(dt)
        for k, (shape, dt, _) in PARAM_SPECS.items()
    }


def host_grads(params, step):
    return jax.tree.map(lambda p: np.asarray(np.sin(np.asarray(p) * (step + 1)), p.dtype), params)


def inner_state(state):
    if isinstance(state, STATE_TYPES):
        return state
    (found,) = [s for s in state if isinstance(s, STATE_TYPES)]
    return found


def type_mismatch(x, want, mode):
    """On Explicit axes the sharding is part of the type: ``jax.typeof(x)`` must name ``want``."""
    if mode != "explicit":
        return None
    got = jax.typeof(x).sharding.spec
    padded = P(*want.spec, *(None,) * (x.ndim - len(want.spec)))
    return None if got == padded else f"typeof spec {got} != {padded}"


def moment_mismatches(state, shardings, mode):
    """``field['leaf']`` for every moment leaf whose sharding differs from its param's."""
    inner = inner_state(state)
    bad = []
    for field in inner._fields:
        if field in ("count", "mu_product"):  # scalars, not shaped like the params
            continue
        for key, leaf in getattr(inner, field).items():
            bad += tree_mismatches({key: leaf}, shardings, field, mode)
    return bad


def tree_mismatches(tree, shardings, what, mode):
    bad = []
    for k, x in tree.items():
        if not x.sharding.is_equivalent_to(shardings[k], x.ndim):
            bad.append(f"{what}[{k!r}]: {x.sharding} != {shardings[k]}")
        if (err := type_mismatch(x, shardings[k], mode)) is not None:
            bad.append(f"{what}[{k!r}]: {err}")
    return bad


def leaf_errors(got, expected):
    """Per leaf: ``[dtype, max |got - expected| / max |expected|]``."""
    return {
        k: [
            jnp.dtype(expected[k].dtype).name,
            float(np.max(np.abs(np.asarray(got[k], np.complex128) - np.asarray(expected[k]))))
            / max(float(np.max(np.abs(np.asarray(expected[k], np.complex128)))), 1e-300),
        ]
        for k in expected
    }


def make_step(opt):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def reference_run(opt, params, n_steps):
    """The same steps on one device, from host arrays."""
    step = jax.jit(make_step(opt))
    state = opt.init(params)
    for i in range(n_steps):
        params, state = step(params, state, host_grads(params, i))
    return jax.device_get(params)


def check_param_sharded(mode, references):
    """Sharded params: state shardings after init and after donated updates, no collectives."""
    mesh = make_mesh((2, 4), ("data", "model"), mode)
    shardings = {k: NamedSharding(mesh, spec) for k, (_, _, spec) in PARAM_SPECS.items()}
    params0 = host_params(np.random.default_rng(0))
    apply_updates = jax.jit(optax.apply_updates, donate_argnums=(0,))
    out = {}
    for name, make in OPTIMIZERS.items():
        opt = make()
        with mesh_context(mesh, mode):
            params = jax.device_put(params0, shardings)
            state = jax.jit(opt.init)(params)
            after_init = moment_mismatches(state, shardings, mode)
            grads = jax.device_put(host_grads(params0, 0), shardings)
            # The compiled update that runs is the one whose HLO is scanned.
            update = jax.jit(opt.update, donate_argnums=(1,)).lower(grads, state, params).compile()
            for i in range(N_STEPS):
                grads = jax.device_put(host_grads(jax.device_get(params), i), shardings)
                updates, state = update(grads, state, params)
                params = apply_updates(params, updates)
            after_update = moment_mismatches(state, shardings, mode)
            after_update += tree_mismatches(params, shardings, "params", mode)
            after_update += tree_mismatches(updates, shardings, "updates", mode)
            out[name] = {
                "init_mismatches": after_init,
                "update_mismatches": after_update,
                "update_collectives": collectives_in(update.as_text()),
                "errors": leaf_errors(jax.device_get(params), references[name]),
            }
    return out


def check_canary():
    """The collective scan does see collectives: a sum over a sharded array has one."""
    mesh = make_mesh((2, 4), ("data", "model"), "auto")
    x = jax.device_put(np.ones((8, 16)), NamedSharding(mesh, P("data", "model")))
    hlo = jax.jit(jnp.sum).lower(x).compile().as_text()
    return {"sum_collectives": collectives_in(hlo)}


def check_zero1(mode):
    """ZeRO-1: replicated params, state split over "data"; equal results, fewer bytes."""
    mesh = make_mesh((4, 2), ("data", "model"), mode)
    replicated = NamedSharding(mesh, P())
    rng = np.random.default_rng(1)
    params0 = {
        "w": rng.normal(size=(16, 12)),
        "b": rng.normal(size=(12,)),
        "odd": rng.normal(size=(3, 5)),
        "s": np.float64(rng.normal()),
    }
    out = {}
    for name in ("adam", "amsgrad", "adamax"):
        opt = OPTIMIZERS[name]()
        expected = reference_run(opt, params0, N_STEPS)
        with mesh_context(mesh, mode):
            params = jax.device_put(params0, replicated)
            state_sh = adam_jax.zero1_state_shardings(opt, params, mesh, axis="data")
            state = jax.jit(opt.init, out_shardings=state_sh)(params)
            got_init = jax.tree.map(lambda x: str(x.sharding.spec), state)
            want = jax.tree.map(lambda s: str(s.spec), state_sh)
            step = jax.jit(
                make_step(opt),
                in_shardings=(replicated, state_sh, replicated),
                out_shardings=(replicated, state_sh),
                donate_argnums=(0, 1),
            )
            grads = jax.device_put(host_grads(params0, 0), replicated)
            step = step.lower(params, state, grads).compile()
            hlo = step.as_text()
            for i in range(N_STEPS):
                grads = jax.device_put(host_grads(jax.device_get(params), i), replicated)
                params, state = step(params, state, grads)
            replicated_state = jax.jit(opt.init, out_shardings=replicated)(
                jax.device_put(params0, replicated)
            )
            inner = inner_state(state)
            out[name] = {
                "specs_match_after_init": got_init == want,
                "specs_match_after_step": jax.tree.map(lambda x: str(x.sharding.spec), state)
                == want,
                "moment_specs": {
                    f: {k: str(v.sharding.spec) for k, v in getattr(inner, f).items()}
                    for f in inner._fields
                    if f != "count"
                },
                "n_moments": len(inner._fields) - 1,
                "errors": leaf_errors(jax.device_get(params), expected),
                "bytes_zero1": adam_jax.bytes_per_device(state),
                "bytes_zero1_planned": adam_jax.bytes_per_device(
                    jax.eval_shape(opt.init, params), state_sh
                ),
                "bytes_replicated": adam_jax.bytes_per_device(replicated_state),
                "addressable_bytes_device0": sum(
                    s.data.nbytes
                    for x in jax.tree.leaves(state)
                    for s in x.addressable_shards
                    if s.device == jax.devices()[0]
                ),
                "step_collectives": collectives_in(hlo),
            }
    return out


def check_zero1_rule():
    mesh = make_mesh((4, 2), ("data", "model"), "auto")
    cases = {
        "largest": adam_jax.zero1_spec((8, 16), 4, "data"),
        "only_divisible": adam_jax.zero1_spec((16, 6), 4, "data"),
        "tie_first": adam_jax.zero1_spec((8, 8), 4, "data"),
        "indivisible": adam_jax.zero1_spec((3, 5), 4, "data"),
        "scalar": adam_jax.zero1_spec((), 4, "data"),
        "empty": adam_jax.zero1_spec((0, 8), 4, "data"),
    }
    try:
        adam_jax.zero1_state_shardings(adam_jax.adam(), {"w": np.ones(4)}, mesh, axis="batch")
        bad_axis = None
    except ValueError as e:
        bad_axis = str(e)
    return {"specs": {k: str(v) for k, v in cases.items()}, "bad_axis_error": bad_axis}


def batched_problems(n):
    """``n`` small regressions, each with its own data, start and learning rate."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, 32, 4))
    w_true = rng.normal(size=(n, 4))
    y = np.einsum("nsd,nd->ns", x, w_true) + 0.1 * rng.normal(size=(n, 32))
    w0 = rng.normal(size=(n, 4))
    lr = np.linspace(0.01, 0.1, n)
    return w0, x, y, lr


def fit_one(w0, x, y, lr, with_early_stopping):
    loss_fn = lambda w: jnp.mean((x @ w - y) ** 2)
    es = adam_jax.early_stopping(patience=5, min_delta=1e-6) if with_early_stopping else None
    return adam_jax.fit(loss_fn, w0, adam_jax.adam(lr), num_steps=300, early_stopping=es)


def check_batched_fit(mode, variants):
    """jit(vmap(fit)) with the problem axis split over all 8 devices.

    With Explicit mesh axes, JAX 0.10 cannot batch a while loop whose predicate
    becomes batched ("Resource axis ... not found in mesh: ()" from
    ``_while_loop_batching_rule``), which is what early stopping under vmap makes;
    that variant runs on Auto axes only.
    """
    n = 16
    problems = batched_problems(n)
    mesh = make_mesh((8,), ("problems",), mode)
    by_problem = NamedSharding(mesh, P("problems"))
    out = {}
    for es in variants:
        single = jax.jit(lambda *a, es=es: fit_one(*a, es))
        alone = [jax.device_get(single(*(a[i] for a in problems))) for i in range(n)]
        with mesh_context(mesh, mode):
            batched = jax.jit(
                jax.vmap(lambda *a, es=es: fit_one(*a, es)),
                in_shardings=by_problem,
                out_shardings=by_problem,
            )
            args = jax.device_put(problems, by_problem)
            hlo = batched.lower(*args).compile().as_text()
            result = batched(*args)
        # Which problems each device computed, read from the result's shards.
        shards = {
            str(s.device.id): [int(i) for i in np.arange(n)[s.index[0]]]
            for s in result.params.addressable_shards
        }
        errors = []
        for field in ("params", "losses", "num_steps", "stop_reason", "best_step"):
            got = np.asarray(getattr(result, field))
            want = np.stack([np.asarray(getattr(r, field)) for r in alone])
            both_nan = np.isnan(got) & np.isnan(want) if got.dtype.kind == "f" else False
            diff = np.where(both_nan, 0.0, np.abs(got - want))
            errors.append([field, float(np.max(diff))])
        out["early_stopping" if es else "fixed_steps"] = {
            "collectives": collectives_in(hlo),
            "collective_result_types": collective_result_types(hlo),
            "params_spec": str(result.params.sharding.spec),
            "problems_per_device": shards,
            "device_ids": sorted(int(d.id) for d in result.params.sharding.device_set),
            "max_abs_errors": errors,
            "num_steps": [int(k) for k in result.num_steps],
        }
    return out


# The library's own directory: a checkout (or its virtual environment) may itself
# sit in a directory named adam_jax.
PACKAGE = os.path.dirname(os.path.abspath(adam_jax.__file__)) + os.sep


def error_record(fn):
    try:
        fn()
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        return {
            "type": type(e).__name__,
            "module": type(e).__module__,
            "is_value_error": isinstance(e, ValueError),
            "message": str(e),
            "adam_jax_frames": [
                f.name for f in frames if os.path.abspath(f.filename).startswith(PACKAGE)
            ],
        }
    return None


def check_bad_input():
    mesh = make_mesh((8,), ("batch",), "auto")
    by_batch = NamedSharding(mesh, P("batch"))
    opt = adam_jax.adam(1e-2)
    six = np.ones((6, 3))

    # A mesh that does not divide the batch: JAX refuses to place it.
    indivisible_put = error_record(lambda: jax.device_put(six, by_batch))
    # The same through jit with in_shardings, around an adam_jax function.
    indivisible_jit = error_record(lambda: jax.jit(jax.vmap(opt.init), in_shardings=by_batch)(six))
    # Params on two disjoint sets of devices: no sharding can be inferred.
    devs = jax.devices()
    a = jax.device_put(np.ones(4), NamedSharding(jax.sharding.Mesh(devs[:4], ("x",)), P("x")))
    b = jax.device_put(np.ones(4), NamedSharding(jax.sharding.Mesh(devs[4:], ("x",)), P("x")))
    disjoint_update = error_record(
        lambda: jax.jit(opt.update)({"a": a, "b": b}, opt.init({"a": a, "b": a}), {"a": a, "b": b})
    )
    return {
        "indivisible_device_put": indivisible_put,
        "indivisible_jit": indivisible_jit,
        "disjoint_update": disjoint_update,
    }


def main():
    report = {"device_count": jax.device_count(), "platform": jax.default_backend()}
    params0 = host_params(np.random.default_rng(0))
    references = {
        name: reference_run(make(), params0, N_STEPS) for name, make in OPTIMIZERS.items()
    }
    for mode in ("auto", "explicit"):
        report[f"param_sharded_{mode}"] = check_param_sharded(mode, references)
        report[f"zero1_{mode}"] = check_zero1(mode)
    report["batched_fit_auto"] = check_batched_fit("auto", (False, True))
    report["batched_fit_explicit"] = check_batched_fit("explicit", (False,))
    report["canary"] = check_canary()
    report["zero1_rule"] = check_zero1_rule()
    report["bad_input"] = check_bad_input()
    json.dump(report, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
