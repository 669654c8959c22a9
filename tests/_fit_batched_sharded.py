"""Run by tests/test_fit_batched.py with 8 CPU devices: fit_batched sharded vs on one device.

Prints a JSON report: for an Auto and an Explicit mesh, how many devices held
results and whether every field equals the single-device run bit for bit; and the
error that sharded inputs with ``checkpoint_dir`` get.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax

jax.config.update("jax_enable_x64", True)


def make_problem(p):
    x, y, lr = p
    return (lambda w: jnp.mean((x @ w - y) ** 2)), jnp.zeros((3, 1), x.dtype), adam_jax.adam(lr)


def main() -> None:
    rng = np.random.default_rng(0)
    n = 32
    x = rng.normal(size=(n, 64, 3))
    y = x @ rng.normal(size=(n, 3, 1)) + 0.3 * rng.normal(size=(n, 64, 1))
    inputs = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(np.geomspace(3e-3, 0.3, n)))
    kwargs = dict(
        num_steps=500,
        slots=2,
        early_stopping=adam_jax.early_stopping(patience=5, target=0.2, restore_best=True),
    )
    one = adam_jax.fit_batched(make_problem, inputs, **kwargs)
    report = {"devices": jax.device_count()}
    for mode, axis_type in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
        mesh = jax.make_mesh((8,), ("problems",), axis_types=(axis_type,))
        sharded_inputs = jax.device_put(inputs, NamedSharding(mesh, P("problems")))
        with jax.set_mesh(mesh):
            result = adam_jax.fit_batched(make_problem, sharded_inputs, **kwargs)
        # The work counts differ: each device runs its own lanes.
        equal = jax.tree.map(
            lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)),
            one._replace(work=None),
            result._replace(work=None),
        )
        report[mode] = {
            "shards": len(result.num_steps.sharding.device_set),
            "equal": all(jax.tree.leaves(equal)),
        }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            adam_jax.fit_batched(make_problem, sharded_inputs, **kwargs, checkpoint_dir=tmp,
                                 checkpoint_every=10)  # fmt: skip
            report["checkpoint_error"] = None
        except ValueError as e:
            report["checkpoint_error"] = str(e)
        report["checkpoint_dir_empty"] = not any(Path(tmp).iterdir())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
