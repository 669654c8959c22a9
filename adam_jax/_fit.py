"""``fit``: a whole training run, early stopping included, as one compiled loop."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax import _common
from adam_jax._early_stopping import EarlyStopping, EarlyStoppingState, StopReason, _tree_where


class FitResult(NamedTuple):
    """What :func:`fit` returns (a NamedTuple, so a pytree that vmap can batch).

    Attributes:
      params: the final params. After a stop, the params at which the stopping
        value was measured (that step's update is not applied).
      best_params: the params of the best step when early stopping has
        ``restore_best=True``; otherwise the final params.
      opt_state: the final optimizer state.
      losses: ``(num_steps,)``, the monitored value at each step (the loss, or
        the metric with ``has_aux=True``); NaN from the step after a stop.
      num_steps: int32, the number of updates applied.
      stop_reason: int32 holding a :class:`StopReason`; ``NONE`` if the run
        did not stop early.
      best_step: int32, the step of the best value (so ``best_params`` are the
        params after ``best_step`` updates); -1 without early stopping or if
        nothing improved.
      best_value: the best monitored value; NaN without early stopping.
    """

    params: Any
    best_params: Any
    opt_state: Any
    losses: jax.Array
    num_steps: jax.Array
    stop_reason: jax.Array
    best_step: jax.Array
    best_value: jax.Array


class _Carry(NamedTuple):
    i: jax.Array  # steps taken (losses written)
    applied: jax.Array  # updates applied
    params: Any
    opt_state: Any
    es_state: EarlyStoppingState | None
    losses: jax.Array  # the current chunk's values
    stop: jax.Array


# --------------------------------------------------------------------------
# Checks.
# --------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{name} must be a Python int (it fixes the length of the loop and of "
            f"`losses`), got {name}={value!r}"
        )
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value}")


def _data_length(data: Any) -> int | None:
    if data is None:
        return None
    leaves = jax.tree_util.tree_flatten_with_path(data)[0]
    if not leaves:
        raise ValueError("data has no array leaves; pass data=None for full-batch training")
    lengths = {}
    for path, leaf in leaves:
        name = "data" + jax.tree_util.keystr(path)
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"{name} is a scalar; every data leaf needs a leading axis indexed by step"
            )
        lengths[name] = jnp.shape(leaf)[0]
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise ValueError(f"data leaves disagree on the leading (step) axis: {shown}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("data has a leading (step) axis of length 0")
    return n


def _batch_at(data: Any, index: Any) -> Any:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), data)


def _check_loss_output(out: Any, has_aux: bool) -> jax.ShapeDtypeStruct:
    """The dtype of the monitored value, after checking what ``loss_fn`` returns."""
    if has_aux:
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ValueError(
                "with has_aux=True, loss_fn must return a pair (loss, metric), got "
                f"{jax.tree.structure(out)}"
            )
        named = [("loss", out[0]), ("metric", out[1])]
    else:
        named = [("loss", out)]
    for what, x in named:
        if not isinstance(x, jax.ShapeDtypeStruct):
            raise ValueError(f"loss_fn's {what} must be a single array, got {out}")
        if x.shape != ():
            raise ValueError(f"loss_fn's {what} must be a scalar, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"loss_fn's {what} must be a real float scalar, got dtype {x.dtype}")
    return named[-1][1]


def _import_tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise ImportError(
            "progress=True needs tqdm, an optional dependency: pip install adam_jax[progress]"
        ) from e
    return tqdm


# --------------------------------------------------------------------------
# Reporting from inside the compiled loop.
# --------------------------------------------------------------------------

_REPORT, _END = 1, 2


class _Reporter:
    """Host side of ``log_every`` and ``progress``, called from the compiled loop.

    Calls come through ``jax.pure_callback`` with ``vmap_method="broadcast_all"``:
    under vmap there is one call for the whole batch (arrays with leading batch
    axes), not one per problem as with ``jax.debug.callback``.

    A host round trip costs tens of microseconds, more than a small step, so
    the loop does not call back every ``log_every`` steps. Each call returns the
    step of the next one, about ``interval`` seconds of steps ahead, and gets
    the values measured at steps 0, ``log_every``, 2·``log_every``, ... so far,
    from which it prints every line that has come due. Under vmap the loop calls
    back after every chunk of steps, and the printing is throttled here instead.
    """

    interval = 0.1  # seconds between reports, as tqdm's default mininterval

    def __init__(self, num_steps: int, log_every: int | None, progress: bool, every: int):
        self.num_steps = num_steps
        self.log_every = log_every
        self.every = every
        self.tqdm = _import_tqdm() if progress else None
        self.bar = None
        self._reset()

    def _reset(self) -> None:
        self.printed = 0  # lines printed so far
        self.t_shown = time.monotonic()
        self.t_last = None  # time and step of the previous call, for the rate
        self.i_last = 0
        self.shown_once = False

    def __call__(self, kind: int, *args: np.ndarray) -> np.ndarray:
        # The arguments may arrive as jax Arrays; NumPy is much cheaper here.
        args = [np.asarray(a) for a in args]
        batch_shape = args[0].shape
        i = args[0].reshape(-1)
        if kind == _REPORT and args[4].any():  # the first chunk: a new run
            if self.bar is not None:
                self.bar.close()
            self.bar = None
            if self.tqdm is not None:
                self.bar = self.tqdm(total=self.num_steps, unit="step", desc="fit")
            self._reset()
        due_values = args[1].reshape(i.size, -1)
        last = args[2].reshape(-1)
        steps = int(i.max())
        now = time.monotonic()
        if kind == _END:
            self._show(steps, i, due_values, last, reason=args[3].reshape(-1))
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            return np.zeros(batch_shape, np.int32)
        running = args[3].reshape(-1)
        if not self.shown_once or now - self.t_shown >= self.interval / 2:
            self._show(steps, i, due_values, last, running=running)
            self.t_shown, self.shown_once = now, True
        if self.t_last is None:  # the first call: measure the rate over the next chunk
            ahead = 1
        else:
            rate = (steps - self.i_last) / max(now - self.t_last, 1e-9)
            ahead = max(1, int(rate * self.interval))
        self.t_last, self.i_last = now, steps
        return np.full(batch_shape, min(steps + ahead, self.num_steps), np.int32)

    def _show(self, steps, i, due_values, last, *, running=None, reason=None) -> None:
        batch = i.size
        if self.bar is not None:
            self.bar.n = min(steps, self.num_steps)  # before any line: write() redraws it
        if self.log_every is not None:
            # Lines for every multiple of log_every measured so far (step < steps).
            # Values print with `!s`: the shortest repr in their own dtype.
            while self.printed * self.every < steps:
                k = self.printed
                step = k * self.every
                if batch == 1:
                    line = f"epoch {step} loss {due_values[0, k]!s}"
                else:
                    at = i > step  # the problems that measured this step
                    v = due_values[at, k]
                    line = (
                        f"epoch {step} loss min {np.nanmin(v)!s} mean {np.nanmean(v)!s} "
                        f"max {np.nanmax(v)!s} ({at.sum()} of {batch} running)"
                    )
                self._write(line)
                self.printed += 1
        if self.bar is None:
            return
        if reason is not None:  # the end: close() draws the bar
            if batch == 1 and reason[0] != StopReason.NONE:
                self.bar.set_postfix_str(f"stopped: {StopReason(int(reason[0])).name}", False)
                return
            if batch > 1:
                stopped = int((reason != StopReason.NONE).sum())
                self.bar.set_postfix_str(f"{stopped} of {batch} stopped early", False)
                return
        if batch == 1:
            self.bar.set_postfix(loss=f"{last[0]:.6g}", refresh=False)
        else:
            self.bar.set_postfix(
                loss_min=f"{np.nanmin(last):.6g}", running=f"{running.sum()}/{batch}", refresh=False
            )
        if reason is None:
            self.bar.refresh()

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)


def _report(reporter: _Reporter, kind: int, *args: jax.Array) -> jax.Array:
    return jax.pure_callback(
        functools.partial(reporter, kind),
        jax.ShapeDtypeStruct((), jnp.int32),
        *args,
        vmap_method="broadcast_all",
    )


# --------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------


def _run(
    params: Any,
    data: Any,
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
    # Strip weak types so the loop carry keeps one type across iterations.
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), params)

    def call(p, batch):
        return loss_fn(p) if n_data is None else loss_fn(p, batch)

    batch0 = None if n_data is None else _batch_at(data, 0)
    metric_shape = _check_loss_output(jax.eval_shape(call, params, batch0), has_aux)
    value_and_grad = jax.value_and_grad(call, has_aux=has_aux)

    # Steps run in chunks: an inner while_loop over a chunk writes its values
    # to a (chunk,) buffer, and an outer while_loop over chunks copies the
    # buffer into `losses`. Under vmap a while_loop selects its whole carry on
    # every iteration, so keeping the (num_steps,) `losses` out of the inner
    # carry makes a step O(chunk) rather than O(num_steps).
    chunk = max(1, math.isqrt(num_steps))
    n_chunks = -(-num_steps // chunk)

    def step(c: _Carry) -> _Carry:
        batch = None if n_data is None else _batch_at(data, c.i % n_data)
        out, grads = value_and_grad(c.params, batch)
        metric = out[1] if has_aux else out
        buffer = c.losses.at[c.i % chunk].set(metric.astype(c.losses.dtype))
        es_state, stop = c.es_state, c.stop
        if early_stopping is not None:
            es_state = early_stopping.update(es_state, metric, c.params)
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
        opt_state=optimizer.init(params),
        es_state=None if early_stopping is None else early_stopping.init(params),
        losses=empty_buffer,
        stop=jnp.zeros([], bool),
    )
    losses = jnp.full((n_chunks * chunk,), jnp.nan, metric_shape.dtype)

    every = log_every if log_every is not None else max(1, num_steps // 100)
    reporter = _Reporter(num_steps, log_every, progress, every) if log_every or progress else None

    def report_args(c: _Carry, losses: jax.Array) -> tuple[jax.Array, ...]:
        # The values at steps 0, every, 2·every, ... (the log lines) and the latest.
        return c.i, losses[:num_steps:every], losses[jnp.maximum(c.i - 1, 0)]

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
                lambda: _report(reporter, _REPORT, *report_args(c, losses), running(c), i0 == 0),
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
        end_token = _report(reporter, _END, *report_args(carry, losses), reason)

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
) -> FitResult:
    r"""Train ``params`` with ``optimizer`` for up to ``num_steps`` steps in one compiled loop.

    Step :math:`i = 0, 1, \dots` computes the loss and its gradient at the
    current params :math:`p_i` (``jax.value_and_grad`` inside the loop), gives
    the monitored value to the early-stopping state, and then, unless that
    says stop, applies the optimizer's update:

    .. math::

      \ell_i, g_i = \mathrm{value\_and\_grad}(f)(p_i), \qquad
      p_{i+1} = p_i + \mathrm{optimizer}(g_i)

    If step :math:`i` stops, its update is not applied: ``params`` is
    :math:`p_i`, the point where the stopping value was measured, and
    ``num_steps`` (updates applied) is :math:`i`. From then on nothing changes.

    All steps run in one ``lax.while_loop``, with no Python dispatch per step,
    and ``fit`` is jitted (cached on ``loss_fn``, ``optimizer`` and
    ``early_stopping`` when they are hashable). Called directly, the loop exits
    at the stop. ``jax.jit(jax.vmap(f))`` over a function ``f`` that calls
    ``fit`` trains many problems at once; they may differ in data, initial
    params and optimizer hyperparameters, each stops on its own, and each
    result equals what the problem gets when fitted alone. Under vmap the loop
    runs until every problem has stopped, with the stopped ones frozen.

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
        whatever ``losses`` holds).
      progress: show a tqdm progress bar with the step and the latest value
        (needs ``pip install adam_jax[progress]``).

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
        leaves disagreeing on the leading axis.

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
    """
    _check_positive_int("num_steps", num_steps)
    if log_every is not None:
        _check_positive_int("log_every", log_every)
    _common.check_bool("has_aux", has_aux)
    _common.check_bool("progress", progress)
    if progress:
        _import_tqdm()
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    if early_stopping is not None and not (
        hasattr(early_stopping, "init") and hasattr(early_stopping, "update")
    ):
        raise TypeError(
            "early_stopping must be the object adam_jax.early_stopping(...) returns, "
            f"got {early_stopping!r}"
        )
    static = dict(
        loss_fn=loss_fn,
        optimizer=optimizer,
        early_stopping=early_stopping,
        num_steps=int(num_steps),
        n_data=_data_length(data),
        has_aux=bool(has_aux),
        log_every=None if log_every is None else int(log_every),
        progress=bool(progress),
    )
    try:
        hash(tuple(static.values()))
    except TypeError:
        return jax.jit(functools.partial(_run, **static))(params, data)
    return _run_jit(params, data, **static)
