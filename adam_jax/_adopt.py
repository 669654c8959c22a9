"""ADOPT: ``scale_by_adopt`` and the alias ``adopt``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from adam_jax import _alias, _checks, _common, _dtypes, _quantize
from adam_jax._common import Decay


@_checks.state_class
class ADOPTState(NamedTuple):
    """State of :func:`scale_by_adopt`.

    Attributes:
      count: int32 scalar, the number of updates so far (the first only sets ``v``).
      m: first moment of the normalised gradients, shaped like the params, in their dtype.
      v: second moment, shaped like the params, in the param dtype (float32 for
        float16 params).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    m: optax.Updates
    v: optax.Updates


class ADOPTHyperparams(NamedTuple):
    b1: Decay
    b2: Decay
    eps: chex.Numeric
    weight_decay: chex.Numeric  # decoupled decay; 0 (and unused) for scale_by_adopt


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ADOPTConfig:
    use_clipping: bool
    decoupled_weight_decay: bool


def _init(config: ADOPTConfig, params: optax.Params) -> ADOPTState:
    del config
    for where, p in _checks.leaves_with_paths(params, "params"):
        _checks.check_leaf(p, where)
        if jnp.iscomplexobj(p):
            raise TypeError(f"{where} is {jnp.dtype(p.dtype).name}: ADOPT takes real params only")
    return ADOPTState(
        count=_common.init_count(),
        m=_dtypes.zeros_like(params, None),
        v=_dtypes.zeros_like(params, None, squares=True),
    )


def _update(
    config: ADOPTConfig,
    hp: ADOPTHyperparams,
    updates: optax.Updates,
    state: ADOPTState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, ADOPTState]:
    _checks.prepare_update(updates, state, ADOPTState, "scale_by_adopt")
    _checks.traced_interval("b1", hp.b1.d, 0.0, 1.0)
    _checks.traced_interval("b2", hp.b2.d, 0.0, 1.0)
    _checks.traced_interval("eps", hp.eps, 0.0)
    if config.decoupled_weight_decay:
        _checks.traced_interval("weight_decay", hp.weight_decay, 0.0)
        if params is None:
            raise ValueError("adopt's update needs the params: update(grads, state, params)")
        decay_from = params
    else:
        decay_from = updates  # unused
    first = state.count == 0

    def leaf(g: jax.Array, m: jax.Array, v: jax.Array, p: jax.Array) -> tuple[jax.Array, ...]:
        cdt, _ = _dtypes.dtypes_of(g)
        b1, b2 = _common.decay_pair(hp.b1, cdt), _common.decay_pair(hp.b2, cdt)
        g_, m_, v_ = (_dtypes.cast(x, cdt) for x in (g, m, v))
        # gn = clip(g/max(sqrt(v), eps), ±(n-1)^(1/4)), n the call number (count + 1)
        gn = g_ / jnp.maximum(jnp.sqrt(v_), _common.scalar(hp.eps, cdt))
        if config.use_clipping:
            clip = state.count.astype(cdt) ** 0.25
            gn = jnp.clip(gn, -clip, clip)
        m_new = m_ + _common.scale(b1.one_minus_d, gn - m_)  # lerp(m, gn, 1-b1), as torch
        u = m_new
        if config.decoupled_weight_decay:
            u = u + _common.scale(_common.scalar(hp.weight_decay, cdt), _dtypes.cast(p, cdt))
        v_new = _common.ema(_common.abs_sq(g_), v_, b2, nonnegative=True)
        # The first call only sets v = g² and moves nothing.
        u = jnp.where(first, jnp.zeros_like(u), u)
        m_new = jnp.where(first, m_, m_new)
        v_new = jnp.where(first, _common.abs_sq(g_), v_new)
        return _dtypes.cast(u, g.dtype), _common.store(m_new, m), _dtypes.cast(v_new, v.dtype)

    u, m, v = _common.map_leaves(leaf, 3, updates, state.m, state.v, decay_from)
    return u, ADOPTState(count=_common.increment(state.count), m=m, v=v)


def _scaler(
    b1: ArrayLike,
    b2: ArrayLike,
    eps: ArrayLike,
    weight_decay: ArrayLike,
    config: ADOPTConfig,
    state_bits: int | None,
) -> optax.GradientTransformation:
    _checks.check_decay("b1", b1)
    _checks.check_decay("b2", b2)
    _checks.check_non_negative("eps", eps)
    _checks.check_non_negative("weight_decay", weight_decay)
    _checks.check_bool("use_clipping", config.use_clipping)
    hp = ADOPTHyperparams(_common.decay_leaves(b1), _common.decay_leaves(b2), eps, weight_decay)
    scaler = _alias.transformation(_init, _update, config, hp)
    return _quantize.with_state_bits(scaler, state_bits, config)


def scale_by_adopt(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.9999,
    eps: ArrayLike = 1e-6,
    *,
    use_clipping: bool = True,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescale updates with ADOPT (Taniguchi et al., 2024), without a learning rate.

    At the first call :math:`n = 1` only :math:`v_1 = g_1^2` is set and the update
    is 0. At each later call :math:`n = 2, 3, \dots`:

    .. math::

      \tilde g_n = \mathrm{clip}\!\left(\frac{g_n}{\max(\sqrt{v_{n-1}}, \epsilon)},
        \pm (n-1)^{1/4}\right), \qquad
      m_n = m_{n-1} + (1-\beta_1)(\tilde g_n - m_{n-1}), \qquad u_n = m_n

      v_n = \beta_2 v_{n-1} + (1-\beta_2) g_n^2

    The gradient is normalised by the second moment of the *previous* steps, and
    ``v`` is updated only after the step. There is no bias correction. This is the
    authors' ``ADOPT`` (PyPI ``torch-adopt``, module ``adopt``, with its default
    ``clip_lambda = step**0.25``), and ``optax.contrib.scale_by_adopt``.

    Where it differs from the references: bfloat16/float16 leaves are computed in
    float32 and stored back; complex params are refused (the reference treats
    real and imaginary parts as two reals).

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: lower bound of :math:`\sqrt{v}`, >= 0.
      use_clipping: clip the normalised gradient to :math:`\pm(n-1)^{1/4}`
        (the reference's ``clip_lambda=None`` is ``False``).
      state_bits: None or 32 (float32 moments, the default) or 8: then
        ``m`` (signed map) and ``v`` (unsigned map) are stored in 8 bits, in leaves of
        >= 4096 elements, a multiple of 256, as torchao's ``AdamW8bit`` (see docs).

    Hyperparameters are pytree leaves and may be traced (checked only under
    ``jax.experimental.checkify.checkify``); ``use_clipping`` and ``state_bits`` are static.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`ADOPTState`.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.scale_by_adopt()
      >>> state = opt.init(jnp.zeros(2))
      >>> u, state = opt.update(jnp.array([3.0, -3.0]), state)
      >>> print(u)  # the first call only sets v
      [0. 0.]
      >>> u, state = opt.update(jnp.array([3.0, -3.0]), state)
      >>> print(u.round(4))  # (1-b1)·clip(g/|g|, ±1)
      [ 0.1 -0.1]

    References:
      Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki,
      Iwasawa & Matsuo, *ADOPT: Modified Adam Can Converge with Any β2 with the
      Optimal Rate*, NeurIPS 2024. ``adopt/adopt.py`` (iShohei220/adopt).
    """
    return _scaler(b1, b2, eps, 0.0, ADOPTConfig(use_clipping, False), state_bits)


def adopt(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.9999,
    eps: ArrayLike = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    decoupled_weight_decay: bool = False,
    use_clipping: bool = True,
    maximize: bool = False,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ADOPT with a learning rate, weight decay and ``maximize``: the authors' ``ADOPT``.

    .. math::

      \text{coupled (default):}\quad g_n \leftarrow \pm g_n + \lambda p_{n-1}, \quad
      p_n = p_{n-1} - \eta_n \cdot \mathrm{scale\_by\_adopt}(g_n)

      \text{decoupled:}\quad
      p_n = p_{n-1} - \eta_n \left(\mathrm{scale\_by\_adopt}(\pm g_n) + \lambda p_{n-1}\right)

    With the defaults this is the reference's ``ADOPT`` (``decouple=False``);
    ``decoupled_weight_decay=True`` is its ``decouple=True``, whose decay also
    skips the first call (no param moves then). Without weight decay it is
    ``optax.contrib.adopt``, which has none. See :func:`scale_by_adopt`.

    Args:
      learning_rate: a number, an array or an optax schedule ``count -> lr``; >= 0.
      b1, b2, eps, use_clipping: as in :func:`scale_by_adopt`.
      weight_decay: :math:`\lambda`, >= 0 (a schedule only with the coupled form).
      decoupled_weight_decay: decay the params directly (AdamW-style) instead of
        adding :math:`\lambda p` to the gradient.
      maximize: ascend instead of descend, as in the reference.
      state_bits: as in :func:`scale_by_adopt`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain`` around
      :func:`scale_by_adopt`'s state); its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, adam_jax
      >>> opt = adam_jax.adopt(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     updates, state = opt.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.round(4))
      [ 0.9711 -1.971 ]

    References:
      Taniguchi et al., *ADOPT: Modified Adam Can Converge with Any β2 with the
      Optimal Rate*, NeurIPS 2024.
    """
    _checks.check_bool("decoupled_weight_decay", decoupled_weight_decay)
    if decoupled_weight_decay:  # inside the scaler, so that the first call moves nothing
        config = ADOPTConfig(use_clipping, True)
        scaler = _scaler(b1, b2, eps, weight_decay, config, state_bits)
        return _alias.coupled(scaler, learning_rate, 0.0, maximize)
    scaler = _scaler(b1, b2, eps, 0.0, ADOPTConfig(use_clipping, False), state_bits)
    return _alias.coupled(scaler, learning_rate, weight_decay, maximize)
