"""Adamax: ``scale_by_adamax`` and the aliases ``adamax`` and ``adamaxw``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _alias, _cautious, _checks, _common, _dtypes, _quantize
from adam_jax._common import Decay, DecayPair


@_checks.state_class
class AdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`.

    Attributes:
      count: int32 scalar step count; saturates at the int32 maximum.
      m: first moment, in ``mu_dtype``.
      u: exponentially weighted infinity norm, in the param dtype (real for complex).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    m: optax.Updates
    u: optax.Updates


class AdamaxHyperparams(NamedTuple):
    """The leaves of :func:`scale_by_adamax`."""

    b1: Decay
    b2: Decay
    eps: chex.Numeric


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AdamaxConfig:
    eps_in_max: bool
    mu_dtype: np.dtype | None


class AdamaxScalars(NamedTuple):
    """The scalars one Adamax update shares between leaves of one real compute dtype."""

    b1: DecayPair
    b2: DecayPair
    eps: ArrayLike
    r1: jax.Array  # 1/(1-b1^t)


def adamax_scalars(hp: AdamaxHyperparams, count: jax.Array, dtype: np.dtype) -> AdamaxScalars:
    """Cast the hyperparameters to ``dtype`` and form the first moment's correction."""
    mo = _common.moments(dtype, hp.b1, hp.b2, hp.eps)
    return AdamaxScalars(mo.b1, mo.b2, mo.eps, _common.reciprocal(_common.correction(mo.b1, count)))


def adamax_leaf(
    config: AdamaxConfig, s: AdamaxScalars, g: jax.Array, m: jax.Array, u: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One leaf's Adamax step: ``(direction, new m, new u)`` in the storage dtypes."""
    cdt, rdt = _dtypes.dtypes_of(g)
    g_ = _dtypes.cast(g, cdt)
    m_new = _common.ema(g_, _dtypes.cast(m, cdt), s.b1)  # m = b1·m + (1-b1)·g
    u_decayed = _common.decayed(s.b2, _dtypes.cast(u, rdt), nonnegative=True)
    abs_g = lax.abs(g_) if g_.dtype == rdt else jnp.abs(g_)
    # d = m̂/denominator with m̂ = m/(1-b1^t), corrected last (see adam_direction).
    if config.eps_in_max:  # u = max(b2·u, |g| + eps),  d = m̂/u
        u_new = lax.max(lax.add(abs_g, s.eps), u_decayed)
        d = _common.scale(s.r1, _common.divide(m_new, u_new))
    else:  # u = max(b2·u, |g|),  d = m̂/(u + eps)
        u_new = lax.max(u_decayed, abs_g)
        d = _common.scale(s.r1, _common.divide(m_new, lax.add(u_new, s.eps)))
    return _dtypes.cast(d, g.dtype), _common.store(m_new, m), _dtypes.cast(u_new, u.dtype)


def _init(config: AdamaxConfig, params: optax.Params) -> AdamaxState:
    return AdamaxState(
        count=_common.init_count(),
        m=_dtypes.zeros_like(params, config.mu_dtype),
        u=_dtypes.zeros_like(params, None, real=True),
    )


def _update(
    config: AdamaxConfig,
    hp: AdamaxHyperparams,
    updates: optax.Updates,
    state: AdamaxState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, AdamaxState]:
    del params
    _checks.prepare_update(updates, state, AdamaxState, "scale_by_adamax")
    _checks.traced_interval("b1", hp.b1.d, 0.0, 1.0)
    _checks.traced_interval("b2", hp.b2.d, 0.0, 1.0)
    _checks.traced_interval("eps", hp.eps, 0.0)
    count = _common.increment(state.count)
    scalars = _common.by_dtype(updates, lambda dt: adamax_scalars(hp, count, dt))

    def leaf(g: jax.Array, m: jax.Array, u: jax.Array) -> tuple[jax.Array, ...]:
        return adamax_leaf(config, scalars[_dtypes.dtypes_of(g)[1]], g, m, u)

    d, m, u = _common.map_leaves(leaf, 3, updates, state.m, state.u)
    return d, AdamaxState(count=count, m=m, u=u)


def scale_by_adamax(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    eps_in_max: bool = False,
    mu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with Adamax (Kingma & Ba, 2015, section 7.1), without a learning rate.

    Adam's second moment with the L2 norm replaced by the infinity norm: letting
    :math:`p \to \infty` in :math:`v_t = \beta_2^p v_{t-1} + (1-\beta_2^p)|g_t|^p`
    and taking the p-th root gives :math:`u_t = \max(\beta_2 u_{t-1}, |g_t|)`.

    .. math::

      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t

    * default (the paper's Algorithm 2 with eps in the denominator, and Keras's ``Adamax``):
      :math:`u_t = \max(\beta_2 u_{t-1}, |g_t|)`, :math:`\;\Delta_t = \hat m_t / (u_t + \epsilon)`
    * ``eps_in_max=True`` (``torch.optim.Adamax`` and ``optax.adamax``):
      :math:`u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon)`, :math:`\;\Delta_t = \hat m_t / u_t`

    with :math:`\hat m_t = m_t/(1-\beta_1^t)`. ``u`` is never bias-corrected: the
    max of a decaying sequence started at zero is not biased towards zero the way
    an average is.

    The default form is ``theta - (lr / (u + eps)) * m_hat``, with ``u`` the infinity
    norm (not a second moment). Keras's default eps is 1e-7, torch's and optax's
    1e-8; here it is 1e-8.

    Where it differs from the references: half-precision leaves are computed in
    float32; complex params use :math:`|g|`, where torch splits real and imaginary parts.

    Args:
      state_bits: None or 32 (float32 moments, the default) or 8: then
        ``m`` (signed map) and ``u`` (unsigned map) are stored in 8 bits, in leaves of
        >= 4096 elements, a multiple of 256, as torchao's ``AdamW8bit`` (see docs).
      b1: decay of the first moment, in [0, 1).
      b2: decay of the infinity norm, in [0, 1).
      eps: >= 0; outside the max (default) or inside it (``eps_in_max``).
      eps_in_max: put eps inside the max, as torch and optax do.
      mu_dtype: dtype to store ``m`` in; default the param dtype.

    Hyperparameters are pytree leaves and may be traced, as in
    :func:`adam_jax.scale_by_adam`; traced values are range-checked only under
    ``jax.experimental.checkify.checkify``.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`AdamaxState`.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.scale_by_adamax(eps=0.0)
      >>> state = opt.init(jnp.zeros(2))
      >>> d, state = opt.update(jnp.array([2.0, -4.0]), state)
      >>> print(d.round(4))
      [ 1. -1.]

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015, section 7.1.
    """
    _checks.check_decay("b1", b1)
    _checks.check_decay("b2", b2)
    _checks.check_non_negative("eps", eps)
    _checks.check_bool("eps_in_max", eps_in_max)
    config = AdamaxConfig(eps_in_max, _checks.canonical_dtype("mu_dtype", mu_dtype))
    hp = AdamaxHyperparams(_common.decay_leaves(b1), _common.decay_leaves(b2), eps)
    scaler = _alias.transformation(_init, _update, config, hp)
    return _quantize.with_state_bits(scaler, state_bits, config)


def adamax(
    learning_rate: optax.ScalarOrSchedule = 2e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    cautious: _cautious.Cautious = False,
    eps_in_max: bool = False,
    mu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adamax with a learning rate, weight decay and ``maximize``.

    .. math::

      \text{coupled:}\quad g_t \leftarrow \pm g_t + \lambda p_{t-1}, \quad
      p_t = p_{t-1} - \eta_t \cdot \mathrm{scale\_by\_adamax}(g_t)

      \text{decoupled:}\quad
      p_t = p_{t-1} - \eta_t \left(\mathrm{scale\_by\_adamax}(\pm g_t) + \lambda p_{t-1}\right)

    ``eps_in_max=True`` is ``torch.optim.Adamax`` (with its ``weight_decay`` and
    ``maximize``) and ``optax.adamax``; the default is the ``m̂/(u + eps)`` form, Keras's.
    The default learning rate 2e-3 is torch's and the paper's. See
    :func:`scale_by_adamax`.

    Args:
      state_bits: as in :func:`scale_by_adamax`.
      learning_rate: a number, an array or an optax schedule; >= 0.
      weight_decay: :math:`\lambda`, >= 0; coupled (L2, added to the gradient) by default.
      decoupled_weight_decay: decay the params by :math:`\eta\lambda p` outside the
        Adamax step (AdamW-style), the meaning of torch's ``decoupled_weight_decay`` for
        Adam, NAdam and RAdam (``torch.optim.Adamax`` has no such option). ``True`` is
        :func:`adamaxw` (with this function's default ``weight_decay=0``).
      maximize: ascend instead of descend.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.
      b1, b2, eps, eps_in_max, mu_dtype: as in :func:`scale_by_adamax`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.adamax(eps_in_max=True)
      >>> state = opt.init(jnp.zeros(3))

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015, section 7.1.
    """
    _checks.check_bool("decoupled_weight_decay", decoupled_weight_decay)
    scaler = scale_by_adamax(
        b1, b2, eps, eps_in_max=eps_in_max, mu_dtype=mu_dtype, state_bits=state_bits
    )
    return _alias.with_weight_decay(
        scaler, learning_rate, weight_decay, maximize,
        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious,
    )  # fmt: skip


def adamaxw(
    learning_rate: optax.ScalarOrSchedule = 2e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: _alias.Mask = None,
    maximize: bool = False,
    cautious: _cautious.Cautious = False,
    eps_in_max: bool = False,
    mu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adamax with decoupled weight decay, scaled by the learning rate.

    :math:`p_t = p_{t-1} - \eta_t(\mathrm{scale\_by\_adamax}(\pm g_t) + \lambda p_{t-1})`,
    the AdamW layout (``optax.adamw``'s chain, ``torch.optim.AdamW``'s update)
    applied to Adamax. Neither torch nor optax ships this combination.

    Args:
      state_bits: as in :func:`scale_by_adamax`.
      learning_rate: a number, an array or an optax schedule; >= 0.
      weight_decay: decoupled decay, >= 0.
      mask: which params decay, as in ``optax.add_decayed_weights``.
      maximize: ascend instead of descend.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.
      b1, b2, eps, eps_in_max, mu_dtype: as in :func:`scale_by_adamax`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.adamaxw(weight_decay=1e-2)
      >>> state = opt.init(jnp.zeros(3))

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    return _alias.decoupled(
        scale_by_adamax(
            b1, b2, eps, eps_in_max=eps_in_max, mu_dtype=mu_dtype, state_bits=state_bits
        ),
        learning_rate,
        weight_decay,
        mask,
        maximize,
        cautious=cautious,
    )
