"""Four classic Adam exercises, their own code and numbers against adam_jax.

The references are the exercises' algorithms as transcribed in ``tests/references``
(the NumPy Adam loop on a linear regression, the worked example's arithmetic, the
``Adamax`` function) and, for the MLP, the model trained by live
``torch.optim.Adam(amsgrad=True)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from references import adamax, amsgrad_mlp, linear_regression, worked_example

import adam_jax


def find_state(state, types):
    found = [s for s in state if isinstance(s, types)]
    assert len(found) == 1, state
    return found[0]


# --------------------------------------------------------------------------
# The MLP: Linear(1000→100), ReLU, Linear(100→10), sum-MSE, AMSGrad, float32.
# --------------------------------------------------------------------------

S0 = amsgrad_mlp.SETTINGS
# float32 reduction-order noise between torch and XLA reaches ~6e-4 relative late
# in the run, where the loss has fallen by eight orders of magnitude; the wrong
# formulas below are off by 0.75 (Adam) and 1e4 (corrected maximum).
MLP_RTOL = 5e-3


@pytest.fixture(scope="module")
def mlp_torch():
    """The tutorial's script run with torch: torch's own initial weights, data and loss curve."""
    torch.manual_seed(0)
    x = torch.randn(S0["N"], S0["D_in"])
    y = torch.randn(S0["N"], S0["D_out"])
    model = torch.nn.Sequential(
        torch.nn.Linear(S0["D_in"], S0["H"]), torch.nn.ReLU(), torch.nn.Linear(S0["H"], S0["D_out"])
    )
    init = {
        "w1": model[0].weight.detach().numpy().T.copy(),
        "b1": model[0].bias.detach().numpy().copy(),
        "w2": model[2].weight.detach().numpy().T.copy(),
        "b2": model[2].bias.detach().numpy().copy(),
    }
    losses = amsgrad_mlp.torch_losses(init, x.numpy(), y.numpy())
    return init, x.numpy(), y.numpy(), losses


def mlp_jax_losses(opt, init, x, y) -> np.ndarray:
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(params):
        # The biases broadcast over the batch, as in torch.nn.Linear.
        with jax.numpy_rank_promotion("allow"):
            return amsgrad_mlp.loss(params, x, y, jnp)

    @jax.jit
    def train(params):
        def body(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        return jax.lax.scan(body, (params, opt.init(params)), None, length=S0["steps"])[1]

    params = {k: jnp.asarray(v) for k, v in init.items()}
    assert all(p.dtype == jnp.float32 for p in params.values())
    losses = np.asarray(train(params))
    assert losses.dtype == np.float32
    return losses.astype(np.float64)


def test_mlp_amsgrad_tracks_torch(mlp_torch):
    init, x, y, torch_losses = mlp_torch
    ours = mlp_jax_losses(adam_jax.amsgrad(S0["learning_rate"], eps=S0["eps"]), init, x, y)
    assert ours[0] == pytest.approx(torch_losses[0], rel=1e-6)  # same model, same start
    np.testing.assert_allclose(ours, torch_losses, rtol=MLP_RTOL)
    # The run trains: the loss falls by orders of magnitude, so the whole curve is tested.
    assert torch_losses[-1] < 1e-3 * torch_losses[0]


@pytest.mark.parametrize(
    "opt",
    [
        pytest.param(
            adam_jax.amsgrad(S0["learning_rate"], eps=S0["eps"], max_of="corrected"),
            id="amsgrad-max_of-corrected",
        ),
        pytest.param(adam_jax.adam(S0["learning_rate"], eps=S0["eps"]), id="adam-no-amsgrad"),
    ],
)
def test_mlp_wrong_formulas_do_not_track_torch(mlp_torch, opt):
    """Negative control: the tolerance above is tight enough to catch a wrong formula."""
    init, x, y, torch_losses = mlp_torch
    ours = mlp_jax_losses(opt, init, x, y)
    rel = np.abs(ours - torch_losses) / torch_losses
    assert np.max(rel) > 20 * MLP_RTOL


# --------------------------------------------------------------------------
# Adam from scratch: the NumPy loop on a linear regression, stopping at MSE < 1.
# --------------------------------------------------------------------------


def test_linear_regression_loop_with_adam_jax():
    """adam_jax.adam driven in the NumPy loop's own iteration: same stop and same weights."""
    x_np, y_np = linear_regression.data()
    ref = linear_regression.numpy_adam(x_np, y_np)
    s = linear_regression.SETTINGS
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    opt = adam_jax.adam(s["alpha"], s["beta1"], s["beta2"], s["epsilon"])

    @jax.jit
    def iteration(weights, state):
        error = y - jnp.matmul(x, weights.T)
        gradient = -jnp.matmul(x.T, error)
        updates, state = opt.update(gradient.T, state, weights)
        mse = jnp.sum(jnp.power(error, 2)) / x.shape[0]
        return optax.apply_updates(weights, updates), state, mse

    weights = jnp.zeros((1, x.shape[1]), jnp.float64)
    state = opt.init(weights)
    mses, trajectory = [], [np.asarray(weights).ravel()]
    iteration_count = -1
    for iteration_count in range(s["max_iterations"]):  # noqa: B007 (read after the loop)
        weights, state, mse = iteration(weights, state)
        mses.append(float(mse))
        trajectory.append(np.asarray(weights).ravel())
        if mse < 1:
            break

    assert 10 < ref.stop_iteration < s["max_iterations"] - 1  # the loop did stop early
    assert iteration_count == ref.stop_iteration
    assert int(find_state(state, adam_jax.AdamState).count) == ref.updates
    np.testing.assert_allclose(np.asarray(weights), ref.weights, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(trajectory), ref.trajectory, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mses, ref.mses, rtol=1e-12)


# --------------------------------------------------------------------------
# The one-step worked example.
# --------------------------------------------------------------------------


def test_worked_example():
    s = worked_example.SETTINGS
    opt = adam_jax.adam(s["learning_rate"])
    w = jnp.asarray(s["w"], jnp.float64)
    grad = jax.grad(lambda w: (w * s["x"] - s["y"]) ** 2)(w)
    assert float(grad) == -15.0

    state = opt.init(w)
    updates, state = opt.update(grad, state, w)
    w = optax.apply_updates(w, updates)
    inner = find_state(state, adam_jax.AdamState)

    # The example's numbers: m = -1.5, v = 0.225, m̂ = -15, v̂ = 225, w = 0.6.
    assert float(inner.m) == pytest.approx(-1.5, rel=1e-14)
    assert float(inner.v) == pytest.approx(0.225, rel=1e-14)
    assert float(inner.m) / (1 - s["beta1"]) == pytest.approx(-15.0, rel=1e-14)
    assert float(inner.v) / (1 - s["beta2"]) == pytest.approx(225.0, rel=1e-12)
    assert float(w) == pytest.approx(0.6, abs=1e-9)

    by_hand = worked_example.by_hand(t=1)
    assert (by_hand.g, by_hand.m, by_hand.v) == pytest.approx((-15.0, -1.5, 0.225))
    assert float(w) == pytest.approx(by_hand.w, rel=1e-14)


def test_worked_example_slip_is_not_adam():
    """The example corrects its first step with t = 2; that gives ≈ 0.5744, not 0.6."""
    slip = worked_example.by_hand(t=2)
    assert slip.w == pytest.approx(0.5744, abs=1e-4)
    assert abs(slip.w - 0.6) > 0.02


# --------------------------------------------------------------------------
# Adamax with eps outside the max.
# --------------------------------------------------------------------------


def adamax_jax(opt, theta0, num_iterations=1000):
    x, y = (jnp.asarray(a) for a in adamax.data())

    @jax.jit
    def run(theta):
        def body(carry, _):
            theta, state = carry
            gradients = adamax.compute_gradients((x, y), theta)
            updates, state = opt.update(gradients, state, theta)
            return (optax.apply_updates(theta, updates), state), None

        return jax.lax.scan(body, (theta, opt.init(theta)), None, length=num_iterations)[0][0]

    return np.asarray(run(jnp.asarray(theta0, jnp.float64)))


THETA0 = [
    pytest.param(np.zeros(2), id="theta0-zeros"),
    pytest.param(np.array([3.0, 1.5]), id="theta0-3,1.5"),
]


@pytest.mark.parametrize("theta0", THETA0)
def test_adamax_function(theta0):
    ref = adamax.adamax(adamax.data(), theta0)
    ours = adamax_jax(adam_jax.adamax(1e-2, eps=1e-6), theta0)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("theta0", THETA0)
def test_adamax_function_is_not_eps_in_max(theta0):
    """torch's and optax's form (eps inside the max) is a different algorithm."""
    ref = adamax.adamax(adamax.data(), theta0)
    other = adamax_jax(adam_jax.adamax(1e-2, eps=1e-6, eps_in_max=True), theta0)
    assert np.max(np.abs(other - ref)) > 1e-12
