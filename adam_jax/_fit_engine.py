"""The compiled pieces of :func:`adam_jax.fit` and its checkpointed run.

``fit`` is one program (:func:`run`: init, the loop of :mod:`adam_jax._loop` to its
end, the result); a checkpointed fit is :class:`FitRun`, an
:class:`adam_jax._checkpoint.Engine` that advances the same loop state by segments
(:func:`init`, ``_advance``, :func:`postprocess`). Each, compiled, is cached on a
:class:`Static` and takes the optimizer and early stopping as a
:class:`adam_jax._tree.Split` (numbers traced, the rest what the program is cached on).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from adam_jax import _checkpoint, _checks, _compile, _fit_checks, _loop, _reporting
from adam_jax._compile import F
from adam_jax._early_stopping import EarlyStopping
from adam_jax._history import History
from adam_jax._loop import LoopState
from adam_jax._result import FitResult
from adam_jax._tree import Key, Split, is_data, without_weak_types

Hyper = Split[tuple[optax.GradientTransformation, EarlyStopping | None]]


class Static(NamedTuple):
    """What a compiled fit is cached on."""

    loss_fn: Key
    max_steps: int
    n_data: int | None
    has_aux: bool
    history: History
    log_every: int | None
    progress: bool


def _loop_of(hyper: Hyper, static: Static) -> _loop.Loop:
    optimizer, early_stopping = hyper.value
    # The loss is traced once (at init, or by the mesh check before the call)
    # and replayed by every step: one Python call of loss_fn per compile.
    loss_fn = _compile.TracedOnce(static.loss_fn.value, PRETRACED.get())  # type: ignore[arg-type]
    return _loop.Loop(
        loss_fn, optimizer, early_stopping, static.max_steps, static.n_data, static.has_aux,
        static.history, static.log_every,
    )  # fmt: skip


def _reporter(static: Static) -> _reporting.Reporter | None:
    if static.log_every is None and not static.progress:
        return None
    return _reporting.Reporter(static.log_every, static.progress)


def _checked(fn: F) -> F:
    """``fn`` tracing with the hyperparameters that were concrete at the call known as checked."""

    @functools.wraps(fn)
    def traced(hyper: Hyper, *args: Any, **kwargs: Any) -> Any:
        with _checks.already_checked(hyper.checked()):
            return fn(hyper, *args, **kwargs)

    return cast(F, traced)


@_checked
def init(hyper: Hyper, params: Any, data: object, opt_state: Any, es_state: Any,
          initial_step: jax.Array, *, static: Static) -> LoopState:  # fmt: skip
    anchored = _checks.explicit_mesh_in_context()
    loop = _loop_of(hyper, static)
    # Numbers concrete at the call are constants of the caller's program, never batched.
    return loop.init(
        params, data, opt_state, es_state, initial_step, anchored=anchored, tie_to=hyper.traced()
    )


@_checked
def run(hyper: Hyper, params: Any, data: object, opt_state: Any, es_state: Any,
         initial_step: jax.Array, *, static: Static) -> FitResult:  # fmt: skip
    """The whole fit as one program: init, the loop to its end, the result."""
    state = init(hyper, params, data, opt_state, es_state, initial_step, static=static)
    loop = _loop_of(hyper, static)
    return loop.postprocess(_loop.run(loop, state, data, _reporter(static)))


@_checked
def _advance(
    hyper: Hyper, state: LoopState, data: object, until: jax.Array, *, static: Static
) -> LoopState:
    loop = _loop_of(hyper, static)
    return _loop.run(loop, state, data, _reporter(static), until)


def postprocess(hyper: Hyper, state: LoopState, *, static: Static) -> FitResult:
    return _loop_of(hyper, static).postprocess(state)


# (loss_fn, the types of its arguments, its replay), set while fit calls the
# compiled run after the mesh check has traced the loss (only under a trace).
PRETRACED: contextvars.ContextVar[tuple[Any, ...] | None] = contextvars.ContextVar(
    "adam_jax_pretraced_loss", default=None
)


@dataclasses.dataclass
class FitRun:
    """A checkpointed fit as a :class:`adam_jax._checkpoint.Engine`: its state is the loop's."""

    static: Static
    hyper: Hyper
    data: object
    num_steps: int
    start: int
    fresh: Callable[[], LoopState]
    entry = "fit"
    unit = "steps"

    def record(self, loss_fn: Any, params: Any, optimizer: Any, es: Any, opt_state: Any,
               es_state: Any, history: History) -> dict[str, Any]:  # fmt: skip
        options: dict[str, object] = {
            "num_steps": self.num_steps,
            "has_aux": self.static.has_aux,
            "initial_step": self.start,
            "history": list(history),
            "opt_state": None if opt_state is None else _checkpoint.digest(opt_state),
            "early_stopping_state": None if es_state is None else _checkpoint.digest(es_state),
        }
        return _checkpoint.problem_record(loss_fn, params, optimizer, es, self.data, options)

    def advance(self, state: LoopState, budget: int) -> LoopState:
        until = state.i + jnp.int32(budget)
        advance = _compile.compiled(_advance, "static")
        return advance(self.hyper, state, self.data, until, static=self.static)

    def finished(self, state: LoopState) -> bool:
        return bool(state.done)

    def save(self, state: LoopState) -> tuple[LoopState, dict[str, Any]]:
        record = {
            "step": int(state.initial_step + state.i),
            "next_step": int(state.initial_step + state.applied),
            "finished": self.finished(state),
            "loss_dtype": str(state.last_value.dtype),
        }
        # Values waiting for a log line are the reporting's, not the run's.
        return state._replace(log=None), record

    def template(self, record: dict[str, Any]) -> LoopState:
        return cast(LoopState, jax.eval_shape(self.fresh)._replace(log=None))

    def load(self, state: LoopState, record: dict[str, Any]) -> LoopState:
        log = _loop_of(self.hyper, self.static).empty_log(state.last_value.dtype)
        return state._replace(log=log)

    def interrupted(self, record: dict[str, Any], directory: Path) -> str:
        taken = record["next_step"] - self.start
        return (
            f"fit interrupted: checkpoint saved at step {record['next_step']} "
            f"({taken} of {self.num_steps} steps taken) in {str(directory)!r}; "
            "run the same fit call with the same checkpoint_dir to resume"
        )


def mesh_of_inputs(
    loss_fn: Callable[..., object], params: optax.Params, data: object, args: tuple[Any, ...]
) -> tuple[contextlib.AbstractContextManager[Any], tuple[Any, ...] | None]:
    """While tracing, the abstract mesh of inputs sharded over Explicit axes, if none is in context,
    and the loss traced to find it (or None): ``(loss_fn, types of its arguments, replay)``.

    Under ``jax.vmap`` over arrays sharded on an Explicit mesh axis, JAX batches
    the loop only with that mesh in context: users would need
    ``with jax.set_mesh(mesh):``. The mesh is in the inputs' types (the
    optimizer's leaves, the params, the data, or what ``loss_fn`` closes over,
    seen in its value's type), so it is entered here.
    """
    leaves = [x for x in jax.tree.leaves(args) if is_data(x)]
    if not _checks.is_traced(args) or not jax.sharding.get_abstract_mesh().empty:
        # Called directly, JAX takes the mesh from the arrays themselves.
        return contextlib.nullcontext(), None

    def mesh_of(sharding: object) -> jax.sharding.AbstractMesh | None:
        mesh = getattr(sharding, "mesh", None)
        if isinstance(mesh, jax.sharding.AbstractMesh) and not mesh.empty:
            if jax.sharding.AxisType.Explicit in mesh.axis_types:
                return mesh
        return None

    shardings = [jax.typeof(x).sharding for x in leaves]
    pretraced = None
    if not any(map(mesh_of, shardings)):
        try:
            batch = () if data is None else (_fit_checks.batch_at(data, jnp.int32(0)),)
            loss_args = (without_weak_types(params), *batch)
            replay = _compile.traced_once(loss_fn, *loss_args)
            value = jax.eval_shape(replay, *loss_args)
            pretraced = (loss_fn, _compile.types(loss_args), replay)
        except Exception:  # a broken loss_fn is reported by the loop, with its own message
            value = None
        shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(value)]
    for sharding in shardings:
        if (mesh := mesh_of(sharding)) is not None:
            return jax.sharding.use_abstract_mesh(mesh), pretraced
    return contextlib.nullcontext(), pretraced
