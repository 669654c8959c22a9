"""What XLA is given and what it makes of the user-style step: structure, not speed.

The step is ``opt.update`` then ``optax.apply_updates`` in one ``jax.jit`` with params
and state donated (the README's recipe). Its compiled form must hold no hidden copies,
move no more bytes than optax's, and its traced form must stay small, since trace,
lowering and compile time grow with the operations staged per leaf.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import adam_jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness.cases import user_step
from harness.hlo import hlo_stats, tree_bytes

LEAF = 4096

# (ours with any extra options, optax with the same math, outputs per leaf: p and the
# state arrays)
PAIRS = {
    "adam": (lambda **kw: adam_jax.adam(1e-3, **kw), lambda: optax.adam(1e-3), 3),
    "amsgrad": (
        lambda **kw: adam_jax.amsgrad(1e-3, max_of="corrected", **kw),
        lambda: optax.amsgrad(1e-3),
        4,
    ),
    "adamax": (
        lambda **kw: adam_jax.adamax(2e-3, eps_in_max=True, **kw),
        lambda: optax.adamax(2e-3),
        3,
    ),
}


def _tree(n_leaves: int, value: float) -> dict[str, jax.Array]:
    return {f"w{i}": jnp.full(LEAF, value + i, jnp.float32) for i in range(n_leaves)}


def _compiled(opt, n_leaves: int):
    params, grads = _tree(n_leaves, 0.5), _tree(n_leaves, -0.25)
    state = opt.init(params)
    step = jax.jit(user_step(opt), donate_argnums=(0, 1))
    compiled = step.lower(params, state, grads).compile()
    budget = tree_bytes(params) + tree_bytes(grads) + tree_bytes(state)
    return hlo_stats(compiled, n_leaves * LEAF, LEAF), budget


@pytest.mark.parametrize("name", PAIRS)
def test_donated_step_has_no_hidden_copies(name):
    ours, theirs, outputs = PAIRS[name]
    stats, budget = _compiled(ours(), 3)
    reference, _ = _compiled(theirs(), 3)
    assert stats["copies"] == 0
    assert stats["temp_bytes"] < 4 * LEAF  # scalars only: no param-sized temporary
    assert stats["peak_bytes"] <= 1.10 * budget
    # One pass reads p, g and each state array once and writes p and the state once:
    # 4 * (2 * outputs + 1) bytes per float32 param. XLA:CPU makes one loop fusion per
    # output array, so the new moments and g are read again (40 B for Adam's floor of
    # 28); a param-sized copy or an extra pass would add 8 B more and exceed 1.5x.
    floor = 4 * (2 * outputs + 1)
    assert stats["hlo_bytes_per_param"] <= 1.5 * floor
    assert stats["hlo_bytes_per_param"] <= reference["hlo_bytes_per_param"]


def _count_equations(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                total += _count_equations(inner)
    return total


def _per_leaf(opt) -> int:
    def staged(n):
        params = _tree(n, 0.5)
        state = opt.init(params)
        return _count_equations(jax.make_jaxpr(user_step(opt))(params, state, params).jaxpr)

    return staged(3) - staged(2)


@pytest.mark.parametrize("name", PAIRS)
def test_few_operations_are_staged_per_leaf(name):
    """Scalars shared by the leaves (decay casts, bias corrections, the zero-decay
    bounds) are built once per dtype, and the overflow guards cost one operation per
    moment: a many-leaf update stages at most 1.15x the operations optax stages per
    leaf, and exactly as many whether its hyperparameters are constants or traced."""
    ours, theirs, _ = PAIRS[name]
    plain = _per_leaf(ours())
    assert plain <= 1.15 * _per_leaf(theirs())
    traced = ours(b1=jnp.asarray(0.9), b2=jnp.asarray(0.999))
    assert _per_leaf(traced) == plain
