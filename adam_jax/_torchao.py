"""8-bit Adam as torchao computes it (``torchao/optim/adam.py``, 0.18, ``single_param_adam``
as ``torch.compile`` runs it), so that ``adam``/``adamw(state_bits=8)`` reproduce
``Adam8bit``/``AdamW8bit`` bit for bit: the moments, the bias corrections and the
param step in torchao's order and rounding, on the states of :mod:`adam_jax._quantize`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial
from jax.typing import ArrayLike

from adam_jax import _checks, _common, _dtypes, _quantize


def with_state_bits(
    scaler: optax.GradientTransformation, state_bits: int | None, config: Any, hp: Any
) -> optax.GradientTransformation:
    """:func:`adam_jax._quantize.with_state_bits` for ``scale_by_adam``: with 8-bit states,
    a plain Adam (no ``eps_root``, ``eps_hat``, ``nesterov``; bias correction on) updates
    with torchao's arithmetic (:func:`_torch_adam_update`), so that its codes match
    torchao's, and the aliases run it as torchao's whole step (:func:`step`)."""
    out = _quantize.with_state_bits(scaler, state_bits, config)
    plain = not (config.eps_hat or config.nesterov or not config.bias_correction)
    if out is scaler or not plain or not _is_zero(hp.eps_root):
        return out
    update = Partial(_quantize._update, Partial(_torch_adam_update, hp))
    return optax.GradientTransformation(out.init, update)


def _is_zero(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer) and bool(np.all(np.asarray(x) == 0))


def _torch_adam_terms(
    hp: Any, updates: optax.Updates, state: Any
) -> tuple[optax.Updates, optax.Updates, Any]:
    """Adam as torchao's ``single_param_adam`` computes it (``torchao/optim/adam.py``,
    0.18), for the dequantized ``state``: the moments by ``lerp``, both products rounded
    before they are added (compiled torchao does not fuse them), the bias corrections
    ``1 - b**t`` with ``b`` and ``t`` in float32. Returns ``m / c1``,
    ``sqrt(v) / sqrt(c2) + eps`` and the new state."""
    _checks.prepare_update(updates, state, type(state), "scale_by_adam")
    count = _common.increment(state.count)

    def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        cdt, rdt = _dtypes.dtypes_of(g)
        t = count.astype(rdt)
        zero = _zero(count, g)
        b1, w1 = (_common.scalar(x, rdt) for x in hp.b1[:2])
        b2, w2 = (_common.scalar(x, rdt) for x in hp.b2[:2])
        c1, c2 = 1 - b1**t, 1 - b2**t
        g_ = _dtypes.cast(g, cdt)
        m_old, v_old = _dtypes.cast(m, cdt), _dtypes.cast(v, rdt)
        m_new = m_old + (w1 * (g_ - m_old) + zero)  # m.lerp(g, 1 - b1)
        v_new = v_old + (w2 * ((_common.abs_sq(g_) + zero) - v_old) + zero)
        den = jnp.sqrt(v_new) / _quantize._spread(jnp.sqrt(c2), v_new) + _common.scalar(hp.eps, rdt)
        m_hat = m_new / _quantize._spread(c1, m_new)
        return m_hat, den, _dtypes.cast(m_new, m.dtype), _dtypes.cast(v_new, v.dtype)

    m_hat, den, m, v = _common.map_leaves(leaf, 4, updates, state.m, state.v)
    return m_hat, den, state._replace(count=count, m=m, v=v)


def _zero(count: jax.Array, like: jax.Array) -> jax.Array:
    """A zero known only at run time, in ``like``'s real dtype: ``x·y + zero`` is rounded
    before it meets another operand, where a plain ``x·y + w`` would compile to a fused
    multiply-add."""
    t = count.astype(_dtypes.dtypes_of(like)[1])
    return t - t


def _torch_adam_update(
    hp: Any, updates: optax.Updates, state: Any, params: optax.Params | None = None
) -> tuple[optax.Updates, Any]:
    """torchao's Adam direction ``u = (m / c1) / (sqrt(v) / sqrt(c2) + eps)``
    (:func:`_torch_adam_terms`), for the dequantized ``state``."""
    del params
    m_hat, den, state = _torch_adam_terms(hp, updates, state)
    u = jax.tree.map(lambda g, a, b: _dtypes.cast(a / b, g.dtype), updates, m_hat, den)
    return u, state


def adam_hyperparams(scaler: optax.GradientTransformation) -> Any:
    """The hyperparameters of ``scaler`` when it is the 8-bit Adam that follows
    torchao's arithmetic (:func:`with_state_bits`), else None."""
    update = scaler.update
    if isinstance(update, Partial) and update.func is _quantize._update:
        inner = update.args[0]
        if isinstance(inner, Partial) and inner.func is _torch_adam_update:
            return inner.args[0]
    return None


def step(
    adam_hp: Any,
    decoupled: bool,
    learning_rate: ArrayLike,
    weight_decay: ArrayLike,
    updates: optax.Updates,
    state: Any,
    params: optax.Params,
) -> tuple[optax.Updates, Any]:
    """The whole step of torchao's ``Adam8bit``/``AdamW8bit`` (``single_param_adam``)
    as an update, for the chain state of :func:`adam_jax._alias.coupled` or
    ``decoupled`` around the 8-bit Adam ``adam_hp``.

    torchao rounds the param twice a step, ``p2 = p - (lr·wd)·p`` (AdamW) and
    ``p3 = p2 - (lr·(m/c1)) / den``; an update added once by ``optax.apply_updates``
    cannot, so this returns ``u = p3 - p``. That subtraction is exact when
    ``p/2 <= p3 <= 2p`` (Sterbenz's lemma), and then ``p + u`` is ``p3`` bit for bit;
    otherwise (a step that more than halves or doubles ``p``) ``p + u`` is within half
    an ulp of ``p`` of ``p3``. Coupled decay (Adam) is ``g + wd·p``, as there."""
    at = 1 if not decoupled else 0  # the scaler's place in the chain
    count = state[at].count
    grads = updates
    if not decoupled:
        grads = jax.tree.map(
            lambda g, p: g + (_common.scalar(weight_decay, g.dtype) * p + _zero(count, g)),
            updates,
            params,
        )
    (_, _, inner), (_, _, same), (m_hat, den, _) = _quantize.per_pass(
        lambda dequantized: _torch_adam_terms(adam_hp, grads, dequantized), state[at]
    )

    def leaf(g: jax.Array, p: jax.Array, a: jax.Array, d: jax.Array) -> jax.Array:
        cdt = a.dtype
        lr = _common.scalar(learning_rate, cdt)
        p_ = _dtypes.cast(p, cdt)
        zero = _zero(count, a)
        if decoupled:
            p2 = p_ - (lr * _common.scalar(weight_decay, cdt) * p_ + zero)
        else:
            p2 = p_
        p3 = p2 - (lr * a) / d
        return _dtypes.cast(p3 - p_, g.dtype)

    u = jax.tree.map(leaf, updates, params, m_hat, den)
    new_state = list(state)
    new_state[at] = _quantize._quantize_fields(inner, state[at], same)
    return u, tuple(new_state)
