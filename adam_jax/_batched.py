"""The lanes behind :func:`adam_jax.fit_batched`: problems stream through a few lanes.

A lane holds one problem's loop state (:class:`adam_jax._loop.LoopState`) and
its inputs. Every iteration steps all lanes at once (``vmap`` of the loop's
``step``); a lane whose problem is done hands its result over and takes the
next problem from the queue. Once the queue is empty, each time half the
lanes are idle the running ones move to the front and the rest are dropped,
so the tail computes almost only the steps its problems need.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import NamedTuple, TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax import _fit, _loop, _reporting
from adam_jax._early_stopping import EarlyStopping
from adam_jax._history import History
from adam_jax._loop import LoopState
from adam_jax._result import FitResult

LossFn: TypeAlias = Callable[..., jax.Array | tuple[jax.Array, jax.Array]]
Problem: TypeAlias = tuple[LossFn, optax.Params, optax.GradientTransformation]
MakeProblem: TypeAlias = Callable[[object], Problem]


SHRINK = 4  # the tail keeps a quarter of the lanes each time three quarters are idle


class Config(NamedTuple):
    """What a compiled batched run is cached on."""

    make_problem: MakeProblem
    early_stopping: EarlyStopping | None
    num_steps: int
    n_data: int | None
    has_aux: bool
    history: History
    slots: int
    progress: bool


class Lanes(NamedTuple):
    """The lanes between two calls (a pytree; leading axis: lanes)."""

    ids: jax.Array  # the problem each lane holds, -1 when idle
    inputs: object
    data: object
    state: LoopState


class Output(NamedTuple):
    """Results of the problems that finished during one call, in finishing order."""

    results: FitResult | LoopState  # leading axis: rows; states until the loop ends
    ids: jax.Array  # the problem of each row, -1 for an unused row
    computed: jax.Array  # lane-steps computed (idle lanes included)


class _Carry(NamedTuple):
    lanes: Lanes
    queue: jax.Array  # the next queued problem, an index into this call's inputs
    out: Output
    rows: jax.Array  # rows of `out` written


def _take(tree: object, index: jax.Array) -> object:
    return None if tree is None else jax.tree.map(lambda x: x[index], tree)


def _where(mask: jax.Array, a: object, b: object) -> object:
    if a is None:
        return None

    def pick(x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y)

    return jax.tree.map(pick, a, b)


class _Problems:
    """One problem's loop pieces, each rebuilt from its inputs while tracing."""

    def __init__(self, config: Config):
        self.c = config

    def _loop(self, loss_fn: LossFn | None, optimizer: optax.GradientTransformation | None):
        c = self.c
        return _loop.Loop(
            loss_fn=loss_fn,  # type: ignore[arg-type]
            optimizer=optimizer,
            early_stopping=c.early_stopping,
            num_steps=c.num_steps,
            n_data=c.n_data,
            has_aux=c.has_aux,
            history=c.history,
            log_every=None,
        )

    def problem(self, inputs: object) -> Problem:
        """``make_problem(inputs)``, its optimizer's numbers made arrays as ``fit`` makes them.

        ``fit`` passes an optimizer's number leaves into its compiled program, as
        arrays; left as Python numbers here they would be constants that XLA
        folds, and the two would round differently.
        """
        loss_fn, params, optimizer = self.c.make_problem(inputs)
        as_array = lambda x: jnp.asarray(x) if _fit.is_data(x) else x
        return loss_fn, params, jax.tree.map(as_array, optimizer)

    def init(self, inputs: object, data: object) -> LoopState:
        loss_fn, params, optimizer = self.problem(inputs)
        return self._loop(loss_fn, optimizer).init(params, data)

    def step(self, inputs: object, data: object, state: LoopState) -> LoopState:
        loss_fn, _, optimizer = self.problem(inputs)
        return self._loop(loss_fn, optimizer).step(state, data)

    def done(self, state: LoopState) -> jax.Array:
        return self._loop(None, None).done(state)

    def result(self, state: LoopState) -> FitResult:
        return self._loop(None, None).postprocess(state)


def _machine(config: Config, inputs: object, data: object, base: jax.Array, rows: int):
    """The loop pieces of a batched run over the queued ``inputs``: ``body(carry, filling)``
    (one iteration, then hand-over and refill) and ``more(carry, keep, filling)``."""
    p = _Problems(config)
    init, step = jax.vmap(p.init), jax.vmap(p.step)
    done = jax.vmap(p.done)
    n = jax.tree.leaves(inputs)[0].shape[0]

    def hand_over(c: _Carry, finished: jax.Array) -> _Carry:
        """Write the finished lanes' results to the next rows; those lanes become idle."""
        at = jnp.where(finished, c.rows + jnp.cumsum(finished, dtype=jnp.int32) - 1, rows)
        # The loop states are kept; FitResults are made once, after the loop.
        results = jax.tree.map(
            lambda o, r: o.at[at].set(r, mode="drop"), c.out.results, c.lanes.state
        )
        ids = c.out.ids.at[at].set(c.lanes.ids, mode="drop")
        n_finished = jnp.sum(finished, dtype=jnp.int32)
        lanes = c.lanes._replace(ids=jnp.where(finished, -1, c.lanes.ids))
        if config.progress:
            jax.debug.callback(_on_harvest, c.lanes.state.last_value, finished)
        return c._replace(
            lanes=lanes, out=c.out._replace(results=results, ids=ids), rows=c.rows + n_finished
        )

    def refill(c: _Carry, finished: jax.Array) -> _Carry:
        """Hand over the finished lanes, then load queued problems into the idle ones."""
        c = hand_over(c, finished)
        idle = c.lanes.ids < 0
        queued = c.queue + jnp.cumsum(idle, dtype=jnp.int32) - 1
        load = idle & (queued < n)
        source = jnp.where(load, queued, 0)
        new_inputs, new_data = _take(inputs, source), _take(data, source)
        lanes = Lanes(
            ids=jnp.where(load, base + queued, c.lanes.ids),
            inputs=_where(load, new_inputs, c.lanes.inputs),
            data=_where(load, new_data, c.lanes.data),
            state=_where(load, init(new_inputs, new_data), c.lanes.state),  # type: ignore[arg-type]
        )
        return c._replace(
            lanes=lanes, queue=jnp.minimum(c.queue + jnp.sum(idle, dtype=jnp.int32), n)
        )

    def body(c: _Carry, filling: bool) -> _Carry:
        running = c.lanes.ids >= 0
        state = step(c.lanes.inputs, c.lanes.data, c.lanes.state)
        c = c._replace(
            lanes=c.lanes._replace(state=state),
            out=c.out._replace(computed=c.out.computed + running.shape[0]),
        )
        finished = running & done(state)
        if filling:
            # Idle lanes carried in from the previous call load here too.
            due = jnp.any(finished | ~running)
            return jax.lax.cond(due, refill, lambda c, _: c, c, finished)
        return jax.lax.cond(jnp.any(finished), hand_over, lambda c, _: c, c, finished)

    def more(c: _Carry, keep: int, filling: bool) -> jax.Array:
        busy = jnp.sum(c.lanes.ids >= 0, dtype=jnp.int32) > keep
        return (c.queue < n) | busy if filling else busy

    return body, more


def _first_lanes(
    inputs: object, data: object, base: jax.Array, config: Config
) -> tuple[Lanes, jax.Array]:
    """Lanes holding the first queued problems, and the queue position after them."""
    init = jax.vmap(_Problems(config).init)
    n = jax.tree.leaves(inputs)[0].shape[0]
    width = min(config.slots, n)
    first = jnp.arange(width, dtype=jnp.int32)
    lane_inputs, lane_data = _take(inputs, first), _take(data, first)
    lanes = Lanes(base + first, lane_inputs, lane_data, init(lane_inputs, lane_data))
    return lanes, jnp.zeros([], jnp.int32) + width


def _empty_output(state: LoopState, rows: int) -> Output:
    return Output(
        jax.tree.map(lambda r: jnp.zeros((rows, *r.shape[1:]), r.dtype), state),
        jnp.full((rows,), -1, jnp.int32),
        jnp.zeros([], jnp.int32),
    )


def _compact(lanes: Lanes, keep: int) -> Lanes:
    """The first ``keep`` busy lanes, in lane order (the running ones move to the front)."""
    busy_first = jnp.argsort(lanes.ids < 0, stable=True)[:keep]
    return _take(lanes, busy_first)  # type: ignore[return-value]


def advance(
    lanes: Lanes | None,
    inputs: object,
    data: object,
    base: jax.Array,
    *,
    config: Config,
    final: bool,
) -> tuple[Lanes, Output]:
    """Run the queued ``inputs`` (leading axis: problems) through the lanes.

    Returns when the queue is empty (the lanes still hold running problems,
    to be continued by the next call), or with ``final`` when every problem is
    done. The queued problems are numbered ``base``, ``base + 1``, ...; lanes
    carried in from an earlier call keep their numbers.
    """
    result = jax.vmap(_Problems(config).result)
    n = jax.tree.leaves(inputs)[0].shape[0]
    queue = jnp.zeros([], jnp.int32)
    if lanes is None:
        lanes, queue = _first_lanes(inputs, data, base, config)
    width = lanes.ids.shape[0]
    rows = n + width
    body, more = _machine(config, inputs, data, base, rows)
    c = _Carry(lanes, queue, _empty_output(lanes.state, rows), jnp.zeros([], jnp.int32))
    filling = True
    while True:
        # The first loop refills lanes while the queue lasts; with `final` it and
        # each later one run until at most 1/SHRINK of the lanes are busy, and the
        # next keeps only those lanes.
        keep = width // SHRINK if final else width
        c = jax.lax.while_loop(
            functools.partial(more, keep=keep, filling=filling),
            functools.partial(body, filling=filling),
            c,
        )
        if not final or not keep:
            break
        c = c._replace(lanes=_compact(c.lanes, keep))
        width, filling = keep, False
    return c.lanes, c.out._replace(results=result(cast(LoopState, c.out.results)))


def segment(
    lanes: Lanes,
    queue: jax.Array,
    inputs: object,
    data: object,
    base: jax.Array,
    budget: jax.Array,
    *,
    config: Config,
    filling: bool,
    final: bool,
) -> tuple[Lanes, jax.Array, Output, jax.Array, jax.Array]:
    """At most ``budget`` iterations of one loop of :func:`advance`.

    A checkpointed run is a chain of these: each lane takes the same steps at the
    same widths as in one ``advance`` call, wherever the chain is cut. Returns the
    lanes, the queue position, the problems finished, the iterations run, and
    whether the loop has ended (the caller then goes on with the next chunk, or,
    with ``final``, keeps ``width // SHRINK`` lanes with :func:`compact_jit`, or
    stops when that is none).
    """
    result = jax.vmap(_Problems(config).result)
    n = jax.tree.leaves(inputs)[0].shape[0]
    width = lanes.ids.shape[0]
    rows = n + width  # as in advance, so that the budget is no part of the compiled program
    body, more = _machine(config, inputs, data, base, rows)
    keep = width // SHRINK if final else width

    def go_on(ci: tuple[_Carry, jax.Array]) -> jax.Array:
        return more(ci[0], keep, filling) & (ci[1] < budget)

    def one(ci: tuple[_Carry, jax.Array]) -> tuple[_Carry, jax.Array]:
        return body(ci[0], filling), ci[1] + 1

    c = _Carry(lanes, queue, _empty_output(lanes.state, rows), jnp.zeros([], jnp.int32))
    c, taken = jax.lax.while_loop(go_on, one, (c, jnp.zeros([], jnp.int32)))
    out = c.out._replace(results=result(cast(LoopState, c.out.results)))
    return c.lanes, c.queue, out, taken, ~more(c, keep, filling)


def in_input_order(out: Output, n: int) -> tuple[FitResult, jax.Array]:
    """The output's results with a leading axis of ``n``, row ``k`` for problem ``k``."""
    at = jnp.where(out.ids >= 0, out.ids, n)
    results = jax.tree.map(
        lambda r: jnp.zeros((n, *r.shape[1:]), r.dtype).at[at].set(r, mode="drop"), out.results
    )
    return results, out.computed


def run_all(inputs: object, data: object, *, config: Config) -> tuple[FitResult, jax.Array]:
    """Every problem in one compiled call; results in input order, and the lane-steps computed."""
    n = jax.tree.leaves(inputs)[0].shape[0]
    _, out = advance(None, inputs, data, jnp.zeros([], jnp.int32), config=config, final=True)
    return in_input_order(out, n)


run_all_jit = jax.jit(run_all, static_argnames=("config",))
advance_jit = jax.jit(advance, static_argnames=("config", "final"))
first_lanes_jit = jax.jit(_first_lanes, static_argnames=("config",))
segment_jit = jax.jit(segment, static_argnames=("config", "filling", "final"))
compact_jit = jax.jit(_compact, static_argnames=("keep",))


class BatchProgress:
    """The progress bar of a batched run: problems finished, and the min and median of
    their last monitored values.

    Used as a context manager around the compiled calls; their host callbacks
    reach the bar that is open.
    """

    active: BatchProgress | None = None

    def __init__(self, total: int | None):
        self.bar = _reporting.import_tqdm()(total=total, unit="problem")
        self.values: list[np.ndarray] = []
        self.shown = 0.0

    def __enter__(self) -> BatchProgress:
        BatchProgress.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        jax.effects_barrier()
        BatchProgress.active = None
        self.show()
        self.bar.close()

    def update(self, values: np.ndarray, finished: np.ndarray) -> None:
        self.values.append(values[finished])
        self.bar.update(int(finished.sum()))
        if time.monotonic() - self.shown > 0.1:
            self.show()

    def show(self) -> None:
        self.shown = time.monotonic()
        v = np.concatenate(self.values) if self.values else np.zeros(0)
        v = v[np.isfinite(v)]
        if v.size:
            self.bar.set_postfix(min=f"{v.min():.4g}", median=f"{np.median(v):.4g}")


def _on_harvest(values: np.ndarray, finished: np.ndarray) -> None:
    bar = BatchProgress.active
    if bar is not None:
        bar.update(np.asarray(values), np.asarray(finished))
