"""NAdam and RAdam against live ``torch.optim.NAdam``/``RAdam``, ``optax.nadam``/``radam``
and a transcription of Keras's ``Nadam``.

torch runs with ``torch.set_default_dtype(torch.float64)``, so that its per-param
``mu_product`` and ``step`` are doubles (with the float32 default, torch rounds the
product to float32 at every step). The same hostile gradient sequence
(``_gradients``: 100x spikes, 0.01x lulls, sign flips) is fed to both sides over
200 steps; params must agree to 1e-10 absolute after every step, and torch's
``exp_avg``, ``exp_avg_sq`` and ``mu_product`` must match our state.
"""

from __future__ import annotations

import itertools

import _gradients
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adam_jax

STEPS = 200
LR = 1e-2
SHAPES = _gradients.SHAPES
PARAM_ATOL = 1e-10
MOMENT_RTOL = 1e-12
STATES = (adam_jax.NAdamState, adam_jax.RAdamState, optax.ScaleByAdamState)


pytestmark = pytest.mark.usefixtures("torch_float64")


def inner(state):
    leaves = jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, STATES))
    (found,) = [s for s in leaves if isinstance(s, STATES)]
    return found


def jax_tree(tree, dtype=jnp.float64):
    return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


def run_ours(opt, steps=STEPS, dtype=jnp.float64, seed=0):
    """Params after every step (a list of NumPy dicts) and the state after every step."""
    params = jax_tree(_gradients.initial_params(), dtype)
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    trajectory, states = [], []
    for grads in _gradients.gradient_sequence(steps, seed):
        params, state = step(params, state, jax_tree(grads, dtype))
        trajectory.append({k: np.asarray(v, np.float64) for k, v in params.items()})
        states.append(state)
    return trajectory, states


def run_torch(cls, kwargs, steps=STEPS, foreach=False):
    """torch's params after every step, and its optimizer state after every step."""
    params = {
        k: torch.tensor(v, requires_grad=True) for k, v in _gradients.initial_params().items()
    }
    opt = cls(list(params.values()), foreach=foreach, **kwargs)
    trajectory, states = [], []
    for grads in _gradients.gradient_sequence(steps):
        for k, p in params.items():
            p.grad = torch.tensor(grads[k])
        opt.step()
        trajectory.append({k: p.detach().numpy().copy() for k, p in params.items()})
        states.append(
            {
                k: {name: torch.as_tensor(x).numpy().copy() for name, x in opt.state[p].items()}
                for k, p in params.items()
            }
        )
    return trajectory, states


def max_param_diff(a, b) -> float:
    return max(float(np.max(np.abs(x[k] - y[k]))) for x, y in zip(a, b, strict=True) for k in x)


# (weight_decay, decoupled, maximize) for both optimizers; momentum_decay for NAdam.
DECAY_MODES = [(0.0, False), (0.1, False), (0.1, True)]
MAXIMIZE = [False, True]
MOMENTUM_DECAYS = [4e-3, 0.0, 0.5, 1.0]
NADAM_CASES = list(itertools.product(MOMENTUM_DECAYS, DECAY_MODES, MAXIMIZE))
RADAM_CASES = list(itertools.product([0.999, 0.99], DECAY_MODES, MAXIMIZE))


def case_id(case) -> str:
    first, (wd, dec), mx = case
    decay = "no_decay" if wd == 0 else ("decoupled" if dec else "coupled")
    return f"{first}-{decay}" + ("-maximize" if mx else "")


def compare_states(ours, theirs, fields):
    for our_state, torch_state in zip(ours, theirs, strict=True):
        mine = inner(our_state)
        for torch_key, field in fields.items():
            for k in SHAPES:
                want = torch_state[k][torch_key]
                np.testing.assert_allclose(
                    np.asarray(
                        getattr(mine, field)[k] if field != "mu_product" else mine.mu_product
                    ),
                    want,
                    rtol=MOMENT_RTOL,
                    atol=MOMENT_RTOL * np.max(np.abs(want)),
                    err_msg=f"{field} vs torch {torch_key}",
                )


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
@pytest.mark.parametrize("case", NADAM_CASES, ids=[case_id(c) for c in NADAM_CASES])
def test_nadam_matches_torch(case, foreach):
    md, (wd, dec), mx = case
    kw = dict(weight_decay=wd, decoupled_weight_decay=dec, maximize=mx)
    theirs, torch_states = run_torch(
        torch.optim.NAdam, dict(lr=LR, momentum_decay=md, **kw), foreach=foreach
    )
    ours, states = run_ours(adam_jax.nadam(LR, momentum_decay=md, **kw))
    assert max_param_diff(ours, theirs) <= PARAM_ATOL
    compare_states(
        states, torch_states, {"exp_avg": "m", "exp_avg_sq": "v", "mu_product": "mu_product"}
    )


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
@pytest.mark.parametrize("case", RADAM_CASES, ids=[case_id(c) for c in RADAM_CASES])
def test_radam_matches_torch(case, foreach):
    b2, (wd, dec), mx = case
    kw = dict(weight_decay=wd, decoupled_weight_decay=dec, maximize=mx)
    theirs, torch_states = run_torch(
        torch.optim.RAdam, dict(lr=LR, betas=(0.9, b2), **kw), foreach=foreach
    )
    ours, states = run_ours(adam_jax.radam(LR, b2=b2, **kw))
    assert max_param_diff(ours, theirs) <= PARAM_ATOL
    compare_states(states, torch_states, {"exp_avg": "m", "exp_avg_sq": "v"})


def test_radam_eps_placement_matches_torch():
    """A large eps tells "eps on sqrt(v)" from "eps on sqrt(v-hat)"."""
    theirs, _ = run_torch(torch.optim.RAdam, dict(lr=LR, eps=1e-2))
    ours, _ = run_ours(adam_jax.radam(LR, eps=1e-2))
    assert max_param_diff(ours, theirs) <= PARAM_ATOL
    other, _ = run_ours(adam_jax.radam(LR, eps=1e-2, form="optax"))
    assert max_param_diff(other, theirs) > 1e3 * PARAM_ATOL


@pytest.mark.parametrize("name", ["nadamw", "radamw"])
def test_w_aliases_are_torch_decoupled(name):
    cls = {"nadamw": torch.optim.NAdam, "radamw": torch.optim.RAdam}[name]
    alias = getattr(adam_jax, name)
    theirs, _ = run_torch(cls, dict(lr=LR, weight_decay=0.05, decoupled_weight_decay=True))
    ours, _ = run_ours(alias(LR, weight_decay=0.05))
    assert max_param_diff(ours, theirs) <= PARAM_ATOL


def test_radam_takes_both_branches_on_this_sequence():
    """Momentum steps while rho_t <= 5, then r_t times Adam with eps on sqrt(v)."""
    radam, _ = run_ours(adam_jax.scale_by_radam())
    adam, _ = run_ours(adam_jax.scale_by_adam(eps_hat=True))
    u, u_adam = steps_of(radam), steps_of(adam)
    t = np.arange(1, STEPS + 1)
    rho_inf = 2 / (1 - 0.999) - 1
    rho = rho_inf - 2 * t * 0.999**t / (1 - 0.999**t)
    r = np.sqrt(np.abs((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)))
    grads = _gradients.gradient_sequence(STEPS)
    assert (rho <= 5).sum() >= 3 and (rho > 5).sum() >= 100
    m_hat = {k: np.zeros(s) for k, s in SHAPES.items()}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    for i in range(STEPS):
        for k in SHAPES:
            m[k] = 0.9 * m[k] + 0.1 * grads[i][k]
            m_hat[k] = m[k] / (1 - 0.9 ** (i + 1))
            want = m_hat[k] if rho[i] <= 5 else r[i] * u_adam[i][k]
            np.testing.assert_allclose(u[i][k], want, rtol=1e-9, atol=1e-12, err_msg=f"step {i}")


def test_momentum_decay_changes_the_trajectory():
    """Negative controls: the schedule matters, and constant-momentum Nadam is not torch's."""
    theirs, _ = run_torch(torch.optim.NAdam, dict(lr=LR))
    slow, _ = run_ours(adam_jax.nadam(LR, momentum_decay=0.0))
    optax_form, _ = run_ours(optax.nadam(LR))
    assert max_param_diff(slow, theirs) > 1e3 * PARAM_ATOL
    assert max_param_diff(optax_form, theirs) > 1e3 * PARAM_ATOL


# --------------------------------------------------------------------------
# optax.
# --------------------------------------------------------------------------

U32 = float(np.finfo(np.float32).eps) / 2


def optax_bound(updates64, rel_per_step):
    """Max |param difference| the float32 error model allows after each step.

    Each float32 step differs from exact arithmetic by ``rel_per_step[t]`` relative
    to that step's size (from the float64 run); errors add up over the steps.
    """
    sizes = np.array([max(np.max(np.abs(u[k])) for k in u) for u in updates64])
    return np.cumsum(sizes * rel_per_step)


def steps_of(trajectory):
    p0 = _gradients.initial_params()
    prev = [p0, *trajectory[:-1]]
    return [{k: t[k] - p[k] for k in t} for t, p in zip(trajectory, prev, strict=True)]


@pytest.mark.parametrize("eps_root", [0.0, 1e-8])
@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_radam_optax_form_matches_optax(eps, eps_root):
    kw = dict(eps=eps, eps_root=eps_root)
    ours, _ = run_ours(adam_jax.radam(LR, form="optax", **kw))
    theirs, _ = run_ours(optax.radam(LR, **kw))
    assert max_param_diff(ours, theirs) <= 1e-12
    ours32, _ = run_ours(adam_jax.radam(LR, form="optax", **kw), dtype=jnp.float32)
    theirs32, _ = run_ours(optax.radam(LR, **kw), dtype=jnp.float32)
    # Per step: a few float32 roundings in each side's update (16 u covers both), plus
    # rho_t, which we form in float32 where optax forms it in float64: an absolute error
    # of ~4 rho_inf u, moving r_t by (1/(rho-4) + 1/(rho-2) + 1/rho)/2 of it, relatively.
    b2, t = 0.999, np.arange(1, STEPS + 1)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    sens = np.where(rho > 5, 0.5 * (1 / (rho - 4) + 1 / (rho - 2) + 1 / rho), 0.0)
    bound = optax_bound(steps_of(ours), 16 * U32 + 4 * rho_inf * U32 * sens)
    for i, (a, b) in enumerate(zip(ours32, theirs32, strict=True)):
        diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
        assert diff <= bound[i], (i, diff, bound[i])


@pytest.mark.parametrize("b1", [0.9, 0.5])
def test_nadam_with_constant_momentum_matches_optax_nadam(b1):
    """``momentum_decay=inf`` makes mu_t = b1: ``optax.nadam``."""
    ours, _ = run_ours(adam_jax.nadam(LR, b1=b1, momentum_decay=float("inf")))
    theirs, _ = run_ours(optax.nadam(LR, b1=b1))
    assert max_param_diff(ours, theirs) <= 1e-12
    ours32, _ = run_ours(adam_jax.nadam(LR, b1=b1, momentum_decay=float("inf")), dtype=jnp.float32)
    theirs32, _ = run_ours(optax.nadam(LR, b1=b1), dtype=jnp.float32)
    # A few float32 roundings per step on each side; our 1 - prod(mu) carries t roundings
    # of the product, relative error t·u·P/(1-P) <= u·b1/(1-b1)^2 (maximised at t = 1).
    bound = optax_bound(steps_of(ours), 16 * U32 + U32 * b1 / (1 - b1) ** 2)
    for i, (a, b) in enumerate(zip(ours32, theirs32, strict=True)):
        diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
        assert diff <= bound[i], (i, diff, bound[i])


# --------------------------------------------------------------------------
# Keras.
# --------------------------------------------------------------------------


class KerasNadam:
    """``keras.optimizers.Nadam`` transcribed to NumPy in float64.

    ``_backend_update_step`` and ``update_step`` of keras/src/optimizers/nadam.py
    (keras-team/keras, Keras 3.x, commit 13de96aef1a4), line for line with ``ops.*``
    replaced by NumPy. ``weight_decay`` is applied as the base optimizer's
    ``_apply_weight_decay`` does before the update (``variable - variable * wd * lr``).
    """

    def __init__(self, shapes, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7, wd=None):
        self.learning_rate, self.beta_1, self.beta_2 = learning_rate, beta_1, beta_2
        self.epsilon, self.weight_decay = epsilon, wd
        self.iterations = 0
        self._u_product = 1.0
        self._momentums = {k: np.zeros(s) for k, s in shapes.items()}
        self._velocities = {k: np.zeros(s) for k, s in shapes.items()}

    def _backend_update_step(self, grads, variables):
        self._u_product = (
            self._u_product * self.beta_1 * (1.0 - 0.5 * np.power(0.96, self.iterations + 1.0))
        )
        for k in variables:
            self.update_step(grads[k], variables[k], k)

    def update_step(self, gradient, variable, k):
        lr = self.learning_rate
        local_step = float(self.iterations + 1)
        next_step = float(self.iterations + 2)
        decay = 0.96
        beta_1, beta_2 = self.beta_1, self.beta_2
        u_t = beta_1 * (1.0 - 0.5 * (np.power(decay, local_step)))
        u_t_1 = beta_1 * (1.0 - 0.5 * (np.power(decay, next_step)))
        u_product_t = self._u_product
        u_product_t_1 = u_product_t * u_t_1
        beta_2_power = np.power(beta_2, local_step)
        m, v = self._momentums[k], self._velocities[k]
        m += (gradient - m) * (1 - beta_1)
        v += (np.square(gradient) - v) * (1 - beta_2)
        m_hat = (u_t_1 * m) / (1 - u_product_t_1) + ((1 - u_t) * gradient) / (1 - u_product_t)
        v_hat = v / (1 - beta_2_power)
        variable -= (m_hat * lr) / (np.sqrt(v_hat) + self.epsilon)

    def apply(self, grads, variables):
        if self.weight_decay is not None:
            for k in variables:
                variables[k] -= variables[k] * self.weight_decay * self.learning_rate
        self._backend_update_step(grads, variables)
        self.iterations += 1


@pytest.mark.parametrize("wd", [None, 0.05])
def test_nadam_momentum_decay_one_is_keras(wd):
    keras = KerasNadam(SHAPES, LR, wd=wd)
    variables = _gradients.initial_params()
    theirs = []
    for grads in _gradients.gradient_sequence(STEPS):
        keras.apply(grads, variables)
        theirs.append({k: v.copy() for k, v in variables.items()})
    opt = adam_jax.nadam(
        LR, eps=1e-7, momentum_decay=1.0, weight_decay=wd or 0.0, decoupled_weight_decay=True
    )
    ours, _ = run_ours(opt)
    assert max_param_diff(ours, theirs) <= PARAM_ATOL
    default, _ = run_ours(adam_jax.nadam(LR, eps=1e-7, weight_decay=wd or 0.0))
    assert max_param_diff(default, theirs) > 1e3 * PARAM_ATOL
