"""Parity with live optax: the aliases and the ``scale_by_*`` transformations.

Each run feeds a spiky gradient sequence (100x spikes, 0.01x lulls, sign flips)
over a tree of a matrix and a vector to both sides, in float64 and float32, and
compares the params (or the updates) after every step and the moments at the
end. A second run takes gradients of a quartic loss at each side's own params,
so that differences feed back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import _gradients
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

STEPS = 120
LR = 1e-2
SHAPES = _gradients.SHAPES
TARGET = np.array([1.0, -2.0, 0.5])

# Normwise relative tolerance: |ours - ref| <= RTOL * (|ref| + max|ref|).
RTOL = {jnp.dtype(jnp.float64): 1e-13, jnp.dtype(jnp.float32): 1e-6}
DTYPES = [pytest.param(jnp.dtype(d), id=jnp.dtype(d).name) for d in (jnp.float64, jnp.float32)]
RUNS = [
    pytest.param(jnp.dtype(jnp.float64), False, id="float64-fixed_grads"),
    pytest.param(jnp.dtype(jnp.float64), True, id="float64-grads_from_params"),
    pytest.param(jnp.dtype(jnp.float32), False, id="float32-fixed_grads"),
    pytest.param(jnp.dtype(jnp.float32), True, id="float32-grads_from_params"),
]

COSINE = optax.cosine_decay_schedule(LR, decay_steps=STEPS, alpha=0.1)
WARMUP_COSINE = optax.warmup_cosine_decay_schedule(0.0, LR, 20, STEPS, end_value=1e-4)
MASK = {"w": True, "b": False}


def matrices_only(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


class AliasCase(NamedTuple):
    ours: Callable[[], optax.GradientTransformation]
    theirs: Callable[[], optax.GradientTransformation]
    # field of our state -> field of optax's state
    moments: dict


ADAM = {"m": "mu", "v": "nu"}
AMSGRAD = {"m": "mu", "v": "nu", "v_max": "nu_max"}
ADAMAX = {"m": "mu", "u": "nu"}

ALIASES = {
    "adam": AliasCase(lambda: adam_jax.adam(LR), lambda: optax.adam(LR), ADAM),
    "adam-eps_root": AliasCase(
        lambda: adam_jax.adam(LR, eps_root=1e-3),
        lambda: optax.adam(LR, eps_root=1e-3),
        ADAM,
    ),
    "adam-nesterov-vs-nadam": AliasCase(
        lambda: adam_jax.adam(LR, nesterov=True), lambda: optax.nadam(LR), ADAM
    ),
    "amsgrad-corrected": AliasCase(
        lambda: adam_jax.amsgrad(LR, max_of="corrected"), lambda: optax.amsgrad(LR), AMSGRAD
    ),
    "adamax-eps_in_max": AliasCase(
        lambda: adam_jax.adamax(LR, eps_in_max=True), lambda: optax.adamax(LR), ADAMAX
    ),
    "adamw": AliasCase(
        lambda: adam_jax.adamw(LR, weight_decay=0.1),
        lambda: optax.adamw(LR, weight_decay=0.1),
        ADAM,
    ),
    "adamw-mask-tree": AliasCase(
        lambda: adam_jax.adamw(LR, weight_decay=0.1, mask=MASK),
        lambda: optax.adamw(LR, weight_decay=0.1, mask=MASK),
        ADAM,
    ),
    "adamw-mask-callable": AliasCase(
        lambda: adam_jax.adamw(LR, weight_decay=0.1, mask=matrices_only),
        lambda: optax.adamw(LR, weight_decay=0.1, mask=matrices_only),
        ADAM,
    ),
    "adamw-nesterov": AliasCase(
        lambda: adam_jax.adamw(LR, weight_decay=0.1, nesterov=True),
        lambda: optax.adamw(LR, weight_decay=0.1, nesterov=True),
        ADAM,
    ),
    "adam-cosine_decay_schedule": AliasCase(
        lambda: adam_jax.adam(COSINE), lambda: optax.adam(COSINE), ADAM
    ),
    "adamw-warmup_cosine_decay_schedule": AliasCase(
        lambda: adam_jax.adamw(WARMUP_COSINE, weight_decay=0.1),
        lambda: optax.adamw(WARMUP_COSINE, weight_decay=0.1),
        ADAM,
    ),
}

SCALERS = {
    "scale_by_adam": AliasCase(adam_jax.scale_by_adam, optax.scale_by_adam, ADAM),
    "scale_by_adam-eps_root": AliasCase(
        lambda: adam_jax.scale_by_adam(eps_root=1e-3),
        lambda: optax.scale_by_adam(eps_root=1e-3),
        ADAM,
    ),
    "scale_by_adam-nesterov": AliasCase(
        lambda: adam_jax.scale_by_adam(nesterov=True),
        lambda: optax.scale_by_adam(nesterov=True),
        ADAM,
    ),
    "scale_by_amsgrad-corrected": AliasCase(
        lambda: adam_jax.scale_by_amsgrad(max_of="corrected"), optax.scale_by_amsgrad, AMSGRAD
    ),
    "scale_by_amsgrad-corrected-eps_root": AliasCase(
        lambda: adam_jax.scale_by_amsgrad(eps_root=1e-3, max_of="corrected"),
        lambda: optax.scale_by_amsgrad(eps_root=1e-3),
        AMSGRAD,
    ),
    "scale_by_adamax-eps_in_max": AliasCase(
        lambda: adam_jax.scale_by_adamax(eps_in_max=True), optax.scale_by_adamax, ADAMAX
    ),
    "scale_by_adamax-eps_in_max-eps1e-3": AliasCase(
        lambda: adam_jax.scale_by_adamax(eps=1e-3, eps_in_max=True),
        lambda: optax.scale_by_adamax(eps=1e-3),
        ADAMAX,
    ),
}

OUR_STATES = (adam_jax.AdamState, adam_jax.AMSGradState, adam_jax.AdamaxState)
OPTAX_STATES = (optax.ScaleByAdamState, optax.ScaleByAmsgradState)


def scale_schedule(steps: int = STEPS) -> np.ndarray:
    return _gradients.scale_schedule(steps)


def gradient_sequence(dtype, steps: int = STEPS, seed: int = 0) -> dict[str, jax.Array]:
    """``{leaf: (steps, *shape)}`` gradients, scaled per step by :func:`scale_schedule`."""
    rng = np.random.default_rng(seed)
    s = scale_schedule(steps)
    return {
        k: jnp.asarray(
            s.reshape((-1,) + (1,) * len(shape)) * rng.standard_normal((steps, *shape))
        ).astype(dtype)
        for k, shape in SHAPES.items()
    }


def initial_params(dtype, seed: int = 1) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(shape), dtype) for k, shape in SHAPES.items()}


def quartic_loss(p):
    r = p["w"] @ p["b"] - jnp.asarray(TARGET, p["w"].dtype)
    return 0.5 * jnp.sum(r**2) + 0.25 * jnp.sum(p["w"] ** 4) + 0.25 * jnp.sum(p["b"] ** 4)


def find_state(state, types):
    """The one state of ``types`` inside an (optax.chain) state."""
    leaves = jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, types))
    found = [s for s in leaves if isinstance(s, types)]
    assert len(found) == 1, state
    return found[0]


def run_alias(opt, params, grads, from_params: bool):
    """Params after every step, and the final state."""
    scales = jnp.asarray(scale_schedule(), params["w"].dtype)

    @jax.jit
    def go(params, grads, scales):
        def body(carry, xs):
            params, state = carry
            g, scale = xs
            if from_params:
                g = jax.tree.map(lambda x: scale * x, jax.grad(quartic_loss)(params))
            updates, state = opt.update(g, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), params

        (_, state), trajectory = jax.lax.scan(body, (params, opt.init(params)), (grads, scales))
        return trajectory, state

    return go(params, grads, scales)


def run_scaler(opt, params, grads):
    """Updates of every step, and the final state."""

    @jax.jit
    def go(params, grads):
        def body(state, g):
            updates, state = opt.update(g, state)
            return state, updates

        state, updates = jax.lax.scan(body, opt.init(params), grads)
        return updates, state

    return go(params, grads)


def assert_close(actual, desired, rtol, what):
    for k in SHAPES:
        a, d = np.asarray(actual[k]), np.asarray(desired[k])
        assert a.dtype == d.dtype, (what, k, a.dtype, d.dtype)
        d64 = d.astype(np.float64)
        np.testing.assert_allclose(
            a.astype(np.float64),
            d64,
            rtol=rtol,
            atol=rtol * np.max(np.abs(d64)),
            err_msg=f"{what}[{k!r}]",
        )


def assert_moments(ours, theirs, moments, rtol):
    mine = find_state(ours, OUR_STATES)
    ref = find_state(theirs, OPTAX_STATES)
    assert int(mine.count) == int(ref.count) == STEPS
    for field, ref_field in moments.items():
        assert_close(getattr(mine, field), getattr(ref, ref_field), rtol, field)


@pytest.mark.parametrize(("dtype", "from_params"), RUNS)
@pytest.mark.parametrize("name", list(ALIASES))
def test_alias_matches_optax(name, dtype, from_params):
    case = ALIASES[name]
    params, grads = initial_params(dtype), gradient_sequence(dtype)
    ours, our_state = run_alias(case.ours(), params, grads, from_params)
    theirs, their_state = run_alias(case.theirs(), params, grads, from_params)
    assert_close(ours, theirs, RTOL[dtype], "params")
    assert_moments(our_state, their_state, case.moments, RTOL[dtype])
    moved = max(float(jnp.max(jnp.abs(theirs[k][-1] - params[k]))) for k in SHAPES)
    assert moved > 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SCALERS))
def test_scale_by_matches_optax(name, dtype):
    case = SCALERS[name]
    params, grads = initial_params(dtype), gradient_sequence(dtype)
    ours, our_state = run_scaler(case.ours(), params, grads)
    theirs, their_state = run_scaler(case.theirs(), params, grads)
    assert_close(ours, theirs, RTOL[dtype], "updates")
    assert_moments(our_state, their_state, case.moments, RTOL[dtype])


def test_amsgrad_maximum_binds_on_this_sequence():
    """The corrected maximum must exceed the current v̂ somewhere, or the AMSGrad
    cases above would not tell AMSGrad from Adam."""
    params, grads = initial_params(jnp.float64), gradient_sequence(jnp.float64)
    _, state = run_scaler(optax.scale_by_amsgrad(), params, grads)
    c2 = 1 - 0.999**STEPS
    assert any(bool(jnp.any(state.nu_max[k] > state.nu[k] / c2)) for k in SHAPES)


NOT_OPTAX = {
    "amsgrad-raw": (lambda: adam_jax.amsgrad(LR), lambda: optax.amsgrad(LR)),
    "adamax-eps_outside_max": (
        lambda: adam_jax.adamax(LR, eps=1e-3),
        lambda: optax.adamax(LR, eps=1e-3),
    ),
    "adam-eps_hat": (
        lambda: adam_jax.adam(LR, eps=1e-3, eps_hat=True),
        lambda: optax.adam(LR, eps=1e-3),
    ),
}


@pytest.mark.parametrize("name", list(NOT_OPTAX))
def test_options_that_are_not_optax_differ(name):
    """Negative control: the non-optax forms really change the trajectory."""
    ours, theirs = NOT_OPTAX[name]
    params, grads = initial_params(jnp.float64), gradient_sequence(jnp.float64)
    a, _ = run_alias(ours(), params, grads, False)
    b, _ = run_alias(theirs(), params, grads, False)
    diff = max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in SHAPES)
    # Adamax's two forms differ only by eps·(1 - b2^k) while a decayed maximum
    # holds, so its gap is small; all are far above float64 rounding.
    assert diff > 1e-9
