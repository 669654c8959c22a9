"""AdEMAMix: ``scale_by_ademamix`` and the alias ``ademamix``."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple, TypeAlias, get_args

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _alias, _cautious, _checks, _common, _dtypes, _quantize
from adam_jax._common import Decay, DecayPair

B3Schedule: TypeAlias = Literal["apple", "paper"]
SCHEDULES: tuple[B3Schedule, ...] = get_args(B3Schedule)


@_checks.state_class
class AdEMAMixState(NamedTuple):
    """State of :func:`scale_by_ademamix`.

    Attributes:
      count: int32 scalar, the number of updates so far; saturates at the int32 maximum.
      m: the fast first moment (decay ``b1``), shaped like the params, in ``mu_dtype``.
      m_slow: the slow first moment (decay ``b3_t``), in ``mu_dtype``.
      v: second moment, in ``nu_dtype`` (real for complex params).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    m: optax.Updates
    m_slow: optax.Updates
    v: optax.Updates


class AdEMAMixHyperparams(NamedTuple):
    b1: Decay
    b2: Decay
    b3: Decay
    alpha: chex.Numeric
    eps: chex.Numeric


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AdEMAMixConfig:
    alpha_warmup: int | None
    b3_warmup: int | None
    b3_schedule: B3Schedule
    mu_dtype: np.dtype | None
    nu_dtype: np.dtype | None


class Step(NamedTuple):
    b1: DecayPair
    b2: DecayPair
    direction: _common.Direction  # eps and the second moment's correction 1/(1-b2^t)
    r1: jax.Array  # 1/(1-b1^t)
    b3: DecayPair  # (b3_t, 1 - b3_t)
    alpha: jax.Array  # alpha_t


def alpha_at(alpha: jax.Array, t: jax.Array, warmup: int | None) -> jax.Array:
    """``alpha_t = alpha·min(t/T, 1)``: Apple's ``linear_warmup_scheduler`` from 0."""
    if warmup is None:
        return alpha
    return jnp.where(t < warmup, t / warmup * alpha, alpha)


def b3_at(b1: DecayPair, b3: DecayPair, t: jax.Array, config: AdEMAMixConfig) -> DecayPair:
    """``(b3_t, 1 - b3_t)``, from ``b1`` at ``t = 0`` to ``b3`` at ``t = T``, in half-life."""
    warmup = config.b3_warmup
    if warmup is None:
        return b3
    a = jnp.minimum(t / warmup, 1)
    if config.b3_schedule == "apple":  # f(β) = log(0.5)/log(β + 1e-8) - 1, f⁻¹(h) = 0.5^(1/(h+1))
        f1 = math.log(0.5) / jnp.log(b1.d + 1e-8) - 1
        f3 = math.log(0.5) / jnp.log(b3.d + 1e-8) - 1
        b3_t = 0.5 ** (1 / ((1 - a) * f1 + a * f3 + 1))
    else:  # exp(ln b1·ln b3 / ((1 - t/T)·ln b3 + (t/T)·ln b1)), capped at b3
        ln1, ln3 = jnp.log(b1.d), jnp.log(b3.d)
        b3_t = jnp.minimum(jnp.exp(ln1 * ln3 / ((1 - a) * ln3 + a * ln1)), b3.d)
    b3_t = jnp.where(t < warmup, b3_t, b3.d)
    return _common.traced_pair(b3_t, jnp.where(t < warmup, 1 - b3_t, b3.one_minus_d))


def _step(
    hp: AdEMAMixHyperparams, config: AdEMAMixConfig, count: jax.Array, dtype: np.dtype
) -> Step:
    mo = _common.moments(dtype, hp.b1, hp.b2, hp.eps)
    r1 = _common.reciprocal(_common.correction(mo.b1, count))
    r2 = _common.reciprocal(_common.correction(mo.b2, count))
    direction = _common.Direction(mo.eps, inner=r2)  # u = mix / (sqrt(v/(1-b2^t)) + eps)
    b3 = _common.decay_pair(hp.b3, dtype)
    t = count.astype(dtype)
    alpha = jnp.asarray(_common.scalar(hp.alpha, dtype))
    b3_t = b3_at(mo.b1, b3, t, config)
    return Step(mo.b1, mo.b2, direction, r1, b3_t, alpha_at(alpha, t, config.alpha_warmup))


def _init(config: AdEMAMixConfig, params: optax.Params) -> AdEMAMixState:
    return AdEMAMixState(
        count=_common.init_count(),
        m=_dtypes.zeros_like(params, config.mu_dtype),
        m_slow=_dtypes.zeros_like(params, config.mu_dtype),
        v=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),
    )


def _update(
    config: AdEMAMixConfig,
    hp: AdEMAMixHyperparams,
    updates: optax.Updates,
    state: AdEMAMixState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, AdEMAMixState]:
    del params
    _checks.prepare_update(updates, state, AdEMAMixState, "scale_by_ademamix")
    _checks.traced_interval("b1", hp.b1.d, 0.0, 1.0)
    _checks.traced_interval("b2", hp.b2.d, 0.0, 1.0)
    _checks.traced_interval("b3", hp.b3.d, 0.0, 1.0)
    _checks.traced_interval("alpha", hp.alpha, 0.0)
    _checks.traced_interval("eps", hp.eps, 0.0)
    count = _common.increment(state.count)
    steps = _common.by_dtype(updates, lambda dt: _step(hp, config, count, dt))

    def leaf(g: jax.Array, m: jax.Array, m_slow: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        cdt, rdt = _dtypes.dtypes_of(g)
        s = steps[rdt]
        g_ = _dtypes.cast(g, cdt)
        m_new = _common.ema(g_, _dtypes.cast(m, cdt), s.b1)  # m = b1·m + (1-b1)·g
        slow_new = _common.ema(g_, _dtypes.cast(m_slow, cdt), s.b3)  # m2 = b3_t·m2 + (1-b3_t)·g
        v_new = _common.ema(_common.abs_sq(g_), _dtypes.cast(v, rdt), s.b2, nonnegative=True)
        mix = _common.scale(s.r1, m_new) + _common.scale(s.alpha, slow_new)  # m̂ + alpha_t·m2
        u = _common.adam_direction(mix, v_new, s.direction)
        return (
            _dtypes.cast(u, g.dtype),
            _common.store(m_new, m),
            _common.store(slow_new, m_slow),
            _dtypes.cast(v_new, v.dtype),
        )

    u, m, m_slow, v = _common.map_leaves(leaf, 4, updates, state.m, state.m_slow, state.v)
    return u, AdEMAMixState(count=count, m=m, m_slow=m_slow, v=v)


def _check_warmup(name: str, value: int | None) -> None:
    if value is not None:
        _checks.check_positive_int(name, value, reason=" >= 1 or None", type_error=ValueError)


def scale_by_ademamix(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    b3: ArrayLike = 0.9999,
    alpha: ArrayLike = 2.0,
    eps: ArrayLike = 1e-8,
    *,
    alpha_warmup: int | None = None,
    b3_warmup: int | None = None,
    b3_schedule: B3Schedule = "apple",
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with AdEMAMix (Pagliardini, Ablin & Grangier, 2024), without a rate.

    Adam's moments plus a slow EMA of the gradient, which is *not* bias-corrected:

    .. math::

      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      m^{slow}_t = \beta_{3,t} m^{slow}_{t-1} + (1-\beta_{3,t}) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2

      u_t = \frac{m_t/(1-\beta_1^t) + \alpha_t m^{slow}_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    Without warmups :math:`\alpha_t = \alpha` and :math:`\beta_{3,t} = \beta_3`.
    ``alpha_warmup`` :math:`T_\alpha` ramps :math:`\alpha_t = \alpha\min(t/T_\alpha, 1)`.
    ``b3_warmup`` :math:`T` moves :math:`\beta_{3,t}` from :math:`\beta_1` to :math:`\beta_3`
    linearly in half-life, :math:`a = t/T` for :math:`t < T`:

    * ``b3_schedule="apple"`` (Apple's ``ml-ademamix``, ``pytorch/ademamix.py``):
      :math:`f(\beta) = \log 0.5/\log(\beta + 10^{-8}) - 1`,
      :math:`\beta_{3,t} = 0.5^{1/((1-a) f(\beta_1) + a f(\beta_3) + 1)}`;
    * ``b3_schedule="paper"`` (the paper's closed form, pytorch-optimizer's ``AdEMAMix``):
      :math:`\beta_{3,t} = \min\left(\exp\frac{\ln\beta_1 \ln\beta_3}
      {(1-a)\ln\beta_3 + a\ln\beta_1}, \beta_3\right)`.

    The two differ by the ``1e-8`` in Apple's :math:`f` (about 2e-6 in :math:`\beta_{3,t}`).
    Steps count from 1, as in both references; ``optax.contrib.ademamix`` with
    user schedules counts from 0, and has no built-in warmup.

    Where it differs from the references: bfloat16/float16 leaves are computed in
    float32; the bias corrections are the accurate ones of :func:`adam_jax.scale_by_adam`;
    complex params use :math:`|g|^2` with a real ``v``.

    Args:
      b1: decay of the fast first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: final decay of the slow first moment, in [0, 1).
      alpha: final weight of the slow moment, >= 0.
      eps: added to the denominator outside the square root, >= 0.
      alpha_warmup: steps over which :math:`\alpha_t` ramps from 0; None for none.
      b3_warmup: steps over which :math:`\beta_{3,t}` rises from ``b1``; None for none.
      b3_schedule: ``"apple"`` or ``"paper"``, the half-life interpolation.
      mu_dtype: dtype of both first moments; nu_dtype: of ``v`` (as in
        :func:`adam_jax.scale_by_adam`).
      state_bits: None or 32 (float32 moments, the default) or 8: then ``m`` and
        ``m_slow`` (signed map) and ``v`` (unsigned map) are stored in 8 bits, in leaves
        of >= 4096 elements, a multiple of 256, as torchao's ``AdamW8bit`` (see docs);
        ``mu_dtype`` and ``nu_dtype`` must then be left unset.

    Hyperparameters are pytree leaves and may be traced; the warmup lengths, the
    schedule and ``state_bits`` are static options.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`AdEMAMixState`.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.scale_by_ademamix(b3=0.9, alpha=5.0, eps=0.0)
      >>> state = opt.init(jnp.zeros(2))
      >>> u, state = opt.update(jnp.array([3.0, -3.0]), state)
      >>> print(u.round(4))  # (1 + alpha·(1 - b3))·sign(g) at the first step
      [ 1.5 -1.5]

    References:
      Pagliardini, Ablin & Grangier, *The AdEMAMix Optimizer: Better, Faster,
      Older*, ICLR 2025 (arXiv:2409.03033).
    """
    _checks.check_decay("b1", b1)
    _checks.check_decay("b2", b2)
    _checks.check_decay("b3", b3)
    _checks.check_non_negative("alpha", alpha)
    _checks.check_non_negative("eps", eps)
    _check_warmup("alpha_warmup", alpha_warmup)
    _check_warmup("b3_warmup", b3_warmup)
    _checks.check_choice("b3_schedule", b3_schedule, SCHEDULES)
    hp = AdEMAMixHyperparams(
        _common.decay_leaves(b1), _common.decay_leaves(b2), _common.decay_leaves(b3), alpha, eps
    )
    config = AdEMAMixConfig(
        None if alpha_warmup is None else int(alpha_warmup),
        None if b3_warmup is None else int(b3_warmup),
        b3_schedule,
        _checks.canonical_dtype("mu_dtype", mu_dtype),
        _checks.canonical_dtype("nu_dtype", nu_dtype),
    )
    scaler = _alias.transformation(_init, _update, config, hp)
    return _quantize.with_state_bits(scaler, state_bits, config)


def ademamix(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    b3: ArrayLike = 0.9999,
    alpha: ArrayLike = 2.0,
    eps: ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    alpha_warmup: int | None = None,
    b3_warmup: int | None = None,
    b3_schedule: B3Schedule = "apple",
    mask: _alias.Mask = None,
    maximize: bool = False,
    cautious: _cautious.Cautious = False,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdEMAMix with a learning rate and decoupled weight decay.

    .. math::

      p_t = p_{t-1} - \eta_t\left(\mathrm{scale\_by\_ademamix}(\pm g_t) + \lambda p_{t-1}\right)

    With the defaults this is Apple's ``AdEMAMix`` (``ml-ademamix``,
    ``pytorch/ademamix.py``, whose defaults these are); ``b3_schedule="paper"``
    with ``alpha_warmup = b3_warmup = T`` is pytorch-optimizer's
    ``AdEMAMix(t_alpha_beta3=T, weight_decouple=True)`` (whose default ``alpha`` is 5).
    With no warmups it is ``optax.contrib.ademamix``. See :func:`scale_by_ademamix`.

    Args:
      learning_rate: a number, an array or an optax schedule; >= 0.
      b1, b2, b3, alpha, eps, alpha_warmup, b3_warmup, b3_schedule, mu_dtype, nu_dtype:
        as in :func:`scale_by_ademamix`.
      state_bits: as in :func:`scale_by_ademamix`.
      weight_decay: decoupled decay :math:`\lambda`, >= 0, multiplied by the learning rate.
      mask: which params decay, as in ``optax.add_decayed_weights``.
      maximize: ascend instead of descend.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the whole
        direction where the fast moment :math:`m_t` and :math:`g_t` disagree (see
        :func:`adam_jax.cautious`); the decay is not masked.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.ademamix(1e-3, alpha=5.0, alpha_warmup=1000, b3_warmup=1000)
      >>> state = opt.init({"w": jnp.ones(3)})

    References:
      Pagliardini, Ablin & Grangier, *The AdEMAMix Optimizer: Better, Faster,
      Older*, ICLR 2025 (arXiv:2409.03033).
    """
    scaler = scale_by_ademamix(
        b1,
        b2,
        b3,
        alpha,
        eps,
        alpha_warmup=alpha_warmup,
        b3_warmup=b3_warmup,
        b3_schedule=b3_schedule,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        state_bits=state_bits,
    )
    return _alias.decoupled(scaler, learning_rate, weight_decay, mask, maximize, cautious=cautious)
