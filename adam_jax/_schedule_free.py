"""Schedule-Free AdamW: ``schedule_free_adamw`` and ``schedule_free_eval_params``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from adam_jax import _alias, _checks, _common, _dtypes, _quantize
from adam_jax._common import Decay, DecayPair


@_checks.state_class
class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free_adamw`.

    Attributes:
      count: int32 scalar :math:`k`, the number of updates so far.
      z: the base sequence :math:`z`, shaped like the params, in their dtypes.
      v: second moment, shaped like the params, in the param dtype (float32 for
        float16 params).
      weight_sum: real scalar :math:`\\sum_{i \\le k} w_i`, in the widest real compute
        dtype of the params (float64 when any leaf is float64, else float32).
      lr_max: real scalar, the largest learning rate so far, in that dtype.
      b1: real scalar :math:`\\beta_1` of the last update, in that dtype; what
        :func:`schedule_free_eval_params` interpolates with.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    z: optax.Params
    v: optax.Updates
    weight_sum: jax.Array
    lr_max: jax.Array
    b1: jax.Array


class ScheduleFreeHyperparams(NamedTuple):
    learning_rate: chex.Numeric | None  # None when it is a schedule
    b1: Decay
    b2: Decay
    eps: chex.Numeric
    weight_decay: chex.Numeric
    warmup_steps: chex.Numeric
    r: chex.Numeric
    weight_lr_power: chex.Numeric


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ScheduleFreeConfig:
    lr_schedule: _alias.CheckedSchedule | None


def scalar_dtype(tree: optax.Params) -> np.dtype:
    """The widest real compute dtype among the leaves (float32 for an empty tree)."""
    dtypes = [_dtypes.dtypes_of(p)[1] for p in jax.tree.leaves(tree) if hasattr(p, "dtype")]
    return np.dtype(jnp.result_type(jnp.float32, *dtypes))


def _check_real(tree: optax.Params, what: str) -> None:
    for where, p in _checks.leaves_with_paths(tree, what):
        _checks.check_leaf(p, where)
        if jnp.iscomplexobj(p):
            raise TypeError(
                f"{where} is {jnp.dtype(p.dtype).name}: schedule_free_adamw takes real params only"
            )


def _init(
    config: ScheduleFreeConfig, hp: ScheduleFreeHyperparams, params: optax.Params
) -> ScheduleFreeState:
    del config
    _check_real(params, "params")
    sdt = scalar_dtype(params)
    return ScheduleFreeState(
        count=_common.init_count(),
        z=jax.tree.map(lambda p: jnp.array(p, copy=True), params),  # never the params buffer
        v=_dtypes.zeros_like(params, None, squares=True),
        weight_sum=jnp.zeros([], sdt),
        lr_max=jnp.zeros([], sdt),
        b1=jnp.asarray(hp.b1.d).astype(sdt),
    )


def _update(
    config: ScheduleFreeConfig,
    hp: ScheduleFreeHyperparams,
    updates: optax.Updates,
    state: ScheduleFreeState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, ScheduleFreeState]:
    if not isinstance(state, ScheduleFreeState):
        _checks.check_not_swapped(updates, state, lambda x: isinstance(x, ScheduleFreeState))
        raise TypeError(
            "schedule_free_adamw's update expects the ScheduleFreeState its init returns, "
            f"got {type(state).__name__}"
        )
    if params is None:
        raise ValueError(
            "schedule_free_adamw's update needs the params: update(grads, state, params)"
        )
    _checks.check_like(updates, state.z)
    _checks.check_like(params, state.z, what="params")
    _check_real(updates, "grads")
    _checks.traced_interval("b1", hp.b1.d, 0.0, 1.0)
    _checks.traced_interval("b2", hp.b2.d, 0.0, 1.0)
    for name in ("eps", "weight_decay", "warmup_steps", "r", "weight_lr_power"):
        _checks.traced_interval(name, getattr(hp, name), 0.0)
    if hp.learning_rate is not None:
        _checks.traced_interval("learning_rate", hp.learning_rate, 0.0)

    # The schedule's scalars, once per update, in the widest compute dtype.
    sdt = scalar_dtype(updates)
    k = state.count.astype(sdt)
    lr_in: Any = hp.learning_rate if config.lr_schedule is None else config.lr_schedule(state.count)
    lr = _common.scalar(lr_in, sdt)
    warmup = _common.scalar(hp.warmup_steps, sdt)
    lr_k = lr * jnp.where(k < warmup, (k + 1) / jnp.maximum(warmup, 1), 1)  # never 0 at k=0
    lr_max = jnp.maximum(state.lr_max, lr_k)
    weight = (k + 1) ** _common.scalar(hp.r, sdt) * lr_max ** _common.scalar(
        hp.weight_lr_power, sdt
    )
    weight_sum = state.weight_sum + weight
    c = jnp.where(weight_sum > 0, weight / jnp.where(weight_sum > 0, weight_sum, 1), 0)
    b1 = _common.decay_pair(hp.b1, sdt)
    y_coef = lr_k * (b1.d * (1 - c) - 1)  # lr_k·(b1·(1-c) - 1)
    count = _common.increment(state.count)

    def step_scalars(dt: np.dtype) -> tuple[DecayPair, ArrayLike, jax.Array]:
        b2 = _common.decay_pair(hp.b2, dt)
        return b2, _common.scalar(hp.eps, dt), 1 / _common.correction(b2, count)

    steps = _common.by_dtype(updates, step_scalars)

    def leaf(g: jax.Array, y: jax.Array, z: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        cdt, _ = _dtypes.dtypes_of(g)
        b2, eps, r2 = steps[cdt]
        g_, y_, z_ = (_dtypes.cast(x, cdt) for x in (g, y, z))
        v_new = _common.ema(_common.abs_sq(g_), _dtypes.cast(v, cdt), b2, nonnegative=True)
        # gn = g/(sqrt(v/(1-b2^(k+1))) + eps) + wd·y
        gn = g_ / (jnp.sqrt(v_new * r2) + eps) + _common.scale(
            _common.scalar(hp.weight_decay, cdt), y_
        )
        # y <- lerp(y, z, c) + lr_k·(b1·(1-c) - 1)·gn;  z <- z - lr_k·gn
        delta = c.astype(cdt) * (z_ - y_) + y_coef.astype(cdt) * gn
        z_new = z_ - lr_k.astype(cdt) * gn
        return (
            _dtypes.cast(delta, y.dtype),
            _dtypes.cast(z_new, z.dtype),
            _dtypes.cast(v_new, v.dtype),
        )

    u, z, v = _common.map_leaves(leaf, 3, updates, params, state.z, state.v)
    return u, ScheduleFreeState(count, z, v, weight_sum, lr_max, _dtypes.cast(b1.d, sdt))


def _check_b1(b1: ArrayLike) -> None:
    _checks.check_decay("b1", b1)
    if not isinstance(b1, jax.core.Tracer) and np.any(np.asarray(b1) == 0):
        raise ValueError(
            f"b1 must be in (0, 1): the eval params divide by b1, got b1={np.asarray(b1).item()!r}"
        )


def schedule_free_adamw(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0.0,
    *,
    warmup_steps: ArrayLike = 0,
    r: ArrayLike = 0.0,
    weight_lr_power: ArrayLike = 2.0,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Schedule-Free AdamW (Defazio et al., 2024): no learning-rate schedule to tune.

    The params the loss sees (and that ``update`` moves) are :math:`y`; the state
    keeps the base sequence :math:`z` (initially the params) and the second moment
    :math:`v`. With gradient :math:`g_k` at :math:`y_k`, :math:`k = 0, 1, \dots`,
    warmup :math:`W` and base learning rate :math:`\eta`:

    .. math::

      \eta_k = \eta \min(1, (k+1)/W), \qquad
      \eta_{\max} = \max_{i \le k} \eta_i, \qquad
      w_k = (k+1)^r \, \eta_{\max}^{p}, \qquad c_k = w_k / \textstyle\sum_{i \le k} w_i

      v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2, \qquad
      \hat g_k = g_k / (\sqrt{v_k/(1-\beta_2^{k+1})} + \epsilon) + \lambda y_k

      y_{k+1} = (1-c_k) y_k + c_k z_k + \eta_k(\beta_1(1-c_k) - 1)\,\hat g_k, \qquad
      z_{k+1} = z_k - \eta_k \hat g_k

    (:math:`p` = ``weight_lr_power``; :math:`c_k = 0` while every weight is 0.) The
    params to evaluate (or to ship) are the average
    :math:`x = (y - (1-\beta_1) z)/\beta_1`: :func:`schedule_free_eval_params`.

    This is ``schedulefree.AdamWScheduleFree`` (Meta's reference, PyPI
    ``schedulefree``), step by step: its train-mode params are :math:`y`, its
    eval-mode params :math:`x`. The weight decay is evaluated at :math:`y` and
    scaled by the learning rate, as there.

    Where it differs from the references:

    * ``optax.contrib.schedule_free_adamw`` warms up with :math:`\eta k/W` (0 at the
      first step) where the reference uses :math:`\eta (k+1)/W`, so with
      ``warmup_steps > 0`` the two differ from the first step; it has no ``r``.
      Without warmup they agree.
    * The schedule's scalars (:math:`\eta_k`, :math:`w_k`, :math:`c_k`) are
      computed in the widest compute dtype of the params (float64 for float64
      params, float32 otherwise); the reference computes them in Python doubles.
    * bfloat16/float16 leaves are computed in float32 and stored back.
    * Complex params are refused.

    Args:
      learning_rate: :math:`\eta`, a number or an array >= 0, or an optax schedule
        ``count -> lr`` (called with :math:`k`, the warmup applied on top).
      b1: :math:`\beta_1`, the interpolation between :math:`z` and the average, in (0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      weight_decay: :math:`\lambda`, >= 0, applied at :math:`y`.
      warmup_steps: :math:`W`, an integer >= 0; 0 for no warmup.
      r: power of the polynomial weighting :math:`(k+1)^r` in the average, >= 0.
      weight_lr_power: :math:`p`, >= 0; 0 weights every step alike.
      state_bits: None or 32 (a float32 ``v``, the default) or 8: then ``v`` (unsigned
        map) is stored in 8 bits, in leaves of >= 4096 elements, a multiple of 256, as
        torchao's ``AdamW8bit`` (see docs). ``z`` is an iterate, not a moment: it stays
        in the params' dtypes, as do the scalars.

    Every numeric argument (``warmup_steps`` too, not ``state_bits``) is a pytree leaf
    and may be traced or vmapped over; concrete values are range-checked here, traced
    ones only under ``jax.experimental.checkify.checkify``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`ScheduleFreeState`; ``update`` needs ``params`` (:math:`y`).
      With :func:`adam_jax.fit`, the result's ``last_params`` are :math:`y` and
      ``schedule_free_eval_params(result.opt_state, result.last_params)`` the
      params to evaluate.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adam_jax
      >>> opt = adam_jax.schedule_free_adamw(learning_rate=0.1, warmup_steps=5)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> for _ in range(20):
      ...     grads = jax.grad(lambda p: jnp.sum(p**2))(params)
      ...     updates, state = opt.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> x = adam_jax.schedule_free_eval_params(state, params)
      >>> print(bool(jnp.sum(x**2) < jnp.sum(jnp.array([1.0, -2.0]) ** 2)))
      True

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, *The Road Less Scheduled*,
      NeurIPS 2024. ``schedulefree/adamw_schedulefree.py`` (facebookresearch/schedule_free).
    """
    _checks.check_learning_rate(learning_rate)
    _check_b1(b1)
    _checks.check_decay("b2", b2)
    _checks.check_non_negative("eps", eps)
    _checks.check_non_negative("weight_decay", weight_decay)
    _checks.check_non_negative_int("warmup_steps", warmup_steps)
    _checks.check_non_negative("r", r)
    _checks.check_non_negative("weight_lr_power", weight_lr_power)
    schedule = _alias.CheckedSchedule(learning_rate) if callable(learning_rate) else None
    hp = ScheduleFreeHyperparams(
        None if callable(learning_rate) else learning_rate,
        _common.decay_leaves(b1),
        _common.decay_leaves(b2),
        eps,
        weight_decay,
        warmup_steps,
        r,
        weight_lr_power,
    )
    config = ScheduleFreeConfig(schedule)
    tx = optax.GradientTransformationExtraArgs(
        jax.tree_util.Partial(_init, config, hp), jax.tree_util.Partial(_update, config, hp)
    )
    return optax.with_extra_args_support(_quantize.with_state_bits(tx, state_bits, config))


def _find_state(state: Any) -> ScheduleFreeState:
    is_sf: Callable[[Any], bool] = lambda x: isinstance(x, ScheduleFreeState)
    found = [x for x in jax.tree.leaves(state, is_leaf=is_sf) if is_sf(x)]
    if len(found) != 1:
        raise TypeError(
            "schedule_free_eval_params needs the state of schedule_free_adamw (or a state "
            f"holding exactly one), found {len(found)} ScheduleFreeState in a "
            f"{type(state).__name__}"
        )
    result: ScheduleFreeState = found[0]
    return result


def schedule_free_eval_params(state: optax.OptState, params: optax.Params) -> optax.Params:
    r"""The params to evaluate: :math:`x = (y - (1-\beta_1) z)/\beta_1`.

    ``params`` are the training params :math:`y` (what :func:`schedule_free_adamw`
    updates), ``state`` its state (or a tree holding exactly one such state, e.g.
    an ``optax.chain``'s). After :func:`adam_jax.fit`, pass the result's
    ``opt_state`` and ``last_params`` (which go together; with early stopping's
    ``restore_best``, ``params`` are a different step's). Computed as the reference's
    ``eval()`` does,
    :math:`y + (1 - 1/\beta_1)(z - y)`, in each leaf's compute dtype.

    Args:
      state: a :class:`ScheduleFreeState`, or a state holding exactly one.
      params: :math:`y`, shaped like the state's :math:`z`.

    Returns:
      :math:`x`, shaped and typed like ``params``. Before the first update it is
      the params themselves.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.schedule_free_adamw()
      >>> params = {"w": jnp.ones(2)}
      >>> x = adam_jax.schedule_free_eval_params(opt.init(params), params)
      >>> print(x["w"])
      [1. 1.]

    References:
      ``AdamWScheduleFree.eval`` in ``schedulefree/adamw_schedulefree.py``.
    """
    sf = _find_state(state)
    _checks.check_like(params, sf.z, what="params")

    def leaf(y: jax.Array, z: jax.Array) -> jax.Array:
        cdt, _ = _dtypes.dtypes_of(y)
        y_, z_ = _dtypes.cast(y, cdt), _dtypes.cast(z, cdt)
        w = (1 - 1 / sf.b1).astype(cdt)
        return _dtypes.cast(y_ + w * (z_ - y_), jnp.result_type(y))

    return jax.tree.map(leaf, params, sf.z)
