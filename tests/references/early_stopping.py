"""Early stopping on a validation loss: a regression that overfits, and the patience rule."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SETTINGS = dict(n_train=20, n_val=200, degree=12, noise=0.3, learning_rate=0.01, patience=200)


def overfit_data(
    n_train: int = SETTINGS["n_train"],
    n_val: int = SETTINGS["n_val"],
    degree: int = SETTINGS["degree"],
    noise: float = SETTINGS["noise"],
    seed: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A regression that overfits, for early stopping on a validation loss.

    It has 20 noisy samples of ``sin(πx)`` on [-1, 1] and a degree-12
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


class PatienceResult(NamedTuple):
    stop_step: int | None  # index of the value at which the loop stopped; None if it never did
    best_step: int  # index of the best value (-1 if none improved)
    best_value: float


def patience_rule(values, patience: int, min_delta: float = 0.0) -> PatienceResult:
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
                return PatienceResult(i, best_step, best)
    return PatienceResult(None, best_step, best)
