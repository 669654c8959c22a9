"""NAdam and RAdam against a float64 NumPy reference over the dtype matrix, their
argument checks, and how they compose with optax and vmap.

The reference is transcribed from the equations in the docstrings of
``scale_by_nadam`` and ``scale_by_radam``. Each step starts from the state our
implementation stored (so bfloat16/float16 storage rounding does not accumulate)
and must agree to an error model: a few roundings of the compute dtype
``c = promote(leaf, float32)`` relative to the size of the summed terms, one
rounding to each storage dtype, and the documented precision limits: ``1 - Π``
formed from the stored product (``u·Π/(1-Π)`` relative) and ``ρ_t`` formed in the
compute dtype (about ``ρ_∞`` ulps absolute).
"""

from __future__ import annotations

import math
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adam_jax

DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16, jnp.complex64]
SETTINGS = dict(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def u_of(dtype) -> float:
    return float(jnp.finfo(dtype).eps) / 2


def f64(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def rounded(x, dtype) -> np.ndarray:
    with np.errstate(all="ignore"):
        return f64(np.asarray(x).astype(np.dtype(dtype)))


def one_minus_pow(b: float, t: int) -> float:
    """``1 - b**t``, exactly rounded (the steps here are few)."""
    return float(1 - Fraction(b) ** t)


def ref_nadam(hp, g, m, v, product, t):
    """One ``scale_by_nadam`` step; returns (u, size of u, new state, relative slack)."""
    b1, b2, eps, md = hp["b1"], hp["b2"], hp["eps"], hp["momentum_decay"]
    mu = b1 * (1 - 0.5 * 0.96 ** (t * md))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * md))
    new_product = product * mu
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * np.abs(g) ** 2
    den = np.sqrt(v / one_minus_pow(b2, t)) + eps
    m_coef = mu_next / (1 - new_product * mu_next)
    g_coef = (1 - mu) / (1 - new_product)
    u = (m_coef * m + g_coef * g) / den
    size = (m_coef * np.abs(m) + g_coef * np.abs(g)) / den
    # 1 - Π from a product rounded in its dtype; 1 - b1 formed before the cast.
    slack = 1 / (1 - new_product * mu_next) + 1 / (1 - new_product) + 1 / (1 - b1)
    return u, size, {"m": m, "v": v, "mu_product": new_product}, slack


def ref_radam(hp, g, m, v, t, cdt):
    b1, b2, eps, eps_root, thr = hp["b1"], hp["b2"], hp["eps"], hp["eps_root"], hp["threshold"]
    # The size that m's rounding scales with: its terms, not their (maybe cancelling) sum.
    terms = b1 * np.abs(m) + (1 - b1) * np.abs(g)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * np.abs(g) ** 2
    c1, c2 = one_minus_pow(b1, t), one_minus_pow(b2, t)
    m_hat = m / c1
    size = np.maximum(np.abs(m_hat), terms / c1)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / c2
    rho_err = 8 * (abs(rho_inf) + 2 * t) * u_of(cdt)
    torch_form = hp["form"] == "torch"
    rectified = rho > thr if torch_form else rho >= thr
    if abs(rho - thr) <= rho_err:
        return None, None, {"m": m, "v": v}, 0.0  # the switch is within rounding of rho
    if not rectified:
        return m_hat, size, {"m": m, "v": v}, 0.0
    r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    if torch_form:
        den = np.sqrt(v + eps_root) + eps
        gain = r * math.sqrt(c2) / den
    else:
        gain = r / (np.sqrt(v / c2 + eps_root) + eps)
    sens = 0.5 * (1 / abs(rho - 4) + 1 / abs(rho - 2) + 1 / abs(rho)) * rho_err
    return m_hat * gain, size * gain, {"m": m, "v": v}, sens / u_of(cdt)


@st.composite
def cases(draw):
    family = draw(st.sampled_from(["nadam", "radam"]))
    hp = {
        "b1": draw(st.one_of(st.just(0.0), st.floats(0.0, 0.999), st.just(0.9))),
        "b2": draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9999), st.just(0.999))),
        "eps": draw(st.floats(-10, -1).map(lambda e: 10.0**e)),
    }
    if family == "nadam":
        hp["momentum_decay"] = draw(st.sampled_from([0.0, 4e-3, 0.5, 1.0, math.inf]))
    else:
        hp["eps_root"] = draw(st.sampled_from([0.0, 1e-8]))
        hp["threshold"] = draw(st.sampled_from([5.0, 6.0]))
        hp["form"] = draw(st.sampled_from(["torch", "optax"]))
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=1, max_size=2))
    mu_dtype = draw(st.sampled_from([None, jnp.float32]))
    return family, hp, dtypes, mu_dtype


def build(family, hp, mu_dtype):
    if family == "nadam":
        return adam_jax.scale_by_nadam(**hp, mu_dtype=mu_dtype)
    return adam_jax.scale_by_radam(**hp, mu_dtype=mu_dtype)


@settings(**SETTINGS)
@given(cases(), st.data())
def test_agrees_with_numpy_reference(case, data):
    family, hp, dtypes, mu_dtype = case
    if mu_dtype is not None and any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
        mu_dtype = None
    opt = build(family, hp, mu_dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    shapes = [(3,), (2, 2)][: len(dtypes)]
    state = opt.init([jnp.zeros(s, d) for s, d in zip(shapes, dtypes, strict=True)])
    update = jax.jit(opt.update)
    for t in range(1, 9):
        grads = []
        for s, d in zip(shapes, dtypes, strict=True):
            lo, hi = (-2.0, 2.0) if d == jnp.float16 else (-6.0, 6.0)
            z = rng.standard_normal(s)
            if jnp.issubdtype(d, jnp.complexfloating):
                z = z + 1j * rng.standard_normal(s)
            scale = 10.0 ** data.draw(st.floats(lo, hi), label=f"exponent {t}")
            grads.append(jnp.asarray(z * scale, d))
        before = state
        updates, state = update(grads, state)
        assert int(state.count) == t
        for i, (g, d) in enumerate(zip(grads, dtypes, strict=True)):
            cdt = jnp.promote_types(d, jnp.float32)
            m0, v0 = f64(before.m[i]), f64(before.v[i])
            if family == "nadam":
                want, size, new, slack = ref_nadam(hp, f64(g), m0, v0, float(before.mu_product), t)
                pdt = state.mu_product.dtype
                np.testing.assert_allclose(
                    float(state.mu_product),
                    new["mu_product"],
                    rtol=8 * u_of(pdt),
                    atol=float(jnp.finfo(pdt).tiny),
                )
                slack = 16 + 4 * slack * u_of(pdt) / u_of(cdt)
            else:
                want, size, new, slack = ref_radam(hp, f64(g), m0, v0, t, cdt)
                slack = 16 + slack
            tiny = 4 * float(jnp.finfo(cdt).tiny)
            if want is not None:
                tol = slack * u_of(cdt) * size + 2 * u_of(d) * np.abs(want) + tiny / hp["eps"]
                got = f64(updates[i])
                assert np.all(np.abs(got - rounded(want, d)) <= tol + 1e-300), (t, i, got, want)
            for field in ("m", "v"):
                store = getattr(state, field)[i].dtype
                ref = new[field]
                size_f = np.abs(ref) if field == "v" else hp["b1"] * np.abs(m0) + np.abs(f64(g))
                tol = 8 * u_of(cdt) * size_f + 2 * u_of(store) * np.abs(ref) + tiny
                got = f64(getattr(state, field)[i])
                assert np.all(np.abs(got - rounded(ref, store)) <= tol), (field, t, i)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------

BAD = [
    (adam_jax.nadam, {"momentum_decay": -1.0}, ValueError, "momentum_decay=-1.0"),
    (adam_jax.nadam, {"b1": 1.0}, ValueError, "b1=1.0"),
    (adam_jax.nadam, {"eps": -1e-8}, ValueError, "eps=-1e-08"),
    (adam_jax.nadam, {"decoupled_weight_decay": "yes"}, TypeError, "decoupled_weight_decay='yes'"),
    (adam_jax.nadam, {"weight_decay": -0.1}, ValueError, "weight_decay=-0.1"),
    (adam_jax.nadam, {"mu_dtype": jnp.int32}, TypeError, "mu_dtype=int32"),
    (adam_jax.nadamw, {"momentum_decay": float("nan")}, ValueError, "momentum_decay=nan"),
    (adam_jax.radam, {"threshold": -5.0}, ValueError, "threshold=-5.0"),
    (adam_jax.radam, {"form": "keras"}, ValueError, "form='keras'"),
    (adam_jax.radam, {"b2": -0.1}, ValueError, "b2=-0.1"),
    (adam_jax.radam, {"eps_root": -1.0}, ValueError, "eps_root=-1.0"),
    (adam_jax.radam, {"learning_rate": -1.0}, ValueError, "learning_rate=-1.0"),
    (adam_jax.radamw, {"nu_dtype": "int8"}, TypeError, "nu_dtype=int8"),
    (adam_jax.radam, {"decoupled_weight_decay": 1}, TypeError, "decoupled_weight_decay=1"),
]


@pytest.mark.parametrize(("alias", "kwargs", "error", "message"), BAD)
def test_bad_hyperparameters_name_the_argument(alias, kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace("+", r"\+")):
        alias(**kwargs)


@pytest.mark.parametrize("alias", [adam_jax.nadam, adam_jax.radam])
def test_bad_trees_are_named(alias):
    opt = alias()
    state = opt.init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="Missing from grads: \\['w'\\]"):
        opt.update({"b": jnp.zeros(3)}, state, {"b": jnp.zeros(3)})
    with pytest.raises(TypeError, match="int32"):
        adam_jax.scale_by_nadam().init({"w": jnp.zeros(3, jnp.int32)})


# --------------------------------------------------------------------------
# dtypes.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nadam", "radam"])
def test_dtypes_are_kept_and_half_precision_zero_gradient_is_finite(name, dtype):
    opt = getattr(adam_jax, name)(1e-2)
    params = {"w": jnp.ones(3, dtype)}
    state = opt.init(params)
    for g in (jnp.zeros(3, dtype), jnp.full(3, 1e-3, dtype), jnp.zeros(3, dtype)):
        updates, new_state = jax.jit(opt.update)({"w": g}, state, params)
        assert updates["w"].dtype == dtype
        assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
        assert bool(jnp.all(jnp.isfinite(updates["w"])))
        state = new_state


def test_mu_product_takes_the_widest_compute_dtype():
    state = adam_jax.scale_by_nadam().init({"a": jnp.zeros(2, jnp.bfloat16)})
    assert state.mu_product.dtype == jnp.float32
    state = adam_jax.scale_by_nadam().init({"a": jnp.zeros(2, jnp.float16), "b": jnp.zeros(2)})
    assert state.mu_product.dtype == jnp.float64


@pytest.mark.parametrize("name", ["scale_by_nadam", "scale_by_radam"])
def test_complex_uses_conj_g_times_g(name):
    opt = getattr(adam_jax, name)()
    state = opt.init(jnp.zeros(1, jnp.complex128))
    _, state = opt.update(jnp.array([3.0 + 4.0j]), state)
    assert state.v.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(state.v), [0.001 * 25.0], rtol=1e-15)


# --------------------------------------------------------------------------
# optax composition and batched hyperparameters.
# --------------------------------------------------------------------------


def loss(p):
    return jnp.sum(jnp.cos(p) + 0.5 * p**2)


def run(opt, params, steps=20):
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


PARAMS = jnp.array([1.0, -2.0, 3.0], jnp.float64)


@pytest.mark.parametrize(
    ("alias", "scaler"), [("nadam", "scale_by_nadam"), ("radam", "scale_by_radam")]
)
def test_alias_is_the_chain_of_its_parts(alias, scaler):
    ours = getattr(adam_jax, alias)(0.05)
    chained = optax.chain(getattr(adam_jax, scaler)(), optax.scale(-0.05))
    chex.assert_trees_all_close(run(ours, PARAMS), run(chained, PARAMS), rtol=1e-14)


@pytest.mark.parametrize("alias", ["nadam", "radam"])
def test_inject_hyperparams_equals_plain_and_can_change_lr(alias):
    make = getattr(adam_jax, alias)
    injected = optax.inject_hyperparams(make)(learning_rate=0.05, b1=0.8)
    # inject_hyperparams stores the values as float32 arrays, hence the tolerance.
    chex.assert_trees_all_close(run(injected, PARAMS), run(make(0.05, b1=0.8), PARAMS), rtol=1e-6)
    state = injected.init(PARAMS)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, _ = jax.jit(injected.update)(jax.grad(loss)(PARAMS), state, PARAMS)
    np.testing.assert_array_equal(np.asarray(u), 0.0)


SWEEP = {
    "nadam": {
        "learning_rate": [1e-2, 3e-2, 1e-1],
        "b2": [0.9, 0.99, 0.999],
        "momentum_decay": [0.0, 4e-3, 0.5],
    },
    "radam": {
        "learning_rate": [1e-2, 3e-2, 1e-1],
        "b2": [0.9, 0.99, 0.999],
        "threshold": [5.0, 4.5, 6.0],
    },
}


@pytest.mark.parametrize("alias", list(SWEEP))
def test_vmap_over_hyperparameters_equals_separate_runs(alias):
    make = getattr(adam_jax, alias)
    sweep = {k: jnp.asarray(v, jnp.float64) for k, v in SWEEP[alias].items()}

    def one(hp):
        return run(make(**hp), PARAMS)

    batched = jax.jit(jax.vmap(one))(sweep)
    for i in range(3):
        single = one({k: v[i] for k, v in SWEEP[alias].items()})
        chex.assert_trees_all_close(batched[i], single, rtol=1e-12, atol=1e-14)
    assert not np.allclose(np.asarray(batched[0]), np.asarray(batched[2]))
