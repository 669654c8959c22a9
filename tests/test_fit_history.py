"""fit's history choices, its bounded memory, hyperparameters as data, best params, stop reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import Partial

import adam_jax
from adam_jax import History, StopReason

N = 300


def loss_fn(w):
    return jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)


ES = adam_jax.early_stopping(None, target=1e-3)


def run(history=None, num_steps=N, **kwargs):
    return adam_jax.fit(
        loss_fn,
        jnp.zeros(2),
        adam_jax.adam(0.05),
        num_steps=num_steps,
        early_stopping=ES,
        history=history,
        **kwargs,
    )


@pytest.fixture(scope="module")
def full():
    result = run(History.every(1, None))
    assert 50 < int(result.num_steps) < N - 10  # it stops, well before the cap
    return result


def test_default_keeps_every_step(full):
    default = run()
    np.testing.assert_array_equal(default.losses, full.losses)
    np.testing.assert_array_equal(default.steps, full.steps)
    assert full.losses.shape == full.steps.shape == (N,)
    taken = int(full.num_steps) + 1  # the stopping step is measured too
    np.testing.assert_array_equal(full.steps[:taken], np.arange(taken))
    assert (np.asarray(full.steps[taken:]) == -1).all()
    assert np.isnan(full.losses[taken:]).all()


@pytest.mark.parametrize(
    "history, length",
    [
        (History.every(1, 40), 40),
        (History.every(7), -(-N // 7)),
        (History.every(7, 5), 5),
        (History.last(25), 25),
        (History.last(10 * N), N),
        (History.none(), 0),
    ],
    ids=["first40", "every7", "every7_max5", "last25", "last_longer_than_run", "none"],
)
def test_each_history_is_the_documented_slice_of_the_full_one(full, history, length):
    got = run(history)
    assert got.losses.shape == got.steps.shape == (length,)
    assert got.steps.dtype == jnp.int32
    for field in ("num_steps", "best_step", "best_value", "stop_reason", "params", "opt_state"):
        chex.assert_trees_all_equal(getattr(got, field), getattr(full, field))
    taken = int(full.num_steps) + 1
    if history.kind == "every":
        want_steps = np.arange(0, N, history.k)[:length]
    elif history.kind == "last":
        want_steps = np.arange(max(0, taken - length), taken)
    else:
        want_steps = np.arange(0)
    want_steps = np.pad(want_steps, (0, length - want_steps.size), constant_values=-1)
    want_steps = np.where(want_steps < taken, want_steps, -1)
    np.testing.assert_array_equal(got.steps, want_steps)
    reached = want_steps >= 0
    np.testing.assert_array_equal(got.losses[reached], full.losses[want_steps[reached]])
    assert np.isnan(got.losses[~reached]).all()


@pytest.mark.parametrize(
    "history", [History.every(1, None), History.every(3, 20), History.last(7), History.none()]
)
def test_resuming_works_with_every_history(full, history):
    split = 40
    first = run(history, num_steps=split)
    rest = adam_jax.fit(
        loss_fn,
        first.last_params,
        adam_jax.adam(0.05),
        num_steps=N - split,
        early_stopping=ES,
        history=history,
        opt_state=first.opt_state,
        early_stopping_state=first.early_stopping_state,
        initial_step=first.num_steps,
    )
    assert split + int(rest.num_steps) == int(full.num_steps)
    chex.assert_trees_all_equal(rest.params, full.params)
    chex.assert_trees_all_equal(rest.best_step, full.best_step)
    reached = np.asarray(rest.steps) >= 0
    assert (np.asarray(rest.steps)[reached] >= split).all()
    np.testing.assert_array_equal(
        rest.losses[reached], full.losses[np.asarray(rest.steps)[reached]]
    )


@pytest.mark.parametrize(
    "bad, error",
    [(lambda: History.every(0), ValueError), (lambda: History.last(2.0), TypeError)],
)
def test_bad_history_arguments(bad, error):
    with pytest.raises(error, match="History"):
        bad()


def test_history_must_be_a_history():
    with pytest.raises(TypeError, match=r"history must be built with adam_jax\.History"):
        run("last")


# --------------------------------------------------------------------------
# Memory: bounded by the history, not by num_steps.
# --------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import jax, jax.numpy as jnp, adam_jax
    jax.config.update("jax_enable_x64", True)
    num_steps = int(sys.argv[1])
    r = adam_jax.fit(
        lambda w: jnp.sum((w - 3.0) ** 2), jnp.zeros(4), adam_jax.adam(1e-3),
        num_steps=num_steps, early_stopping=adam_jax.early_stopping(None, target=1e-6))
    print(json.dumps({
        "num_steps": int(r.num_steps), "losses": r.losses.shape[0],
        # VmHWM is this program's own peak: ru_maxrss would keep the peak of the
        # process it was forked from (the test runner) across exec.
        "maxrss_mb": int(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read())[1])
        / 1024}))
    """
)

# A full history of 10**9 float64 values alone would be 8 GB.
RSS_BOUND_MB = 1500


def _rss(num_steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(num_steps)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_num_steps():
    # The same run, stopping after a few thousand steps, with a cap of 10**4
    # and one of 10**9: the default history holds at most 100 000 values, so
    # the second needs no more memory than the first (a full history of 10**9
    # float64 values would be 8 GB).
    small, huge = _rss(10**4), _rss(10**9)
    assert 1000 < huge["num_steps"] == small["num_steps"] < 10**4
    assert huge["losses"] == 100_000
    assert huge["maxrss_mb"] < RSS_BOUND_MB, (small, huge)
    assert huge["maxrss_mb"] < small["maxrss_mb"] + 100, (small, huge)


# --------------------------------------------------------------------------
# Hyperparameters as data: one compile for many learning rates.
# --------------------------------------------------------------------------


def _sgd_init(params):
    return optax.EmptyState()


def _sgd_update(lr, updates, state, params=None):
    return jax.tree.map(lambda g: -lr * g, updates), state


def pytree_sgd(lr):
    """An optimizer whose learning rate is a pytree leaf."""
    return optax.GradientTransformation(Partial(_sgd_init), Partial(_sgd_update, lr))


def closure_sgd(lr):
    """The same optimizer with the learning rate a constant of its closure."""
    return optax.GradientTransformation(_sgd_init, lambda u, s, p=None: _sgd_update(lr, u, s, p))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_ten_learning_rates_compile_once_and_equal_the_constants(dtype):
    traces = []

    def counted_loss(w):
        traces.append(1)
        return jnp.sum((w - 2.0) ** 2)

    es = adam_jax.early_stopping(5, 1e-6)
    w0 = jnp.zeros(3, dtype)
    lrs = [0.01 * (k + 1) for k in range(10)]
    results = []
    for lr in lrs:
        results.append(
            adam_jax.fit(counted_loss, w0, pytree_sgd(lr), num_steps=200, early_stopping=es)
        )
        if len(results) == 1:
            per_compile = len(traces)
            assert per_compile > 0
    assert len(traces) == per_compile  # the nine other rates reused the first program
    for lr, got in zip(lrs, results, strict=True):
        want = adam_jax.fit(counted_loss, w0, closure_sgd(lr), num_steps=200, early_stopping=es)
        assert got.params.dtype == dtype
        chex.assert_trees_all_equal(got, want)


# --------------------------------------------------------------------------
# Best params, stop reasons.
# --------------------------------------------------------------------------


def _rising(lr, restore_best=True):
    # Training pulls w to 2, the monitored validation loss is smallest at 1.
    return adam_jax.fit(
        lambda w: (jnp.sum((w - 2.0) ** 2), jnp.sum((w - 1.0) ** 2)),
        jnp.zeros(2),
        adam_jax.adam(lr),
        num_steps=1000,
        has_aux=True,
        early_stopping=adam_jax.early_stopping(10, restore_best=restore_best),
    )


def test_restore_best_gives_the_best_params_in_fit_and_vmapped_fit():
    lrs = jnp.array([0.03, 0.05, 0.1])
    batched = jax.jit(jax.vmap(_rising))(lrs)
    for k, lr in enumerate(lrs):
        alone = _rising(lr)
        assert int(alone.stop_reason) == StopReason.PATIENCE
        # the best params are those of the best step: their value is best_value.
        best = jnp.sum((alone.params - 1.0) ** 2)
        assert float(best) == pytest.approx(float(alone.best_value), rel=1e-12)
        chex.assert_trees_all_equal(alone.params, alone.best_params)
        assert not np.allclose(alone.params, alone.last_params)
        mine = jax.tree.map(lambda a, k=k: a[k], batched)
        chex.assert_trees_all_close(mine.params, alone.params, rtol=1e-10)
        chex.assert_trees_all_close(mine.last_params, alone.last_params, rtol=1e-10)
    plain = _rising(0.05, restore_best=False)
    chex.assert_trees_all_equal(plain.params, plain.last_params)
    chex.assert_trees_all_equal(plain.last_params, _rising(0.05).last_params)


def test_stop_reason_names_single_and_batched():
    def one(target):
        return adam_jax.fit(
            lambda w: jnp.sum((w - 3.0) ** 2),
            jnp.zeros(1),
            adam_jax.adam(0.1),
            num_steps=300,
            early_stopping=adam_jax.early_stopping(None, target=target, divergence=100.0),
        )

    assert one(0.1).stop_reason_names() == "TARGET"
    assert one(-1.0).stop_reason_names() == "NONE"
    batched = jax.jit(jax.vmap(jax.vmap(one)))(jnp.array([[0.1, -1.0], [-1.0, 20.0]]))
    names = batched.stop_reason_names()
    assert names.shape == (2, 2)
    assert names.tolist() == [["TARGET", "NONE"], ["NONE", "TARGET"]]
    assert (
        adam_jax.fit(
            lambda w: jnp.sum(w**2), jnp.ones(1), adam_jax.adam(0.1), num_steps=3
        ).stop_reason_names()
        == "NONE"
    )


# --------------------------------------------------------------------------
# Reporting happens under jit and vmap, even when no result is used.
# --------------------------------------------------------------------------


def _logged(lr):
    return adam_jax.fit(
        lambda w: jnp.sum((w - 3.0) ** 2), jnp.zeros(2), optax.sgd(lr), num_steps=50, log_every=10
    )


def test_log_lines_under_jit_with_the_result_unused(capsys):
    jax.block_until_ready(jax.jit(lambda lr: _logged(lr).num_steps * 0)(0.01))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["0", "10", "20", "30", "40"]
    assert all(line.startswith("step ") for line in lines)


def test_log_lines_under_jit_of_vmap(capsys):
    out = jax.jit(jax.vmap(lambda lr: _logged(lr).num_steps))(jnp.array([0.01, 0.02, 0.03]))
    jax.block_until_ready(out)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert all(line.endswith("(3 of 3 running)") and " loss min " in line for line in lines)
