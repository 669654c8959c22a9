"""adam_jax.early_stopping against a plain-Python reference and hand-written expectations."""

from __future__ import annotations

import doctest
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adam_jax
from adam_jax import StopReason

NAN, INF = math.nan, math.inf


class Reference:
    """The semantics of the issue, transcribed to plain Python floats."""

    def __init__(
        self,
        patience=10,
        min_delta=0.0,
        *,
        mode="min",
        relative=False,
        baseline=None,
        start_step=0,
        target=None,
        divergence=None,
        check_finite=True,
    ):
        self.patience, self.min_delta, self.mode, self.relative = (
            patience,
            min_delta,
            mode,
            relative,
        )
        self.start_step, self.target, self.divergence = start_step, target, divergence
        self.check_finite = check_finite
        if baseline is not None:
            self.best = float(baseline)
        else:
            self.best = INF if mode == "min" else -INF
        self.step, self.best_step, self.wait = 0, -1, 0
        self.should_stop, self.reason = False, StopReason.NONE

    def state(self):
        return (
            self.step,
            self.best,
            self.best_step,
            self.wait,
            self.should_stop,
            int(self.reason),
        )

    def update(self, value):
        if self.should_stop:
            return
        step = self.step
        self.step += 1
        if step < self.start_step:
            return
        finite = math.isfinite(value)
        if self.relative:
            delta = self.min_delta * abs(self.best) if math.isfinite(self.best) else 0.0
        else:
            delta = self.min_delta
        if self.mode == "min":
            improved = finite and value < self.best - delta
            hit = self.target is not None and value <= self.target
            diverged = self.divergence is not None and value > self.divergence
        else:
            improved = finite and value > self.best + delta
            hit = self.target is not None and value >= self.target
            diverged = self.divergence is not None and value < self.divergence
        if improved:
            self.best, self.best_step, self.wait = value, step, 0
        else:
            self.wait += 1
        if self.check_finite and not finite:
            self.reason = StopReason.NONFINITE
        elif hit:
            self.reason = StopReason.TARGET
        elif diverged:
            self.reason = StopReason.DIVERGED
        elif self.patience is not None and not improved and self.wait >= self.patience:
            self.reason = StopReason.PATIENCE
        self.should_stop = self.reason != StopReason.NONE


def jax_states(values, params_at=None, **kwargs):
    """Every state of adam_jax.early_stopping fed ``values`` one by one (jitted update).

    The params passed at update k are ``{"w": k}``; those given to ``init`` are ``{"w": -1}``.
    """
    es = adam_jax.early_stopping(**kwargs)
    update = jax.jit(es.update)
    state = es.init({"w": jnp.asarray(-1.0)})
    states = []
    for k, v in enumerate(values):
        state = update(state, jnp.asarray(v), {"w": jnp.asarray(float(k))})
        states.append(state)
    return states


def as_tuple(state):
    return (
        int(state.step),
        float(state.best_value),
        int(state.best_step),
        int(state.wait),
        bool(state.should_stop),
        int(state.reason),
    )


P, T, D, F = StopReason.PATIENCE, StopReason.TARGET, StopReason.DIVERGED, StopReason.NONFINITE

# (id, kwargs, values, hand-written expectation after the last value:
#  (index of the stopping update or None, reason, best_step, best_value, wait))
CASES = [
    ("patience", dict(patience=2), [5, 4, 4, 4, 1], (3, P, 1, 4, 2)),
    ("patience-reset", dict(patience=2), [5, 6, 4, 6, 7, 3], (4, P, 2, 4, 2)),
    ("patience0-stops-first-non-improving", dict(patience=0), [3, 2, 2, 1], (2, P, 1, 2, 1)),
    ("patience0-improving-never-stops", dict(patience=0), [5, 4, 3, 2, 1], (None, 0, 4, 1, 0)),
    ("patience-none", dict(patience=None), [1, 2, 3, 4, 5, 6], (None, 0, 0, 1, 5)),
    ("min-delta", dict(patience=2, min_delta=0.5), [10, 9.6, 9.4, 9.0, 8.95], (4, P, 2, 9.4, 2)),
    (
        "relative",
        dict(patience=2, min_delta=0.1, relative=True),
        [10, 9.5, 8.9, 8.1, 7.9],
        (None, 0, 4, 7.9, 0),
    ),
    (
        "relative-negative",
        dict(patience=2, min_delta=0.1, relative=True),
        [-10, -10.5, -11.5, -12.0, -12.1],
        (4, P, 2, -11.5, 2),
    ),
    ("baseline-never-beaten", dict(patience=2, baseline=5), [6, 7, 4], (1, P, -1, 5, 2)),
    ("baseline-beaten", dict(patience=2, baseline=5), [6, 4, 7, 7], (3, P, 1, 4, 2)),
    ("start-step", dict(patience=1, start_step=2), [NAN, 100, 5, 6, 7], (3, P, 2, 5, 1)),
    ("nan", dict(), [3, NAN, 1], (1, F, 0, 3, 1)),
    ("inf", dict(), [3, INF], (1, F, 0, 3, 1)),
    ("minus-inf-never-best", dict(), [-INF, 2], (0, F, -1, INF, 1)),
    (
        "no-check-finite",
        dict(patience=3, check_finite=False),
        [3, NAN, -INF, 2],
        (None, 0, 3, 2, 0),
    ),
    ("no-check-finite-patience", dict(patience=1, check_finite=False), [3, NAN], (1, P, 0, 3, 1)),
    ("target", dict(target=1.0), [3, 2, 1.0, 0.5], (2, T, 2, 1.0, 0)),
    ("target-without-improving", dict(target=1.0, min_delta=5), [3, 0.5], (1, T, 0, 3, 1)),
    ("nonfinite-before-target", dict(target=1.0), [3, -INF], (1, F, 0, 3, 1)),
    ("divergence", dict(divergence=10), [5, 11, 1], (1, D, 0, 5, 1)),
    ("divergence-is-strict", dict(divergence=10), [5, 10, 9], (None, 0, 0, 5, 2)),
    ("target-before-divergence", dict(target=5, divergence=3), [4, 1], (0, T, 0, 4, 0)),
    ("divergence-before-patience", dict(patience=0, divergence=10), [5, 11], (1, D, 0, 5, 1)),
    ("nonfinite-before-patience", dict(patience=0), [5, NAN], (1, F, 0, 5, 1)),
    ("max", dict(mode="max", patience=1), [0.5, 0.7, 0.6], (2, P, 1, 0.7, 1)),
    ("max-target", dict(mode="max", target=0.9), [0.5, 0.95], (1, T, 1, 0.95, 0)),
    ("max-divergence", dict(mode="max", divergence=0.1), [0.5, 0.05], (1, D, 0, 0.5, 1)),
    ("max-baseline", dict(mode="max", baseline=0.8, patience=1), [0.85, 0.7], (1, P, 0, 0.85, 1)),
    (
        "max-relative",
        dict(mode="max", min_delta=0.1, relative=True, patience=2),
        [10, 10.5, 11.5],
        (None, 0, 2, 11.5, 0),
    ),
    ("max-minus-inf", dict(mode="max"), [1, -INF], (1, F, 0, 1, 1)),
    ("frozen-after-stop", dict(patience=0), [3, 4, 1, 0, NAN], (1, P, 0, 3, 1)),
]


@pytest.mark.parametrize(
    "kwargs, values, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_semantics_table(kwargs, values, expected):
    ref = Reference(**kwargs)
    ref_states = []
    for v in values:
        ref.update(float(v))
        ref_states.append(ref.state())

    # The reference against the hand-written expectation.
    stop_at, reason, best_step, best_value, wait = expected
    stops = [k for k, s in enumerate(ref_states) if s[4]]
    assert (stops[0] if stops else None) == stop_at
    final = ref_states[-1]
    assert final[5] == int(reason)
    assert final[2] == best_step
    assert final[1] == best_value
    assert final[3] == wait
    assert final[0] == (len(values) if stop_at is None else stop_at + 1)

    # adam_jax against the reference, state by state, exactly.
    states = jax_states(values, **kwargs)
    for k, (got, want) in enumerate(zip(states, ref_states, strict=True)):
        assert as_tuple(got) == want, f"update {k}"
        # params passed at update k are k, those given to init are -1.
        assert float(got.best_params["w"]) == float(got.best_step)


def test_state_fields_and_reasons():
    assert EARLY_FIELDS == adam_jax.EarlyStoppingState._fields
    assert [r.name for r in StopReason] == ["NONE", "PATIENCE", "TARGET", "DIVERGED", "NONFINITE"]
    es = adam_jax.early_stopping()
    state = es.init({"w": jnp.ones(3)})
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert state.should_stop.dtype == jnp.bool_
    assert int(state.best_step) == -1 and float(state.best_value) == INF
    assert int(state.reason) == StopReason.NONE
    assert float(adam_jax.early_stopping(mode="max").init(0.0).best_value) == -INF
    no_restore = adam_jax.early_stopping(restore_best=False)
    s = no_restore.update(no_restore.init(), 1.0)
    assert s.best_params is None and float(s.best_value) == 1.0


EARLY_FIELDS = (
    "step",
    "best_value",
    "best_step",
    "best_params",
    "wait",
    "should_stop",
    "reason",
)


def test_best_params_are_copied_at_the_best_update():
    es = adam_jax.early_stopping(patience=2)
    params = {"a": jnp.zeros(3), "b": (jnp.zeros((2, 2), jnp.float32),)}
    state = es.init(params)
    for k, v in enumerate([3.0, 1.0, 2.0, 2.5]):
        p = jax.tree.map(lambda x, k=k: x + k, params)
        state = es.update(state, v, p)
    assert bool(state.should_stop) and int(state.best_step) == 1
    chex.assert_trees_all_equal(state.best_params, jax.tree.map(lambda x: x + 1, params))
    assert state.best_params["b"][0].dtype == jnp.float32


def _run_jax(values, hyper, *, mode, relative, check_finite, has_baseline, has_target, has_div):
    """One sequence through a scan, with the numeric hyperparameters traced."""

    def run(values, patience, min_delta, start_step, baseline, target, divergence):
        es = adam_jax.early_stopping(
            patience,
            min_delta,
            mode=mode,
            relative=relative,
            baseline=baseline if has_baseline else None,
            start_step=start_step,
            target=target if has_target else None,
            divergence=divergence if has_div else None,
            check_finite=check_finite,
            restore_best=False,
        )

        def body(state, v):
            state = es.update(state, v)
            return state, state

        return jax.lax.scan(body, es.init(), values)[1]

    return run(values, *hyper)


@functools.cache
def _jitted(**structure):
    return jax.jit(functools.partial(_run_jax, **structure))


VALUES = st.sampled_from([NAN, INF, -INF, -2.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 3.0, 10.0])


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(VALUES, min_size=12, max_size=12),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.1, 0.5]),
    start_step=st.integers(0, 3),
    baseline=st.sampled_from([None, 1.0, 2.5]),
    target=st.sampled_from([None, 0.5]),
    divergence=st.sampled_from([None, 5.0]),
    mode=st.sampled_from(["min", "max"]),
    relative=st.booleans(),
    check_finite=st.booleans(),
)
def test_random_sequences_traced_hyperparams_match_reference(
    values,
    patience,
    min_delta,
    start_step,
    baseline,
    target,
    divergence,
    mode,
    relative,
    check_finite,
):
    if mode == "max" and target is not None:
        target = 2.0
    if mode == "max" and divergence is not None:
        divergence = -1.0
    kwargs = dict(
        patience=patience,
        min_delta=min_delta,
        mode=mode,
        relative=relative,
        baseline=baseline,
        start_step=start_step,
        target=target,
        divergence=divergence,
        check_finite=check_finite,
    )
    ref = Reference(**kwargs)
    want = []
    for v in values:
        ref.update(v)
        want.append(ref.state())

    run = _jitted(
        mode=mode,
        relative=relative,
        check_finite=check_finite,
        has_baseline=baseline is not None,
        has_target=target is not None,
        has_div=divergence is not None,
    )
    hyper = [
        jnp.asarray(x if x is not None else 0.0)
        for x in (patience, min_delta, start_step, baseline, target, divergence)
    ]
    states = run(jnp.asarray(values), hyper)
    for k in range(len(values)):
        got = as_tuple(jax.tree.map(lambda x, k=k: x[k], states))
        assert got == want[k], f"update {k}: {got} != {want[k]}"


def test_vmap_matches_one_at_a_time():
    rng = np.random.default_rng(0)
    values = rng.choice([0.0, 1.0, 2.0, 3.0, NAN], size=(16, 20), p=[0.3, 0.3, 0.2, 0.19, 0.01])
    patience = rng.integers(0, 5, size=16)
    target = rng.choice([-1.0, 0.0], size=16)

    def run(values, patience, target):
        es = adam_jax.early_stopping(patience, target=target)
        params = {"w": jnp.asarray(-1.0)}

        def body(state, kv):
            k, v = kv
            return es.update(state, v, {"w": k.astype(jnp.float64)}), None

        return jax.lax.scan(body, es.init(params), (jnp.arange(20), values))[0]

    batched = jax.jit(jax.vmap(run))(values, patience, target)
    single = jax.jit(run)
    stops = set()
    for b in range(16):
        one = single(values[b], patience[b], target[b])
        chex.assert_trees_all_equal(jax.tree.map(lambda x, b=b: x[b], batched), one)
        ref = Reference(int(patience[b]), target=float(target[b]))
        for v in values[b]:
            ref.update(float(v))
        assert as_tuple(one) == ref.state()
        stops.add(int(one.step))
    assert len(stops) > 3  # the problems really stop at different updates


def test_jit_and_eager_agree():
    es = adam_jax.early_stopping(3, 0.01, relative=True, target=0.1)
    values = [1.0, 0.5, 0.499, 0.6, 0.3, 0.31, 0.32, 0.33, 0.05]
    eager = es.init({"w": jnp.zeros(2)})
    jitted = eager
    update = jax.jit(es.update)
    for k, v in enumerate(values):
        p = {"w": jnp.full(2, float(k))}
        eager = es.update(eager, v, p)
        jitted = update(jitted, v, p)
        chex.assert_trees_all_equal(eager, jitted)
    assert int(eager.reason) == StopReason.PATIENCE


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(patience=-1), "patience"),
        (dict(min_delta=-0.1), "min_delta"),
        (dict(start_step=-1), "start_step"),
        (dict(mode="mean"), "mode"),
        (dict(baseline=math.nan), "baseline"),
        (dict(target=jnp.ones(2)), "target"),
    ],
)
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        adam_jax.early_stopping(**kwargs)


def test_traced_hyperparameters_are_not_branched_on():
    @jax.jit
    def f(patience, min_delta, start_step):
        es = adam_jax.early_stopping(patience, min_delta, start_step=start_step)
        return es.update(es.init(0.0), 1.0, 0.0).wait

    # Negative traced values cannot be checked; they must not raise either.
    assert int(f(-1, -0.5, -2)) == 0


def test_bad_update_arguments():
    es = adam_jax.early_stopping()
    state = es.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="needs params"):
        es.update(state, 1.0)
    with pytest.raises(ValueError, match="scalar"):
        es.update(state, jnp.ones(2), {"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        es.update(state, 1.0, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="needs the params"):
        es.init()


def test_docstring_example():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name in ("early_stopping", "EarlyStopping", "EarlyStoppingState", "StopReason"):
        for test in doctest.DocTestFinder().find(getattr(adam_jax, name), name, globs={}):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0
