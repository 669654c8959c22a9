"""fit on sharded inputs, run on 8 CPU devices by tests/test_fit_sharding.py in a subprocess.

Prints one JSON object: for each mesh axis type and case, whether the sharded run
equals the unsharded one (or the error it raised).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import contextlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax

jax.config.update("jax_enable_x64", True)

rng = np.random.default_rng(0)
B = 16
X = rng.normal(size=(B, 24, 3))
Y = X @ rng.normal(size=(B, 3, 1)) + 0.1 * rng.normal(size=(B, 24, 1))
LR = np.geomspace(0.01, 0.1, B)


def one(x, y, lr, **kwargs):
    r = adam_jax.fit(
        lambda w: jnp.mean((x @ w - y) ** 2),
        jnp.zeros((3, 1)),
        adam_jax.adam(lr),
        num_steps=2000,
        early_stopping=adam_jax.early_stopping(patience=20, target=1e-2),
        **kwargs,
    )
    return r


def batches(x, y, lr, **kwargs):
    # data: the 24 rows in 4 batches of 6, cycled.
    r = adam_jax.fit(
        lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2),
        jnp.zeros((3, 1)),
        adam_jax.adam(lr),
        num_steps=500,
        data={"x": x.reshape(4, 6, 3), "y": y.reshape(4, 6, 1)},
        early_stopping=adam_jax.early_stopping(patience=5, restore_best=True),
        **kwargs,
    )
    return r


CASES = {
    "vmap": (one, {}),
    "vmap_log_progress": (one, {"log_every": 500, "progress": True}),
    "vmap_history_last": (one, {"history": adam_jax.History.last(5)}),
    "vmap_data_restore_best": (batches, {}),
    "vmap_history_every": (batches, {"history": adam_jax.History.every(7, 10)}),
}


def equal(a, b) -> bool:
    return all(
        np.allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-12, equal_nan=True)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def main() -> None:
    out = {}
    refs = {
        name: jax.jit(jax.vmap(lambda *a, f=f, k=k: f(*a, **k)))(X, Y, LR)
        for name, (f, k) in CASES.items()
    }
    plain_ref = one(X[0], Y[0], LR[0], log_every=1000)
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
        xs, ys, lrs = (jax.device_put(a, NamedSharding(mesh, P("x"))) for a in (X, Y, LR))
        # Without a context mesh first, so nothing is cached from the set_mesh runs.
        for context in ("no_context", "set_mesh"):

            def scope(context=context, mesh=mesh):
                return jax.set_mesh(mesh) if context == "set_mesh" else contextlib.nullcontext()

            for name, (f, k) in CASES.items():
                key = f"{axis_type.name}/{context}/{name}"
                try:
                    with scope():
                        got = jax.jit(jax.vmap(lambda *a, f=f, k=k: f(*a, **k)))(xs, ys, lrs)
                    out[key] = {
                        "equal": equal(got, refs[name]),
                        "spec": str(got.params.sharding.spec),
                    }
                except Exception as e:
                    out[key] = {"error": f"{type(e).__name__}: {e}"}
            # Plain fit (no vmap) on one problem whose rows are sharded.
            key = f"{axis_type.name}/{context}/plain"
            x0 = jax.device_put(X[0], NamedSharding(mesh, P("x")))
            y0 = jax.device_put(Y[0], NamedSharding(mesh, P("x")))
            try:
                with scope():
                    got = one(x0, y0, LR[0], log_every=1000)
                out[key] = {"equal": equal(got, plain_ref)}
            except Exception as e:
                out[key] = {"error": f"{type(e).__name__}: {e}"}
            # The same loss's gradient, without fit: does JAX accept the sharding at all?
            try:
                with scope():
                    jax.jit(jax.grad(lambda w, x0=x0, y0=y0: jnp.mean((x0 @ w - y0) ** 2)))(
                        jnp.zeros((3, 1))
                    )
                out[key]["grad_alone"] = "ok"
            except Exception as e:
                out[key]["grad_alone"] = type(e).__name__
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
