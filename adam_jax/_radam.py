"""Rectified Adam: ``scale_by_radam`` and the aliases ``radam`` and ``radamw``."""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, TypeAlias, get_args

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _alias, _cautious, _checks, _common, _dtypes, _quantize
from adam_jax._common import Decay, DecayPair

Form: TypeAlias = Literal["torch", "optax"]
FORMS: tuple[Form, ...] = get_args(Form)


@_checks.state_class
class RAdamState(NamedTuple):
    """State of :func:`scale_by_radam`.

    Attributes:
      count: int32 scalar, the number of updates so far; saturates at the int32 maximum.
      m: first moment, shaped like the params, in ``mu_dtype``.
      v: second moment, shaped like the params, in ``nu_dtype`` (real for complex params).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    m: optax.Updates
    v: optax.Updates


class RAdamHyperparams(NamedTuple):
    """The leaves of :func:`scale_by_radam`."""

    b1: Decay
    b2: Decay
    eps: chex.Numeric
    eps_root: chex.Numeric
    threshold: chex.Numeric


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RAdamConfig:
    form: Form
    mu_dtype: np.dtype | None
    nu_dtype: np.dtype | None


class RAdamScalars(NamedTuple):
    """The scalars one RAdam update shares between leaves of one real compute dtype."""

    b1: DecayPair
    b2: DecayPair
    direction: _common.Direction  # the adaptive step's eps, eps_root and corrections
    r1: jax.Array  # 1/(1-b1^t)
    rectified: jax.Array  # bool: rho_t above the threshold
    r: jax.Array  # the rectification factor r_t (1 where not rectified)


def radam_scalars(
    hp: RAdamHyperparams, config: RAdamConfig, count: jax.Array, dtype: np.dtype
) -> RAdamScalars:
    r"""The per-step scalars for leaves of real compute ``dtype``.

    :math:`\rho_\infty = 2/(1-\beta_2) - 1`,
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)` and
    :math:`r_t = \sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}`.
    """
    mo = _common.moments(dtype, hp.b1, hp.b2, hp.eps, hp.eps_root)
    c1, c2 = _common.correction(mo.b1, count), _common.correction(mo.b2, count)
    r1 = _common.reciprocal(c1)
    if config.form == "optax":  # u = r_t·m̂ / (sqrt(v̂ + eps_root) + eps)
        direction = _common.Direction(mo.eps, mo.eps_root, _common.reciprocal(c2), r1)
    else:  # u = r_t·m̂·sqrt(1-b2^t) / (sqrt(v + eps_root) + eps)
        direction = _common.Direction(mo.eps, mo.eps_root, None, jnp.sqrt(c2) / c1)
    b2 = mo.b2
    t = count.astype(dtype)
    rho_inf = 2 / b2.one_minus_d - 1
    rho = rho_inf - 2 * t * b2.d**t / c2
    thr = jnp.asarray(hp.threshold).astype(dtype)
    rectified = jnp.greater_equal(rho, thr) if config.form == "optax" else jnp.greater(rho, thr)
    # Off the rectified branch r is unused; a safe rho keeps it (and its derivative) finite.
    rho_safe = jnp.where(rectified, rho, rho_inf)
    r = jnp.sqrt(
        (rho_safe - 4) * (rho_safe - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_safe)
    )
    return RAdamScalars(mo.b1, mo.b2, direction, r1, rectified, jnp.where(rectified, r, 1))


def radam_leaf(
    s: RAdamScalars, g: jax.Array, m: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One leaf's RAdam step: ``(direction, new m, new v)`` in the storage dtypes."""
    cdt, rdt = _dtypes.dtypes_of(g)
    g_ = _dtypes.cast(g, cdt)
    m_new = _common.ema(g_, _dtypes.cast(m, cdt), s.b1)  # m = b1·m + (1-b1)·g
    g_sq = _common.abs_sq(g_)
    v_new = _common.ema(g_sq, _dtypes.cast(v, rdt), s.b2, nonnegative=True)  # b2·v + (1-b2)·|g|²
    m_hat = _common.no_overflow(m_new * s.r1, m_new)  # m / (1 - b1^t)
    adaptive = _common.adam_direction(m_new, v_new, s.direction)
    u = jnp.where(s.rectified, adaptive * s.r, m_hat)
    return _dtypes.cast(u, g.dtype), _common.store(m_new, m), _dtypes.cast(v_new, v.dtype)


def radam_hyperparams(
    b1: ArrayLike, b2: ArrayLike, eps: ArrayLike, eps_root: ArrayLike, threshold: ArrayLike
) -> RAdamHyperparams:
    """Check concrete values and store the decays as ``(b, 1 - b)`` leaves."""
    _checks.check_decay("b1", b1)
    _checks.check_decay("b2", b2)
    _checks.check_non_negative("eps", eps)
    _checks.check_non_negative("eps_root", eps_root)
    _checks.check_non_negative("threshold", threshold)
    return RAdamHyperparams(
        _common.decay_leaves(b1), _common.decay_leaves(b2), eps, eps_root, threshold
    )


def _init(config: RAdamConfig, params: optax.Params) -> RAdamState:
    return RAdamState(
        count=_common.init_count(),
        m=_dtypes.zeros_like(params, config.mu_dtype),
        v=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),
    )


def _update(
    config: RAdamConfig,
    hp: RAdamHyperparams,
    updates: optax.Updates,
    state: RAdamState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, RAdamState]:
    del params
    _checks.prepare_update(updates, state, RAdamState, "scale_by_radam")
    _checks.traced_interval("b1", hp.b1.d, 0.0, 1.0)
    _checks.traced_interval("b2", hp.b2.d, 0.0, 1.0)
    _checks.traced_interval("eps", hp.eps, 0.0)
    _checks.traced_interval("eps_root", hp.eps_root, 0.0)
    _checks.traced_interval("threshold", hp.threshold, 0.0)
    count = _common.increment(state.count)
    scalars = _common.by_dtype(updates, lambda dt: radam_scalars(hp, config, count, dt))

    def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        return radam_leaf(scalars[_dtypes.dtypes_of(g)[1]], g, m, v)

    u, m, v = _common.map_leaves(leaf, 3, updates, state.m, state.v)
    return u, RAdamState(count=count, m=m, v=v)


def scale_by_radam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    *,
    threshold: ArrayLike = 5.0,
    form: Form = "torch",
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with Rectified Adam (Liu et al., 2020), without a learning rate.

    Adam's moments :math:`m_t, v_t` and :math:`\hat m_t = m_t/(1-\beta_2^t)`; the
    adaptive step is taken only once the variance of the adaptive learning rate is
    tractable, measured by the length of the approximated simple moving average

    .. math::

      \rho_\infty = \frac{2}{1-\beta_2} - 1, \qquad
      \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t}, \qquad
      r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    and until then the step is the bias-corrected momentum :math:`\hat m_t` alone.

    * ``form="torch"`` (default, ``torch.optim.RAdam``): eps on the uncorrected
      :math:`\sqrt{v_t}`, switch at :math:`\rho_t > \text{threshold}`:
      :math:`u_t = r_t \hat m_t \sqrt{1-\beta_2^t} / (\sqrt{v_t + \epsilon_{root}} + \epsilon)`.
    * ``form="optax"`` (``optax.radam``): eps on :math:`\sqrt{\hat v_t}`, switch at
      :math:`\rho_t \ge \text{threshold}`:
      :math:`u_t = r_t \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)`.

    torch fixes the threshold at 5; optax's default is 5 too. :math:`\rho_1 = 1` and
    :math:`\rho_t` grows with t towards :math:`\rho_\infty`: with the defaults the
    first 5 steps are momentum steps.

    Where it differs from the references: as :func:`adam_jax.scale_by_adam`
    (half precision computed in float32, bias corrections in the leaf precision,
    complex :math:`|g|^2`). :math:`\rho_t` is computed in the leaf's compute dtype
    (torch: double): in float32 it carries an absolute error of about
    :math:`\rho_\infty` ulps.

    Args:
      state_bits: None or 32 (float32 moments, the default) or 8: then
        ``m`` (signed map) and ``v`` (unsigned map) are stored in 8 bits, in leaves of
        >= 4096 elements, a multiple of 256, as torchao's ``AdamW8bit`` (see docs).
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0 (optax's ``eps_root``).
      threshold: the :math:`\rho_t` above which the step is rectified, >= 0.
      form: ``"torch"`` or ``"optax"``, where eps goes and how the threshold compares.
      mu_dtype, nu_dtype: storage dtypes of ``m`` and ``v``, as in
        :func:`adam_jax.scale_by_adam`.

    Hyperparameters are pytree leaves and may be traced, as in
    :func:`adam_jax.scale_by_adam`; traced values are range-checked only under
    ``jax.experimental.checkify.checkify``. ``form`` and the dtypes are static.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`RAdamState`.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.scale_by_radam()
      >>> state = opt.init(jnp.zeros(2))
      >>> u, state = opt.update(jnp.array([3.0, -3.0]), state)
      >>> print(u.round(4))
      [ 3. -3.]

    References:
      Liu et al., *On the Variance of the Adaptive Learning Rate and Beyond*, ICLR 2020.
    """
    hp = radam_hyperparams(b1, b2, eps, eps_root, threshold)
    _checks.check_choice("form", form, FORMS)
    config = RAdamConfig(
        form,
        _checks.canonical_dtype("mu_dtype", mu_dtype),
        _checks.canonical_dtype("nu_dtype", nu_dtype),
    )
    scaler = _alias.transformation(_init, _update, config, hp)
    return _quantize.with_state_bits(scaler, state_bits, config)


def radam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    cautious: _cautious.Cautious = False,
    threshold: ArrayLike = 5.0,
    form: Form = "torch",
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RAdam with a learning rate, weight decay and ``maximize``: ``torch.optim.RAdam``.

    .. math::

      \text{coupled:}\quad g_t \leftarrow \pm g_t + \lambda p_{t-1}, \quad
      p_t = p_{t-1} - \eta_t \cdot \mathrm{scale\_by\_radam}(g_t)

      \text{decoupled:}\quad
      p_t = p_{t-1} - \eta_t \left(\mathrm{scale\_by\_radam}(\pm g_t) + \lambda p_{t-1}\right)

    With the defaults this is ``torch.optim.RAdam`` (including its
    ``decoupled_weight_decay``); ``form="optax"`` is ``optax.radam``. See
    :func:`scale_by_radam`.

    Args:
      state_bits: as in :func:`scale_by_radam`.
      learning_rate: a number, an array or an optax schedule; >= 0.
      b1, b2, eps, eps_root, threshold, form, mu_dtype, nu_dtype: as in
        :func:`scale_by_radam`.
      weight_decay: :math:`\lambda`, >= 0.
      decoupled_weight_decay: decay the params directly (AdamW-style) instead of
        adding :math:`\lambda p` to the gradient.
      maximize: ascend instead of descend.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, adam_jax
      >>> opt = adam_jax.radam(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(2 * params, state, params)
      >>> print(optax.apply_updates(params, updates).round(4))
      [ 0.8 -1.6]

    References:
      Liu et al., *On the Variance of the Adaptive Learning Rate and Beyond*, ICLR 2020.
    """
    _checks.check_bool("decoupled_weight_decay", decoupled_weight_decay)
    scaler = scale_by_radam(
        b1,
        b2,
        eps,
        eps_root,
        threshold=threshold,
        form=form,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        state_bits=state_bits,
    )
    return _alias.with_weight_decay(
        scaler, learning_rate, weight_decay, maximize,
        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious,
    )  # fmt: skip


def radamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    *,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: _alias.Mask = None,
    maximize: bool = False,
    cautious: _cautious.Cautious = False,
    threshold: ArrayLike = 5.0,
    form: Form = "torch",
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RAdam with decoupled weight decay, scaled by the learning rate.

    :math:`p_t = p_{t-1} - \eta_t(\mathrm{scale\_by\_radam}(\pm g_t) + \lambda p_{t-1})`:
    ``torch.optim.RAdam(decoupled_weight_decay=True)``, plus a ``mask`` as in
    ``optax.add_decayed_weights``. The default ``weight_decay=1e-4`` is
    :func:`adam_jax.adamw`'s.

    Args:
      state_bits: as in :func:`scale_by_radam`.
      learning_rate: a number, an array or an optax schedule; >= 0.
      weight_decay: decoupled decay, >= 0.
      mask: which params decay, as in ``optax.add_decayed_weights``.
      maximize: ascend instead of descend.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.
      b1, b2, eps, eps_root, threshold, form, mu_dtype, nu_dtype: as in
        :func:`scale_by_radam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.radamw(weight_decay=1e-2)
      >>> state = opt.init({"w": jnp.ones(3)})

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    scaler = scale_by_radam(
        b1,
        b2,
        eps,
        eps_root,
        threshold=threshold,
        form=form,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        state_bits=state_bits,
    )
    return _alias.decoupled(scaler, learning_rate, weight_decay, mask, maximize, cautious=cautious)
