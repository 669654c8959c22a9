"""In float32, adam_jax's Adam is optax's to the rounding of the bias correction, and a long
non-convex run with either reaches the same loss although their params drift apart.

adam_jax computes ``1 - b2**t`` as ``-expm1(t * log1p(-(1 - b2)))`` (about an ulp in float32);
optax forms the literal ``1 - b2**t``, 1.3e-5 relative off at ``b2 = 0.999``, so its first
step is ``0.9999934 * lr * sign(g)`` where adam_jax's is ``lr * sign(g)`` (docs/numerics.md).
A non-convex run amplifies that difference: after a thousand steps of an MLP the params
differ 10,000 times more than after one. What the user cares about, the loss reached, agrees.

The run is in JAX's default precision (x64 off, as users run it): with x64 on, optax forms
``b2**t`` in float64 and the two agree much more closely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax

LR, STEPS, BATCH = 1e-2, 1000, 100
# The float32 relative rounding of optax's 1 - b2**1 at b2 = 0.999 (1.3e-5, as above),
# with room for the rest of one step's rounding (a few ulps: 1e-6).
FIRST_STEP_RTOL = 2e-5
# Two trajectories that drifted apart settle in nearby minima of the same quality: the
# losses they reach differ by a fraction of their step-to-step noise (measured: 4e-5 relative).
LOSS_RTOL = 0.05


def _data():
    """Ten noisy classes of 64 features, like the digits data set, made here."""
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(0.0, 1.0, (10, 64)).astype(np.float32)
    labels = rng.integers(0, 10, 15 * BATCH).astype(np.int32)
    x = prototypes[labels] + np.float32(0.6) * rng.normal(size=(labels.size, 64)).astype(np.float32)
    return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


def _loss(p, x, y):
    logits = jax.nn.relu(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train(optimizer, x, y, steps):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    f32 = jnp.float32
    params = {
        "w1": jax.random.normal(k1, (64, 32), f32) * f32(0.125),
        "b1": jnp.zeros(32, f32),
        "w2": jax.random.normal(k2, (32, 10), f32) * f32(0.18),
        "b2": jnp.zeros(10, f32),
    }

    def step(carry, i):
        p, s = carry
        xb = jax.lax.dynamic_slice_in_dim(x, (i % 15) * BATCH, BATCH)
        yb = jax.lax.dynamic_slice_in_dim(y, (i % 15) * BATCH, BATCH)
        grads = jax.grad(_loss)(p, xb, yb)
        updates, s = optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    run = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), jnp.arange(steps))[0][0])
    return params, run(params)


@jax.jit
def _max_diff(a, b):
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a[k] - b[k])) for k in a]))


def test_digits_mlp_reaches_optax_loss_though_params_drift():
    with jax.enable_x64(False):
        _check_drift_and_loss()


def _check_drift_and_loss():
    x, y = _data()
    chain = lambda adamw: optax.chain(optax.clip_by_global_norm(1.0), adamw(LR, weight_decay=1e-4))
    start, ours = _train(chain(adam_jax.adamw), x, y, STEPS)
    _, theirs = _train(chain(optax.adamw), x, y, STEPS)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((ours, theirs)))

    # One step: apart by the bias correction's rounding only.
    one = _max_diff(_one(chain(adam_jax.adamw), start, x, y), _one(chain(optax.adamw), start, x, y))
    assert 0 < one <= FIRST_STEP_RTOL * LR, one

    # Many steps: the params drifted apart far beyond rounding ...
    assert _max_diff(ours, theirs) > 1e3 * one
    # ... and the loss reached is the same, after training brought it down 1000-fold.
    l0, l_ours, l_theirs = (float(jax.jit(_loss)(p, x, y)) for p in (start, ours, theirs))
    assert l_ours < 1e-3 * l0
    assert abs(l_ours - l_theirs) <= LOSS_RTOL * l_theirs, (l_ours, l_theirs)


def _one(optimizer, params, x, y):
    """The params after one full-batch step (compiled, as in the runs: one program, not an
    op-by-op compile of every primitive)."""

    @jax.jit
    def one(params, x, y):
        updates, _ = optimizer.update(jax.grad(_loss)(params, x, y), optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    return one(params, x, y)
