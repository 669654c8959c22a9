"""Checkpoints of a run's loop state: what ``fit`` and ``fit_batched`` share.

A run is an :class:`Engine`: a state, a way to advance it by a budget of
iterations, and a way to write it as arrays and a progress record and read it
back. :func:`drive` advances it, saving after every ``every`` iterations with
orbax-checkpoint as ``steps/<step>`` (the step the run goes on from, or the
batched run's iterations), and the same call again resumes from the newest
checkpoint that reads back whole, saying so. orbax writes each checkpoint under a
temporary name and renames it when complete; one that is listed but fails to
read is moved aside (``unreadable/``) before anything is saved, so a folder is
written once and never replaced. A record of the problem (``fit.json``)
recognises a directory's run and refuses another, naming what differs;
:class:`Interrupt` turns the first Ctrl-C into a checkpoint at the end of the
running segment.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax import _checks, _fit_checks, _reporting

S = TypeVar("S")

FORMAT = 3  # 3: checkpoints hold the loop state (stopped: the rule's own flag), by step
PROBLEM_FILE = "fit.json"
STEPS_DIR = "steps"
UNREADABLE_DIR = "unreadable"


def import_orbax(entry: str = "fit") -> types.ModuleType:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            f"{entry}(checkpoint_dir=...) needs orbax-checkpoint, an optional dependency: "
            'pip install -e ".[checkpoint]" from a checkout'
        ) from e
    return cast(types.ModuleType, ocp)


def check_concrete(inputs: object, entry: str) -> None:
    if _checks.is_traced(inputs):
        raise ValueError(
            f"checkpoint_dir needs concrete inputs: call {entry} with checkpoints outside "
            "jit and vmap (it saves from the host between compiled segments)"
        )


def tree_record(name: str, tree: Any) -> dict[str, Any]:
    """The structure of ``tree`` and the shape and dtype of each leaf, keyed by path."""
    record: dict[str, Any] = {f"{name}.tree": str(jax.tree.structure(tree))}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(x)
        record[f"{name}{jax.tree_util.keystr(path)}"] = {
            "shape": list(a.shape),
            "dtype": str(a.dtype),
        }
    return record


def digest(tree: Any) -> str:
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
        out[name] = repr(a.tolist()) if a.size <= 16 else f"{a.dtype}{a.shape}:{digest(a)}"
    elif isinstance(obj, type | np.dtype):
        out[name] = getattr(obj, "__qualname__", str(obj))
    elif id(obj) not in seen:
        parts = _parts(obj)
        if parts is None:
            out[name] = type(obj).__qualname__
            return
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            out[name] = f"{obj.__module__}.{obj.__qualname__}"
        for key, value in parts:
            _describe(value, f"{name}.{key}", out, seen, depth + 1)


def _parts(obj: Any) -> list[tuple[object, Any]] | None:
    """The named parts of a container, a function's closure or a static config; None
    for anything else."""
    if isinstance(obj, functools.partial):  # adam_jax's init/update: jax.tree_util.Partial
        return [("func", obj.func), ("args", obj.args), ("keywords", dict(obj.keywords))]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # static configs
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if isinstance(obj, types.FunctionType):
        cells = zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=True)
        return [(var, cell.cell_contents) for var, cell in cells if _filled(cell)]
    if isinstance(obj, tuple | list):
        return list(zip(getattr(obj, "_fields", None) or range(len(obj)), obj, strict=True))
    if isinstance(obj, dict):
        return [(key, obj[key]) for key in sorted(obj, key=str)]
    return None


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # a closure variable not yet assigned
        return False
    return True


def problem_record(
    loss_fn: Callable[..., Any],
    params: Any,
    optimizer: Any,
    early_stopping: Any,
    data: Any,
    options: dict[str, Any],
    prefix: str = "fit",
) -> dict[str, Any]:
    """What makes a run the same run: compared key by key when a directory is reused."""
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
    record: dict[str, Any] = {"loss_fn": f"{getattr(loss_fn, '__module__', '')}.{name}"}
    record |= tree_record("params", params) | {"params.values": digest(params)}
    record |= tree_record("data", data)
    _describe(optimizer, "optimizer", record, set())
    _describe(early_stopping, "early_stopping", record, set())
    record.update({f"{prefix}.{k}": v for k, v in options.items()})
    return cast(dict[str, Any], json.loads(json.dumps(record, default=str)))


def check_problem(directory: Path, record: dict[str, Any], entry: str = "fit") -> bool:
    """Refuse a directory that holds another run; whether the record is still to be written.

    The record is written just before the first save (:func:`claim`), so a call
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
                f"checkpoint_dir={str(directory)!r} holds the checkpoints of a different {entry} "
                f"({len(diffs)} difference{'s' * (len(diffs) > 1)}: {shown}); nothing was "
                "written. Pass another checkpoint_dir, or delete this one to start over."
            )
        return False
    steps = directory / STEPS_DIR
    # A claim cut short (killed between writing and renaming its record) leaves a
    # temporary file that does not make the directory anyone else's.
    others = directory.exists() and any(
        p.name not in (STEPS_DIR, UNREADABLE_DIR) and not p.name.startswith(TMP_PREFIX)
        for p in directory.iterdir()
    )
    if others or (steps.exists() and any(steps.iterdir())):
        raise ValueError(
            f"checkpoint_dir={str(directory)!r} is not empty and holds no {PROBLEM_FILE}, so it "
            f"is not a {entry} checkpoint directory; nothing was written. Pass a new or empty one."
        )
    return True


TMP_PREFIX = f".{PROBLEM_FILE}.tmp-"


def claim(directory: Path, record: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{TMP_PREFIX}{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "problem": record}, indent=1))
    os.replace(tmp, directory / PROBLEM_FILE)


class Interrupt:
    """A SIGINT handler for the duration of the call: the first Ctrl-C asks for a
    checkpoint at the end of the current segment; a second one interrupts at once."""

    def __init__(self, every: int, entry: str = "fit", unit: str = "steps") -> None:
        self.every, self.entry, self.unit = every, entry, unit
        self.requested = False
        self.previous: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._handle)
            # None: a handler installed outside Python; Ctrl-C then raises as usual.
            self.previous = signal.default_int_handler if previous is None else previous
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        print(
            f"{self.entry}: Ctrl-C, saving a checkpoint when the current segment (at most "
            f"{self.every} {self.unit}) ends; press Ctrl-C again to stop without saving",
            flush=True,
        )
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """Where and how often a run saves (``checkpoint_dir``, ``_every``, ``_keep``)."""

    directory: Path
    every: int
    keep: int

    @classmethod
    def of(
        cls, directory: str | os.PathLike[str], every: object, keep: object, unit: str
    ) -> CheckpointOptions:
        if every is None:
            raise ValueError(f"checkpoint_dir needs checkpoint_every, the {unit} between two saves")
        _fit_checks.check_positive_int("checkpoint_every", every)
        _fit_checks.check_positive_int("checkpoint_keep", keep)
        return cls(Path(directory).absolute(), int(every), int(keep))  # type: ignore[call-overload]


class Engine(Protocol[S]):
    """A run :func:`drive` can checkpoint: advanced by budgets of iterations, saved as a
    pytree of arrays and a JSON progress record holding ``step`` and ``finished``."""

    entry: str  # "fit" or "fit_batched", as errors and messages name it
    unit: str  # what ``every`` counts

    def advance(self, state: S, budget: int) -> S: ...
    def finished(self, state: S) -> bool: ...
    def save(self, state: S) -> tuple[Any, dict[str, Any]]: ...
    def template(self, record: dict[str, Any]) -> Any: ...  # ShapeDtypeStructs of the tree
    def load(self, tree: Any, record: dict[str, Any]) -> S: ...
    def interrupted(self, record: dict[str, Any], directory: Path) -> str: ...


def drive(
    engine: Engine[S], fresh: Callable[[], S], options: CheckpointOptions, problem: dict[str, Any]
) -> S:
    """Advance ``fresh()``, or the newest checkpoint of the same problem, to the end,
    saving every ``options.every`` iterations."""
    ocp = import_orbax(engine.entry)
    unclaimed = check_problem(options.directory, problem, engine.entry)
    with Interrupt(options.every, engine.entry, engine.unit) as interrupt:
        restored = restore_newest(ocp, options, engine.template)
        state = fresh() if restored is None else engine.load(*restored)
        last = -1 if restored is None else restored[1]["step"]
        with _manager(ocp, options) as mgr:
            while not engine.finished(state):
                state = engine.advance(state, options.every)
                tree, record = engine.save(state)
                if record["step"] > last:  # an iteration-less end changes nothing saved
                    if unclaimed:
                        claim(options.directory, problem)
                        unclaimed = False
                    arrays = {
                        f"{k:05d}": np.asarray(x) for k, x in enumerate(jax.tree.leaves(tree))
                    }
                    _save(ocp, mgr, arrays, record)
                    last = record["step"]
                if interrupt.requested:
                    raise KeyboardInterrupt(engine.interrupted(record, options.directory))
    return state


def _manager(ocp: types.ModuleType, options: CheckpointOptions, *, cleanup: bool = True) -> Any:
    """Synchronous saves: the next segment starts once the last one is on disk.

    With ``cleanup``, the manager deletes the temporary folders of unfinished saves in a
    background thread that its ``close`` does not wait for (the first save does): only the
    manager that saves cleans up, or two threads would delete the same folder.
    """
    return ocp.CheckpointManager(
        options.directory / STEPS_DIR,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=options.keep,
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=cleanup,
            enable_background_delete=True,
        ),
    )


def _save(ocp: types.ModuleType, mgr: Any, tree: dict[str, Any], record: dict[str, Any]) -> None:
    # orbax refuses empty arrays; restore_newest makes them again from their template.
    tree = {k: x for k, x in tree.items() if np.size(x)}
    state = ocp.args.StandardSave(tree)
    mgr.save(
        record["step"], args=ocp.args.Composite(state=state, progress=ocp.args.JsonSave(record))
    )
    mgr.wait_until_finished()


def restore_newest(
    ocp: types.ModuleType,
    options: CheckpointOptions,
    template: Callable[[dict[str, Any]], Any],
) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that reads back whole, as (tree, progress record), or None;
    announced (:func:`adam_jax._reporting.announce_resume`) with its step and folder.

    ``template(record)`` gives the tree's structure, shapes and dtypes. Newer ones that
    fail to read are moved to ``unreadable/`` with a warning, once the manager that
    listed them is closed, so that the run saves those steps again in new folders.
    """
    found, unreadable = None, []
    with _manager(ocp, options, cleanup=False) as mgr:
        for step in sorted(mgr.all_steps(), reverse=True):
            try:
                meta = mgr.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
                record = dict(meta.progress)
                like = template(record)
                zeros = [np.zeros(t.shape, t.dtype) for t in jax.tree.leaves(like)]
                stored = {f"{k:05d}": x for k, x in enumerate(zeros) if x.size}
                args = ocp.args.Composite(state=ocp.args.StandardRestore(stored))
                state = mgr.restore(step, args=args).state if stored else {}
                leaves = [state[f"{k:05d}"] if x.size else x for k, x in enumerate(zeros)]
                found = (restore_like(like, leaves), record, step)
                break
            except Exception as e:
                unreadable.append(step)
                warnings.warn(
                    f"checkpoint {step} in {str(options.directory)!r} could not be read "
                    f"({type(e).__name__}: {e}); trying the one before it",
                    RuntimeWarning,
                    stacklevel=4,
                )
    aside = options.directory / UNREADABLE_DIR
    for step in unreadable:
        aside.mkdir(exist_ok=True)
        shutil.move(options.directory / STEPS_DIR / str(step), aside / f"{step}.{time.time_ns()}")
    if found is None:
        return None
    _reporting.announce_resume(found[1], options.directory / STEPS_DIR / str(found[2]))
    return found[0], found[1]


def restore_like(template: Any, leaves: list[np.ndarray]) -> Any:
    """Restored leaves as arrays with their templates' tree, dtypes and weak types.

    A weakly typed value (a learning rate from ``jnp.full(n, 0.05)``) that came back
    strongly typed would promote differently (a bfloat16 param times it would become
    float32) and compile a second program; NumPy keeps no weak types, so they are
    taken from the template.
    """
    arrays = [
        _weak(jnp.asarray(x, t.dtype)) if t.weak_type else jnp.asarray(x, t.dtype)
        for t, x in zip(jax.tree.leaves(template), leaves, strict=True)
    ]
    return jax.tree.structure(template).unflatten(arrays)


def _weak(x: jax.Array) -> jax.Array:
    # JAX has no public way to make an array weakly typed but from a Python scalar.
    from jax._src.lax.lax import _convert_element_type

    return cast(jax.Array, _convert_element_type(x, np.dtype(x.dtype), weak_type=True))
