"""NAdam: ``scale_by_nadam`` and the aliases ``nadam`` and ``nadamw``."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _alias, _cautious, _checks, _common, _dtypes, _quantize
from adam_jax._common import Decay, DecayPair


@_checks.state_class
class NAdamState(NamedTuple):
    """State of :func:`scale_by_nadam`.

    Attributes:
      count: int32 scalar, the number of updates so far; saturates at the int32 maximum.
      m: first moment, shaped like the params, in ``mu_dtype``.
      v: second moment, shaped like the params, in ``nu_dtype`` (real for complex params).
      mu_product: real scalar :math:`\\prod_{i \\le t} \\mu_i`, the running product of the
        momentum schedule, in ``mu_product_dtype``; by default the widest real compute
        dtype of the params (float64 when any leaf is float64, else float32).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    m: optax.Updates
    v: optax.Updates
    mu_product: jax.Array


class NAdamHyperparams(NamedTuple):
    """The leaves of :func:`scale_by_nadam`."""

    b1: Decay
    b2: Decay
    eps: chex.Numeric
    momentum_decay: chex.Numeric


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class NAdamConfig:
    mu_dtype: np.dtype | None
    nu_dtype: np.dtype | None
    mu_product_dtype: np.dtype | None = None


class NAdamScalars(NamedTuple):
    """The scalars one NAdam update shares between leaves of one real compute dtype."""

    b1: DecayPair
    b2: DecayPair
    direction: _common.Direction  # eps and the second moment's correction 1/(1-b2^t)
    g_coef: jax.Array  # (1 - mu_t) / (1 - prod_{i<=t} mu_i)
    m_coef: jax.Array  # mu_{t+1} / (1 - prod_{i<=t+1} mu_i)


def momentum_schedule(
    b1: DecayPair, momentum_decay: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(mu_t, 1 - mu_t)`` with ``mu_t = b1·(1 - 0.5·0.96^(t·momentum_decay))``.

    ``1 - mu_t = (1-b1) + 0.5·b1·0.96^(t·momentum_decay)`` is a sum of positive
    terms, formed from ``1 - b1`` as the bias corrections are.
    """
    half_decay = 0.5 * jnp.power(jnp.asarray(0.96, t.dtype), t * momentum_decay)
    mu = jnp.multiply(b1.d, 1 - half_decay)
    return mu, jnp.add(b1.one_minus_d, jnp.multiply(b1.d, half_decay))


def schedule_coefficients(
    hp: NAdamHyperparams, count: jax.Array, mu_product: jax.Array, dtype: np.dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(g_coef, m_coef, new mu_product)``, computed once per update in ``dtype`` (the
    widest of the leaves' compute dtypes and ``mu_product``'s); the product itself is
    rounded to its own dtype at every step, as torch rounds it to its default dtype."""
    b1 = _common.decay_pair(hp.b1, dtype)
    md = jnp.asarray(hp.momentum_decay).astype(dtype)
    t = count.astype(dtype)
    mu, one_minus_mu = momentum_schedule(b1, md, t)
    mu_next, _ = momentum_schedule(b1, md, t + 1)
    stored = mu_product * mu.astype(mu_product.dtype)
    product = stored.astype(dtype)
    return one_minus_mu / (1 - product), mu_next / (1 - product * mu_next), stored


def nadam_scalars(
    hp: NAdamHyperparams, count: jax.Array, g_coef: jax.Array, m_coef: jax.Array, dtype: np.dtype
) -> NAdamScalars:
    """The per-step scalars for leaves of real compute ``dtype``."""
    mo = _common.moments(dtype, hp.b1, hp.b2, hp.eps)
    r2 = _common.reciprocal(_common.correction(mo.b2, count))
    direction = _common.Direction(mo.eps, inner=r2)  # u = m̂ / (sqrt(v/(1-b2^t)) + eps)
    return NAdamScalars(mo.b1, mo.b2, direction, g_coef.astype(dtype), m_coef.astype(dtype))


def nadam_leaf(
    s: NAdamScalars, g: jax.Array, m: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One leaf's NAdam step: ``(direction, new m, new v)`` in the storage dtypes."""
    cdt, rdt = _dtypes.dtypes_of(g)
    g_ = _dtypes.cast(g, cdt)
    m_new = _common.ema(g_, _dtypes.cast(m, cdt), s.b1)  # m = b1·m + (1-b1)·g
    g_sq = _common.abs_sq(g_)
    v_new = _common.ema(g_sq, _dtypes.cast(v, rdt), s.b2, nonnegative=True)  # b2·v + (1-b2)·|g|²
    # m̂ = m_coef·m + g_coef·g; each term is kept finite before the sum, as in Adam's
    # Nesterov form.
    m_term = _common.no_overflow(m_new * s.m_coef, m_new)
    g_term = _common.no_overflow(g_ * s.g_coef, g_)
    m_hat = _common.no_overflow(m_term + g_term, m_new, g_)
    u = _common.adam_direction(m_hat, v_new, s.direction)
    return _dtypes.cast(u, g.dtype), _common.store(m_new, m), _dtypes.cast(v_new, v.dtype)


def product_dtype(params: optax.Params) -> np.dtype:
    """The widest real compute dtype among the leaves (float32 for an empty tree)."""
    dtypes = [
        _dtypes.real_dtype(_dtypes.compute_dtype(p.dtype))
        for p in jax.tree.leaves(params)
        if hasattr(p, "dtype")
    ]
    return np.dtype(jnp.result_type(jnp.float32, *dtypes))


def _real_dtype(name: str, dtype: DTypeLike | None) -> np.dtype | None:
    dt = _checks.canonical_dtype(name, dtype)
    if dt is not None and not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a real floating-point dtype, got {name}={dt.name}")
    return None if dt is None else np.dtype(dt)


def nadam_hyperparams(
    b1: ArrayLike, b2: ArrayLike, eps: ArrayLike, momentum_decay: ArrayLike
) -> NAdamHyperparams:
    """Check concrete values and store the decays as ``(b, 1 - b)`` leaves."""
    _checks.check_decay("b1", b1)
    _checks.check_decay("b2", b2)
    _checks.check_non_negative("eps", eps)
    _checks.check_interval("momentum_decay", momentum_decay, 0.0, high_open=False)
    return NAdamHyperparams(_common.decay_leaves(b1), _common.decay_leaves(b2), eps, momentum_decay)


def _init(config: NAdamConfig, params: optax.Params) -> NAdamState:
    pdt = config.mu_product_dtype
    pdt = product_dtype(params) if pdt is None else pdt
    return NAdamState(
        count=_common.init_count(),
        m=_dtypes.zeros_like(params, config.mu_dtype),
        v=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),
        mu_product=jnp.ones([], pdt),
    )


def _update(
    config: NAdamConfig,
    hp: NAdamHyperparams,
    updates: optax.Updates,
    state: NAdamState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, NAdamState]:
    del params
    _checks.prepare_update(updates, state, NAdamState, "scale_by_nadam")
    _checks.traced_interval("b1", hp.b1.d, 0.0, 1.0)
    _checks.traced_interval("b2", hp.b2.d, 0.0, 1.0)
    _checks.traced_interval("eps", hp.eps, 0.0)
    _checks.traced_interval("momentum_decay", hp.momentum_decay, 0.0, math.inf, high_open=False)
    count = _common.increment(state.count)
    dtype = np.dtype(jnp.result_type(product_dtype(updates), state.mu_product.dtype))
    g_coef, m_coef, product = schedule_coefficients(hp, count, state.mu_product, dtype)
    scalars = _common.by_dtype(updates, lambda dt: nadam_scalars(hp, count, g_coef, m_coef, dt))

    def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        return nadam_leaf(scalars[_dtypes.dtypes_of(g)[1]], g, m, v)

    u, m, v = _common.map_leaves(leaf, 3, updates, state.m, state.v)
    return u, NAdamState(count=count, m=m, v=v, mu_product=product)


def scale_by_nadam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    momentum_decay: ArrayLike = 4e-3,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    mu_product_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with NAdam and Dozat's momentum schedule, without a learning rate.

    With gradient :math:`g_t` at step :math:`t = 1, 2, \dots` and
    :math:`\psi` = ``momentum_decay``:

    .. math::

      \mu_t = \beta_1 \left(1 - \tfrac12 \, 0.96^{t\psi}\right), \qquad
      \Pi_t = \prod_{i \le t} \mu_i

      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2

      \hat m_t = \frac{\mu_{t+1} m_t}{1 - \Pi_t \mu_{t+1}} + \frac{(1-\mu_t) g_t}{1 - \Pi_t},
      \qquad u_t = \hat m_t / (\sqrt{v_t/(1-\beta_2^t)} + \epsilon)

    The momentum coefficient :math:`\mu_t` starts at :math:`\beta_1/2` and rises
    towards :math:`\beta_1`, the faster the larger :math:`\psi`; the running product
    :math:`\Pi_t` is kept in the state. This is ``torch.optim.NAdam``; the schedule
    is Dozat's (2016, with 0.96 and ``momentum_decay=4e-3``).

    Special values of ``momentum_decay``:

    * ``momentum_decay=1.0`` is Keras's ``Nadam`` (``keras/src/optimizers/nadam.py``,
      whose schedule is :math:`0.96^t`; Keras's defaults are ``learning_rate=1e-3``
      and ``epsilon=1e-7``).
    * ``momentum_decay=float("inf")`` makes :math:`\mu_t = \beta_1` at every step:
      :math:`\hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`,
      the constant-momentum Nadam of ``optax.nadam`` (also
      ``adam_jax.adam(nesterov=True)``).
    * ``momentum_decay=0`` keeps :math:`\mu_t = \beta_1/2`.

    Where it differs from the references:

    * bfloat16/float16 leaves are computed in float32 and stored back.
    * :math:`\Pi_t` is kept in the widest compute dtype of the params; torch keeps
      it in its default dtype (float32 unless ``torch.set_default_dtype(torch.float64)``):
      ``mu_product_dtype=jnp.float32`` reproduces that with float64 params.
      :math:`1 - \Pi_t` is formed from the stored product, so it carries a relative
      error of about :math:`u\,\Pi_t/(1-\Pi_t)` (unit roundoff :math:`u`): negligible
      for the usual :math:`\beta_1`, up to about :math:`1/(1-\beta_1)` ulps for :math:`\beta_1`
      near 0.999 with a large ``momentum_decay``.
    * Complex params use :math:`|g|^2 = \bar g g` with a real ``v``; torch treats
      real and imaginary parts as independent reals.

    Args:
      state_bits: None or 32 (float32 moments, the default) or 8: then
        ``m`` (signed map) and ``v`` (unsigned map) are stored in 8 bits, in leaves of
        >= 4096 elements, a multiple of 256, as torchao's ``AdamW8bit`` (see docs).
      b1: :math:`\beta_1`, decay of the first moment and the limit of the schedule, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      momentum_decay: :math:`\psi`, how fast :math:`\mu_t` rises to :math:`\beta_1`, >= 0
        (``inf`` allowed).
      mu_dtype: dtype to store ``m`` in; default the param dtype.
      nu_dtype: dtype to store ``v`` in; default as in :func:`adam_jax.scale_by_adam`
        (the param dtype, float32 for float16 params).
      mu_product_dtype: dtype to keep :math:`\Pi_t` in, rounded to it at every step
        (the coefficients are still computed in the widest of it and the params'
        compute dtypes). Default None: the widest compute dtype of the params, which
        is torch run with its default dtype set to the params' (float64 for float64
        params). ``jnp.float32`` with float64 params is ``torch.optim.NAdam`` at
        torch's default dtype float32, which keeps its product in float32
        (:math:`\Pi_t = \mathrm{fl}_{32}(\Pi_{t-1}\,\mathrm{fl}_{32}(\mu_t))`), and moves
        the params by about 1e-9 relative from the float64 product.

    Hyperparameters are pytree leaves and may be traced, as in
    :func:`adam_jax.scale_by_adam`; traced values are range-checked only under
    ``jax.experimental.checkify.checkify``. The options (``mu_dtype``, ``nu_dtype``,
    ``mu_product_dtype``) are static.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`NAdamState`.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.scale_by_nadam(eps=0.0)
      >>> state = opt.init(jnp.zeros(2))
      >>> u, state = opt.update(jnp.array([3.0, -3.0]), state)
      >>> print(u.round(4))  # (1 + 0.1·μ₂/(1 - μ₁μ₂))·sign(g): more than Adam's first step
      [ 1.0565 -1.0565]

    References:
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR 2016 workshop.
    """
    hp = nadam_hyperparams(b1, b2, eps, momentum_decay)
    config = NAdamConfig(
        _checks.canonical_dtype("mu_dtype", mu_dtype),
        _checks.canonical_dtype("nu_dtype", nu_dtype),
        _real_dtype("mu_product_dtype", mu_product_dtype),
    )
    scaler = _alias.transformation(_init, _update, config, hp)
    return _quantize.with_state_bits(scaler, state_bits, config)


def nadam(
    learning_rate: optax.ScalarOrSchedule = 2e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    momentum_decay: ArrayLike = 4e-3,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    cautious: _cautious.Cautious = False,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    mu_product_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""NAdam with a learning rate, weight decay and ``maximize``: ``torch.optim.NAdam``.

    .. math::

      \text{coupled:}\quad g_t \leftarrow \pm g_t + \lambda p_{t-1}, \quad
      p_t = p_{t-1} - \eta_t \cdot \mathrm{scale\_by\_nadam}(g_t)

      \text{decoupled:}\quad
      p_t = p_{t-1} - \eta_t \left(\mathrm{scale\_by\_nadam}(\pm g_t) + \lambda p_{t-1}\right)

    The decoupled form is torch's ``decoupled_weight_decay=True``
    (:math:`p \leftarrow p(1-\eta\lambda)` before the step) and Keras's
    ``weight_decay``. The defaults (``learning_rate=2e-3``,
    ``momentum_decay=4e-3``) are torch's. See :func:`scale_by_nadam`.

    Args:
      state_bits: as in :func:`scale_by_nadam`.
      learning_rate: a number, an array or an optax schedule ``count -> lr``; >= 0.
      b1, b2, eps, momentum_decay, mu_dtype, nu_dtype, mu_product_dtype: as in
        :func:`scale_by_nadam`.
      weight_decay: :math:`\lambda`, >= 0.
      decoupled_weight_decay: decay the params directly (AdamW-style) instead of
        adding :math:`\lambda p` to the gradient.
      maximize: ascend instead of descend, as in torch.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``); its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, adam_jax
      >>> opt = adam_jax.nadam(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(2 * params, state, params)
      >>> print(optax.apply_updates(params, updates).round(4))
      [ 0.8944 -1.8944]

    References:
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR 2016 workshop.
    """
    _checks.check_bool("decoupled_weight_decay", decoupled_weight_decay)
    scaler = scale_by_nadam(
        b1,
        b2,
        eps,
        momentum_decay=momentum_decay,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        mu_product_dtype=mu_product_dtype,
        state_bits=state_bits,
    )
    return _alias.with_weight_decay(
        scaler, learning_rate, weight_decay, maximize,
        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious,
    )  # fmt: skip


def nadamw(
    learning_rate: optax.ScalarOrSchedule = 2e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    momentum_decay: ArrayLike = 4e-3,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: _alias.Mask = None,
    maximize: bool = False,
    cautious: _cautious.Cautious = False,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    mu_product_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""NAdam with decoupled weight decay, scaled by the learning rate.

    :math:`p_t = p_{t-1} - \eta_t(\mathrm{scale\_by\_nadam}(\pm g_t) + \lambda p_{t-1})`:
    ``torch.optim.NAdam(decoupled_weight_decay=True)``, plus a ``mask`` as in
    ``optax.add_decayed_weights``. The default ``weight_decay=1e-4`` is
    :func:`adam_jax.adamw`'s.

    Args:
      state_bits: as in :func:`scale_by_nadam`.
      learning_rate: a number, an array or an optax schedule; >= 0.
      weight_decay: decoupled decay, >= 0.
      mask: which params decay, as in ``optax.add_decayed_weights``.
      maximize: ascend instead of descend.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.
      b1, b2, eps, momentum_decay, mu_dtype, nu_dtype, mu_product_dtype: as in
        :func:`scale_by_nadam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.nadamw(weight_decay=1e-2)
      >>> state = opt.init({"w": jnp.ones(3)})

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    scaler = scale_by_nadam(
        b1,
        b2,
        eps,
        momentum_decay=momentum_decay,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        mu_product_dtype=mu_product_dtype,
        state_bits=state_bits,
    )
    return _alias.decoupled(scaler, learning_rate, weight_decay, mask, maximize, cautious=cautious)
