"""The process the fault tests kill: a few short fits, with or without checkpoints.

Usage: ``python tests/_fault_worker.py MODE WORKDIR [--die-on-save=SECONDS]``, MODE one of
``plain``, ``checkpoint`` (fits), ``batched-plain`` and ``batched-checkpoint``
(fit_batched runs), for tests/test_fault_tolerance.py. The tests start these processes
through ``python tests/_fault_worker.py serve``, which imports JAX, adam_jax and orbax
once and forks a worker for each request (see ``tests/_faults.py``).

Every run's result goes to ``WORKDIR/{mode}_{name}.npz``. In a checkpoint mode a
watcher thread prints ``saving`` when a checkpoint write starts (orbax's temporary
directory appears), and with ``--die-on-save`` the process sends itself SIGKILL
that many seconds after the first one it sees: a kill in the middle of a save.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
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


def main(argv: list[str]) -> None:
    mode, workdir = argv[0], Path(argv[1])
    die_after = None
    for arg in argv[2:]:
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


def _run_forked(argv: list[str], out: int, err: int) -> None:
    """In a forked child: stdout and stderr to the requester's pipes, then ``main``;
    exits as a Python process would (1 after an uncaught exception, its traceback on
    stderr)."""
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(fd: int) -> None:
    """Fork a worker for each request read from the socket ``fd``.

    A request is the worker's arguments (JSON) with two file descriptors, its stdout and
    stderr; the answer is ``pid N``, and ``exit N CODE`` when it ends (CODE as
    ``subprocess`` gives it: -9 for SIGKILL). The server itself has run no JAX
    computation, so each child starts as a new process would, without the imports: JAX
    creates its threads on the first computation, in the child. When the requester
    closes the socket, the server kills what still runs and ends.
    """
    import orbax.checkpoint  # noqa: F401  (what a checkpointed run imports first)

    conn = socket.socket(fileno=fd)
    running: set[int] = set()
    try:
        while True:
            # Requests wake it at once; while workers run, it also looks for their ends.
            if select.select([conn], [], [], 0.005 if running else None)[0]:
                msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
                if not msg:
                    break
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    conn.close()
                    _run_forked(json.loads(msg), *fds)
                for f in fds:
                    os.close(f)
                running.add(pid)
                conn.send(f"pid {pid}".encode())
            while running:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                running.discard(pid)
                conn.send(f"exit {pid} {os.waitstatus_to_exitcode(status)}".encode())
    except BrokenPipeError:
        pass  # the requester is gone
    finally:
        for pid in running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        main(sys.argv[1:])
