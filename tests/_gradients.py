"""The gradient sequences the parity tests feed to adam_jax and to each reference."""

from __future__ import annotations

import numpy as np

SHAPES = {"w": (3, 4), "b": (4,)}


def scale_schedule(steps: int) -> np.ndarray:
    """Per-step gradient scale: 100x spikes, 0.01x lulls and sign flips, so that
    AMSGrad's and Adamax's maxima bind."""
    t = np.arange(steps)
    scale = np.where(t % 17 == 5, 100.0, np.where(t % 13 == 9, 0.01, 1.0))
    return np.where(t % 7 == 3, -scale, scale)


def gradient_sequence(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``steps`` float64 gradient dicts shaped like :data:`SHAPES`."""
    rng = np.random.default_rng(seed)
    return [
        {k: s * rng.standard_normal(shape) for k, shape in SHAPES.items()}
        for s in scale_schedule(steps)
    ]


def initial_params(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape) for k, shape in SHAPES.items()}
