"""StableAdamW: ``scale_by_stable_adamw`` and the alias ``stable_adamw``."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.tree_util import Partial
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _alias, _cautious, _checks, _common, _dtypes, _quantize
from adam_jax._common import Decay, DecayPair


@_checks.state_class
class StableAdamWState(NamedTuple):
    """State of :func:`scale_by_stable_adamw`.

    Attributes:
      count: int32 scalar, the number of updates so far; saturates at the int32 maximum.
      m: first moment (bias-corrected by construction), shaped like the params, in ``mu_dtype``.
      v: second moment (bias-corrected by construction), in ``nu_dtype`` (real for complex).
      lr_scale: one scalar a leaf, :math:`1/\\max(1, \\mathrm{rms}_t)` of the last
        update, in the leaf's real compute dtype (float32 for bfloat16/float16); 1 after init.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    m: optax.Updates
    v: optax.Updates
    lr_scale: optax.Updates


class StableAdamWHyperparams(NamedTuple):
    b1: Decay
    b2: Decay
    eps: chex.Numeric


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StableAdamWConfig:
    mu_dtype: np.dtype | None
    nu_dtype: np.dtype | None


class Step(NamedTuple):
    b1: DecayPair  # the debiased (b̂, 1 - b̂)
    b2: DecayPair
    eps: ArrayLike
    eps_sq: ArrayLike


def debiased(decay: Decay, count: jax.Array, dtype: np.dtype) -> DecayPair:
    """``b̂ = (b^t - b)/(b^t - 1) = b(1 - b^(t-1))/(1 - b^t)`` and ``1 - b̂ = (1 - b)/(1 - b^t)``,
    from the accurate bias corrections (so ``b̂ = 0`` at ``t = 1``)."""
    pair = _common.decay_pair(decay, dtype)
    c = _common.correction(pair, count)
    c_prev = _common.correction(pair, count - 1)
    return _common.traced_pair(pair.d * c_prev / c, pair.one_minus_d / c)


def _step(hp: StableAdamWHyperparams, count: jax.Array, dtype: np.dtype) -> Step:
    eps = _common.scalar(hp.eps, dtype)
    return Step(debiased(hp.b1, count, dtype), debiased(hp.b2, count, dtype), eps, eps * eps)


def _init(config: StableAdamWConfig, params: optax.Params) -> StableAdamWState:
    return StableAdamWState(
        count=_common.init_count(),
        m=_dtypes.zeros_like(params, config.mu_dtype),
        v=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),
        lr_scale=jax.tree.map(lambda p: jnp.ones([], _dtypes.dtypes_of(p)[1]), params),
    )


def _update(
    config: StableAdamWConfig,
    hp: StableAdamWHyperparams,
    updates: optax.Updates,
    state: StableAdamWState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, StableAdamWState]:
    del params
    _checks.prepare_update(updates, state, StableAdamWState, "scale_by_stable_adamw")
    _checks.traced_interval("b1", hp.b1.d, 0.0, 1.0)
    _checks.traced_interval("b2", hp.b2.d, 0.0, 1.0)
    _checks.traced_interval("eps", hp.eps, 0.0)
    count = _common.increment(state.count)
    steps = _common.by_dtype(updates, lambda dt: _step(hp, count, dt))

    def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        cdt, rdt = _dtypes.dtypes_of(g)
        s = steps[rdt]
        g_ = _dtypes.cast(g, cdt)
        g_sq = _common.abs_sq(g_)
        m_new = _common.ema(g_, _dtypes.cast(m, cdt), s.b1)  # m = b̂1·m + (1-b̂1)·g
        v_new = _common.ema(g_sq, _dtypes.cast(v, rdt), s.b2, nonnegative=True)
        rms = jnp.sqrt(jnp.mean(g_sq / lax.max(v_new, jnp.asarray(s.eps_sq, rdt))))
        lr_scale = 1 / jnp.maximum(rms, 1) if g.size else jnp.ones([], rdt)  # 1/max(1, rms)
        u = _common.scale(lr_scale, _common.divide(m_new, lax.add(lax.sqrt(v_new), s.eps)))
        return (
            _dtypes.cast(u, g.dtype),
            _common.store(m_new, m),
            _dtypes.cast(v_new, v.dtype),
            lr_scale,
        )

    u, m, v, lr_scale = _common.map_leaves(leaf, 4, updates, state.m, state.v)
    return u, StableAdamWState(count=count, m=m, v=v, lr_scale=lr_scale)


def scale_by_stable_adamw(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.99,
    eps: ArrayLike = 1e-6,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with StableAdamW (Wortsman et al., 2023), without a learning rate.

    With gradient :math:`g_t` at step :math:`t = 1, 2, \dots`, the decays are
    debiased so that the moments come out bias-corrected:

    .. math::

      \hat\beta_t = \frac{\beta^t - \beta}{\beta^t - 1}, \qquad
      m_t = \hat\beta_{1,t} m_{t-1} + (1-\hat\beta_{1,t}) g_t, \qquad
      v_t = \hat\beta_{2,t} v_{t-1} + (1-\hat\beta_{2,t}) |g_t|^2

      \mathrm{rms}_t = \sqrt{\mathrm{mean}\left(|g_t|^2 / \max(v_t, \epsilon^2)\right)}
      \ \text{(per tensor)}, \qquad
      u_t = \frac{1}{\max(1, \mathrm{rms}_t)} \cdot \frac{m_t}{\sqrt{v_t} + \epsilon}

    :math:`1 - \hat\beta_t = (1-\beta)/(1-\beta^t)` is formed from the accurate bias
    correction of :func:`adam_jax.scale_by_adam`. The factor :math:`1/\max(1,\mathrm{rms}_t)`
    (AdaFactor's update clipping, per tensor) is kept in the state as ``lr_scale``:
    :func:`stable_adamw` scales its weight decay by it too.

    This is the direction of ``torch-optimi``'s ``StableAdamW`` (and of
    pytorch-optimizer's). Where it differs: bfloat16/float16 leaves are computed in
    float32 (optimi computes in the param dtype, with optional Kahan summation);
    complex params use :math:`|g|^2` with a real ``v`` and the mean over complex elements.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{v_t}`, and :math:`\epsilon^2` floors :math:`v_t` in the rms; >= 0.
      mu_dtype, nu_dtype: storage dtypes of ``m`` and ``v``, as in :func:`adam_jax.scale_by_adam`.
      state_bits: None or 32 (float32 moments, the default) or 8: then
        ``m`` (signed map) and ``v`` (unsigned map) are stored in 8 bits, in leaves of
        >= 4096 elements, a multiple of 256, as torchao's ``AdamW8bit`` (see docs);
        ``lr_scale`` stays as it is, and ``mu_dtype``/``nu_dtype`` must be left unset.

    Hyperparameters are pytree leaves and may be traced, as in :func:`adam_jax.scale_by_adam`.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`StableAdamWState`.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.scale_by_stable_adamw(eps=0.0)
      >>> state = opt.init(jnp.zeros(2))
      >>> u, state = opt.update(jnp.array([1.0, -1.0]), state)
      >>> u, state = opt.update(jnp.array([100.0, -1.0]), state)  # a spike: rms > 1
      >>> print(u.round(4), f"{float(state.lr_scale):.4f}")  # rms = sqrt((1.99 + 1)/2)
      [ 0.6127 -0.8179] 0.8179

    References:
      Wortsman et al., *Stable and low-precision training for large-scale
      vision-language models*, NeurIPS 2023 (arXiv:2304.13013).
    """
    _checks.check_decay("b1", b1)
    _checks.check_decay("b2", b2)
    _checks.check_non_negative("eps", eps)
    hp = StableAdamWHyperparams(_common.decay_leaves(b1), _common.decay_leaves(b2), eps)
    config = StableAdamWConfig(
        _checks.canonical_dtype("mu_dtype", mu_dtype),
        _checks.canonical_dtype("nu_dtype", nu_dtype),
    )
    scaler = _alias.transformation(_init, _update, config, hp)
    return _quantize.with_state_bits(scaler, state_bits, config)


def _decay_init(scaler_init: Any, params: optax.Params) -> optax.OptState:
    return scaler_init(params)


def _decay_update(
    scaler: optax.GradientTransformation,
    weight_decay: chex.Numeric,
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, optax.OptState]:
    """``u + weight_decay·lr_scale·p``: the decay uses the clipped learning rate."""
    if params is None:
        raise ValueError("stable_adamw's update needs params: call update(grads, state, params)")
    _checks.traced_interval("weight_decay", weight_decay, 0.0)
    u, new_state = scaler.update(updates, state, params)

    def leaf(u: jax.Array, p: jax.Array, scale: jax.Array) -> jax.Array:
        decay = _common.scale(scale, _common.scale(_common.scalar(weight_decay, scale.dtype), p))
        return (u + decay).astype(u.dtype)

    return jax.tree.map(leaf, u, params, new_state.lr_scale), new_state


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.99,
    eps: ArrayLike = 1e-6,
    weight_decay: ArrayLike = 1e-2,
    *,
    maximize: bool = False,
    cautious: _cautious.Cautious = False,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""StableAdamW: AdamW whose learning rate is clipped per tensor by the update's rms.

    .. math::

      \eta'_t = \eta_t / \max(1, \mathrm{rms}_t), \qquad
      p_t = p_{t-1}(1 - \eta'_t \lambda) - \eta'_t \, \frac{m_t}{\sqrt{v_t} + \epsilon}

    with :math:`m_t, v_t, \mathrm{rms}_t` of :func:`scale_by_stable_adamw`: the weight
    decay uses the clipped rate. With the defaults (torch-optimi's: ``b2=0.99``,
    ``eps=1e-6``, ``weight_decay=1e-2``) this is ``optimi.StableAdamW`` and
    pytorch-optimizer's ``StableAdamW``.

    Args:
      learning_rate: a number, an array or an optax schedule ``count -> lr``; >= 0.
      b1, b2, eps, mu_dtype, nu_dtype, state_bits: as in :func:`scale_by_stable_adamw`.
      weight_decay: decoupled decay :math:`\lambda`, >= 0, multiplied by the clipped rate.
      maximize: ascend instead of descend.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the direction
        :math:`m_t/(\sqrt{v_t}+\epsilon)` where :math:`m_t` and :math:`g_t` disagree
        (see :func:`adam_jax.cautious`); the decay is not masked.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain`` whose first
      state is :class:`StableAdamWState`); ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, adam_jax
      >>> opt = adam_jax.stable_adamw(learning_rate=0.1, weight_decay=0.0)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(2 * params, state, params)
      >>> print(optax.apply_updates(params, updates).round(4))
      [ 0.9 -1.9]

    References:
      Wortsman et al., *Stable and low-precision training for large-scale
      vision-language models*, NeurIPS 2023 (arXiv:2304.13013).
    """
    _checks.check_non_negative("weight_decay", weight_decay)
    scaler = _cautious.maybe(
        scale_by_stable_adamw(
            b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype, state_bits=state_bits
        ),
        cautious,
    )
    decayed = optax.GradientTransformation(
        Partial(_decay_init, scaler.init), Partial(_decay_update, scaler, weight_decay)
    )
    return _alias.decoupled(decayed, learning_rate, 0.0, None, maximize)
