"""Non-finite gradients in ``adam_jax.fit``, end to end.

One minibatch of a regression is bad, in one of two ways: a NaN in its data (the
loss and the gradient are NaN), or an overflow in the backward pass (the loss is
finite, the gradient is inf, as when a mixed-precision backward pass overflows).
Without a guard the NaN reaches the params and Adam's m and v, as in optax and
torch.optim. With ``early_stopping(check_finite=True)`` the run stops at the bad
step with its update not applied; ``optax.apply_if_finite`` skips the bad step and
the run goes on as if that batch had not been there.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adam_jax
from adam_jax import StopReason

N_BATCHES = 6
BAD = 3  # the bad batch; with data cycled, steps 3, 9, 15, ... get it
NUM_STEPS = 20
BAD_STEPS = [s for s in range(NUM_STEPS) if s % N_BATCHES == BAD]
KINDS = ["nan_data", "overflow"]


@jax.custom_vjp
def overflow_in_backward(w, flag):
    """The identity, whose backward pass gives inf wherever ``flag`` is set."""
    return w


def _fwd(w, flag):
    return w, flag


def _bwd(flag, g):
    return jnp.where(flag > 0, jnp.inf, g), jnp.zeros_like(flag)


overflow_in_backward.defvjp(_fwd, _bwd)


def make_data(kind: str | None, seed: int = 0) -> dict:
    """Clean minibatches, with batch BAD spoiled as ``kind`` says (None: clean)."""
    rng = np.random.default_rng(seed)
    d, batch = 3, 8
    w_true = rng.standard_normal(d)
    x = rng.standard_normal((N_BATCHES, batch, d))
    y = x @ w_true + 0.1 * rng.standard_normal((N_BATCHES, batch))
    overflow = np.zeros(N_BATCHES)
    if kind == "nan_data":
        x[BAD, 0, 0] = np.nan
    elif kind == "overflow":
        overflow[BAD] = 1.0
    return {"x": jnp.asarray(x), "y": jnp.asarray(y), "overflow": jnp.asarray(overflow)}


def without_bad_batch(data: dict) -> dict:
    return jax.tree.map(lambda a: jnp.delete(a, BAD, axis=0), data)


X_VAL = jnp.asarray(np.random.default_rng(1).standard_normal((16, 3)))
Y_VAL = X_VAL @ jnp.ones(3)


def train_loss(w, b):
    w = overflow_in_backward(w, b["overflow"])
    return jnp.mean((b["x"] @ w - b["y"]) ** 2)


def with_validation(w, b):
    """Gradients of the training loss; the validation loss, always finite for a
    finite ``w``, is what early stopping monitors."""
    return train_loss(w, b), jnp.mean((X_VAL @ w - Y_VAL) ** 2)


W0 = jnp.zeros(3)


def fit(optimizer, data, num_steps=NUM_STEPS, *, has_aux=False, **kwargs):
    return adam_jax.fit(
        with_validation if has_aux else train_loss,
        W0,
        optimizer,
        num_steps=num_steps,
        data=data,
        has_aux=has_aux,
        **kwargs,
    )


def adam_state(opt_state):
    """The AdamState (count, m, v) inside an optimizer state, however wrapped."""
    states = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, adam_jax.AdamState))
        if isinstance(s, adam_jax.AdamState)
    ]
    assert len(states) == 1
    return states[0]


def assert_bits_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def all_finite(tree) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# No guard: NaN propagates, as in optax and torch.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_guard_nan_reaches_params_m_and_v_as_in_optax(kind):
    data = make_data(kind)
    ours = fit(adam_jax.adam(0.1), data)
    theirs = fit(optax.adam(0.1), data)
    ours_mv = adam_state(ours.opt_state).m, adam_state(ours.opt_state).v
    theirs_mv = theirs.opt_state[0].mu, theirs.opt_state[0].nu
    for result, (m, v) in [(ours, ours_mv), (theirs, theirs_mv)]:
        assert np.isnan(result.params).all()
        assert np.isnan(m).all() and np.isnan(v).all()
        # fit still reports it: the losses turn NaN after the bad step.
        losses = np.asarray(result.losses)
        assert np.isfinite(losses[:BAD]).all()
        assert np.isnan(losses[BAD]) == (kind == "nan_data")
        assert np.isnan(losses[BAD + 1 :]).all()
        assert int(result.num_steps) == NUM_STEPS
        assert int(result.stop_reason) == StopReason.NONE
    np.testing.assert_array_equal(np.isnan(ours.losses), np.isnan(theirs.losses))


@pytest.mark.parametrize("g", [np.nan, np.inf])
def test_one_bad_gradient_spoils_the_step_in_torch_too(g):
    p0 = np.array([0.5, -1.0, 2.0])
    t = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.Adam([t], lr=0.1)
    t.grad = torch.full_like(t, g)
    opt.step()
    torch_state = opt.state[t]

    ours = adam_jax.adam(0.1)
    params = jnp.asarray(p0)
    updates, state = ours.update(jnp.full(3, g), ours.init(params), params)
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(np.isnan(new_params), np.isnan(t.detach().numpy()))
    assert np.isnan(new_params).all()
    m, v = adam_state(state).m, adam_state(state).v
    np.testing.assert_array_equal(m, torch_state["exp_avg"].numpy())
    np.testing.assert_array_equal(v, torch_state["exp_avg_sq"].numpy())


# --------------------------------------------------------------------------
# early_stopping(check_finite=True): stop before the bad update.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("has_aux", [False, True], ids=["loss", "aux_metric"])
@pytest.mark.parametrize("kind", KINDS)
def test_check_finite_stops_at_the_bad_step_before_its_update(kind, has_aux):
    # With "overflow" the monitored value stays finite at the bad step, and with
    # has_aux the monitored validation loss does too: fit's own gradient check
    # is what stops these runs.
    data = make_data(kind)
    opt = adam_jax.adam(0.1)
    result = fit(opt, data, has_aux=has_aux, early_stopping=adam_jax.early_stopping())
    assert int(result.stop_reason) == StopReason.NONFINITE
    assert int(result.num_steps) == BAD
    assert int(result.early_stopping_state.step) == BAD + 1  # it saw the bad step

    # The params and state of the first BAD updates, bit for bit.
    before = fit(opt, data, BAD, has_aux=has_aux)
    assert_bits_equal(result.last_params, before.params)
    assert_bits_equal(result.opt_state, before.opt_state)
    state = adam_state(result.opt_state)
    assert int(state.count) == BAD
    assert all_finite((result.last_params, state.m, state.v, result.best_params))

    # The value measured at the bad step is reported as it was.
    unguarded = fit(opt, data, BAD + 1, has_aux=has_aux)
    assert_bits_equal(result.losses[: BAD + 1], unguarded.losses)
    assert np.isnan(result.losses[BAD]) == (kind == "nan_data" and not has_aux)
    assert np.isnan(result.losses[BAD + 1 :]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_check_finite_false_lets_nan_in_but_keeps_the_best_params(kind):
    # The documented opt-out: the bad step only counts as not improving.
    patience = 5
    result = fit(
        adam_jax.adam(0.1),
        make_data(kind),
        early_stopping=adam_jax.early_stopping(patience, check_finite=False),
    )
    assert int(result.stop_reason) == StopReason.PATIENCE
    assert np.isnan(result.last_params).all()
    assert np.isnan(adam_state(result.opt_state).m).all()
    best = int(result.best_step)
    assert best < BAD  # the bad step did not count as an improvement
    assert int(result.num_steps) == best + patience
    assert all_finite(result.best_params)


def test_check_finite_under_vmap_stops_only_the_problem_with_the_bad_batch():
    datas = jax.tree.map(lambda *xs: jnp.stack(xs), make_data(None), make_data("overflow"))

    def run(data):
        return fit(adam_jax.adam(0.1), data, early_stopping=adam_jax.early_stopping(None))

    batched = jax.jit(jax.vmap(run))(datas)
    np.testing.assert_array_equal(batched.stop_reason, [StopReason.NONE, StopReason.NONFINITE])
    np.testing.assert_array_equal(batched.num_steps, [NUM_STEPS, BAD])
    assert all_finite(batched.params) and all_finite(batched.opt_state)
    clean = run(make_data(None))
    np.testing.assert_allclose(batched.params[0], clean.params, rtol=1e-12)


# --------------------------------------------------------------------------
# optax.apply_if_finite: skip the bad step, carry on.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_apply_if_finite_skips_the_bad_steps(kind):
    data = make_data(kind)
    opt = optax.apply_if_finite(adam_jax.adam(0.1), max_consecutive_errors=2)
    guarded = fit(opt, data)
    # The bad steps leave params and Adam's state as they were, so the run is
    # one that never saw the bad batch: bit for bit, with the same optimizer.
    n_good = NUM_STEPS - len(BAD_STEPS)
    skipping = fit(opt, without_bad_batch(data), n_good)
    assert int(skipping.opt_state.total_notfinite) == 0
    assert_bits_equal(guarded.params, skipping.params)
    assert_bits_equal(guarded.opt_state.inner_state, skipping.opt_state.inner_state)
    assert int(guarded.opt_state.total_notfinite) == len(BAD_STEPS)
    assert int(adam_state(guarded.opt_state).count) == n_good
    assert all_finite(guarded.params)
    good = [s for s in range(NUM_STEPS) if s not in BAD_STEPS]
    assert_bits_equal(guarded.losses[np.array(good)], skipping.losses)
    assert np.isnan(guarded.losses[np.array(BAD_STEPS)]).all() == (kind == "nan_data")
    # And that is plain Adam on the good batches (apply_if_finite's lax.cond
    # compiles the update apart, so only to rounding).
    plain = fit(adam_jax.adam(0.1), without_bad_batch(data), n_good)
    chex.assert_trees_all_close(guarded.params, plain.params, rtol=1e-13, atol=0)
    chex.assert_trees_all_close(guarded.opt_state.inner_state, plain.opt_state, rtol=1e-13)


def test_apply_if_finite_state_is_unchanged_across_the_bad_step():
    data = make_data("overflow")
    opt = optax.apply_if_finite(adam_jax.adam(0.1), max_consecutive_errors=2)
    before = fit(opt, data, BAD)
    after = fit(opt, data, BAD + 1)
    assert_bits_equal(after.params, before.params)
    assert_bits_equal(after.opt_state.inner_state, before.opt_state.inner_state)
    assert not bool(after.opt_state.last_finite) and bool(before.opt_state.last_finite)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_if_finite_with_early_stopping(kind):
    data = make_data(kind)
    opt = optax.apply_if_finite(adam_jax.adam(0.1), max_consecutive_errors=2)
    alone = fit(opt, data)
    # check_finite=False: the bad steps are skipped and the run goes on.
    going_on = fit(opt, data, early_stopping=adam_jax.early_stopping(None, check_finite=False))
    assert int(going_on.stop_reason) == StopReason.NONE
    assert int(going_on.num_steps) == NUM_STEPS
    assert_bits_equal(going_on.last_params, alone.params)
    assert_bits_equal(going_on.opt_state, alone.opt_state)
    assert int(going_on.best_step) not in BAD_STEPS
    # check_finite=True: early stopping sees the bad step first and stops there.
    stopped = fit(opt, data, early_stopping=adam_jax.early_stopping(None))
    assert int(stopped.stop_reason) == StopReason.NONFINITE
    assert int(stopped.num_steps) == BAD
    assert int(stopped.opt_state.total_notfinite) == 0
