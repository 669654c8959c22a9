"""One process of a multi-process adam_jax run on CPU, launched by tests/test_multiprocess.py.

Run it once per process; every process runs the same program on its own devices:

    python tests/_multiprocess_worker.py --num-processes 2 --process-id 0 \
        --coordinator localhost:12355 --devices 4 --out OUT --task compute --save-to CKPT
    python tests/_multiprocess_worker.py --num-processes 2 --process-id 1 \
        --coordinator localhost:12355 --devices 4 --out OUT --task compute --save-to CKPT

With ``--num-processes 1`` the same program runs in one process (no coordinator).
``compute`` trains the optimizers and a vmapped ``fit`` on meshes spanning every
process's devices and optionally checkpoints with orbax; ``restore`` reads a
checkpoint written by any number of processes. Process 0 writes the gathered
results to ``OUT/result.npz``; each process writes ``OUT/process_{i}.json``
(which devices and problems it held). docs/multihost.md quotes this file.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--task", choices=["compute", "restore"], required=True)
    p.add_argument("--save-to", type=pathlib.Path, default=None)
    p.add_argument("--restore-from", type=pathlib.Path, default=None)
    return p.parse_args()


ARGS = parse_args()
# The CPU device count is fixed when JAX starts: set it before the import.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adam_jax  # noqa: E402


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    # CPU devices of different processes talk through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
    )


AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
OPTIMIZERS = {
    "adam": lambda: adam_jax.adam(1e-2, weight_decay=1e-3),
    "amsgrad": lambda: adam_jax.amsgrad(1e-2, weight_decay=1e-3),
    "adamax": lambda: adam_jax.adamax(1e-2, weight_decay=1e-3),
}
LAYOUTS = ("sharded", "replicated", "zero1")
N_STEPS = 10
# The vmapped fits that run, as (axis type, early stopping or not). Every
# process count runs the same list.
FIT_VARIANTS = (("auto", False), ("auto", True), ("explicit", False))
N_PROBLEMS = 16


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value that every process holds in full.

    Each process fills only the shards on its own devices.
    """
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gather(tree):
    """Every leaf of ``tree`` as one NumPy array, on every process."""
    return multihost_utils.process_allgather(tree, tiled=True)


def meshes(axis_type: str):
    kind = AXIS_TYPES[axis_type]
    return {
        "model": jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind)),
        "data": jax.make_mesh((8,), ("data",), axis_types=(kind,)),
    }


def host_params():
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(16, 8)).astype(np.float32),
        "b": rng.normal(size=(8,)).astype(np.float32),
        "s": np.float32(rng.normal()),
    }


def loss(params):
    return sum(jnp.sum(jnp.sin(p) + 0.1 * p**2) for p in jax.tree.leaves(params))


def layout(name: str, axis_type: str, opt, params0):
    """Shardings of params and optimizer state for one layout on 8 devices."""
    mesh = meshes(axis_type)
    if name == "sharded":
        m = mesh["model"]
        specs = {"w": P("data", "model"), "b": P("model"), "s": P()}
        params_sh = {k: NamedSharding(m, spec) for k, spec in specs.items()}
        state_sh = None  # the state follows the params
        return m, params_sh, state_sh
    m = mesh["data"]
    params_sh = jax.tree.map(lambda _: NamedSharding(m, P()), params0)
    if name == "replicated":
        return m, params_sh, None
    return m, params_sh, adam_jax.zero1_state_shardings(opt, params0, m, axis="data")


def train(opt, params, state, params_sh, state_sh, n_steps):
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, out_shardings=(params_sh, state_sh), donate_argnums=(0, 1))
    for _ in range(n_steps):
        params, state = step(params, state)
    return params, state


def run_optimizers(axis_type: str):
    """Params and state after ``N_STEPS`` for every optimizer and layout."""
    out = {}
    for opt_name, make in OPTIMIZERS.items():
        opt = make()
        for name in LAYOUTS:
            params0 = host_params()
            mesh, params_sh, state_sh = layout(name, axis_type, opt, params0)
            with jax.set_mesh(mesh):
                params = jax.tree.map(global_array, params0, params_sh)
                state = jax.jit(opt.init, out_shardings=state_sh)(params)
                init_specs = [str(x.sharding.spec) for x in jax.tree.leaves(state)]
                params, state = train(opt, params, state, params_sh, state_sh, N_STEPS)
                specs = [str(x.sharding.spec) for x in jax.tree.leaves(state)]
            out[(axis_type, opt_name, name)] = (params, state, init_specs, specs)
    return out


def batched_problems():
    """``N_PROBLEMS`` small regressions, each with its own data, start and learning rate."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(N_PROBLEMS, 32, 4))
    w_true = rng.normal(size=(N_PROBLEMS, 4))
    y = np.einsum("nsd,nd->ns", x, w_true) + 0.1 * rng.normal(size=(N_PROBLEMS, 32))
    w0 = rng.normal(size=(N_PROBLEMS, 4))
    lr = np.linspace(0.01, 0.1, N_PROBLEMS)
    return [a.astype(np.float32) for a in (w0, x, y, lr)]


def fit_one(w0, x, y, lr, with_early_stopping):
    es = adam_jax.early_stopping(patience=5, min_delta=1e-6) if with_early_stopping else None
    return adam_jax.fit(
        lambda w: jnp.mean((x @ w - y) ** 2),
        w0,
        adam_jax.adam(lr),
        num_steps=100,
        early_stopping=es,
    )


def run_batched_fit(axis_type: str, with_early_stopping: bool):
    """jit(vmap(fit)) over 16 problems, split over all 8 devices of all processes."""
    kind = AXIS_TYPES[axis_type]
    mesh = jax.make_mesh((8,), ("problems",), axis_types=(kind,))
    by_problem = NamedSharding(mesh, P("problems"))
    with jax.set_mesh(mesh):
        args = [global_array(a, by_problem) for a in batched_problems()]
        batched = jax.jit(
            jax.vmap(lambda *a: fit_one(*a, with_early_stopping)),
            in_shardings=by_problem,
            out_shardings=by_problem,
        )
        result = batched(*args)
    # The problems whose params live on this process's devices.
    local = sorted(
        int(i) for s in result.params.addressable_shards for i in np.arange(N_PROBLEMS)[s.index[0]]
    )
    return result, local


def checkpoint_tree(runs):
    """What the checkpoint holds: adam's params and state in every layout (Explicit axes)."""
    return {name: runs[("explicit", "adam", name)][:2] for name in LAYOUTS}


def save_checkpoint(path: pathlib.Path, tree) -> None:
    import orbax.checkpoint as ocp

    # Every process calls save; each writes the shards it owns.
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), tree)
        ckptr.wait_until_finished()


def restore_checkpoint(path: pathlib.Path, abstract_tree):
    import orbax.checkpoint as ocp

    # Shapes, dtypes and the shardings to restore into, on this run's devices.
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path.absolute(), abstract_tree)


def abstract_checkpoint_tree():
    """The checkpoint's layout on this run's meshes, without computing anything."""
    tree = {}
    opt = OPTIMIZERS["adam"]()
    for name in LAYOUTS:
        params0 = host_params()
        mesh, params_sh, state_sh = layout(name, "explicit", opt, params0)
        with jax.set_mesh(mesh):
            params = jax.tree.map(
                lambda p, sh: jax.ShapeDtypeStruct(np.shape(p), p.dtype, sharding=sh),
                params0,
                params_sh,
            )
            state = jax.eval_shape(opt.init, params)
            if state_sh is None:  # the state follows the params; the step count is replicated
                state_sh = jax.tree.map(
                    lambda s, m=mesh: NamedSharding(m, s.sharding.spec if s.sharding else P()),
                    state,
                )
            state = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, state_sh
            )
        tree[name] = (params, state)
    return tree


def flat(prefix, tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def main():
    if ARGS.num_processes > 1:
        initialize(ARGS.coordinator, ARGS.num_processes, ARGS.process_id)
    assert jax.process_count() == ARGS.num_processes
    assert jax.device_count() == 8, jax.devices()
    arrays, info = (
        {},
        {
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "local_device_ids": [d.id for d in jax.local_devices()],
        },
    )
    # Wall and CPU seconds since start, per phase: what the run costs.
    start = time.perf_counter()
    lap = lambda what: info.setdefault("seconds", {}).update(
        {what: [round(time.perf_counter() - start, 2), round(time.process_time(), 2)]}
    )
    if ARGS.task == "compute":
        runs = {}
        for axis_type in AXIS_TYPES:
            runs.update(run_optimizers(axis_type))
            lap("optimizers_" + axis_type)
        info["state_specs"] = {}
        for key, (params, state, init_specs, specs) in runs.items():
            tag = "/".join(key)
            arrays.update(flat(f"opt/{tag}/params", gather(params)))
            arrays.update(flat(f"opt/{tag}/state", gather(state)))
            info["state_specs"][tag] = {"init": init_specs, "final": specs}
        info["local_problems"] = {}
        for axis_type, es in FIT_VARIANTS:
            tag = f"{axis_type}/{'early_stopping' if es else 'fixed_steps'}"
            result, local = run_batched_fit(axis_type, es)
            arrays.update(flat(f"fit/{tag}/", gather(result)))
            info["local_problems"][tag] = local
            lap(tag)
        if ARGS.save_to is not None:
            tree = checkpoint_tree(runs)
            save_checkpoint(ARGS.save_to, tree)
            arrays.update(flat("saved", gather(tree)))
    if ARGS.restore_from is not None:
        abstract = abstract_checkpoint_tree()
        restored = restore_checkpoint(ARGS.restore_from, abstract)
        info["restored_shardings_match"] = all(
            r.sharding.is_equivalent_to(a.sharding, r.ndim)
            for r, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True)
        )
        arrays.update(flat("restored", gather(restored)))
        lap("restore")
    ARGS.out.mkdir(parents=True, exist_ok=True)
    (ARGS.out / f"process_{jax.process_index()}.json").write_text(json.dumps(info))
    if jax.process_index() == 0:
        np.savez(ARGS.out / "result.npz", **arrays)


if __name__ == "__main__":
    main()
