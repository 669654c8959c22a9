"""Argument checks shared by every public entry point.

Hyperparameters: concrete values are range-checked when the optimizer is built; a
traced value (inside jit/vmap/grad) is never branched on, though its shape, which
is static, is checked, and its range is checked under ``jax.experimental.checkify``
(:func:`traced_interval`), a no-op otherwise.
Trees: grads, params and masks that differ from the state name the differing keys.
Every failure is a ``TypeError`` or ``ValueError`` that names the argument or the
tree path, raised before anything is computed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify


def is_traced(value: Any) -> bool:
    """Whether any leaf of ``value`` is a tracer (inside jit, vmap or grad)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def _concrete_values(name: str, value: Any, *, schedule_ok: bool = False) -> np.ndarray | None:
    """The value as a float64 NumPy array, or None when it cannot be inspected
    (a tracer, or a schedule where ``schedule_ok``). Wrong types raise TypeError."""
    if value is None:
        raise TypeError(f"{name} must be a real number or a scalar array, got {name}=None")
    if callable(value) and not isinstance(value, jax.Array | np.ndarray | np.generic):
        if schedule_ok:
            return None
        raise TypeError(
            f"{name} must be a real number or a scalar array, not a function: got {name}={value!r}"
        )
    check_scalar(name, value)
    if is_traced(value):
        return None
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a real number, got the bool {value!r}")
    if isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Real):
        return np.asarray(float(value))
    try:
        arr = np.asarray(value)
    except Exception as e:  # e.g. a jax array that is being sharded lazily
        raise TypeError(f"{name} must be a real number or array, got {value!r}") from e
    if arr.dtype == object or not (
        jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
    ):
        raise TypeError(f"{name} must be a real number or array, got {name}={value!r}")
    return arr.astype(np.float64)


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    high_open: bool = True,
    schedule_ok: bool = False,
) -> None:
    """Raise ``ValueError`` if a concrete ``value`` lies outside ``[low, high)``.

    With ``high_open=False`` the interval is ``[low, high]``. NaN is always out of
    range. Traced values are not checked (their shape is: it is static). With
    ``schedule_ok`` a callable (an optax schedule) passes unchecked.
    """
    arr = _concrete_values(name, value, schedule_ok=schedule_ok)
    if arr is None:
        return
    upper_ok = arr < high if high_open else arr <= high
    ok = np.all((arr >= low) & upper_ok)
    if not ok:
        bracket = ")" if high_open else "]"
        hi = "inf" if math.isinf(high) else repr(high)
        raise ValueError(
            f"{name} must be in [{low!r}, {hi}{bracket}, got {name}={_show(value)}"
            + _low_precision_hint(name, value)
        )


def _low_precision_hint(name: str, value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is None or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return ""
    return (
        f" ({name} is a {jnp.dtype(dtype).name} array, which rounds 0.999 to 1.0; under "
        f"optax.inject_hyperparams with {jnp.dtype(dtype).name} params pass "
        f"hyperparam_dtype=jnp.float32)"
    )


def traced_interval(
    name: str, value: Any, low: float, high: float = math.inf, *, high_open: bool = True
) -> None:
    """The range check of :func:`check_interval` for a traced ``value``, as a
    ``checkify.debug_check``: it reports the argument and its value when the caller
    is wrapped in ``jax.experimental.checkify.checkify``, and stages nothing that
    runs otherwise. Concrete values were checked when the optimizer was built."""
    if not is_traced(value) or id(value) in _CHECKED.get() or explicit_mesh_in_context():
        return
    upper = value < high if high_open else value <= high
    bracket = ")" if high_open else "]"
    hi = "inf" if math.isinf(high) else repr(high)
    checkify.debug_check(
        jnp.all((value >= low) & upper),
        f"{name} must be in [{low!r}, {hi}{bracket}, got {name}={{}}",
        value,
    )


_CHECKED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "adam_jax_checked", default=frozenset()
)


@contextlib.contextmanager
def already_checked(ids: frozenset[int]) -> Iterator[None]:
    """While tracing a program whose arguments ``ids`` (of the tracers) were checked
    as concrete values, :func:`traced_interval` stages no check of them."""
    token = _CHECKED.set(ids)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def explicit_mesh_in_context() -> bool:
    """Whether a mesh with Explicit axes is in context.

    There, JAX cannot batch a ``checkify`` check over a sharded batch axis (its
    batching sorts the sharded predicate), so under ``jax.vmap`` on such a mesh
    a traced hyperparameter is not range-checked.
    """
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types


def check_positive_int(
    name: str, value: Any, *, reason: str = "", type_error: type[Exception] = TypeError
) -> None:
    """A Python or NumPy int >= 1 (not a bool, not an array): a count that fixes a
    shape or a length. ``reason`` follows "must be a Python int" in the error."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise type_error(f"{name} must be a Python int{reason}, got {name}={value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value}")


def check_non_negative_int(name: str, value: Any) -> None:
    """An integer >= 0: a Python or NumPy int, or an integer scalar array (traced
    ones are checked for dtype and shape only). ``2.5``, ``3.0`` and bools are refused."""
    if isinstance(value, bool | np.bool_) or not (
        isinstance(value, numbers.Integral)
        or (hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer))
    ):
        raise TypeError(f"{name} must be an integer >= 0, got {name}={value!r}")
    check_scalar(name, value)
    if not is_traced(value) and int(value) < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {name}={int(value)}")


def check_non_negative(name: str, value: Any, *, schedule_ok: bool = False) -> None:
    check_interval(name, value, 0.0, schedule_ok=schedule_ok)


def check_decay(name: str, value: Any) -> None:
    """A decay rate (``b1``, ``b2``) must lie in ``[0, 1)``."""
    check_interval(name, value, 0.0, 1.0)


def check_learning_rate(learning_rate: Any) -> None:
    """A learning rate is a non-negative number or scalar array, or an optax schedule."""
    check_non_negative("learning_rate", learning_rate, schedule_ok=True)


def check_scalar(name: str, value: Any) -> None:
    """A scalar hyperparameter (or None) must have shape (); shapes are static, so
    tracers are checked too."""
    if value is None:
        return
    shape = value.shape if isinstance(value, jax.Array) else np.shape(value)
    if shape != ():
        raise ValueError(
            f"{name} must be a scalar (vmap over it for one value per problem), "
            f"got an array of shape {shape}: {name}={_show(value)}"
        )


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)!r}, got {name}={value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")


def _show(value: Any) -> str:
    if isinstance(value, numbers.Real):
        return repr(value)
    arr = np.asarray(value)
    if arr.ndim == 0:
        return repr(arr.item())
    return np.array2string(arr, threshold=8)


def canonical_dtype(name: str, dtype: Any) -> jnp.dtype | None:
    """A storage dtype argument (``mu_dtype``, ``nu_dtype``): None or an inexact dtype."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be a floating-point dtype, got {name}={dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.inexact):
        raise TypeError(f"{name} must be a floating-point dtype, got {name}={dt.name}")
    return jax.dtypes.canonicalize_dtype(dt)


def check_inexact(dtype: Any) -> np.dtype:
    """A floating-point or complex dtype, or a TypeError that says why."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"adam_jax optimizers need floating-point or complex params and grads, "
            f"got dtype {dtype}: Adam on integer params is meaningless"
        )
    result: np.dtype = dtype
    return result


def check_leaf(x: Any, where: str) -> None:
    """An array leaf of a floating-point or complex dtype, or a clear TypeError."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(
            f"{where} is a {type(x).__name__} ({x!r}); adam_jax needs array leaves "
            f"(wrap it with jnp.asarray)"
        )
    try:
        check_inexact(x.dtype)
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None


def leaves_with_paths(tree: Any, what: str) -> list[tuple[str, Any]]:
    return [
        (f"{what}{jax.tree_util.keystr(path)}", x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def check_same_tree(
    tree: Any,
    reference: Any,
    *,
    what: str = "grads",
    reference_name: str = "the state",
) -> None:
    """Raise ``ValueError`` naming the missing and extra keys when trees differ."""
    t_tree: Any = jax.tree.structure(tree)
    t_ref: Any = jax.tree.structure(reference)
    if t_tree == t_ref:
        return

    def paths(t: Any) -> set[str]:
        return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}

    missing = sorted(paths(reference) - paths(tree))
    extra = sorted(paths(tree) - paths(reference))
    parts = [
        f"the {what} tree does not match {reference_name}"
        + (" built by init." if reference_name == "the state" else ".")
    ]
    if missing:
        parts.append(f"Missing from {what}: {', '.join(missing)}.")
    if extra:
        parts.append(f"Not in {reference_name}: {', '.join(extra)}.")
    if not missing and not extra:
        parts.append(
            f"Same keys, different structure: {what} has {t_tree}, {reference_name} has {t_ref}."
        )
    raise ValueError(" ".join(parts))


def check_prefix_tree(tree: Any, reference: Any, *, what: str, reference_name: str) -> None:
    """Raise ``ValueError`` unless ``tree`` is a tree prefix of ``reference`` (as optax
    masks are), naming the uncovered and the unknown key paths."""
    try:
        treedef: Any = jax.tree.structure(tree)
        treedef.flatten_up_to(reference)
        return
    except (ValueError, TypeError):
        pass

    def paths(t: Any) -> list[Any]:
        return [p for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]]

    prefixes, full = paths(tree), paths(reference)

    def covered(path: Any) -> bool:
        return any(path[: len(p)] == p for p in prefixes)

    missing = sorted({jax.tree_util.keystr(p) for p in full if not covered(p)})
    extra = sorted(
        jax.tree_util.keystr(p) for p in prefixes if not any(q[: len(p)] == p for q in full)
    )
    parts = [f"the {what} tree must be a prefix of {reference_name}."]
    if missing:
        parts.append(f"Missing from {what}: {', '.join(missing)}.")
    if extra:
        parts.append(f"Not in {reference_name}: {', '.join(extra)}.")
    raise ValueError(" ".join(parts))


def check_like(
    tree: Any, reference: Any, *, what: str = "grads", reference_name: str = "the state"
) -> None:
    """Raise ``ValueError`` unless ``tree`` has ``reference``'s structure (see
    :func:`check_same_tree`) and leaf shapes, naming the first leaf whose shape differs."""
    check_same_tree(tree, reference, what=what, reference_name=reference_name)
    for (path, x), r in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(reference), strict=True
    ):
        if jnp.shape(x) != jnp.shape(r):
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has shape {jnp.shape(x)}, but "
                f"{reference_name} was built for shape {jnp.shape(r)}"
            )


def check_not_swapped(grads: Any, state: Any, is_state: Any) -> None:
    """Name the likely cause when ``update`` got the grads where the state belongs."""
    grads_like_state = any(is_state(x) for x in jax.tree.leaves(grads, is_leaf=is_state))
    state_has_state = any(is_state(x) for x in jax.tree.leaves(state, is_leaf=is_state))
    if grads_like_state and not state_has_state:
        raise TypeError(
            "the second argument of update must be the optimizer state from init; got a tree "
            "like the grads/params, and the first argument holds an optimizer state. Did you "
            "swap them? Call update(grads, state, params)."
        )


def prepare_update(grads: Any, state: Any, state_cls: type, owner: str) -> None:
    """The checks every ``update`` runs at trace time (never on values): ``state`` is a
    ``state_cls`` (or a clear error, naming a swap of grads and state) whose ``m`` has
    the structure, shapes and complexness of ``grads``."""
    if not isinstance(state, state_cls):
        check_not_swapped(grads, state, lambda x: isinstance(x, state_cls))
        raise TypeError(
            f"{owner}'s update expects the {state_cls.__name__} its init returns, "
            f"got {type(state).__name__}"
        )
    moments: Any = getattr(state, "m")  # noqa: B009 (state_cls is any state class)
    check_like(grads, moments)
    for (where, g), m in zip(
        leaves_with_paths(grads, "grads"), jax.tree.leaves(moments), strict=True
    ):
        check_leaf(g, where)
        if jnp.iscomplexobj(g) and not jnp.iscomplexobj(m):
            raise TypeError(
                f"{where} is {jnp.dtype(g.dtype).name} but the state was built for real "
                f"params ({jnp.dtype(m.dtype).name}); the imaginary part would be lost"
            )


_STATE_TYPES: set[type] = set()
T = TypeVar("T", bound=type)


def state_class(cls: T) -> T:
    """Register ``cls`` as one of this library's optimizer states (a class decorator)."""
    _STATE_TYPES.add(cls)
    return cls


@functools.cache
def _optax_state_types() -> frozenset[type]:
    """The state classes optax exports: its NamedTuples named ``...State``."""
    return frozenset(
        v
        for name, v in vars(optax).items()
        if isinstance(v, type) and issubclass(v, tuple) and name.endswith("State")
    )


def is_optimizer_state(x: Any) -> bool:
    """A node that only an optimizer state holds: a state of this library or of optax."""
    return type(x) in _STATE_TYPES or type(x) in _optax_state_types()


def mask_leaf(x: Any) -> bool:
    """A leaf of an ``optax.masked``-style mask tree: a bool."""
    if isinstance(x, bool | np.bool_) or (np.ndim(x) == 0 and np.asarray(x).dtype == np.bool_):
        return bool(x)
    raise TypeError(f"mask leaves must be bools (or the mask a callable), got {x!r}")
