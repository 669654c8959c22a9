"""Checks and slicing of :func:`adam_jax.fit`'s inputs, done once while tracing."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax import _checks


def check_positive_int(name: str, value: Any) -> None:
    _checks.check_positive_int(
        name, value, reason=" (it fixes the length of the loop and of its buffers)"
    )


def check_early_stopping(early_stopping: Any) -> None:
    """None, or an object with ``init`` and ``update`` like ``adam_jax.early_stopping(...)``."""
    if early_stopping is not None and not (
        hasattr(early_stopping, "init") and hasattr(early_stopping, "update")
    ):
        raise TypeError(
            "early_stopping must be the object adam_jax.early_stopping(...) returns, "
            f"got early_stopping={early_stopping!r}"
        )


def data_length(data: Any) -> int | None:
    if data is None:
        return None
    leaves = jax.tree_util.tree_flatten_with_path(data)[0]
    if not leaves:
        raise ValueError("data has no array leaves; pass data=None for full-batch training")
    lengths = {}
    for path, leaf in leaves:
        name = "data" + jax.tree_util.keystr(path)
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"{name} is a scalar; every data leaf needs a leading axis indexed by step"
            )
        lengths[name] = jnp.shape(leaf)[0]
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise ValueError(f"data leaves disagree on the leading (step) axis: {shown}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("data has a leading (step) axis of length 0")
    return n


def batch_at(data: Any, index: Any) -> Any:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), data)


def check_loss_output(out: Any, has_aux: bool) -> jax.ShapeDtypeStruct:
    """The dtype of the monitored value, after checking what ``loss_fn`` returns."""
    if has_aux:
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ValueError(
                "with has_aux=True, loss_fn must return a pair (loss, metric), got "
                f"{jax.tree.structure(out)}"
            )
        named = [("loss", out[0]), ("metric", out[1])]
    else:
        named = [("loss", out)]
    for what, x in named:
        if not isinstance(x, jax.ShapeDtypeStruct):
            pair = not has_aux and isinstance(out, tuple | list) and len(out) == 2
            hint = (
                "; loss_fn returns a pair: if it is (loss, metric), pass has_aux=True"
                if pair
                else ""
            )
            raise ValueError(f"loss_fn's {what} must be a single array, got {out}{hint}")
        if x.shape != ():
            raise ValueError(f"loss_fn's {what} must be a scalar, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"loss_fn's {what} must be a real float scalar, got dtype {x.dtype}")
    metric: jax.ShapeDtypeStruct = named[-1][1]
    return metric


def check_initial_step(initial_step: Any, num_steps: int) -> None:
    if isinstance(initial_step, jax.core.Tracer):
        if jnp.ndim(initial_step) != 0 or not jnp.issubdtype(initial_step.dtype, jnp.integer):
            raise TypeError(f"initial_step must be an int scalar, got {initial_step.aval}")
        return
    if isinstance(initial_step, bool | np.bool_) or not (
        isinstance(initial_step, int | np.integer)
        or (
            isinstance(initial_step, np.ndarray | jax.Array)
            and initial_step.ndim == 0
            and jnp.issubdtype(initial_step.dtype, jnp.integer)
        )
    ):
        raise TypeError(f"initial_step must be an int, got initial_step={initial_step!r}")
    value = int(initial_step)
    if value < 0:
        raise ValueError(f"initial_step must be >= 0, got initial_step={value}")
    # Steps are counted in int32, like optax's and early stopping's counts.
    if value + num_steps > np.iinfo(np.int32).max:
        raise ValueError(
            f"initial_step + num_steps must stay below 2**31, got {value} + {num_steps}"
        )


def checked_state(name: str, state: Any, init: Any, params: Any) -> Any:
    """``init(params)`` when ``state`` is None, else ``state`` as arrays, after checking it
    against what ``init`` gives (tree, shapes, dtypes).

    A restored state is never cast: a dtype that differs from what ``init`` gives
    is an error, not a silent change of the trajectory.
    """
    if state is None:
        return init(params)
    template = jax.eval_shape(init, params)
    _checks.check_same_tree(state, template, what=name, reference_name="a fresh state")
    leaves = []
    for (path, x), t in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(template), strict=True
    ):
        x = jnp.asarray(x)
        where = name + jax.tree_util.keystr(path)
        if x.shape != t.shape:
            raise ValueError(f"{where} has shape {x.shape}, but init gives shape {t.shape}")
        if x.dtype != t.dtype:
            raise ValueError(f"{where} has dtype {x.dtype}, but init gives dtype {t.dtype}")
        leaves.append(x)
    return jax.tree.structure(template).unflatten(leaves)


def resumed(
    resume: Any, params: Any, opt_state: Any, es_state: Any, initial_step: Any
) -> tuple[Any, Any, Any, Any]:
    """``(params, opt_state, early_stopping_state, initial_step)`` of ``fit(resume=...)``."""
    fields = ("last_params", "opt_state", "early_stopping_state", "next_step")
    if not all(hasattr(resume, f) for f in fields) or resume.next_step is None:
        raise TypeError(f"resume must be the FitResult of a fit, got resume={type(resume)!r}")
    given = [
        name
        for name, value, default in (
            ("params", params, None),
            ("opt_state", opt_state, None),
            ("early_stopping_state", es_state, None),
            ("initial_step", initial_step, 0),
        )
        if value is not default
    ]
    if given:
        raise ValueError(
            f"fit(resume=...) continues from the result's last params, states and next step; "
            f"pass {', '.join(given)} as None (or leave them out), got {', '.join(given)} too"
        )
    return resume.last_params, resume.opt_state, resume.early_stopping_state, resume.next_step
