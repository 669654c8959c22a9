"""The process tests/test_fault_tolerance.py kills: a few short fits, with or without checkpoints.

Usage: ``python tests/_fault_worker.py plain|checkpoint WORKDIR [--die-on-save=SECONDS]``.

Every fit's result goes to ``WORKDIR/{mode}_{name}.npz``. In ``checkpoint`` mode a
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
    if mode == "checkpoint":
        threading.Thread(target=_watch, args=(workdir, die_after), daemon=True).start()
    print("ready", flush=True)
    for name, kw in configs().items():
        kw = dict(kw)
        params, optimizer = kw.pop("params"), kw.pop("optimizer")
        if mode == "checkpoint":
            kw.update(checkpoint_dir=workdir / name, checkpoint_every=EVERY, checkpoint_keep=2)
        result = adam_jax.fit(_loss, params, optimizer, **kw)
        leaves = {f"{i:03d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(result))}
        leaves["tree"] = np.asarray(str(jax.tree.structure(result)))
        np.savez(workdir / f"{mode}_{name}.npz", **leaves)
        print(f"done {name}", flush=True)


if __name__ == "__main__":
    main()
