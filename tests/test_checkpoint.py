"""Checkpoint and resume.

A run is saved in the middle, restored in a fresh Python process and continued there; the
continued trajectory must be bit-identical to an uninterrupted run. Two formats:

* orbax-checkpoint (the ``checkpoint`` extra: ``pip install -e ".[checkpoint]"``), the JAX
  ecosystem's checkpoint library, restoring into the abstract tree of a fresh ``init``;
* a plain ``numpy.savez`` of the leaves, restored with the tree structure (and dtypes) of
  a fresh ``init``: optimizer states are plain pytrees of arrays.

This file is also the script the fresh process runs (see ``__main__`` at the bottom).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

N_STEPS = 12
SAVE_AT = 5
FORMATS = ["orbax", "savez"]

OPTIMIZERS = {
    "adam_schedule_l2": lambda: adam_jax.adam(
        optax.exponential_decay(1e-2, transition_steps=3, decay_rate=0.8), weight_decay=1e-3
    ),
    "adamw_masked": lambda: adam_jax.adamw(
        1e-2, weight_decay=1e-2, mask={"w": True, "b": False, "s": True}
    ),
    "nadam_f32_moments": lambda: adam_jax.adam(
        1e-2, nesterov=True, mu_dtype=jnp.float32, nu_dtype=jnp.float32
    ),
    "amsgrad_corrected_maximize": lambda: adam_jax.amsgrad(1e-2, max_of="corrected", maximize=True),
    "adamaxw": lambda: adam_jax.adamaxw(2e-3, eps_in_max=True),
}


def _params0():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(2), jnp.bfloat16),
        "s": jnp.asarray(rng.standard_normal(()), jnp.float64),
    }


def _data():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 8, 2)), jnp.float32)
    return x, y


def _loss(params, x, y):
    pred = x @ params["w"] + params["b"].astype(jnp.float32)[None, :]
    return jnp.mean((pred - y) ** 2) + (params["s"] - 1.0) ** 2


def _make_step(opt):
    x, y = _data()

    @jax.jit
    def step(params, state, k):
        grads = jax.grad(_loss)(params, x[k % 4], y[k % 4])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _run(opt, params, state, start, stop):
    step = _make_step(opt)
    trajectory = []
    for k in range(start, stop):
        params, state = step(params, state, jnp.int32(k))
        trajectory.append(params)
    return params, state, trajectory


def _template(opt):
    params = _params0()
    return {"params": params, "opt_state": opt.init(params)}


def _bits(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _avals(tree) -> list:
    return [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------
# The two formats.
# --------------------------------------------------------------------------


def save_savez(path: Path, tree, step: int) -> None:
    np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(tree)], step=np.int64(step))


def restore_savez(path: Path, template):
    """Leaves from the file, structure and dtypes from ``template`` (a fresh init).

    numpy writes dtypes it does not know (bfloat16) as raw bytes, so each leaf is
    reinterpreted as its template dtype; a shape or size mismatch is an error, never a
    silent cast.
    """
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as f:
        n_stored = len([k for k in f.files if k.startswith("arr_")])
        if n_stored != len(leaves):
            raise ValueError(f"{path} holds {n_stored} leaves, the template {len(leaves)}")
        stored = [f[f"arr_{i}"] for i in range(n_stored)]
        step = int(f["step"])
    restored = []
    for i, (x, t) in enumerate(zip(stored, leaves, strict=True)):
        if x.shape != t.shape or x.dtype.itemsize != t.dtype.itemsize:
            raise ValueError(f"leaf {i}: stored {x.dtype}{x.shape}, template {t.dtype}{t.shape}")
        restored.append(jnp.asarray(x.view(t.dtype)))
    return treedef.unflatten(restored), step


def save_orbax(path: Path, tree, step: int) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"state": tree, "step": step})
        ckptr.wait_until_finished()


def restore_orbax(path: Path, template):
    import orbax.checkpoint as ocp

    target = {"state": template, "step": 0}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, abstract)
    return restored["state"], int(restored["step"])


SAVE = {"orbax": save_orbax, "savez": save_savez}
RESTORE = {"orbax": restore_orbax, "savez": restore_savez}


def _path(workdir: Path, name: str, fmt: str) -> Path:
    return workdir / (f"{name}.npz" if fmt == "savez" else f"{name}.orbax")


def _formats() -> list[str]:
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        return ["savez"]
    return FORMATS


def resume_all(workdir: Path) -> None:
    """The fresh process: restore every checkpoint, continue, write the bits."""
    results = {}
    for fmt in _formats():
        for name, make in OPTIMIZERS.items():
            opt = make()
            tree, step = RESTORE[fmt](_path(workdir, name, fmt), _template(opt))
            _, state, trajectory = _run(opt, tree["params"], tree["opt_state"], step, N_STEPS)
            results[f"{fmt}/{name}"] = {
                "restored_avals_match": _avals(tree) == _avals(_template(opt)),
                "restored_structure_match": jax.tree.structure(tree)
                == jax.tree.structure(_template(opt)),
                "trajectory": [[b.hex() for b in _bits(p)] for p in trajectory],
                "final_state": [b.hex() for b in _bits(state)],
            }
    (workdir / "resumed.json").write_text(json.dumps(results))


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Run every optimizer to SAVE_AT, save in both formats, resume in one fresh process."""
    workdir = tmp_path_factory.mktemp("checkpoints")
    uninterrupted = {}
    for name, make in OPTIMIZERS.items():
        opt = make()
        params = _params0()
        mid_params, mid_state, _ = _run(opt, params, opt.init(params), 0, SAVE_AT)
        for fmt in _formats():
            SAVE[fmt](
                _path(workdir, name, fmt), {"params": mid_params, "opt_state": mid_state}, SAVE_AT
            )
        _, final_state, trajectory = _run(opt, params, opt.init(params), 0, N_STEPS)
        uninterrupted[name] = {
            "trajectory": [[b.hex() for b in _bits(p)] for p in trajectory[SAVE_AT:]],
            "final_state": [b.hex() for b in _bits(final_state)],
        }
    proc = subprocess.run(
        [sys.executable, __file__, "resume", str(workdir)],
        # The adam_jax beside these tests, not whichever one is installed.
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return uninterrupted, json.loads((workdir / "resumed.json").read_text())


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_in_fresh_process_is_bit_identical(resumed, fmt, name):
    if fmt == "orbax":
        pytest.importorskip("orbax.checkpoint")
    uninterrupted, results = resumed
    got = results[f"{fmt}/{name}"]
    assert got["restored_structure_match"]
    assert got["restored_avals_match"]
    assert len(got["trajectory"]) == N_STEPS - SAVE_AT
    for k, (a, b) in enumerate(
        zip(got["trajectory"], uninterrupted[name]["trajectory"], strict=True)
    ):
        assert a == b, f"params differ at step {SAVE_AT + k + 1}"
    assert got["final_state"] == uninterrupted[name]["final_state"]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_restores_types_dtypes_and_bits(tmp_path, fmt, name):
    if fmt == "orbax":
        pytest.importorskip("orbax.checkpoint")
    opt = OPTIMIZERS[name]()
    params = _params0()
    mid_params, mid_state, _ = _run(opt, params, opt.init(params), 0, 3)
    tree = {"params": mid_params, "opt_state": mid_state}
    SAVE[fmt](_path(tmp_path, name, fmt), tree, 3)
    restored, step = RESTORE[fmt](_path(tmp_path, name, fmt), _template(opt))
    assert step == 3
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert _avals(restored) == _avals(tree)
    assert _bits(restored) == _bits(tree)
    # The state classes (AdamState, ScaleByScheduleState, ...) come back, not dicts.
    assert [type(s) for s in restored["opt_state"]] == [type(s) for s in tree["opt_state"]]


def test_savez_restore_rejects_a_checkpoint_of_another_optimizer(tmp_path):
    adam, amsgrad = OPTIMIZERS["adam_schedule_l2"](), OPTIMIZERS["amsgrad_corrected_maximize"]()
    params = _params0()
    save_savez(tmp_path / "a.npz", {"params": params, "opt_state": adam.init(params)}, 0)
    with pytest.raises(ValueError, match="holds 11 leaves, the template 13"):
        restore_savez(tmp_path / "a.npz", _template(amsgrad))


if __name__ == "__main__":
    # The same numerics configuration as tests/conftest.py.
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if sys.argv[1] == "resume":
        resume_all(Path(sys.argv[2]))
