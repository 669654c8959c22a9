"""A batched run that hands control back to the host between segments of the lanes.

Streamed chunks, :func:`adam_jax.fit_batched`'s progress bar and its checkpoints
run the lanes in budgets of iterations (:func:`adam_jax._batched.segment`), each
lane taking the same steps as in one compiled :func:`adam_jax._batched.run_all`.
:class:`Run` is that driver, an :class:`adam_jax._checkpoint.Engine`;
:class:`Chunks` feeds it the problems.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax import _batched, _checkpoint, _compile, _reporting
from adam_jax._batched import Config, Lanes, MakeProblem
from adam_jax._early_stopping import EarlyStopping
from adam_jax._result import BatchedWork, FitResult
from adam_jax._tree import Split

ENTRY = "fit_batched"
Chunk = tuple[object, object]  # (inputs, data) of some problems


def count(inputs: object, what: str) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError(f"{what} has no array leaves: it must hold at least one problem")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"the leaves of {what} must share a leading axis of N >= 1 problems, "
            f"got leading sizes {sorted(sizes, key=str)}"
        )
    return cast(int, sizes.pop())


def with_work(result: FitResult, computed: int) -> FitResult:
    # A problem that stopped also computed its stopping step.
    stopped = np.asarray(result.stop_reason) != 0
    needed = int(np.sum(np.asarray(result.num_steps, np.int64)) + np.sum(stopped))
    return result._replace(work=BatchedWork(computed, needed))


class Chunks:
    """The chunks of problems, pulled one ahead (the lanes run to the end in the last one);
    a resumed run pulls again those the checkpoint had consumed, and checks them."""

    def __init__(self, chunks: Iterator[Chunk], what: str) -> None:
        self.chunks, self.what = chunks, what
        self.digests: list[str] = []
        self.index = self.base = 0  # the current chunk, and its first problem's number
        current = self._pull()
        if current is None:
            raise ValueError("inputs is an empty iterator: it must yield at least one chunk")
        self.current, self.following = current, self._pull()

    def _pull(self) -> Chunk | None:
        chunk = next(self.chunks, None)
        if chunk is not None:
            self.digests.append(_checkpoint.digest(chunk))
        return chunk

    @property
    def n(self) -> int:
        return count(self.current[0], self.what)

    def advance(self) -> None:
        self.base += self.n
        self.index += 1
        following = self.following
        assert following is not None  # the caller advances only past a chunk that is not the last
        self.current, self.following = following, self._pull()

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


@dataclasses.dataclass
class _State:
    """A batched run between two segments (host side)."""

    lanes: Lanes
    queue: jax.Array
    iterations: int
    computed: int  # lane-steps
    finished: bool
    rows: list[list[np.ndarray]]  # the finished problems' FitResult leaves, per segment
    ids: list[np.ndarray]  # and their problem numbers

    def gathered(self) -> tuple[list[np.ndarray], np.ndarray]:
        self.rows = [[np.concatenate(r) for r in zip(*self.rows, strict=True)]]
        self.ids = [np.concatenate(self.ids)]
        return self.rows[0], self.ids[0]


class Run:
    """A batched run that hands control back to the host between segments: an
    :class:`adam_jax._checkpoint.Engine` (one step in every lane is an iteration)."""

    entry, unit = ENTRY, "iterations"

    def __init__(self, config: Any, rule: Split[Any], source: Chunks, streamed: bool,
                 progress: bool) -> None:  # fmt: skip
        self.rule, self.source, self.streamed = rule, source, streamed
        inputs, data = source.current
        self.config: Config = config(data, source.n)
        self.segment = functools.partial(
            _compile.compiled(_batched.segment, "config", "final"), config=self.config
        )
        self.lanes_t, self.results_t = _batched.shapes(inputs, data, rule, self.config)
        self.bar = _reporting.ProblemBar(None if streamed else source.n) if progress else None
        self.tick = 64  # iterations between two bar updates, adapted to take ~0.2 s

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def fresh(self) -> _State:
        inputs, data = self.source.current
        zero = jnp.zeros([], jnp.int32)
        first = _compile.compiled(_batched.first_lanes, "config")
        lanes, queue = first(inputs, data, zero, self.rule, config=self.config)
        empty = [np.zeros((0, *x.shape[1:]), x.dtype) for x in jax.tree.leaves(self.results_t)]
        return _State(lanes, queue, 0, 0, False, [empty], [np.zeros(0, np.int32)])

    def advance(self, s: _State, budget: int) -> _State:
        while budget and not s.finished:
            inputs, data = self.source.current
            final = self.source.following is None
            chunk = budget if self.bar is None else min(budget, self.tick)
            start = time.monotonic()
            s.lanes, s.queue, out, taken, ended = self.segment(
                s.lanes, s.queue, inputs, data, jnp.int32(self.source.base), jnp.int32(chunk),
                self.rule, final=final,
            )  # fmt: skip
            # Only the rows written come back to the host.
            written = np.flatnonzero(np.asarray(out.ids) >= 0)
            s.rows.append([np.asarray(x)[written] for x in jax.tree.leaves(out.results)])
            s.ids.append(np.asarray(out.ids)[written])
            s.computed += int(out.computed)
            budget -= int(taken)
            s.iterations += int(taken)
            if self.bar is not None:
                self.bar.update(np.asarray(out.results.best_value)[written])
                rate = int(taken) / max(time.monotonic() - start, 1e-3)
                self.tick = int(min(max(16, 0.2 * rate), 1 << 20))
            if not bool(ended):
                continue
            if not final:  # the queue is empty: the lanes go on with the next chunk
                self.source.advance()
                s.queue = jnp.zeros([], jnp.int32)
            else:
                s.finished = True
        return s

    def finished(self, s: _State) -> bool:
        return s.finished

    def result(self, s: _State) -> FitResult:
        rows, ids = s.gathered()
        order = np.argsort(ids, kind="stable")
        as_array = np.asarray if self.streamed else jnp.asarray
        leaves = [as_array(r[order]) for r in rows]
        return with_work(jax.tree.structure(self.results_t).unflatten(leaves), s.computed)

    def record(self, make_problem: MakeProblem, es: EarlyStopping | None) -> dict[str, Any]:
        """fit's record of the first problem as ``make_problem`` builds it (loss, params,
        optimizer), with the inputs' trees, shapes, dtypes and values and the options."""
        inputs, data = self.source.current
        loss_fn, params, optimizer = make_problem(jax.tree.map(lambda x: x[0], inputs))
        name = getattr(make_problem, "__qualname__", type(make_problem).__qualname__)
        options: dict[str, object] = {
            "make_problem": f"{getattr(make_problem, '__module__', '')}.{name}",
            "problems": self.source.n,
            "num_steps": self.config.num_steps,
            "slots": self.config.slots,
            "has_aux": self.config.has_aux,
            "history": list(self.config.history),
            "inputs.values": _checkpoint.digest(inputs),
            "inputs.kind": "iterator of chunks" if self.streamed else "arrays",
        }
        if data is not None:
            options["data.values"] = _checkpoint.digest(data)
        options |= _checkpoint.tree_record("inputs", inputs)
        return _checkpoint.problem_record(
            loss_fn, params, optimizer, es, data, options, prefix=ENTRY
        )

    def save(self, s: _State) -> tuple[Any, dict[str, Any]]:
        rows, ids = s.gathered()
        record = {
            "step": s.iterations,
            "chunk": self.source.index,
            "chunks": self.source.digests,
            "queue": int(s.queue),
            "width": int(s.lanes.ids.shape[0]),
            "iterations": s.iterations,
            "computed": s.computed,
            "rows": len(ids),
            "finished": s.finished,
        }
        return (s.lanes, rows, ids), record

    def template(self, record: dict[str, Any]) -> Any:
        def rows(tree: object, n: int) -> Any:
            return jax.tree.map(
                lambda t: jax.ShapeDtypeStruct((n, *t.shape[1:]), t.dtype, weak_type=t.weak_type),
                tree,
            )

        results = jax.tree.leaves(rows(self.results_t, record["rows"]))
        ids = jax.ShapeDtypeStruct((record["rows"],), jnp.int32)
        return rows(self.lanes_t, record["width"]), results, ids

    def load(self, tree: Any, record: dict[str, Any]) -> _State:
        self.source.skip_to(record)
        lanes, rows, ids = tree
        rows = [np.asarray(r) for r in rows]
        if self.bar is not None:
            results = jax.tree.structure(self.results_t).unflatten(rows)
            self.bar.update(np.asarray(results.best_value))
        queue = jnp.asarray(record["queue"], jnp.int32)
        return _State(
            lanes, queue, record["iterations"], record["computed"], record["finished"], [rows],
            [np.asarray(ids)],
        )  # fmt: skip

    def interrupted(self, record: dict[str, Any], directory: Path) -> str:
        return (
            f"fit_batched interrupted: checkpoint saved after {record['iterations']} iterations "
            f"({record['rows']} problems finished) in {str(directory)!r}; "
            "run the same fit_batched call with the same checkpoint_dir to resume"
        )
