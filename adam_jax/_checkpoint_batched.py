"""Periodic checkpoints inside :func:`adam_jax.fit_batched`.

With ``checkpoint_dir``, the lanes run in segments of at most
``checkpoint_every`` iterations (:func:`adam_jax._batched.segment`, one step in
every lane per iteration), and after each the run state is saved with
orbax-checkpoint: the lanes (their problems, inputs and loop states, at the
current width), the queue position, whether the lanes still refill, the
results of the problems finished so far (host arrays in input order) and the
iterations and lane-steps counted. Each lane takes the same steps at the same
widths as in one uninterrupted call, so the resumed result is bit-identical.
The problem record, refusal and Ctrl-C handling are those of ``fit``
(:mod:`adam_jax._checkpoint_store`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax import _batched, _fit_checks
from adam_jax import _checkpoint_store as store
from adam_jax._batched import Config, MakeProblem
from adam_jax._result import FitResult

ENTRY = "fit_batched"


def check_args(
    inputs: object, data: object, checkpoint_dir: str | os.PathLike, every: Any, keep: Any
) -> dict[str, Any]:
    """The checkpoint arguments of ``fit_batched``, checked before anything runs."""
    if every is None:
        raise ValueError("checkpoint_dir needs checkpoint_every, the iterations between two saves")
    _fit_checks.check_positive_int("checkpoint_every", every)
    _fit_checks.check_positive_int("checkpoint_keep", keep)
    if isinstance(inputs, Iterator):
        raise ValueError(
            f"checkpoint_dir={str(checkpoint_dir)!r} is not supported with inputs given as an "
            "iterator of chunks; pass the inputs as arrays, or run without checkpoint_dir"
        )
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((inputs, data))):
        raise ValueError(
            "checkpoint_dir needs concrete inputs: call fit_batched with checkpoints outside "
            "jit and vmap (it saves from the host between compiled segments)"
        )
    store.import_orbax(ENTRY)
    return dict(checkpoint_dir=checkpoint_dir, checkpoint_every=every, checkpoint_keep=keep)


def _record(make_problem: MakeProblem, inputs: object, data: object, config: Config, n: int):
    """fit's record of the first problem as ``make_problem`` builds it (loss, params,
    optimizer), with the inputs' trees, shapes, dtypes and values and the options."""
    loss_fn, params, optimizer = make_problem(jax.tree.map(lambda x: x[0], inputs))
    name = getattr(make_problem, "__qualname__", type(make_problem).__qualname__)
    options: dict[str, object] = {
        "make_problem": f"{getattr(make_problem, '__module__', '')}.{name}",
        "problems": n,
        "num_steps": config.num_steps,
        "slots": config.slots,
        "has_aux": config.has_aux,
        "history": list(config.history),
        "inputs.tree": str(jax.tree.structure(inputs)),
        "inputs.values": store.digest(inputs),
    }
    for path, x in jax.tree_util.tree_flatten_with_path(inputs)[0]:
        options[f"inputs{jax.tree_util.keystr(path)}"] = store.leaf_record(x)
    return store.problem_record(
        loss_fn, params, optimizer, config.early_stopping, data, options, prefix=ENTRY
    )


def _with_rows(template: Any, rows: int) -> list[np.ndarray]:
    return [np.zeros((rows, *x.shape[1:]), x.dtype) for x in jax.tree.leaves(template)]


def fit_batched_with_checkpoints(
    make_problem: MakeProblem,
    inputs: object,
    data: object,
    config: Config,
    n: int,
    *,
    checkpoint_dir: str | os.PathLike,
    checkpoint_every: int,
    checkpoint_keep: int,
) -> tuple[FitResult, int]:
    """``fit_batched`` on arrays, saved every ``checkpoint_every`` iterations; the result
    in input order and the lane-steps computed."""
    ocp = store.import_orbax(ENTRY)
    directory = Path(checkpoint_dir).absolute()
    problem = _record(make_problem, inputs, data, config, n)
    unclaimed = store.check_problem(directory, problem, ENTRY)

    every, base = checkpoint_every, jnp.zeros([], jnp.int32)
    run = functools.partial(_batched.segment_jit, config=config)
    lanes_t, queue_t = jax.eval_shape(
        functools.partial(_batched.first_lanes_jit, config=config), inputs, data, base
    )
    results_t = jax.eval_shape(
        functools.partial(run, filling=True), lanes_t, queue_t, inputs, data, base, base
    )[2].results
    lanes_def, results_def = jax.tree.structure(lanes_t), jax.tree.structure(results_t)

    def abstract(record: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {f"lanes{k:05d}": x for k, x in enumerate(_with_rows(lanes_t, record["width"]))}
        out.update({f"results{k:05d}": x for k, x in enumerate(_with_rows(results_t, n))})
        out["have"] = np.zeros(n, bool)
        return out

    mgr = store.manager(ocp, directory, checkpoint_keep)
    bar = _batched.BatchProgress(n) if config.progress else contextlib.nullcontext()
    with mgr, store.Interrupt(every, ENTRY, "iterations") as interrupt, bar:
        saved = store.restore_newest(ocp, mgr, directory, abstract)
        if saved is None:
            lanes, queue = _batched.first_lanes_jit(inputs, data, base, config=config)
            results = _with_rows(results_t, n)
            have = np.zeros(n, bool)
            filling, iterations, computed, finished = True, 0, 0, False
        else:
            arrays, record = saved
            k = lanes_def.num_leaves
            lanes = lanes_def.unflatten([jnp.asarray(arrays[f"lanes{i:05d}"]) for i in range(k)])
            results = [arrays[f"results{i:05d}"] for i in range(results_def.num_leaves)]
            have = arrays["have"]
            queue = jnp.asarray(record["queue"], jnp.int32)
            filling, finished = record["filling"], record["finished"]
            iterations, computed = record["iterations"], record["computed"]
            if isinstance(bar, _batched.BatchProgress):
                bar.bar.update(int(have.sum()))
        while not finished:
            budget = every
            while budget and not finished:
                lanes, queue, out, taken, ended = run(
                    lanes, queue, inputs, data, base, jnp.int32(budget), filling=filling
                )
                # Only the rows written come back to the host.
                ids = np.asarray(out.ids)
                written = ids >= 0
                for r, o in zip(results, jax.tree.leaves(out.results), strict=True):
                    r[ids[written]] = np.asarray(o)[written]
                have[ids[written]] = True
                computed += int(out.computed)
                budget -= int(taken)
                iterations += int(taken)
                if bool(ended):
                    keep = lanes.ids.shape[0] // _batched.SHRINK
                    if keep:
                        lanes, filling = _batched.compact_jit(lanes, keep=keep), False
                    else:
                        finished = True
            tree = {f"lanes{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(lanes))}
            tree.update({f"results{i:05d}": x for i, x in enumerate(results)})
            tree["have"] = have
            progress_record = {
                "queue": int(queue),
                "width": int(lanes.ids.shape[0]),
                "filling": bool(filling),
                "iterations": iterations,
                "computed": computed,
                "finished": finished,
            }
            if unclaimed:
                store.claim(directory, problem)
                unclaimed = False
            store.save(ocp, mgr, tree, progress_record)
            if interrupt.requested:
                break
        if interrupt.requested and not finished:
            raise KeyboardInterrupt(
                f"fit_batched interrupted: checkpoint saved after {iterations} iterations "
                f"({int(have.sum())} of {n} problems finished) in {str(directory)!r}; "
                "run the same fit_batched call with the same checkpoint_dir to resume"
            )
    result = results_def.unflatten([jnp.asarray(r) for r in results])
    return result, computed
