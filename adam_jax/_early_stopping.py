"""Early stopping as a pure state machine: jittable, vmappable, usable in any loop."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import Partial

from adam_jax import _checks
from adam_jax._tree import tree_where, without_weak_types


class StopReason(enum.IntEnum):
    """Why :func:`early_stopping` stopped; stored as an int array in the state."""

    NONE = 0
    PATIENCE = 1
    TARGET = 2
    DIVERGED = 3
    NONFINITE = 4


@_checks.state_class
class EarlyStoppingState(NamedTuple):
    """State of :func:`early_stopping`.

    Attributes:
      step: int32 scalar, how many updates the state has seen (it stops counting
        once ``should_stop`` is true).
      best_value: the best value so far; the baseline, or ±inf, until something improves.
      best_step: int32 scalar, the update (counted from 0) that gave ``best_value``;
        -1 until something improves.
      best_params: the params passed with the best value; the params given to
        ``init`` until something improves; None when ``restore_best=False``.
      wait: int32 scalar, updates since the last improvement.
      should_stop: bool scalar.
      reason: int32 scalar holding a :class:`StopReason`.
    """

    step: jax.Array
    best_value: jax.Array
    best_step: jax.Array
    best_params: Any
    wait: jax.Array
    should_stop: jax.Array
    reason: jax.Array


class EarlyStopping(NamedTuple):
    """A pair of pure functions, like ``optax.GradientTransformation``, and a pytree.

    ``init`` and ``update`` are ``jax.tree_util.Partial`` objects: the rule's
    numbers (``patience``, ``min_delta``, ``baseline``, ``start_step``,
    ``target``, ``divergence``) are its leaves, and its mode and flags are a
    static part of the tree structure, compared by value. So two rules built
    alike, with equal or different numbers, have equal tree structures: a
    jitted function taking the rule as an argument (``fit`` among them)
    compiles once for all of them, and a stack of rules can be vmapped over.

    Attributes:
      init: ``init(params) -> EarlyStoppingState``.
      update: ``update(state, value, params=None) -> EarlyStoppingState``.
    """

    init: Callable[..., EarlyStoppingState]
    update: Callable[..., EarlyStoppingState]


def early_stopping(
    patience: Any = 10,
    min_delta: Any = 0.0,
    *,
    mode: Literal["min", "max"] = "min",
    relative: bool = False,
    baseline: Any = None,
    start_step: Any = 0,
    target: Any = None,
    divergence: Any = None,
    check_finite: bool = True,
    restore_best: bool = True,
) -> EarlyStopping:
    r"""Stop when a monitored value stops improving, reaches a target, or diverges.

    A pure state machine: ``init`` and ``update`` are jittable and vmappable, so a
    whole training run, stopping included, compiles to one program, and a vmap
    over many runs lets each stop on its own.

    Updates are numbered from 0. An update with ``step < start_step`` only counts
    (warm-up). After that, with ``mode="min"``, a value *improves* when

    .. math::

      \text{value} < \text{best} - \delta, \qquad
      \delta = \begin{cases} \text{min\_delta} & \text{relative=False} \\
      \text{min\_delta}\cdot|\text{best}| & \text{relative=True, best finite} \\
      0 & \text{relative=True, best infinite} \end{cases}

    (``mode="max"``: value > best + δ). ``best`` starts at ``baseline``, or
    +inf (-inf for ``mode="max"``). An improvement stores the value, the step
    and the params as the best and resets ``wait`` to 0; anything else adds 1
    to ``wait``. A non-finite value never improves. Then the update stops, for
    the first reason that holds, in this order:

    1. ``NONFINITE``: the value is NaN or ±inf and ``check_finite``.
    2. ``TARGET``: the value reaches ``target`` (value <= target; >= for "max").
    3. ``DIVERGED``: the value is past ``divergence`` (value > divergence; < for "max").
    4. ``PATIENCE``: the update did not improve and ``wait >= patience``.

    An improving update never stops for patience, so ``patience=0`` stops at
    the first update that does not improve. Keras's ``EarlyStopping(patience=0)``
    differs: it stops even on an improving epoch (keras #16393). Once
    ``should_stop`` is true the state never changes again.

    Args:
      patience: updates without improvement to tolerate, >= 0; None never stops
        for patience (for example to stop on ``target`` alone).
      min_delta: the margin an improvement must beat, >= 0.
      mode: "min" or "max".
      relative: ``min_delta`` is relative to ``|best|`` (once the best is finite).
      baseline: the value a loss must beat before anything counts as better.
      start_step: updates before this one only count, >= 0.
      target: stop when the value reaches it (an MSE below 1, say).
      divergence: stop when the value is past it.
      check_finite: stop on NaN or ±inf. With False a non-finite value just
        does not improve.
      restore_best: keep the params of the best update in ``best_params``;
        ``update`` then needs ``params``.

    ``patience``, ``min_delta``, ``baseline``, ``start_step``, ``target`` and
    ``divergence`` are the leaves of the returned pytree and may be traced arrays
    (so a vmap can give each problem its own, and new values compile nothing new);
    concrete values are range-checked here, traced ones under
    ``jax.experimental.checkify``. ``mode`` and the bools are structural: a rule
    with another mode, another flag, or a threshold set that was None has another
    tree structure.

    Returns:
      An :class:`EarlyStopping` ``(init, update)`` pair. ``init(params)`` returns
      an :class:`EarlyStoppingState`; ``update(state, value, params=None)``
      returns the next one. Values are compared in the default float dtype
      (float64 with ``jax_enable_x64``, else float32).

    Example:
      A hand-written loop (``adam_jax.fit`` does the same inside one
      ``lax.while_loop``):

      >>> import jax, jax.numpy as jnp, optax, adam_jax
      >>> loss_fn = lambda p: (p - 3.0) ** 2
      >>> opt = adam_jax.adam(0.1)
      >>> es = adam_jax.early_stopping(patience=5, target=1e-2)
      >>> params = jnp.array(0.0)
      >>> opt_state, es_state = opt.init(params), es.init(params)
      >>> for _ in range(1000):
      ...     loss, grads = jax.value_and_grad(loss_fn)(params)
      ...     es_state = es.update(es_state, loss, params)
      ...     if es_state.should_stop:
      ...         break
      ...     updates, opt_state = opt.update(grads, opt_state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(adam_jax.StopReason(int(es_state.reason)).name, int(es_state.step) - 1)
      TARGET 37

      The rule is a pytree whose leaves are its numbers: a stack of rules runs
      under ``jax.vmap``, here three patiences on the same sequence of values:

      >>> rules = [adam_jax.early_stopping(p, restore_best=False) for p in (1, 2, 3)]
      >>> stacked = jax.tree.map(lambda *x: jnp.asarray(x), *rules)
      >>> def stop_step(es):
      ...     state = es.init()
      ...     for value in [3.0, 2.0, 2.5, 2.4, 2.3, 2.2, 1.0]:
      ...         state = es.update(state, value)
      ...     return state.step - 1
      >>> print(jax.vmap(stop_step)(stacked).tolist())
      [2, 3, 4]

    References:
      Prechelt, *Early Stopping — But When?*, in Neural Networks: Tricks of the Trade, 1998.
    """
    if patience is not None:
        _checks.check_non_negative_int("patience", patience)
    _checks.check_non_negative("min_delta", min_delta)
    _checks.check_non_negative_int("start_step", start_step)
    _checks.check_choice("mode", mode, ["min", "max"])
    for name, flag in [
        ("relative", relative),
        ("check_finite", check_finite),
        ("restore_best", restore_best),
    ]:
        _checks.check_bool(name, flag)
    for name, value in [("baseline", baseline), ("target", target), ("divergence", divergence)]:
        if value is not None:
            _checks.check_interval(name, value, -jnp.inf, jnp.inf, high_open=False)
    config = _Config(
        minimize=mode == "min",
        relative=relative,
        check_finite=check_finite,
        restore_best=restore_best,
    )
    numbers = _Numbers(patience, min_delta, baseline, start_step, target, divergence)
    return EarlyStopping(Partial(_init, config, numbers), Partial(_update, config, numbers))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Config:
    """The structural options: part of the treedef, compared by value."""

    minimize: bool
    relative: bool
    check_finite: bool
    restore_best: bool


class _Numbers(NamedTuple):
    """The numeric options: the pytree leaves (None where not set), traced or concrete."""

    patience: Any
    min_delta: Any
    baseline: Any
    start_step: Any
    target: Any
    divergence: Any


def _init(config: _Config, n: _Numbers, params: Any = None) -> EarlyStoppingState:
    if config.restore_best and params is None:
        raise ValueError(
            "early_stopping(restore_best=True).init needs the params, whose best "
            "version it keeps; pass them, or use restore_best=False"
        )
    dtype = jnp.result_type(float)
    if n.baseline is None:
        best = jnp.asarray(jnp.inf if config.minimize else -jnp.inf, dtype)
    else:
        best = jnp.asarray(n.baseline, dtype)
    return EarlyStoppingState(
        step=jnp.zeros([], jnp.int32),
        best_value=best,
        best_step=jnp.full([], -1, jnp.int32),
        best_params=without_weak_types(params) if config.restore_best else None,
        wait=jnp.zeros([], jnp.int32),
        should_stop=jnp.zeros([], bool),
        reason=jnp.asarray(StopReason.NONE, jnp.int32),  # not weakly typed, as update returns it
    )


def _check_traced(n: _Numbers) -> None:
    """Range checks of traced numbers, under ``checkify`` (concrete ones are checked when built)."""
    for name in ("patience", "min_delta", "start_step"):
        value = getattr(n, name)
        if value is not None:
            _checks.traced_interval(name, value, 0.0)


def _update(
    config: _Config, n: _Numbers, state: EarlyStoppingState, value: Any, params: Any = None
) -> EarlyStoppingState:
    if config.restore_best:
        if params is None:
            raise ValueError(
                "early_stopping(restore_best=True).update needs params: "
                "update(state, value, params)"
            )
        _checks.check_like(
            params, state.best_params, what="params", reference_name="the params given to init"
        )
    value = jnp.asarray(value)
    if value.ndim != 0:
        raise ValueError(f"the monitored value must be a scalar, got shape {value.shape}")
    if value.dtype == bool or jnp.issubdtype(value.dtype, jnp.complexfloating):
        raise TypeError(f"the monitored value must be a real number, got dtype {value.dtype}")
    _check_traced(n)

    best = state.best_value
    v = value.astype(best.dtype)
    finite = jnp.isfinite(v)
    if config.relative:
        delta = jnp.where(jnp.isfinite(best), n.min_delta * jnp.abs(best), 0)
    else:
        delta = jnp.asarray(n.min_delta, best.dtype)
    if config.minimize:
        improved = finite & (v < best - delta)
        hit_target = False if n.target is None else v <= n.target
        diverged = False if n.divergence is None else v > n.divergence
    else:
        improved = finite & (v > best + delta)
        hit_target = False if n.target is None else v >= n.target
        diverged = False if n.divergence is None else v < n.divergence
    wait = jnp.where(improved, 0, optax.safe_increment(state.wait))
    nonfinite = ~finite if config.check_finite else False
    out_of_patience = False if n.patience is None else ~improved & (wait >= n.patience)

    reason = jnp.asarray(StopReason.NONE, jnp.int32)
    # Assigned from the lowest priority up, so the first reason in the list wins.
    for cond, why in [
        (out_of_patience, StopReason.PATIENCE),
        (diverged, StopReason.DIVERGED),
        (hit_target, StopReason.TARGET),
        (nonfinite, StopReason.NONFINITE),
    ]:
        reason = jnp.where(cond, jnp.int32(why), reason)

    new = EarlyStoppingState(
        step=state.step,
        best_value=jnp.where(improved, v, best),
        best_step=jnp.where(improved, state.step, state.best_step),
        best_params=(
            tree_where(improved, params, state.best_params) if config.restore_best else None
        ),
        wait=wait,
        should_stop=reason != StopReason.NONE,
        reason=reason,
    )
    counted = ~state.should_stop & (state.step >= n.start_step)
    new = tree_where(counted, new, state)
    step = jnp.where(state.should_stop, state.step, optax.safe_increment(state.step))
    result: EarlyStoppingState = new._replace(step=step)
    return result
