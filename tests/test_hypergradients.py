"""Differentiating through the optimizers with respect to their hyperparameters.

``jax.grad`` of the loss after ``STEPS`` updates (>= 3), with respect to every numeric
hyperparameter at once (learning rate, b1, b2, eps, eps_root, weight decay, NAdam's
``momentum_decay``, RAdam's ``threshold``), must be finite and equal to a central finite
difference in float64, for every alias; this is how hyperparameters are meta-learned.
The points include those where a branch of the update switches:

* ``b1 = 0`` and ``b2 = 0`` (the bias corrections take their direct form below 0.5 and
  the decayed moment its clamped form at 0), ``eps = eps_root = weight_decay =
  momentum_decay = 0``: the lower edges of the domains, where the derivative is the
  one-sided one, compared with a one-sided difference.
* RAdam's rectification: the first steps have :math:`\\rho_t` below 4, where
  :math:`r_t` is the square root of a negative number on the branch not taken; its
  derivative must not leak into the taken one (an unguarded ``rho`` makes the
  derivative with respect to ``b2`` NaN). Points just below and just above the
  threshold, both forms, and the branch taken at a tie.
* AMSGrad's running maximum and Adamax's infinity norm, on a run whose gradients shrink,
  so that the held maximum (not the current moment) sets later steps (asserted).
* NAdam's momentum schedule, at torch's ``momentum_decay``, Keras's (1), 0 and ``inf``
  (where the schedule is constant and its derivative 0).

**Where the loss is not differentiable** (see ``docs/numerics.md``), ``jax.grad`` returns:

* RAdam at :math:`\\rho_t` equal to the threshold, a jump: the derivative of the branch
  the comparison selects (``form="torch"``: :math:`\\rho_t > ` threshold, so the
  momentum step; ``"optax"``: ``>=``, the rectified step). The derivative with respect
  to ``threshold`` is 0 everywhere.
* AMSGrad at a tie :math:`v_t = v^{max}_{t-1}`, Adamax at :math:`\\beta_2 u_{t-1} =
  |g_t|` (+ eps), Adamax at :math:`g_t = 0` (:math:`|g|`): kinks; ``lax.max`` gives the
  mean of the two one-sided derivatives, ``lax.abs`` 0 at 0.
* A gradient element exactly 0 while its second moment is 0 (a param the loss does
  not depend on yet), with ``eps_root = 0``: :math:`\\sqrt{v}` has an infinite
  derivative at 0 and the hypergradients are NaN, as in optax (checked live below).
  ``eps_root > 0`` makes them finite.

**Tolerance.** The reference is the difference quotient :math:`D(h)` (central
:math:`(f(x+h)-f(x-h))/2h`, or one-sided :math:`(-3f(x)+4f(x+h)-f(x+2h))/2h` at an
edge), both with truncation error :math:`c h^2 + O(h^4)`. With :math:`D(h)` and
:math:`D(h/2)`, the truncation error of :math:`D(h/2)` is :math:`(D(h)-D(h/2))/3`
(Richardson); we allow twice the difference itself. Rounding: each loss value carries
a relative error of at most :math:`\\kappa u` (:math:`u = 2^{-53}`, :math:`\\kappa =
256` bounds the float64 operations of a few steps), which the stencil weights
(:math:`\\sum|w_i| = 1` central, 4 one-sided, over :math:`h`) turn into
:math:`w\\kappa u \\max|f|/(h/2)`; the gradient's own rounding adds :math:`\\kappa u`
relative. The step is :math:`h = 10^{-4} s`, :math:`s` the hyperparameter's scale (its
value, or for a decay its distance to 0 or 1), near the optimum
:math:`(\\kappa u/|f'''|)^{1/3}` of the two errors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

STEPS = 6
BATCH = 32  # the center and 4 points for each of up to 7 hyperparameters
KAPPA = 256
U = float(np.finfo(np.float64).eps) / 2
DECAYS = ("b1", "b2")

# These programs run once on a few dozen points: compile them for compile time (a third
# less), not for speed.
QUICK = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

A = jnp.array([1.0, 0.3, 2.0, 0.05])
P0 = jnp.array([1.0, -2.0, 0.5, 3.0])


def loss(p: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum(A * p**2) + 0.1 * jnp.sum(p**4)


def run(make: Callable[[dict], Any], hp: dict, p0: jax.Array = P0) -> tuple[jax.Array, Any]:
    """The params and optimizer state after ``STEPS`` updates."""
    opt = make(**hp)

    def step(_: Any, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, STEPS, step, (p0, opt.init(p0)))


@functools.cache
def compiled(name: str) -> Callable[[dict], tuple[jax.Array, dict]]:
    """The final loss and its gradient with respect to the hyperparameters, at a batch of
    hyperparameter points: one program per optimizer (new values do not recompile)."""
    make = OPTIMIZERS[name]

    def f(hp: dict) -> jax.Array:
        return loss(run(make, hp)[0])

    return jax.jit(jax.vmap(jax.value_and_grad(f)), compiler_options=QUICK)


def at(hp_points: list[dict]) -> dict:
    """The points as a batch of ``BATCH`` (padded with the first), so that every batch has
    one shape and each optimizer's program is compiled once."""
    assert len(hp_points) <= BATCH
    hp_points = hp_points + hp_points[:1] * (BATCH - len(hp_points))
    return {k: jnp.asarray([p[k] for p in hp_points], jnp.float64) for k in hp_points[0]}


OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "adam": adam_jax.adam,
    "adam_nesterov_eps_hat": partial(adam_jax.adam, nesterov=True, eps_hat=True),
    "adamw": adam_jax.adamw,
    "amsgrad": adam_jax.amsgrad,
    "amsgrad_corrected": partial(adam_jax.amsgrad, max_of="corrected"),
    "adamax": adam_jax.adamax,
    "adamaxw_eps_in_max": partial(adam_jax.adamaxw, eps_in_max=True),
    "nadam": adam_jax.nadam,
    "nadamw": adam_jax.nadamw,
    "radam": adam_jax.radam,
    "radamw_optax": partial(adam_jax.radamw, form="optax"),
}

ADAM_HP = {
    "learning_rate": 0.1,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-3,
    "eps_root": 1e-4,
    "weight_decay": 0.05,
}
ADAMAX_HP = {"learning_rate": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-3, "weight_decay": 0.05}
NADAM_HP = {
    "learning_rate": 0.1,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-3,
    "momentum_decay": 4e-3,
    "weight_decay": 0.05,
}
RADAM_HP = {**ADAM_HP, "threshold": 5.0}


class Case(NamedTuple):
    optimizer: str
    hp: dict[str, float]
    why: str


def case(optimizer: str, base: dict, why: str, **changes: float) -> Any:
    return pytest.param(Case(optimizer, {**base, **changes}, why), id=f"{optimizer}-{why}")


CASES = [
    *(case(name, ADAM_HP, "typical") for name in ("adam", "adam_nesterov_eps_hat", "adamw")),
    case("adam", ADAM_HP, "b1_zero", b1=0.0),
    case("adam", ADAM_HP, "b2_zero", b2=0.0),
    case("adam", ADAM_HP, "zero_eps_eps_root_wd", eps=0.0, eps_root=0.0, weight_decay=0.0),
    case("adamw", ADAM_HP, "b1_below_half", b1=0.3, b2=0.6),
    # AMSGrad: b2 = 0.6 lets the raw v fall as the gradients shrink, so v_max is held.
    case("amsgrad", ADAM_HP, "held_max", b2=0.6),
    case("amsgrad", ADAM_HP, "b1_zero", b1=0.0, b2=0.6),
    case("amsgrad_corrected", ADAM_HP, "held_max"),
    case("adamax", ADAMAX_HP, "held_norm"),
    case("adamax", ADAMAX_HP, "edges", b1=0.0, eps=0.0, weight_decay=0.0),
    case("adamaxw_eps_in_max", ADAMAX_HP, "held_norm", b2=0.9),
    case("nadam", NADAM_HP, "torch_schedule"),
    case("nadam", NADAM_HP, "keras_schedule", momentum_decay=1.0),
    case("nadam", NADAM_HP, "constant_schedule", momentum_decay=0.0),
    case("nadamw", NADAM_HP, "b1_zero", b1=0.0),
    # b2 = 0.999: rho_2, rho_3 lie in (2, 4) (r_t imaginary off the taken branch),
    # steps 1-5 are momentum steps and step 6 is rectified (rho_6 = 5.994 > 5).
    case("radam", RADAM_HP, "imaginary_r_off_branch"),
    case("radamw_optax", RADAM_HP, "imaginary_r_off_branch"),
    # b2 = 0.9: rho_5 = 4.5806; a threshold just above and just below it.
    case("radam", RADAM_HP, "rho5_just_below_threshold", b2=0.9, threshold=4.63),
    case("radam", RADAM_HP, "rho5_just_above_threshold", b2=0.9, threshold=4.53),
    case("radamw_optax", RADAM_HP, "rho5_just_below_threshold", b2=0.9, threshold=4.63),
    case("radamw_optax", RADAM_HP, "rho5_just_above_threshold", b2=0.9, threshold=4.53),
]


def step_size(name: str, x: float) -> float:
    if name in DECAYS:
        scale = min(x, 1 - x) if x > 0 else 1 - x
    else:
        scale = abs(x) if x != 0 else 1e-2
    return 1e-4 * scale


def stencils(x: float, h: float) -> tuple[list[float], list[float]]:
    """Points and weights of ``D(h)``: central, or one-sided at the lower edge 0."""
    if x == 0:
        return [x, x + h, x + 2 * h], [-1.5 / h, 2 / h, -0.5 / h]
    return [x - h, x + h], [-0.5 / h, 0.5 / h]


def gradient_and_differences(
    name: str, hp: dict
) -> tuple[dict[str, float], dict[str, tuple[float, float, float]]]:
    """The gradient at ``hp``, and ``(D(h), D(h/2), rounding bound of D(h/2))`` for every
    hyperparameter, from one batched evaluation at ``hp`` and every stencil point."""
    plan, points = [], [hp]
    for key, x in hp.items():
        h = step_size(key, x)
        for hh in (h, h / 2):
            xs, ws = stencils(x, hh)
            plan.append((key, len(points), ws))
            points += [{**hp, key: xi} for xi in xs]
    values, grads = compiled(name)(at(points))
    values = np.asarray(values)
    assert np.all(np.isfinite(values)), values
    fmax = float(np.max(np.abs(values)))
    out: dict[str, list[tuple[float, float]]] = {}
    for key, start, ws in plan:
        d = float(np.dot(ws, values[start : start + len(ws)]))
        out.setdefault(key, []).append((d, sum(abs(w) for w in ws) * KAPPA * U * fmax))
    fd = {k: (h[0], half[0], half[1]) for k, (h, half) in out.items()}
    return {k: float(g[0]) for k, g in grads.items()}, fd


@pytest.mark.parametrize("c", CASES)
def test_hypergradients_equal_finite_differences(c: Case) -> None:
    grads, fd = gradient_and_differences(c.optimizer, c.hp)
    assert set(grads) == set(c.hp)
    bad = {k: g for k, g in grads.items() if not np.isfinite(g)}
    assert not bad, f"{c.optimizer} ({c.why}): non-finite hypergradients {bad}"
    for name, g in grads.items():
        d_h, d_half, rounding = fd[name]
        tol = 2 * abs(d_h - d_half) + rounding + KAPPA * U * abs(g)
        assert abs(g - d_half) <= tol, (
            f"{c.optimizer} ({c.why}): d loss / d {name} = {g!r}, finite differences "
            f"{d_half!r} (h: {d_h!r}), |error| {abs(g - d_half):.3g} > tolerance {tol:.3g}"
        )


def test_the_max_branches_are_held() -> None:
    """The AMSGrad and Adamax cases above do exercise the held maximum."""
    for name, hp in [("amsgrad", {**ADAM_HP, "b2": 0.6}), ("amsgrad_corrected", ADAM_HP)]:
        s = run(OPTIMIZERS[name], hp)[1]
        state = next(x for x in s if isinstance(x, adam_jax.AMSGradState))
        v = state.v * (1 if name == "amsgrad" else 1 / (1 - 0.999**STEPS))
        assert bool(jnp.any(state.v_max > v)), name
    for name, hp in [("adamax", ADAMAX_HP), ("adamaxw_eps_in_max", {**ADAMAX_HP, "b2": 0.9})]:
        p, s = run(OPTIMIZERS[name], hp)
        state = next(x for x in s if isinstance(x, adam_jax.AdamaxState))
        assert bool(jnp.any(state.u > jnp.abs(jax.grad(loss)(p)) + 1e-3)), name


def test_nadam_constant_schedule_has_zero_derivative() -> None:
    """``momentum_decay = inf``: the schedule is constant, its derivative 0, the rest finite."""
    _, grads = compiled("nadam")(at([{**NADAM_HP, "momentum_decay": float("inf")}]))
    assert float(grads["momentum_decay"][0]) == 0.0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())


def test_a_zero_gradient_needs_eps_root_as_in_optax() -> None:
    """A param with a zero gradient (v = 0) and eps_root = 0: NaN hypergradients, as
    optax gives; eps_root > 0 makes them finite and equal to optax's."""
    p0 = P0.at[2].set(0.0)  # loss'(0) = 0: v stays 0 there

    def final(make: Callable[[dict], Any], hp: dict) -> jax.Array:
        return loss(run(make, hp, p0)[0])

    hp = at([{"learning_rate": 0.1, "eps_root": 0.0}, {"learning_rate": 0.1, "eps_root": 1e-12}])
    grads = [
        jax.jit(jax.vmap(jax.grad(partial(final, m))), compiler_options=QUICK)
        for m in (adam_jax.adam, optax.adam)
    ]
    g_ours, g_theirs = (g(hp) for g in grads)
    for g in (g_ours, g_theirs):
        for k in hp:
            assert not bool(jnp.isfinite(g[k][0])), (k, g)  # eps_root = 0
            assert bool(jnp.isfinite(g[k][1])), (k, g)  # eps_root = 1e-12
    np.testing.assert_allclose(g_ours["learning_rate"][1], g_theirs["learning_rate"][1], rtol=1e-9)


@pytest.mark.parametrize(("form", "want"), [("torch", 3.0), ("optax", 1.0)])
def test_radam_at_the_threshold_takes_the_documented_branch(form: str, want: float) -> None:
    """At :math:`\\rho_t` equal to the threshold (``b2 = 0``: :math:`\\rho_\\infty =
    \\rho_t = 1` exactly), ``form="torch"`` (``>``) takes the momentum step
    :math:`\\hat m_1 = g`, ``"optax"`` (``>=``) the rectified one, with :math:`r = 1`:
    :math:`g/(|g| + \\epsilon)`."""
    opt = adam_jax.scale_by_radam(b2=0.0, threshold=1.0, eps=0.0, form=form)
    u, _ = opt.update(jnp.array([3.0]), opt.init(jnp.zeros(1)))
    assert float(u[0]) == want
