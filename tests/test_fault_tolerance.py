"""Checkpointed runs survive faults: ``fit`` and ``fit_batched`` with ``checkpoint_dir=``.

Both entry points save their loop state through one mechanism, so each guarantee is one
test, run for each of them; an :class:`Entry` says how to run its problem, what its
worker runs and what its messages say.

* Worker processes (tests/_fault_worker.py) are killed with SIGKILL at random moments and
  in the middle of checkpoint writes, restarted each time, and must end with results
  bit-identical to an uninterrupted run without checkpoints, computed by a worker too.
  fit's worker runs four short fits (float32 and float64, every ``History`` choice, runs
  that stop early and runs that do not); fit_batched's, 40 float64 problems with
  per-problem data, ``has_aux``, patience and ``History.last``, in 16 lanes whose tail
  shrinks to 4 and then 1, checked with its work counts.
* A SIGINT saves and says how to resume; the same call then reads the finished result back.
* In process: a torn checkpoint is never loaded (it is moved aside and its step saved
  again), a resume is announced, a directory of another problem is refused naming what
  differs and a directory of no run is refused, both untouched; a call that fails first or
  a problem record cut short leaves the directory usable; bad arguments are named.

What only one entry point has comes last: fit resumed with another interval (its history
stitched across it); fit_batched resumed from every phase of its tail, with an interval
longer than the run, empty arrays, an iterator of chunks and weakly typed inputs, and
other data values refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _faults import (
    Workers,
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


# fit's problem: a small polynomial regression, 60 steps at most.
T = jnp.linspace(-1.0, 1.0, 40, dtype=jnp.float64)
X, Y = jnp.stack([T**k for k in range(3)], axis=1), jnp.sin(2.0 * T)


def _loss(w):
    return jnp.mean((Y - X @ w) ** 2)


FIT_PROBLEM = dict(
    loss_fn=_loss,
    params=jnp.zeros(3, jnp.float64),
    optimizer=adam_jax.adam(0.05),
    num_steps=60,
    early_stopping=adam_jax.early_stopping(5, 1e-9),
)


def _fit(**changes):
    kw = {**FIT_PROBLEM, **changes}
    return adam_jax.fit(kw.pop("loss_fn"), kw.pop("params"), kw.pop("optimizer"), **kw)


# fit_batched's: 40 regressions in 16 lanes; the tail shrinks to 4 lanes, then 1.
N_PROBLEMS = 40


def _inputs(dtype, n=N_PROBLEMS):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16, 2))
    y = x @ (rng.normal(size=(n, 2, 1)) * 2) + 0.3 * rng.normal(size=(n, 16, 1))
    lr = np.geomspace(1e-2, 0.3, n)[rng.permutation(n)]
    return tuple(jnp.asarray(a, dtype) for a in (x, y, lr))


def _maker(optimizer=adam_jax.adam, scale=None):
    def make_problem(p):
        x, y, lr = p

        def loss(w):
            value = jnp.mean((x @ w - y) ** 2)
            return value if scale is None else value * scale

        return loss, jnp.zeros((2, 1), x.dtype), optimizer(lr)

    return make_problem


MAKE = _maker()
BATCHED_OPTIONS = dict(
    num_steps=400,
    slots=16,
    early_stopping=adam_jax.early_stopping(None, target=0.12),
    history=adam_jax.History.every(2, max_len=30),
)


def _fit_batched(dtype=jnp.float32, make=MAKE, inputs=None, **kw):
    inputs = _inputs(dtype) if inputs is None else inputs
    return adam_jax.fit_batched(make, inputs, **{**BATCHED_OPTIONS, **kw})


@dataclasses.dataclass(frozen=True)
class Entry:
    """What the shared tests need to know of an entry point."""

    name: str  # as its messages name it
    run: Callable[..., Any]  # its problem, with changes as keyword arguments
    broken: dict[str, Any]  # changes that make the loss not a scalar
    traced: tuple[str, Any]  # an argument a traced call passes, and its value
    every: int  # checkpoint interval in process (steps or iterations)
    saved_at: str  # how an interruption says where it saved (a regex)
    resumed: Callable[[str, int, dict], str]  # the announcement (folder, step, record)
    finished: Callable[[str, int, Any], str]  # the read-back one (folder, step, result)
    plain: str  # the worker's modes, without and with checkpoints
    checkpointed: str
    runs: tuple[str, ...]  # the worker's runs
    random_kills: int  # SIGKILLs at random moments, at these seconds after start-up
    kill_window: tuple[float, float]
    save_kills: int  # SIGKILLs during saves


ENTRIES = {
    "fit": Entry(
        name="fit",
        run=_fit,
        broken=dict(loss_fn=lambda w: _loss(w) * jnp.ones(2)),
        traced=("params", FIT_PROBLEM["params"]),
        every=10,
        saved_at=r"at step \d+",
        resumed=lambda where, step, record: (
            f"fit: resuming at step {step} from the checkpoint {where!r}"
        ),
        finished=lambda where, step, want: (
            f"fit: the run saved in {where!r} had finished at "
            f"step {int(want.num_steps)}; its result"
        ),
        plain="plain",
        checkpointed="checkpoint",
        runs=("f32_every1_patience", "f64_every3_full", "f32_last7_target", "f64_none_patience"),
        random_kills=12,
        kill_window=(0.0, 1.5),
        save_kills=10,
    ),
    "fit_batched": Entry(
        name="fit_batched",
        run=_fit_batched,
        broken=dict(make=_maker(scale=jnp.ones(2))),
        traced=("inputs", _inputs(jnp.float32)),
        every=100,
        saved_at=r"after \d+ iterations",
        resumed=lambda where, step, record: (
            f"fit_batched: resuming after {step} iterations, "
            f"{record['rows']} problems finished, from the checkpoint {where!r}"
        ),
        finished=lambda where, step, want: (
            f"fit_batched: the run saved in {where!r} had "
            f"finished ({step} iterations, {N_PROBLEMS} problems finished); its result"
        ),
        plain="batched-plain",
        checkpointed="batched-checkpoint",
        runs=("b64_patience_last5_data",),
        random_kills=5,
        kill_window=(0.5, 3.0),
        save_kills=5,
    ),
}


@pytest.fixture(params=list(ENTRIES))
def entry(request: pytest.FixtureRequest) -> Entry:
    return ENTRIES[request.param]


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


def _progress(directory: Path) -> dict[int, dict]:
    """Each checkpoint's progress record, by step (orbax's JSON file)."""
    return {
        int(p.name): json.loads((p / "progress" / "metadata").read_text())
        for p in (directory / "steps").iterdir()
        if p.name.isdigit()
    }


def _keep_up_to(directory: Path, step: int) -> None:
    """Delete the checkpoints after ``step``: the run is back there."""
    for p in (directory / "steps").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)


# Worker processes.


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory):
    """The server that forks the worker processes (tests/_faults.py)."""
    server = Workers(worker_env(tmp_path_factory), tmp_path_factory.mktemp("server") / "log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(workers, tmp_path_factory) -> Callable[[Entry], Path]:
    """Each entry's uninterrupted results, from one worker without checkpoints."""
    made: dict[str, Path] = {}

    def get(entry: Entry) -> Path:
        if entry.name not in made:
            workdir = tmp_path_factory.mktemp(entry.plain)
            rc, err = finish(start(workers, entry.plain, workdir))
            assert rc == 0, err
            made[entry.name] = workdir
        return made[entry.name]

    return get


def _run_to_end_as_reference(entry, workers, reference, workdir):
    run_to_end(workers, entry.checkpointed, workdir)
    _assert_as_reference(entry, reference, workdir)


def _assert_as_reference(entry, reference, workdir):
    assert_bitwise_equal(reference(entry), entry.plain, workdir, entry.checkpointed, entry.runs)


def test_sigkill_at_random_moments(entry, workers, reference, tmp_path):
    """Kills at random times after start-up, each run restarted until it ends: same bits.
    A run that ends before its kill is checked, and the next one starts anew."""
    rng = np.random.default_rng(0)
    kills, chain = 0, 0
    workdir = tmp_path / "chain0"
    workdir.mkdir()
    while kills < entry.random_kills:
        proc = start(workers, entry.checkpointed, workdir)
        if not wait_for(proc, "ready"):
            pytest.fail(finish(proc)[1])
        time.sleep(rng.uniform(*entry.kill_window))
        if kill(proc):
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()
        _assert_as_reference(entry, reference, workdir)
        chain += 1
        workdir = tmp_path / f"chain{chain}"
        workdir.mkdir()
    _run_to_end_as_reference(entry, workers, reference, workdir)


def test_sigkill_during_saves(entry, workers, reference, tmp_path):
    """Kills while a checkpoint is being written, of one run restarted after each: every
    other one by the worker itself a few milliseconds into the write, the others by this
    process on reading ``saving``."""
    rng = np.random.default_rng(1)
    kills, attempt = 0, 0
    while kills < entry.save_kills:
        attempt += 1
        assert attempt <= 2 * entry.save_kills, f"only {kills} of {attempt - 1} workers died"
        if attempt % 2:
            die = f"--die-on-save={rng.uniform(0, 0.02)}"
            proc = start(workers, entry.checkpointed, tmp_path, die)
            rc, err = finish(proc)
            assert rc in (-signal.SIGKILL, 0), err
            kills += rc == -signal.SIGKILL
        else:
            proc = start(workers, entry.checkpointed, tmp_path)
            if wait_for(proc, "saving", count=int(rng.integers(1, 4))):
                kills += kill(proc)
            else:
                assert finish(proc)[0] == 0
    _run_to_end_as_reference(entry, workers, reference, tmp_path)


def test_sigint_saves_and_says_how_to_resume(entry, workers, reference, tmp_path):
    proc = start(workers, entry.checkpointed, tmp_path)
    assert wait_for(proc, "saving", count=2)
    proc.send_signal(signal.SIGINT)
    rc, err = finish(proc)
    assert rc != 0
    saved = f"KeyboardInterrupt: {entry.name} interrupted: checkpoint saved {entry.saved_at}"
    assert re.search(saved, err), err
    assert f"run the same {entry.name} call with the same checkpoint_dir to resume" in err
    _run_to_end_as_reference(entry, workers, reference, tmp_path)
    # The same calls again return the saved final results.
    for name in entry.runs:
        (tmp_path / f"{entry.checkpointed}_{name}.npz").unlink()
    _run_to_end_as_reference(entry, workers, reference, tmp_path)


# In process.


def test_torn_checkpoint_is_never_loaded(entry, tmp_path, capsys):
    want = entry.run()
    kw = dict(checkpoint_dir=tmp_path, checkpoint_every=entry.every, checkpoint_keep=3)
    _same(want, entry.run(**kw))
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
        got = entry.run(**kw)
    _same(want, got)
    capsys.readouterr()
    _same(want, entry.run(**kw))
    # The torn one was moved aside, never replaced in place, and its step saved again
    # in a new folder. A finished run's result, read back, is announced.
    aside = [p.name for p in (tmp_path / "unreadable").iterdir()]
    assert len(aside) == 1 and aside[0].startswith(f"{newest}."), aside
    again = max(int(p.name) for p in steps.iterdir() if p.name.isdigit())
    assert again == newest
    assert capsys.readouterr().out == entry.finished(str(steps / str(again)), again, want) + "\n"


def test_a_resume_is_announced(entry, tmp_path, capsys):
    """A new run announces nothing; a resumed one, the step it goes on from and the folder."""
    kw = dict(checkpoint_dir=tmp_path, checkpoint_every=entry.every, checkpoint_keep=100)
    want = entry.run(**kw)
    assert "resum" not in capsys.readouterr().out
    progress = _progress(tmp_path)
    first = min(progress)
    assert not progress[first]["finished"]
    _keep_up_to(tmp_path, first)
    _same(want, entry.run(**kw))
    out = capsys.readouterr().out
    where = str(tmp_path / "steps" / str(first))
    assert out.startswith(entry.resumed(where, first, progress[first]) + "\n"), out


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Callable[[Entry], Path]:
    """A directory holding each entry's finished run."""
    made: dict[str, Path] = {}

    def get(entry: Entry) -> Path:
        if entry.name not in made:
            made[entry.name] = tmp_path_factory.mktemp(f"saved_{entry.name}")
            entry.run(checkpoint_dir=made[entry.name], checkpoint_every=entry.every)
        return made[entry.name]

    return get


# A change to the saved problem, and what the refusal must name.
OTHER_PROBLEMS = [
    ("fit", dict(optimizer=adam_jax.adam(0.02)), "learning_rate"),
    ("fit", dict(params=jnp.zeros(4)), "params"),
    ("fit", dict(params=jnp.zeros(3, jnp.float32)), "float32"),
    ("fit", dict(params={"w": jnp.zeros(3)}, loss_fn=lambda p: _loss(p["w"])), "params.tree"),
    ("fit", dict(params=jnp.ones(3)), "params.values"),
    ("fit", dict(num_steps=70), "fit.num_steps"),
    ("fit", dict(history=adam_jax.History.last(5)), "fit.history"),
    ("fit", dict(early_stopping=adam_jax.early_stopping(6, 1e-9)), "patience"),
    ("fit", dict(initial_step=3), "fit.initial_step"),
    ("fit_batched", dict(inputs=_inputs(jnp.float32, n=41)), "inputs[0]"),  # 41 problems
    (
        "fit_batched",
        dict(inputs=tuple(a.astype(jnp.float16) for a in _inputs(jnp.float32))),
        "float16",
    ),
    (
        "fit_batched",
        dict(inputs=(_inputs(jnp.float32), jnp.zeros(40)), make=lambda p: MAKE(p[0])),
        "inputs.tree",
    ),
    ("fit_batched", dict(inputs=tuple(a * 2 for a in _inputs(jnp.float32))), "inputs.values"),
    ("fit_batched", dict(make=_maker(adam_jax.amsgrad)), "optimizer"),
    ("fit_batched", dict(num_steps=300), "fit_batched.num_steps"),
    ("fit_batched", dict(slots=8), "fit_batched.slots"),
    ("fit_batched", dict(history=adam_jax.History.last(5)), "fit_batched.history"),
    ("fit_batched", dict(early_stopping=adam_jax.early_stopping(None, target=0.1)), "target"),
]


@pytest.mark.parametrize(
    ("entry", "change", "named"),
    OTHER_PROBLEMS,
    ids=[f"{entry}-{named}" for entry, _, named in OTHER_PROBLEMS],
    indirect=["entry"],
)
def test_other_problem_is_refused(entry, saved_run, change, named):
    directory = saved_run(entry)
    before = listing(directory)
    different = f"holds the checkpoints of a different {entry.name} "
    with pytest.raises(ValueError, match=different) as e:
        entry.run(checkpoint_dir=directory, checkpoint_every=entry.every, **change)
    assert named in str(e.value)
    assert listing(directory) == before


def test_a_call_that_fails_first_leaves_the_directory_reusable(entry, tmp_path):
    with pytest.raises(ValueError, match="scalar"):
        entry.run(**entry.broken, checkpoint_dir=tmp_path, checkpoint_every=entry.every)
    _same(entry.run(), entry.run(checkpoint_dir=tmp_path, checkpoint_every=entry.every))


def test_a_record_cut_short_does_not_block_the_directory(entry, tmp_path):
    """A kill between writing the problem record and renaming it leaves a temporary
    file; the directory is still the run's own."""
    (tmp_path / ".fit.json.tmp-12345").write_text("{")
    _same(entry.run(), entry.run(checkpoint_dir=tmp_path, checkpoint_every=entry.every))


def test_foreign_directory_is_refused(entry, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"not a {entry.name} checkpoint directory"):
        entry.run(checkpoint_dir=tmp_path, checkpoint_every=entry.every)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_bad_arguments(entry, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="checkpoint_dir needs checkpoint_every"):
        entry.run(checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        entry.run(checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_keep"):
        entry.run(checkpoint_dir=tmp_path, checkpoint_every=5, checkpoint_keep=1.5)
    name, value = entry.traced
    with pytest.raises(ValueError, match="concrete inputs"):
        jax.jit(lambda x: entry.run(**{name: x}, checkpoint_dir=tmp_path, checkpoint_every=5))(
            value
        )
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    needs = (
        rf"{entry.name}\(checkpoint_dir=\.\.\.\) needs orbax.*pip install -e \"\.\[checkpoint\]\""
    )
    with pytest.raises(ImportError, match=needs):
        entry.run(checkpoint_dir=tmp_path, checkpoint_every=5)
    assert not any(tmp_path.iterdir())


# Only fit.


@pytest.mark.parametrize(
    "history", [adam_jax.History.every(4, max_len=12), adam_jax.History.last(9)]
)
def test_fit_resumes_with_another_interval(tmp_path, history, capsys):
    """checkpoint_every may change between the calls; history stitches across it.
    Checkpoints are named by the step the run goes on from, and a resume is announced
    (that step and the checkpoint) as the log lines are printed."""
    patient = adam_jax.early_stopping(1000, 1e-9)
    want = _fit(early_stopping=patient, history=history)
    _fit(early_stopping=patient, history=history, checkpoint_dir=tmp_path, checkpoint_every=10,
         checkpoint_keep=10, initial_step=3)  # fmt: skip
    steps = tmp_path / "steps"
    names = sorted(int(p.name) for p in steps.iterdir())
    assert names[:5] == [13, 23, 33, 43, 53] and len(names) == 6, names
    assert "resum" not in capsys.readouterr().out  # a new run announces nothing
    _keep_up_to(tmp_path, 13)  # back to the first checkpoint, 10 steps in
    got = _fit(early_stopping=patient, history=history, checkpoint_dir=tmp_path,
               checkpoint_every=8, initial_step=3, log_every=50)  # fmt: skip
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


# Only fit_batched.


@pytest.fixture(scope="module", params=["float32", "float64"])
def uninterrupted(request):
    dtype = jnp.dtype(request.param)
    return dtype, _fit_batched(dtype)


def test_fit_batched_resumes_from_every_phase_of_the_tail(uninterrupted, tmp_path):
    """From a checkpoint while lanes refill, and in the tail once the queue is empty (the
    lanes then run out at the same width), with another interval."""
    dtype, want = uninterrupted
    got = _fit_batched(dtype, checkpoint_dir=tmp_path, checkpoint_every=60, checkpoint_keep=100)
    _same(want, got)
    progress = _progress(tmp_path)
    queues = [progress[k]["queue"] for k in sorted(progress)]
    assert queues[0] < N_PROBLEMS and queues[-1] == N_PROBLEMS, queues
    assert {progress[k]["width"] for k in progress} == {16}
    assert progress[max(progress)]["finished"]
    for tail in (False, True):
        # Back to the first checkpoint of this phase: the run's state there.
        first = min(k for k in progress if (progress[k]["queue"] == N_PROBLEMS) == tail)
        _keep_up_to(tmp_path, first)
        assert sorted(_progress(tmp_path)) == [k for k in sorted(progress) if k <= first]
        assert not progress[first]["finished"]
        kw = dict(checkpoint_dir=tmp_path, checkpoint_every=45, checkpoint_keep=100)
        _same(want, _fit_batched(dtype, **kw))
        progress = _progress(tmp_path)


def test_fit_batched_interval_longer_than_the_run(uninterrupted, tmp_path):
    dtype, want = uninterrupted
    got = _fit_batched(dtype, checkpoint_dir=tmp_path, checkpoint_every=10**6)
    _same(want, got)
    progress = _progress(tmp_path)
    assert len(progress) == 1 and progress[max(progress)]["finished"], progress
    # The finished run's result is read back, without a step.
    _same(want, _fit_batched(dtype, checkpoint_dir=tmp_path, checkpoint_every=10**6))
    assert len(_progress(tmp_path)) == 1


def test_fit_batched_empty_arrays_are_saved_and_restored(tmp_path):
    """No history (empty arrays in every lane) and a first save before any problem has
    finished (no result rows yet): orbax stores no empty array, they are made again."""
    kw = dict(num_steps=12, early_stopping=None, history=adam_jax.History.none())
    want = _fit_batched(**kw)
    ckpt = dict(checkpoint_dir=tmp_path, checkpoint_every=10, checkpoint_keep=10)
    _same(want, _fit_batched(**kw, **ckpt))
    progress = _progress(tmp_path)
    first = min(progress)  # checkpoints are named by the iterations run
    assert (first, progress[first]["rows"]) == (10, 0) and len(progress) > 2, progress
    _keep_up_to(tmp_path, first)
    _same(want, _fit_batched(**kw, **ckpt))


def test_fit_batched_iterator_of_chunks_resumes_in_every_chunk(tmp_path):
    """The chunks the checkpoint had consumed are pulled again and skipped."""
    inputs, cuts = _inputs(jnp.float32), np.cumsum((0, 24, 8, 8))
    chunks = [tuple(a[i:j] for a in inputs) for i, j in itertools.pairwise(cuts)]
    want = _fit_batched(inputs=iter(chunks))
    kw = dict(checkpoint_dir=tmp_path, checkpoint_every=15, checkpoint_keep=100)
    _same(want, _fit_batched(inputs=iter(chunks), **kw))
    kw["checkpoint_every"] = 100
    progress = _progress(tmp_path)
    assert {p["chunk"] for p in progress.values()} == {0, 1, 2}, progress
    for chunk in (2, 1, 0):
        # Back to the first checkpoint in this chunk.
        first = min(k for k in progress if progress[k]["chunk"] == chunk)
        _keep_up_to(tmp_path, first)
        _same(want, _fit_batched(inputs=iter(chunks), **kw))
        progress = _progress(tmp_path)
    # Other chunks than those consumed: refused.
    _keep_up_to(tmp_path, first)
    other = [chunks[0], tuple(a * 2 for a in chunks[1]), chunks[2]]
    with pytest.raises(ValueError, match="inputs yielded other chunks"):
        _fit_batched(inputs=iter(other), **kw)


def test_fit_batched_weakly_typed_inputs_resume_alike(tmp_path):
    """A learning rate made from a Python float is weakly typed, so bfloat16 params
    times it stay bfloat16. Lanes read back from a checkpoint keep the weak type, or
    the resumed run would round otherwise (and compile again)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(40, 16, 2)), jnp.bfloat16)
    y = jnp.asarray(rng.normal(size=(40, 16, 1)), jnp.bfloat16)
    lr = jnp.full((40,), 0.0123)
    assert lr.weak_type
    kw = dict(inputs=(x, y, lr), early_stopping=None, num_steps=90, history=None)
    ckpt = dict(checkpoint_dir=tmp_path, checkpoint_every=30, checkpoint_keep=10)
    want = _fit_batched(**kw)
    _same(want, _fit_batched(**kw, **ckpt))
    _keep_up_to(tmp_path, min(_progress(tmp_path)))
    _same(want, _fit_batched(**kw, **ckpt))


def test_fit_batched_other_data_values_are_refused(tmp_path):
    """Per-problem data with other values (same shapes) is another problem."""
    x, y, lr = _inputs(jnp.float32)

    def make(lr):
        def loss(w, batch):
            bx, by = batch
            return jnp.mean((bx @ w - by) ** 2)

        return loss, jnp.zeros((2, 1), jnp.float32), adam_jax.adam(lr)

    ckpt = dict(num_steps=20, checkpoint_dir=tmp_path, checkpoint_every=10**6)
    adam_jax.fit_batched(make, lr, data=(x[:, None], y[:, None]), **ckpt)
    before = listing(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint_dir=.*data\.values"):
        adam_jax.fit_batched(make, lr, data=(x[:, None], y[:, None] + 1), **ckpt)
    assert listing(tmp_path) == before
