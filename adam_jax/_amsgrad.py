"""AMSGrad: ``scale_by_amsgrad`` and the alias ``amsgrad``."""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, TypeAlias, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _alias, _cautious, _checks, _common, _dtypes, _quantize
from adam_jax._common import AdamHyperparams, DecayPair

MaxOf: TypeAlias = Literal["raw", "corrected"]
MAX_OF: tuple[MaxOf, ...] = get_args(MaxOf)


@_checks.state_class
class AMSGradState(NamedTuple):
    """State of :func:`scale_by_amsgrad`.

    Attributes:
      count: int32 scalar step count; saturates at the int32 maximum.
      m: first moment, in ``mu_dtype``.
      v: second moment, in ``nu_dtype``.
      v_max: running maximum of ``v`` (``max_of="raw"``) or of ``v̂``
        (``max_of="corrected"``), in ``nu_dtype``. It never decreases.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    m: optax.Updates
    v: optax.Updates
    v_max: optax.Updates


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AMSGradConfig:
    eps_hat: bool
    max_of: MaxOf
    bias_correction: bool
    mu_dtype: np.dtype | None
    nu_dtype: np.dtype | None


class AMSGradScalars(NamedTuple):
    """The scalars one AMSGrad update shares between leaves of one real compute dtype."""

    b1: DecayPair
    b2: DecayPair
    direction: _common.Direction
    v_scale: ArrayLike | None  # 1/(1-b2^t) for max_of="corrected", else None (1)


def amsgrad_scalars(
    hp: AdamHyperparams, config: AMSGradConfig, count: jax.Array, dtype: np.dtype
) -> AMSGradScalars:
    """Cast the hyperparameters to ``dtype`` and form the corrections ``config`` applies."""
    mo = _common.moments(dtype, hp.b1, hp.b2, hp.eps, hp.eps_root)
    if not config.bias_correction:
        return AMSGradScalars(mo.b1, mo.b2, _common.Direction(mo.eps, mo.eps_root), None)
    c1, c2 = _common.correction(mo.b1, count), _common.correction(mo.b2, count)
    r1, r2 = _common.reciprocal(c1), _common.reciprocal(c2)
    corrected = config.max_of == "corrected"
    if config.eps_hat:  # u = m·sqrt(1-b2^t)/(1-b1^t) / (sqrt(v_max_raw + eps_root) + eps)
        inner = c2 if corrected else None
        direction = _common.Direction(mo.eps, mo.eps_root, inner, jnp.sqrt(c2) / c1)
    else:  # u = m̂ / (sqrt(v̂_max + eps_root) + eps)
        direction = _common.Direction(mo.eps, mo.eps_root, None if corrected else r2, r1)
    return AMSGradScalars(mo.b1, mo.b2, direction, r2 if corrected else None)


def amsgrad_leaf(
    s: AMSGradScalars, g: jax.Array, m: jax.Array, v: jax.Array, v_max: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One leaf's AMSGrad step: ``(direction, new m, new v, new v_max)`` in the storage dtypes."""
    cdt, rdt = _dtypes.dtypes_of(g)
    g_ = _dtypes.cast(g, cdt)
    m_new = _common.ema(g_, _dtypes.cast(m, cdt), s.b1)  # m = b1·m + (1-b1)·g
    v_new = _common.ema(_common.abs_sq(g_), _dtypes.cast(v, rdt), s.b2, nonnegative=True)
    # v_max = max(v_max, v̂) or max(v_max, v)
    candidate = v_new if s.v_scale is None else lax.mul(v_new, s.v_scale)
    v_max_new = lax.max(_dtypes.cast(v_max, rdt), candidate)
    u = _common.adam_direction(m_new, v_max_new, s.direction)
    return (
        _dtypes.cast(u, g.dtype),
        _common.store(m_new, m),
        _dtypes.cast(v_new, v.dtype),
        _dtypes.cast(v_max_new, v_max.dtype),
    )


def _init(config: AMSGradConfig, params: optax.Params) -> AMSGradState:
    return AMSGradState(
        count=_common.init_count(),
        m=_dtypes.zeros_like(params, config.mu_dtype),
        v=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),
        v_max=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),
    )


def _update(
    config: AMSGradConfig,
    hp: AdamHyperparams,
    updates: optax.Updates,
    state: AMSGradState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, AMSGradState]:
    del params
    _checks.prepare_update(updates, state, AMSGradState, "scale_by_amsgrad")
    _common.check_traced(hp)
    count = _common.increment(state.count)
    scalars = _common.by_dtype(updates, lambda dt: amsgrad_scalars(hp, config, count, dt))

    def leaf(g: jax.Array, m: jax.Array, v: jax.Array, v_max: jax.Array) -> tuple[jax.Array, ...]:
        return amsgrad_leaf(scalars[_dtypes.dtypes_of(g)[1]], g, m, v, v_max)

    u, m, v, v_max = _common.map_leaves(leaf, 4, updates, state.m, state.v, state.v_max)
    return u, AMSGradState(count=count, m=m, v=v, v_max=v_max)


def scale_by_amsgrad(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    *,
    eps_hat: bool = False,
    max_of: MaxOf = "raw",
    bias_correction: bool = True,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with AMSGrad (Reddi, Kale & Kumar, 2018), without a learning rate.

    The moments are Adam's (:func:`adam_jax.scale_by_adam`); the denominator uses a
    running maximum so the effective step size never grows:

    * ``max_of="raw"`` (default): :math:`v^{max}_t = \max(v^{max}_{t-1}, v_t)` and
      :math:`u_t = \hat m_t / (\sqrt{v^{max}_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon)`.
      This is ``torch.optim.Adam(amsgrad=True)`` and Keras's ``Adam(amsgrad=True)``.
    * ``max_of="corrected"``: :math:`v^{max}_t = \max(v^{max}_{t-1}, \hat v_t)` and
      :math:`u_t = \hat m_t / (\sqrt{v^{max}_t + \epsilon_{root}} + \epsilon)`. This is
      ``optax.amsgrad``'s default.
    * ``bias_correction=False`` with ``"raw"`` is the paper's Algorithm 2:
      :math:`u_t = m_t / (\sqrt{v^{max}_t} + \epsilon)`.
    * ``eps_hat=True``: eps added before the bias correction, as in Adam:
      :math:`u_t = m_t\sqrt{1-\beta_2^t}/(1-\beta_1^t) / (\sqrt{s_t + \epsilon_{root}} + \epsilon)`,
      where :math:`s_t` is the uncorrected maximum (for ``"corrected"``,
      :math:`v^{max}_t (1-\beta_2^t)`). With ``"raw"`` this is Keras's formula.

    The two ``max_of`` choices differ because :math:`1-\beta_2^t` grows with t: the
    maximum of corrected values remembers the large early :math:`\hat v`, the
    maximum of raw values does not.

    Where it differs from the references: as :func:`adam_jax.scale_by_adam`
    (float32 compute for half precision, bias correction in the leaf precision,
    complex ``|g|²``).

    Args:
      state_bits: None or 32 (float32 moments, the default) or 8: then
        ``m`` (signed map), ``v`` and ``v_max`` (unsigned map) are stored in 8 bits, in leaves of
        >= 4096 elements, a multiple of 256, as torchao's ``AdamW8bit`` (see docs).
      b1, b2, eps, eps_root, eps_hat, bias_correction, mu_dtype: as in
        :func:`adam_jax.scale_by_adam`.
      max_of: ``"raw"`` or ``"corrected"``, which second moment the maximum is over.
      nu_dtype: dtype to store ``v`` and ``v_max`` in; default as in
        :func:`adam_jax.scale_by_adam` (the param dtype, float32 for float16 params).

    Hyperparameters are pytree leaves and may be traced, as in
    :func:`adam_jax.scale_by_adam`; traced values are range-checked only under
    ``jax.experimental.checkify.checkify``.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`AMSGradState`.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.scale_by_amsgrad(eps=0.0)
      >>> state = opt.init(jnp.zeros(2))
      >>> u, state = opt.update(jnp.array([1.0, -1.0]), state)
      >>> print(u.round(4))
      [ 1. -1.]

    References:
      Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
    """
    hp = _common.adam_hyperparams(b1, b2, eps, eps_root)
    _checks.check_bool("eps_hat", eps_hat)
    _checks.check_choice("max_of", max_of, MAX_OF)
    _checks.check_bool("bias_correction", bias_correction)
    config = AMSGradConfig(
        eps_hat,
        max_of,
        bias_correction,
        _checks.canonical_dtype("mu_dtype", mu_dtype),
        _checks.canonical_dtype("nu_dtype", nu_dtype),
    )
    scaler = _alias.transformation(_init, _update, config, hp)
    return _quantize.with_state_bits(scaler, state_bits, config)


def amsgrad(
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
    eps_hat: bool = False,
    max_of: MaxOf = "raw",
    bias_correction: bool = True,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AMSGrad with a learning rate, weight decay and ``maximize``.

    .. math::

      \text{coupled:}\quad g_t \leftarrow \pm g_t + \lambda p_{t-1}, \quad
      p_t = p_{t-1} - \eta_t \cdot \mathrm{scale\_by\_amsgrad}(g_t)

      \text{decoupled:}\quad
      p_t = p_{t-1} - \eta_t \left(\mathrm{scale\_by\_amsgrad}(\pm g_t) + \lambda p_{t-1}\right)

    With the defaults this is ``torch.optim.Adam(amsgrad=True)`` (including its
    ``weight_decay``, ``decoupled_weight_decay`` and ``maximize``);
    ``max_of="corrected"`` is ``optax.amsgrad``. See :func:`scale_by_amsgrad`.

    Args:
      state_bits: as in :func:`scale_by_amsgrad`.
      learning_rate: a number, an array or an optax schedule; >= 0.
      weight_decay: :math:`\lambda`, >= 0; coupled (L2, added to the gradient) by default.
      decoupled_weight_decay: as in ``torch.optim.Adam(amsgrad=True)``: decay the params
        by :math:`\eta\lambda p` outside the AMSGrad step (AdamW-style) instead of
        adding :math:`\lambda p` to the gradient.
      maximize: ascend instead of descend.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.
      b1, b2, eps, eps_root, eps_hat, max_of, bias_correction, mu_dtype, nu_dtype:
        as in :func:`scale_by_amsgrad`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.amsgrad(1e-4, eps=1e-8)
      >>> state = opt.init(jnp.zeros(3))

    References:
      Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
    """
    _checks.check_bool("decoupled_weight_decay", decoupled_weight_decay)
    scaler = scale_by_amsgrad(
        b1,
        b2,
        eps,
        eps_root,
        eps_hat=eps_hat,
        max_of=max_of,
        bias_correction=bias_correction,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        state_bits=state_bits,
    )
    return _alias.with_weight_decay(
        scaler, learning_rate, weight_decay, maximize,
        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious,
    )  # fmt: skip
