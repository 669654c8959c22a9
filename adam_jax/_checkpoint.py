"""Periodic checkpoints inside :func:`adam_jax.fit`: a run that survives being killed.

With ``checkpoint_dir``, ``fit`` runs its compiled loop in segments of
``checkpoint_every`` steps, each one a resumed fit (``opt_state``,
``early_stopping_state``, ``initial_step``), and saves the whole run state with
orbax-checkpoint after each: the last params, both states, the next step, and
the part of ``losses``/``steps`` the fit's ``history`` keeps. Calling the same
fit again finds the newest complete checkpoint and goes on from there; the
result is bit-identical to an uninterrupted run. A ``fit.json`` record of the
problem (trees, shapes, dtypes, hyperparameters, fit options) sits beside the
checkpoints, and a directory written by another problem is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import threading
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax import _fit_checks, _history
from adam_jax._early_stopping import StopReason
from adam_jax._history import History
from adam_jax._result import FitResult

FORMAT = 1
PROBLEM_FILE = "fit.json"
STEPS_DIR = "steps"


def import_orbax() -> types.ModuleType:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            'fit(checkpoint_dir=...) needs orbax-checkpoint: pip install -e ".[checkpoint]" '
            '(or pip install "adam_jax[checkpoint]")'
        ) from e
    return ocp


def _leaf_record(x: Any) -> dict[str, Any]:
    a = np.asarray(x)
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


def _digest(tree: Any) -> str:
    h = hashlib.sha256()
    for x in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _describe(obj: Any, name: str, out: dict[str, Any], seen: set[int], depth: int = 0) -> None:
    """The values an optimizer (or early stopping) is built from, by name.

    optax transformations keep their hyperparameters in the closures of
    ``init``/``update``, adam_jax's in the arguments of ``jax.tree_util.Partial``
    objects (a static config dataclass and a NamedTuple of numbers); the walk
    reads both by name.
    """
    if depth > 8:
        return
    if obj is None or isinstance(obj, bool | int | str):
        out[name] = obj
    elif isinstance(obj, float):
        out[name] = repr(obj)
    elif isinstance(obj, np.ndarray | np.generic | jax.Array):
        a = np.asarray(obj)
        out[name] = repr(a.tolist()) if a.size <= 16 else f"{a.dtype}{a.shape}:{_digest(a)}"
    elif isinstance(obj, type | np.dtype):
        out[name] = getattr(obj, "__qualname__", str(obj))
    elif id(obj) in seen:
        return
    elif isinstance(obj, functools.partial):  # adam_jax's init/update: jax.tree_util.Partial
        seen.add(id(obj))
        _describe(obj.func, f"{name}.func", out, seen, depth + 1)
        _describe(obj.args, f"{name}.args", out, seen, depth + 1)
        _describe(dict(obj.keywords), f"{name}.keywords", out, seen, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # static configs
        seen.add(id(obj))
        for field in dataclasses.fields(obj):
            _describe(getattr(obj, field.name), f"{name}.{field.name}", out, seen, depth + 1)
    elif isinstance(obj, types.FunctionType):
        seen.add(id(obj))
        out[name] = f"{obj.__module__}.{obj.__qualname__}"
        for var, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=True):
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            _describe(value, f"{name}.{var}", out, seen, depth + 1)
    elif isinstance(obj, tuple | list):
        seen.add(id(obj))
        fields = getattr(obj, "_fields", None) or range(len(obj))
        for field, value in zip(fields, obj, strict=True):
            _describe(value, f"{name}.{field}", out, seen, depth + 1)
    elif isinstance(obj, dict):
        seen.add(id(obj))
        for key in sorted(obj, key=str):
            _describe(obj[key], f"{name}.{key}", out, seen, depth + 1)
    else:
        out[name] = type(obj).__qualname__


def problem_record(
    loss_fn: Callable[..., Any],
    params: Any,
    optimizer: Any,
    early_stopping: Any,
    data: Any,
    options: dict[str, Any],
) -> dict[str, Any]:
    """What makes a run the same run: compared key by key when a directory is reused."""
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
    record: dict[str, Any] = {"loss_fn": f"{getattr(loss_fn, '__module__', '')}.{name}"}
    record["params.tree"] = str(jax.tree.structure(params))
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        record[f"params{jax.tree_util.keystr(path)}"] = _leaf_record(x)
    record["params.values"] = _digest(params)
    record["data.tree"] = str(jax.tree.structure(data))
    for path, x in jax.tree_util.tree_flatten_with_path(data)[0]:
        record[f"data{jax.tree_util.keystr(path)}"] = _leaf_record(x)
    _describe(optimizer, "optimizer", record, set())
    _describe(early_stopping, "early_stopping", record, set())
    record.update({f"fit.{k}": v for k, v in options.items()})
    return json.loads(json.dumps(record, default=str))


def _check_problem(directory: Path, record: dict[str, Any]) -> bool:
    """Refuse a directory that holds another run; whether the record is still to be written.

    The record is written just before the first save (:func:`_claim`), so a call
    that fails before saving anything leaves no record to refuse its correction.
    """
    path = directory / PROBLEM_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        old = saved.get("problem", {})
        diffs = [
            f"{key}: {old.get(key, '(absent)')} in the directory, "
            f"{record.get(key, '(absent)')} in this call"
            for key in sorted(set(old) | set(record), key=str)
            if old.get(key) != record.get(key)
        ]
        if saved.get("format") != FORMAT:
            diffs.insert(0, f"format {saved.get('format')} (this version writes {FORMAT})")
        if diffs:
            shown = "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
            raise ValueError(
                f"checkpoint_dir={str(directory)!r} holds the checkpoints of a different fit "
                f"({len(diffs)} difference{'s' * (len(diffs) > 1)}: {shown}); nothing was "
                "written. Pass another checkpoint_dir, or delete this one to start over."
            )
        return False
    steps = directory / STEPS_DIR
    others = [p for p in directory.iterdir() if p != steps] if directory.exists() else []
    if others or (steps.exists() and any(steps.iterdir())):
        raise ValueError(
            f"checkpoint_dir={str(directory)!r} is not empty and holds no {PROBLEM_FILE}, so it "
            "is not a fit checkpoint directory; nothing was written. Pass a new or empty one."
        )
    return True


def _claim(directory: Path, record: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{PROBLEM_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "problem": record}, indent=1))
    os.replace(tmp, directory / PROBLEM_FILE)


class _Interrupt:
    """A SIGINT handler for the duration of the call: the first Ctrl-C asks for a
    checkpoint at the end of the current segment; a second one interrupts at once."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.requested = False
        self.previous: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        print(
            f"fit: Ctrl-C, saving a checkpoint when the current segment (at most "
            f"{self.every} steps) ends; press Ctrl-C again to stop without saving",
            flush=True,
        )
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


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


def _tree_abstract(template: Any) -> list[np.ndarray]:
    return [np.zeros(x.shape, x.dtype) for x in jax.tree.leaves(template)]


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
    ocp = import_orbax()
    history = _history.as_history(history)
    start = int(np.asarray(initial_step))
    options: dict[str, object] = {
        "num_steps": int(num_steps),
        "has_aux": bool(has_aux),
        "initial_step": start,
    }
    options["history"] = list(history)
    options["opt_state"] = None if opt_state is None else _digest(opt_state)
    options["early_stopping_state"] = (
        None if early_stopping_state is None else _digest(early_stopping_state)
    )
    directory = Path(checkpoint_dir).absolute()
    problem = problem_record(loss_fn, params, optimizer, early_stopping, data, options)
    unclaimed = _check_problem(directory, problem)

    opt_template = jax.eval_shape(optimizer.init, params)
    es_template = None if early_stopping is None else jax.eval_shape(early_stopping.init, params)
    parts = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params),
        opt_template,
        es_template,
    )
    defs = [jax.tree.structure(t) for t in parts]
    sizes = [d.num_leaves for d in defs]

    manager = ocp.CheckpointManager(
        directory / STEPS_DIR,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=checkpoint_keep,
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,
            enable_background_delete=True,
        ),
    )
    with manager, _Interrupt(checkpoint_every) as interrupt:
        state = _restore(ocp, manager, parts, history.length(num_steps), directory)
        if state is None:
            applied, finished, hist = 0, False, None
            current = (params, opt_state, early_stopping_state)
        else:
            leaves, progress_record = state
            applied = progress_record["applied"]
            finished = progress_record["finished"]
            hist = _History(history, num_steps, start, np.dtype(progress_record["loss_dtype"]))
            if hist.values.shape[0]:
                hist.values[:], hist.steps[:] = leaves[-2], leaves[-1]
            flat = [jnp.asarray(x) for x in leaves[: sum(sizes)]]
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
            # Numbered after every checkpoint there, a torn newer one included.
            number = max(manager.all_steps(), default=0) + 1
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
                _claim(directory, problem)
                unclaimed = False
            manager.save(
                number,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), progress=ocp.args.JsonSave(progress_record)
                ),
            )
            manager.wait_until_finished()
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


def _restore(
    ocp: types.ModuleType, manager: Any, parts: tuple, history_length: int, directory: Path
) -> tuple[list[np.ndarray], dict[str, Any]] | None:
    """The newest checkpoint that reads back whole, as (leaves, progress), or None.

    orbax writes a checkpoint under a temporary name and renames it when complete,
    and lists only complete ones; one that still fails to read is skipped.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
            record = dict(meta.progress)
            leaves = _tree_abstract([p for p in parts if p is not None])
            abstract = {f"{k:05d}": x for k, x in enumerate(leaves)}
            if history_length:
                abstract["history_values"] = np.zeros(history_length, record["loss_dtype"])
                abstract["history_steps"] = np.zeros(history_length, np.int32)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            state = manager.restore(step, args=args).state
            out = [np.asarray(state[f"{k:05d}"]) for k in range(len(leaves))]
            if history_length:
                out += [np.asarray(state["history_values"]), np.asarray(state["history_steps"])]
            return out, record
        except Exception as e:
            warnings.warn(
                f"checkpoint {step} in {str(directory)!r} could not be read "
                f"({type(e).__name__}: {e}); trying the one before it",
                RuntimeWarning,
                stacklevel=3,
            )
    return None


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
