"""Property-based tests: every optimizer and mode against a float64 NumPy reference,
and the invariants of the state.

The reference (``_ref_scale``, ``_ref_alias``) is transcribed from the equations in the
docstrings of ``scale_by_adam``, ``scale_by_amsgrad``, ``scale_by_adamax`` and the
aliases, and computed in float64 (complex128 for complex leaves).

Tolerances come from an error model, not from observed differences:

* The implementation computes in ``c = promote(leaf dtype, float32)`` with unit roundoff
  ``u_c``. A step's result then differs from exact arithmetic by a few ``u_c`` relative to
  the size of the terms that were summed (``mabs``, the same moment of ``|g|``), which
  bounds cancellation in ``m`` when gradients change sign.
* Each stored value (update, ``m``, ``v``, ...) is rounded once to its storage dtype; the
  reference is rounded the same way before comparing, so overflow or underflow of the
  storage dtype shows up in both.
* XLA on CPU flushes float32 subnormals to zero (in arithmetic, and when converting to
  float32 or bfloat16), hence absolute floors of a few ``finfo(c).tiny``, propagated
  through the division by the denominator; float16 keeps its subnormals.
* The aliases' coupled decay ``±g + λp`` is formed in the leaf dtype by
  ``optax.add_decayed_weights``; its rounding enters as the reference's change under
  that perturbation of its input.

bfloat16 and float16 states are stored with 8 and 11 significant bits, so errors from
storage rounding would add up over steps. For those, each step's reference starts from
the implementation's stored state (and params), which checks every step to one rounding.
For float32, float64 and complex64 an independent float64 trajectory is also run, with
the tolerance growing linearly in the number of steps.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adam_jax

INT32_MAX = int(np.iinfo(np.int32).max)
STATE_TYPES = (adam_jax.AdamState, adam_jax.AMSGradState, adam_jax.AdamaxState)
FLOAT_DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16, jnp.complex64]
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 2), (1, 2, 2)]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCALE_BY = {
    "adam": adam_jax.scale_by_adam,
    "amsgrad": adam_jax.scale_by_amsgrad,
    "adamax": adam_jax.scale_by_adamax,
}
ALIAS = {
    ("adam", "coupled"): adam_jax.adam,
    ("adam", "decoupled"): adam_jax.adamw,
    ("amsgrad", "coupled"): adam_jax.amsgrad,
    ("adamax", "coupled"): adam_jax.adamax,
    ("adamax", "decoupled"): adam_jax.adamaxw,
}


# --------------------------------------------------------------------------
# Specifications drawn by hypothesis.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]
    dtype: Any


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str
    opts: dict
    b1: float
    b2: float
    eps: float
    eps_root: float
    alias: str | None = None
    lr: float = 1.0
    wd: float = 0.0
    maximize: bool = False
    schedule: bool = False
    mu_dtype: Any = None
    nu_dtype: Any = None

    def build(self) -> optax.GradientTransformation:
        kw = dict(self.opts, b1=self.b1, b2=self.b2, eps=self.eps, mu_dtype=self.mu_dtype)
        if self.family != "adamax":
            kw.update(eps_root=self.eps_root, nu_dtype=self.nu_dtype)
        if self.alias is None:
            return SCALE_BY[self.family](**kw)
        lr0 = self.lr
        lr = (lambda count: lr0 / (1.0 + count)) if self.schedule else lr0
        return ALIAS[self.family, self.alias](
            lr, weight_decay=self.wd, maximize=self.maximize, **kw
        )


def _log_uniform(lo: float, hi: float):
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


decays = st.one_of(st.just(0.0), st.floats(0.0, 0.9999), st.sampled_from([0.9, 0.99, 0.999]))
positive_eps = _log_uniform(1e-10, 1e-1)
eps_roots = st.one_of(st.just(0.0), _log_uniform(1e-12, 1e-2))


@st.composite
def modes(draw, family: str) -> dict:
    if family == "adam":
        return {
            "eps_hat": draw(st.booleans()),
            "bias_correction": draw(st.booleans()),
            "nesterov": draw(st.booleans()),
        }
    if family == "amsgrad":
        return {
            "eps_hat": draw(st.booleans()),
            "bias_correction": draw(st.booleans()),
            "max_of": draw(st.sampled_from(["raw", "corrected"])),
        }
    return {"eps_in_max": draw(st.booleans())}


leaves = st.builds(Leaf, st.sampled_from(SHAPES), st.sampled_from(FLOAT_DTYPES))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abcd"), children, max_size=3),
    ),
    max_leaves=4,
)

PATTERNS = ["normal", "mixed", "zeros", "sparse", "flip", "same", "max", "tiny"]


def _leaf_specs(tree) -> list[Leaf]:
    return jax.tree.leaves(tree)


def _to_jax(tree, values: list[np.ndarray]):
    treedef = jax.tree.structure(tree)
    specs = _leaf_specs(tree)
    return treedef.unflatten([jnp.asarray(v, s.dtype) for v, s in zip(values, specs, strict=True)])


def _f64(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _draw_values(rng, leaf: Leaf, pattern: str, exponent: float, prev, lo: float, hi: float):
    """Gradient values for one leaf, exactly representable in the leaf dtype."""
    cplx = jnp.issubdtype(leaf.dtype, jnp.complexfloating)
    fi = jnp.finfo(leaf.dtype)

    def normal():
        z = rng.standard_normal(leaf.shape)
        return z + 1j * rng.standard_normal(leaf.shape) if cplx else z

    e = float(np.clip(exponent, lo, hi))
    if pattern == "zeros":
        g = np.zeros(leaf.shape)
    elif pattern == "sparse":
        g = normal() * 10.0**e * (rng.random(leaf.shape) < 0.3)
    elif pattern == "flip" and prev is not None:
        g = -prev
    elif pattern == "same" and prev is not None:
        g = prev
    elif pattern == "mixed":
        g = normal() * 10.0 ** rng.uniform(lo, hi, leaf.shape)
    elif pattern == "max":
        g = np.sign(normal().real) * float(fi.max)
    elif pattern == "tiny":
        g = np.sign(normal().real) * float(fi.smallest_subnormal)
    else:
        g = normal() * 10.0**e
    g = np.where(np.isfinite(g), g, 0.0)
    if cplx:
        g = np.clip(g.real, -fi.max, fi.max) + 1j * np.clip(g.imag, -fi.max, fi.max)
    else:
        g = np.clip(g, -float(fi.max), float(fi.max))
    return _f64(jnp.asarray(g, leaf.dtype))


# --------------------------------------------------------------------------
# The float64 reference, from the docstring equations.
# --------------------------------------------------------------------------


def _one_minus_pow(b: float, t: int) -> float:
    """``1 - b**t``, exactly rounded: 1 - b**t cancels badly in floating point for b near 1."""
    if t <= 64:
        return float(1 - Fraction(b) ** t)
    return 1.0 if b == 0 else -math.expm1(t * math.log1p(-(1.0 - b)))


def _ref_scale(spec: Spec, g, gabs, st: dict, t: int):
    """One ``scale_by_*`` step at count ``t``.

    ``gabs`` bounds ``|g|`` and the sizes of the terms that formed ``g``; it drives the
    ``mabs`` moment used for tolerances. Returns ``(direction, direction_size, gain,
    new_state, sizes)``: ``direction_size`` is the direction computed from ``mabs``
    instead of ``m``, ``gain`` the factor from the first moment to the direction, and
    ``sizes`` the magnitude of each new state field, for the error model.
    """
    b1, b2, eps, eps_root, o = spec.b1, spec.b2, spec.eps, spec.eps_root, spec.opts
    c1 = _one_minus_pow(b1, t)
    m = _decayed(b1, st["m"]) + (1 - b1) * g
    mabs = b1 * st["mabs"] + (1 - b1) * gabs
    new = {"m": m, "mabs": mabs}
    sizes = {"m": mabs}
    if spec.family == "adamax":
        # u = max(b2·u, |g|), Δ = m̂/(u + eps); eps_in_max: u = max(b2·u, |g| + eps), Δ = m̂/u.
        u = np.maximum(_decayed(b2, st["u"]), np.abs(g) + (eps if o["eps_in_max"] else 0.0))
        den = u if o["eps_in_max"] else u + eps
        new["u"] = sizes["u"] = u
        gain = 1 / (c1 * den)
        return m * gain, mabs * gain, gain, new, sizes
    bc = o["bias_correction"]
    c2 = _one_minus_pow(b2, t)
    v = _decayed(b2, st["v"]) + (1 - b2) * np.abs(g) ** 2
    new["v"] = sizes["v"] = v
    if o.get("nesterov"):
        # m̂ = b1·m/(1-b1^(t+1)) + (1-b1)·g/(1-b1^t); without bias correction both divisors are 1.
        c1n = _one_minus_pow(b1, t + 1) if bc else 1.0
        c1_ = c1 if bc else 1.0
        m_hat = b1 * m / c1n + (1 - b1) * g / c1_
        m_hat_abs = b1 * mabs / c1n + (1 - b1) * gabs / c1_
        unit = b1 / c1n + (1 - b1) / c1_
    else:
        div = c1 if bc else 1.0
        m_hat, m_hat_abs, unit = m / div, mabs / div, 1 / div
    corrected = spec.family == "amsgrad" and o["max_of"] == "corrected" and bc
    if spec.family == "amsgrad":
        # max_of="raw": v_max = max(v_max, v); "corrected": v_max = max(v_max, v̂).
        s = np.maximum(st["v_max"], v / c2 if corrected else v)
        new["v_max"] = sizes["v_max"] = s
    else:
        s = v
    if not bc:
        factor, den = 1.0, np.sqrt(s + eps_root) + eps
    elif o["eps_hat"]:
        # u = m̂·sqrt(1-b2^t) / (sqrt(s_raw + eps_root) + eps), s_raw uncorrected.
        s_raw = s * c2 if corrected else s
        factor, den = math.sqrt(c2), np.sqrt(s_raw + eps_root) + eps
    else:
        s_hat = s if corrected else s / c2
        factor, den = 1.0, np.sqrt(s_hat + eps_root) + eps
    gain = factor / den
    return m_hat * gain, m_hat_abs * gain, unit * gain, new, sizes


def _decayed(b, x):
    """``b·x``, documented as 0 for ``b = 0`` even where ``x`` is inf (no memory)."""
    return np.zeros_like(x) if b == 0 else b * x


def _ref_alias(spec: Spec, g, p, st: dict, t: int, dtype):
    """One alias step: coupled ``g ← ±g + λp; Δ = -η·scale(g)``, decoupled
    ``Δ = -η·(scale(±g) + λp)``; ``η = lr/t`` for the test schedule ``lr/(1+count)``.

    ``scale(g)`` is an update in the leaf ``dtype`` (a GradientTransformation's output),
    so a direction beyond float16's range is inf before the learning rate scales it.
    """
    sign = -1.0 if spec.maximize else 1.0
    lr = spec.lr / t if spec.schedule else spec.lr
    if spec.wd == 0:
        p = np.zeros_like(p)  # no decay term at all, so a non-finite param stays out of it
    if spec.alias == "coupled":
        d, dabs, gain, new, sizes = _ref_scale(
            spec, sign * g + spec.wd * p, np.abs(g) + spec.wd * np.abs(p), st, t
        )
        d = _round_to(d, dtype)
        return -lr * d, lr * (np.abs(d) + dabs), lr * gain, new, sizes
    d, dabs, gain, new, sizes = _ref_scale(spec, sign * g, np.abs(g), st, t)
    d = _round_to(d, dtype)
    return (
        -lr * (d + spec.wd * p),
        lr * (np.abs(d) + dabs + spec.wd * np.abs(p)),
        lr * gain,
        new,
        sizes,
    )


def _ref_step(spec: Spec, g, p, st: dict, t: int, dtype=jnp.float64):
    with np.errstate(all="ignore"):
        if spec.alias is None:
            d, dabs, gain, new, sizes = _ref_scale(spec, g, np.abs(g), st, t)
            return d, np.abs(d) + dabs, gain, new, sizes
        return _ref_alias(spec, g, p, st, t, dtype)


# --------------------------------------------------------------------------
# Helpers on our side.
# --------------------------------------------------------------------------


def _inner(state):
    if isinstance(state, STATE_TYPES):
        return state
    (inner,) = [s for s in state if isinstance(s, STATE_TYPES)]
    return inner


def _moment_fields(spec: Spec) -> list[str]:
    return {"adam": ["m", "v"], "amsgrad": ["m", "v", "v_max"], "adamax": ["m", "u"]}[spec.family]


def _state_dtype(spec: Spec, leaf: Leaf, field: str):
    if field == "m":
        return jnp.dtype(spec.mu_dtype or leaf.dtype)
    store = leaf.dtype if field == "u" else (spec.nu_dtype or leaf.dtype)
    if field != "u" and spec.nu_dtype is None and jnp.dtype(leaf.dtype) == jnp.float16:
        store = jnp.float32  # the documented default for float16 second moments
    return jnp.finfo(jnp.dtype(store)).dtype  # second moments are real


def _per_leaf_state(spec: Spec, state, n: int) -> list[dict]:
    inner = _inner(state)
    fields = {f: jax.tree.leaves(getattr(inner, f)) for f in _moment_fields(spec)}
    return [
        {f: _f64(fields[f][i]) for f in fields} | {"mabs": np.abs(_f64(fields["m"][i]))}
        for i in range(n)
    ]


def _avals(tree) -> list:
    return [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]


def _unit_roundoff(dtype) -> float:
    return float(jnp.finfo(dtype).eps) / 2


def _check_close(what: str, got, want, tol, context: str) -> None:
    got, want = _f64(got), _f64(want)
    with np.errstate(invalid="ignore"):
        ok = (got == want) | (np.abs(got - want) <= tol) | (np.isnan(got) & np.isnan(want))
    if not np.all(ok):
        i = np.unravel_index(np.argmin(ok), ok.shape) if ok.ndim else ()
        raise AssertionError(
            f"{what} differs from the float64 reference at {i}: got {got[i]!r}, "
            f"want {want[i]!r}, tolerance {np.broadcast_to(tol, ok.shape)[i]!r}\n{context}"
        )


def _round_to(x, dtype):
    """The reference value as stored in ``dtype`` (overflow and underflow included)."""
    with np.errstate(all="ignore"):
        return _f64(np.asarray(x).astype(np.dtype(dtype)))


def _saturate_to(x, dtype):
    """``m`` as stored in ``dtype``: a finite value beyond the dtype's range saturates
    at ±max (the documented storage rule for first moments), non-finite values stay."""
    rounded = _round_to(x, dtype)
    big = float(jnp.finfo(dtype).max)
    x = np.asarray(x)
    over = np.isinf(rounded) & np.isfinite(x)
    if np.iscomplexobj(rounded):
        re = np.where(
            np.isinf(rounded.real) & np.isfinite(x.real), np.sign(x.real) * big, rounded.real
        )
        im = np.where(
            np.isinf(rounded.imag) & np.isfinite(x.imag), np.sign(x.imag) * big, rounded.imag
        )
        return re + 1j * im
    return np.where(over, np.sign(x) * big, rounded)


# --------------------------------------------------------------------------
# Agreement with the reference.
# --------------------------------------------------------------------------


@st.composite
def specs(draw, *, aliases: bool, eps: st.SearchStrategy) -> Spec:
    family = draw(st.sampled_from(list(SCALE_BY)))
    alias = None
    if aliases:
        choices = [None] + [a for f, a in ALIAS if f == family]
        alias = draw(st.sampled_from(choices))
    lr_wd = {}
    if alias is not None:
        lr_wd = dict(
            lr=draw(_log_uniform(1e-4, 1.0)),
            wd=draw(st.one_of(st.just(0.0), _log_uniform(1e-4, 1e-1))),
            maximize=draw(st.booleans()),
            schedule=draw(st.booleans()),
        )
    return Spec(
        family=family,
        opts=draw(modes(family)),
        b1=draw(decays),
        b2=draw(decays),
        eps=draw(eps),
        eps_root=draw(eps_roots) if family != "adamax" else 0.0,
        alias=alias,
        mu_dtype=draw(st.sampled_from([None, jnp.float32, jnp.bfloat16])),
        nu_dtype=draw(st.sampled_from([None, jnp.float32])) if family != "adamax" else None,
        **lr_wd,
    )


def _reference_range(leaf: Leaf, spec: Spec) -> tuple[float, float]:
    """Gradient exponents where the documented equations are representable in the
    compute dtype: float32 arithmetic overflows g² above ~1.8e19 (then v = inf and the
    update is 0, as in optax and torch; ``test_invariants`` covers that range). float16
    holds about 6e-8 … 6.5e4. With eps = 0, tiny gradients would make 0/0 by design."""
    if jnp.dtype(leaf.dtype) == jnp.float16:
        lo, hi = -7.0, 3.0
    elif jnp.dtype(leaf.dtype) == jnp.float64:
        lo, hi = -30.0, 30.0
    else:
        lo, hi = -30.0, 17.0
    if spec.eps == 0.0:
        lo, hi = max(lo, -12.0), min(hi, 12.0)
    return lo, hi


def _run_against_reference(spec: Spec, tree, data, n_steps: int, rng) -> None:
    specs_ = _leaf_specs(tree)
    opt = spec.build()
    patterns = [p for p in PATTERNS if p not in ("max", "tiny")]
    if spec.eps == 0.0:
        patterns = [p for p in patterns if p not in ("zeros", "sparse")]
    params_np = [
        _f64(jnp.asarray(rng.standard_normal(s.shape) * 10.0 ** rng.uniform(-3, 3), s.dtype))
        for s in specs_
    ]
    params = _to_jax(tree, params_np)
    state = opt.init(params)
    init_avals = _avals(state)
    fields = _moment_fields(spec)
    # An independent float64 trajectory where storage neither rounds coarsely nor
    # under/overflows before the compute dtype does: states kept in the leaf dtype.
    free = (
        all(jnp.dtype(s.dtype) in (jnp.float32, jnp.float64, jnp.complex64) for s in specs_)
        and spec.mu_dtype is None
        and spec.nu_dtype is None
    )
    free_state = _per_leaf_state(spec, state, len(specs_))
    prev = [None] * len(specs_)
    for t in range(1, n_steps + 1):
        pattern = data.draw(st.sampled_from(patterns), label=f"pattern[{t}]")
        exponent = data.draw(st.floats(-30, 30), label=f"exponent[{t}]")
        grads_np = [
            _draw_values(rng, s, pattern, exponent, prev[i], *_reference_range(s, spec))
            for i, s in enumerate(specs_)
        ]
        prev = grads_np
        synced = _per_leaf_state(spec, state, len(specs_))
        updates, state = opt.update(_to_jax(tree, grads_np), state, params)
        assert _avals(state) == init_avals, "state dtypes, shapes or weak types changed"
        assert [u.dtype for u in jax.tree.leaves(updates)] == [jnp.dtype(s.dtype) for s in specs_]
        assert int(_inner(state).count) == t
        got_state = _per_leaf_state(spec, state, len(specs_))
        got_updates = jax.tree.leaves(updates)
        for i, leaf in enumerate(specs_):
            cdt = jnp.promote_types(leaf.dtype, jnp.float32)
            rho = 32 * _unit_roundoff(cdt)
            tiny = 4 * float(jnp.finfo(cdt).tiny)
            if spec.alias is not None:
                rho = max(rho, 32 * _unit_roundoff(leaf.dtype))
            context = f"spec={spec}\nleaf {i}: {leaf}, step {t}, pattern {pattern}"
            g, p = grads_np[i], params_np[i]
            want_u, size_u, gain, new, sizes = _ref_step(spec, g, p, synced[i], t, leaf.dtype)
            sens = _input_rounding_sensitivity(spec, leaf, g, p, synced[i], t)
            ctx = context + " (from the stored state)"
            tol_u = rho * size_u + tiny * gain + sens["update"] + _storage_floor(leaf.dtype)
            _check_close(
                "update",
                got_updates[i],
                _round_to(want_u, leaf.dtype),
                tol_u + 2 * _unit_roundoff(leaf.dtype) * np.abs(want_u),
                ctx,
            )
            for f in fields:
                store = _state_dtype(spec, leaf, f)
                tol = (
                    rho * sizes[f]
                    + tiny
                    + sens[f]
                    + _storage_floor(store)
                    + 2 * _unit_roundoff(store) * np.abs(new[f])
                )
                _check_close(
                    f,
                    got_state[i][f],
                    (_saturate_to if f == "m" else _round_to)(new[f], store),
                    tol,
                    ctx,
                )
            if free:
                rho_free = 32 * _unit_roundoff(cdt)
                want_u, size_u, gain, new, sizes = _ref_step(
                    spec, g, p, free_state[i], t, leaf.dtype
                )
                ctx = context + f" (independent trajectory, {t} steps)"
                tol_u = t * (rho_free * size_u + tiny * gain)
                _check_close("update", got_updates[i], want_u, tol_u, ctx)
                for f in fields:
                    tol = t * (rho_free * sizes[f] + tiny)
                    _check_close(f, got_state[i][f], new[f], tol, ctx)
                free_state[i] = new
        params = optax.apply_updates(params, updates)
        params_np = [_f64(x) for x in jax.tree.leaves(params)]
        if free and spec.alias is not None:
            free = False  # params now carry the implementation's rounding


def _storage_floor(dtype) -> float:
    """Absolute error of storing a value: XLA on CPU flushes subnormals to zero when it
    converts to float32, bfloat16 or float64, but keeps float16's subnormals."""
    fi = jnp.finfo(dtype)
    return float(fi.smallest_subnormal if jnp.dtype(dtype) == jnp.float16 else fi.tiny)


def _input_rounding_sensitivity(spec: Spec, leaf: Leaf, g, p, st: dict, t: int) -> dict:
    """How much the outputs move when the coupled-decay gradient ``±g + λp`` is rounded
    to the leaf dtype, as ``optax.add_decayed_weights`` does before our ``scale_by_*``."""
    keys = ["update", *_moment_fields(spec)]
    if spec.alias != "coupled" or spec.wd == 0.0:
        return dict.fromkeys(keys, 0.0)
    delta = 2 * _unit_roundoff(leaf.dtype) * (np.abs(g) + spec.wd * np.abs(p))
    delta = delta + 2 * _storage_floor(leaf.dtype)  # λp may land among the subnormals
    base_u, _, _, base, _ = _ref_step(spec, g, p, st, t, leaf.dtype)
    out = dict.fromkeys(keys, 0.0)
    directions = [1, -1, 1j, -1j] if np.iscomplexobj(g) else [1, -1]
    sign = -1.0 if spec.maximize else 1.0
    for direction in directions:
        # Perturb the decayed gradient itself: shift g so that ±g + λp moves by delta.
        u, _, _, new, _ = _ref_step(spec, g + sign * direction * delta, p, st, t, leaf.dtype)
        with np.errstate(invalid="ignore"):
            out["update"] = np.fmax(out["update"], np.abs(u - base_u))
            for f in keys[1:]:
                out[f] = np.fmax(out[f], np.abs(new[f] - base[f]))
    return out


@settings(max_examples=150, **SETTINGS)
@given(
    spec=specs(aliases=True, eps=st.one_of(st.just(0.0), positive_eps)),
    tree=trees,
    n_steps=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_agrees_with_numpy_reference(spec, tree, n_steps, seed, data):
    if spec.eps == 0.0:
        # eps = 0 with a vanishing second moment is 0/0 by design; keep b2 away from 0 so v
        # stays representable over the few steps (the gradients are kept non-zero).
        spec = dataclasses.replace(spec, b2=max(spec.b2, 0.5))
    if any(jnp.issubdtype(s.dtype, jnp.complexfloating) for s in _leaf_specs(tree)):
        spec = dataclasses.replace(spec, mu_dtype=None)
    _run_against_reference(spec, tree, data, n_steps, np.random.default_rng(seed))


# --------------------------------------------------------------------------
# Invariants.
# --------------------------------------------------------------------------


def _adam_bound(spec: Spec, t: int) -> float:
    r"""A tight bound on ``|m̂_t| / sqrt(v̂_t)`` for any gradients, by Cauchy–Schwarz.

    ``m̂_t = Σ_k a_k g_{t-k}`` and ``v̂_t = Σ_k b_k g_{t-k}²`` with ``a_k, b_k >= 0``, so
    ``|m̂_t| = |Σ (a_k/sqrt(b_k))·sqrt(b_k) g_{t-k}| <= sqrt(Σ a_k²/b_k)·sqrt(v̂_t)``,
    with equality for ``g_{t-k} ∝ a_k/b_k``. eps, eps_root, eps_hat (which divides eps by
    sqrt(1-b2^t)) and AMSGrad's maximum only make the denominator larger.

    Kingma & Ba (section 2.1) state ``|Δ_t| <= lr·(1-b1)/sqrt(1-b2)`` when
    ``(1-b1) > sqrt(1-b2)`` and ``|Δ_t| <= lr`` otherwise, for "the most severe case of
    sparsity", i.e. gradients that are zero except at the current step. That is not a bound
    over all gradient sequences: for the defaults this bound is 1.8x (1-b1)/sqrt(1-b2) at
    t = 1000 and 2.3x in the limit, and ``test_adam_bound_is_attained`` reaches it.
    """
    b1, b2, o = spec.b1, spec.b2, spec.opts
    bc = o["bias_correction"]
    k = np.arange(t)
    w = (1 - b1) * b1**k
    c1 = _one_minus_pow(b1, t) if bc else 1.0
    if o.get("nesterov"):
        a = b1 * w / (_one_minus_pow(b1, t + 1) if bc else 1.0)
        a[0] += (1 - b1) / c1
    else:
        a = w / c1
    b = (1 - b2) * b2**k / (_one_minus_pow(b2, t) if bc else 1.0)
    with np.errstate(all="ignore"):
        terms = np.where(a == 0, 0.0, a**2 / b)
    return float(np.sqrt(terms.sum()))


def _adamax_bound(spec: Spec, t: int) -> float:
    """``|m̂_t| / u_t <= Σ_k (1-b1)·b1^k·b2^(-k) / (1-b1^t)``: ``u_t >= b2^k·|g_{t-k}|`` for
    every k, so each ``|g_{t-k}| <= u_t·b2^(-k)``; equality for ``g_{t-k} = b2^(-k)``."""
    k = np.arange(t)
    w = (1 - spec.b1) * spec.b1**k
    with np.errstate(all="ignore"):
        terms = np.where(w == 0, 0.0, w / spec.b2**k)
    return float(terms.sum() / _one_minus_pow(spec.b1, t))


def _check_invariants(spec: Spec, tree, data, n_steps: int, rng) -> None:
    specs_ = _leaf_specs(tree)
    opt = spec.build()
    params = _to_jax(tree, [np.zeros(s.shape) for s in specs_])
    state = opt.init(params)
    init_avals = _avals(state)
    prev = [None] * len(specs_)
    bound = _adamax_bound if spec.family == "adamax" else _adam_bound
    for t in range(1, n_steps + 1):
        pattern = data.draw(st.sampled_from(PATTERNS), label=f"pattern[{t}]")
        exponent = data.draw(st.floats(-30, 30), label=f"exponent[{t}]")
        grads_np = []
        for i, s in enumerate(specs_):
            lo, hi = (-8.0, 4.8) if jnp.dtype(s.dtype) == jnp.float16 else (-30.0, 30.0)
            grads_np.append(_draw_values(rng, s, pattern, exponent, prev[i], lo, hi))
        prev = grads_np
        before = _inner(state)
        updates, state = opt.update(_to_jax(tree, grads_np), state)
        after = _inner(state)
        context = f"spec={spec}, tree={tree}, step {t}, pattern {pattern}"
        assert _avals(state) == init_avals, context
        assert int(after.count) == t, context
        got = [_f64(u) for u in jax.tree.leaves(updates)]
        for i, leaf in enumerate(specs_):
            assert not np.any(np.isnan(got[i])), f"NaN update for finite input\n{context}"
            cdt = jnp.promote_types(leaf.dtype, jnp.float32)
            stores = [leaf.dtype, spec.mu_dtype or leaf.dtype, spec.nu_dtype or leaf.dtype]
            slack = 16 * _unit_roundoff(cdt) + 2 * t * max(_unit_roundoff(d) for d in stores)
            limit = bound(spec, t) * (1 + slack)
            # Where the bound exceeds the leaf dtype's range (b2 far below b1², float16) a
            # true direction may overflow to inf; otherwise every update is finite.
            if limit < float(jnp.finfo(leaf.dtype).max):
                assert np.all(np.abs(got[i]) <= limit), (
                    f"|update| {np.abs(got[i]).max()} above the bound {limit}\n{context}"
                )
        if spec.family == "amsgrad":
            for old, new in zip(
                jax.tree.leaves(before.v_max), jax.tree.leaves(after.v_max), strict=True
            ):
                assert np.all(_f64(new) >= _f64(old)), f"v_max decreased\n{context}"
        if spec.family == "adamax":
            for old, new, leaf in zip(
                jax.tree.leaves(before.u), jax.tree.leaves(after.u), specs_, strict=True
            ):
                # b2 is rounded to the compute dtype and u to its storage dtype: one
                # rounding each, and XLA flushes float32 subnormals to zero.
                cdt = jnp.promote_types(leaf.dtype, jnp.float32)
                slack = 2 * (_unit_roundoff(cdt) + _unit_roundoff(leaf.dtype))
                floor = (
                    spec.b2 * _f64(old) * (1 - slack)
                    - 2 * float(jnp.finfo(cdt).tiny)
                    - _storage_floor(leaf.dtype)
                )
                assert np.all(_f64(new) >= floor), f"u fell below b2·u\n{context}"


@settings(max_examples=150, **SETTINGS)
@given(
    spec=specs(aliases=False, eps=positive_eps),
    tree=trees,
    n_steps=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_invariants(spec, tree, n_steps, seed, data):
    """For finite gradients from 1e-30 to each dtype's maximum: no NaN update (eps > 0:
    eps = 0 makes a zero gradient 0/0 by design, as in torch and optax); finite updates
    within the update size bound wherever that bound fits the leaf dtype; state types
    fixed; count; AMSGrad's v_max never decreases; Adamax's u never drops below b2·u."""
    if any(jnp.issubdtype(s.dtype, jnp.complexfloating) for s in _leaf_specs(tree)):
        spec = dataclasses.replace(spec, mu_dtype=None)
    _check_invariants(spec, tree, data, n_steps, np.random.default_rng(seed))


# --------------------------------------------------------------------------
# Deterministic checks of the same properties at their edges.
# --------------------------------------------------------------------------

ALL_MODES = (
    [
        Spec("adam", dict(eps_hat=eh, bias_correction=bc, nesterov=n), 0.9, 0.999, 1e-8, 0.0)
        for eh in (False, True)
        for bc in (True, False)
        for n in (False, True)
    ]
    + [
        Spec("amsgrad", dict(eps_hat=eh, bias_correction=bc, max_of=mo), 0.9, 0.999, 1e-8, 0.0)
        for eh in (False, True)
        for bc in (True, False)
        for mo in ("raw", "corrected")
    ]
    + [Spec("adamax", dict(eps_in_max=e), 0.9, 0.999, 1e-8, 0.0) for e in (False, True)]
)


def _mode_id(spec: Spec) -> str:
    return spec.family + "-" + "-".join(f"{k}={v}" for k, v in spec.opts.items())


@pytest.mark.parametrize("spec", ALL_MODES, ids=_mode_id)
def test_count_saturates_and_step_stays_exact(spec):
    params = {"w": jnp.array([0.5, -2.0, 3.0], jnp.float32), "z": jnp.zeros((), jnp.float64)}
    grads = {"w": jnp.array([1.0, -0.25, 4.0], jnp.float32), "z": jnp.asarray(2.0, jnp.float64)}
    opt = spec.build()
    state = opt.init(params)
    near_max = jnp.asarray(INT32_MAX - 1, jnp.int32)
    state = state._replace(count=near_max)
    ref_states = []
    for m in jax.tree.leaves(state.m):
        zeros = np.zeros_like(_f64(m))
        ref_states.append(dict.fromkeys(["mabs", *_moment_fields(spec)], zeros))
    for _ in range(2):
        updates, state = jax.jit(opt.update)(grads, state)
        assert state.count.dtype == jnp.int32
        assert int(state.count) == INT32_MAX  # saturated, not wrapped to a negative count
        for i, (u, g) in enumerate(
            zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True)
        ):
            want, _, _, ref_states[i], _ = _ref_step(spec, _f64(g), None, ref_states[i], INT32_MAX)
            np.testing.assert_allclose(_f64(u), want, rtol=1e-5)
            assert np.all(np.isfinite(_f64(u)))


@pytest.mark.parametrize("spec", ALL_MODES, ids=_mode_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_zero_and_extreme_finite_gradients_give_finite_updates(spec, dtype):
    """Zero gradients (float16 included: eps=1e-8 is below float16's range), gradients at
    the dtype's largest and smallest magnitudes, and 1e±30, in sequences, must not produce
    NaN or inf."""
    fi = jnp.finfo(dtype)
    big, small = float(fi.max), float(fi.smallest_subnormal)
    seqs = [
        [0.0, 0.0, 0.0],
        [big, -big, big, 0.0],
        [small, -small, 0.0],
        [min(1e30, big), 0.0, 0.0],
        [max(1e-30, small), -max(1e-30, small)],
    ]
    opt = spec.build()
    for seq in seqs:
        state = opt.init(jnp.zeros(2, dtype))
        for g in seq:
            updates, state = opt.update(jnp.full(2, g, dtype), state)
            assert np.all(np.isfinite(_f64(updates))), (seq, g, updates)


@pytest.mark.parametrize("spec", [s for s in ALL_MODES if s.family != "adamax"], ids=_mode_id)
def test_float16_small_gradient_then_zero_gradient_is_finite(spec):
    """float16 params with the default nu_dtype store v in float16. (1-b2)·g² below
    ~3e-8 (|g| < 5.5e-3 at b2=0.999) rounds to 0 there; with a following zero gradient
    the update is m̂/eps ≈ 2e5, beyond float16's maximum."""
    opt = spec.build()
    state = opt.init(jnp.zeros(1, jnp.float16))
    for g in [5e-3, 0.0, 0.0]:
        updates, state = opt.update(jnp.full(1, g, jnp.float16), state)
        assert np.all(np.isfinite(_f64(updates))), (g, updates, state)
        assert np.all(np.abs(_f64(updates)) <= _adam_bound(spec, int(state.count)) * 1.01)


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name
)
def test_constant_small_gradient_gives_unit_steps(dtype):
    """With a constant gradient g, m̂ = g and v̂ = g² at every step, so Adam's direction is
    g/(|g| + eps) ≈ sign(g). Typical small gradients must not lose v to storage rounding."""
    opt = adam_jax.scale_by_adam()
    state = opt.init(jnp.zeros(2, dtype))
    g = jnp.asarray([1e-3, -2e-3], dtype)
    for _ in range(20):
        updates, state = opt.update(g, state)
    np.testing.assert_allclose(_f64(updates), np.sign(_f64(g)), rtol=2e-2)


def _final_update(opt, grads) -> float:
    def step(state, g):
        u, state = opt.update(g, state)
        return state, u

    _, us = jax.lax.scan(step, opt.init(jnp.zeros((), jnp.float64)), jnp.asarray(grads))
    return float(us[-1])


def test_adam_bound_is_attained():
    """The Cauchy–Schwarz bound of ``_adam_bound`` is reached, so it is the right bound to
    assert, and it exceeds the paper's (1-b1)/sqrt(1-b2) for the default betas; optax's
    Adam gives the same value, so the excess is Adam's, not this package's."""
    spec = Spec(
        "adam", dict(eps_hat=False, bias_correction=True, nesterov=False), 0.9, 0.999, 0.0, 0.0
    )
    t = 1000
    bound = _adam_bound(spec, t)
    k = np.arange(t)
    a = 0.1 * 0.9**k / _one_minus_pow(0.9, t)
    b = 0.001 * 0.999**k / _one_minus_pow(0.999, t)
    grads = (a / b)[::-1]  # g_{t-k} ∝ a_k/b_k, oldest first
    for opt in (adam_jax.scale_by_adam(eps=0.0), optax.scale_by_adam(eps=0.0)):
        np.testing.assert_allclose(_final_update(opt, grads), bound, rtol=1e-9)
    assert bound > 1.8 * 0.1 / math.sqrt(0.001)


def test_adamax_bound_is_attained():
    spec = Spec("adamax", dict(eps_in_max=False), 0.9, 0.95, 0.0, 0.0)
    t = 30
    bound = _adamax_bound(spec, t)
    grads = 0.95 ** -np.arange(t)[::-1]  # g_{t-k} = b2^(-k), oldest first
    opt = adam_jax.scale_by_adamax(0.9, 0.95, eps=0.0)
    np.testing.assert_allclose(_final_update(opt, grads), bound, rtol=1e-9)
    assert bound > 1.0  # the paper's |Δ| <= lr for Adamax does not hold for every sequence


@pytest.mark.parametrize("spec", ALL_MODES, ids=_mode_id)
def test_state_types_are_a_valid_scan_carry(spec):
    """lax.scan requires the carry's shapes, dtypes and weak types to be unchanged."""
    params = {
        "a": jnp.ones((2, 3), jnp.float32),
        "b": [jnp.ones((), jnp.bfloat16), jnp.ones(4, jnp.float16)],
        "c": (jnp.ones(2, jnp.float64),),
    }
    for opt in (spec.build(), dataclasses.replace(spec, alias="coupled", lr=1e-2).build()):
        state = opt.init(params)

        def step(carry, g, opt=opt):
            p, s = carry
            u, s = opt.update(jax.tree.map(lambda x: x * g.astype(x.dtype), p), s, p)
            return (optax.apply_updates(p, u), s), None

        (p_out, s_out), _ = jax.lax.scan(step, (params, state), jnp.linspace(1.0, 2.0, 3))
        assert _avals(s_out) == _avals(state)
        assert _avals(p_out) == _avals(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "family", ["adam", "adam_eps_hat", "amsgrad", "amsgrad_corrected", "adamax"]
)
def test_first_step_is_the_sign_of_the_gradient(family, dtype):
    """At t = 1, m̂ = g and v̂ = g² (u = |g| for Adamax) exactly, so with eps = 0 the
    direction is sign(g) for every b1 and b2: a direct check of the bias corrections'
    accuracy across the whole range of betas, to 16 ulps of the compute dtype."""
    make = {
        "adam": lambda b1, b2: adam_jax.scale_by_adam(b1, b2, eps=0.0),
        "adam_eps_hat": lambda b1, b2: adam_jax.scale_by_adam(b1, b2, eps=0.0, eps_hat=True),
        "amsgrad": lambda b1, b2: adam_jax.scale_by_amsgrad(b1, b2, eps=0.0),
        "amsgrad_corrected": lambda b1, b2: adam_jax.scale_by_amsgrad(
            b1, b2, eps=0.0, max_of="corrected"
        ),
        "adamax": lambda b1, b2: adam_jax.scale_by_adamax(b1, b2, eps=0.0),
    }[family]
    betas = [*np.linspace(0.0, 0.999, 37).tolist(), 0.5859375, 0.6, 0.62, 0.9999, 0.999999]
    g = jnp.asarray([3.0, -0.5], dtype)
    worst = {}
    for b1, b2 in [(b, 0.7) for b in betas] + [(0.7, b) for b in betas]:
        opt = make(b1, b2)
        u, _ = opt.update(g, opt.init(jnp.zeros_like(g)))
        err = np.max(np.abs(_f64(u) - np.sign(_f64(g))))
        if err > 16 * float(jnp.finfo(dtype).eps):
            worst[b1, b2] = err
    assert not worst, f"first step is not sign(g) for (b1, b2): max error {worst}"
