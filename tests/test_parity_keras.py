"""Parity with Keras's Adam and Adamax formulas, transcribed to NumPy.

The references below are ``update_step`` of Keras 3's
``keras/src/optimizers/adam.py`` and ``keras/src/optimizers/adamax.py``
(keras-team/keras, Keras 3.x: adam.py at commit 13de96aef1a4, adamax.py at
commit 2e4420340816), line for line with ``ops.*`` replaced by NumPy, in
float64. Keras is not a dependency: its formulas, not its runtime, are what
``eps_hat=True`` (Adam, AMSGrad) and the default Adamax form claim to reproduce.

Keras's defaults are kept: ``epsilon=1e-7``, ``beta_1=0.9``, ``beta_2=0.999``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import _gradients
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

STEPS = 150
LR = 1e-2
KERAS_EPS = 1e-7
SHAPES = _gradients.SHAPES
TARGET = np.array([1.0, -2.0, 0.5])
PARAM_ATOL = 1e-12
MOMENT_RTOL = 1e-12


class KerasAdam:
    """``keras.optimizers.Adam.update_step`` (keras/src/optimizers/adam.py), per variable."""

    def __init__(
        self, shapes, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False
    ):
        self.learning_rate, self.beta_1, self.beta_2 = learning_rate, beta_1, beta_2
        self.epsilon, self.amsgrad = epsilon, amsgrad
        self.iterations = 0
        self.m = {k: np.zeros(s) for k, s in shapes.items()}
        self.v = {k: np.zeros(s) for k, s in shapes.items()}
        self.v_hat = {k: np.zeros(s) for k, s in shapes.items()}

    def update_step(self, gradient, variable, k):
        lr = self.learning_rate
        local_step = float(self.iterations + 1)
        beta_1_power = np.power(self.beta_1, local_step)
        beta_2_power = np.power(self.beta_2, local_step)
        m, v = self.m[k], self.v[k]
        alpha = lr * np.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m += (gradient - m) * (1 - self.beta_1)
        v += (np.square(gradient) - v) * (1 - self.beta_2)
        if self.amsgrad:
            v_hat = self.v_hat[k]
            v_hat[...] = np.maximum(v_hat, v)
            v = v_hat
        variable -= (m * alpha) / (np.sqrt(v) + self.epsilon)

    def apply(self, grads, variables):
        for k in variables:
            self.update_step(grads[k], variables[k], k)
        self.iterations += 1


class KerasAdamax:
    """``keras.optimizers.Adamax.update_step`` (keras/src/optimizers/adamax.py), per variable."""

    def __init__(self, shapes, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.learning_rate, self.beta_1, self.beta_2 = learning_rate, beta_1, beta_2
        self.epsilon = epsilon
        self.iterations = 0
        self.m = {k: np.zeros(s) for k, s in shapes.items()}
        self.u = {k: np.zeros(s) for k, s in shapes.items()}

    def update_step(self, gradient, variable, k):
        lr = self.learning_rate
        local_step = float(self.iterations + 1)
        beta_1_power = np.power(self.beta_1, local_step)
        m, u = self.m[k], self.u[k]
        m += (gradient - m) * (1 - self.beta_1)
        u[...] = np.maximum(self.beta_2 * u, np.abs(gradient))
        variable -= (lr * m) / ((1 - beta_1_power) * (u + self.epsilon))

    def apply(self, grads, variables):
        for k in variables:
            self.update_step(grads[k], variables[k], k)
        self.iterations += 1


class Case(NamedTuple):
    keras: Callable[[], object]
    ours: optax.GradientTransformation
    # field of our state -> attribute of the Keras transcription
    moments: dict


CASES = {
    "Adam": Case(
        lambda: KerasAdam(SHAPES, LR),
        adam_jax.adam(LR, eps=KERAS_EPS, eps_hat=True),
        {"m": "m", "v": "v"},
    ),
    "Adam-amsgrad": Case(
        lambda: KerasAdam(SHAPES, LR, amsgrad=True),
        adam_jax.amsgrad(LR, eps=KERAS_EPS, eps_hat=True, max_of="raw"),
        {"m": "m", "v": "v", "v_max": "v_hat"},
    ),
    "Adam-eps1e-3": Case(
        lambda: KerasAdam(SHAPES, LR, epsilon=1e-3),
        adam_jax.adam(LR, eps=1e-3, eps_hat=True),
        {"m": "m", "v": "v"},
    ),
    "Adam-amsgrad-eps1e-3": Case(
        lambda: KerasAdam(SHAPES, LR, epsilon=1e-3, amsgrad=True),
        adam_jax.amsgrad(LR, eps=1e-3, eps_hat=True),
        {"m": "m", "v": "v", "v_max": "v_hat"},
    ),
    "Adamax": Case(
        lambda: KerasAdamax(SHAPES, LR), adam_jax.adamax(LR, eps=KERAS_EPS), {"m": "m", "u": "u"}
    ),
    "Adamax-eps1e-3": Case(
        lambda: KerasAdamax(SHAPES, LR, epsilon=1e-3),
        adam_jax.adamax(LR, eps=1e-3),
        {"m": "m", "u": "u"},
    ),
}

GRADS = [pytest.param(False, id="fixed_grads"), pytest.param(True, id="grads_from_params")]
STATE_TYPES = (adam_jax.AdamState, adam_jax.AMSGradState, adam_jax.AdamaxState)


def scale_schedule(steps: int = STEPS) -> np.ndarray:
    return _gradients.scale_schedule(steps)


def gradient_sequence(steps: int = STEPS, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return _gradients.gradient_sequence(steps, seed)


initial_params = _gradients.initial_params


def quartic_grad(p, xp):
    """Gradient of ``½|w·b - t|² + ¼Σw⁴ + ¼Σb⁴``, written out for NumPy and jnp alike."""
    r = p["w"] @ p["b"] - xp.asarray(TARGET)
    return {"w": r[:, None] * p["b"][None, :] + p["w"] ** 3, "b": p["w"].T @ r + p["b"] ** 3}


def inner_state(state):
    found = [s for s in state if isinstance(s, STATE_TYPES)]
    assert len(found) == 1, state
    return found[0]


@pytest.mark.parametrize("from_params", GRADS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_keras_formulas(name, from_params):
    case = CASES[name]
    keras, opt = case.keras(), case.ours
    keras_params = initial_params()

    @jax.jit
    def step(params, state, grads, scale):
        if from_params:
            grads = jax.tree.map(lambda g: scale * g, quartic_grad(params, jnp))
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {k: jnp.asarray(v) for k, v in keras_params.items()}
    state = opt.init(params)
    binds = 0
    for t, (grads, scale) in enumerate(zip(gradient_sequence(), scale_schedule(), strict=True)):
        if from_params:
            keras_grads = {k: scale * g for k, g in quartic_grad(keras_params, np).items()}
        else:
            keras_grads = grads
        keras.apply(keras_grads, keras_params)
        params, state = step(params, state, grads, scale)
        inner = inner_state(state)
        for k in SHAPES:
            err = np.max(np.abs(np.asarray(params[k]) - keras_params[k]))
            assert err <= PARAM_ATOL, f"step {t}, param {k!r}: max |diff| = {err:.3e}"
            for field, attr in case.moments.items():
                ref = getattr(keras, attr)[k]
                np.testing.assert_allclose(
                    np.asarray(getattr(inner, field)[k]),
                    ref,
                    rtol=MOMENT_RTOL,
                    atol=MOMENT_RTOL * np.max(np.abs(ref)),
                    err_msg=f"step {t}: {field}[{k!r}]",
                )
            if "v_max" in case.moments:
                binds += bool(np.any(keras.v_hat[k] > keras.v[k]))
    if "v_max" in case.moments:
        assert binds > 0
    moved = max(np.max(np.abs(np.asarray(params[k]) - initial_params()[k])) for k in SHAPES)
    assert moved > 0.05


NOT_KERAS = {
    "adam-without-eps_hat": (lambda: KerasAdam(SHAPES, LR), adam_jax.adam(LR, eps=KERAS_EPS)),
    "amsgrad-max_of-corrected": (
        lambda: KerasAdam(SHAPES, LR, amsgrad=True),
        adam_jax.amsgrad(LR, eps=KERAS_EPS, eps_hat=True, max_of="corrected"),
    ),
    "amsgrad-vs-keras-adam": (
        lambda: KerasAdam(SHAPES, LR),
        adam_jax.amsgrad(LR, eps=KERAS_EPS, eps_hat=True),
    ),
    "adamax-eps_in_max": (
        lambda: KerasAdamax(SHAPES, LR, epsilon=1e-3),
        adam_jax.adamax(LR, eps=1e-3, eps_in_max=True),
    ),
}


@pytest.mark.parametrize("name", list(NOT_KERAS))
def test_other_forms_differ_from_keras(name):
    """Negative control: the options really matter on this gradient sequence."""
    make_keras, opt = NOT_KERAS[name]
    keras = make_keras()
    keras_params = initial_params()
    params = {k: jnp.asarray(v) for k, v in keras_params.items()}
    state = opt.init(params)
    step = jax.jit(opt.update)
    for grads in gradient_sequence():
        keras.apply(grads, keras_params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    diff = max(np.max(np.abs(np.asarray(params[k]) - keras_params[k])) for k in SHAPES)
    assert diff > 1e-9
