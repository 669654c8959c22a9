"""The four seed documents' problems and code, transcribed to NumPy.

These are references, not adam_jax code: each function below is the seed's
own algorithm, kept as close to the text as runnable Python allows, so that
the tests, the demo and the notebooks can compare adam_jax against it.

Where a seed leaves something out (seed 001 never shows its data or its
hyperparameters; seed 003 never shows ``compute_gradients``), the choice made
here is stated in the docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# --------------------------------------------------------------------------
# Seed 000: the epsilon coefficient. A 2-layer MLP trained with AMSGrad.
# --------------------------------------------------------------------------

SEED000 = dict(N=64, D_in=1000, H=100, D_out=10, learning_rate=1e-4, eps=1e-8, steps=500)


def seed000_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and targets of seed 000's shapes (N=64, D_in=1000, D_out=10)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SEED000["N"], SEED000["D_in"])).astype(np.float32)
    y = rng.standard_normal((SEED000["N"], SEED000["D_out"])).astype(np.float32)
    return x, y


def seed000_init(seed: int = 0) -> dict[str, np.ndarray]:
    """``torch.nn.Linear``'s default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), in NumPy.

    Weights are stored as ``(in, out)`` so the forward pass is ``x @ w + b``.
    """
    rng = np.random.default_rng(seed + 1)
    d_in, h, d_out = SEED000["D_in"], SEED000["H"], SEED000["D_out"]

    def uniform(fan_in, shape):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return {
        "w1": uniform(d_in, (d_in, h)),
        "b1": uniform(d_in, (h,)),
        "w2": uniform(h, (h, d_out)),
        "b2": uniform(h, (d_out,)),
    }


def seed000_loss(params, x, y, xp=np):
    """Seed 000's model and loss: Linear, ReLU, Linear, ``MSELoss(reduction='sum')``."""
    hidden = xp.maximum(x @ params["w1"] + params["b1"][None, :], 0.0)
    pred = hidden @ params["w2"] + params["b2"][None, :]
    return xp.sum((pred - y) ** 2)


def seed000_torch_losses(params, x, y) -> np.ndarray:
    """Seed 000's PyTorch loop: AMSGrad (lr 1e-4, eps 1e-8) for 500 steps from ``params``.

    ``params`` is a dict in :func:`seed000_init`'s layout (weights ``(in, out)``);
    ``x`` and ``y`` are float32 NumPy arrays. Returns the loss before each step.
    Needs torch (imported here, so the rest of this module does not).
    """
    import torch

    s = SEED000
    model = torch.nn.Sequential(
        torch.nn.Linear(s["D_in"], s["H"]), torch.nn.ReLU(), torch.nn.Linear(s["H"], s["D_out"])
    )
    with torch.no_grad():  # torch stores Linear weights as (out, in)
        model[0].weight.copy_(torch.from_numpy(np.ascontiguousarray(params["w1"].T)))
        model[0].bias.copy_(torch.from_numpy(np.asarray(params["b1"])))
        model[2].weight.copy_(torch.from_numpy(np.ascontiguousarray(params["w2"].T)))
        model[2].bias.copy_(torch.from_numpy(np.asarray(params["b2"])))
    x, y = torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y))
    loss_fn = torch.nn.MSELoss(reduction="sum")
    optimizer = torch.optim.Adam(
        model.parameters(), lr=s["learning_rate"], eps=s["eps"], amsgrad=True
    )
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small only pay for threading, badly on a busy CPU
    try:
        for _ in range(s["steps"]):
            loss = loss_fn(model(x), y)
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return np.asarray(losses)


# --------------------------------------------------------------------------
# Seed 001: Adam on linear regression, written out in NumPy.
# --------------------------------------------------------------------------


class Seed001Result(NamedTuple):
    weights: np.ndarray  # (1, d), after the last update the loop made
    stop_iteration: int  # iterationCount at which the loop broke
    updates: int  # updates the loop applied (stop_iteration + 1)
    mses: np.ndarray  # the MSE computed at each iteration, before its update
    trajectory: np.ndarray  # (updates + 1, d): weights before each update, then the final


SEED001 = dict(alpha=0.01, beta1=0.9, beta2=0.999, epsilon=1e-8, max_iterations=100_000)


def seed001_data(n: int = 200, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Seed 001's "Sample Data", which the seed does not show.

    ``x`` is ``(n, 4)`` with a column of ones (the intercept); ``y = x·w + noise``
    with ``w = (4, 2, -3, 1.5)`` and noise of standard deviation 0.5, so an MSE
    below 1 (the seed's stopping rule) is reachable. Float64, like NumPy's default.
    """
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.ones((n, 1)), rng.standard_normal((n, 3))], axis=1)
    w = np.array([[4.0, 2.0, -3.0, 1.5]])
    y = x @ w.T + 0.5 * rng.standard_normal((n, 1))
    return x, y


def seed001_mse(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    error = y - np.matmul(x, weights.T)
    return float(np.sum(np.power(error, 2)) / x.shape[0])


def seed001_numpy_adam(
    x: np.ndarray,
    y: np.ndarray,
    *,
    alpha: float = SEED001["alpha"],
    beta1: float = SEED001["beta1"],
    beta2: float = SEED001["beta2"],
    max_iterations: int = SEED001["max_iterations"],
    print_every: int | None = None,
) -> Seed001Result:
    """Seed 001's "Final Code", line for line.

    The seed's last line is cut off after ``if(... < 1):``; the only sensible
    body is ``break``. The MSE is measured *before* the iteration's update and
    the check comes *after* it, so the loop applies one update past the point
    where the error fell below 1.
    """
    weights = np.zeros((1, x.shape[1]))
    moment1 = np.zeros((x.shape[1], 1))
    moment2 = np.zeros((x.shape[1], 1))
    epsilon = 1.000000 / np.power(10, 8)
    mses, traj = [], [weights.ravel().copy()]
    iterationCount = -1
    for iterationCount in range(max_iterations):
        error = y - np.matmul(x, weights.T)
        gradient = -np.matmul(x.T, error)
        moment1 = (beta1 * moment1) + (1 - beta1) * gradient
        moment2 = (beta2 * moment2) + (1 - beta2) * np.power(gradient, 2)
        moment1hat = moment1 / (1 - np.power(beta1, iterationCount + 1))
        moment2hat = moment2 / (1 - np.power(beta2, iterationCount + 1))
        weights = weights - ((alpha * moment1hat) / (np.sqrt(moment2hat) + epsilon)).T
        traj.append(weights.ravel().copy())
        mse = np.sum(np.power(error, 2)) / x.shape[0]
        mses.append(mse)
        if print_every and iterationCount % print_every == 0:
            print(f"epoch {iterationCount} RMSE Error {mse}")
        if mse < 1:
            break
    return Seed001Result(
        weights, iterationCount, iterationCount + 1, np.asarray(mses), np.asarray(traj)
    )


# --------------------------------------------------------------------------
# Seed 002: the one-step worked example.
# --------------------------------------------------------------------------

SEED002 = dict(w=0.5, x=3.0, y=4.0, learning_rate=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8)


class Seed002Step(NamedTuple):
    g: float
    m: float
    v: float
    m_hat: float
    v_hat: float
    w: float


def seed002_by_hand(t: int = 1) -> Seed002Step:
    """The worked example's arithmetic, bias-corrected with step ``t``.

    ``t=1`` is correct and gives w = 0.6. The seed divides by ``1 - β^2``
    (``t=2``) although it is the first step, which gives w ≈ 0.5743.
    """
    s = SEED002
    y_pred = s["w"] * s["x"]
    g = 2 / 1 * (y_pred - s["y"]) * s["x"]
    m = s["beta1"] * 0 + (1 - s["beta1"]) * g
    v = s["beta2"] * 0 + (1 - s["beta2"]) * g**2
    m_hat = m / (1 - s["beta1"] ** t)
    v_hat = v / (1 - s["beta2"] ** t)
    w = s["w"] - s["learning_rate"] * m_hat / (np.sqrt(v_hat) + s["epsilon"])
    return Seed002Step(g, m, v, m_hat, v_hat, float(w))


# --------------------------------------------------------------------------
# Seed 003: Adamax.
# --------------------------------------------------------------------------


def seed003_data(n: int = 100, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Data for seed 003's ``compute_gradients``: a linear regression ``(x, y)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2))
    y = x @ np.array([1.0, -2.0]) + 0.1 * rng.standard_normal(n)
    return x, y


def seed003_compute_gradients(data, theta):
    """The gradient of the mean squared error ``mean((x·θ - y)²)``; seed 003 omits it."""
    x, y = data
    return 2.0 * x.T @ (x @ theta - y) / x.shape[0]


def seed003_adamax(data, theta, lr=1e-2, beta1=0.9, beta2=0.999, epsilon=1e-6, num_iterations=1000):
    """Seed 003's ``Adamax`` function, as printed (its ``vt`` is the infinity norm ``u``)."""
    mt = np.zeros(theta.shape[0])
    vt = np.zeros(theta.shape[0])
    for t in range(num_iterations):
        gradients = seed003_compute_gradients(data, theta)
        mt = beta1 * mt + (1.0 - beta1) * gradients
        vt = np.maximum(beta2 * vt, np.abs(gradients))
        mt_hat = mt / (1.0 - beta1 ** (t + 1))
        theta = theta - ((lr / (vt + epsilon)) * mt_hat)
    return theta


# --------------------------------------------------------------------------
# Seed 002, second part: early stopping on a validation loss.
# --------------------------------------------------------------------------

SEED002_ES = dict(n_train=20, n_val=200, degree=12, noise=0.3, learning_rate=0.01, patience=200)


def seed002_overfit_data(
    n_train: int = SEED002_ES["n_train"],
    n_val: int = SEED002_ES["n_val"],
    degree: int = SEED002_ES["degree"],
    noise: float = SEED002_ES["noise"],
    seed: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A regression that overfits, for seed 002's early stopping.

    Seed 002 describes early stopping ("stop training the model when the
    performance on the validation set is getting worse") without an example.
    This one has 20 noisy samples of ``sin(πx)`` on [-1, 1] and a degree-12
    Legendre polynomial model: trained long enough, the polynomial fits the
    noise and the loss on 200 fresh samples rises again.

    Returns:
      ``(x_train, y_train, x_val, y_val)``; the ``x`` are Legendre features of
      shape ``(n, degree + 1)``, float64.
    """
    rng = np.random.default_rng(seed)

    def sample(n):
        x = rng.uniform(-1.0, 1.0, n)
        y = np.sin(np.pi * x) + noise * rng.standard_normal(n)
        return np.polynomial.legendre.legvander(x, degree), y

    x_train, y_train = sample(n_train)
    x_val, y_val = sample(n_val)
    return x_train, y_train, x_val, y_val


class EarlyStoppingReference(NamedTuple):
    stop_step: int | None  # index of the value at which the loop stopped; None if it never did
    best_step: int  # index of the best value (-1 if none improved)
    best_value: float


def early_stopping_reference(
    values, patience: int, min_delta: float = 0.0
) -> EarlyStoppingReference:
    """The patience rule, as a plain loop over monitored values (lower is better).

    Keras's ``EarlyStopping`` rule: a value improves when it is below
    ``best - min_delta``; otherwise a counter grows, and the loop stops when the
    counter reaches ``patience``. (Keras also stops on an improving epoch when
    ``patience=0``; that quirk is left out.)
    """
    best, best_step, wait = np.inf, -1, 0
    for i, value in enumerate(values):
        if value < best - min_delta:
            best, best_step, wait = float(value), i, 0
        else:
            wait += 1
            if wait >= patience:
                return EarlyStoppingReference(i, best_step, best)
    return EarlyStoppingReference(None, best_step, best)
