"""Long batched runs survive faults: ``fit_batched(checkpoint_dir=..., checkpoint_every=...)``.

A worker process (tests/_fault_worker.py, batched modes: 40 float64 problems with
per-problem data, ``has_aux``, patience and ``History.last``, in 16 lanes whose tail
shrinks to 4 and then 1) is killed with SIGKILL at random moments and in the middle of
checkpoint writes, restarted each time, and must end with the result and work counts
of an uninterrupted run without checkpoints, bit for bit. A SIGINT saves and says how to
resume. In process: resumed runs in float32 and float64 from checkpoints in every phase of
the tail, inputs as an iterator of chunks, a torn checkpoint, directories of other
problems, bad arguments.
"""

from __future__ import annotations

import itertools
import json
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

NAMES = ["b64_patience_last5_data"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return worker_env(tmp_path_factory)


def _run_to_end(env: dict[str, str], workdir: Path) -> None:
    run_to_end(env, "batched-checkpoint", workdir)


def _assert_bitwise_equal(reference: Path, workdir: Path) -> None:
    assert_bitwise_equal(reference, "batched-plain", workdir, "batched-checkpoint", NAMES)


@pytest.fixture(scope="module")
def reference(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted result and work counts, from one worker without checkpoints."""
    workdir = tmp_path_factory.mktemp("batched_plain")
    rc, err = finish(start(env, "batched-plain", workdir))
    assert rc == 0, err
    return workdir


def test_sigkill_at_random_moments_and_during_saves(env, reference, tmp_path):
    """Ten kills of one run, restarted after each: every other one at a random moment
    after start-up, the others by the worker itself a few milliseconds into a write."""
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in itertools.count():
        assert attempt < 20, f"only {kills} of 20 workers were killed"
        if attempt % 2:
            proc = start(
                env, "batched-checkpoint", tmp_path, f"--die-on-save={rng.uniform(0, 0.02)}"
            )
            rc, err = finish(proc)
            assert rc in (-signal.SIGKILL, 0), err
            kills += rc == -signal.SIGKILL
        else:
            proc = start(env, "batched-checkpoint", tmp_path)
            if not wait_for(proc, "ready"):
                pytest.fail(finish(proc)[1])
            time.sleep(rng.uniform(0.5, 3.0))
            if kill(proc):
                kills += 1
            else:
                assert proc.returncode == 0, proc.stderr.read()
        if kills >= 10:
            break
    _run_to_end(env, tmp_path)
    _assert_bitwise_equal(reference, tmp_path)


def test_sigint_saves_and_says_how_to_resume(env, reference, tmp_path):
    proc = start(env, "batched-checkpoint", tmp_path)
    assert wait_for(proc, "saving", count=2)
    proc.send_signal(signal.SIGINT)
    rc, err = finish(proc)
    assert rc != 0
    assert "KeyboardInterrupt: fit_batched interrupted: checkpoint saved after" in err
    assert "run the same fit_batched call with the same checkpoint_dir to resume" in err
    _run_to_end(env, tmp_path)
    _assert_bitwise_equal(reference, tmp_path)


# In-process tests: 40 regressions in 16 lanes; the tail shrinks to 4 lanes, then 1.


def _inputs(dtype, n=40):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16, 2))
    y = x @ (rng.normal(size=(n, 2, 1)) * 2) + 0.3 * rng.normal(size=(n, 16, 1))
    lr = np.geomspace(1e-2, 0.3, n)[rng.permutation(n)]
    return tuple(jnp.asarray(a, dtype) for a in (x, y, lr))


def _maker(optimizer=adam_jax.adam):
    def make_problem(p):
        x, y, lr = p

        def loss(w):
            return jnp.mean((x @ w - y) ** 2)

        return loss, jnp.zeros((2, 1), x.dtype), optimizer(lr)

    return make_problem


MAKE = _maker()
OPTIONS = dict(
    num_steps=400,
    slots=16,
    early_stopping=adam_jax.early_stopping(None, target=0.12),
    history=adam_jax.History.every(2, max_len=30),
)


def _fit(dtype, make=MAKE, inputs=None, **kw):
    inputs = _inputs(dtype) if inputs is None else inputs
    return adam_jax.fit_batched(make, inputs, **{**OPTIONS, **kw})


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


def _progress(directory: Path) -> dict[int, dict]:
    """Each checkpoint's progress record, by number (orbax's JSON file)."""
    return {
        int(p.name): json.loads((p / "progress" / "metadata").read_text())
        for p in (directory / "steps").iterdir()
        if p.name.isdigit()
    }


@pytest.fixture(scope="module", params=["float32", "float64"])
def uninterrupted(request):
    dtype = jnp.dtype(request.param)
    return dtype, _fit(dtype)


def test_resume_from_every_phase_of_the_tail(uninterrupted, tmp_path):
    """From a checkpoint while lanes refill, and in the tail at 4 lanes, with another interval."""
    dtype, want = uninterrupted
    got = _fit(dtype, checkpoint_dir=tmp_path, checkpoint_every=60, checkpoint_keep=100)
    _same(want, got)
    progress = _progress(tmp_path)
    widths = [progress[k]["width"] for k in sorted(progress)]
    assert widths[0] == 16 and widths[-1] == 4, widths
    assert progress[max(progress)]["finished"]
    for width in (4, 16):
        # Back to the first checkpoint at this width: the run's state there.
        first = min(k for k in progress if progress[k]["width"] == width)
        for k in progress:
            if k > first:
                shutil.rmtree(tmp_path / "steps" / str(k))
        assert sorted(_progress(tmp_path)) == [k for k in sorted(progress) if k <= first]
        assert not progress[first]["finished"]
        _same(want, _fit(dtype, checkpoint_dir=tmp_path, checkpoint_every=45, checkpoint_keep=100))
        progress = _progress(tmp_path)


def test_interval_longer_than_the_run(uninterrupted, tmp_path):
    dtype, want = uninterrupted
    got = _fit(dtype, checkpoint_dir=tmp_path, checkpoint_every=10**6)
    _same(want, got)
    progress = _progress(tmp_path)
    assert len(progress) == 1 and progress[max(progress)]["finished"], progress
    # The finished run's result is read back, without a step.
    _same(want, _fit(dtype, checkpoint_dir=tmp_path, checkpoint_every=10**6))
    assert len(_progress(tmp_path)) == 1


def test_empty_arrays_are_saved_and_restored(tmp_path):
    """No history (empty arrays in every lane) and a first save before any problem has
    finished (no result rows yet): orbax stores no empty array, they are made again."""
    kw = dict(num_steps=12, early_stopping=None, history=adam_jax.History.none())
    want = _fit(jnp.float32, **kw)
    ckpt = dict(checkpoint_dir=tmp_path, checkpoint_every=10, checkpoint_keep=10)
    _same(want, _fit(jnp.float32, **kw, **ckpt))
    progress = _progress(tmp_path)
    first = min(progress)  # checkpoints are named by the iterations run
    assert (first, progress[first]["rows"]) == (10, 0) and len(progress) > 2, progress
    for k in progress:
        if k > first:
            shutil.rmtree(tmp_path / "steps" / str(k))
    _same(want, _fit(jnp.float32, **kw, **ckpt))


def test_torn_checkpoint_is_never_loaded(tmp_path):
    want = _fit(jnp.float32)
    kw = dict(checkpoint_dir=tmp_path, checkpoint_every=100, checkpoint_keep=3)
    _same(want, _fit(jnp.float32, **kw))
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
        got = _fit(jnp.float32, **kw)
    _same(want, got)


def _chunks(sizes=(24, 8, 8)):
    inputs = _inputs(jnp.float32)
    cuts = np.cumsum((0, *sizes))
    return [tuple(a[i:j] for a in inputs) for i, j in itertools.pairwise(cuts)]


def test_iterator_of_chunks_resumes_in_every_chunk(tmp_path):
    """The chunks the checkpoint had consumed are pulled again and skipped."""
    chunks = _chunks()
    want = _fit(jnp.float32, inputs=iter(chunks))
    kw = dict(checkpoint_dir=tmp_path, checkpoint_every=15, checkpoint_keep=100)
    _same(want, _fit(jnp.float32, inputs=iter(chunks), **kw))
    kw["checkpoint_every"] = 100
    progress = _progress(tmp_path)
    assert {p["chunk"] for p in progress.values()} == {0, 1, 2}, progress
    for chunk in (2, 1, 0):
        # Back to the first checkpoint in this chunk.
        first = min(k for k in progress if progress[k]["chunk"] == chunk)
        for k in progress:
            if k > first:
                shutil.rmtree(tmp_path / "steps" / str(k))
        _same(want, _fit(jnp.float32, inputs=iter(chunks), **kw))
        progress = _progress(tmp_path)
    # Other chunks than those consumed: refused.
    for k in progress:
        if k > first:
            shutil.rmtree(tmp_path / "steps" / str(k))
    other = [chunks[0], tuple(a * 2 for a in chunks[1]), chunks[2]]
    with pytest.raises(ValueError, match="inputs yielded other chunks"):
        _fit(jnp.float32, inputs=iter(other), **kw)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("saved_batched_run")
    _fit(jnp.float32, checkpoint_dir=directory, checkpoint_every=1_000)
    return directory


def _other_tree(p):
    return MAKE(p[0])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(inputs=_inputs(jnp.float32, n=41)), "inputs[0]"),  # shape: 41 problems
        (dict(inputs=tuple(a.astype(jnp.float16) for a in _inputs(jnp.float32))), "float16"),
        (dict(inputs=(_inputs(jnp.float32), jnp.zeros(40)), make=_other_tree), "inputs.tree"),
        (dict(inputs=tuple(a * 2 for a in _inputs(jnp.float32))), "inputs.values"),
        (dict(make=_maker(adam_jax.amsgrad)), "optimizer"),
        (dict(num_steps=300), "fit_batched.num_steps"),
        (dict(slots=8), "fit_batched.slots"),
        (dict(history=adam_jax.History.last(5)), "fit_batched.history"),
        (dict(early_stopping=adam_jax.early_stopping(None, target=0.1)), "target"),
    ],
)
def test_other_problem_is_refused(saved_run, change, named):
    before = listing(saved_run)
    with pytest.raises(ValueError, match="holds the checkpoints of a different fit_batched") as e:
        _fit(jnp.float32, checkpoint_dir=saved_run, checkpoint_every=1_000, **change)
    assert named in str(e.value)
    assert listing(saved_run) == before


def test_bad_arguments(tmp_path, monkeypatch):
    inputs = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="checkpoint_dir needs checkpoint_every"):
        _fit(jnp.float32, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        _fit(jnp.float32, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_keep"):
        _fit(jnp.float32, checkpoint_dir=tmp_path, checkpoint_every=5, checkpoint_keep=1.5)
    with pytest.raises(ValueError, match="concrete inputs"):
        jax.jit(lambda i: _fit(jnp.float32, inputs=i, checkpoint_dir=tmp_path,
                               checkpoint_every=5)[0].params)(inputs)  # fmt: skip
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"fit_batched\(checkpoint_dir=\.\.\.\) needs orbax"):
        _fit(jnp.float32, checkpoint_dir=tmp_path, checkpoint_every=5)
    assert not any(tmp_path.iterdir())


def test_weakly_typed_inputs_resume_alike(tmp_path):
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
    want = _fit(jnp.bfloat16, **kw)
    _same(want, _fit(jnp.bfloat16, **kw, **ckpt))
    progress = _progress(tmp_path)
    for k in progress:
        if k > min(progress):
            shutil.rmtree(tmp_path / "steps" / str(k))
    _same(want, _fit(jnp.bfloat16, **kw, **ckpt))


def test_a_record_cut_short_does_not_block_the_directory(tmp_path):
    """A kill between writing the problem record and renaming it leaves a temporary
    file; the directory is still the run's own."""
    (tmp_path / ".fit.json.tmp-12345").write_text("{")
    want = _fit(jnp.float32)
    _same(want, _fit(jnp.float32, checkpoint_dir=tmp_path, checkpoint_every=100))


def test_other_data_values_are_refused(tmp_path):
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
