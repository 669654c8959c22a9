"""Adam from scratch on a linear regression that stops at MSE < 1, in NumPy."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

SETTINGS = dict(alpha=0.01, beta1=0.9, beta2=0.999, epsilon=1e-8, max_iterations=100_000)


class Result(NamedTuple):
    weights: np.ndarray  # (1, d), after the last update the loop made
    stop_iteration: int  # iterationCount at which the loop broke
    updates: int  # updates the loop applied (stop_iteration + 1)
    mses: np.ndarray  # the MSE computed at each iteration, before its update
    trajectory: np.ndarray  # (updates + 1, d): weights before each update, then the final


def data(n: int = 200, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The exercise's "Sample Data", which it does not show.

    ``x`` is ``(n, 4)`` with a column of ones (the intercept); ``y = x·w + noise``
    with ``w = (4, 2, -3, 1.5)`` and noise of standard deviation 0.5, so an MSE
    below 1 (the stopping rule) is reachable. Float64, like NumPy's default.
    """
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.ones((n, 1)), rng.standard_normal((n, 3))], axis=1)
    w = np.array([[4.0, 2.0, -3.0, 1.5]])
    y = x @ w.T + 0.5 * rng.standard_normal((n, 1))
    return x, y


def loss(weights: Any, x: Any, y: Any) -> tuple[Any, Any]:
    """``(loss, mse)`` for weights of shape ``(1, d)``, in NumPy or JAX alike.

    The loop's gradient, ``-xᵀ(y - x·wᵀ)``, is that of half the sum of squares, which
    is therefore the loss; the MSE it prints and stops on is the monitored metric.
    """
    error = y - x @ weights.T
    squares = (error**2).sum()
    return 0.5 * squares, squares / x.shape[0]


def numpy_adam(
    x: np.ndarray,
    y: np.ndarray,
    *,
    alpha: float = SETTINGS["alpha"],
    beta1: float = SETTINGS["beta1"],
    beta2: float = SETTINGS["beta2"],
    max_iterations: int = SETTINGS["max_iterations"],
    print_every: int | None = None,
) -> Result:
    """The exercise's "Final Code", line for line.

    Its last line is cut off after ``if(... < 1):``; the only sensible body is
    ``break``. The MSE is measured *before* the iteration's update and the check
    comes *after* it, so the loop applies one update past the point where the error
    fell below 1.
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
    return Result(weights, iterationCount, iterationCount + 1, np.asarray(mses), np.asarray(traj))
