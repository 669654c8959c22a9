"""``fit``: a whole training run, early stopping included, as one compiled loop.

This module checks the arguments and passes the optimizer and early stopping to
the compiled program as a :class:`adam_jax._tree.Split` (numbers traced, the rest
what the program is cached on); the compiled pieces are :mod:`adam_jax._fit_engine`'s,
and a checkpointed fit advances its loop state through :func:`adam_jax._checkpoint.drive`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from adam_jax import _checkpoint, _checks, _compile, _fit_checks, _fit_engine, _history, _reporting
from adam_jax._early_stopping import EarlyStopping, EarlyStoppingState
from adam_jax._fit_engine import PRETRACED, FitRun, Hyper, Static, mesh_of_inputs
from adam_jax._history import History
from adam_jax._result import FitResult
from adam_jax._tree import Key, Split

__all__ = ["FitResult", "History", "fit"]


def fit(
    loss_fn: Callable[..., jax.Array | tuple[jax.Array, jax.Array]],
    params: optax.Params,
    optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    data: object = None,
    early_stopping: EarlyStopping | None = None,
    has_aux: bool = False,
    history: History | None = None,
    log_every: int | None = None,
    progress: bool = False,
    resume: FitResult | None = None,
    opt_state: optax.OptState | None = None,
    early_stopping_state: EarlyStoppingState | None = None,
    initial_step: jax.typing.ArrayLike = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_keep: int = 2,
) -> FitResult:
    r"""Train ``params`` with ``optimizer`` for up to ``num_steps`` steps in one compiled loop.

    Step :math:`i = s, s + 1, \dots` (:math:`s` is ``initial_step``, 0 unless
    the fit resumes a saved run) computes the loss and its gradient at the
    current params :math:`p_i` (``jax.value_and_grad`` inside the loop), gives
    the monitored value to the early-stopping state, and then, unless that
    says stop, applies the optimizer's update:

    .. math::

      \ell_i, g_i = \mathrm{value\_and\_grad}(f)(p_i), \qquad
      p_{i+1} = p_i + \mathrm{optimizer}(g_i)

    If step :math:`i` stops, its update is not applied: ``last_params`` is
    :math:`p_i`, the point where the stopping value was measured, and
    ``num_steps`` (updates applied) is :math:`i - s`. From then on nothing
    changes. With ``early_stopping(restore_best=True)`` (its default) the
    result's ``params`` are the best ones; ``last_params`` stay available.

    **Non-finite values.** Without early stopping, a NaN or ±inf gradient flows
    into the optimizer state and the params, as in optax and ``torch.optim``,
    and ``losses`` shows NaN from then on. Two guards:

    * ``early_stopping`` with ``check_finite=True`` (its default) stops with
      ``NONFINITE`` at the first step whose monitored value, training loss or
      gradient holds a NaN or ±inf. That step's update is not applied, so the
      returned ``last_params`` and ``opt_state`` are those from before it, with no
      NaN in them. ``fit`` checks the gradient itself, because a gradient can
      overflow while the loss stays finite: such a step is given to early
      stopping as a NaN value, while ``losses`` keeps the finite value
      measured. The check is one ``isfinite`` reduction per step, a read of
      the gradient (Adam's own update reads and writes seven arrays of that
      size); it runs only with early stopping. With ``check_finite=False``
      the step only counts as not improving. During early stopping's
      ``start_step`` warm-up nothing is checked (updates before ``start_step``
      change nothing but the step count), so a bad step there reaches the
      state: use the next guard too if the warm-up may see one.
    * ``optax.apply_if_finite(optimizer, max_consecutive_errors)`` skips the
      bad update and leaves the params and the inner state as they were; the
      run goes on. (With early stopping too, pass ``check_finite=False``, or
      the run stops at the bad step instead.)

    **Continue a run.** ``fit(loss_fn, None, optimizer, num_steps=more,
    resume=result)`` continues the run that returned ``result`` for up to
    ``more`` steps: from its ``last_params``, ``opt_state`` and
    ``early_stopping_state`` (plain pytrees of arrays, which can be saved), at
    its ``next_step``. Batches (``data[i % n]``), early stopping's ``wait``, best
    and count, and the log lines pick up where the run left off, and the
    trajectory is bit-identical to one longer run's on the same machine. A run
    that has stopped takes no step. The same parts can be passed one by one
    (``opt_state``, ``early_stopping_state``, ``initial_step``), for states
    saved elsewhere.

    All steps run in one ``lax.while_loop``, with no Python dispatch per step.
    ``fit`` is jitted and cached on the structure of its arguments: the array
    and number leaves of ``optimizer`` and ``early_stopping`` (a learning rate
    held as a pytree leaf, say) are arguments of the compiled program, so fits
    that differ only in them compile once; their other leaves (functions) and
    ``loss_fn`` are part of the cache key when hashable. Called directly on
    CPU (not under ``jax.jit``, ``jax.vmap`` or ``jax.grad``), it is compiled
    with XLA's elemental emitters
    (``compiler_options={"xla_cpu_use_fusion_emitters": False}``), which
    compile the loop in about half the time of JAX's default emitters and
    round a few operations differently, by a few ulps; under a transformation,
    with JAX's defaults (or the options of your ``jax.jit``). Called directly, the
    loop exits at the stop. ``jax.jit(jax.vmap(f))`` over a function ``f``
    that calls ``fit`` trains many problems at once; they may differ in data,
    initial params and optimizer hyperparameters, each stops on its own, and
    each result equals what the problem gets when fitted alone, up to float
    rounding: batched kernels may round differently, so in float32 a problem
    whose stop depends on a threshold can stop a few steps apart (float64 runs
    matched exactly in the tests). Under vmap the loop runs until every
    problem has stopped, with the stopped ones frozen (a stopped problem's
    step changes nothing, and nothing is selected over the history buffer).
    :func:`adam_jax.fit_batched` runs each problem only for its own steps.
    Inputs may be sharded over meshes with Auto or Explicit axes (from
    ``jax.make_mesh``'s defaults, with or without ``jax.set_mesh``), and the
    results equal the unsharded run's.

    **Memory.** Besides the params and states, a fit holds its ``history``
    buffer (by default at most 100 000 values and their steps, whatever
    ``num_steps`` is) and, with ``log_every``, 128 values waiting to be printed.

    Args:
      loss_fn: ``loss_fn(params)`` (full batch) or ``loss_fn(params, batch)``
        when ``data`` is given; returns a real scalar, or with ``has_aux=True``
        a pair ``(loss, metric)``.
      params: the initial params, a pytree.
      optimizer: an ``optax.GradientTransformation``; ``update`` is given the params.
      num_steps: the most steps to take, a positive Python int.
      data: a pytree whose leaves share a leading axis indexed by step; step
        :math:`i` gets ``batch = data[i % n]``, so shorter data is cycled.
      early_stopping: an :func:`early_stopping` object, or None to run all steps.
      has_aux: ``loss_fn`` returns ``(loss, metric)``: gradients are taken of
        ``loss``, while ``metric`` (a scalar, such as a validation loss or
        an MSE next to the half sum of squares it differentiates) is what early
        stopping monitors and what ``losses``, the log and the bar show.
      history: which steps' values ``losses`` keeps: an
        :class:`adam_jax.History`. None (the default) is
        ``History.every(1, max_len=100_000)``: every step, the first 100 000.
        ``best_step``, ``best_value`` and ``num_steps`` do not depend on it.
      log_every: print ``step {i} loss {value}`` for steps 0, ``log_every``,
        2·``log_every``, ... (the value is the monitored one, as in
        ``losses``). The steps are the multiples of ``log_every`` from
        ``initial_step`` on, so a resumed fit logs the lines the uninterrupted
        run would have.
      progress: show a tqdm progress bar with the step and the latest value
        (needs the ``progress`` extra: ``pip install -e ".[progress]"`` from a checkout).
      resume: a :class:`FitResult` to continue (``params`` must then be None,
        and ``opt_state``, ``early_stopping_state`` and ``initial_step`` left
        out): its last params and states at its ``next_step``; under vmap, a
        batched result continues each problem.
      opt_state: the optimizer state to start from, e.g. a saved
        ``FitResult.opt_state``, instead of ``optimizer.init(params)``. It must
        have the tree, shapes and dtypes ``init`` gives; nothing is cast.
      early_stopping_state: the early-stopping state to start from, e.g. a
        saved ``FitResult.early_stopping_state``, instead of
        ``early_stopping.init(params)``; needs ``early_stopping``.
      initial_step: the number of the first step, >= 0, as Keras's
        ``initial_epoch``: a resumed fit passes the saved run's ``next_step``
        (``resume`` does it). It picks the batches and the logged
        steps; ``losses[k]`` is step ``initial_step + k``. (Early stopping
        counts in its own state; its ``start_step`` is a warm-up, in the same
        numbering.) An int, or an int array, also traced: under vmap each
        problem may resume at its own step. A new value does not recompile.
      checkpoint_dir: save the whole run state there every ``checkpoint_every``
        steps with orbax-checkpoint (``pip install -e ".[checkpoint]"`` from a checkout),
        keeping the last ``checkpoint_keep``; the same call again resumes from
        the newest complete one, bit-identically, and a Ctrl-C saves before it
        stops. A directory of another problem is refused. Not under jit/vmap.
        See the long-runs guide.
      checkpoint_every: the steps between two saves (needed with ``checkpoint_dir``).
      checkpoint_keep: how many checkpoints to keep, the newest.

    Logging and the bar are driven from inside the compiled loop through
    ``io_callback`` (an effect: it runs under ``jit`` and ``vmap`` whether or
    not its result is used). A host round trip costs tens of microseconds, more
    than a small step, so the loop calls back about every 0.1 s (each call tells
    the loop when to call next), or when 128 log values wait, and every call
    prints the lines that have come due, each with the value measured at its
    own step. Lines thus arrive in small bursts, but they are the same lines.

    Under vmap there is one call for the whole batch, not one per problem: one
    line per logged step, with the min, mean and max over the problems that
    measured that step and how many did
    (``step 100 loss min … mean … max … (3 of 8 running)``); one bar, with the
    furthest step, the min of the latest values and the number still running.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: ``num_steps <= 0``, ``loss_fn`` not returning a scalar, data
        leaves disagreeing on the leading axis, ``initial_step < 0``, a given
        state that does not match what ``init`` builds for ``params``,
        ``early_stopping_state`` without ``early_stopping``.
      TypeError: ``num_steps``, ``log_every`` or ``initial_step`` not an int.

    Example:
      Adam on a linear regression, stopping once the MSE falls below 0.05;
      the gradient is taken of half the sum of squares, and the MSE is the
      monitored metric:

      >>> import jax.numpy as jnp, adam_jax
      >>> t = jnp.linspace(-1.0, 1.0, 50)
      >>> x = jnp.stack([jnp.ones_like(t), t, t**2], axis=1)
      >>> y = x @ jnp.array([0.5, 2.0, -1.0]) + 0.2 * jnp.sin(7.0 * t)
      >>> def loss_fn(w):
      ...     error = y - x @ w
      ...     return 0.5 * jnp.sum(error**2), jnp.mean(error**2)
      >>> result = adam_jax.fit(
      ...     loss_fn, jnp.zeros(3), adam_jax.adam(0.01), num_steps=100_000,
      ...     has_aux=True, early_stopping=adam_jax.early_stopping(None, target=0.05))
      >>> print(int(result.num_steps), result.stop_reason_names())
      243 TARGET

      The same run in two parts, 200 steps and then the rest; the second part
      ends on the same bits:

      >>> es = adam_jax.early_stopping(None, target=0.05)
      >>> part = adam_jax.fit(
      ...     loss_fn, jnp.zeros(3), adam_jax.adam(0.01), num_steps=200,
      ...     has_aux=True, early_stopping=es)
      >>> rest = adam_jax.fit(
      ...     loss_fn, None, adam_jax.adam(0.01), num_steps=100_000 - 200,
      ...     has_aux=True, early_stopping=es, resume=part)
      >>> print(int(rest.next_step), bool((rest.params == result.params).all()))
      243 True
    """
    _fit_checks.check_positive_int("num_steps", num_steps)
    if log_every is not None:
        _fit_checks.check_positive_int("log_every", log_every)
    _checks.check_bool("has_aux", has_aux)
    _checks.check_bool("progress", progress)
    history = _history.as_history(history)
    if progress:
        _reporting.import_tqdm()
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    _fit_checks.check_early_stopping(early_stopping)
    if resume is not None:
        params, opt_state, early_stopping_state, initial_step = _fit_checks.resumed(
            resume, params, opt_state, early_stopping_state, initial_step
        )
    if early_stopping_state is not None and early_stopping is None:
        raise ValueError(
            "early_stopping_state needs early_stopping: pass the early_stopping(...) "
            "object that made it"
        )
    _fit_checks.check_initial_step(initial_step, num_steps)
    static = Static(
        Key(loss_fn), int(num_steps), _fit_checks.data_length(data), bool(has_aux), history,
        None if log_every is None else int(log_every), bool(progress),
    )  # fmt: skip
    hyper: Hyper = Split((optimizer, early_stopping))
    step0 = jnp.asarray(initial_step).astype(jnp.int32)
    args = (hyper, params, data, opt_state, early_stopping_state, step0)
    if checkpoint_dir is not None:
        options = _checkpoint.CheckpointOptions.of(
            checkpoint_dir, checkpoint_every, checkpoint_keep, "steps"
        )
        _checkpoint.check_concrete(args, "fit")
        # Compiled when called: FitRun.template traces it under eval_shape.
        fresh = lambda: _compile.compiled(_fit_engine.init, "static")(*args, static=static)
        run = FitRun(static, hyper, data, num_steps, int(step0), fresh)
        record = run.record(loss_fn, params, optimizer, early_stopping, opt_state,
                            early_stopping_state, history)  # fmt: skip
        state = _checkpoint.drive(run, fresh, options, record)
        return _compile.compiled(_fit_engine.postprocess, "static")(hyper, state, static=static)
    mesh, pretraced = mesh_of_inputs(loss_fn, params, data, args)
    token = PRETRACED.set(pretraced)
    try:
        with mesh:
            return _compile.compiled(_fit_engine.run, "static")(*args, static=static)
    finally:
        PRETRACED.reset(token)
