"""A resumed run computes the steps after the newest complete checkpoint, and no others.

``fit`` and ``fit_batched`` with ``checkpoint_dir`` are interrupted in this process, then
the same call is run again; a host callback in the loss records every loss evaluation
(the step it belongs to, read from the data: step ``i`` gets ``data[i % n]``). The
resumed call must evaluate exactly the steps from the newest checkpoint's step to the
end, each once: restoring an older checkpoint evaluates more, an off-by-one in the
resumed step evaluates one more or one fewer (or other batches), a lost checkpoint
evaluates all. Two ways to interrupt, both handled by the library:

* a fault: the callback raises at step ``S``; the segment running fails, nothing of it
  is saved, so the newest checkpoint is the last segment boundary at or before ``S``;
* Ctrl-C: the callback sends SIGINT at step ``S``; the fit ends the running segment,
  saves, and raises ``KeyboardInterrupt`` naming the checkpoint's step, the next
  segment boundary after ``S``.

The checkpoints are found by the library itself (the test reads no directory names).
The slow subprocess fault tests (SIGKILL at random moments) are in
``test_fault_tolerance.py``.
"""

from __future__ import annotations

import collections
import os
import re
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adam_jax

pytest.importorskip("orbax.checkpoint")

NUM_STEPS = 23
EVERY = 5


class Recorder:
    """Counts loss evaluations by step; raises or sends SIGINT at one step if asked."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.fault_at: Any = None
        self.sigint_at: Any = None

    def __call__(self, *key: Any) -> None:
        key = tuple(int(k) for k in key)
        key = key[0] if len(key) == 1 else key
        self.events.append(key)
        if key == self.fault_at:
            self.fault_at = None
            raise RuntimeError(f"injected fault at {key}")
        if key == self.sigint_at:
            self.sigint_at = None
            os.kill(os.getpid(), signal.SIGINT)

    def take(self) -> collections.Counter:
        counts = collections.Counter(self.events)
        self.events = []
        return counts


REC = Recorder()


def loss_fn(w: jax.Array, step: jax.Array) -> jax.Array:
    jax.debug.callback(REC, step)
    return jnp.sum((w - jnp.array([1.0, -2.0])) ** 2)


def fit(directory: Any) -> adam_jax.FitResult:
    return adam_jax.fit(
        loss_fn,
        jnp.zeros(2),
        adam_jax.adam(0.1),
        num_steps=NUM_STEPS,
        data=jnp.arange(NUM_STEPS),
        checkpoint_dir=directory,
        checkpoint_every=EVERY,
    )


def steps(start: int, stop: int = NUM_STEPS) -> collections.Counter:
    return collections.Counter(range(start, stop))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> adam_jax.FitResult:
    REC.take()
    result = fit(tmp_path_factory.mktemp("whole"))
    assert REC.take() == steps(0), "an uninterrupted run evaluates each step once"
    return result


# fault at S: the newest complete checkpoint is at EVERY * (S // EVERY) (none below EVERY).
@pytest.mark.parametrize("fault_at", [3, 12, 15, 22])
def test_fit_after_a_fault_recomputes_from_the_newest_checkpoint(
    tmp_path: Any, uninterrupted: adam_jax.FitResult, fault_at: int
) -> None:
    REC.take()
    REC.fault_at = fault_at
    with pytest.raises(Exception, match="injected fault"):
        fit(tmp_path)
    assert REC.take() == steps(0, fault_at + 1)
    result = fit(tmp_path)
    newest = EVERY * (fault_at // EVERY)
    assert REC.take() == steps(newest), f"resumed from {newest}: steps {newest}..{NUM_STEPS - 1}"
    np.testing.assert_array_equal(result.losses, uninterrupted.losses)
    np.testing.assert_array_equal(result.params, uninterrupted.params)
    assert int(result.num_steps) == NUM_STEPS
    fit(tmp_path)  # finished: reads the final checkpoint, takes no step
    assert REC.take() == collections.Counter()


@pytest.mark.parametrize("sigint_at", [7, 20])
def test_fit_after_ctrl_c_recomputes_from_the_checkpoint_it_saved(
    tmp_path: Any, uninterrupted: adam_jax.FitResult, sigint_at: int
) -> None:
    REC.take()
    REC.sigint_at = sigint_at
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved at step") as info:
        fit(tmp_path)
    saved = int(re.search(r"saved at step (\d+)", str(info.value)).group(1))  # type: ignore[union-attr]
    assert saved == min(EVERY * (sigint_at // EVERY + 1), NUM_STEPS)
    assert REC.take() == steps(0, saved), "the running segment ends, no more"
    result = fit(tmp_path)
    assert REC.take() == steps(saved)
    np.testing.assert_array_equal(result.losses, uninterrupted.losses)
    assert int(result.num_steps) == NUM_STEPS


# --------------------------------------------------------------------------
# fit_batched: 4 problems in 2 lanes, 12 steps each, so problems 2 and 3 run in
# iterations 12..23; a checkpoint every 5 iterations.
# --------------------------------------------------------------------------

N, STEPS, SLOTS = 4, 12, 2


def make_problem(p: Any) -> Any:
    target = p

    def loss(w: jax.Array, b: jax.Array) -> jax.Array:
        jax.debug.callback(REC, b[0], b[1])  # (problem, step)
        return jnp.sum((w - target) ** 2)

    return loss, jnp.zeros(2), adam_jax.adam(0.1)


INPUTS = jnp.linspace(1.0, 2.0, N)
DATA = jnp.stack(jnp.broadcast_arrays(jnp.arange(N)[:, None], jnp.arange(STEPS)[None, :]), -1)


def fit_batched(directory: Any) -> Any:
    return adam_jax.fit_batched(
        make_problem,
        INPUTS,
        data=DATA,
        num_steps=STEPS,
        slots=SLOTS,
        checkpoint_dir=directory,
        checkpoint_every=EVERY,
    )


def iteration_of(problem: int, step: int) -> int:
    return (problem // SLOTS) * STEPS + step


@pytest.fixture(scope="module")
def plain() -> Any:
    """The same call without checkpoints."""
    REC.take()
    result = adam_jax.fit_batched(make_problem, INPUTS, data=DATA, num_steps=STEPS, slots=SLOTS)
    everything = REC.take()
    assert everything == collections.Counter((k, i) for k in range(N) for i in range(STEPS)), (
        "uninterrupted, each problem's step is evaluated once"
    )
    return result


@pytest.mark.parametrize("fault_at", [(1, 7), (2, 4), (3, 10)])
def test_fit_batched_after_a_fault_recomputes_from_the_newest_checkpoint(
    tmp_path: Any, plain: Any, fault_at: tuple[int, int]
) -> None:
    plain_work = plain.work
    REC.take()
    REC.fault_at = fault_at
    with pytest.raises(Exception, match="injected fault"):
        fit_batched(tmp_path)
    REC.take()
    result = fit_batched(tmp_path)
    work = result.work
    newest = EVERY * (iteration_of(*fault_at) // EVERY)
    want = collections.Counter(
        (k, i) for k in range(N) for i in range(STEPS) if iteration_of(k, i) >= newest
    )
    assert REC.take() == want, f"resumed from iteration {newest}"
    np.testing.assert_array_equal(result.losses, plain.losses)
    assert work == plain_work
    fit_batched(tmp_path)  # finished: no step
    assert REC.take() == collections.Counter()
