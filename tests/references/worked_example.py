"""One Adam step worked by hand: L = (w·x - y)², w = 0.5, x = 3, y = 4, lr 0.1 -> w = 0.6."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SETTINGS = dict(w=0.5, x=3.0, y=4.0, learning_rate=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8)


class Step(NamedTuple):
    g: float
    m: float
    v: float
    m_hat: float
    v_hat: float
    w: float


def by_hand(t: int = 1) -> Step:
    """The worked example's arithmetic, bias-corrected with step ``t``.

    ``t=1`` is correct and gives w = 0.6. The example as written divides by
    ``1 - β^2`` (``t=2``) although it is the first step, which gives w ≈ 0.5744.
    """
    s = SETTINGS
    y_pred = s["w"] * s["x"]
    g = 2 / 1 * (y_pred - s["y"]) * s["x"]
    m = s["beta1"] * 0 + (1 - s["beta1"]) * g
    v = s["beta2"] * 0 + (1 - s["beta2"]) * g**2
    m_hat = m / (1 - s["beta1"] ** t)
    v_hat = v / (1 - s["beta2"] ** t)
    w = s["w"] - s["learning_rate"] * m_hat / (np.sqrt(v_hat) + s["epsilon"])
    return Step(g, m, v, m_hat, v_hat, float(w))
