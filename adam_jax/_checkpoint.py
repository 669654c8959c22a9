"""Periodic checkpoints inside :func:`adam_jax.fit`: a run that survives being killed.

With ``checkpoint_dir``, ``fit`` runs its compiled loop in segments of
``checkpoint_every`` steps, each one a resumed fit (``opt_state``,
``early_stopping_state``, ``initial_step``), and saves the whole run state with
orbax-checkpoint after each, as ``steps/<n>`` (numbered in the order saved; the
progress record holds the global step the run goes on from): the last params,
both states, the next step, and the part of
``losses``/``steps`` the fit's ``history`` keeps. Calling the same fit again
finds the newest complete checkpoint, says so (step and directory) and goes on
from there; the result is bit-identical to an uninterrupted run. A ``fit.json`` record of the
problem (trees, shapes, dtypes, hyperparameters, fit options) sits beside the
checkpoints, and a directory written by another problem is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax import _checkpoint_store as store
from adam_jax import _fit_checks, _history
from adam_jax._early_stopping import StopReason
from adam_jax._history import History
from adam_jax._result import FitResult


class _History:
    """The part of ``losses``/``steps`` kept so far, in its final layout (host arrays)."""

    def __init__(self, history: History, num_steps: int, run_start: int, dtype: Any) -> None:
        self.history, self.run_start = history, run_start
        n = history.length(num_steps)
        self.values = np.full((n,), np.nan, dtype)
        self.steps = np.full((n,), -1, np.int32)

    def segment_history(self, every: int, applied: int) -> History:
        """What a segment starting ``applied`` steps into the run keeps: enough to
        rebuild the whole run's choice exactly."""
        h = self.history
        if h.kind == "every":
            aligned = every % h.k == 0 and applied % h.k == 0
            return History.every(h.k if aligned else 1, max_len=None)
        return h

    def absorb(self, values: Any, steps: Any) -> None:
        values, steps = np.asarray(values), np.asarray(steps)
        kept = steps >= 0
        values, steps = values[kept].astype(self.values.dtype), steps[kept]
        n = self.values.shape[0]
        if n == 0:
            return
        if self.history.kind == "every":
            t = steps.astype(np.int64) - self.run_start
            sel = (t % self.history.k == 0) & (t // self.history.k < n)
            self.values[t[sel] // self.history.k] = values[sel]
            self.steps[t[sel] // self.history.k] = steps[sel]
        else:
            old = self.steps >= 0
            all_values = np.concatenate([self.values[old], values])[-n:]
            all_steps = np.concatenate([self.steps[old], steps])[-n:]
            self.values[: len(all_values)], self.steps[: len(all_steps)] = all_values, all_steps


def fit_with_checkpoints(
    fit: Callable[..., FitResult],
    loss_fn: Callable[..., Any],
    params: Any,
    optimizer: Any,
    *,
    num_steps: int,
    data: Any,
    early_stopping: Any,
    has_aux: bool,
    history: History | None,
    log_every: int | None,
    progress: bool,
    opt_state: Any,
    early_stopping_state: Any,
    initial_step: Any,
    checkpoint_dir: str | os.PathLike,
    checkpoint_every: int | None,
    checkpoint_keep: int,
) -> FitResult:
    """``fit`` in segments of ``checkpoint_every`` steps, saved after each (see ``fit``)."""
    if checkpoint_every is None:
        raise ValueError("checkpoint_dir needs checkpoint_every, the steps between two saves")
    _fit_checks.check_positive_int("checkpoint_every", checkpoint_every)
    _fit_checks.check_positive_int("checkpoint_keep", checkpoint_keep)
    _fit_checks.check_positive_int("num_steps", num_steps)
    inputs = (params, data, opt_state, early_stopping_state, initial_step)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(inputs)):
        raise ValueError(
            "checkpoint_dir needs concrete inputs: call fit with checkpoints outside "
            "jit and vmap (it saves from the host between compiled segments)"
        )
    _fit_checks.check_initial_step(initial_step, num_steps)
    if early_stopping_state is not None and early_stopping is None:
        raise ValueError("early_stopping_state needs early_stopping")
    ocp = store.import_orbax()
    history = _history.as_history(history)
    start = int(np.asarray(initial_step))
    options: dict[str, object] = {
        "num_steps": int(num_steps),
        "has_aux": bool(has_aux),
        "initial_step": start,
    }
    options["history"] = list(history)
    options["opt_state"] = None if opt_state is None else store.digest(opt_state)
    options["early_stopping_state"] = (
        None if early_stopping_state is None else store.digest(early_stopping_state)
    )
    directory = Path(checkpoint_dir).absolute()
    problem = store.problem_record(loss_fn, params, optimizer, early_stopping, data, options)
    unclaimed = store.check_problem(directory, problem)

    opt_template = jax.eval_shape(optimizer.init, params)
    es_template = None if early_stopping is None else jax.eval_shape(early_stopping.init, params)
    parts = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params),
        opt_template,
        es_template,
    )
    defs = [jax.tree.structure(t) for t in parts]
    sizes = [d.num_leaves for d in defs]

    manager = store.manager(ocp, directory, checkpoint_keep)
    with manager, store.Interrupt(checkpoint_every) as interrupt:
        n_leaves = sum(sizes)
        length = history.length(num_steps)

        def abstract(record: dict[str, Any]) -> dict[str, np.ndarray]:
            out = {
                f"{k:05d}": np.zeros(x.shape, x.dtype)
                for k, x in enumerate(jax.tree.leaves([p for p in parts if p is not None]))
            }
            if length:
                out["history_values"] = np.zeros(length, record["loss_dtype"])
                out["history_steps"] = np.zeros(length, np.int32)
            return out

        state = store.restore_newest(ocp, manager, directory, abstract)
        if state is None:
            applied, finished, hist = 0, False, None
            current = (params, opt_state, early_stopping_state)
        else:
            saved, progress_record = state
            applied = progress_record["applied"]
            finished = progress_record["finished"]
            hist = _History(history, num_steps, start, np.dtype(progress_record["loss_dtype"]))
            if hist.values.shape[0]:
                hist.values[:], hist.steps[:] = saved["history_values"], saved["history_steps"]
            flat = [jnp.asarray(saved[f"{k:05d}"]) for k in range(n_leaves)]
            cut = np.cumsum([0, *sizes])
            current = tuple(
                d.unflatten(flat[a:b]) for d, a, b in zip(defs, cut[:-1], cut[1:], strict=True)
            )
        while not finished:
            seg = min(checkpoint_every, num_steps - applied)
            seg_history = (
                hist.segment_history(checkpoint_every, applied)
                if hist is not None
                else _History(history, num_steps, start, np.float32).segment_history(
                    checkpoint_every, applied
                )
            )
            r = fit(
                loss_fn, current[0], optimizer, num_steps=seg, data=data,
                early_stopping=early_stopping, has_aux=has_aux, history=seg_history,
                log_every=log_every, progress=progress, opt_state=current[1],
                early_stopping_state=current[2], initial_step=start + applied,
            )  # fmt: skip
            if hist is None:
                hist = _History(history, num_steps, start, np.dtype(r.losses.dtype))
            hist.absorb(r.losses, r.steps)
            taken = int(r.num_steps)
            applied += taken
            current = (r.last_params, r.opt_state, r.early_stopping_state)
            finished = taken < seg or applied >= num_steps
            tree = {f"{k:05d}": np.asarray(x) for k, x in enumerate(jax.tree.leaves(current))}
            if hist.values.shape[0]:
                tree["history_values"], tree["history_steps"] = hist.values, hist.steps
            progress_record = {
                "applied": applied,
                "next_step": start + applied,
                "finished": finished,
                "loss_dtype": str(hist.values.dtype),
            }
            if unclaimed:
                store.claim(directory, problem)
                unclaimed = False
            store.save(ocp, manager, tree, progress_record)
            if interrupt.requested:
                break
        if interrupt.requested:
            raise KeyboardInterrupt(
                f"fit interrupted: checkpoint saved at step {start + applied} "
                f"({applied} of {num_steps} steps taken) in {str(directory)!r}; "
                "run the same fit call with the same checkpoint_dir to resume"
            )
    assert hist is not None  # the loop above ran at least one segment, or restored one
    return _result(current, hist, applied)


def _result(current: tuple, hist: _History, applied: int) -> FitResult:
    """The :class:`FitResult` of the whole run, as ``_loop.Loop.postprocess`` builds it."""
    last_params, opt_state, es = current
    dtype = hist.values.dtype
    if es is None:
        best_params = last_params
        reason, best_step = jnp.int32(StopReason.NONE), jnp.int32(-1)
        best_value = jnp.full([], jnp.nan, dtype)
    else:
        best_params = last_params if es.best_params is None else es.best_params
        reason, best_step, best_value = es.reason, es.best_step, es.best_value
    return FitResult(
        params=best_params,
        best_params=best_params,
        opt_state=opt_state,
        losses=jnp.asarray(hist.values),
        num_steps=jnp.int32(applied),
        stop_reason=reason,
        best_step=best_step,
        best_value=best_value,
        early_stopping_state=es,
        last_params=last_params,
        steps=jnp.asarray(hist.steps),
    )
