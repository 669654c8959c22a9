"""fit_batched: each problem's result equals jit(vmap(fit))'s, with only the steps it needs."""

from __future__ import annotations

import functools
import io
import json
import logging
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _devices import run_on_8_cpu_devices
from references import linear_regression

import adam_jax

HERE = pathlib.Path(__file__).parent
N = 24


def regressions(n: int = N, dtype=jnp.float64, seed: int = 0):
    """n linear regressions, each with its own data and a log-spaced learning rate."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64, 3))
    w = rng.normal(size=(n, 3, 1)) * 2
    y = x @ w + 0.3 * rng.normal(size=(n, 64, 1))
    lr = np.geomspace(3e-3, 0.3, n)
    return tuple(jnp.asarray(a, dtype) for a in (x, y, lr))


def make_problem(p):
    x, y, lr = p

    def loss(w):
        return jnp.mean((x @ w - y) ** 2)

    return loss, jnp.zeros((3, 1), x.dtype), adam_jax.adam(lr)


def make_aux_problem(p):
    x, y, lr = p

    def loss(w):
        error = x @ w - y
        return 0.5 * jnp.sum(error**2), jnp.mean(error**2)

    return loss, jnp.zeros((3, 1), x.dtype), adam_jax.amsgrad(lr)


def make_batch_problem(p):
    x, _, lr = p  # x sets the params' dtype; the loss reads its batches from data

    def loss(w, batch):
        bx, by = batch
        return jnp.mean((bx @ w - by) ** 2)

    return loss, jnp.zeros((3, 1), x.dtype), adam_jax.adamax(lr)


# fit_batched compiles with XLA:CPU's elemental emitters (see its docstring); the
# reference is compiled the same way, so that the two differ only by what the lanes do.
SAME_COMPILE = {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else None


def vmapped_fit(make, inputs, data=None, compiler_options=SAME_COMPILE, **kwargs):
    """The reference: jax.jit(jax.vmap(fit)) over the same problems."""

    def one(p, d):
        loss, params, opt = make(p)
        return adam_jax.fit(loss, params, opt, data=d, **kwargs)

    return jax.jit(jax.vmap(one), compiler_options=compiler_options)(inputs, data)


def assert_same(result, reference, rtol):
    for field in ("num_steps", "stop_reason", "best_step", "steps"):
        np.testing.assert_array_equal(getattr(result, field), getattr(reference, field), field)
    for field in ("params", "best_params", "last_params", "opt_state", "losses", "best_value"):
        chex.assert_trees_all_close(
            getattr(result, field), getattr(reference, field), rtol=rtol, atol=0
        )


CASES = {
    "target": dict(early_stopping=adam_jax.early_stopping(None, target=0.2)),
    "patience_restore_best": dict(
        early_stopping=adam_jax.early_stopping(patience=5, min_delta=1e-3, restore_best=True)
    ),
    "no_early_stopping": dict(),
    "history_last": dict(
        early_stopping=adam_jax.early_stopping(None, target=0.2),
        history=adam_jax.History.last(7),
    ),
    "history_every": dict(
        early_stopping=adam_jax.early_stopping(None, target=0.2),
        history=adam_jax.History.every(3, max_len=50),
    ),
}


@functools.cache
def vmapped_reference(case: str) -> adam_jax.FitResult:
    """jit(vmap(fit)) for ``CASES[case]``: one compile and run shared by every slot count."""
    kwargs = dict(num_steps=400, **CASES[case])
    if "history" not in kwargs:
        kwargs["history"] = adam_jax.History.every(1, max_len=1_000)  # fit_batched's default
    return vmapped_fit(make_problem, regressions(), **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("slots", [1, 5, N])
def test_equals_vmapped_fit_float64(case, slots):
    kwargs = dict(num_steps=400, **CASES[case])
    result = adam_jax.fit_batched(make_problem, regressions(), slots=slots, **kwargs)
    assert_same(result, vmapped_reference(case), rtol=1e-12)


# AMSGrad on has_aux problems (a summed loss, the MSE as the metric), patience and a target.
AUX_CASE = dict(
    num_steps=600,
    has_aux=True,
    early_stopping=adam_jax.early_stopping(patience=10, target=0.15),
    history=adam_jax.History.every(1, max_len=1_000),
)


def test_equals_vmapped_fit_float32_has_aux():
    inputs = regressions(dtype=jnp.float32)
    result = adam_jax.fit_batched(make_aux_problem, inputs, slots=4, **AUX_CASE)
    assert_same(result, vmapped_fit(make_aux_problem, inputs, **AUX_CASE), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_within_ulps_of_vmapped_fit_with_default_compile(dtype):
    """Against jit(vmap(fit)) compiled with JAX's default emitters: the same steps, stop
    reasons and best steps; params and values within 64 ulps. Each step rounds a few
    operations differently (an ulp or two), and the contraction of the optimization keeps
    the differences from growing: after hundreds of steps they were 2 to 10 ulps."""
    inputs = regressions(dtype=dtype)
    result = adam_jax.fit_batched(make_aux_problem, inputs, slots=4, **AUX_CASE)
    reference = vmapped_fit(make_aux_problem, inputs, compiler_options=None, **AUX_CASE)
    for field in ("num_steps", "stop_reason", "best_step", "steps"):
        np.testing.assert_array_equal(getattr(result, field), getattr(reference, field), field)
    rtol = 64 * float(jnp.finfo(dtype).eps)
    for field in ("params", "last_params", "losses", "best_value"):
        chex.assert_trees_all_close(
            getattr(result, field), getattr(reference, field), rtol=rtol, atol=0
        )


def test_equals_vmapped_fit_with_data_batches():
    x, y, lr = regressions()
    inputs = (x, y, lr)
    data = (x.reshape(N, 4, 16, 3), y.reshape(N, 4, 16, 1))  # 4 batches a problem
    kwargs = dict(
        num_steps=300,
        early_stopping=adam_jax.early_stopping(patience=8),
        history=adam_jax.History.every(1, max_len=1_000),
    )
    result = adam_jax.fit_batched(make_batch_problem, inputs, data=data, slots=6, **kwargs)
    assert_same(result, vmapped_fit(make_batch_problem, inputs, data, **kwargs), rtol=1e-12)


def make_regression_problem(p):
    """Adam from scratch on a linear regression (200 x 4, MSE as the metric)."""
    x, y, lr = p
    loss = lambda w: linear_regression.loss(w, x, y)
    return loss, jnp.zeros((1, x.shape[1]), x.dtype), adam_jax.adam(lr)


def test_without_early_stopping_is_vmapped_fit_bit_for_bit():
    """A lane per problem and no early stopping: no lane frees up, so the problems run as
    vmap of fit's loop, bitwise jit(vmap(fit)) in float32 (on this problem the lanes'
    loop rounds otherwise); fewer lanes refill instead, and agree up to float32 rounding."""
    xs, ys = zip(*(linear_regression.data(n=200, seed=k) for k in range(N)), strict=True)
    lrs = np.geomspace(3e-3, 0.3, N)
    inputs = tuple(
        jnp.asarray(np.stack(a) if a is not lrs else a, jnp.float32) for a in (xs, ys, lrs)
    )
    kwargs = dict(num_steps=150, has_aux=True, history=adam_jax.History.none())
    reference = vmapped_fit(make_regression_problem, inputs, **kwargs)
    result = adam_jax.fit_batched(make_regression_problem, inputs, **kwargs)
    assert result.work == (N * 150, N * 150)
    got, want = jax.tree.leaves(result._replace(work=None)), jax.tree.leaves(reference)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    refilled = adam_jax.fit_batched(make_regression_problem, inputs, slots=N // 3, **kwargs)
    assert refilled.work.needed == result.work.needed  # three waves of lanes
    assert refilled.work.computed >= result.work.computed
    np.testing.assert_array_equal(refilled.num_steps, reference.num_steps)
    chex.assert_trees_all_close(refilled.params, reference.params, rtol=1e-4, atol=0)


def test_computes_only_the_steps_needed():
    inputs = regressions()
    es = adam_jax.early_stopping(None, target=0.2)
    result = adam_jax.fit_batched(make_problem, inputs, num_steps=2_000, early_stopping=es, slots=4)
    work = result.work
    steps = np.asarray(result.num_steps) + 1  # each also computed its stopping step
    assert np.all(np.asarray(result.stop_reason_names()) == "TARGET")
    assert work.needed == steps.sum()
    # vmap would compute N x the longest; the lanes compute little more than needed.
    assert steps.max() * N > 3 * work.needed
    assert work.needed <= work.computed <= 1.25 * work.needed
    # Idle lanes count too: while the tail waits for its last problems some lanes idle.
    assert work.computed > work.needed


def test_streamed_chunks_equal_all_at_once():
    inputs = regressions()
    es = adam_jax.early_stopping(patience=5, target=0.2)
    kwargs = dict(num_steps=500, early_stopping=es, slots=5, history=adam_jax.History.last(4))
    whole = adam_jax.fit_batched(make_problem, inputs, **kwargs)
    chunks = iter([jax.tree.map(lambda a, k=k: a[k : k + 8], inputs) for k in range(0, N, 8)])
    streamed = adam_jax.fit_batched(make_problem, chunks, **kwargs)
    work = streamed.work
    assert isinstance(streamed.params, np.ndarray)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, whole), streamed)
    assert work.computed <= 1.25 * work.needed


def test_new_inputs_and_learning_rates_do_not_recompile(caplog):
    traces = []

    def counted(p):
        traces.append(1)
        return make_problem(p)

    es = adam_jax.early_stopping(None, target=0.2)
    for seed in range(3):
        adam_jax.fit_batched(counted, regressions(seed=seed), num_steps=50, early_stopping=es)
    first = len(traces)
    later = [regressions(seed=seed) for seed in range(3, 10)]
    compiles = lambda: sum("Finished XLA compilation" in r.getMessage() for r in caplog.records)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        # New data and learning rates; make_problem builds a new optimizer each time, and
        # each call gets a freshly built stopping rule with a new target.
        for i, inputs in enumerate(later):
            fresh = adam_jax.early_stopping(None, target=0.2 + 0.01 * i)
            adam_jax.fit_batched(counted, inputs, num_steps=50, early_stopping=fresh)
        assert first > 0 and len(traces) == first
        assert compiles() == 0
        # The negative control: a new make_problem is a new program, as under jax.jit.
        adam_jax.fit_batched(lambda p: counted(p), later[0], num_steps=50, early_stopping=es)
        assert compiles() > 0


def test_progress_bar_counts_problems(capsys):
    pytest.importorskip("tqdm", reason="pip install -e '.[progress]'")
    adam_jax.fit_batched(
        make_problem,
        regressions(),
        num_steps=200,
        early_stopping=adam_jax.early_stopping(None, target=0.2),
        slots=4,
        progress=True,
    )
    err = capsys.readouterr().err
    assert f"{N}/{N}" in err and "median" in err


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(num_steps=2.5), TypeError, "num_steps"),
        (dict(num_steps=10, slots=0), ValueError, "slots"),
        (dict(num_steps=10, has_aux=1), TypeError, "has_aux"),
        (dict(num_steps=10, early_stopping="patience"), TypeError, "early_stopping"),
        (dict(num_steps=10, history="all"), TypeError, "history"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        adam_jax.fit_batched(make_problem, regressions(), **kwargs)


def test_bad_inputs_are_named():
    x, y, lr = regressions()
    with pytest.raises(ValueError, match="leading axis"):
        adam_jax.fit_batched(make_problem, (x, y, lr[:5]), num_steps=10)
    with pytest.raises(ValueError, match="data"):
        adam_jax.fit_batched(
            make_batch_problem, (x, y, lr), data=(x[:3, None], y[:3, None]), num_steps=10
        )
    with pytest.raises(TypeError, match="make_problem"):
        adam_jax.fit_batched(None, (x, y, lr), num_steps=10)
    with pytest.raises(ValueError, match="empty"):
        adam_jax.fit_batched(make_problem, iter([]), num_steps=10)


def test_sharded_over_8_devices_equals_one_device():
    """Lanes split over 8 CPU devices (Auto and Explicit meshes) give one device's results."""
    proc = run_on_8_cpu_devices("_fit_batched_sharded.py")
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.load(io.StringIO(proc.stdout))
    assert report["devices"] == 8
    for mode in ("auto", "explicit"):
        row = report[mode]
        assert row["shards"] == 8, row
        assert row["equal"], row
    # Checkpoints are for inputs on one device: sharded ones are refused, nothing written.
    assert "checkpoint_dir=" in report["checkpoint_error"]
    assert "sharded over a mesh (8 devices)" in report["checkpoint_error"]
    assert report["checkpoint_dir_empty"]
