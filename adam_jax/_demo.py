"""``adam-jax demo``: seed 001's linear regression trained with ``adam_jax.adam``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from adam_jax import _seeds


def run(every: int = 100) -> int:
    x_np, y_np = _seeds.seed001_data()
    ref = _seeds.seed001_numpy_adam(x_np, y_np)
    x, y = jnp.asarray(x_np, jnp.float32), jnp.asarray(y_np, jnp.float32)
    opt = adam_jax.adam(_seeds.SEED001["alpha"])

    def loss_fn(w):
        return jnp.sum((y - x @ w.T) ** 2) / 2

    @jax.jit
    def step(w, state):
        loss, g = jax.value_and_grad(loss_fn)(w)
        updates, state = opt.update(g, state, w)
        return optax.apply_updates(w, updates), state, 2 * loss / x.shape[0]

    w = jnp.zeros((1, x.shape[1]), jnp.float32)
    state = opt.init(w)
    print("seed 001: linear regression with adam_jax.adam(learning_rate=0.01)")
    i = -1
    for i in range(_seeds.SEED001["max_iterations"]):
        w, state, mse = step(w, state)
        if i % every == 0:
            print(f"step {i:5d}  MSE {float(mse):.6f}")
        if mse < 1:
            break
    print(f"step {i:5d}  MSE {float(mse):.6f}  (stopped: MSE < 1)")
    print(f"NumPy loop of seed 001 stopped at iteration {ref.stop_iteration}")
    ok = i == ref.stop_iteration and np.allclose(np.asarray(w), ref.weights, atol=1e-3)
    print("match" if ok else "MISMATCH")
    return 0 if ok else 1
