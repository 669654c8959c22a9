"""Checkpoint and resume of ``adam_jax.fit``, early stopping included.

A run is saved in the middle, while early stopping is waiting out its patience;
a fresh Python process restores it and continues; the result must be bit-identical
to an uninterrupted run: params, optimizer state, early-stopping state (``wait``,
``best_params``, ``best_step``, ``best_value``), the losses and the stopping step.
The data are minibatches that do not divide the checkpoint step, so resuming at the
wrong step would feed the wrong batches. Two formats: a plain ``numpy.savez`` of the
leaves, restored with the tree structure of a fresh ``init``, and orbax-checkpoint.

This file is also the script the fresh process runs (see ``__main__`` at the bottom).
"""

from __future__ import annotations

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
from adam_jax import StopReason

if __name__ == "__main__":  # the fresh process: the settings tests/conftest.py makes
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")

SAVE_AT = 100
TOTAL = 200
PATIENCE = 40
N_BATCHES = 7  # does not divide SAVE_AT
FORMATS = ["savez", "orbax"]


# --------------------------------------------------------------------------
# The run: a regression on minibatches, stopped on a validation loss that
# falls and then rises (the validation target lies 60% of the way to the
# training one), so early stopping is mid-patience at SAVE_AT and stops later.
# --------------------------------------------------------------------------


def problem():
    rng = np.random.default_rng(7)
    d, batch = 5, 16
    w_train = rng.standard_normal(d)
    x = rng.standard_normal((N_BATCHES, batch, d))
    y = x @ w_train + 0.3 * rng.standard_normal((N_BATCHES, batch))
    x_val = jnp.asarray(rng.standard_normal((64, d)))
    y_val = x_val @ (0.6 * w_train)

    def loss_fn(w, b):
        train = jnp.mean((b["x"] @ w - b["y"]) ** 2)
        return train, jnp.mean((x_val @ w - y_val) ** 2)

    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    return loss_fn, data, jnp.zeros(d)


LOSS_FN, DATA, PARAMS0 = problem()
# A schedule, so the optimizer state holds a second count that must resume too.
OPTIMIZER = adam_jax.adam(optax.linear_schedule(0.008, 0.004, 150))
EARLY_STOPPING = adam_jax.early_stopping(PATIENCE, 1e-4)


def fit(num_steps, *, params=PARAMS0, **kwargs):
    return adam_jax.fit(
        LOSS_FN,
        params,
        OPTIMIZER,
        num_steps=num_steps,
        data=DATA,
        has_aux=True,
        early_stopping=EARLY_STOPPING,
        **kwargs,
    )


def run_state(result) -> dict:
    """What a checkpoint holds."""
    return {
        "params": result.last_params,
        "opt_state": result.opt_state,
        "early_stopping_state": result.early_stopping_state,
    }


def resume(state: dict, step, num_steps: int, **kwargs):
    return fit(
        num_steps,
        params=state["params"],
        opt_state=state["opt_state"],
        early_stopping_state=state["early_stopping_state"],
        initial_step=step,
        **kwargs,
    )


def template() -> dict:
    """The tree, shapes and dtypes of a checkpoint, from a fresh init (no computation)."""
    return jax.eval_shape(
        lambda p: {
            "params": p,
            "opt_state": OPTIMIZER.init(p),
            "early_stopping_state": EARLY_STOPPING.init(p),
        },
        PARAMS0,
    )


# --------------------------------------------------------------------------
# The two formats.
# --------------------------------------------------------------------------


def save_savez(path: Path, tree, step: int) -> None:
    np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(tree)], step=np.int64(step))


def restore_savez(path: Path):
    leaves, treedef = jax.tree.flatten(template())
    with np.load(path) as f:
        stored = [f[f"arr_{k}"] for k in range(len(leaves))]
        assert f"arr_{len(leaves)}" not in f.files
        step = int(f["step"])
    for x, t in zip(stored, leaves, strict=True):
        assert (x.shape, x.dtype) == (t.shape, t.dtype)
    return treedef.unflatten([jnp.asarray(x) for x in stored]), step


def save_orbax(path: Path, tree, step: int) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"state": tree, "step": step})
        ckptr.wait_until_finished()


def restore_orbax(path: Path):
    import orbax.checkpoint as ocp

    abstract = {"state": template(), "step": jax.ShapeDtypeStruct((), np.int64)}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, abstract)
    return restored["state"], int(restored["step"])


SAVE = {"savez": save_savez, "orbax": save_orbax}
RESTORE = {"savez": restore_savez, "orbax": restore_orbax}


def _path(workdir: Path, fmt: str) -> Path:
    return workdir / ("run.npz" if fmt == "savez" else "run.orbax")


def _has_orbax() -> bool:
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        return False
    return True


def _formats() -> list[str]:
    return FORMATS if _has_orbax() else ["savez"]


def resume_in_this_process(workdir: Path) -> None:
    """The fresh process: restore each checkpoint, fit the rest, write every leaf."""
    for fmt in _formats():
        state, step = RESTORE[fmt](_path(workdir, fmt))
        result = resume(state, step, TOTAL - step)
        np.savez(workdir / f"resumed_{fmt}.npz", *[np.asarray(x) for x in jax.tree.leaves(result)])


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def assert_bits_equal(got, want) -> None:
    """Same tree, and every leaf the same dtype, shape and bytes (NaN included)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
        a, b = np.asarray(a), np.asarray(b)
        where = jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=where)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), where


def stop_step(result, initial_step=0) -> int:
    """The step that stopped (its update not applied)."""
    return initial_step + int(result.num_steps)


@pytest.fixture(scope="module")
def uninterrupted():
    return fit(TOTAL)


@pytest.fixture(scope="module")
def checkpoint():
    return fit(SAVE_AT)


@pytest.fixture(scope="module")
def resumed_elsewhere(tmp_path_factory, checkpoint):
    """Save at SAVE_AT in every format; one fresh process resumes them all."""
    workdir = tmp_path_factory.mktemp("fit_checkpoints")
    for fmt in _formats():
        SAVE[fmt](_path(workdir, fmt), run_state(checkpoint), SAVE_AT)
    proc = subprocess.run(
        [sys.executable, __file__, "resume", str(workdir)],
        # The adam_jax beside these tests, not whichever one is installed.
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def load_resumed(workdir: Path, fmt: str, like):
    with np.load(workdir / f"resumed_{fmt}.npz") as f:
        leaves = [f[f"arr_{k}"] for k in range(len(f.files))]
    return jax.tree.structure(like).unflatten(leaves)


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------


def test_checkpoint_is_taken_while_early_stopping_waits(uninterrupted, checkpoint):
    es = checkpoint.early_stopping_state
    assert not bool(es.should_stop) and int(checkpoint.num_steps) == SAVE_AT
    assert int(es.wait) > 0 and 0 <= int(es.best_step) < SAVE_AT
    assert int(es.step) == SAVE_AT
    # The uninterrupted run stops for patience after SAVE_AT, on a best found before it.
    assert int(uninterrupted.stop_reason) == StopReason.PATIENCE
    assert SAVE_AT < stop_step(uninterrupted) < TOTAL
    assert int(uninterrupted.best_step) == int(es.best_step)
    # The checkpoint's part is the uninterrupted run's first SAVE_AT steps.
    assert_bits_equal(checkpoint.losses, uninterrupted.losses[:SAVE_AT])


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_in_a_fresh_process_is_bit_identical(uninterrupted, resumed_elsewhere, fmt):
    if fmt == "orbax":
        pytest.importorskip("orbax.checkpoint")
    got = load_resumed(resumed_elsewhere, fmt, uninterrupted)
    assert stop_step(got, SAVE_AT) == stop_step(uninterrupted)
    assert int(got.stop_reason) == StopReason.PATIENCE
    assert_bits_equal(got.params, uninterrupted.params)
    assert_bits_equal(got.opt_state, uninterrupted.opt_state)
    assert_bits_equal(got.early_stopping_state, uninterrupted.early_stopping_state)
    assert_bits_equal(got.best_params, uninterrupted.best_params)
    assert int(got.best_step) == int(uninterrupted.best_step) < SAVE_AT
    assert_bits_equal(got.best_value, uninterrupted.best_value)
    assert_bits_equal(got.losses, uninterrupted.losses[SAVE_AT:])


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_round_trips_into_init_tree_structure(tmp_path, checkpoint, fmt):
    if fmt == "orbax":
        pytest.importorskip("orbax.checkpoint")
    saved = run_state(checkpoint)
    SAVE[fmt](_path(tmp_path, fmt), saved, SAVE_AT)
    restored, step = RESTORE[fmt](_path(tmp_path, fmt))
    assert step == SAVE_AT
    assert jax.tree.structure(restored) == jax.tree.structure(template())
    assert isinstance(restored["early_stopping_state"], adam_jax.EarlyStoppingState)
    assert_bits_equal(restored, saved)


@pytest.mark.parametrize("split", [1, 37, SAVE_AT, 150])
def test_two_fits_equal_one_for_any_split(uninterrupted, split):
    # Each part compiles its own loop, chunked by sqrt of its own num_steps.
    first = fit(split)
    step = stop_step(first)
    second = resume(run_state(first), step, TOTAL - split)
    assert stop_step(second, step) == stop_step(uninterrupted)
    assert_bits_equal(run_state(second), run_state(uninterrupted))
    assert_bits_equal(second.best_params, uninterrupted.best_params)
    # When the first part stops (split 150), the second takes no step: all NaN.
    assert_bits_equal(np.concatenate([first.losses, second.losses]), uninterrupted.losses)
    if split > stop_step(uninterrupted):
        assert step < split and int(second.num_steps) == 0


@pytest.mark.parametrize("split", [1, SAVE_AT, 150])
def test_resume_from_a_result_continues_one_longer_run(uninterrupted, split):
    """fit(resume=result): no step arithmetic, the same bits as one run of TOTAL steps."""
    first = fit(split)
    assert int(first.next_step) == stop_step(first)
    second = fit(TOTAL - split, params=None, resume=first)
    assert int(second.next_step) == int(uninterrupted.next_step) == stop_step(uninterrupted)
    assert_bits_equal(run_state(second), run_state(uninterrupted))
    assert_bits_equal(second.params, uninterrupted.params)
    assert_bits_equal(np.concatenate([first.losses, second.losses]), uninterrupted.losses)
    # A third part of a finished run takes no step.
    third = fit(10, params=None, resume=second)
    assert int(third.num_steps) == 0 and int(third.next_step) == int(second.next_step)


def test_resume_under_vmap_continues_each_problem():
    lrs = jnp.array([0.004, 0.008])

    @jax.jit
    @jax.vmap
    def part(lr):
        return adam_jax.fit(LOSS_FN, PARAMS0, adam_jax.adam(lr), num_steps=60, data=DATA,
                            has_aux=True, early_stopping=EARLY_STOPPING)  # fmt: skip

    @jax.jit
    @jax.vmap
    def rest(lr, result):
        return adam_jax.fit(LOSS_FN, None, adam_jax.adam(lr), num_steps=TOTAL, data=DATA,
                            has_aux=True, early_stopping=EARLY_STOPPING, resume=result)  # fmt: skip

    @jax.jit
    @jax.vmap
    def whole(lr):
        return adam_jax.fit(LOSS_FN, PARAMS0, adam_jax.adam(lr), num_steps=60 + TOTAL,
                            data=DATA, has_aux=True, early_stopping=EARLY_STOPPING)  # fmt: skip

    got, want = rest(lrs, part(lrs)), whole(lrs)
    np.testing.assert_array_equal(got.next_step, want.next_step)
    np.testing.assert_array_equal(got.stop_reason, want.stop_reason)
    np.testing.assert_allclose(got.last_params, want.last_params, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(params=PARAMS0), "params"),
        (dict(params=None, initial_step=3), "initial_step"),
        (dict(params=None, opt_state=OPTIMIZER.init(PARAMS0)), "opt_state"),
    ],
)
def test_resume_with_parts_of_its_own_is_refused(checkpoint, kwargs, named):
    with pytest.raises(ValueError, match=f"pass {named} as None"):
        fit(10, resume=checkpoint, **kwargs)
    with pytest.raises(TypeError, match="resume must be the FitResult"):
        fit(10, params=None, resume=run_state(checkpoint))


def test_initial_step_picks_the_batches(checkpoint, uninterrupted):
    n = stop_step(uninterrupted) - SAVE_AT
    right = resume(run_state(checkpoint), SAVE_AT, n)
    wrong = resume(run_state(checkpoint), 0, n)  # batches 0, 1, ... instead of 100 % 7, ...
    assert_bits_equal(right.last_params, uninterrupted.last_params)
    assert not np.array_equal(wrong.last_params, uninterrupted.last_params)
    # Also as an array, with the same compiled loop.
    as_array = resume(run_state(checkpoint), jnp.int32(SAVE_AT), n)
    assert_bits_equal(as_array, right)


def test_resuming_a_stopped_run_takes_no_step(uninterrupted, capsys):
    step = stop_step(uninterrupted)
    again = resume(run_state(uninterrupted), step, 50, log_every=1, progress=True)
    jax.block_until_ready(again)
    assert int(again.num_steps) == 0
    assert int(again.stop_reason) == StopReason.PATIENCE
    assert_bits_equal(run_state(again), run_state(uninterrupted))
    assert_bits_equal(again.best_params, uninterrupted.best_params)
    assert np.isnan(again.losses).all() and again.losses.shape == (50,)
    captured = capsys.readouterr()
    assert " loss " not in captured.out  # no step taken, so no log line of one
    assert f"{step}/{step + 50}" in captured.err and "stopped: PATIENCE" in captured.err


def test_log_lines_and_bar_continue_the_saved_run(capsys):
    # Split at 95, not a multiple of log_every: the resumed run logs 100, 110, ...
    every, split = 10, 95
    jax.block_until_ready(fit(TOTAL, log_every=every))
    whole = capsys.readouterr().out.splitlines()
    first = fit(split, log_every=every)
    jax.block_until_ready(first)
    parts = capsys.readouterr().out.splitlines()
    second = resume(run_state(first), split, TOTAL - split, log_every=every, progress=True)
    jax.block_until_ready(second)
    captured = capsys.readouterr()
    resumed_lines = captured.out.splitlines()
    assert resumed_lines[0].startswith("step 100 loss ")
    assert parts + resumed_lines == whole
    stop = stop_step(second, split)
    assert whole[-2].startswith(f"step {stop - stop % every} loss ")
    assert whole[-1] == f"step {stop} stopped: PATIENCE"
    # The bar counts from the saved step: steps taken, the stopping one included.
    assert f"{stop + 1}/{TOTAL}" in captured.err


def test_vmap_resumes_each_problem_at_its_own_step():
    lrs = jnp.array([0.004, 0.006, 0.008])
    splits = [150, 100, 80]  # each between its best step and its stop

    def run(lr, num_steps, params=PARAMS0, **kwargs):
        return adam_jax.fit(
            LOSS_FN,
            params,
            adam_jax.adam(lr),
            num_steps=num_steps,
            data=DATA,
            has_aux=True,
            early_stopping=EARLY_STOPPING,
            **kwargs,
        )

    # One compiled loop per num_steps, the learning rate traced.
    run = jax.jit(run, static_argnames="num_steps")
    firsts = [run(lr, s) for lr, s in zip(lrs, splits, strict=True)]
    for f in firsts:
        assert int(f.early_stopping_state.wait) > 0 and not f.early_stopping_state.should_stop
    states = jax.tree.map(lambda *xs: jnp.stack(xs), *[run_state(f) for f in firsts])

    @jax.jit
    @jax.vmap
    def resumed(lr, state, step):
        return run(
            lr,
            TOTAL,
            state["params"],
            opt_state=state["opt_state"],
            early_stopping_state=state["early_stopping_state"],
            initial_step=step,
        )

    batched = resumed(lrs, states, jnp.array(splits, jnp.int32))
    stops = set()
    for k, lr in enumerate(lrs):
        alone = run(lr, 2 * TOTAL)
        mine = jax.tree.map(lambda a, k=k: a[k], batched)
        assert int(mine.stop_reason) == StopReason.PATIENCE == int(alone.stop_reason)
        assert stop_step(mine, splits[k]) == stop_step(alone) > splits[k]
        assert int(mine.best_step) == int(alone.best_step)
        assert int(mine.early_stopping_state.wait) == int(alone.early_stopping_state.wait)
        # vmap batches the arithmetic differently: equal to rounding, not to the bit.
        np.testing.assert_allclose(mine.params, alone.params, rtol=1e-10)
        np.testing.assert_allclose(mine.best_params, alone.best_params, rtol=1e-10)
        stops.add(stop_step(alone))
    assert len(stops) == 3


def test_vmap_log_lines_with_different_initial_steps(capsys):
    # Problem 0 covers steps 0-49, problem 1 steps 30-79: the lines for 30 and
    # 40 summarize both, the others one each.
    starts, num_steps = [0, 30], 50
    loss_fn = lambda p: jnp.sum((p - 3.0) ** 2)

    def run(step):
        return adam_jax.fit(
            loss_fn,
            jnp.zeros(1),
            optax.adam(0.1),
            num_steps=num_steps,
            log_every=10,
            initial_step=step,
        )

    result = jax.block_until_ready(jax.jit(jax.vmap(run))(jnp.array(starts, jnp.int32)))
    lines = capsys.readouterr().out.splitlines()
    expected = []
    for step in range(0, 80, 10):
        v = np.array(
            [result.losses[b, step - s] for b, s in enumerate(starts) if 0 <= step - s < num_steps]
        )
        expected.append(
            f"step {step} loss min {np.nanmin(v)!s} mean {np.nanmean(v)!s} "
            f"max {np.nanmax(v)!s} ({len(v)} of 2 running)"
        )
    assert lines == expected
    assert [line.endswith("(2 of 2 running)") for line in lines].count(True) == 2


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


def test_state_of_another_optimizer_is_rejected(checkpoint):
    with pytest.raises(ValueError, match="opt_state"):
        adam_jax.fit(
            LOSS_FN,
            checkpoint.last_params,
            adam_jax.amsgrad(0.01),
            num_steps=3,
            data=DATA,
            has_aux=True,
            opt_state=checkpoint.opt_state,
        )


def test_state_in_another_dtype_is_rejected_not_cast(checkpoint):
    state = run_state(checkpoint)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x, state)
    with pytest.raises(ValueError, match=r"opt_state.*float32.*float64"):
        resume({**state, "opt_state": f32["opt_state"]}, SAVE_AT, 3)
    with pytest.raises(ValueError, match=r"early_stopping_state.*float32.*float64"):
        resume({**state, "early_stopping_state": f32["early_stopping_state"]}, SAVE_AT, 3)
    wrong_shape = {**state, "params": jnp.zeros(4)}
    with pytest.raises(ValueError, match="shape"):
        resume(wrong_shape, SAVE_AT, 3)


def test_early_stopping_state_needs_early_stopping(checkpoint):
    with pytest.raises(ValueError, match="early_stopping_state needs early_stopping"):
        adam_jax.fit(
            LOSS_FN,
            checkpoint.last_params,
            OPTIMIZER,
            num_steps=3,
            data=DATA,
            has_aux=True,
            early_stopping_state=checkpoint.early_stopping_state,
        )


@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        (-1, ValueError, ">= 0"),
        (1.0, TypeError, "int"),
        (True, TypeError, "int"),
        (np.array([1, 2]), TypeError, "int"),
        (2**31 - 2, ValueError, "2\\*\\*31"),
    ],
)
def test_bad_initial_step(step, error, match):
    with pytest.raises(error, match=match):
        adam_jax.fit(lambda p: p**2, 1.0, optax.sgd(0.1), num_steps=3, initial_step=step)


if __name__ == "__main__":
    assert sys.argv[1] == "resume"
    resume_in_this_process(Path(sys.argv[2]))
