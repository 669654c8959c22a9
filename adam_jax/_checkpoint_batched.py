"""Periodic checkpoints inside :func:`adam_jax.fit_batched`.

With ``checkpoint_dir``, the lanes run in segments of at most
``checkpoint_every`` iterations (:func:`adam_jax._batched.segment`, one step in
every lane per iteration), and after each the run state is saved with
orbax-checkpoint: the lanes (their problems, inputs and loop states, at the
current width), the chunk and queue position, whether the lanes still refill,
the results of the problems finished so far (host arrays, with their problem
numbers) and the iterations and lane-steps counted. Each lane takes the same
steps at the same widths as in one uninterrupted call, so the resumed result
is bit-identical. Arrays are one chunk; with an iterator the chunks consumed
are recorded by digest, pulled again on resume and skipped. The problem record,
refusal and Ctrl-C handling are those of ``fit`` (:mod:`adam_jax._checkpoint_store`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax import _batched, _fit_checks
from adam_jax import _checkpoint_store as store
from adam_jax._batched import Config, MakeProblem
from adam_jax._early_stopping import EarlyStopping
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
    if not isinstance(inputs, Iterator) and any(
        isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((inputs, data))
    ):
        raise ValueError(
            "checkpoint_dir needs concrete inputs: call fit_batched with checkpoints outside "
            "jit and vmap (it saves from the host between compiled segments)"
        )
    store.import_orbax(ENTRY)
    return dict(checkpoint_dir=checkpoint_dir, checkpoint_every=every, checkpoint_keep=keep)


def _record(
    make_problem: MakeProblem,
    es: EarlyStopping | None,
    inputs: object,
    data: object,
    config: Config,
    n: int,
):
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
    if data is not None:
        options["data.values"] = store.digest(data)
    for path, x in jax.tree_util.tree_flatten_with_path(inputs)[0]:
        options[f"inputs{jax.tree_util.keystr(path)}"] = store.leaf_record(x)
    return store.problem_record(loss_fn, params, optimizer, es, data, options, prefix=ENTRY)


def _with_rows(template: Any, rows: int) -> list[np.ndarray]:
    return [np.zeros((rows, *x.shape[1:]), x.dtype) for x in jax.tree.leaves(template)]


class _Chunks:
    """The chunks of problems, pulled one ahead (the last one runs the narrowing tail);
    a resumed run pulls again those the checkpoint had consumed, and checks them."""

    def __init__(self, chunks: Iterator[tuple[object, object]], count: Callable[[object], int]):
        self.chunks, self.count = chunks, count
        self.digests: list[str] = []
        self.index = self.base = 0  # the current chunk, and its first problem's number
        self.current = self._pull()
        if self.current is None:
            raise ValueError("inputs is an empty iterator: it must yield at least one chunk")
        self.following = self._pull()

    def _pull(self) -> tuple[object, object] | None:
        chunk = next(self.chunks, None)
        if chunk is not None:
            self.digests.append(store.digest(chunk))
        return chunk

    @property
    def n(self) -> int:
        return self.count(cast(tuple, self.current)[0])

    def advance(self) -> None:
        self.base += self.n
        self.index += 1
        self.current, self.following = self.following, self._pull()

    def skip_to(self, record: dict[str, Any]) -> None:
        """Pull chunks until this run is where the checkpoint's run was."""
        while self.index < record["chunk"] and self.following is not None:
            self.advance()
        if self.digests != record["chunks"]:
            raise ValueError(
                f"inputs yielded other chunks than the run that wrote the checkpoint "
                f"({len(self.digests)} chunks pulled, {len(record['chunks'])} recorded, "
                "or their values differ): pass the identical iterator of chunks to resume"
            )


def fit_batched_with_checkpoints(
    make_problem: MakeProblem,
    early_stopping: EarlyStopping | None,
    chunks: Iterator[tuple[object, object]],
    config: Callable[[object, object], Config],
    count: Callable[[object], int],
    *,
    streamed: bool,
    checkpoint_dir: str | os.PathLike,
    checkpoint_every: int,
    checkpoint_keep: int,
) -> tuple[FitResult, int]:
    """``fit_batched`` on ``(inputs, data)`` chunks (one for arrays), saved every
    ``checkpoint_every`` iterations; the result in input order and the lane-steps computed.

    ``config(inputs, data)`` builds the run's config from the first chunk."""
    ocp = store.import_orbax(ENTRY)
    directory = Path(checkpoint_dir).absolute()
    source = _Chunks(chunks, count)
    inputs, data = cast(tuple, source.current)
    run_config = config(inputs, data)
    problem = _record(make_problem, early_stopping, inputs, data, run_config, source.n)
    problem[f"{ENTRY}.inputs.kind"] = "iterator of chunks" if streamed else "arrays"
    unclaimed = store.check_problem(directory, problem, ENTRY)

    every, zero, rule = checkpoint_every, jnp.zeros([], jnp.int32), _batched.Rule(early_stopping)
    run = functools.partial(_batched.segment_jit, config=run_config)
    lanes_t, queue_t = jax.eval_shape(
        functools.partial(_batched.first_lanes_jit, config=run_config), inputs, data, zero, rule
    )
    results_t = jax.eval_shape(
        functools.partial(run, filling=True, final=True),
        lanes_t, queue_t, inputs, data, zero, zero, rule,
    )[2].results  # fmt: skip
    lanes_def, results_def = jax.tree.structure(lanes_t), jax.tree.structure(results_t)

    def abstract(record: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {f"lanes{k:05d}": x for k, x in enumerate(_with_rows(lanes_t, record["width"]))}
        rows = _with_rows(results_t, record["rows"])
        out.update({f"results{k:05d}": x for k, x in enumerate(rows)})
        out["ids"] = np.zeros(record["rows"], np.int32)
        return out

    mgr = store.manager(ocp, directory, checkpoint_keep)
    total = None if streamed else source.n
    bar = _batched.BatchProgress(total) if run_config.progress else contextlib.nullcontext()
    with mgr, store.Interrupt(every, ENTRY, "iterations") as interrupt, bar:
        saved = store.restore_newest(ocp, mgr, directory, abstract)
        if saved is None:
            lanes, queue = _batched.first_lanes_jit(inputs, data, zero, rule, config=run_config)
            results = [_with_rows(results_t, 0)]
            ids = [np.zeros(0, np.int32)]
            filling, iterations, computed, finished = True, 0, 0, False
        else:
            arrays, record = saved
            source.skip_to(record)
            k = lanes_def.num_leaves
            lanes = store.restore_like(lanes_t, [arrays[f"lanes{i:05d}"] for i in range(k)])
            results = [[arrays[f"results{i:05d}"] for i in range(results_def.num_leaves)]]
            ids = [arrays["ids"]]
            queue = jnp.asarray(record["queue"], jnp.int32)
            filling, finished = record["filling"], record["finished"]
            iterations, computed = record["iterations"], record["computed"]
            if isinstance(bar, _batched.BatchProgress):
                bar.bar.update(record["rows"])
        while not finished:
            budget = every
            while budget and not finished:
                inputs, data = cast(tuple, source.current)
                final = source.following is None
                lanes, queue, out, taken, ended = run(
                    lanes, queue, inputs, data, jnp.int32(source.base), jnp.int32(budget),
                    rule, filling=filling, final=final,
                )  # fmt: skip
                # Only the rows written come back to the host.
                written = np.flatnonzero(np.asarray(out.ids) >= 0)
                results.append([np.asarray(o)[written] for o in jax.tree.leaves(out.results)])
                ids.append(np.asarray(out.ids)[written])
                computed += int(out.computed)
                budget -= int(taken)
                iterations += int(taken)
                if not bool(ended):
                    continue
                if not final:  # the queue is empty: the lanes go on with the next chunk
                    source.advance()
                    queue = jnp.zeros([], jnp.int32)
                elif keep := _batched.next_width(lanes.ids.shape[0], run_config.slots):
                    lanes, filling = _batched.compact_jit(lanes, keep=keep), False
                else:
                    finished = True
            results = [[np.concatenate(r) for r in zip(*results, strict=True)]]
            ids = [np.concatenate(ids)]
            tree = {f"lanes{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(lanes))}
            tree.update({f"results{i:05d}": x for i, x in enumerate(results[0])})
            tree["ids"] = ids[0]
            progress_record = {
                "chunk": source.index,
                "chunks": source.digests,
                "queue": int(queue),
                "width": int(lanes.ids.shape[0]),
                "filling": bool(filling),
                "iterations": iterations,
                "computed": computed,
                "rows": len(ids[0]),
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
                f"({len(ids[0])} problems finished) in {str(directory)!r}; "
                "run the same fit_batched call with the same checkpoint_dir to resume"
            )
    order = np.argsort(np.concatenate(ids), kind="stable")
    rows = [np.concatenate(r)[order] for r in zip(*results, strict=True)]
    as_array = np.asarray if streamed else jnp.asarray
    return results_def.unflatten([as_array(r) for r in rows]), computed
