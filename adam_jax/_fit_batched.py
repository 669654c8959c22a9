"""``fit_batched``: train many problems in one compiled program, each doing only its own steps.

Arrays of problems run as one compiled call (:func:`adam_jax._batched.run_all`),
on each device's share when they are sharded. A run that hands control back to
the host (chunks streamed from an iterator, a progress bar, checkpoints) is a
:class:`adam_jax._segments.Run`: the lanes advanced by budgets of iterations
(:func:`adam_jax._batched.segment`), which :func:`adam_jax._checkpoint.drive`
saves and restores.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax import _batched, _checkpoint, _checks, _compile, _fit_checks, _history, _reporting
from adam_jax._batched import Config, MakeProblem
from adam_jax._early_stopping import EarlyStopping
from adam_jax._history import History
from adam_jax._result import FitResult
from adam_jax._segments import ENTRY, Chunk, Chunks, Run, count, with_work
from adam_jax._tree import Split

DEFAULT_HISTORY = History.every(1, max_len=1_000)


def default_slots(num_problems: int, early_stopping: bool = True, num_shards: int = 1) -> int:
    """The lanes a batched run of ``num_problems`` problems uses on each of ``num_shards`` devices.

    Without early stopping every problem takes ``num_steps`` steps, so nothing
    is gained by refilling: each problem gets its own lane, as under
    ``jax.vmap``. With early stopping, fewer lanes than problems keep the work
    close to what the problems need: once the queue is empty the lanes run on
    until the last problem stops, and the idle lanes of that tail cost in
    proportion to the width; more lanes share the loop's fixed cost per
    iteration among more problems. On CPU, on the regression workload of
    ``benchmarks/bench_fit.py`` (1,024 problems that stop between 13 and 1,484
    steps), 32, 64, 128 and 256 lanes computed 1.00x, 1.00x, 1.01x and 1.16x
    the needed steps, in 0.24x, 0.22x, 0.22x and 0.28x the time of a
    hand-written ``jit(vmap(while_loop))``; with the problems in a random order
    (``--shuffle``), 1.09x, 1.19x, 1.39x and 1.80x, in 0.27x, 0.27x, 0.29x and
    0.47x.
    The default is therefore an eighth of the problems, from 32 to 128 (on an
    accelerator, which steps thousands of small problems in the time of one, a
    quarter of the problems, at least 4,096).

    Args:
      num_problems: the number of problems.
      early_stopping: whether the problems may stop before ``num_steps`` (a
        run with an early-stopping rule).
      num_shards: the devices the problems are sharded over.

    Returns:
      The number of lanes per device, at most the problems per device.

    Example:
      >>> import adam_jax
      >>> adam_jax.default_slots(1_000, early_stopping=False)  # one lane per problem
      1000
      >>> adam_jax.default_slots(64, num_shards=8)  # never more lanes than problems
      8
    """
    per_shard = -(-num_problems // num_shards)
    if not early_stopping:
        return per_shard
    if jax.default_backend() == "cpu":
        return max(1, min(per_shard, max(32, min(128, per_shard // 8))))
    return max(1, min(per_shard, max(4096, per_shard // 4)))


def _problem_axis(
    inputs: object,
) -> tuple[jax.sharding.Mesh | jax.sharding.AbstractMesh, PartitionSpec] | None:
    """The mesh axes the problems are sharded over, if the inputs are so sharded."""
    leaf = jax.tree.leaves(inputs)[0]
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return None
    spec = (*tuple(sharding.spec), None)
    if spec[0] is None:
        return None
    return sharding.mesh, PartitionSpec(spec[0])


@functools.lru_cache(maxsize=64)
def _sharded(
    config: _batched.Config, mesh: jax.sharding.Mesh, spec: PartitionSpec
) -> Callable[..., tuple[FitResult, jax.Array]]:
    """``run_all`` on each device's share of the problems, with no communication."""
    run = functools.partial(_batched.run_all, config=config)
    specs = (spec, spec, PartitionSpec())

    def local(inputs: object, data: object, rule: _batched.Rule) -> tuple[FitResult, jax.Array]:
        results, computed = run(inputs, data, rule)
        return results, jax.lax.psum(computed, spec[0])

    return _compile.compiled(
        jax.shard_map(
            local, mesh=mesh, in_specs=specs, out_specs=(spec, PartitionSpec()), check_vma=False
        )
    )


def fit_batched(
    make_problem: MakeProblem,
    inputs: object,
    *,
    num_steps: int,
    slots: int | None = None,
    early_stopping: EarlyStopping | None = None,
    has_aux: bool = False,
    data: object = None,
    history: History | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_keep: int = 2,
) -> FitResult:
    r"""Train many problems in one compiled program, each stopping on its own, with no wasted steps.

    ``make_problem(one_inputs)`` builds one problem from its slice of
    ``inputs``: ``(loss_fn, params, optimizer)``, with the same meaning as in
    :func:`adam_jax.fit` (so per-problem data, initial params and optimizer
    hyperparameters all come from traced values). The problems run in
    ``slots`` lanes: every iteration takes one step in each lane, and when a
    lane's problem stops (early stopping, or ``num_steps``) its result is
    written and the lane takes the next problem; once the queue is empty,
    the lanes run until their last problem stops. So the work is close to the
    sum of the steps the problems need, where ``jax.jit(jax.vmap(fit))`` runs
    every problem as long as the slowest.

    Each problem's result equals what ``jax.jit(jax.vmap(fit))`` gives it on
    the same inputs: the same steps, stop reason and best step, and the same
    values up to float rounding. On CPU the lanes are compiled with XLA's
    elemental emitters (``compiler_options={"xla_cpu_use_fusion_emitters":
    False}``), in about half the time of JAX's default emitters, which round
    a few operations differently: compiled with the same options,
    ``jax.jit(jax.vmap(fit))`` gave the same values to 1e-12 in float64 in the
    tests; with JAX's default options, within 64 ulps. Without early
    stopping, and with a lane for every problem (the default then), no lane
    frees up before the end, so the problems run as ``jax.vmap`` of ``fit``'s
    own loop: bitwise the results of ``jax.jit(jax.vmap(fit))`` compiled with
    the same options, at its cost (a run that hands control back to the host,
    for a progress bar or checkpoints, still goes through the lanes).

    The compiled program is cached on ``make_problem`` (pass the same function,
    not a new lambda, to reuse it), the other options, the inputs' shapes and
    the static part of ``early_stopping``: its numbers are arguments of the
    program, as the optimizer's are, so new inputs of the same shapes, and a
    rule of the same structure with other numbers, do not recompile.

    **Devices.** If the inputs' leaves are sharded over a mesh along their
    leading axis (a ``NamedSharding`` whose spec starts with a mesh axis, on
    an Auto or Explicit mesh, in one process or several), each device runs its
    own lanes on its own problems, with no communication; the results are
    sharded the same way. The number of problems must divide evenly.

    **More problems than fit in memory.** ``inputs`` may be an iterator of
    input pytrees (chunks, each with its own leading axis; equal sizes compile
    once). The chunks stream through the same lanes: a chunk is loaded while
    the lanes still run problems of the one before, and each result returns
    to the host when its problem finishes, so device memory holds one chunk,
    the lanes and their finished results. ``data`` must then be an iterator
    of matching chunks, or None. The results come back as NumPy arrays.

    **Long runs.** With ``checkpoint_dir``, the lanes hand control back every
    ``checkpoint_every`` iterations and the run state is saved: the lanes (their
    problems, inputs, loop states), the queue position, the results of the
    problems finished so far and the work counts. Running the identical call
    again with the same directory resumes from the newest complete checkpoint;
    the result (its ``work`` counts included) is bit for bit that of the same
    call without checkpoints. Not saved:
    ``inputs``, ``data`` and ``make_problem``, which the repeated call passes
    again. A directory written by another problem is refused with an error
    naming what differs; the first Ctrl-C saves at the end of the running
    segment and says how to resume. With inputs given as an iterator of chunks,
    the identical call must yield the same chunks again: those the checkpoint
    had consumed are pulled again, checked against it, and skipped. Inputs
    sharded over several devices are not supported with checkpoints (a
    ``ValueError``). See the *Long runs* guide.

    Args:
      make_problem: ``make_problem(one_inputs) -> (loss_fn, params, optimizer)``.
      inputs: a pytree whose leaves share a leading axis of N problems, or an
        iterator of such pytrees (see above).
      num_steps: the most steps each problem takes, a positive int.
      slots: the number of lanes (per device); default :func:`default_slots`
        (an eighth of the problems, from 32 to 128 on CPU, with early stopping; one
        lane per problem without).
      early_stopping: an :func:`adam_jax.early_stopping` object, shared by all
        problems (each has its own state).
      has_aux: as in :func:`adam_jax.fit`.
      data: per-problem batches: a pytree whose leaves have a leading axis of N
        and then the batch axis; problem ``k``'s step ``i`` gets
        ``data[k, i % n]``.
      history: as in :func:`adam_jax.fit`; default ``History.every(1,
        max_len=1_000)`` (the first 1,000 steps of each problem).
      progress: a tqdm bar of problems finished, with the min and median of
        their last values (the run then hands control back to the host about
        every 0.2 s to update it, as a checkpointed run does to save).
      checkpoint_dir: save the whole run state there every ``checkpoint_every``
        iterations with orbax-checkpoint (``pip install -e ".[checkpoint]"`` from a checkout),
        keeping the last ``checkpoint_keep``; the same call again resumes from
        the newest complete checkpoint and returns exactly what an uninterrupted
        call returns. Not with inputs sharded over several devices (see below).
      checkpoint_every: the iterations between two saves (needed with
        ``checkpoint_dir``); one iteration is one step in every lane.
      checkpoint_keep: how many checkpoints to keep, the newest.

    Returns:
      A :class:`adam_jax.FitResult` whose fields have a leading axis of N, in
      input order; its ``work`` (a :class:`BatchedWork`) says how many
      lane-steps were computed for the steps the problems needed.

    Example:
      Eight linear regressions, each with its own data and learning rate:

      >>> import jax, jax.numpy as jnp, adam_jax
      >>> x = jax.random.normal(jax.random.key(0), (8, 50, 3))
      >>> y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.1
      >>> def make_problem(p):
      ...     x, y, lr = p
      ...     loss = lambda w: jnp.mean((x @ w - y) ** 2)
      ...     return loss, jnp.zeros(3), adam_jax.adam(lr)
      >>> lrs = jnp.geomspace(1e-2, 1e-1, 8)
      >>> r = adam_jax.fit_batched(make_problem, (x, y, lrs), num_steps=5_000,
      ...     early_stopping=adam_jax.early_stopping(None, target=0.05), slots=4)
      >>> r.stop_reason_names().tolist() == ["TARGET"] * 8
      True
      >>> bool((r.num_steps[0] > r.num_steps[-1]))
      True
    """
    _fit_checks.check_positive_int("num_steps", num_steps)
    if slots is not None:
        _fit_checks.check_positive_int("slots", slots)
    _checks.check_bool("has_aux", has_aux)
    _checks.check_bool("progress", progress)
    if progress:
        _reporting.import_tqdm()
    options = None
    if checkpoint_dir is not None:
        options = _checkpoint.CheckpointOptions.of(
            checkpoint_dir, checkpoint_every, checkpoint_keep, "iterations"
        )
        _checkpoint.check_concrete(() if isinstance(inputs, Iterator) else (inputs, data), ENTRY)
        _checkpoint.import_orbax(ENTRY)
    if not callable(make_problem):
        raise TypeError(f"make_problem must be callable, got make_problem={make_problem!r}")
    _fit_checks.check_early_stopping(early_stopping)
    history = DEFAULT_HISTORY if history is None else _history.as_history(history)
    rule = Split(early_stopping)
    config = functools.partial(
        _config, make_problem, num_steps, slots, early_stopping, has_aux, history
    )
    if isinstance(inputs, Iterator):
        if data is not None and not isinstance(data, Iterator):
            raise TypeError("with inputs given as an iterator of chunks, data must be one too")
        chunks: Iterator[Chunk] = (
            ((c, None) for c in inputs) if data is None else zip(inputs, data, strict=True)
        )
        run = Run(config, rule, Chunks(chunks, "each chunk of inputs"), True, progress)
    else:
        n = count(inputs, "inputs")
        if data is not None and count(data, "data") != n:
            raise ValueError(f"data must have a leading axis of N = {n} problems, like inputs")
        axis = _problem_axis(inputs)
        if axis is not None:
            if options is not None:
                raise ValueError(
                    f"checkpoint_dir={str(options.directory)!r} is not supported with inputs "
                    f"sharded over a mesh ({axis[0].size} devices); pass inputs on one device, "
                    "or run without checkpoint_dir"
                )
            return _run_sharded(config, rule, inputs, data, n, axis, progress)
        if options is None and not progress:
            run_all = _compile.compiled(_batched.run_all, "config")
            result, computed = run_all(inputs, data, rule, config=config(data, n))
            return with_work(jax.block_until_ready(result), int(computed))
        run = Run(config, rule, Chunks(iter([(inputs, data)]), "inputs"), False, progress)
    with run:
        if options is None:
            state = run.fresh()
            while not state.finished:
                state = run.advance(state, np.iinfo(np.int32).max)
        else:
            state = _checkpoint.drive(
                run, run.fresh, options, run.record(make_problem, early_stopping)
            )
        return run.result(state)


def _config(
    make_problem: MakeProblem,
    num_steps: int,
    slots: int | None,
    es: EarlyStopping | None,
    has_aux: bool,
    history: History,
    data: object,
    n: int,
    shards: int = 1,
) -> Config:
    n_data = None
    if data is not None:
        # Leading axis: problems; then the batches each problem cycles through.
        n_data = _fit_checks.data_length(jax.tree.map(lambda d: d[0], data))
    if slots is None:
        slots = default_slots(n, es is not None, shards)
    return Config(make_problem, int(num_steps), n_data, bool(has_aux), history, int(slots))


def _run_sharded(config: Any, rule: Split[Any], inputs: object, data: object, n: int,
                 axis: tuple[Any, PartitionSpec], progress: bool) -> FitResult:  # fmt: skip
    # The problems' axis is one mesh axis or a tuple of them (a name is a pytree leaf).
    shards = int(np.prod([axis[0].shape[a] for a in jax.tree.leaves(axis[1][0])]))
    if n % shards:
        raise ValueError(
            f"inputs are sharded over {shards} devices along the problems' axis, "
            f"which must divide N = {n} evenly"
        )
    bar = _reporting.ProblemBar(n) if progress else None
    result, computed = _sharded(config(data, n, shards), *axis)(inputs, data, rule)
    result = jax.block_until_ready(result)
    if bar is not None:  # one compiled call over every device: the bar moves at its end
        bar.update(np.asarray(result.best_value))
        bar.close()
    return with_work(result, int(computed))
