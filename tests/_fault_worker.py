"""The process the fault tests kill: a few short fits, with or without checkpoints.

Usage: ``python tests/_fault_worker.py MODE WORKDIR [--die-on-save=SECONDS]``, MODE one of
``plain``, ``checkpoint`` (fits), ``batched-plain`` and ``batched-checkpoint``
(fit_batched runs), for tests/test_fault_tolerance.py.

Every run's result goes to ``WORKDIR/{mode}_{name}.npz``. In a checkpoint mode a
watcher thread prints ``saving`` when a checkpoint write starts (orbax's temporary
directory appears), and with ``--die-on-save`` the process sends itself SIGKILL
that many seconds after the first one it sees: a kill in the middle of a save.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import adam_jax  # noqa: E402

EVERY = 10
BATCHED_EVERY = 25  # iterations


def _regression(dtype):
    t = np.linspace(-1.0, 1.0, 48)
    x = np.stack([np.ones_like(t), t, t**2], axis=1)
    y = x @ np.array([0.5, 2.0, -1.0]) + 0.2 * np.sin(7.0 * t)
    return jnp.asarray(x.reshape(4, 12, 3), dtype), jnp.asarray(y.reshape(4, 12), dtype)


def _loss(params, batch):
    x, y = batch
    error = y - x @ params["w"] - params["b"]
    return 0.5 * jnp.sum(error**2), jnp.mean(error**2)


def configs() -> dict[str, dict]:
    """Short fits covering both dtypes, every history choice, stops and full runs."""
    out = {}
    for name, dtype, history, es, num_steps in [
        ("f32_every1_patience", jnp.float32, None, adam_jax.early_stopping(5, 1e-3), 120),
        ("f64_every3_full", jnp.float64, adam_jax.History.every(3, max_len=25), None, 90),
        ("f32_last7_target", jnp.float32, adam_jax.History.last(7), "target", 150),
        ("f64_none_patience", jnp.float64, adam_jax.History.none(), "patience", 120),
    ]:
        if es == "target":
            es = adam_jax.early_stopping(None, target=0.06, restore_best=False)
        elif es == "patience":
            es = adam_jax.early_stopping(4, 1e-3, mode="min")
        out[name] = dict(
            params={"w": jnp.zeros(3, dtype), "b": jnp.asarray(0.1, dtype)},
            optimizer=adam_jax.adam(0.05),
            num_steps=num_steps,
            data=_regression(dtype),
            has_aux=True,
            early_stopping=es,
            history=history,
        )
    return out


def _batched_data_problem(p):
    x, lr = p  # x sets the params' dtype; the loss reads its batches from data

    def loss(w, batch):
        bx, by = batch
        error = by - bx @ w
        return 0.5 * jnp.sum(error**2), jnp.mean(error**2)

    return loss, jnp.zeros((2, 1), x.dtype), adam_jax.amsgrad(lr)


def batched_configs() -> dict[str, dict]:
    """A fit_batched run whose tail shrinks twice (16 lanes, then 4, then 1); float32 and
    other options are covered in process by tests/test_fault_tolerance.py."""
    rng = np.random.default_rng(0)
    n = 40
    x = rng.normal(size=(n, 16, 2))
    y = x @ (rng.normal(size=(n, 2, 1)) * 2) + 0.3 * rng.normal(size=(n, 16, 1))
    lr = np.geomspace(1e-2, 0.3, n)[rng.permutation(n)]
    f64 = (jnp.asarray(x, jnp.float64), jnp.asarray(lr, jnp.float64))
    batches = tuple(jnp.asarray(a.reshape(n, 4, 4, *a.shape[2:])) for a in (x, y))
    return {
        "b64_patience_last5_data": dict(
            make_problem=_batched_data_problem,
            inputs=f64,
            data=batches,
            has_aux=True,
            num_steps=400,
            slots=16,
            early_stopping=adam_jax.early_stopping(8, 1e-4),
            history=adam_jax.History.last(5),
        ),
    }


def _watch(directory: Path, die_after: float | None) -> None:
    seen: set[str] = set()
    while True:
        for root, dirs, _ in os.walk(directory):
            for d in dirs:
                path = os.path.join(root, d)
                if "orbax-checkpoint-tmp" in d and path not in seen:
                    seen.add(path)
                    print("saving", flush=True)
                    if die_after is not None:
                        time.sleep(die_after)
                        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.001)


def main() -> None:
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    die_after = None
    for arg in sys.argv[3:]:
        if arg.startswith("--die-on-save="):
            die_after = float(arg.split("=", 1)[1])
    # Before the watcher starts: its "saving" (of a write a killed run left) could
    # otherwise share the line.
    print("ready", flush=True)
    if mode.endswith("checkpoint"):
        threading.Thread(target=_watch, args=(workdir, die_after), daemon=True).start()
    batched = mode.startswith("batched")
    for name, kw in (batched_configs() if batched else configs()).items():
        kw = dict(kw)
        if mode.endswith("checkpoint"):
            every = BATCHED_EVERY if batched else EVERY
            kw.update(checkpoint_dir=workdir / name, checkpoint_every=every, checkpoint_keep=2)
        if batched:
            result = adam_jax.fit_batched(kw.pop("make_problem"), kw.pop("inputs"), **kw)
            result = (result._replace(work=None), tuple(result.work))
        else:
            params, optimizer = kw.pop("params"), kw.pop("optimizer")
            result = adam_jax.fit(_loss, params, optimizer, **kw)
        leaves = {f"{i:03d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(result))}
        leaves["tree"] = np.asarray(str(jax.tree.structure(result)))
        np.savez(workdir / f"{mode}_{name}.npz", **leaves)
        print(f"done {name}", flush=True)


if __name__ == "__main__":
    main()
