"""The training loop of :func:`adam_jax.fit`, in pieces a batched driver can reuse.

One problem's run is a :class:`LoopState` (whose ``done`` says whether the problem
has finished) and three functions of a :class:`Loop` (the static part: loss,
optimizer, early stopping, history): ``init`` builds the state, ``step`` takes one
step (a no-op once ``done``), ``postprocess`` turns the state into a ``FitResult``.
``step`` and ``done`` are pure and select rather than branch, so ``jax.vmap``
of them runs many problems in lock step, each stopping on its own. :func:`run`
is fit's driver: one ``lax.while_loop``, or two nested ones when reporting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from jax import custom_batching

from adam_jax import _fit_checks, _history, _reporting
from adam_jax._early_stopping import EarlyStopping, EarlyStoppingState, StopReason
from adam_jax._result import FitResult
from adam_jax._tree import tree_where, without_weak_types

LOG_LEN = 128  # log-line values held between two host calls


class LogState(NamedTuple):
    """The values at steps due for a log line since the last host call."""

    values: jax.Array
    steps: jax.Array
    filled: jax.Array


class LoopState(NamedTuple):
    """One problem's loop state: a pytree of arrays (``log`` and ``es_state`` may be None).

    Attributes:
      i: steps taken in this call (values measured, the stopping one included).
      applied: updates applied in this call.
      limit: the most steps this problem may take in this call (int32, per problem).
      initial_step: the global number of the call's first step.
      params, opt_state, es_state: the current params and states.
      history: the kept values (see :class:`adam_jax.History`).
      last_value: the latest monitored value (NaN before the first step).
      log: values due for log lines, or None without ``log_every``.
    """

    i: jax.Array
    applied: jax.Array
    limit: jax.Array
    initial_step: jax.Array
    params: optax.Params
    opt_state: optax.OptState
    es_state: EarlyStoppingState | None
    history: _history.HistoryState
    last_value: jax.Array
    log: LogState | None

    @property
    def stopped(self) -> jax.Array:
        """Early stopping has said stop (in this call, or before it for a resumed state)."""
        return jnp.zeros([], bool) if self.es_state is None else self.es_state.should_stop

    @property
    def done(self) -> jax.Array:
        """The problem has taken its last step (stopped, or reached its ``limit``)."""
        return self.stopped | (self.i >= self.limit)


def _batched_like(state: LoopState, anchor: jax.Array) -> LoopState:
    """``state`` with every leaf depending on ``anchor`` (a False).

    Under vmap a ``while_loop`` whose carry starts unbatched and turns batched
    (with the batch axis sharded over an Explicit mesh axis) fails to trace;
    a carry that depends on everything from the start is batched, and sharded,
    as it will stay.
    """

    def tie(x: jax.Array) -> jax.Array:
        if x.dtype == bool:
            return x | anchor
        return jnp.where(anchor, jnp.zeros_like(x), x)

    return cast(LoopState, jax.tree.map(tie, state))


def _depends_on(tree: object) -> jax.Array:
    """A bool that reads one element of every traced leaf of ``tree`` (its value is of no use)."""
    out = jnp.zeros([], bool)
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.core.Tracer) and x.size:
            first = jax.lax.reshape(jax.lax.slice(x, (0,) * x.ndim, (1,) * x.ndim), ())
            out = out | (first != first)
    return out


def _all_finite(tree: optax.Updates) -> jax.Array:
    """One bool: no NaN or ±inf in any floating leaf (one read of each leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.ones([], bool)
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


class Loop(NamedTuple):
    """The static part of a run: what ``init``/``step``/``postprocess`` close over.

    ``data`` is passed to ``init`` and ``step`` rather than kept in the state:
    under vmap a ``while_loop`` selects its whole carry on every iteration, and
    data does not change.
    """

    loss_fn: Callable[..., jax.Array | tuple[jax.Array, jax.Array]]
    optimizer: optax.GradientTransformation
    early_stopping: EarlyStopping | None
    max_steps: int  # the most steps of a call (a state's limit), the buffers' bound
    n_data: int | None
    has_aux: bool
    history: _history.History
    log_every: int | None

    def _call(self, params: optax.Params, batch: object) -> jax.Array | tuple[jax.Array, jax.Array]:
        return self.loss_fn(params) if self.n_data is None else self.loss_fn(params, batch)

    def _batch(self, data: object, step: jax.Array) -> object:
        return None if self.n_data is None else _fit_checks.batch_at(data, step % self.n_data)

    def init(
        self,
        params: optax.Params,
        data: object = None,
        opt_state: optax.OptState | None = None,
        es_state: EarlyStoppingState | None = None,
        initial_step: jax.typing.ArrayLike = 0,
        anchored: bool = True,
        tie_to: object = None,
    ) -> LoopState:
        """One problem's first state; a given ``opt_state``/``es_state`` is checked, not cast.

        With ``anchored`` the state depends on everything a step reads (see
        :meth:`_anchor`, which traces the loss and the update once more). Only a
        mesh with Explicit axes needs it: elsewhere ``lax.while_loop`` finds by
        itself which parts of a carry that starts unbatched turn batched. With
        ``tie_to`` (the optimizer's and the rule's numbers that may be batched),
        the state reads the inputs and these, which only saves that search.
        """
        params = without_weak_types(params)
        given = (params, data, opt_state, es_state, initial_step, tie_to)
        opt_state = _fit_checks.checked_state("opt_state", opt_state, self.optimizer.init, params)
        if self.early_stopping is not None:
            es_state = _fit_checks.checked_state(
                "early_stopping_state", es_state, self.early_stopping.init, params
            )
        out = jax.eval_shape(self._call, params, self._batch(data, jnp.int32(0)))
        dtype = _fit_checks.check_loss_output(out, self.has_aux).dtype
        zero = jnp.zeros([], jnp.int32)
        state = LoopState(
            i=zero,
            applied=zero,
            limit=jnp.asarray(self.max_steps, jnp.int32),
            initial_step=jnp.asarray(initial_step).astype(jnp.int32),
            params=params,
            opt_state=opt_state,
            es_state=es_state,
            history=_history.init(self.history, self.max_steps, dtype),
            last_value=jnp.full([], jnp.nan, dtype),
            log=self.empty_log(dtype),
        )
        if anchored:
            return _batched_like(state, self._anchor(state, data))
        if tie_to is None:
            return state
        # Under vmap a while_loop batches its body again until its carry's batched
        # parts stop changing (three passes for a fit whose state starts as zeros); a
        # state that reads every input is batched from the start wherever they are.
        anchor = _depends_on(given)
        tied = cast(LoopState, jax.tree.map(lambda x: jax.lax.select_n(anchor, x, x), state))
        return tied._replace(limit=state.limit, initial_step=state.initial_step)

    def empty_log(self, dtype: jnp.dtype) -> LogState | None:
        """No values waiting for a log line (None without ``log_every``)."""
        if self.log_every is None:
            return None
        nan, none = jnp.full((LOG_LEN,), jnp.nan, dtype), jnp.full((LOG_LEN,), -1, jnp.int32)
        return LogState(nan, none, jnp.zeros([], jnp.int32))

    def _anchor(self, s: LoopState, data: object) -> jax.Array:
        """A False that depends on everything a step reads: the state, the data,
        the loss at the first params and an update of zero gradients (which read
        the hyperparameters, closed over or not). Under vmap it is batched, with
        the batch axis sharded, exactly as the states a step returns.

        The loss and the update are traced in a branch that never runs (the step
        number is never negative), so an effect in ``loss_fn`` does not fire.
        """

        def probe() -> jax.Array:
            out = self._call(s.params, self._batch(data, s.initial_step))
            zeros = jax.tree.map(jnp.zeros_like, s.params)
            return _depends_on((out, self.optimizer.update(zeros, s.opt_state, s.params)[0]))

        never = s.initial_step < 0
        anchor = jax.lax.cond(never, probe, lambda: jnp.zeros([], bool))
        out: jax.Array = (anchor | _depends_on((s, data))) & False
        return out

    def step(self, s: LoopState, data: object = None) -> LoopState:
        """One step: value and gradient, early stopping, then the update unless it stops.

        A no-op on a state that is ``done``, so a vmapped driver may keep stepping
        finished problems (or refill them) without changing their results.
        """
        active = ~s.done
        step = s.initial_step + s.i
        out, grads = jax.value_and_grad(self._call, has_aux=self.has_aux)(
            s.params, self._batch(data, step)
        )
        metric = out[1] if self.has_aux else out
        es_state, stop = s.es_state, s.stopped
        if self.early_stopping is not None:
            # A step whose gradient (or, with has_aux, training loss) is not
            # finite counts as a non-finite value, which the metric alone may
            # not show: with check_finite it stops before m and v take it in.
            finite = _all_finite(grads)
            if self.has_aux:
                finite &= jnp.isfinite(out[0])
            value = jnp.where(finite, metric, jnp.nan)
            new_es = self.early_stopping.update(s.es_state, value, s.params)
            es_state = tree_where(active, new_es, cast(EarlyStoppingState, s.es_state))
            stop = es_state.should_stop
        updates, opt_state = self.optimizer.update(grads, s.opt_state, s.params)
        new_params = optax.apply_updates(s.params, updates)
        # The stopping step's update is not applied: params stay where the
        # stopping value was measured.
        apply = active & ~stop
        metric = metric.astype(s.last_value.dtype)
        log = s.log
        if log is not None:
            assert self.log_every is not None  # a log buffer exists only with log_every
            due = active & (step % self.log_every == 0)
            at = jnp.where(due, log.filled, LOG_LEN)
            log = LogState(
                log.values.at[at].set(metric, mode="drop"),
                log.steps.at[at].set(step, mode="drop"),
                log.filled + due.astype(jnp.int32),
            )
        return LoopState(
            i=s.i + active.astype(jnp.int32),
            applied=s.applied + apply.astype(jnp.int32),
            limit=s.limit,
            initial_step=s.initial_step,
            params=tree_where(apply, new_params, s.params),
            opt_state=tree_where(apply, opt_state, s.opt_state),
            es_state=es_state,
            history=_history.record(self.history, s.history, s.i, step, metric, active),
            last_value=jnp.where(active, metric, s.last_value),
            log=log,
        )

    def postprocess(self, s: LoopState) -> FitResult:
        """The :class:`FitResult` of a finished (or interrupted) state."""
        history = _history.finish(self.history, s.history, s.i)
        es = s.es_state
        if es is None:
            best_params = s.params
            reason, best_step = jnp.int32(StopReason.NONE), jnp.int32(-1)
            best_value = jnp.full([], jnp.nan, s.last_value.dtype)
        else:
            best_params = s.params if es.best_params is None else es.best_params
            reason, best_step, best_value = es.reason, es.best_step, es.best_value
        return FitResult(
            params=best_params,
            opt_state=s.opt_state,
            losses=history.values,
            num_steps=s.applied,
            stop_reason=reason,
            best_step=best_step,
            best_value=best_value,
            early_stopping_state=es,
            last_params=s.params,
            steps=history.steps,
            next_step=s.initial_step + s.applied,
        )

    def record(self, s: LoopState) -> _reporting.Record:
        """What the host side of reporting is given about a state."""
        log = s.log
        if log is None:
            empty = jnp.zeros((0,), jnp.int32)
            log = LogState(empty.astype(s.last_value.dtype), empty, jnp.zeros([], jnp.int32))
        reason = jnp.int32(StopReason.NONE) if s.es_state is None else s.es_state.reason
        return _reporting.Record(
            initial_step=s.initial_step,
            i=s.i,
            num_steps=s.limit,
            last_value=s.last_value,
            running=~s.done,
            reason=reason,
            log_values=log.values,
            log_steps=log.steps,
            log_count=log.filled,
        )


@custom_batching.custom_vmap
def _any_of_batch(x: jax.Array) -> jax.Array:
    """``x`` itself; under vmap, whether it holds for any problem (an unbatched bool)."""
    return x


@_any_of_batch.def_vmap
def _any_of_batch_vmap(
    axis_size: int, in_batched: list[bool], x: jax.Array
) -> tuple[jax.Array, bool]:
    return _any_of_batch(jnp.any(x, axis=0) if in_batched[0] else x), False


def run(
    loop: Loop,
    state: LoopState,
    data: object,
    reporter: _reporting.Reporter | None,
    until: jax.Array | None = None,
) -> LoopState:
    """Step ``state`` until it is done, or until it has taken ``until`` steps: the engine.

    With a reporter, an inner loop steps until the step the host asked to hear
    from next (or until ``LOG_LEN`` log values wait), then one host call hands
    over a :class:`_reporting.Record` and gets the next such step.
    """

    def step(s: LoopState) -> LoopState:
        return loop.step(s, data)

    def going(s: LoopState) -> jax.Array:
        return ~s.done if until is None else ~s.done & (s.i < until)

    if reporter is None and loop.early_stopping is None and until is None:
        # Every problem takes exactly max_steps steps: a trip count the problems
        # share, so under vmap (over sharded problems too) the loop needs no
        # reduction across the batch.
        return cast(LoopState, jax.lax.fori_loop(0, loop.max_steps, lambda _, s: step(s), state))
    if reporter is None:
        # Under vmap a batched predicate would make the loop select its whole
        # carry, history buffers included, on every step; `step` leaves a done
        # problem as it is, so the loop can run until every problem is done.
        return jax.lax.while_loop(lambda s: _any_of_batch(going(s)), step, state)

    def chunk(c: tuple[LoopState, jax.Array]) -> tuple[LoopState, jax.Array]:
        s, target = c
        s = jax.lax.while_loop(
            lambda s: going(s) & (s.i < target) & (s.log is None or s.log.filled < LOG_LEN),
            step,
            s,
        )
        # The max ties the host's answer to the (maybe sharded) state.
        target = jnp.maximum(_reporting.call(reporter, _reporting.REPORT, loop.record(s)), s.i)
        if s.log is not None:
            s = s._replace(log=s.log._replace(filled=jnp.zeros_like(s.log.filled)))
        return s, target

    target = jnp.maximum(_reporting.call(reporter, _reporting.BEGIN, loop.record(state)), state.i)
    # The outer loop calls the host, an effect a while_loop with a batched
    # predicate cannot hold: under vmap it runs until every problem is done.
    state, _ = jax.lax.while_loop(lambda c: _any_of_batch(going(c[0])), chunk, (state, target))
    _reporting.call(reporter, _reporting.END, loop.record(state))
    return state
