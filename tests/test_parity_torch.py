"""Parity with live ``torch.optim`` (Adam, AdamW, Adamax) in float64.

Two kinds of run, each over a multi-leaf tree (a matrix and a vector):

* the *same* precomputed gradient sequence is fed to both sides (torch's
  ``param.grad`` is set from the array), with 100x spikes, tiny steps and sign
  flips, so that AMSGrad's running maximum binds;
* gradients of a quartic loss computed separately on each side from that side's
  own params, so that any difference feeds back into the trajectory.

Params must agree to 1e-12 absolute after every step, and the moments torch
keeps (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``exp_inf``) must match
our state's ``m``, ``v``, ``v_max``, ``u``.
"""

from __future__ import annotations

from typing import NamedTuple

import _gradients
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adam_jax

STEPS = 120
LR = 1e-2
SHAPES = _gradients.SHAPES
PARAM_ATOL = 1e-12
MOMENT_RTOL = 1e-12

# optimizer.state[p] key -> field of our state.
ADAM_MOMENTS = {"exp_avg": "m", "exp_avg_sq": "v"}
AMSGRAD_MOMENTS = {**ADAM_MOMENTS, "max_exp_avg_sq": "v_max"}
ADAMAX_MOMENTS = {"exp_avg": "m", "exp_inf": "u"}


class Case(NamedTuple):
    torch_opt: type
    torch_kwargs: dict
    ours: optax.GradientTransformation
    moments: dict


class AdamaxDecoupled(torch.optim.Adamax):
    """``torch.optim.Adamax`` with decoupled weight decay applied as torch applies it for
    Adam, NAdam and RAdam (``torch/optim/adam.py``: ``param.mul_(1 - lr * weight_decay)``
    before the step); torch's Adamax itself has no such option."""

    def __init__(self, params, decoupled_decay: float, **kwargs):
        super().__init__(params, **kwargs)
        self.decoupled_decay = decoupled_decay

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1 - group["lr"] * self.decoupled_decay)
        return super().step(closure)


CASES = {
    "Adam": Case(torch.optim.Adam, {}, adam_jax.adam(LR), ADAM_MOMENTS),
    "Adam-eps1e-3": Case(
        torch.optim.Adam, {"eps": 1e-3}, adam_jax.adam(LR, eps=1e-3), ADAM_MOMENTS
    ),
    "Adam-amsgrad": Case(
        torch.optim.Adam, {"amsgrad": True}, adam_jax.amsgrad(LR), AMSGRAD_MOMENTS
    ),
    "Adam-amsgrad-eps1e-3-weight_decay": Case(
        torch.optim.Adam,
        {"amsgrad": True, "eps": 1e-3, "weight_decay": 0.1},
        adam_jax.amsgrad(LR, eps=1e-3, weight_decay=0.1),
        AMSGRAD_MOMENTS,
    ),
    "Adam-amsgrad-decoupled_weight_decay": Case(
        torch.optim.Adam,
        {"amsgrad": True, "weight_decay": 0.05, "decoupled_weight_decay": True},
        adam_jax.amsgrad(LR, weight_decay=0.05, decoupled_weight_decay=True),
        AMSGRAD_MOMENTS,
    ),
    "Adam-weight_decay": Case(
        torch.optim.Adam,
        {"weight_decay": 0.1},
        adam_jax.adam(LR, weight_decay=0.1),
        ADAM_MOMENTS,
    ),
    "Adam-maximize": Case(
        torch.optim.Adam, {"maximize": True}, adam_jax.adam(LR, maximize=True), ADAM_MOMENTS
    ),
    "Adam-maximize-weight_decay": Case(
        torch.optim.Adam,
        {"maximize": True, "weight_decay": 0.1},
        adam_jax.adam(LR, maximize=True, weight_decay=0.1),
        ADAM_MOMENTS,
    ),
    "AdamW": Case(
        torch.optim.AdamW,
        {"weight_decay": 0.05},
        adam_jax.adamw(LR, weight_decay=0.05),
        ADAM_MOMENTS,
    ),
    "AdamW-maximize": Case(
        torch.optim.AdamW,
        {"weight_decay": 0.05, "maximize": True},
        adam_jax.adamw(LR, weight_decay=0.05, maximize=True),
        ADAM_MOMENTS,
    ),
    "Adam-decoupled_weight_decay": Case(
        torch.optim.Adam,
        {"weight_decay": 0.05, "decoupled_weight_decay": True},
        adam_jax.adam(LR, weight_decay=0.05, decoupled_weight_decay=True),
        ADAM_MOMENTS,
    ),
    "Adam-decoupled_weight_decay-maximize": Case(
        torch.optim.Adam,
        {"weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True},
        adam_jax.adam(LR, weight_decay=0.05, decoupled_weight_decay=True, maximize=True),
        ADAM_MOMENTS,
    ),
    "Adamax": Case(torch.optim.Adamax, {}, adam_jax.adamax(LR, eps_in_max=True), ADAMAX_MOMENTS),
    "Adamax-eps1e-3": Case(
        torch.optim.Adamax,
        {"eps": 1e-3},
        adam_jax.adamax(LR, eps=1e-3, eps_in_max=True),
        ADAMAX_MOMENTS,
    ),
    "Adamax-weight_decay": Case(
        torch.optim.Adamax,
        {"weight_decay": 0.1},
        adam_jax.adamax(LR, weight_decay=0.1, eps_in_max=True),
        ADAMAX_MOMENTS,
    ),
    "Adamax-decoupled_weight_decay": Case(
        AdamaxDecoupled,
        {"decoupled_decay": 0.05},
        adam_jax.adamax(LR, weight_decay=0.05, decoupled_weight_decay=True, eps_in_max=True),
        ADAMAX_MOMENTS,
    ),
    "Adamax-maximize": Case(
        torch.optim.Adamax,
        {"maximize": True},
        adam_jax.adamax(LR, maximize=True, eps_in_max=True),
        ADAMAX_MOMENTS,
    ),
}

CASE_PARAMS = [pytest.param(name, id=name) for name in CASES]
FOREACH = [pytest.param(False, id="single_tensor"), pytest.param(True, id="foreach")]

STATE_TYPES = (adam_jax.AdamState, adam_jax.AMSGradState, adam_jax.AdamaxState)


def scale_schedule(steps: int = STEPS) -> np.ndarray:
    return _gradients.scale_schedule(steps)


def gradient_sequence(steps: int = STEPS, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return _gradients.gradient_sequence(steps, seed)


initial_params = _gradients.initial_params


TARGET = np.array([1.0, -2.0, 0.5])


def quartic_loss(p, target, xp):
    """A loss whose gradient depends on the params; ``xp`` is ``jnp`` or ``torch``."""
    r = p["w"] @ p["b"] - target
    return 0.5 * xp.sum(r**2) + 0.25 * xp.sum(p["w"] ** 4) + 0.25 * xp.sum(p["b"] ** 4)


def inner_state(state):
    """Our scale_by_* state inside an alias's optax.chain state."""
    found = [s for s in state if isinstance(s, STATE_TYPES)]
    assert len(found) == 1, state
    return found[0]


class TorchSide:
    def __init__(self, case: Case, params: dict[str, np.ndarray], foreach: bool):
        self.params = {
            k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()
        }
        self.opt = case.torch_opt(
            list(self.params.values()), lr=LR, foreach=foreach, **case.torch_kwargs
        )

    def step_with(self, grads: dict[str, np.ndarray]) -> None:
        for k, p in self.params.items():
            p.grad = torch.tensor(grads[k], dtype=torch.float64)
        self.opt.step()

    def step_on_loss(self, scale: float) -> None:
        self.opt.zero_grad()
        (scale * quartic_loss(self.params, torch.from_numpy(TARGET), torch)).backward()
        self.opt.step()

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: p.detach().numpy().copy() for k, p in self.params.items()}

    def moment(self, key: str) -> dict[str, np.ndarray]:
        return {k: self.opt.state[p][key].numpy().copy() for k, p in self.params.items()}


def compare(torch_side: TorchSide, params, state, case: Case, step: int) -> None:
    ours = jax.tree.map(np.asarray, params)
    ref = torch_side.numpy_params()
    for k in SHAPES:
        err = np.max(np.abs(ours[k] - ref[k]))
        assert err <= PARAM_ATOL, f"step {step}, param {k!r}: max |diff| = {err:.3e}"
    inner = inner_state(state)
    for torch_key, field in case.moments.items():
        mine = getattr(inner, field)
        theirs = torch_side.moment(torch_key)
        for k in SHAPES:
            np.testing.assert_allclose(
                np.asarray(mine[k]),
                theirs[k],
                rtol=MOMENT_RTOL,
                # m passes through zero; its rounding error is relative to its size.
                atol=MOMENT_RTOL * np.max(np.abs(theirs[k])),
                err_msg=f"step {step}: {field}[{k!r}] vs torch {torch_key}",
            )


def amsgrad_max_binds(state) -> bool:
    inner = inner_state(state)
    if not isinstance(inner, adam_jax.AMSGradState):
        return False
    return any(bool(np.any(inner.v_max[k] > inner.v[k])) for k in SHAPES)


def jax_params(params: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("name", CASE_PARAMS)
def test_same_gradients(name, foreach):
    case = CASES[name]
    p0 = initial_params()
    torch_side = TorchSide(case, p0, foreach)
    opt = case.ours

    # The optimizer is an argument: its hyperparameters are traced float64 leaves.
    @jax.jit
    def step(params, state, grads, opt):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax_params(p0)
    state = opt.init(params)
    binds = 0
    for t, grads in enumerate(gradient_sequence()):
        torch_side.step_with(grads)
        params, state = step(params, state, jax_params(grads), opt)
        compare(torch_side, params, state, case, t)
        binds += amsgrad_max_binds(state)
    if "max_exp_avg_sq" in case.moments:
        # The maximum must have held v_max above v at some step, or the test
        # would not tell AMSGrad from Adam.
        assert binds > 0


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_gradients_from_own_params(name):
    case = CASES[name]
    p0 = initial_params()
    torch_side = TorchSide(case, p0, foreach=False)
    opt = case.ours

    @jax.jit
    def step(params, state, scale):
        grads = jax.grad(lambda p: scale * quartic_loss(p, jnp.asarray(TARGET), jnp))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax_params(p0)
    state = opt.init(params)
    binds = 0
    start = torch_side.numpy_params()
    for t, scale in enumerate(scale_schedule(STEPS)):
        torch_side.step_on_loss(float(scale))
        params, state = step(params, state, jnp.float64(scale))
        compare(torch_side, params, state, case, t)
        binds += amsgrad_max_binds(state)
    # The params really moved, so the feedback is exercised.
    moved = max(np.max(np.abs(np.asarray(params[k]) - start[k])) for k in SHAPES)
    assert moved > 0.05
    if "max_exp_avg_sq" in case.moments:
        assert binds > 0


def test_amsgrad_differs_from_adam_on_this_sequence():
    """Negative control: on the spiky sequence the maximum changes the trajectory."""
    p0 = initial_params()
    runs = []
    for amsgrad in (False, True):
        side = TorchSide(
            Case(torch.optim.Adam, {"amsgrad": amsgrad}, adam_jax.adam(LR), {}), p0, False
        )
        for grads in gradient_sequence():
            side.step_with(grads)
        runs.append(side.numpy_params())
    diff = max(np.max(np.abs(runs[0][k] - runs[1][k])) for k in SHAPES)
    assert diff > 1e3 * PARAM_ATOL
