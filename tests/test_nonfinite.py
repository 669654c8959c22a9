"""Non-finite values.

Policy: NaN and ±inf gradients are not masked or repaired. They propagate, element by
element, into the update and the optimizer state, exactly where ``torch.optim`` and
optax put them, and elements that saw only finite values are untouched. Hyperparameters
that are concrete numbers are range-checked at construction (NaN is out of range); traced
ones are not inspected, so a NaN there propagates too.

Two guards, both tested here for the optimizer side:

* ``optax.apply_if_finite(opt, max_consecutive_errors)`` skips a step whose updates are
  not all finite: the update is zero and the wrapped state is left exactly as it was.
* ``adam_jax.early_stopping(check_finite=True)`` stops with ``NONFINITE``.
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

BAD = [1.0, np.nan, np.inf, -np.inf, 0.5, 0.0]
GOOD = [0.3, -1.0, 2.0, 0.25, -0.5, 1.0]

# (ours, optax reference, torch reference); None where that library has no equivalent
REFERENCES = {
    "adam": (
        lambda: adam_jax.adam(0.1),
        lambda: optax.adam(0.1),
        lambda p: torch.optim.Adam([p], lr=0.1),
    ),
    "adam_l2": (
        lambda: adam_jax.adam(0.1, weight_decay=0.01),
        lambda: optax.chain(optax.add_decayed_weights(0.01), optax.adam(0.1)),
        lambda p: torch.optim.Adam([p], lr=0.1, weight_decay=0.01),
    ),
    "adamw": (
        lambda: adam_jax.adamw(0.1, weight_decay=0.01),
        lambda: optax.adamw(0.1, weight_decay=0.01),
        lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.01),
    ),
    "nadam": (
        lambda: adam_jax.adam(0.1, nesterov=True),
        lambda: optax.nadam(0.1),
        None,  # torch.optim.NAdam is a different algorithm (momentum decay)
    ),
    "amsgrad": (
        lambda: adam_jax.amsgrad(0.1),
        None,  # optax.amsgrad takes the maximum of corrected values: the next row
        lambda p: torch.optim.Adam([p], lr=0.1, amsgrad=True),
    ),
    "amsgrad_corrected": (
        lambda: adam_jax.amsgrad(0.1, max_of="corrected"),
        lambda: optax.amsgrad(0.1),
        None,
    ),
    "adamax": (
        lambda: adam_jax.adamax(0.1, eps_in_max=True),
        lambda: optax.adamax(0.1),
        lambda p: torch.optim.Adamax([p], lr=0.1),
    ),
}

ALIASES = {
    "adam": lambda: adam_jax.adam(0.1, weight_decay=0.01),
    "adamw": lambda: adam_jax.adamw(0.1),
    "amsgrad": lambda: adam_jax.amsgrad(0.1),
    "adamax": lambda: adam_jax.adamax(0.1),
    "adamaxw": lambda: adam_jax.adamaxw(0.1),
}

SCALERS = {
    "adam": lambda: adam_jax.scale_by_adam(),
    "adam_eps_hat": lambda: adam_jax.scale_by_adam(eps_hat=True),
    "nadam": lambda: adam_jax.scale_by_adam(nesterov=True),
    "adam_no_bias_correction": lambda: adam_jax.scale_by_adam(bias_correction=False),
    "amsgrad": lambda: adam_jax.scale_by_amsgrad(),
    "amsgrad_corrected": lambda: adam_jax.scale_by_amsgrad(max_of="corrected"),
    "amsgrad_eps_hat": lambda: adam_jax.scale_by_amsgrad(eps_hat=True),
    "adamax": lambda: adam_jax.scale_by_adamax(),
    "adamax_eps_in_max": lambda: adam_jax.scale_by_adamax(eps_in_max=True),
}


def _run_jax(opt, grads_seq, p0):
    params = jnp.asarray(p0, jnp.float64)
    state = opt.init(params)
    out = []
    for g in grads_seq:
        updates, state = opt.update(jnp.asarray(g, jnp.float64), state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params))
    return out


def _run_torch(make, grads_seq, p0):
    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = make(p)
    out = []
    for g in grads_seq:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().numpy().copy())
    return out


def _assert_same_nonfinite_pattern(got, want, what):
    for kind in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(kind(got), kind(want), err_msg=f"{what}: {kind.__name__}")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-9, err_msg=what)


@pytest.mark.parametrize("name", REFERENCES)
def test_nonfinite_gradients_propagate_as_in_optax_and_torch(name):
    ours, ref_optax, ref_torch = REFERENCES[name]
    p0 = [0.5, -1.0, 2.0, 0.1, -0.3, 0.7]
    grads = [BAD, GOOD, GOOD]
    got = _run_jax(ours(), grads, p0)
    if ref_optax is not None:
        for step, (g, w) in enumerate(zip(got, _run_jax(ref_optax(), grads, p0), strict=True)):
            _assert_same_nonfinite_pattern(g, w, f"optax, step {step + 1}")
    if ref_torch is not None:
        for step, (g, w) in enumerate(zip(got, _run_torch(ref_torch, grads, p0), strict=True)):
            _assert_same_nonfinite_pattern(g, w, f"torch, step {step + 1}")
    # The non-finite elements stay non-finite (the state remembers them); the others
    # are finite throughout.
    bad = ~np.isfinite(np.asarray(BAD))
    assert np.all(~np.isfinite(got[-1][bad]))
    assert np.all(np.isfinite(got[-1][~bad]))


@pytest.mark.parametrize("name", SCALERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_stays_in_its_element_and_in_the_state(name, bad):
    """One bad element: its update and moments become non-finite and stay so; every other
    element and leaf is bit-identical to a run where that element's gradient was 0."""
    opt = SCALERS[name]()
    params = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros((2, 2), jnp.float64)}
    rng = np.random.default_rng(0)
    seq = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)]
    seq += [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)]
    poisoned = [{"a": seq[0]["a"].at[1].set(bad), "b": seq[0]["b"]}, seq[1]]
    clean = [{"a": seq[0]["a"].at[1].set(0.0), "b": seq[0]["b"]}, seq[1]]
    s_bad, s_clean = opt.init(params), opt.init(params)
    for step, (g_bad, g_clean) in enumerate(zip(poisoned, clean, strict=True)):
        u_bad, s_bad = opt.update(g_bad, s_bad)
        u_clean, s_clean = opt.update(g_clean, s_clean)
        assert not np.isfinite(np.asarray(u_bad["a"][1])), (step, u_bad)
        others = np.array([True, False, True])
        chex.assert_trees_all_equal(u_bad["b"], u_clean["b"])
        np.testing.assert_array_equal(
            np.asarray(u_bad["a"])[others], np.asarray(u_clean["a"])[others]
        )
        moments = [getattr(s_bad, f) for f in ("m", "v", "v_max", "u") if hasattr(s_bad, f)]
        for moment in moments:
            assert not np.all(np.isfinite(np.asarray(moment["a"][1])))
        assert int(s_bad.count) == step + 1


def _alias_run(opt, grads_seq, params):
    update = jax.jit(opt.update)
    state = opt.init(params)
    history = []
    for g in grads_seq:
        before = state
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append((before, updates, state, params))
    return history


def _tree(seed, bad=None):
    rng = np.random.default_rng(seed)
    tree = {
        "w": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.bfloat16),
        "s": jnp.asarray(rng.standard_normal(()), jnp.float64),
    }
    if bad is not None:
        tree["w"] = tree["w"].at[1, 2].set(bad)
    return tree


@pytest.mark.parametrize("name", ALIASES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_apply_if_finite_skips_the_bad_step_and_keeps_the_state(name, bad):
    # Both runs under jit, as in training: apply_if_finite compiles the inner update even
    # when called eagerly, and compiled and op-by-op arithmetic may differ in the last bit.
    opt = ALIASES[name]()
    guarded = optax.apply_if_finite(opt, max_consecutive_errors=3)
    params = _tree(0)
    good = [_tree(1), _tree(2), _tree(3)]
    with_bad = [good[0], _tree(9, bad=bad), good[1], good[2]]
    history = _alias_run(guarded, with_bad, params)

    before, updates, after, _ = history[1]
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(u, np.float64), 0.0)
    chex.assert_trees_all_equal(after.inner_state, before.inner_state)
    assert int(after.notfinite_count) == 1
    assert not bool(after.last_finite)
    assert int(after.total_notfinite) == 1
    _, _, final, guarded_params = history[-1]
    assert int(final.notfinite_count) == 0
    assert int(final.total_notfinite) == 1

    # The guarded run is the unguarded run with the bad step removed, bit for bit.
    reference = _alias_run(opt, good, params)
    chex.assert_trees_all_equal(guarded_params, reference[-1][3])
    chex.assert_trees_all_equal(final.inner_state, reference[-1][2])


@pytest.mark.parametrize("name", ALIASES)
def test_apply_if_finite_lets_the_update_through_after_max_consecutive_errors(name):
    """optax's documented limit: after ``max_consecutive_errors`` skipped steps in a row
    the next non-finite update is applied, so the guard is not a substitute for stopping."""
    guarded = optax.apply_if_finite(ALIASES[name](), max_consecutive_errors=2)
    params = _tree(0)
    history = _alias_run(guarded, [_tree(5 + k, bad=np.nan) for k in range(3)], params)
    for _, _, _, p in history[:2]:
        chex.assert_trees_all_equal(p, params)
    _, _, state, p = history[2]
    assert np.isnan(np.asarray(p["w"][1, 2]))
    assert int(state.notfinite_count) == 3


def test_traced_nan_hyperparameter_propagates_only_in_its_lane():
    params = jnp.array([1.0, -2.0])
    grads = jnp.array([0.5, 0.25])

    def step(lr, b1):
        opt = adam_jax.adam(lr, b1=b1)
        return opt.update(grads, opt.init(params), params)[0]

    lanes = jax.vmap(step)(jnp.array([0.1, np.nan, 0.1]), jnp.array([0.9, 0.9, np.nan]))
    assert np.all(np.isnan(np.asarray(lanes[1:])))
    # Batched and unbatched programs may round a scalar operation differently.
    np.testing.assert_array_max_ulp(np.asarray(lanes[0]), np.asarray(step(0.1, 0.9)), maxulp=2)
    with pytest.raises(ValueError, match="learning_rate"):
        adam_jax.adam(float("nan"))
    with pytest.raises(ValueError, match="b1"):
        adam_jax.adam(b1=float("nan"))


# 1e-46 is a valid decay ([0, 1)) that rounds to 0 in float32, the compute dtype here.
@pytest.mark.parametrize("decay", [0.0, 1e-46])
@pytest.mark.parametrize("name", ["adam", "amsgrad", "adamax"])
@pytest.mark.parametrize("jit", [False, True])
def test_a_decay_that_is_zero_in_the_compute_dtype_forgets_an_overflowed_moment(name, decay, jit):
    """With b1 = b2 = 0 nothing is remembered: an inf moment (from an inf gradient, or
    |g|² overflowing float32) must not turn the next finite step into 0·inf = NaN."""
    opt = getattr(adam_jax, name)(0.1, b1=decay, b2=decay)
    update = jax.jit(opt.update) if jit else opt.update
    params = jnp.zeros(3, jnp.float32)

    def moments(state):
        inner = next(s for s in state if hasattr(s, "m"))
        return [np.asarray(x) for x in inner[1:]]

    state = opt.init(params)
    _, state = update(jnp.array([np.inf, 3e19, 1.0], jnp.float32), state, params)
    assert any(np.isinf(x).any() for x in moments(state))
    u, state = update(jnp.array([1.0, -2.0, 0.5], jnp.float32), state, params)
    assert np.isfinite(np.asarray(u)).all(), u
    m = moments(state)[0]
    np.testing.assert_array_equal(m, [1.0, -2.0, 0.5])  # b1 = 0: m is the gradient
