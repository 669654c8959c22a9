"""How a ``scale_by_*`` transformation becomes a full optimizer.

Every alias (``adam``, ``adamw``, ``amsgrad``, ``adamax``, ``adamaxw``) is an
``optax.chain`` of optax's own pieces around one of our ``scale_by_*``
transformations. The two layouts below are the only places that decide where
weight decay, the learning rate and the sign go.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from adam_jax import _checks


def _check(learning_rate: Any, weight_decay: Any, maximize: Any) -> Any:
    """Check the alias arguments; return the learning rate (a schedule gets a shape check)."""
    _checks.check_learning_rate(learning_rate)
    _checks.check_non_negative("weight_decay", weight_decay, schedule_ok=True)
    _checks.check_bool("maximize", maximize)
    if not callable(learning_rate):
        _checks.check_scalar("learning_rate", learning_rate)
        return learning_rate
    schedule = learning_rate

    def checked_schedule(count):
        lr = schedule(count)
        if lr is None:
            raise TypeError(
                f"the learning_rate schedule must return a scalar, but {schedule!r} returned {lr!r}"
            )
        # Shapes are static, so this check is safe under jit and costs nothing at run time.
        if jnp.ndim(lr) != 0:
            raise ValueError(
                f"the learning_rate schedule must return a scalar, but {schedule!r} returned "
                f"an array of shape {jnp.shape(lr)} at step count {count!r}"
            )
        return lr

    return checked_schedule


def _checked(
    parts: list[optax.GradientTransformation], scaler: int, mask: Any = None
) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*parts)`` whose ``update`` first names mismatched trees.

    Without this, grads or params whose tree differs from the state's would fail
    deep inside ``optax.add_decayed_weights`` with a bare tree-mismatch trace.
    The chain and its state are optax's own; only ``update`` checks first.
    ``scaler`` is the index of the ``scale_by_*`` piece, whose state holds ``m``.
    """
    chain = optax.chain(*parts)

    def check_mask(params):
        if mask is not None and not callable(mask):
            _checks.check_prefix_tree(mask, params, what="mask", reference_name="the params")

    def init_fn(params):
        check_mask(params)
        return chain.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        inner = state[scaler] if isinstance(state, tuple) and len(state) == len(parts) else None
        if hasattr(inner, "m"):
            _checks.check_like(updates, inner.m)
        if params is not None:  # optax's own NO_PARAMS_MSG names missing params
            _checks.check_like(params, updates, what="params", reference_name="the grads")
            check_mask(params)
        return chain.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def coupled(
    scaler: optax.GradientTransformation,
    learning_rate: Any,
    weight_decay: Any,
    maximize: bool,
) -> optax.GradientTransformationExtraArgs:
    """``torch.optim.Adam``/``Adamax`` layout: L2 added to the gradient.

    ``g ← (-g if maximize else g) + weight_decay·p``, then ``scaler``, then
    ``-learning_rate·``. The decay term is always in the chain (also for
    ``weight_decay=0``), so a traced ``weight_decay`` never needs a Python branch;
    ``update`` therefore needs ``params``, as in torch and ``optax.adamw``.
    """
    learning_rate = _check(learning_rate, weight_decay, maximize)
    parts = [optax.scale(-1.0)] if maximize else []
    parts += [
        optax.add_decayed_weights(weight_decay),
        scaler,
        optax.scale_by_learning_rate(learning_rate),
    ]
    return _checked(parts, parts.index(scaler))


def decoupled(
    scaler: optax.GradientTransformation,
    learning_rate: Any,
    weight_decay: Any,
    mask: Any,
    maximize: bool,
) -> optax.GradientTransformationExtraArgs:
    """``torch.optim.AdamW``/``optax.adamw`` layout: decay scaled by the learning rate.

    ``u = -learning_rate·(scaler(±g) + weight_decay·p)``, which is torch's
    ``p ← p·(1 - lr·wd) - lr·adam(g)`` and exactly ``optax.adamw``'s chain.
    """
    learning_rate = _check(learning_rate, weight_decay, maximize)
    parts = [optax.scale(-1.0)] if maximize else []
    parts += [
        scaler,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    ]
    return _checked(parts, parts.index(scaler), mask)
