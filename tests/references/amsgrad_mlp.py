"""A two-layer MLP trained with AMSGrad: the classic PyTorch tutorial's loop, in torch.

Linear(1000 -> 100), ReLU, Linear(100 -> 10) on 64 random samples, summed squared
error, ``torch.optim.Adam(amsgrad=True)`` with lr 1e-4 and eps 1e-8 for 500 steps.
"""

from __future__ import annotations

import numpy as np

SETTINGS = dict(N=64, D_in=1000, H=100, D_out=10, learning_rate=1e-4, eps=1e-8, steps=500)


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and targets of the exercise's shapes (N=64, D_in=1000, D_out=10)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SETTINGS["N"], SETTINGS["D_in"])).astype(np.float32)
    y = rng.standard_normal((SETTINGS["N"], SETTINGS["D_out"])).astype(np.float32)
    return x, y


def init(seed: int = 0) -> dict[str, np.ndarray]:
    """``torch.nn.Linear``'s default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), in NumPy.

    Weights are stored as ``(in, out)`` so the forward pass is ``x @ w + b``.
    """
    rng = np.random.default_rng(seed + 1)
    d_in, h, d_out = SETTINGS["D_in"], SETTINGS["H"], SETTINGS["D_out"]

    def uniform(fan_in, shape):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return {
        "w1": uniform(d_in, (d_in, h)),
        "b1": uniform(d_in, (h,)),
        "w2": uniform(h, (h, d_out)),
        "b2": uniform(h, (d_out,)),
    }


def loss(params, x, y, xp=np):
    """The model and loss: Linear, ReLU, Linear, ``MSELoss(reduction='sum')``."""
    hidden = xp.maximum(x @ params["w1"] + params["b1"][None, :], 0.0)
    pred = hidden @ params["w2"] + params["b2"][None, :]
    return xp.sum((pred - y) ** 2)


def torch_losses(params, x, y) -> np.ndarray:
    """The exercise's PyTorch loop: AMSGrad (lr 1e-4, eps 1e-8) for 500 steps from ``params``.

    ``params`` is a dict in :func:`init`'s layout (weights ``(in, out)``);
    ``x`` and ``y`` are float32 NumPy arrays. Returns the loss before each step.
    Needs torch (imported here, so the rest of this module does not).
    """
    import torch

    s = SETTINGS
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
