"""Long runs survive faults: ``fit(checkpoint_dir=..., checkpoint_every=...)``.

Worker processes (tests/_fault_worker.py, four short fits covering float32 and
float64, every ``History`` choice, runs that stop early and runs that do not) are
killed with SIGKILL at random moments and in the middle of checkpoint writes,
restarted each time, and must end with results bit-identical to an
uninterrupted run without checkpoints, computed by a worker too. A SIGINT saves
and says how to resume; a torn checkpoint is never loaded; a directory of
another problem is refused without being touched.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _faults import (
    assert_bitwise_equal,
    finish,
    kill,
    listing,
    run_to_end,
    start,
    wait_for,
    worker_env,
)

import adam_jax

pytest.importorskip("orbax.checkpoint")

NAMES = ["f32_every1_patience", "f64_every3_full", "f32_last7_target", "f64_none_patience"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return worker_env(tmp_path_factory)


def _run_to_end(env: dict[str, str], workdir: Path) -> None:
    run_to_end(env, "checkpoint", workdir)


def _assert_bitwise_equal(reference: Path, workdir: Path) -> None:
    assert_bitwise_equal(reference, "plain", workdir, "checkpoint", NAMES)


@pytest.fixture(scope="module")
def reference(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted results, from one worker without checkpoints."""
    workdir = tmp_path_factory.mktemp("plain")
    rc, err = finish(start(env, "plain", workdir))
    assert rc == 0, err
    return workdir


def test_sigkill_at_random_moments(env, reference, tmp_path):
    """Twelve kills at random times, each run restarted until it ends: same bits."""
    rng = np.random.default_rng(0)
    kills, chain = 0, 0
    workdir = tmp_path / "chain0"
    workdir.mkdir()
    while kills < 12:
        proc = start(env, "checkpoint", workdir)
        if not wait_for(proc, "ready"):
            pytest.fail(finish(proc)[1])
        time.sleep(rng.uniform(0.0, 1.5))
        if kill(proc):
            kills += 1
            continue
        # The worker finished before the kill: check it, then start a new run.
        assert proc.returncode == 0, proc.stderr.read()
        _assert_bitwise_equal(reference, workdir)
        chain += 1
        workdir = tmp_path / f"chain{chain}"
        workdir.mkdir()
    _run_to_end(env, workdir)
    _assert_bitwise_equal(reference, workdir)


def test_sigkill_during_saves(env, reference, tmp_path):
    """At least ten kills while a checkpoint is being written, half by the worker itself a few
    milliseconds into the write, half by this process on reading ``saving``."""
    rng = np.random.default_rng(1)
    kills, attempt = 0, 0
    while kills < 10:
        attempt += 1
        assert attempt <= 20, f"only {kills} of 20 workers died in a save"
        if attempt % 2:
            proc = start(env, "checkpoint", tmp_path, f"--die-on-save={rng.uniform(0, 0.02)}")
            rc, err = finish(proc)
            assert rc in (-signal.SIGKILL, 0), err
            kills += rc == -signal.SIGKILL
        else:
            proc = start(env, "checkpoint", tmp_path)
            if wait_for(proc, "saving", count=int(rng.integers(1, 4))):
                kills += kill(proc)
            else:
                assert finish(proc)[0] == 0
    _run_to_end(env, tmp_path)
    _assert_bitwise_equal(reference, tmp_path)


def test_sigint_saves_and_says_how_to_resume(env, reference, tmp_path):
    proc = start(env, "checkpoint", tmp_path)
    assert wait_for(proc, "saving", count=2)
    proc.send_signal(signal.SIGINT)
    rc, err = finish(proc)
    assert rc != 0
    assert "KeyboardInterrupt: fit interrupted: checkpoint saved at step" in err
    assert "run the same fit call with the same checkpoint_dir to resume" in err
    _run_to_end(env, tmp_path)
    _assert_bitwise_equal(reference, tmp_path)
    # The same calls again return the saved final results.
    for name in NAMES:
        (tmp_path / f"checkpoint_{name}.npz").unlink()
    _run_to_end(env, tmp_path)
    _assert_bitwise_equal(reference, tmp_path)


# In-process tests on a small problem.


def _problem(lr=0.05, n=3, dtype=jnp.float64, patience=5):
    t = jnp.linspace(-1.0, 1.0, 40, dtype=dtype)
    x = jnp.stack([t**k for k in range(n)], axis=1)
    y = jnp.sin(2.0 * t)

    def loss_fn(w):
        return jnp.mean((y - x @ w) ** 2)

    return dict(
        loss_fn=loss_fn,
        params=jnp.zeros(n, dtype),
        optimizer=adam_jax.adam(lr),
        num_steps=60,
        early_stopping=adam_jax.early_stopping(patience, 1e-9),
    )


def _fit(problem, **kw):
    problem = dict(problem, **kw)
    return adam_jax.fit(problem.pop("loss_fn"), problem.pop("params"), problem.pop("optimizer"),
                        **problem)  # fmt: skip


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


def test_torn_checkpoint_is_never_loaded(tmp_path, capsys):
    problem = _problem()
    want = _fit(problem)
    kw = dict(checkpoint_dir=tmp_path, checkpoint_every=10, checkpoint_keep=3)
    _same(want, _fit(problem, **kw))
    steps = tmp_path / "steps"
    before, newest = sorted(int(p.name) for p in steps.iterdir())[-2:]
    # The newest one torn after its rename (files cut short), and a newer write
    # that never finished (orbax's temporary directory, half copied).
    for f in (steps / str(newest)).rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    partial = steps / f"{newest + 1}.orbax-checkpoint-tmp"
    shutil.copytree(steps / str(before), partial)
    for f in list(partial.rglob("*"))[::2]:
        if f.is_file():
            f.unlink()
    with pytest.warns(RuntimeWarning, match=f"checkpoint {newest} .* could not be read"):
        got = _fit(problem, **kw)
    _same(want, got)
    capsys.readouterr()
    _same(want, _fit(problem, **kw))
    # The torn one was moved aside, never replaced in place, and its step saved again
    # in a new folder. A finished run's result, read back, is announced too.
    aside = [p.name for p in (tmp_path / "unreadable").iterdir()]
    assert len(aside) == 1 and aside[0].startswith(f"{newest}."), aside
    out = capsys.readouterr().out
    again = max(int(p.name) for p in steps.iterdir() if p.name.isdigit())
    assert again == newest
    assert out == (
        f"fit: the run saved in {str(steps / str(again))!r} had finished at step "
        f"{int(want.num_steps)}; its result\n"
    )


@pytest.mark.parametrize(
    "history", [adam_jax.History.every(4, max_len=12), adam_jax.History.last(9)]
)
def test_resume_with_another_interval(tmp_path, history, capsys):
    """checkpoint_every may change between the calls; history stitches across it.
    Checkpoints are named by the step the run goes on from, and a resume is announced
    (that step and the checkpoint) as the log lines are printed."""
    problem = _problem(patience=1000)
    want = _fit(problem, history=history)
    _fit(problem, history=history, checkpoint_dir=tmp_path, checkpoint_every=10,
         checkpoint_keep=10, initial_step=3)  # fmt: skip
    steps = tmp_path / "steps"
    names = sorted(int(p.name) for p in steps.iterdir())
    assert names[:5] == [13, 23, 33, 43, 53] and len(names) == 6, names
    assert "resum" not in capsys.readouterr().out  # a new run announces nothing
    for p in steps.iterdir():
        if int(p.name) > 13:  # back to the first checkpoint, 10 steps in
            shutil.rmtree(p)
    got = _fit(problem, history=history, checkpoint_dir=tmp_path, checkpoint_every=8,
               initial_step=3, log_every=50)  # fmt: skip
    # The steps are global: the same run 3 steps later.
    unnumbered = dict(steps=None, next_step=None)
    _same(jax.tree.map(np.asarray, want)._replace(**unnumbered), got._replace(**unnumbered))
    np.testing.assert_array_equal(
        np.asarray(got.steps), np.where(want.steps < 0, -1, want.steps + 3)
    )
    assert int(got.next_step) == int(want.next_step) + 3
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"fit: resuming at step 13 from the checkpoint {str(steps / '13')!r}", out
    assert [line.split(" loss ")[0] for line in out[1:]] == ["step 50"], out  # then the logs


def test_fit_batched_resume_is_announced(tmp_path, capsys):
    x = jnp.linspace(-1.0, 1.0, 16)

    def make_problem(lr):
        return (lambda w: jnp.mean((x * w - 2.0 * x) ** 2)), jnp.zeros(()), adam_jax.adam(lr)

    kw = dict(num_steps=30, slots=2, checkpoint_dir=tmp_path, checkpoint_every=8,
              checkpoint_keep=100)  # fmt: skip
    lrs = jnp.array([0.3, 0.1, 0.03])
    want = adam_jax.fit_batched(make_problem, lrs, **kw)
    assert "resum" not in capsys.readouterr().out
    steps = tmp_path / "steps"
    saved = sorted(int(p.name) for p in steps.iterdir())
    for k in saved[1:]:
        shutil.rmtree(steps / str(k))
    _same(want, adam_jax.fit_batched(make_problem, lrs, **kw))
    out = capsys.readouterr().out
    assert out.startswith(f"fit_batched: resuming after 8 iterations, 0 problems finished, "
                          f"from the checkpoint {str(steps / str(saved[0]))!r}\n"), out  # fmt: skip
    _same(want, adam_jax.fit_batched(make_problem, lrs, **kw))
    assert "fit_batched: the run saved in" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("saved_run")
    _fit(_problem(), checkpoint_dir=directory, checkpoint_every=25)
    return directory


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(optimizer=adam_jax.adam(0.02)), "learning_rate"),
        (dict(params=jnp.zeros(4)), "params"),
        (dict(params=jnp.zeros(3, jnp.float32)), "float32"),
        (dict(params={"w": jnp.zeros(3)}), "params.tree"),
        (dict(params=jnp.ones(3)), "params.values"),
        (dict(num_steps=70), "fit.num_steps"),
        (dict(history=adam_jax.History.last(5)), "fit.history"),
        (dict(early_stopping=adam_jax.early_stopping(6, 1e-9)), "patience"),
        (dict(initial_step=3), "fit.initial_step"),
    ],
)
def test_other_problem_is_refused(saved_run, change, named):
    problem, directory = _problem(), saved_run
    kw = dict(checkpoint_dir=directory, checkpoint_every=25)
    before = listing(directory)
    other = dict(problem, **change)
    if "params" in change and isinstance(change["params"], dict):
        other["loss_fn"] = lambda p: problem["loss_fn"](p["w"])
    with pytest.raises(ValueError, match=r"holds the checkpoints of a different fit") as e:
        _fit(other, **kw)
    assert named in str(e.value)
    assert listing(directory) == before


def test_a_call_that_fails_first_leaves_the_directory_reusable(tmp_path):
    problem = _problem()

    def broken(w):
        return problem["loss_fn"](w) * jnp.ones(2)  # not a scalar

    with pytest.raises(ValueError, match="scalar"):
        _fit(problem, loss_fn=broken, checkpoint_dir=tmp_path, checkpoint_every=10)
    _same(_fit(problem), _fit(problem, checkpoint_dir=tmp_path, checkpoint_every=10))


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a fit checkpoint directory"):
        _fit(_problem(), checkpoint_dir=tmp_path, checkpoint_every=10)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_bad_arguments(tmp_path, monkeypatch):
    problem = _problem()
    with pytest.raises(ValueError, match="checkpoint_every"):
        _fit(problem, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        _fit(problem, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_keep"):
        _fit(problem, checkpoint_dir=tmp_path, checkpoint_every=5, checkpoint_keep=1.5)
    with pytest.raises(ValueError, match="concrete inputs"):
        jax.jit(lambda p: _fit(problem, params=p, checkpoint_dir=tmp_path, checkpoint_every=5))(
            problem["params"]
        )
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[checkpoint\]"'):
        _fit(problem, checkpoint_dir=tmp_path, checkpoint_every=5)
    assert not any(tmp_path.iterdir())
