"""fit compiles once per structure: rebuilt rules and histories, new numbers, a vmapped sweep.

Compiles are counted from JAX's own log (``jax.log_compiles``); the loss's traces
by its Python calls, which happen only while tracing.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

import adam_jax

TARGET = jnp.asarray([1.0, -2.0, 0.5])


def _counted_loss(calls: list[int]):
    def loss_fn(w):
        calls.append(1)  # runs only while tracing
        return jnp.sum((w - TARGET) ** 2)

    return loss_fn


def _compiles(caplog, fn):
    """``fn()`` and the number of XLA compiles it caused."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        out = fn()
    return out, sum(r.getMessage().startswith("Compiling ") for r in caplog.records)


def _fit(loss_fn, es, history=None, lr=0.05):
    history = adam_jax.History.none() if history is None else history
    return adam_jax.fit(
        loss_fn, jnp.zeros(3), adam_jax.adam(lr), num_steps=200, early_stopping=es, history=history
    )


def _equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_rules_built_alike_have_equal_tree_structures():
    a = adam_jax.early_stopping(5, target=1e-3)
    b = adam_jax.early_stopping(7, 0.1, target=0.5)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    # patience, min_delta, start_step, target (init and update each hold them)
    assert jax.tree.leaves(b.update) == [7, 0.1, 0, 0.5]
    # A flag, the mode or a threshold set where it was None is structure.
    for other in (
        adam_jax.early_stopping(5, target=1e-3, restore_best=False),
        adam_jax.early_stopping(5, target=1e-3, mode="max"),
        adam_jax.early_stopping(5),
        adam_jax.early_stopping(5, target=1e-3, divergence=10.0),
    ):
        assert jax.tree.structure(other) != jax.tree.structure(a)
    assert adam_jax.History.every(2, 10) == adam_jax.History.every(2, 10)
    assert hash(adam_jax.History.last(4)) == hash(adam_jax.History.last(4))


def test_fresh_rules_new_numbers_and_a_rebuilt_history_compile_nothing_new(caplog):
    calls: list[int] = []
    loss_fn = _counted_loss(calls)
    first, n = _compiles(
        caplog,
        lambda: _fit(loss_fn, adam_jax.early_stopping(5, target=1e-3), adam_jax.History.last(8)),
    )
    assert n >= 1 and len(calls) == 1  # the loss is traced once per compile
    again, n = _compiles(
        caplog,
        lambda: _fit(loss_fn, adam_jax.early_stopping(5, target=1e-3), adam_jax.History.last(8)),
    )
    assert n == 0 and _equal(first, again)
    others, n = _compiles(
        caplog,
        lambda: [
            _fit(loss_fn, adam_jax.early_stopping(p, d, target=t), adam_jax.History.last(8))
            for p, d, t in [(0, 0.5, 1e-3), (2, 0.0, 0.5), (50, 0.0, 1e-8)]
        ],
    )
    assert n == 0 and len(calls) == 1
    # The numbers do reach the program: the runs stop differently.
    assert len({(int(r.num_steps), int(r.stop_reason)) for r in [first, *others]}) == 4
    # A new structure compiles again (the counter counts).
    _, n = _compiles(
        caplog, lambda: _fit(loss_fn, adam_jax.early_stopping(5, target=1e-3, restore_best=False))
    )
    assert n >= 1


def test_a_jitted_step_taking_the_rule_compiles_once():
    traces: list[int] = []

    @jax.jit
    def update(es, state, value):
        traces.append(1)
        return es.update(state, value)

    for patience in (1, 2, 3):
        es = adam_jax.early_stopping(patience, restore_best=False)
        state = es.init()
        for value in [3.0, 2.0, 2.5, 2.4, 2.3]:
            state = update(es, state, value)
        assert int(state.step) - 1 == min(patience + 1, 4)
    assert len(traces) == 1


def test_a_vmapped_patience_sweep_is_one_program_with_each_rule_s_result():
    calls: list[int] = []
    loss_fn = _counted_loss(calls)

    def noisy(w):  # a loss that plateaus: patience decides the stop
        return loss_fn(w) + 0.3 * jnp.sin(40.0 * w[0])

    patiences = [1, 3, 8, 20]
    rules = [adam_jax.early_stopping(p, target=1e-2) for p in patiences]
    stacked = jax.tree.map(lambda *x: jnp.asarray(x), *rules)
    swept = jax.jit(jax.vmap(lambda es: _fit(noisy, es, lr=0.1)))(stacked)
    assert len(calls) == 1
    for k, es in enumerate(rules):
        alone = _fit(noisy, es, lr=0.1)
        for field in ("num_steps", "stop_reason", "best_step"):
            assert int(getattr(swept, field)[k]) == int(getattr(alone, field)), field
        # Batched kernels may round differently (see fit's docstring).
        np.testing.assert_allclose(swept.params[k], alone.params, rtol=1e-12, atol=1e-14)
    assert len(calls) == 1  # the unbatched fit compiled once for all four rules, tracing
    # nothing new: the loss's trace at these types is JAX's, cached on the function
    assert len({int(n) for n in swept.num_steps}) > 1


def test_only_numbers_traced_at_the_call_stage_a_range_check():
    """Numbers concrete when ``fit`` is called were range-checked when the optimizer and
    the rule were built, and stage no check in its program; a traced one (a vmapped
    learning rate) stages one, which ``checkify`` reports by name."""
    es = adam_jax.early_stopping(5, target=1e-3)

    def one(lr, b1=0.9):
        loss = lambda w: jnp.sum((w - TARGET) ** 2)
        opt = adam_jax.adam(lr, b1=b1)
        return adam_jax.fit(loss, jnp.zeros(3), opt, num_steps=20, early_stopping=es).params

    lrs = jnp.array([0.1, 0.2])
    assert str(jax.make_jaxpr(jax.vmap(one))(lrs)).count("check[") == 1
    # b1 traced as well: its check too.
    assert str(jax.make_jaxpr(jax.vmap(one))(lrs, jnp.array([0.9, 0.8]))).count("check[") == 2
    err, _ = checkify.checkify(jax.vmap(one))(jnp.array([0.1, -0.1]))
    assert err.get() is not None and "learning_rate must be in [0.0, inf)" in err.get()
    err, _ = checkify.checkify(jax.vmap(one))(lrs)
    assert err.get() is None
