"""``fit_batched``: train many problems in one compiled program, each doing only its own steps."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax import _batched, _checkpoint_batched, _checks, _fit_checks, _history, _reporting
from adam_jax._batched import MakeProblem
from adam_jax._early_stopping import EarlyStopping
from adam_jax._history import History
from adam_jax._result import FitResult

DEFAULT_HISTORY = History.every(1, max_len=1_000)


class BatchedWork(NamedTuple):
    """How much a batched run computed, next to what its problems needed.

    Attributes:
      computed: lane-steps computed, idle lanes included.
      needed: steps the problems took (each problem's ``num_steps``, plus its
        stopping step).
    """

    computed: int
    needed: int


def default_slots(n: int, stops_early: bool = True, n_shards: int = 1) -> int:
    """The lanes a batched run of ``n`` problems uses on each of ``n_shards`` devices.

    Without early stopping every problem takes ``num_steps`` steps, so nothing
    is gained by refilling: each problem gets its own lane, as under
    ``jax.vmap``. With early stopping, fewer lanes than problems keep the work
    close to what the problems need (the tail, where lanes empty and are
    compacted, is a smaller share of the run), while more lanes share the
    loop's fixed cost per iteration among more problems. On CPU, on the
    regression workload of ``benchmarks/bench_fit.py`` (1,024 problems that stop
    between 13 and 1,484 steps), 256 lanes computed 1.04x the needed steps in
    0.13x the time of a hand-written ``jit(vmap(while_loop))``; 128 lanes
    computed 1.02x in 0.17x (the loop's fixed cost, shared by fewer lanes);
    512 lanes computed 1.58x in 0.26x.
    The default is therefore a quarter of the problems, at least 128 (4,096 on
    an accelerator, which steps thousands of small problems in the time of one).

    Args:
      n: the number of problems.
      stops_early: whether the problems may stop before ``num_steps`` (a fit
        with early stopping).
      n_shards: the devices the problems are sharded over.

    Returns:
      The number of lanes per device, at most the problems per device.

    Example:
      >>> import adam_jax
      >>> adam_jax.default_slots(1_000, stops_early=False)  # one lane per problem
      1000
      >>> adam_jax.default_slots(64, n_shards=8)  # never more lanes than problems
      8
    """
    per_shard = -(-n // n_shards)
    if not stops_early:
        return per_shard
    floor = 128 if jax.default_backend() == "cpu" else 4096
    return max(1, min(per_shard, max(floor, per_shard // 4)))


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
def _sharded(config: _batched.Config, mesh: jax.sharding.Mesh, spec: PartitionSpec):
    """``run_all`` on each device's share of the problems, with no communication."""
    run = functools.partial(_batched.run_all, config=config)
    specs = (spec, spec, PartitionSpec())

    def local(inputs: object, data: object, rule: _batched.Rule) -> tuple[FitResult, jax.Array]:
        results, computed = run(inputs, data, rule)
        return results, jax.lax.psum(computed, spec[0])

    return jax.jit(
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
    return_work: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    checkpoint_keep: int = 2,
) -> FitResult | tuple[FitResult, BatchedWork]:
    r"""Train many problems in one compiled program, each stopping on its own, with no wasted steps.

    ``make_problem(one_inputs)`` builds one problem from its slice of
    ``inputs``: ``(loss_fn, params, optimizer)``, with the same meaning as in
    :func:`adam_jax.fit` (so per-problem data, initial params and optimizer
    hyperparameters all come from traced values). The problems run in
    ``slots`` lanes: every iteration takes one step in each lane, and when a
    lane's problem stops (early stopping, or ``num_steps``) its result is
    written and the lane takes the next problem. Once the queue is empty,
    each time half the lanes are idle the running problems move together and
    the idle lanes are dropped. So the work is close to the sum of the steps
    the problems need, where ``jax.jit(jax.vmap(fit))`` runs every problem as
    long as the slowest.

    Each problem's result equals what ``jax.vmap(fit)`` gives it on the same
    inputs: the same steps, stop reason and best step, and the same values up
    to the rounding of batched kernels (bitwise where XLA computes a lane the
    same way; float32 results were bitwise equal in the tests).

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
    problems, inputs, loop states), the queue position, the stage of the
    narrowing tail, the results of the problems finished so far and the work
    counts. Running the identical call again with the same directory resumes
    from the newest complete checkpoint; the result (and ``return_work``'s
    counts) is bit for bit that of the same call without checkpoints. Not saved:
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
        (a quarter of the problems, at least 128 on CPU, with early stopping; one
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
        the latest values of the running problems.
      return_work: also return a :class:`BatchedWork`.
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
      input order; with ``return_work``, ``(result, work)``.

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
    _checks.check_bool("return_work", return_work)
    if progress:
        _reporting.import_tqdm()
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = _checkpoint_batched.check_args(
            inputs, data, checkpoint_dir, checkpoint_every, checkpoint_keep
        )
    if not callable(make_problem):
        raise TypeError(f"make_problem must be callable, got make_problem={make_problem!r}")
    _fit_checks.check_early_stopping(early_stopping)
    history = DEFAULT_HISTORY if history is None else _history.as_history(history)
    if isinstance(inputs, Iterator):
        if data is not None and not isinstance(data, Iterator):
            raise TypeError("with inputs given as an iterator of chunks, data must be one too")
        chunks = inputs if data is None else zip(inputs, data, strict=True)
        if checkpoint is not None:
            pairs = chunks if data is not None else ((c, None) for c in chunks)
            count = functools.partial(_count, what="each chunk of inputs")
            config = lambda i, d: _config(make_problem, d, num_steps, slots, early_stopping,
                                          has_aux, history, progress, count(i))  # fmt: skip
            result, computed = _checkpoint_batched.fit_batched_with_checkpoints(
                make_problem, early_stopping, pairs, config, count, streamed=True, **checkpoint
            )
            work = BatchedWork(computed, _needed(result))
        else:
            result, work = _stream(
                make_problem,
                chunks,
                data is not None,
                num_steps,
                slots,
                early_stopping,
                has_aux,
                history,
                progress,
            )
    else:
        result, work = _all_at_once(
            make_problem,
            inputs,
            data,
            num_steps,
            slots,
            early_stopping,
            has_aux,
            history,
            progress,
            checkpoint,
        )
    return (result, work) if return_work else result


def _count(inputs: object, what: str) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError(f"{what} has no array leaves: it must hold at least one problem")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"the leaves of {what} must share a leading axis of N >= 1 problems, "
            f"got leading sizes {sorted(sizes, key=str)}"
        )
    return cast(int, sizes.pop())


def _config(make_problem, data, num_steps, slots, es, has_aux, history, progress, n, shards=1):
    n_data = None
    if data is not None:
        # Leading axis: problems; then the batches each problem cycles through.
        n_data = _fit_checks.data_length(jax.tree.map(lambda d: d[0], data))
    return _batched.Config(
        make_problem=make_problem,
        num_steps=int(num_steps),
        n_data=n_data,
        has_aux=bool(has_aux),
        history=history,
        slots=int(slots) if slots is not None else default_slots(n, es is not None, shards),
        progress=bool(progress),
    )


def _needed(result: FitResult) -> int:
    # A problem that stopped also computed its stopping step.
    stopped = np.asarray(result.stop_reason) != 0
    return int(np.sum(np.asarray(result.num_steps, np.int64)) + np.sum(stopped))


def _all_at_once(
    make_problem, inputs, data, num_steps, slots, es, has_aux, history, progress, checkpoint
):
    n = _count(inputs, "inputs")
    if data is not None and _count(data, "data") != n:
        raise ValueError(f"data must have a leading axis of N = {n} problems, like inputs")
    axis = _problem_axis(inputs)
    shards = 1 if axis is None else int(np.prod([axis[0].shape[a] for a in _names(axis[1])]))
    if n % shards:
        raise ValueError(
            f"inputs are sharded over {shards} devices along the problems' axis, "
            f"which must divide N = {n} evenly"
        )
    config = _config(
        make_problem, data, num_steps, slots, es, has_aux, history, progress, n, shards
    )
    if checkpoint is not None:
        if axis is not None:
            raise ValueError(
                f"checkpoint_dir={str(checkpoint['checkpoint_dir'])!r} is not supported with "
                f"inputs sharded over a mesh ({shards} devices); pass inputs on one device, "
                "or run without checkpoint_dir"
            )
        result, computed = _checkpoint_batched.fit_batched_with_checkpoints(
            make_problem, es, iter([(inputs, data)]), lambda i, d: config, lambda x: n,
            streamed=False, **checkpoint,
        )  # fmt: skip
        return result, BatchedWork(computed, _needed(result))
    run = (
        functools.partial(_batched.run_all_jit, config=config)
        if axis is None
        else _sharded(config, *axis)
    )
    with _batched.BatchProgress(n) if progress else contextlib.nullcontext():
        result, computed = run(inputs, data, _batched.Rule(es))
    result = jax.block_until_ready(result)
    return result, BatchedWork(int(computed), _needed(result))


def _names(spec: PartitionSpec) -> tuple[str, ...]:
    axes = spec[0]
    return axes if isinstance(axes, tuple) else (axes,)


def _stream(make_problem, chunks, with_data, num_steps, slots, es, has_aux, history, progress):
    lanes, base, config = None, 0, None
    rows: list[FitResult] = []
    ids: list[np.ndarray] = []
    computed = 0
    chunk = next(chunks, None)
    if chunk is None:
        raise ValueError("inputs is an empty iterator: it must yield at least one chunk")
    with _batched.BatchProgress(None) if progress else contextlib.nullcontext():
        while chunk is not None:
            inputs, data = chunk if with_data else (chunk, None)
            n = _count(inputs, "each chunk of inputs")
            if config is None:
                config = _config(
                    make_problem, data, num_steps, slots, es, has_aux, history, progress, n
                )
            following = next(chunks, None)
            lanes, out = _batched.advance_jit(
                lanes, inputs, data, jnp.int32(base), _batched.Rule(es),
                config=config, final=following is None,
            )  # fmt: skip
            # Only the rows written come back to the host.
            keep = np.flatnonzero(np.asarray(out.ids) >= 0)
            rows.append(jax.tree.map(lambda r, k=keep: np.asarray(r)[k], out.results))
            ids.append(np.asarray(out.ids)[keep])
            computed += int(out.computed)
            base += n
            chunk = following
    order = np.argsort(np.concatenate(ids), kind="stable")
    result = jax.tree.map(lambda *r: np.concatenate(r)[order], *rows)
    return result, BatchedWork(computed, _needed(result))
