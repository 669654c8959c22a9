"""``fit``: a whole training run, early stopping included, as one compiled loop."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import _checks, _fit_checks, _reporting
from adam_jax._early_stopping import (
    EarlyStopping,
    EarlyStoppingState,
    StopReason,
    _tree_where,
    _without_weak_types,
)


class FitResult(NamedTuple):
    """What :func:`fit` returns (a NamedTuple, so a pytree that vmap can batch).

    Steps are numbered globally, from ``initial_step`` (0 unless the fit resumes
    a saved run); ``losses`` and ``num_steps`` cover the steps of this call only.

    Attributes:
      params: the final params. After a stop, the params at which the stopping
        value was measured (that step's update is not applied).
      best_params: the params of the best step when early stopping has
        ``restore_best=True``; otherwise the final params.
      opt_state: the final optimizer state.
      losses: ``(num_steps,)``, the monitored value at each step of this call
        (the loss, or the metric with ``has_aux=True``): ``losses[k]`` is step
        ``initial_step + k``; NaN from the step after a stop.
      num_steps: int32, the number of updates this call applied. The next
        step to take is ``initial_step + num_steps``, the ``initial_step`` a
        resumed fit gets.
      stop_reason: int32 holding a :class:`StopReason`; ``NONE`` if the run
        did not stop early.
      best_step: int32, the step of the best value, counted by the early-stopping
        state (so from 0 at its ``init``, not from ``initial_step``); -1 without
        early stopping or if
        nothing improved.
      best_value: the best monitored value; NaN without early stopping.
      early_stopping_state: the final :class:`EarlyStoppingState` (``wait``,
        the best so far, ...), to save with ``params`` and ``opt_state`` and
        pass back to a resumed fit; None without early stopping.
    """

    params: Any
    best_params: Any
    opt_state: Any
    losses: jax.Array
    num_steps: jax.Array
    stop_reason: jax.Array
    best_step: jax.Array
    best_value: jax.Array
    early_stopping_state: EarlyStoppingState | None = None


class _Carry(NamedTuple):
    i: jax.Array  # steps taken (losses written)
    applied: jax.Array  # updates applied
    params: Any
    opt_state: Any
    es_state: EarlyStoppingState | None
    losses: jax.Array  # the current chunk's values
    stop: jax.Array


def _all_finite(tree: Any) -> jax.Array:
    """One bool: no NaN or ±inf in any floating leaf (one read of each leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.ones([], bool)
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


# --------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------


def _run(
    params: Any,
    data: Any,
    opt_state: Any,
    es_state: EarlyStoppingState | None,
    initial_step: jax.Array,
    *,
    loss_fn: Any,
    optimizer: Any,
    early_stopping: EarlyStopping | None,
    num_steps: int,
    n_data: int | None,
    has_aux: bool,
    log_every: int | None,
    progress: bool,
) -> FitResult:
    params = _without_weak_types(params)
    if opt_state is None:
        opt_state = optimizer.init(params)
    else:
        opt_state = _fit_checks.checked_state(
            "opt_state", opt_state, jax.eval_shape(optimizer.init, params)
        )
    if early_stopping is not None:
        if es_state is None:
            es_state = early_stopping.init(params)
        else:
            es_state = _fit_checks.checked_state(
                "early_stopping_state", es_state, jax.eval_shape(early_stopping.init, params)
            )

    def call(p, batch):
        return loss_fn(p) if n_data is None else loss_fn(p, batch)

    batch0 = None if n_data is None else _fit_checks.batch_at(data, 0)
    metric_shape = _fit_checks.check_loss_output(jax.eval_shape(call, params, batch0), has_aux)
    value_and_grad = jax.value_and_grad(call, has_aux=has_aux)

    # Steps run in chunks: an inner while_loop over a chunk writes its values
    # to a (chunk,) buffer, and an outer while_loop over chunks copies the
    # buffer into `losses`. Under vmap a while_loop selects its whole carry on
    # every iteration, so keeping the (num_steps,) `losses` out of the inner
    # carry makes a step O(chunk) rather than O(num_steps).
    chunk = max(1, math.isqrt(num_steps))
    n_chunks = -(-num_steps // chunk)

    def step(c: _Carry) -> _Carry:
        batch = (
            None if n_data is None else _fit_checks.batch_at(data, (initial_step + c.i) % n_data)
        )
        out, grads = value_and_grad(c.params, batch)
        metric = out[1] if has_aux else out
        buffer = c.losses.at[c.i % chunk].set(metric.astype(c.losses.dtype))
        es_state, stop = c.es_state, c.stop
        if early_stopping is not None:
            # A step whose gradient (or, with has_aux, training loss) is not
            # finite counts as a non-finite value, which the metric alone may
            # not show: with check_finite it stops before m and v take it in.
            finite = _all_finite(grads)
            if has_aux:
                finite &= jnp.isfinite(out[0])
            value = jnp.where(finite, metric, jnp.nan)
            es_state = early_stopping.update(es_state, value, c.params)
            stop = es_state.should_stop
        updates, opt_state = optimizer.update(grads, c.opt_state, c.params)
        new_params = optax.apply_updates(c.params, updates)
        # The stopping step's update is not applied: params stay where the
        # stopping value was measured.
        return _Carry(
            i=c.i + 1,
            applied=c.applied + jnp.where(stop, 0, 1).astype(jnp.int32),
            params=_tree_where(stop, c.params, new_params),
            opt_state=_tree_where(stop, c.opt_state, opt_state),
            es_state=es_state,
            losses=buffer,
            stop=stop,
        )

    def running(c: _Carry, end: Any = num_steps) -> jax.Array:
        return (c.i < end) & ~c.stop

    empty_buffer = jnp.full((chunk,), jnp.nan, metric_shape.dtype)
    carry = _Carry(
        i=jnp.zeros([], jnp.int32),
        applied=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=opt_state,
        es_state=es_state,
        losses=empty_buffer,
        # A resumed state that has already stopped takes no step.
        stop=jnp.zeros([], bool) if es_state is None else es_state.should_stop,
    )
    losses = jnp.full((n_chunks * chunk,), jnp.nan, metric_shape.dtype)

    every = log_every if log_every is not None else max(1, num_steps // 100)
    reporter = (
        _reporting.Reporter(num_steps, log_every, progress, every)
        if log_every or progress
        else None
    )
    # Lines are due at the multiples of `every` counted from step 0, so a
    # resumed run logs the steps the uninterrupted one would have.
    due = (-initial_step) % every + every * jnp.arange(-(-num_steps // every))
    due = jnp.minimum(due, losses.shape[0] - 1)

    def report_args(c: _Carry, losses: jax.Array) -> tuple[jax.Array, ...]:
        return initial_step, c.i, losses[due], losses[jnp.maximum(c.i - 1, 0)]

    def run_chunk(state: tuple[_Carry, jax.Array, jax.Array]) -> tuple[Any, ...]:
        c, losses, next_report = state
        i0 = c.i
        end = jnp.minimum(i0 + chunk, num_steps)
        c = jax.lax.while_loop(
            functools.partial(running, end=end), step, c._replace(losses=empty_buffer)
        )
        # Only under vmap is the body entered for a stopped problem; it ran no
        # steps, and its losses must not be overwritten.
        losses = jnp.where(c.i > i0, jax.lax.dynamic_update_slice(losses, c.losses, (i0,)), losses)
        if reporter is not None:
            next_report = jax.lax.cond(
                c.i >= next_report,
                lambda: _reporting.report(
                    reporter, _reporting.REPORT, *report_args(c, losses), running(c), i0 == 0
                ),
                lambda: next_report,
            )
        return c, losses, next_report

    end_token = 0
    next_report = jnp.zeros([], jnp.int32)  # the first chunk always reports
    # `next_report >= 0` always holds; it is in the condition so that neither
    # JAX nor XLA drops the (pure) callbacks that compute it.
    carry, losses, _ = jax.lax.while_loop(
        lambda s: running(s[0]) & (s[2] >= 0), run_chunk, (carry, losses, next_report)
    )
    if reporter is not None:
        reason = jnp.int32(StopReason.NONE) if early_stopping is None else carry.es_state.reason
        end_token = _reporting.report(reporter, _reporting.END, *report_args(carry, losses), reason)

    es_state = carry.es_state
    if early_stopping is None:
        best_params = carry.params
        stop_reason = jnp.int32(StopReason.NONE)
        best_step = jnp.int32(-1)
        best_value = jnp.asarray(jnp.nan, metric_shape.dtype)
    else:
        best_params = carry.params if es_state.best_params is None else es_state.best_params
        stop_reason, best_step, best_value = (
            es_state.reason,
            es_state.best_step,
            es_state.best_value,
        )
    return FitResult(
        params=carry.params,
        best_params=best_params,
        opt_state=carry.opt_state,
        losses=losses[:num_steps],
        num_steps=carry.applied + end_token,
        stop_reason=stop_reason,
        best_step=best_step,
        best_value=best_value,
        early_stopping_state=es_state,
    )


_STATIC = (
    "loss_fn",
    "optimizer",
    "early_stopping",
    "num_steps",
    "n_data",
    "has_aux",
    "log_every",
    "progress",
)
_run_jit = jax.jit(_run, static_argnames=_STATIC)


def fit(
    loss_fn: Any,
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    data: Any = None,
    early_stopping: EarlyStopping | None = None,
    has_aux: bool = False,
    log_every: int | None = None,
    progress: bool = False,
    opt_state: Any = None,
    early_stopping_state: EarlyStoppingState | None = None,
    initial_step: Any = 0,
) -> FitResult:
    r"""Train ``params`` with ``optimizer`` for up to ``num_steps`` steps in one compiled loop.

    Step :math:`i = s, s + 1, \dots` (:math:`s` is ``initial_step``, 0 unless
    the fit resumes a saved run) computes the loss and its gradient at the
    current params :math:`p_i` (``jax.value_and_grad`` inside the loop), gives
    the monitored value to the early-stopping state, and then, unless that
    says stop, applies the optimizer's update:

    .. math::

      \ell_i, g_i = \mathrm{value\_and\_grad}(f)(p_i), \qquad
      p_{i+1} = p_i + \mathrm{optimizer}(g_i)

    If step :math:`i` stops, its update is not applied: ``params`` is
    :math:`p_i`, the point where the stopping value was measured, and
    ``num_steps`` (updates applied) is :math:`i - s`. From then on nothing changes.

    **Non-finite values.** Without early stopping, a NaN or ±inf gradient flows
    into the optimizer state and the params, as in optax and ``torch.optim``,
    and ``losses`` shows NaN from then on. Two guards:

    * ``early_stopping`` with ``check_finite=True`` (its default) stops with
      ``NONFINITE`` at the first step whose monitored value, training loss or
      gradient holds a NaN or ±inf. That step's update is not applied, so the
      returned ``params`` and ``opt_state`` are those from before it, with no
      NaN in them. ``fit`` checks the gradient itself, because a gradient can
      overflow while the loss stays finite: such a step is given to early
      stopping as a NaN value, while ``losses`` keeps the finite value
      measured. The check is one ``isfinite`` reduction per step, a read of
      the gradient (Adam's own update reads and writes seven arrays of that
      size); it runs only with early stopping. With ``check_finite=False``
      the step only counts as not improving. During early stopping's
      ``start_step`` warm-up nothing is checked (updates before ``start_step``
      change nothing but the step count), so a bad step there reaches the
      state: use the next guard too if the warm-up may see one.
    * ``optax.apply_if_finite(optimizer, max_consecutive_errors)`` skips the
      bad update and leaves the params and the inner state as they were; the
      run goes on. (With early stopping too, pass ``check_finite=False``, or
      the run stops at the bad step instead.)

    **Checkpoint and resume.** The params, ``opt_state`` and
    ``early_stopping_state`` of a :class:`FitResult` are plain pytrees of
    arrays: save them with the next step, ``initial_step + num_steps``. A fit
    given them continues the run: the states replace ``init``'s, and steps are
    numbered from ``initial_step``, so batches (``data[i % n]``), early
    stopping's ``wait``, best and count, and the log lines pick up where the
    saved run left off, and the trajectory is bit-identical to an uninterrupted
    run's on the same machine. A resumed early-stopping state that has already
    stopped takes no step.

    All steps run in one ``lax.while_loop``, with no Python dispatch per step,
    and ``fit`` is jitted (cached on ``loss_fn``, ``optimizer`` and
    ``early_stopping`` when they are hashable). Called directly, the loop exits
    at the stop. ``jax.jit(jax.vmap(f))`` over a function ``f`` that calls
    ``fit`` trains many problems at once; they may differ in data, initial
    params and optimizer hyperparameters, each stops on its own, and each
    result equals what the problem gets when fitted alone, up to float
    rounding: batched kernels may round differently, so in float32 a problem
    whose stop depends on a threshold can stop a few steps apart (float64 runs
    matched exactly in the tests). Under vmap the loop runs until every
    problem has stopped, with the stopped ones frozen.

    Args:
      loss_fn: ``loss_fn(params)`` (full batch) or ``loss_fn(params, batch)``
        when ``data`` is given; returns a real scalar, or with ``has_aux=True``
        a pair ``(loss, metric)``.
      params: the initial params, a pytree.
      optimizer: an ``optax.GradientTransformation``; ``update`` is given the params.
      num_steps: the most steps to take, a positive Python int.
      data: a pytree whose leaves share a leading axis indexed by step; step
        :math:`i` gets ``batch = data[i % n]``, so shorter data is cycled.
      early_stopping: an :func:`early_stopping` object, or None to run all steps.
      has_aux: ``loss_fn`` returns ``(loss, metric)``: gradients are taken of
        ``loss``, while ``metric`` (a scalar, such as a validation loss or
        seed 001's MSE next to the loss it differentiates) is what early
        stopping monitors and what ``losses``, the log and the bar show.
      log_every: print ``epoch {i} loss {value}`` for steps 0, ``log_every``,
        2·``log_every``, ..., as seed 001 prints ``epoch {i} RMSE Error {mse}``
        (its "RMSE" is the MSE; here the word is "loss", and the value is
        whatever ``losses`` holds). The steps are the multiples of
        ``log_every`` from ``initial_step`` on, so a resumed fit logs the
        lines the uninterrupted run would have.
      progress: show a tqdm progress bar with the step and the latest value
        (needs ``pip install adam_jax[progress]``).
      opt_state: the optimizer state to start from, e.g. a saved
        ``FitResult.opt_state``, instead of ``optimizer.init(params)``. It must
        have the tree, shapes and dtypes ``init`` gives; nothing is cast.
      early_stopping_state: the early-stopping state to start from, e.g. a
        saved ``FitResult.early_stopping_state``, instead of
        ``early_stopping.init(params)``; needs ``early_stopping``.
      initial_step: the number of the first step, >= 0, as Keras's
        ``initial_epoch``: a resumed fit passes the saved run's
        ``initial_step + num_steps``. It picks the batches and the logged
        steps; ``losses[k]`` is step ``initial_step + k``. (Early stopping
        counts in its own state; its ``start_step`` is a warm-up, in the same
        numbering.) An int, or an int array, also traced: under vmap each
        problem may resume at its own step. A new value does not recompile.

    Logging and the bar are driven from inside the compiled loop, through
    ``jax.pure_callback``. A host round trip costs tens of microseconds, more
    than a small step, so the loop calls back about every 0.1 s (each call tells
    the loop when to call next) and every call prints all the lines that have
    come due, each with the value measured at its own step. Lines thus arrive
    in small bursts, but they are the same lines, and the cost does not depend
    on ``log_every`` or on the size of a step.

    Under vmap there is one call for the whole batch, not one per problem (as
    ``jax.debug.callback`` would make): one line per logged step, with the min,
    mean and max over the problems that measured that step and how many did
    (``epoch 100 loss min … mean … max … (3 of 8 running)``); one bar, with the
    furthest step, the min of the latest values and the number still running.
    Under vmap the loop cannot skip calls, so it calls back after every chunk
    of about ``sqrt(num_steps)`` steps, and the printing is throttled on the host.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: ``num_steps <= 0``, ``loss_fn`` not returning a scalar, data
        leaves disagreeing on the leading axis, ``initial_step < 0``, a given
        state that does not match what ``init`` builds for ``params``,
        ``early_stopping_state`` without ``early_stopping``.
      TypeError: ``num_steps``, ``log_every`` or ``initial_step`` not an int.

    Example:
      Seed 001: Adam on a linear regression, stopping once the MSE falls below 1.
      The gradient the seed uses, ``-xᵀ(y - xwᵀ)``, is that of half the sum of
      squares, so that is the loss and the MSE is the monitored metric:

      >>> import jax.numpy as jnp, adam_jax
      >>> from adam_jax import _seeds
      >>> x, y = map(jnp.asarray, _seeds.seed001_data())
      >>> def loss_fn(w):
      ...     error = y - x @ w.T
      ...     return 0.5 * jnp.sum(error**2), jnp.sum(error**2) / x.shape[0]
      >>> result = adam_jax.fit(
      ...     loss_fn, jnp.zeros((1, 4)), adam_jax.adam(0.01), num_steps=100_000,
      ...     has_aux=True, early_stopping=adam_jax.early_stopping(None, target=1.0))
      >>> print(int(result.num_steps), adam_jax.StopReason(int(result.stop_reason)).name)
      436 TARGET

      The same run in two parts, 200 steps and then the rest, with the states
      saved in between; the second part ends on the same bits:

      >>> es = adam_jax.early_stopping(None, target=1.0)
      >>> part = adam_jax.fit(
      ...     loss_fn, jnp.zeros((1, 4)), adam_jax.adam(0.01), num_steps=200,
      ...     has_aux=True, early_stopping=es)
      >>> rest = adam_jax.fit(
      ...     loss_fn, part.params, adam_jax.adam(0.01), num_steps=100_000 - 200,
      ...     has_aux=True, early_stopping=es, opt_state=part.opt_state,
      ...     early_stopping_state=part.early_stopping_state,
      ...     initial_step=part.num_steps)
      >>> print(200 + int(rest.num_steps), bool((rest.params == result.params).all()))
      436 True
    """
    _fit_checks.check_positive_int("num_steps", num_steps)
    if log_every is not None:
        _fit_checks.check_positive_int("log_every", log_every)
    _checks.check_bool("has_aux", has_aux)
    _checks.check_bool("progress", progress)
    if progress:
        _reporting.import_tqdm()
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    if early_stopping is not None and not (
        hasattr(early_stopping, "init") and hasattr(early_stopping, "update")
    ):
        raise TypeError(
            "early_stopping must be the object adam_jax.early_stopping(...) returns, "
            f"got {early_stopping!r}"
        )
    if early_stopping_state is not None and early_stopping is None:
        raise ValueError(
            "early_stopping_state needs early_stopping: pass the early_stopping(...) "
            "object that made it"
        )
    _fit_checks.check_initial_step(initial_step, num_steps)
    static = dict(
        loss_fn=loss_fn,
        optimizer=optimizer,
        early_stopping=early_stopping,
        num_steps=int(num_steps),
        n_data=_fit_checks.data_length(data),
        has_aux=bool(has_aux),
        log_every=None if log_every is None else int(log_every),
        progress=bool(progress),
    )
    try:
        hash(tuple(static.values()))
    except TypeError:
        run = jax.jit(functools.partial(_run, **static))
    else:
        run = functools.partial(_run_jit, **static)
    initial_step = jnp.asarray(initial_step).astype(jnp.int32)
    return run(params, data, opt_state, early_stopping_state, initial_step)
