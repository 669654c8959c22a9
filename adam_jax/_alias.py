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

from adam_jax import _common


def _check(learning_rate: Any, weight_decay: Any, maximize: Any) -> Any:
    """Check the alias arguments; return the learning rate (a schedule gets a shape check)."""
    _common.check_learning_rate(learning_rate)
    _common.check_non_negative("weight_decay", weight_decay)
    _common.check_bool("maximize", maximize)
    if not callable(learning_rate):
        _common.check_scalar("learning_rate", learning_rate)
        return learning_rate
    schedule = learning_rate

    def checked_schedule(count):
        lr = schedule(count)
        # Shapes are static, so this check is safe under jit and costs nothing at run time.
        if jnp.ndim(lr) != 0:
            raise ValueError(
                f"the learning_rate schedule must return a scalar, but {schedule!r} returned "
                f"an array of shape {jnp.shape(lr)} at step count {count!r}"
            )
        return lr

    return checked_schedule


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
    return optax.chain(*parts)


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
    return optax.chain(*parts)
