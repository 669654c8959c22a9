"""Adam: ``scale_by_adam`` and the aliases ``adam`` and ``adamw``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _alias, _cautious, _checks, _common, _dtypes, _torchao
from adam_jax._common import AdamHyperparams, DecayPair


@_checks.state_class
class AdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
      count: int32 scalar, the number of updates so far; saturates at the int32 maximum.
      m: first moment, shaped like the params, in ``mu_dtype``.
      v: second moment, shaped like the params, in ``nu_dtype`` (real for complex params).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    m: optax.Updates
    v: optax.Updates


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AdamConfig:
    eps_hat: bool
    bias_correction: bool
    nesterov: bool
    mu_dtype: np.dtype | None
    nu_dtype: np.dtype | None


class AdamScalars(NamedTuple):
    """The scalars one Adam update shares between leaves of one real compute dtype."""

    b1: DecayPair
    b2: DecayPair
    direction: _common.Direction
    nesterov: tuple[ArrayLike, ArrayLike] | None  # (1/(1-b1^t), 1/(1-b1^(t+1)))


def adam_scalars(
    hp: AdamHyperparams, config: AdamConfig, count: jax.Array, dtype: np.dtype
) -> AdamScalars:
    """Cast the hyperparameters to ``dtype`` and form the corrections ``config`` applies."""
    mo = _common.moments(dtype, hp.b1, hp.b2, hp.eps, hp.eps_root)
    if not config.bias_correction:
        return AdamScalars(mo.b1, mo.b2, _common.Direction(mo.eps, mo.eps_root), None)
    c1, c2 = _common.correction(mo.b1, count), _common.correction(mo.b2, count)
    r1 = _common.reciprocal(c1)
    nesterov = None
    if config.nesterov:  # m̂ is corrected in the leaf: the ratio takes no 1/(1-b1^t)
        c1_next = _common.correction(mo.b1, _common.increment(count))
        nesterov = (r1, _common.reciprocal(c1_next))
    inner: jax.Array | None
    outer: jax.Array | None
    if config.eps_hat:  # u = m̂·sqrt(1-b2^t) / (sqrt(v + eps_root) + eps)
        inner, outer = None, jnp.sqrt(c2) if config.nesterov else jnp.sqrt(c2) / c1
    else:  # u = m̂ / (sqrt(v/(1-b2^t) + eps_root) + eps)
        inner, outer = _common.reciprocal(c2), None if config.nesterov else r1
    direction = _common.Direction(mo.eps, mo.eps_root, inner, outer)
    return AdamScalars(mo.b1, mo.b2, direction, nesterov)


def adam_leaf(
    config: AdamConfig, s: AdamScalars, g: jax.Array, m: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One leaf's Adam step: ``(direction, new m, new v)`` in the storage dtypes."""
    cdt, rdt = _dtypes.dtypes_of(g)
    g_ = _dtypes.cast(g, cdt)
    m_new = _common.ema(g_, _dtypes.cast(m, cdt), s.b1)  # m = b1·m + (1-b1)·g
    g_sq = _common.abs_sq(g_)
    v_new = _common.ema(g_sq, _dtypes.cast(v, rdt), s.b2, nonnegative=True)  # b2·v + (1-b2)·|g|²
    if config.nesterov:  # m̂ = b1·m/(1-b1^(t+1)) + (1-b1)·g/(1-b1^t)
        m_new_hat = _common.nesterov_first_moment(g_, m_new, s.b1, s.nesterov)
        u = _common.adam_direction(m_new_hat, v_new, s.direction)
    else:  # u = m̂/(sqrt(v̂ + eps_root) + eps)
        u = _common.adam_direction(m_new, v_new, s.direction)
    return _dtypes.cast(u, g.dtype), _common.store(m_new, m), _dtypes.cast(v_new, v.dtype)


def _init(config: AdamConfig, params: optax.Params) -> AdamState:
    return AdamState(
        count=_common.init_count(),
        m=_dtypes.zeros_like(params, config.mu_dtype),
        v=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),
    )


def _update(
    config: AdamConfig,
    hp: AdamHyperparams,
    updates: optax.Updates,
    state: AdamState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, AdamState]:
    del params
    _checks.prepare_update(updates, state, AdamState, "scale_by_adam")
    _common.check_traced(hp)
    count = _common.increment(state.count)
    scalars = _common.by_dtype(updates, lambda dt: adam_scalars(hp, config, count, dt))

    def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        return adam_leaf(config, scalars[_dtypes.dtypes_of(g)[1]], g, m, v)

    u, m, v = _common.map_leaves(leaf, 3, updates, state.m, state.v)
    return u, AdamState(count=count, m=m, v=v)


def scale_by_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    *,
    eps_hat: bool = False,
    bias_correction: bool = True,
    nesterov: bool = False,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with Adam (Kingma & Ba, 2015), without a learning rate.

    With gradient :math:`g_t` at step :math:`t = 1, 2, \dots`:

    .. math::

      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2

      \hat m_t = m_t / (1-\beta_1^t), \qquad \hat v_t = v_t / (1-\beta_2^t)

      u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)

    This is Algorithm 1 of the paper and exactly ``torch.optim.Adam`` and
    ``optax.scale_by_adam``. ``eps_root`` gives the form with eps inside the square
    root, :math:`\sqrt{\hat v + \epsilon}`.

    Options:

    * ``eps_hat=True``: Keras/TensorFlow's "efficient" form, eps added before the
      bias correction: :math:`u_t = \alpha_t m_t / (\sqrt{v_t + \epsilon_{root}} + \epsilon)`
      with :math:`\alpha_t = \sqrt{1-\beta_2^t}/(1-\beta_1^t)`
      (``keras/src/optimizers/adam.py``; also Kingma & Ba, end of section 2).
    * ``bias_correction=False`` drops both corrections:
      :math:`u_t = m_t/(\sqrt{v_t+\epsilon_{root}}+\epsilon)`.
    * ``nesterov=True``: Nadam as in ``optax.nadam``,
      :math:`\hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`.

    Where it differs from the references:

    * bfloat16/float16 leaves are computed in float32 and stored back, so a zero
      gradient can never become 0/0 (optax #1754); optax computes in the leaf dtype.
    * The bias correction is computed in the leaf's precision (float64 for float64),
      as ``-expm1(t·log1p(-(1-β)))``: in float32 it is accurate to an ulp, where
      optax's ``1 - β^t`` is off by ~1e-5 relative for β = 0.999 (torch computes it
      in double, which this matches to float32 rounding).
    * Complex params use :math:`|g|^2 = \bar g g` and store ``v`` as real. PyTorch
      instead treats the real and imaginary parts as two independent real numbers
      (``view_as_real``), so on complex params the two differ by design.

    Args:
      state_bits: None or 32 (float32 moments, the default) or 8: then
        ``m`` (signed map) and ``v`` (unsigned map) are stored in 8 bits, in leaves of
        >= 4096 elements, a multiple of 256, as torchao's ``AdamW8bit`` (see docs).
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0 (optax's ``eps_root``).
      eps_hat: add eps before the bias correction (Keras/TensorFlow).
      bias_correction: apply the ``1 - β^t`` corrections.
      nesterov: use Nesterov momentum (Nadam, as in ``optax.nadam``).
      mu_dtype: dtype to store ``m`` in; default the param dtype.
      nu_dtype: dtype to store ``v`` in; default the param dtype (its real part for
        complex), except float32 for float16 params: ``(1-b2)·g²`` underflows float16
        for ``|g| ≲ 8e-3``, so a float16 ``v`` would become 0 and the steps ~30× too
        large. Pass ``nu_dtype=jnp.float16`` to force it. bfloat16 has float32's range
        but 8 significant bits: with ``b2=0.999`` an increment ``(1-b2)·g²`` is below
        half an ulp of ``v`` once ``v`` is ~256× larger, so a bfloat16 ``v`` stalls
        (a constant gradient's steps drift up to ~2× too large); it saves memory at
        that price.

    Any numeric hyperparameter may be a Python number or a JAX array, traced too
    (so it can be vmapped over). Concrete values are range-checked here; traced ones
    are checked by ``update`` only under ``jax.experimental.checkify.checkify``, whose
    error then names the argument and its value (without checkify nothing is checked
    and nothing changes).

    The transformation is a pytree: the numeric hyperparameters are its leaves
    (``b1`` and ``b2`` as the pairs ``(b, 1 - b)``), the options are static. It can
    be passed to a jitted function, which new hyperparameter values do not retrace.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`AdamState`.

    Example:
      >>> import jax.numpy as jnp, optax, adam_jax
      >>> opt = optax.chain(adam_jax.scale_by_adam(), optax.scale(-0.1))
      >>> params = {"w": jnp.array(0.5)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.array(-15.0)}, state)
      >>> print(f"{float(optax.apply_updates(params, updates)['w']):.6f}")
      0.600000

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR 2016 workshop.
    """
    hp = _common.adam_hyperparams(b1, b2, eps, eps_root)
    _checks.check_bool("eps_hat", eps_hat)
    _checks.check_bool("bias_correction", bias_correction)
    _checks.check_bool("nesterov", nesterov)
    config = AdamConfig(
        eps_hat,
        bias_correction,
        nesterov,
        _checks.canonical_dtype("mu_dtype", mu_dtype),
        _checks.canonical_dtype("nu_dtype", nu_dtype),
    )
    scaler = _alias.transformation(_init, _update, config, hp)
    return _torchao.with_state_bits(scaler, state_bits, config, hp)


def adam(
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
    nesterov: bool = False,
    bias_correction: bool = True,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with a learning rate, coupled (L2) weight decay and ``maximize``.

    .. math::

      g_t \leftarrow \pm g_t + \lambda p_{t-1}, \qquad
      p_t = p_{t-1} - \eta_t \cdot \mathrm{scale\_by\_adam}(g_t)

    With the defaults this is ``torch.optim.Adam`` (``weight_decay`` and
    ``maximize`` as there) and ``optax.adam``; ``nesterov=True`` is
    ``optax.nadam``. See :func:`scale_by_adam` for the options and equations.

    Args:
      state_bits: as in :func:`scale_by_adam`.
      learning_rate: a number, an array or an optax schedule ``count -> lr``; >= 0.
      b1, b2, eps, eps_root, eps_hat, nesterov, bias_correction, mu_dtype, nu_dtype:
        as in :func:`scale_by_adam`.
      weight_decay: coupled L2 coefficient λ, >= 0 (``torch.optim.Adam``'s).
      decoupled_weight_decay: as in ``torch.optim.Adam``: decay the params by
        ``η·λ·p`` outside the Adam step instead of adding ``λ·p`` to the gradient;
        ``True`` is :func:`adamw` (with this function's default ``weight_decay=0``).
      maximize: ascend instead of descend, as in torch.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with the state of an
      ``optax.chain`` of ``add_decayed_weights``, :func:`scale_by_adam` and
      ``scale_by_learning_rate`` (decay after the scaler when decoupled); a pytree
      whose leaves are the numeric hyperparameters. ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adam_jax
      >>> opt = adam_jax.adam(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p**2))(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> print(params.round(4))
      [ 0.9 -1.9]

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
    """
    _checks.check_bool("decoupled_weight_decay", decoupled_weight_decay)
    scaler = scale_by_adam(
        b1,
        b2,
        eps,
        eps_root,
        eps_hat=eps_hat,
        bias_correction=bias_correction,
        nesterov=nesterov,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        state_bits=state_bits,
    )
    return _alias.with_weight_decay(
        scaler, learning_rate, weight_decay, maximize,
        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious,
    )  # fmt: skip


def adamw(
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
    eps_hat: bool = False,
    nesterov: bool = False,
    bias_correction: bool = True,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    .. math::

      p_t = p_{t-1} - \eta_t \left(\mathrm{scale\_by\_adam}(\pm g_t) + \lambda p_{t-1}\right)

    This is ``optax.adamw`` (the same chain, and its default ``weight_decay=1e-4``)
    and ``torch.optim.AdamW``, whose ``p ← p(1-ηλ) - η·adam`` is the same update
    (torch's default ``weight_decay`` is 1e-2: pass it to match torch's defaults).

    Args:
      state_bits: as in :func:`scale_by_adam`.
      learning_rate: a number, an array or an optax schedule; >= 0.
      weight_decay: decoupled decay λ, >= 0, multiplied by the learning rate.
      mask: as in ``optax.add_decayed_weights``: a tree of bools or a callable
        choosing which params decay.
      maximize: ascend instead of descend, as in torch.
      cautious: ``False``, ``True`` (= ``"timm"``) or ``"paper"``: mask the step where the
        first moment and the gradient disagree (:func:`adam_jax.cautious`); decay is not masked.
      b1, b2, eps, eps_root, eps_hat, nesterov, bias_correction, mu_dtype, nu_dtype:
        as in :func:`scale_by_adam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.adamw(1e-3, weight_decay=1e-2)
      >>> state = opt.init({"w": jnp.ones(3)})

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    return _alias.decoupled(
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            eps_hat=eps_hat,
            bias_correction=bias_correction,
            nesterov=nesterov,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            state_bits=state_bits,
        ),
        learning_rate,
        weight_decay,
        mask,
        maximize,
        cautious=cautious,
    )
