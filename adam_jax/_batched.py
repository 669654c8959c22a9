"""The lanes behind :func:`adam_jax.fit_batched`: problems stream through a few lanes.

A lane holds one problem's loop state (:class:`adam_jax._loop.LoopState`) and
its inputs. Every iteration steps all lanes at once (``vmap`` of the loop's
``step``); a lane whose problem is done hands its result over and takes the
next problem from the queue. Once the queue is empty the lanes run until their
problems are done, at the same width: a narrower tail would be a second loop
to compile, as long to compile as the first, and with a few lanes (the default,
:func:`adam_jax.default_slots`) the idle ones cost little.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias, cast

import jax
import jax.numpy as jnp
import optax

from adam_jax import _loop
from adam_jax._early_stopping import EarlyStopping
from adam_jax._history import History
from adam_jax._loop import LoopState
from adam_jax._packing import Layout, layout, pack, unpack
from adam_jax._result import FitResult
from adam_jax._tree import Split, is_data

LossFn: TypeAlias = Callable[..., jax.Array | tuple[jax.Array, jax.Array]]
Problem: TypeAlias = tuple[LossFn, optax.Params, optax.GradientTransformation]
MakeProblem: TypeAlias = Callable[[object], Problem]


def hand_size(width: int) -> int:
    """The most lanes handed over (and refilled) in one round of an exchange.

    Writing a few lanes costs a few lanes' worth, where writing them all costs
    the whole width's, on every iteration where any problem finishes (nearly
    all of them while the queue lasts). Where more finish at once, the exchange
    takes more rounds in the same iteration.
    """
    return min(width, max(4, width // 32))


class Config(NamedTuple):
    """What a compiled batched run is cached on (the early-stopping rule is an argument)."""

    make_problem: MakeProblem
    num_steps: int
    n_data: int | None
    has_aux: bool
    history: History
    slots: int


Rule: TypeAlias = Split[EarlyStopping | None]


class Lanes(NamedTuple):
    """The lanes between two calls (a pytree; leading axis: lanes)."""

    ids: jax.Array  # the problem each lane holds, -1 when idle
    inputs: object
    data: object
    state: tuple[jax.Array, ...]  # the loop states, packed (see Layout)


class Output(NamedTuple):
    """Results of the problems that finished during one call, in finishing order."""

    results: FitResult  # leading axis: rows
    ids: jax.Array  # the problem of each row, -1 for an unused row
    computed: jax.Array  # lane-steps computed (idle lanes included)


class _Carry(NamedTuple):
    lanes: Lanes
    queue: jax.Array  # the next queued problem, an index into this call's inputs
    rows: tuple[jax.Array, ...]  # finished problems' loop states, packed, finishing order
    ids: jax.Array  # the problem of each row, -1 for an unused row
    written: jax.Array  # rows written
    computed: jax.Array  # lane-steps computed


def _loop_of(config: Config, rule: Rule, problem: Problem | None = None) -> _loop.Loop:
    loss_fn, _, optimizer = problem if problem is not None else (None, None, None)
    return _loop.Loop(
        loss_fn=loss_fn,  # type: ignore[arg-type]
        optimizer=optimizer,
        early_stopping=rule.value,
        max_steps=config.num_steps,
        n_data=config.n_data,
        has_aux=config.has_aux,
        history=config.history,
        log_every=None,
    )


def _problem(config: Config, inputs: object) -> Problem:
    """``make_problem(inputs)``, its optimizer's numbers made arrays as ``fit`` makes them.

    ``fit`` passes an optimizer's number leaves into its compiled program, as
    arrays; left as Python numbers here they would be constants that XLA
    folds, and the two would round differently.
    """
    loss_fn, params, optimizer = config.make_problem(inputs)
    as_array = lambda x: jnp.asarray(x) if is_data(x) else x
    return loss_fn, params, jax.tree.map(as_array, optimizer)


@functools.lru_cache(maxsize=16)
def _lane_fns(config: Config) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """One lane's ``init`` and ``step``, vmapped over lanes. Each is a jitted call
    inside the run, so the problem (``make_problem``, the loss, the optimizer) is
    traced once per config."""

    @jax.jit
    def step(rule: Rule, inputs: object, data: object, state: LoopState) -> LoopState:
        problem = _problem(config, inputs)
        return _loop_of(config, rule, problem).step(state, data)

    @jax.jit
    def init(rule: Rule, inputs: object, data: object) -> LoopState:
        problem = _problem(config, inputs)
        state = _loop_of(config, rule, problem).init(problem[1], data, anchored=False)
        # In the types a step returns (a while loop's carry promotes weak types so):
        # the lanes' packed layout holds for the states loaded later.
        stepped = jax.eval_shape(step, rule, inputs, data, state)

        def settle(x: jax.Array, t: jax.ShapeDtypeStruct) -> jax.Array:
            same = (x.dtype, jax.typeof(x).weak_type) == (t.dtype, t.weak_type)
            return x if same else jnp.asarray(x, t.dtype)

        return cast(LoopState, jax.tree.map(settle, state, stepped))

    return jax.vmap(init, in_axes=(None, 0, 0)), jax.vmap(step, in_axes=(None, 0, 0, 0))


def _whole(config: Config, rule: Rule, inputs: object, data: object) -> FitResult:
    """One problem's run, from its first state to its result (every lane the same steps)."""
    problem = _problem(config, inputs)
    loop = _loop_of(config, rule, problem)
    state = loop.init(problem[1], data, anchored=False)
    return loop.postprocess(_loop.run(loop, state, data, None))


def _results(config: Config, rule: Rule, lay: Layout, rows: tuple[jax.Array, ...]) -> FitResult:
    return jax.vmap(_loop_of(config, rule).postprocess)(cast(LoopState, unpack(lay, rows)))


def _machine(
    config: Config,
    rule: Rule,
    inputs: object,
    data: object,
    base: jax.Array,
    lay: Layout,
    inits: tuple[jax.Array, ...],
) -> tuple[Callable[[_Carry], _Carry], Callable[..., jax.Array]]:
    """The loop pieces of a batched run over the queued ``inputs``: ``body(carry)``
    (one iteration, then hand-over and refill) and ``more(carry, final)``.

    ``inits`` holds the queued problems' first states, packed: a refill copies rows
    of it, so the loop holds no copy of the problem's ``init``."""
    _, step = _lane_fns(config)
    n = jax.tree.leaves(inputs)[0].shape[0]

    def swap(c: _Carry, finished: jax.Array) -> tuple[_Carry, jax.Array]:
        """One round of :func:`exchange`: up to ``hand_size`` lanes, the finished ones
        first, then idle ones while problems are queued. The finished ones write their
        loop states to the next rows; each lane takes the next queued problem, or idles.
        Returns the carry and the finished lanes still to hand over."""
        width = finished.shape[0]
        earlier = width - jnp.arange(width, dtype=jnp.int32)  # lanes in order, by score
        idle = (c.lanes.ids < 0) & (c.queue < n)
        score = jnp.where(finished, width + earlier, jnp.where(idle, earlier, 0))
        value, lane = jax.lax.top_k(score, hand_size(width))  # one sort
        chosen, handing = value > 0, value > width
        # The loop states are kept; FitResults are made once, after the loop. The
        # finished lanes come first, so the rows they write are the next ones in order.
        rows = tuple(
            jax.lax.dynamic_update_slice_in_dim(r, p[lane], c.written, 0)
            for r, p in zip(c.rows, c.lanes.state, strict=True)
        )
        ids = jax.lax.dynamic_update_slice_in_dim(
            c.ids, jnp.where(handing, c.lanes.ids[lane], -1), c.written, 0
        )
        queued = c.queue + jnp.arange(lane.shape[0], dtype=jnp.int32)
        load = chosen & (queued < n)
        source = jnp.minimum(queued, n - 1)
        changed, loaded = (jnp.where(m, lane, width) for m in (chosen, load))

        def put(x: jax.Array, pool: jax.Array) -> jax.Array:
            return x.at[loaded].set(pool[source], mode="drop")

        lanes = Lanes(
            ids=c.lanes.ids.at[changed].set(jnp.where(load, base + queued, -1), mode="drop"),
            inputs=jax.tree.map(put, c.lanes.inputs, inputs),
            data=jax.tree.map(put, c.lanes.data, data),
            state=tuple(map(put, c.lanes.state, inits)),
        )
        c = c._replace(
            lanes=lanes,
            queue=c.queue + jnp.sum(load, dtype=jnp.int32),
            rows=rows,
            ids=ids,
            written=c.written + jnp.sum(handing, dtype=jnp.int32),
        )
        return c, finished.at[changed].set(False, mode="drop")

    def exchange(c: _Carry, finished: jax.Array) -> _Carry:
        """Hand over every finished lane and, while the queue lasts, load every idle one
        (idle lanes carried in from the previous call too), ``hand_size`` lanes a round:
        writing a few lanes costs a few lanes' worth, and most iterations need one round
        or none; problems that stop together leave in one iteration, in more rounds."""

        def due(cf: tuple[_Carry, jax.Array]) -> jax.Array:
            c, finished = cf
            going: jax.Array = jnp.any(finished) | (jnp.any(c.lanes.ids < 0) & (c.queue < n))
            return going

        return jax.lax.while_loop(due, lambda cf: swap(*cf), (c, finished))[0]

    def body(c: _Carry) -> _Carry:
        running = c.lanes.ids >= 0
        state = step(rule, c.lanes.inputs, c.lanes.data, unpack(lay, c.lanes.state))
        c = c._replace(
            lanes=c.lanes._replace(state=pack(lay, state)), computed=c.computed + running.shape[0]
        )
        return exchange(c, running & state.done)

    def more(c: _Carry, final: bool) -> jax.Array:
        """Problems queued, or (in the last call) lanes still running."""
        queued: jax.Array = c.queue < n
        return queued | jnp.any(c.lanes.ids >= 0) if final else queued

    return body, more


def _inits(
    inputs: object, data: object, rule: Rule, config: Config
) -> tuple[tuple[jax.Array, ...], Layout]:
    """Every queued problem's first loop state, packed, and the packing's layout."""
    init, _ = _lane_fns(config)
    states = init(rule, inputs, data)
    lay = layout(states)
    return pack(lay, states), lay


def first_lanes(
    inputs: object,
    data: object,
    base: jax.Array,
    rule: Rule,
    config: Config,
    inits: tuple[jax.Array, ...] | None = None,
) -> tuple[Lanes, jax.Array]:
    """Lanes holding the first queued problems, and the queue position after them."""
    states = _inits(inputs, data, rule, config)[0] if inits is None else inits
    width = min(config.slots, jax.tree.leaves(inputs)[0].shape[0])
    first = lambda x: x[:width]
    lane_inputs, lane_data = jax.tree.map(first, (inputs, data))
    ids = base + jnp.arange(width, dtype=jnp.int32)
    lanes = Lanes(ids, lane_inputs, lane_data, tuple(map(first, states)))
    return lanes, jnp.zeros([], jnp.int32) + width


def shapes(inputs: object, data: object, rule: Rule, config: Config) -> tuple[Lanes, FitResult]:
    """The shapes and dtypes of a run's lanes, and of its results (a row a problem)."""

    def both(inputs: object, data: object, rule: Rule) -> tuple[Lanes, FitResult]:
        inits, lay = _inits(inputs, data, rule, config)
        lanes, _ = first_lanes(inputs, data, jnp.zeros([], jnp.int32), rule, config, inits)
        return lanes, _results(config, rule, lay, lanes.state)

    return cast(tuple[Lanes, FitResult], jax.eval_shape(both, inputs, data, rule))


def _start(lanes: Lanes, queue: jax.Array, n: int) -> _Carry:
    """A carry with room for every problem this call may finish."""
    rows = n + 2 * lanes.ids.shape[0]
    zero = jnp.zeros([], jnp.int32)
    empty = tuple(jnp.zeros((rows, p.shape[1]), p.dtype) for p in lanes.state)
    return _Carry(lanes, queue, empty, jnp.full((rows,), -1, jnp.int32), zero, zero)


def segment(
    lanes: Lanes,
    queue: jax.Array,
    inputs: object,
    data: object,
    base: jax.Array,
    budget: jax.Array,
    rule: Rule,
    *,
    config: Config,
    final: bool,
) -> tuple[Lanes, jax.Array, Output, jax.Array, jax.Array]:
    """At most ``budget`` iterations of :func:`run_all`'s loop, on one chunk of problems.

    A run that hands control back to the host is a chain of these: each lane takes
    the same steps as in one ``run_all`` call, wherever the chain is cut. Returns
    the lanes, the queue position, the problems finished, the iterations run, and
    whether the loop has ended: the chunk's queue is empty (the caller goes on
    with the next chunk) or, with ``final``, every problem is done.
    """
    n = jax.tree.leaves(inputs)[0].shape[0]
    inits, lay = _inits(inputs, data, rule, config)
    body, more = _machine(config, rule, inputs, data, base, lay, inits)

    def go_on(ci: tuple[_Carry, jax.Array]) -> jax.Array:
        return more(ci[0], final) & (ci[1] < budget)

    def one(ci: tuple[_Carry, jax.Array]) -> tuple[_Carry, jax.Array]:
        return body(ci[0]), ci[1] + 1

    c = _start(lanes, queue, n)
    c, taken = jax.lax.while_loop(go_on, one, (c, jnp.zeros([], jnp.int32)))
    out = Output(_results(config, rule, lay, c.rows), c.ids, c.computed)
    return c.lanes, c.queue, out, taken, ~more(c, final)


def run_all(
    inputs: object, data: object, rule: Rule, *, config: Config
) -> tuple[FitResult, jax.Array]:
    """Every problem in one compiled call; results in input order, and the lane-steps computed.

    The lanes refill while the queue lasts, then run until every problem is done.

    Without early stopping and with a lane for every problem, no lane frees up before
    the end: the problems run as ``jax.vmap`` of ``fit``'s loop, without the lanes'
    bookkeeping.
    """
    n = jax.tree.leaves(inputs)[0].shape[0]
    if rule.value is None and config.slots >= n:
        computed = jnp.full([], n, jnp.int32) * config.num_steps  # int32, as the lanes count
        return jax.vmap(functools.partial(_whole, config, rule))(inputs, data), computed
    zero = jnp.zeros([], jnp.int32)
    inits, lay = _inits(inputs, data, rule, config)
    c = _start(*first_lanes(inputs, data, zero, rule, config, inits), n)
    body, more = _machine(config, rule, inputs, data, zero, lay, inits)
    c = jax.lax.while_loop(functools.partial(more, final=True), body, c)
    # Row k of the result is problem k: a gather per dtype of the packed rows.
    at = jnp.where(c.ids >= 0, c.ids, n)
    rows = jnp.arange(c.ids.shape[0], dtype=jnp.int32)
    where = jnp.zeros((n,), jnp.int32).at[at].set(rows, mode="drop")
    return _results(config, rule, lay, tuple(r[where] for r in c.rows)), c.computed
