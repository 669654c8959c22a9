"""Behaviour of the transformations: dtypes, trees, jit/vmap, retracing, optax composition."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

SCALERS = {
    "adam": lambda **kw: adam_jax.scale_by_adam(**kw),
    "adam_eps_hat": lambda **kw: adam_jax.scale_by_adam(eps_hat=True, **kw),
    "nadam": lambda **kw: adam_jax.scale_by_adam(nesterov=True, **kw),
    "adam_nobc": lambda **kw: adam_jax.scale_by_adam(bias_correction=False, **kw),
    "amsgrad": lambda **kw: adam_jax.scale_by_amsgrad(**kw),
    "amsgrad_corrected": lambda **kw: adam_jax.scale_by_amsgrad(max_of="corrected", **kw),
    "amsgrad_eps_hat": lambda **kw: adam_jax.scale_by_amsgrad(eps_hat=True, **kw),
    "adamax": lambda **kw: adam_jax.scale_by_adamax(**kw),
    "adamax_eps_in_max": lambda **kw: adam_jax.scale_by_adamax(eps_in_max=True, **kw),
}

ALIASES = {
    "adam": adam_jax.adam,
    "adamw": adam_jax.adamw,
    "amsgrad": adam_jax.amsgrad,
    "adamax": adam_jax.adamax,
    "adamaxw": adam_jax.adamaxw,
}


def _params(dtype):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((3, 4)), dtype),
        "b": [jnp.asarray(rng.standard_normal(4), dtype), jnp.asarray(0.5, dtype)],
    }


def _grads(params, scale=1.0, seed=1):
    rng = np.random.default_rng(seed)

    def leaf(p):
        g = rng.standard_normal(p.shape) * scale
        if jnp.iscomplexobj(p):
            g = g + 1j * rng.standard_normal(p.shape) * scale
        return jnp.asarray(g, p.dtype)

    return jax.tree.map(leaf, params)


def _moment_fields(state):
    return {k: getattr(state, k) for k in ("m", "v", "v_max", "u") if hasattr(state, k)}


@pytest.mark.parametrize("name", SCALERS)
def test_dtype_matrix_state_and_updates_keep_their_dtypes(name, dtype):
    opt = SCALERS[name]()
    params = _params(dtype)
    state = opt.init(params)
    real = jnp.finfo(dtype).dtype
    for field, tree in _moment_fields(state).items():
        want = dtype if field == "m" else real
        if field in ("v", "v_max") and dtype == jnp.float16:
            want = jnp.dtype(jnp.float32)  # float16 squares underflow: see scale_by_adam
        for leaf in jax.tree.leaves(tree):
            assert leaf.dtype == want, (field, leaf.dtype, want)
    init_dtypes = jax.tree.map(lambda x: x.dtype, state)
    step = jax.jit(opt.update)
    for k in range(3):
        updates, state = step(_grads(params, seed=k), state)
        chex.assert_trees_all_equal_dtypes(updates, params)
        assert jax.tree.map(lambda x: x.dtype, state) == init_dtypes
        chex.assert_tree_all_finite(updates)
    assert int(state.count) == 3


@pytest.mark.parametrize("name", SCALERS)
def test_low_precision_matches_float32_run_to_storage_precision(name, dtype):
    """bf16/f16/complex64 runs are the float32 computation, rounded at storage."""
    if dtype == jnp.float64:
        ref_dtype = jnp.float64
    else:
        ref_dtype = jnp.complex128 if jnp.iscomplexobj(jnp.zeros((), dtype)) else jnp.float64
    opt = SCALERS[name]()
    params = _params(dtype)
    params_ref = jax.tree.map(lambda p: p.astype(ref_dtype), params)
    s, s_ref = opt.init(params), opt.init(params_ref)
    for k in range(4):
        g = _grads(params, seed=k)
        u, s = opt.update(g, s)
        u_ref, s_ref = opt.update(jax.tree.map(lambda x: x.astype(ref_dtype), g), s_ref)
    tol = {"bfloat16": 5e-2, "float16": 5e-3}.get(jnp.dtype(dtype).name, 1e-5)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
        np.testing.assert_allclose(
            np.asarray(a.astype(ref_dtype)), np.asarray(b), rtol=tol, atol=tol
        )


@pytest.mark.parametrize("name", ["adam", "amsgrad", "amsgrad_corrected", "adamax", "nadam"])
def test_float16_zero_gradient_is_not_nan(name):
    opt = SCALERS[name]()
    params = jnp.zeros(5, jnp.float16)
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update(jnp.zeros(5, jnp.float16), state)
    assert updates.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(updates, np.float32), 0.0)
    # The same in optax gives NaN (optax #1754): the reason for the float32 compute.
    if name == "adam":
        o_updates, _ = optax.scale_by_adam().update(
            jnp.zeros(5, jnp.float16), optax.scale_by_adam().init(params)
        )
        assert np.isnan(np.asarray(o_updates, np.float32)).all()


def test_float16_small_gradients_give_unit_steps():
    """A constant gradient of 1e-3 in float16: Adam's step is ~1, as in float32."""
    opt = adam_jax.scale_by_adam()
    state = opt.init(jnp.zeros(1, jnp.float16))
    assert state.v.dtype == jnp.float32
    for _ in range(50):
        u, state = opt.update(jnp.full(1, 1e-3, jnp.float16), state)
    np.testing.assert_allclose(float(u[0]), 1.0, rtol=2e-2)
    forced = adam_jax.scale_by_adam(nu_dtype=jnp.float16)
    assert forced.init(jnp.zeros(1, jnp.float16)).v.dtype == jnp.float16


def test_float64_bias_correction_is_float64():
    opt = adam_jax.scale_by_adam()
    p = jnp.zeros(1, jnp.float64)
    state = opt.init(p)
    g = jnp.array([1e-3], jnp.float64)
    _, state = opt.update(g, state)
    u, state = opt.update(g, state)
    # Step 2 with a constant gradient: m̂ = g and v̂ = g² exactly, so u = g/(|g|+eps).
    b1, b2 = 0.9, 0.999
    m = (1 - b1) * 1e-3 * (1 + b1)
    v = (1 - b2) * 1e-6 * (1 + b2)
    expected = (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + 1e-8)
    assert u.dtype == jnp.float64
    # float32 anywhere in the chain would show up as an error of ~1e-7.
    assert abs(float(u[0]) - expected) < 1e-12


def test_complex_uses_conj_g_times_g():
    opt = adam_jax.scale_by_adam(eps=0.0)
    p = jnp.zeros(2, jnp.complex128)
    state = opt.init(p)
    g = jnp.array([3 + 4j, 1j], jnp.complex128)
    u, state = opt.update(g, state)
    assert state.v.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(state.v), 0.001 * np.array([25.0, 1.0]), rtol=1e-14)
    # Step 1: m̂ = g and v̂ = |g|², so u = g/|g|.
    np.testing.assert_allclose(np.asarray(u), np.array([0.6 + 0.8j, 1j]), rtol=1e-12)


def test_count_saturates_at_int32_max():
    opt = adam_jax.scale_by_adam()
    state = opt.init(jnp.zeros(2))
    state = state._replace(count=jnp.asarray(np.iinfo(np.int32).max - 1, jnp.int32))
    for _ in range(3):
        u, state = opt.update(jnp.ones(2), state)
        assert state.count.dtype == jnp.int32
        chex.assert_tree_all_finite(u)
    assert int(state.count) == np.iinfo(np.int32).max


def test_none_leaves_and_masked():
    params = {"a": jnp.ones(3), "frozen": None, "b": jnp.ones(2)}
    for name in SCALERS:
        opt = SCALERS[name]()
        state = opt.init(params)
        assert state.m["frozen"] is None
        grads = {"a": jnp.ones(3), "frozen": None, "b": -jnp.ones(2)}
        u, state = opt.update(grads, state)
        assert u["frozen"] is None
        chex.assert_tree_all_finite((u["a"], u["b"]))

    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    opt = optax.masked(adam_jax.adam(0.1), {"a": True, "b": False})
    state = opt.init(params)
    u, state = opt.update({"a": jnp.ones(3), "b": jnp.ones(2)}, state, params)
    np.testing.assert_allclose(np.asarray(u["a"]), -0.1, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(u["b"]), 1.0)  # masked out: passed through


# --------------------------------------------------------------------------
# jit, vmap, retracing, traced hyperparameters.
# --------------------------------------------------------------------------


def _run(opt, params, steps=5):
    state = opt.init(params)
    for k in range(steps):
        g = jax.tree.map(lambda p, k=k: jnp.sin(p * (k + 1)) + 0.1 * k, params)
        u, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("name", ALIASES)
def test_jit_equals_eager(name):
    opt = ALIASES[name](learning_rate=0.05)
    params = _params(jnp.float64)
    eager = _run(opt, params)
    state = opt.init(params)
    step = jax.jit(opt.update)
    p = params
    for k in range(5):
        g = jax.tree.map(lambda q, k=k: jnp.sin(q * (k + 1)) + 0.1 * k, p)
        u, state = step(g, state, p)
        p = optax.apply_updates(p, u)
    chex.assert_trees_all_close((p, state), eager, rtol=1e-13, atol=1e-15)


HYPERS = {
    "adam": ("learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"),
    "adamw": ("learning_rate", "b1", "b2", "eps", "weight_decay"),
    "amsgrad": ("learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"),
    "adamax": ("learning_rate", "b1", "b2", "eps", "weight_decay"),
    "adamaxw": ("learning_rate", "b1", "b2", "eps", "weight_decay"),
}
VALUES = {
    "learning_rate": [0.1, 0.03, 0.01, 0.003],
    "b1": [0.9, 0.8, 0.5, 0.0],
    "b2": [0.999, 0.99, 0.9, 0.5],
    "eps": [1e-8, 1e-3, 1e-1, 0.0],
    "eps_root": [0.0, 1e-8, 1e-2, 1.0],
    "weight_decay": [0.0, 1e-2, 1e-1, 0.5],
}


@pytest.mark.parametrize("name", ALIASES)
def test_vmap_over_hyperparameters_equals_separate_runs(name):
    """Per-problem hyperparameters, built inside vmap, equal one run per setting."""
    keys = HYPERS[name]
    params = _params(jnp.float64)
    hp = {k: jnp.asarray(VALUES[k], jnp.float64) for k in keys}

    def run_one(hp_one):
        return _run(ALIASES[name](**hp_one), params)[0]

    batched = jax.jit(jax.vmap(run_one))(hp)
    for i in range(4):
        single = run_one({k: VALUES[k][i] for k in keys})
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], batched), single, rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("name", ALIASES)
def test_new_hyperparameter_values_do_not_retrace(name):
    keys = HYPERS[name]
    params = _params(jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train(hp_one, params):
        return _run(ALIASES[name](**hp_one), params, steps=2)[0]

    outs = []
    for i in range(4):
        hp = {k: jnp.asarray(VALUES[k][i], jnp.float32) for k in keys}
        outs.append(train(hp, params))
    assert not np.allclose(np.asarray(outs[0]["w"]), np.asarray(outs[1]["w"]))
    chex.clear_trace_counter()


def test_traced_hyperparameters_are_not_checked_with_python_if():
    """Out-of-range values cannot be checked under jit; they must not crash the trace."""

    @jax.jit
    def f(b1, wd):
        opt = adam_jax.adam(0.1, b1=b1, weight_decay=wd)
        return _run(opt, jnp.ones(2), steps=1)[0]

    chex.assert_tree_all_finite(f(jnp.asarray(0.5), jnp.asarray(0.0)))


# --------------------------------------------------------------------------
# optax composition.
# --------------------------------------------------------------------------


def _loss(p):
    return sum(jnp.sum(jnp.cos(x) + 0.5 * x**2) for x in jax.tree.leaves(p))


def test_chain_after_clip_by_global_norm_equals_manual_clipping():
    params = _params(jnp.float64)
    chained = optax.chain(optax.clip_by_global_norm(0.5), adam_jax.adam(0.1))
    state = chained.init(params)
    manual = adam_jax.adam(0.1)
    mstate = manual.init(params)
    p1 = p2 = params
    for _ in range(5):
        g = jax.grad(_loss)(p1)
        u1, state = chained.update(g, state, p1)
        factor = jnp.minimum(1.0, 0.5 / optax.tree.norm(g))
        g2 = jax.tree.map(lambda x, f=factor: x * f, jax.grad(_loss)(p2))
        u2, mstate = manual.update(g2, mstate, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    chex.assert_trees_all_close(p1, p2, rtol=1e-12)


def test_inject_hyperparams_equals_plain_and_can_change_lr():
    params = _params(jnp.float64)
    plain = adam_jax.amsgrad(0.05, b1=0.8)
    injected = optax.inject_hyperparams(adam_jax.amsgrad)(learning_rate=0.05, b1=0.8)
    p_plain, _ = _run(plain, params)
    p_inj, _ = _run(injected, params)
    # inject_hyperparams stores the values as float32 arrays, hence the tolerance.
    chex.assert_trees_all_close(p_inj, p_plain, rtol=1e-6)
    state = injected.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    g = jax.grad(_loss)(params)
    u, _ = jax.jit(injected.update)(g, state, params)
    for leaf in jax.tree.leaves(u):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_multisteps_accumulates_then_applies():
    params = {"w": jnp.ones(3, jnp.float64)}
    opt = optax.MultiSteps(adam_jax.adam(0.1), every_k_schedule=2)
    state = opt.init(params)
    g1, g2 = {"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([3.0, 2.0, 1.0])}
    u, state = opt.update(g1, state, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
    u, state = opt.update(g2, state, params)
    ref = adam_jax.adam(0.1)
    ref_u, _ = ref.update({"w": jnp.array([2.0, 2.0, 2.0])}, ref.init(params), params)
    chex.assert_trees_all_close(u, ref_u, rtol=1e-12)


def test_apply_if_finite_skips_bad_step_and_keeps_state():
    params = {"w": jnp.ones(3, jnp.float64)}
    opt = optax.apply_if_finite(adam_jax.adamax(0.1), max_consecutive_errors=3)
    state = opt.init(params)
    u, state = opt.update({"w": jnp.array([1.0, -1.0, 2.0])}, state, params)
    good_inner = state.inner_state
    u, state = opt.update({"w": jnp.array([jnp.nan, 1.0, 1.0])}, state, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
    chex.assert_trees_all_equal(state.inner_state, good_inner)
    assert int(state.notfinite_count) == 1


def test_donated_jit_step_runs_and_matches():
    opt = adam_jax.adam(0.1)
    params = _params(jnp.float64)
    ref_p, ref_s = _run(opt, params, steps=3)

    @jax.jit
    def step(p, s, k):
        g = jax.tree.map(lambda q: jnp.sin(q * (k + 1)) + 0.1 * k, p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    donated = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    s = opt.init(p)
    for k in range(3):
        p, s = donated(p, s, jnp.asarray(float(k)))
    chex.assert_trees_all_close((p, s), (ref_p, ref_s), rtol=1e-13)


def test_schedule_learning_rate():
    sched = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    opt = adam_jax.adam(sched)
    params = {"w": jnp.ones(1, jnp.float64)}
    state = opt.init(params)
    sizes = []
    for _ in range(5):
        u, state = opt.update({"w": jnp.ones(1)}, state, params)
        sizes.append(-float(u["w"][0]))
    np.testing.assert_allclose(sizes, [0.1, 0.075, 0.05, 0.025, 0.0], rtol=1e-6, atol=1e-12)


def test_maximize_ascends():
    opt = adam_jax.adam(0.1, maximize=True)
    p = jnp.array([1.0])
    u, _ = opt.update(jnp.array([2.0]), opt.init(p), p)
    assert float(u[0]) > 0


def test_aliases_return_extra_args_transformations():
    for name, alias in ALIASES.items():
        assert isinstance(alias(), optax.GradientTransformationExtraArgs), name


def test_bfloat16_hyperparameters_are_accepted():
    opt = adam_jax.scale_by_adam(b1=jnp.asarray(0.9, jnp.bfloat16))
    u, _ = opt.update(jnp.ones(2), opt.init(jnp.zeros(2)))
    chex.assert_tree_all_finite(u)
    adam_jax.adam(jnp.asarray(0.1, jnp.bfloat16))


def test_adamw_mask_may_be_a_prefix_tree_as_in_optax():
    params = {"enc": {"w": jnp.ones(3), "b": jnp.ones(3)}, "head": jnp.ones(2)}
    grads = jax.tree.map(jnp.ones_like, params)
    mask = {"enc": False, "head": True}
    ours = adam_jax.adamw(0.1, weight_decay=0.5, mask=mask)
    ref = optax.adamw(0.1, weight_decay=0.5, mask=mask)
    u, _ = ours.update(grads, ours.init(params), params)
    u_ref, _ = ref.update(grads, ref.init(params), params)
    chex.assert_trees_all_close(u, u_ref, rtol=1e-5)
    # Inside optax.masked the inner params carry MaskedNodes where masked out.
    outer = {"enc": True, "head": False}
    wrapped = optax.masked(adam_jax.adamw(0.1, mask=outer), outer)
    u, _ = wrapped.update(grads, wrapped.init(params), params)
    chex.assert_tree_all_finite(u)


def test_real_mu_dtype_for_complex_params_is_named_at_init():
    with pytest.raises(TypeError, match=r"mu_dtype=float32 is real, but params\['z'\]"):
        adam_jax.scale_by_adam(mu_dtype=jnp.float32).init({"z": jnp.zeros(2, jnp.complex64)})


@pytest.mark.parametrize("name", ["adam", "amsgrad", "adamax"])
def test_gradient_with_respect_to_b1_at_zero_matches_optax(name):
    """Meta-gradients: the bias correction and the zero-decay guard keep d/db1 exact at 0."""
    ref = {"adam": optax.adam, "amsgrad": optax.amsgrad, "adamax": optax.adamax}[name]
    ours = {"adam": adam_jax.adam, "amsgrad": adam_jax.amsgrad, "adamax": adam_jax.adamax}[name]
    extra = {"adamax": {"eps_in_max": True}, "amsgrad": {"max_of": "corrected"}}.get(name, {})

    def final_loss(b1, make, **kw):
        opt = make(0.1, b1=b1, **kw)
        p = jnp.array([1.0, -2.0])
        s = opt.init(p)
        for _ in range(3):
            g = jax.grad(lambda q: jnp.sum(q**2))(p)
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
        return jnp.sum(p**2)

    got = jax.grad(lambda b: final_loss(b, ours, **extra))(0.0)
    want = jax.grad(lambda b: final_loss(b, ref))(0.0)
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_adamax_decoupled_weight_decay_is_adamaxw():
    """``adamax(decoupled_weight_decay=True)`` and ``adamaxw`` are one definition (the
    AdamW layout around ``scale_by_adamax``): the same numbers, bit for bit; the
    coupled form differs."""
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)}
    runs = {
        "decoupled": adam_jax.adamax(0.1, weight_decay=0.3, decoupled_weight_decay=True),
        "adamaxw": adam_jax.adamaxw(0.1, weight_decay=0.3),
        "coupled": adam_jax.adamax(0.1, weight_decay=0.3),
    }
    out = {}
    for name, opt in runs.items():
        p, state = params, opt.init(params)
        for _ in range(5):
            grads = jax.tree.map(lambda x: x**3 - 0.5, p)
            updates, state = opt.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        out[name] = p
    chex.assert_trees_all_equal(out["decoupled"], out["adamaxw"])
    assert not np.allclose(out["coupled"]["w"], out["adamaxw"]["w"])
