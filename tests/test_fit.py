"""adam_jax.fit against the NumPy Adam loop on a linear regression that stops at MSE < 1,
hand-written optax loops and itself under vmap."""

from __future__ import annotations

import doctest
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import linear_regression

import adam_jax
from adam_jax import StopReason

X, Y = linear_regression.data()


def regression_loss(x, y):
    """The exercise's objective: ``(half the sum of squares, MSE)``; the MSE is the metric."""
    return lambda w: linear_regression.loss(w, x, y)


def regression_fit(x, y, lr, *, num_steps=20_000, **kwargs):
    return adam_jax.fit(
        regression_loss(x, y),
        jnp.zeros((1, x.shape[1])),
        adam_jax.adam(lr),
        num_steps=num_steps,
        has_aux=True,
        early_stopping=adam_jax.early_stopping(None, target=1.0),
        **kwargs,
    )


def optax_loop(loss_fn, params, optimizer, num_steps, data=None):
    """The reference: a plain Python loop of optax steps, no early stopping."""
    state = optimizer.init(params)
    traj, losses = [params], []
    grad = jax.jit(jax.value_and_grad(loss_fn))
    for i in range(num_steps):
        args = () if data is None else (jax.tree.map(lambda d, i=i: d[i % len(d)], data),)
        loss, g = grad(params, *args)
        updates, state = optimizer.update(g, state, params)
        params = optax.apply_updates(params, updates)
        traj.append(params)
        losses.append(float(loss))
    return traj, np.asarray(losses), state


# --------------------------------------------------------------------------
# The NumPy Adam loop on a linear regression that stops at MSE < 1.
# --------------------------------------------------------------------------


def test_stops_where_the_numpy_loop_does():
    ref = linear_regression.numpy_adam(X, Y)
    s = ref.stop_iteration
    result = regression_fit(jnp.asarray(X), jnp.asarray(Y), linear_regression.SETTINGS["alpha"])

    # The NumPy loop measures the MSE before its update and checks after it, so
    # it applies s + 1 updates; fit stops before applying the s-th.
    assert int(result.num_steps) == s
    assert int(result.stop_reason) == StopReason.TARGET
    np.testing.assert_allclose(result.params.ravel(), ref.trajectory[s], rtol=1e-12, atol=0)
    np.testing.assert_allclose(result.losses[: s + 1], ref.mses, rtol=1e-12)
    assert np.isnan(result.losses[s + 1 :]).all()
    assert int(result.best_step) == s
    assert float(result.best_value) == pytest.approx(ref.mses[s], rel=1e-12)
    np.testing.assert_allclose(result.best_params.ravel(), ref.trajectory[s], rtol=1e-12)
    # Adam's step count in the returned state is the number of updates applied.
    assert int(result.opt_state[1].count) == s


def test_log_every_prints_what_the_numpy_loop_prints(capsys):
    every = 50
    linear_regression.numpy_adam(X, Y, print_every=every)
    ref_lines = capsys.readouterr().out.splitlines()
    result = regression_fit(jnp.asarray(X), jnp.asarray(Y), 0.01, log_every=every)
    jax.block_until_ready(result)
    our_lines = capsys.readouterr().out.splitlines()

    def parse(lines, label, word="step"):
        pattern = re.compile(rf"^{word} (\d+) {label} (\S+)$")
        matches = [pattern.match(line) for line in lines]
        assert all(matches), lines
        return [int(m[1]) for m in matches], [float(m[2]) for m in matches]

    ref_steps, ref_values = parse(ref_lines, "RMSE Error", word="epoch")
    # The logs end with the step that stopped the run and why, by name.
    assert our_lines[-1] == f"step {int(result.num_steps)} stopped: TARGET"
    steps, values = parse(our_lines[:-1], "loss")
    assert steps == ref_steps == list(range(0, int(result.num_steps) + 1, every))
    np.testing.assert_allclose(values, ref_values, rtol=1e-12)


# --------------------------------------------------------------------------
# Step semantics.
# --------------------------------------------------------------------------


def test_without_early_stopping_matches_an_optax_loop():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.zeros(2)}
    x = jnp.asarray(rng.standard_normal((20, 3)))

    def loss_fn(p):
        return jnp.mean(jnp.tanh(x @ p["w"] + p["b"][None]) ** 2)

    opt = optax.adam(0.05)
    traj, losses, state = optax_loop(loss_fn, params, opt, 30)
    result = adam_jax.fit(loss_fn, params, opt, num_steps=30)
    chex.assert_trees_all_close(result.params, traj[-1], rtol=1e-12)
    chex.assert_trees_all_close(result.opt_state, state, rtol=1e-12)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-12)
    assert int(result.num_steps) == 30
    assert int(result.stop_reason) == StopReason.NONE
    chex.assert_trees_all_equal(result.best_params, result.params)
    assert int(result.best_step) == -1 and np.isnan(result.best_value)


def test_grad_through_fit_equals_grad_through_the_same_loop():
    """Without early stopping fit's loop has a fixed length, so jax.grad goes through it,
    with respect to a hyperparameter and to a value the loss closes over, as through a
    fori_loop of the same steps (compile options that JAX cannot linearize through are
    never used under a transformation)."""

    def by_hand(lr, target):
        opt = adam_jax.adam(lr)

        def body(_, carry):
            p, state = carry
            updates, state = opt.update(jax.grad(lambda p: (p - target) ** 2)(p), state, p)
            return optax.apply_updates(p, updates), state

        p0 = jnp.asarray(0.0)
        return jax.lax.fori_loop(0, 5, body, (p0, opt.init(p0)))[0]

    def with_fit(lr, target):
        loss = lambda p: (p - target) ** 2
        return adam_jax.fit(loss, jnp.asarray(0.0), adam_jax.adam(lr), num_steps=5).params

    for argnum in (0, 1):
        got = jax.grad(with_fit, argnums=argnum)(0.1, 3.0)
        want = jax.grad(by_hand, argnums=argnum)(0.1, 3.0)
        assert np.isfinite(want) and want != 0
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_data_is_indexed_by_step_and_cycled():
    rng = np.random.default_rng(1)
    data = {"x": jnp.asarray(rng.standard_normal((7, 5, 2))), "y": jnp.asarray(rng.random((7, 5)))}

    def loss_fn(w, batch):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

    opt = adam_jax.adamw(0.1, weight_decay=0.01)
    w0 = jnp.zeros(2)
    traj, losses, _ = optax_loop(loss_fn, w0, opt, 17, data=data)
    result = adam_jax.fit(loss_fn, w0, opt, num_steps=17, data=data)
    np.testing.assert_allclose(result.params, traj[-1], rtol=1e-12)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-12)


def test_stopping_step_is_not_applied_and_state_freezes():
    # Minimizing (p - 3)²: the loss is below 0.5 first at some step s; fit
    # returns p_s (s updates) and Adam's count is s.
    loss_fn = lambda p: jnp.sum((p - 3.0) ** 2)
    opt = adam_jax.adam(0.1)
    p0 = jnp.zeros(1)
    traj, losses, _ = optax_loop(loss_fn, p0, opt, 200)
    s = int(np.argmax(losses <= 0.5))
    assert 0 < s < 200
    result = adam_jax.fit(
        loss_fn, p0, opt, num_steps=200, early_stopping=adam_jax.early_stopping(None, target=0.5)
    )
    assert int(result.num_steps) == s
    np.testing.assert_allclose(result.params, traj[s], rtol=1e-12)
    assert int(result.opt_state[1].count) == s
    np.testing.assert_allclose(result.losses[: s + 1], losses[: s + 1], rtol=1e-12)
    assert np.isnan(result.losses[s + 1 :]).all()


def test_loop_exits_at_the_stop_when_not_vmapped():
    calls = []

    def loss_fn(p):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sum((p - 3.0) ** 2)

    result = adam_jax.fit(
        loss_fn,
        jnp.zeros(1),
        adam_jax.adam(0.1),
        num_steps=1_000_000,
        early_stopping=adam_jax.early_stopping(None, target=0.5),
    )
    jax.block_until_ready(result)
    assert len(calls) == int(result.num_steps) + 1 < 100


def test_restore_best_on_a_rising_validation_loss():
    # Training pulls w towards (2, -2); the validation loss is smallest at
    # (1, -1), so it falls and then rises. The metric (aux) is the validation loss.
    train_target, val_target = jnp.array([2.0, -2.0]), jnp.array([1.0, -1.0])

    def train(w):
        return jnp.sum((w - train_target) ** 2)

    def val(w):
        return jnp.sum((w - val_target) ** 2)

    opt = adam_jax.adam(0.05)
    w0 = jnp.zeros(2)
    patience = 10
    result = adam_jax.fit(
        lambda w: (train(w), val(w)),
        w0,
        opt,
        num_steps=1000,
        has_aux=True,
        early_stopping=adam_jax.early_stopping(patience),
    )
    traj, _, _ = optax_loop(train, w0, opt, 200)
    val_losses = np.array([float(val(w)) for w in traj])
    best = int(np.argmin(val_losses))
    assert val_losses[best + patience] > val_losses[best]  # it really rises

    assert int(result.stop_reason) == StopReason.PATIENCE
    assert int(result.best_step) == best
    assert int(result.num_steps) == best + patience
    np.testing.assert_allclose(result.best_params, traj[best], rtol=1e-12)
    np.testing.assert_allclose(result.last_params, traj[best + patience], rtol=1e-12)
    # restore_best=True: the result's params are the best ones.
    chex.assert_trees_all_equal(result.params, result.best_params)
    assert float(result.best_value) == pytest.approx(val_losses[best], rel=1e-12)
    np.testing.assert_allclose(
        result.losses[: best + patience + 1], val_losses[: best + patience + 1]
    )


def test_nonfinite_loss_stops_and_keeps_the_last_good_params():
    # The loss is NaN once p passes 1; Adam with lr 0.3 passes it after a few steps.
    loss_fn = lambda p: jnp.where(p[0] < 1.0, (p[0] - 5.0) ** 2, jnp.nan)
    result = adam_jax.fit(
        loss_fn,
        jnp.zeros(1),
        adam_jax.adam(0.3),
        num_steps=100,
        early_stopping=adam_jax.early_stopping(),
    )
    s = int(result.num_steps)
    assert int(result.stop_reason) == StopReason.NONFINITE
    assert np.isnan(result.losses[s]) and np.isfinite(result.losses[:s]).all()
    assert int(result.best_step) == s - 1
    assert float(result.best_params[0]) < 1.0 <= float(result.last_params[0])
    assert float(result.params[0]) == float(result.best_params[0])


def test_jit_of_fit_equals_fit():
    direct = regression_fit(jnp.asarray(X), jnp.asarray(Y), 0.03)
    jitted = jax.jit(lambda lr: regression_fit(jnp.asarray(X), jnp.asarray(Y), lr))(0.03)
    chex.assert_trees_all_close(direct, jitted, rtol=1e-12)


# --------------------------------------------------------------------------
# Batched problems.
# --------------------------------------------------------------------------


def test_vmapped_sweep_of_64_learning_rates_equals_64_fits():
    x, y = jnp.asarray(X), jnp.asarray(Y)
    lrs = jnp.geomspace(3e-3, 0.3, 64)
    one = jax.jit(lambda lr: regression_fit(x, y, lr, num_steps=2000))
    batched = jax.jit(jax.vmap(lambda lr: regression_fit(x, y, lr, num_steps=2000)))(lrs)
    steps = []
    for k, lr in enumerate(lrs):
        alone = one(lr)
        mine = jax.tree.map(lambda a, k=k: a[k], batched)
        assert int(mine.num_steps) == int(alone.num_steps)
        chex.assert_trees_all_close(mine, alone, rtol=1e-10, atol=1e-12)
        steps.append(int(alone.num_steps))
    assert len(set(steps)) > 40  # the problems really stop at different steps
    assert set(np.asarray(batched.stop_reason)) == {StopReason.TARGET}


def test_vmap_over_data_params_and_hyperparameters():
    n = 6
    rng = np.random.default_rng(2)
    xs = np.stack([linear_regression.data(n=50, seed=k)[0] for k in range(n)])
    ys = np.stack([linear_regression.data(n=50, seed=k)[1] for k in range(n)])
    w0 = rng.normal(size=(n, 1, 4))
    hyper = dict(
        lr=rng.uniform(0.01, 0.1, n),
        b1=rng.uniform(0.5, 0.95, n),
        b2=rng.uniform(0.9, 0.9999, n),
        eps=10.0 ** rng.uniform(-10, -6, n),
    )

    def run(x, y, w0, lr, b1, b2, eps):
        return adam_jax.fit(
            regression_loss(x, y),
            w0,
            adam_jax.adam(lr, b1, b2, eps),
            num_steps=3000,
            has_aux=True,
            early_stopping=adam_jax.early_stopping(20, 1e-4, target=0.5),
        )

    args = (xs, ys, w0, hyper["lr"], hyper["b1"], hyper["b2"], hyper["eps"])
    batched = jax.jit(jax.vmap(run))(*args)
    single = jax.jit(run)
    steps = set()
    for k in range(n):
        alone = single(*(a[k] for a in args))
        chex.assert_trees_all_close(jax.tree.map(lambda a, k=k: a[k], batched), alone, rtol=1e-10)
        steps.add(int(alone.num_steps))
    assert len(steps) == n


# --------------------------------------------------------------------------
# Progress and logging.
# --------------------------------------------------------------------------


def test_progress_bar(capsys):
    result = regression_fit(jnp.asarray(X), jnp.asarray(Y), 0.03, num_steps=1000, progress=True)
    jax.block_until_ready(result)
    err = capsys.readouterr().err
    assert "fit:" in err and "/1000" in err and "loss=" in err
    assert f"{int(result.num_steps) + 1}/1000" in err  # steps taken, the stopping one included
    assert "stopped: TARGET" in err


def test_progress_and_log_under_vmap_report_once_per_chunk(capsys):
    x, y = jnp.asarray(X), jnp.asarray(Y)
    lrs = jnp.array([0.01, 0.03, 0.1, 0.3])
    fn = jax.vmap(lambda lr: regression_fit(x, y, lr, num_steps=1000, log_every=100, progress=True))
    result = jax.block_until_ready(jax.jit(fn)(lrs))
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    longest = int(result.num_steps.max())
    # One line per report, not one per problem, and a last one with the stop reasons.
    assert len(lines) == longest // 100 + 2
    assert lines[0].startswith("step 0 loss min ") and "(4 of 4 running)" in lines[0]
    assert lines[-2].endswith("(1 of 4 running)")
    assert lines[-1] == "stop reasons of the 4 problems: TARGET 4"
    assert "running=" in captured.err and "4 of 4 stopped early" in captured.err


class CountingBar:
    """A stand-in for ``tqdm.tqdm`` that counts redraws: the loop redraws the bar
    once per host call, whatever number of log lines the call prints."""

    refreshes = 0

    def __init__(self, total, initial=0, **kwargs):
        self.total, self.n = total, initial

    def refresh(self):
        CountingBar.refreshes += 1

    def write(self, line):
        print(line)

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def test_reports_do_not_cost_a_host_call_per_log_line(capsys, monkeypatch):
    # A host call costs tens of microseconds, more than this whole step: the
    # loop calls back about every 0.1 s and each call prints the lines due.
    monkeypatch.setattr("tqdm.tqdm", CountingBar)
    monkeypatch.setattr(CountingBar, "refreshes", 0)
    loss_fn = lambda p: jnp.sum((p - 3.0) ** 2)
    # The last step, 20000, is itself due for a line.
    result = adam_jax.fit(
        loss_fn, jnp.zeros(2), optax.sgd(1e-4), num_steps=20_001, log_every=10, progress=True
    )
    jax.block_until_ready(result)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2001
    assert lines[1] == f"step 10 loss {np.asarray(result.losses[10])!s}"
    assert lines[-1] == f"step 20000 loss {np.asarray(result.losses[20000])!s}"
    assert 0 < CountingBar.refreshes < 200


def test_missing_tqdm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[progress\]"'):
        adam_jax.fit(lambda p: p**2, 1.0, optax.sgd(0.1), num_steps=3, progress=True)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [0, -5])
def test_num_steps_must_be_positive(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        adam_jax.fit(lambda p: p**2, 1.0, optax.sgd(0.1), num_steps=num_steps)


def test_num_steps_must_be_an_int():
    with pytest.raises(TypeError, match="num_steps"):
        adam_jax.fit(lambda p: p**2, 1.0, optax.sgd(0.1), num_steps=10.0)


def test_loss_must_be_a_scalar():
    with pytest.raises(ValueError, match=r"scalar, got shape \(3,\)"):
        adam_jax.fit(lambda p: p**2, jnp.ones(3), optax.sgd(0.1), num_steps=3)
    with pytest.raises(ValueError, match="pair"):
        adam_jax.fit(
            lambda p: jnp.sum(p**2), jnp.ones(3), optax.sgd(0.1), num_steps=3, has_aux=True
        )
    with pytest.raises(ValueError, match="metric"):
        adam_jax.fit(
            lambda p: (jnp.sum(p**2), p), jnp.ones(3), optax.sgd(0.1), num_steps=3, has_aux=True
        )


def test_data_leaves_must_agree_on_the_leading_axis():
    data = {"x": jnp.ones((5, 2)), "y": jnp.ones((4,))}
    with pytest.raises(ValueError, match=r"\['x'\]: 5, data\['y'\]: 4"):
        adam_jax.fit(lambda p, b: jnp.sum(p), jnp.ones(2), optax.sgd(0.1), num_steps=3, data=data)


def test_result_is_a_named_pytree():
    assert adam_jax.FitResult._fields == (
        "params",
        "opt_state",
        "losses",
        "num_steps",
        "stop_reason",
        "best_step",
        "best_value",
        "early_stopping_state",
        "last_params",
        "steps",
        "next_step",
        "work",
    )
    result = adam_jax.fit(lambda p: p**2, jnp.asarray(1.0), optax.sgd(0.1), num_steps=4)
    assert len(jax.tree.leaves(result)) > 6
    assert result.losses.shape == (4,)
    # One params field: best_params is the same value under its older name.
    assert result.best_params is result.params
    assert int(result.next_step) == 4 and result.work is None


def test_docstring_example():
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(adam_jax.fit, "adam_jax.fit", globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0
