"""An Adamax function as printed in a classic tutorial: eps added outside the max."""

from __future__ import annotations

from typing import Any

import numpy as np


def data(n: int = 100, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A linear regression ``(x, y)`` for ``compute_gradients``, which the tutorial omits."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2))
    y = x @ np.array([1.0, -2.0]) + 0.1 * rng.standard_normal(n)
    return x, y


def mse(data: tuple[Any, Any], theta: Any) -> Any:
    """``mean((x·θ - y)²)``, in NumPy or JAX alike."""
    x, y = data
    return ((x @ theta - y) ** 2).mean()


def compute_gradients(data: tuple[Any, Any], theta: Any) -> Any:
    """The gradient of :func:`mse`, ``2 xᵀ(x·θ - y) / n``."""
    x, y = data
    return 2.0 * x.T @ (x @ theta - y) / x.shape[0]


def adamax(data, theta, lr=1e-2, beta1=0.9, beta2=0.999, epsilon=1e-6, num_iterations=1000):
    """The tutorial's ``Adamax`` function, as printed (its ``vt`` is the infinity norm ``u``)."""
    mt = np.zeros(theta.shape[0])
    vt = np.zeros(theta.shape[0])
    for t in range(num_iterations):
        gradients = compute_gradients(data, theta)
        mt = beta1 * mt + (1.0 - beta1) * gradients
        vt = np.maximum(beta2 * vt, np.abs(gradients))
        mt_hat = mt / (1.0 - beta1 ** (t + 1))
        theta = theta - ((lr / (vt + epsilon)) * mt_hat)
    return theta
