"""Optimizers as pytrees, and how a ``scale_by_*`` transformation becomes a full optimizer.

Every transformation adam_jax returns is an ``optax.GradientTransformation`` whose
``init`` and ``update`` are ``jax.tree_util.Partial`` objects over module-level
functions. Their pytree children are:

* a frozen dataclass of static configuration (dtypes, booleans, ``max_of``, masks,
  schedules), registered with ``jax.tree_util.register_static``: it sits in the
  treedef and compares by value, so two optimizers built alike have equal treedefs;
* a NamedTuple of the numeric hyperparameters (``b1``, ``b2``, ``eps``, the learning
  rate when it is a number or an array, ...): these are the pytree LEAVES.

So an optimizer can be an argument of a jitted function (new hyperparameter values
do not retrace; a new schedule, dtype or flag does), and a stack of optimizers can
be vmapped over. A decay rate is stored as the two leaves ``(b, 1 - b)`` (see
:class:`adam_jax._common.Decay`), with ``1 - b`` formed in double on the host.

Every alias (``adam``, ``adamw``, ``amsgrad``, ``adamax``, ``adamaxw``) runs the same
pieces as an ``optax.chain`` of optax's ``scale(-1)`` (``maximize``),
``add_decayed_weights`` and ``scale_by_learning_rate`` around one ``scale_by_*``, and
has that chain's state. :func:`coupled` and :func:`decoupled` are the only places
that decide where weight decay, the learning rate and the sign go.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import optax
from jax.tree_util import Partial

from adam_jax import _cautious, _checks, _torchao

Mask: TypeAlias = optax.Params | Callable[[optax.Params], optax.Params] | None


def transformation(
    init: Callable[..., optax.OptState],
    update: Callable[..., tuple[optax.Updates, optax.OptState]],
    config: Hashable,
    hyperparams: tuple[Any, ...],
) -> optax.GradientTransformation:
    """``GradientTransformation(init(config, ·), update(config, hyperparams, ·))`` as a pytree."""
    return optax.GradientTransformation(Partial(init, config), Partial(update, config, hyperparams))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CheckedSchedule:
    """A learning-rate schedule whose output is checked to be a scalar (statically)."""

    schedule: Callable[[chex.Numeric], chex.Numeric]

    def __call__(self, count: chex.Numeric) -> chex.Numeric:
        lr = self.schedule(count)
        if lr is None:
            raise TypeError(
                f"the learning_rate schedule must return a scalar, but {self.schedule!r} "
                f"returned {lr!r}"
            )
        # Shapes are static, so this check is safe under jit and costs nothing at run time.
        if jnp.ndim(lr) != 0:
            raise ValueError(
                f"the learning_rate schedule must return a scalar, but {self.schedule!r} "
                f"returned an array of shape {jnp.shape(lr)} at step count {count!r}"
            )
        return lr


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FrozenMask:
    """A tree of bools kept as its treedef and leaves, so that it hashes by value."""

    treedef: jax.tree_util.PyTreeDef
    leaves: tuple[bool, ...]

    @classmethod
    def of(cls, mask: Mask) -> Mask:
        if mask is None or callable(mask):
            return mask
        leaves, treedef = jax.tree.flatten(mask)
        return cls(treedef, tuple(_checks.mask_leaf(x) for x in leaves))

    def tree(self) -> optax.Params:
        return self.treedef.unflatten(self.leaves)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AliasConfig:
    decoupled: bool
    maximize: bool
    mask: FrozenMask | Callable[[optax.Params], optax.Params] | None
    lr_schedule: CheckedSchedule | None
    wd_schedule: Callable[[chex.Numeric], chex.Numeric] | None

    def parts(
        self, scaler: Any, learning_rate: chex.Numeric, weight_decay: chex.Numeric
    ) -> dict[str, Any]:
        """The pieces of the chain by name, in order; the chain's state holds one
        state per piece, in the same order."""
        mask = self.mask.tree() if isinstance(self.mask, FrozenMask) else self.mask
        wd = self.wd_schedule if self.wd_schedule is not None else weight_decay
        lr = self.lr_schedule if self.lr_schedule is not None else learning_rate
        decay = optax.add_decayed_weights(wd, mask)
        parts = {"maximize": optax.scale(-1.0)} if self.maximize else {}
        if self.decoupled:
            parts |= {"scaler": scaler, "weight_decay": decay}
        else:
            parts |= {"weight_decay": decay, "scaler": scaler}
        return parts | {"learning_rate": optax.scale_by_learning_rate(lr)}


class AliasHyperparams(NamedTuple):
    learning_rate: chex.Numeric | None  # None when it is a schedule
    weight_decay: chex.Numeric | None


def _init(
    config: AliasConfig, scaler_init: Callable[..., optax.OptState], params: optax.Params
) -> optax.OptState:
    _check_mask(config, params)
    parts = config.parts(optax.GradientTransformation(scaler_init, None), 0.0, 1.0)
    return optax.chain(*parts.values()).init(params)


def _update(
    config: AliasConfig,
    hp: AliasHyperparams,
    scaler: optax.GradientTransformation,
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
) -> tuple[optax.Updates, optax.OptState]:
    if hp.learning_rate is not None:
        _checks.traced_interval("learning_rate", hp.learning_rate, 0.0)
    if hp.weight_decay is not None:
        _checks.traced_interval("weight_decay", hp.weight_decay, 0.0)
    parts = config.parts(scaler, hp.learning_rate, hp.weight_decay)
    if not (isinstance(state, tuple) and len(state) == len(parts)):
        _checks.check_not_swapped(updates, state, _checks.is_optimizer_state)
    if params is not None:  # optax's own NO_PARAMS_MSG names missing params
        try:
            _checks.check_like(params, updates, what="params", reference_name="the grads")
        except ValueError:
            # Name the grads when they are what differs from the state; the scaler
            # checks them against its state itself, so this runs only on failure.
            inner = state[list(parts).index("scaler")]
            if hasattr(inner, "m"):
                _checks.check_like(updates, inner.m)
            raise
        _check_mask(config, params)
    # torchao's Adam8bit/AdamW8bit as one whole step: numbers for the learning rate and
    # the decay, no mask, no maximize (its only configurations).
    adam_hp = _torchao.adam_hyperparams(scaler)
    lr, wd = hp
    torchao = adam_hp is not None and not config.maximize and config.mask is None
    if torchao and params is not None and lr is not None and wd is not None:
        return _torchao.step(adam_hp, config.decoupled, lr, wd, updates, state, params)
    result: tuple[optax.Updates, optax.OptState] = optax.chain(*parts.values()).update(
        updates, state, params, **extra_args
    )
    return result


def _check_mask(config: AliasConfig, params: optax.Params) -> None:
    if isinstance(config.mask, FrozenMask):
        _checks.check_prefix_tree(
            config.mask.tree(), params, what="mask", reference_name="the params"
        )


def _alias(
    scaler: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: Mask,
    maximize: bool,
    decoupled: bool,
) -> optax.GradientTransformationExtraArgs:
    _checks.check_learning_rate(learning_rate)
    _checks.check_non_negative("weight_decay", weight_decay, schedule_ok=True)
    _checks.check_bool("maximize", maximize)
    lr_schedule = CheckedSchedule(learning_rate) if callable(learning_rate) else None
    wd_schedule = weight_decay if callable(weight_decay) else None
    config = AliasConfig(decoupled, maximize, FrozenMask.of(mask), lr_schedule, wd_schedule)
    hp = AliasHyperparams(
        None if callable(learning_rate) else learning_rate,
        None if callable(weight_decay) else weight_decay,
    )
    return optax.GradientTransformationExtraArgs(
        Partial(_init, config, scaler.init), Partial(_update, config, hp, scaler)
    )


def coupled(
    scaler: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    maximize: bool,
    cautious: _cautious.Cautious = False,
) -> optax.GradientTransformationExtraArgs:
    """``torch.optim.Adam``/``Adamax`` layout: L2 added to the gradient.

    ``g ← (-g if maximize else g) + weight_decay·p``, then ``scaler`` (made
    cautious if asked), then ``-learning_rate·``. ``update`` needs ``params``, as in
    torch and ``optax.adamw``.
    """
    scaler = _cautious.maybe(scaler, cautious)
    return _alias(scaler, learning_rate, weight_decay, None, maximize, decoupled=False)


def decoupled(
    scaler: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: Mask,
    maximize: bool,
    cautious: _cautious.Cautious = False,
) -> optax.GradientTransformationExtraArgs:
    """``torch.optim.AdamW``/``optax.adamw`` layout: decay scaled by the learning rate.

    ``u = -learning_rate·(scaler(±g) + weight_decay·p)``, which is torch's
    ``p ← p·(1 - lr·wd) - lr·adam(g)`` and exactly ``optax.adamw``'s chain. The
    scaler is made cautious (:func:`adam_jax.cautious`) if asked; the decay is not masked.
    """
    scaler = _cautious.maybe(scaler, cautious)
    return _alias(scaler, learning_rate, weight_decay, mask, maximize, decoupled=True)


def with_weight_decay(
    scaler: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    maximize: bool,
    *,
    decoupled_weight_decay: bool,
    cautious: _cautious.Cautious = False,
) -> optax.GradientTransformationExtraArgs:
    """:func:`decoupled` (unmasked) or :func:`coupled`, as torch's ``decoupled_weight_decay``."""
    if decoupled_weight_decay:
        return decoupled(scaler, learning_rate, weight_decay, None, maximize, cautious=cautious)
    return coupled(scaler, learning_rate, weight_decay, maximize, cautious=cautious)
