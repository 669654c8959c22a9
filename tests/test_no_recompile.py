"""New hyperparameter values are data: fit compiles once for ten learning rates."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

FACTORIES = {
    "adam": lambda lr: adam_jax.adam(lr, b2=0.99),
    "adamw": lambda lr: adam_jax.adamw(lr, weight_decay=1e-3),
    "amsgrad": lambda lr: adam_jax.amsgrad(lr),
    "adamax": lambda lr: adam_jax.adamax(lr),
}


def _traced_loss(traces: list[int]):
    target = jnp.asarray([1.0, -2.0, 0.5])

    def loss_fn(w):
        traces.append(1)  # runs only while tracing
        return jnp.sum((w - target) ** 2)

    return loss_fn


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_fit_compiles_once_for_ten_learning_rates(name):
    traces: list[int] = []
    loss_fn = _traced_loss(traces)
    es = adam_jax.early_stopping(patience=3, target=1e-3)
    results = []
    for lr in np.geomspace(1e-3, 1e-1, 10):
        r = adam_jax.fit(
            loss_fn, jnp.zeros(3), FACTORIES[name](float(lr)), num_steps=200, early_stopping=es
        )
        results.append(r)
    first = len(traces)
    assert first > 0
    # One more call with yet another rate: nothing is traced again.
    adam_jax.fit(loss_fn, jnp.zeros(3), FACTORIES[name](0.5), num_steps=200, early_stopping=es)
    assert len(traces) == first
    # ... and the rates really differ: the runs do not all end alike.
    assert len({int(r.num_steps) for r in results}) > 1


def test_a_schedule_or_a_new_option_compiles_again(caplog):
    """Counted from JAX's compile log: the loss's own trace is JAX's, cached on the
    function and its argument types, so it is not retraced for a new option."""
    loss_fn = _traced_loss([])

    def compiles(optimizer) -> int:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
            adam_jax.fit(loss_fn, jnp.zeros(3), optimizer, num_steps=5)
        return sum(r.getMessage().startswith("Compiling ") for r in caplog.records)

    compiles(adam_jax.adam(0.1))
    assert compiles(adam_jax.adam(0.2)) == 0
    assert compiles(adam_jax.adam(0.1, nesterov=True)) > 0
    assert compiles(adam_jax.adam(optax.constant_schedule(0.1))) > 0


def test_traced_rates_give_the_numbers_of_a_jitted_step():
    """fit, given rates as data, equals a jitted step taking the optimizer as an argument."""
    loss_fn = _traced_loss([])

    @jax.jit
    def step(params, state, opt):
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for lr in (0.01, 0.03):
        opt = adam_jax.adam(lr)
        params, state = jnp.zeros(3), opt.init(jnp.zeros(3))
        for _ in range(20):
            params, state = step(params, state, opt)
        r = adam_jax.fit(loss_fn, jnp.zeros(3), opt, num_steps=20)
        np.testing.assert_allclose(r.params, params, rtol=1e-12, atol=0)
