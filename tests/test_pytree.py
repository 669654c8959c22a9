"""Optimizers are pytrees: hyperparameters are leaves, options are static.

A jitted step that takes the optimizer as an argument compiles once for any number
of hyperparameter values; a stack of optimizers can be vmapped over; a traced Python
float gives the same numbers, bit for bit, as the constant.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import adam_jax

OPTIMIZERS = {
    "scale_by_adam": lambda lr=None, **kw: adam_jax.scale_by_adam(**kw),
    "scale_by_amsgrad": lambda lr=None, **kw: adam_jax.scale_by_amsgrad(**kw),
    "scale_by_adamax": lambda lr=None, **kw: adam_jax.scale_by_adamax(**kw),
    "adam": lambda lr=1e-2, **kw: adam_jax.adam(lr, **kw),
    "adamw": lambda lr=1e-2, **kw: adam_jax.adamw(lr, **kw),
    "amsgrad": lambda lr=1e-2, **kw: adam_jax.amsgrad(lr, **kw),
    "adamax": lambda lr=1e-2, **kw: adam_jax.adamax(lr, **kw),
    "adamaxw": lambda lr=1e-2, **kw: adam_jax.adamaxw(lr, **kw),
    "scale_by_nadam": lambda lr=None, **kw: adam_jax.scale_by_nadam(**kw),
    "nadam": lambda lr=1e-2, **kw: adam_jax.nadam(lr, **kw),
    "nadamw": lambda lr=1e-2, **kw: adam_jax.nadamw(lr, **kw),
    "scale_by_radam": lambda lr=None, **kw: adam_jax.scale_by_radam(**kw),
    "radam": lambda lr=1e-2, **kw: adam_jax.radam(lr, **kw),
    "radamw": lambda lr=1e-2, **kw: adam_jax.radamw(lr, **kw),
    "stable_adamw": lambda lr=1e-2, **kw: adam_jax.stable_adamw(lr, **kw),
    "ademamix": lambda lr=1e-2, **kw: adam_jax.ademamix(lr, b3_warmup=2, alpha_warmup=2, **kw),
    "adamw_cautious": lambda lr=1e-2, **kw: adam_jax.adamw(lr, cautious=True, **kw),
}
ALIASES = [
    "adam",
    "adamw",
    "amsgrad",
    "adamax",
    "adamaxw",
    "nadam",
    "nadamw",
    "radam",
    "radamw",
    "stable_adamw",
    "ademamix",
    "adamw_cautious",
]


def _params(dtype=jnp.float32):
    return {"w": jnp.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(2, 3), "b": jnp.ones(3, dtype)}


def _grads(params):
    return jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, params)


def _step(params, state, opt):
    updates, state = opt.update(_grads(params), state, params)
    return optax.apply_updates(params, updates), state


def _run(opt, params, steps=3, step=_step):
    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state, opt)
    return params, state


@pytest.mark.parametrize(
    ("name", "hyper"),
    [(n, "b2") for n in OPTIMIZERS] + [(n, "learning_rate") for n in ALIASES],
)
def test_ten_values_compile_once(name, hyper):
    values = np.linspace(0.9, 0.999, 10) if hyper == "b2" else np.geomspace(1e-4, 1e-1, 10)
    params = _params()
    step = jax.jit(chex.assert_max_traces(_step, n=1))
    # RAdam's first steps are momentum steps, which do not use b2: rho_t > 5 from step 6.
    steps = 6 if "radam" in name else 3
    finals = []
    for v in values:
        opt = OPTIMIZERS[name](b2=float(v)) if hyper == "b2" else OPTIMIZERS[name](float(v))
        finals.append(_run(opt, params, steps=steps, step=step)[0]["w"])
    chex.clear_trace_counter()
    assert len({np.asarray(f).tobytes() for f in finals}) == 10  # the values were used


@pytest.mark.parametrize("name", ALIASES)
def test_static_options_retrace_and_equal_configs_have_equal_treedefs(name):
    make = OPTIMIZERS[name]
    assert jax.tree.structure(make(0.1, b1=0.8)) == jax.tree.structure(make(0.3, b1=0.5))
    assert jax.tree.structure(make(0.1)) != jax.tree.structure(make(0.1, mu_dtype=jnp.bfloat16))
    assert jax.tree.structure(make(0.1)) != jax.tree.structure(make(0.1, maximize=True))
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    assert jax.tree.structure(make(schedule)) == jax.tree.structure(make(schedule))
    assert jax.tree.structure(make(schedule)) != jax.tree.structure(make(0.1))

    traces = []

    @jax.jit
    def step(params, state, opt):
        traces.append(1)
        return _step(params, state, opt)

    params = _params()
    for opt in [make(0.1), make(0.2), make(schedule), make(0.1, maximize=True)]:
        _run(opt, params, steps=1, step=step)
    assert len(traces) == 3  # 0.2 reuses 0.1's trace; the schedule and the flag do not


def test_mask_and_schedule_configs_compare_by_value():
    mask = {"w": True, "b": False}
    a = adam_jax.adamw(0.1, mask=mask)
    b = adam_jax.adamw(0.2, mask={"w": True, "b": False})
    assert jax.tree.structure(a) == jax.tree.structure(b)
    other = adam_jax.adamw(0.1, mask={"w": False, "b": False})
    assert jax.tree.structure(a) != jax.tree.structure(other)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_vmap_over_a_stack_of_optimizers_equals_each_run(name):
    lrs, b2s = [1e-3, 1e-2, 1e-1], [0.9, 0.99, 0.999]
    make = OPTIMIZERS[name]
    opts = [make(lr, b2=b2) for lr, b2 in zip(lrs, b2s, strict=True)]
    stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *opts)
    params = _params(jnp.float64)

    def run(opt):
        return _run(opt, params)[0]

    batched = jax.jit(jax.vmap(run))(stacked)
    for i, opt in enumerate(opts):
        # Stacking turned the Python floats into float64 arrays: the same values.
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], batched), run(opt), rtol=1e-14, atol=0
        )


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_traced_python_floats_give_the_untraced_numbers(name, x64):
    """Traced as weak-typed leaves, Python floats give the eager (untraced) results to
    rounding: the same casts in the same dtypes, and no division by a scalar that XLA
    would rewrite in one program and not another; eager and jitted programs still
    fuse (and so round) a few operations differently. A jit that closes over them
    also folds them as constants."""
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        opt = OPTIMIZERS[name](0.05, b1=0.8, b2=0.995, eps=1e-6)
        params = _params(dtype)
        grads = [jax.tree.map(lambda p, k=k: jnp.cos(3 * p + k), params) for k in range(4)]

        def run(step):
            p, s = params, opt.init(params)
            for g in grads:
                u, s = step(g, s, p, opt)
                p = optax.apply_updates(p, u)
            return p

        def update(g, s, p, o):
            return o.update(g, s, p)

        traced = run(jax.jit(update))
        eager = run(update)
        constant = run(jax.jit(lambda g, s, p, o: opt.update(g, s, p)))
        for a, b, c in zip(*map(jax.tree.leaves, (traced, eager, constant)), strict=True):
            assert a.dtype == b.dtype == c.dtype == dtype
            for other in (b, c):  # a few ulp of each step's size
                np.testing.assert_allclose(a, other, rtol=0, atol=64 * np.finfo(dtype).eps)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_traced_hyperparameters_match_optax_adam(x64):
    with jax.enable_x64(x64):
        params = _params(jnp.float64 if x64 else jnp.float32)
        ours, _ = _run(adam_jax.adam(0.05, b1=0.8), params, step=jax.jit(_step))
        theirs, _ = _run(optax.adam(0.05, b1=0.8), params)
        # optax's float32 bias correction is off by ~1e-5 relative (see scale_by_adam).
        chex.assert_trees_all_close(ours, theirs, rtol=1e-12 if x64 else 2e-5)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda: optax.inject_hyperparams(adam_jax.adam)(learning_rate=0.1),
        lambda: optax.apply_if_finite(adam_jax.adam(0.1), 3),
        lambda: optax.MultiSteps(adam_jax.adam(0.1), 2).gradient_transformation(),
        lambda: optax.masked(adam_jax.adamw(0.1), {"w": True, "b": False}),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), adam_jax.amsgrad(0.1)),
    ],
    ids=["inject_hyperparams", "apply_if_finite", "MultiSteps", "masked", "chain"],
)
def test_optax_wrappers_take_the_pytree_optimizers(wrap):
    params, opt = _params(), wrap()
    step = jax.jit(lambda p, s: _step(p, s, opt))
    out, state = params, opt.init(params)
    for _ in range(3):
        out, state = step(out, state)
    chex.assert_tree_all_finite(out)
    assert not np.allclose(np.asarray(out["w"]), np.asarray(params["w"]))


# --------------------------------------------------------------------------
# Rough edges.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_numpy_float64_input_with_x64_off_gives_no_warning(name):
    params = {"w": np.linspace(-1, 1, 4), "b": np.ones(2)}
    grads = {"w": np.full(4, 0.5), "b": np.full(2, -0.5)}
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = OPTIMIZERS[name](0.1)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        updates, state = opt.update(grads, state, params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((updates, state)) if x.ndim)


def test_bfloat16_b2_out_of_range_names_hyperparam_dtype():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    opt = optax.inject_hyperparams(adam_jax.adam)(learning_rate=0.1, b2=0.999)
    with pytest.raises(ValueError, match=r"b2=1\.0.*hyperparam_dtype=jnp\.float32"):
        opt.init(params)
    fixed = optax.inject_hyperparams(adam_jax.adam, hyperparam_dtype=jnp.float32)(
        learning_rate=0.1, b2=0.999
    )
    fixed.update(params, fixed.init(params), params)


@pytest.mark.parametrize("bad", [2.5, 3.0, True, -1])
def test_patience_must_be_an_integer(bad):
    with pytest.raises((TypeError, ValueError), match=r"patience must be an integer >= 0"):
        adam_jax.early_stopping(patience=bad)
    adam_jax.early_stopping(patience=np.int64(3))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_swapped_state_and_grads_are_named(name):
    opt = OPTIMIZERS[name](0.1)
    params = _params()
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"optimizer state from init.*swap"):
        opt.update(state, params, params)


# --------------------------------------------------------------------------
# Traced hyperparameters out of range: checked under checkify only.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hyper", "bad"),
    [
        ("adam", "b1", 1.5),
        ("amsgrad", "b2", -0.5),
        ("adamax", "b1", 1.0),
        ("adamw", "eps", -1e-8),
        ("adam", "learning_rate", -0.1),
        ("adamw", "weight_decay", -0.1),
        ("nadam", "momentum_decay", -1.0),
        ("nadamw", "b1", 1.0),
        ("radam", "threshold", -1.0),
        ("radamw", "eps_root", -1e-8),
        ("stable_adamw", "weight_decay", -0.1),
        ("ademamix", "b3", 1.5),
        ("ademamix", "alpha", -1.0),
        ("adamw_cautious", "b1", 1.0),
    ],
)
def test_checkify_names_a_traced_out_of_range_hyperparameter(name, hyper, bad):
    params = _params()

    def final(value):
        make = OPTIMIZERS[name]
        opt = make(lr=value) if hyper == "learning_rate" else make(**{hyper: value})
        return _run(opt, params, steps=1)[0]

    err, _ = jax.jit(checkify.checkify(final))(jnp.float32(bad))
    message = err.get()
    assert message is not None and f"{hyper} must be in" in message
    assert f"got {hyper}={np.float32(bad)}" in message, message
    good, _ = jax.jit(checkify.checkify(final))(jnp.float32(0.5 if "b" in hyper else 1e-3))
    assert good.get() is None
    # Without checkify nothing is checked: vmap over a bad value runs (and gives NaN or junk).
    out = jax.jit(jax.vmap(final))(jnp.asarray([bad, 0.5], jnp.float32))
    assert out["w"].shape == (2, 2, 3)
