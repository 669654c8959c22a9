"""Tree helpers the training loops share: data leaves, the static/dynamic split, selects."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

T = TypeVar("T")


def is_data(leaf: object) -> bool:
    """A leaf that becomes an argument of a compiled program rather than part of its key."""
    if isinstance(leaf, bool | np.bool_):
        return False
    return isinstance(leaf, int | float | complex | np.number | np.ndarray | jax.Array)


class Key:
    """A static leaf as part of a cache key: by value when hashable, else by identity
    (so an unhashable one compiles again for each new object, as ``jax.jit`` would)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __hash__(self) -> int:
        try:
            return hash(self.value)
        except TypeError:
            return id(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        if self.value is other.value:
            return True
        try:
            return hash(self) == hash(other) and bool(self.value == other.value)
        except Exception:
            return False


@jax.tree_util.register_pytree_node_class
class Split(Generic[T]):
    """A pytree (an optimizer, an early-stopping rule) as the argument of a compiled
    program: its number and array leaves are children, traced; its other leaves
    (functions, flags) and its structure are the static part, what the program is
    cached on. Two values of the same structure compile once."""

    def __init__(self, value: T) -> None:
        leaves, self.treedef = jax.tree.flatten(value)
        self.data_at = tuple(map(is_data, leaves))
        self.dynamic = [x for x, d in zip(leaves, self.data_at, strict=True) if d]
        self.static = tuple(Key(x) for x, d in zip(leaves, self.data_at, strict=True) if not d)
        self.concrete = tuple(not isinstance(x, jax.core.Tracer) for x in self.dynamic)

    def tree_flatten(self) -> tuple[list[Any], tuple[Any, ...]]:
        return self.dynamic, (self.treedef, self.static, self.data_at, self.concrete)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], dynamic: list[Any]) -> Split[T]:
        out = object.__new__(cls)
        out.treedef, out.static, out.data_at, out.concrete = aux
        out.dynamic = list(dynamic)
        return out

    def traced(self) -> list[Any]:
        """The leaves that were traced when the split was made (the others are constants
        of the caller's program)."""
        return [x for x, c in zip(self.dynamic, self.concrete, strict=True) if not c]

    def checked(self) -> frozenset[int]:
        """The ids of the leaves that were concrete when the split was made: range-checked
        when the optimizer or rule was built, so not checked again where they are traced."""
        return frozenset(id(x) for x, c in zip(self.dynamic, self.concrete, strict=True) if c)

    @property
    def value(self) -> T:
        dyn, stat = iter(self.dynamic), iter(self.static)
        leaves = [next(dyn) if d else next(stat).value for d in self.data_at]
        return cast(T, jax.tree.unflatten(self.treedef, leaves))


def without_weak_types(tree: T) -> T:
    """``tree`` as arrays of their own dtypes, so a loop carry keeps one type."""
    return cast(T, jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), tree))


def tree_where(cond: jax.Array, new: T, old: T) -> T:
    """``new`` where ``cond`` else ``old``, leaf by leaf, in ``old``'s dtypes."""
    select = lambda n, o: jax.lax.select_n(cond, o, jnp.asarray(n, o.dtype))
    return cast(T, jax.tree.map(select, new, old))
