"""Which monitored values :func:`adam_jax.fit` keeps: every step, every k-th, the last k, none."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from adam_jax import _checks

DEFAULT_MAX_LEN = 100_000


class History(NamedTuple):
    """Which steps' monitored values a fit keeps in ``FitResult.losses``.

    Built with one of the constructors; hashable, so it is part of what a
    compiled fit is cached on. The buffer is allocated once, before the loop,
    with :meth:`length` entries, whatever ``num_steps`` is; under vmap every
    problem has its own.

    * ``History.every(k, max_len)``: the steps ``initial_step``, ``+ k``,
      ``+ 2k``, ... of the call, at most ``max_len`` of them (the first ones);
      ``max_len=None`` keeps all, ``ceil(num_steps / k)`` entries.
    * ``History.last(k)``: the last ``k`` steps taken (a ring buffer), oldest first.
    * ``History.none()``: nothing; ``losses`` has shape ``(0,)``.

    The default of :func:`adam_jax.fit` is ``History.every(1, max_len=100_000)``:
    every step, up to 100 000 of them (400 KB in float32 per problem; about
    1.2 MB with the ``steps`` array and in float64), however large ``num_steps``.

    ``FitResult.steps`` holds the global step of each entry of ``losses``; a
    slot no step reached holds step -1 and a NaN value.

    Attributes:
      kind: ``"every"``, ``"last"`` or ``"none"``.
      k: the stride (``every``) or the ring's length (``last``).
      max_len: the most entries ``every`` keeps; None for all.

    Example:
      >>> import jax.numpy as jnp, optax, adam_jax
      >>> r = adam_jax.fit(lambda p: p**2, jnp.asarray(1.0), optax.sgd(0.1), num_steps=10,
      ...                  history=adam_jax.History.last(3))
      >>> print(*r.steps.tolist())
      7 8 9
      >>> print(*(round(float(v), 3) for v in r.losses))
      0.044 0.028 0.018
    """

    kind: str
    k: int
    max_len: int | None

    @classmethod
    def every(cls, k: int = 1, max_len: int | None = DEFAULT_MAX_LEN) -> History:
        """Every ``k``-th step of the call, the first ``max_len`` of them (None: all)."""
        _check_positive("k", k)
        if max_len is not None:
            _check_positive("max_len", max_len)
        return cls("every", int(k), None if max_len is None else int(max_len))

    @classmethod
    def last(cls, k: int) -> History:
        """The last ``k`` steps taken, oldest first."""
        _check_positive("k", k)
        return cls("last", int(k), None)

    @classmethod
    def none(cls) -> History:
        """No history: ``losses`` and ``steps`` are empty."""
        return cls("none", 1, None)

    def length(self, num_steps: int) -> int:
        """The number of entries kept for a call of up to ``num_steps`` steps."""
        if self.kind == "none":
            return 0
        if self.kind == "last":
            return min(self.k, num_steps)
        n = -(-num_steps // self.k)
        return n if self.max_len is None else min(n, self.max_len)


def _check_positive(name: str, value: object) -> None:
    _checks.check_positive_int(f"History's {name}", value)


def as_history(history: History | None) -> History:
    if history is None:
        return History.every()
    if not isinstance(history, History):
        raise TypeError(
            "history must be built with adam_jax.History.every(...), .last(...) or .none(), "
            f"got history={history!r}"
        )
    return history


class HistoryState(NamedTuple):
    """The buffers in the loop state: values and the global step of each."""

    values: jax.Array
    steps: jax.Array


def init(history: History, num_steps: int, dtype: jnp.dtype) -> HistoryState:
    n = history.length(num_steps)
    return HistoryState(jnp.full((n,), jnp.nan, dtype), jnp.full((n,), -1, jnp.int32))


def record(
    history: History,
    h: HistoryState,
    i: jax.Array,
    step: jax.Array,
    value: jax.Array,
    on: jax.Array,
) -> HistoryState:
    """Write the value of the call's step ``i`` (global ``step``) if ``on`` and it is kept.

    A value not kept is written out of bounds and dropped, so under vmap this is
    a one-element scatter, never a select over the buffer.
    """
    n = h.values.shape[0]
    if n == 0:
        return h
    if history.kind == "last":
        index, keep = i % n, on
    else:
        index, keep = i // history.k, on & (i % history.k == 0)
    index = jnp.where(keep, index, n)
    return HistoryState(
        h.values.at[index].set(value.astype(h.values.dtype), mode="drop"),
        h.steps.at[index].set(step, mode="drop"),
    )


def finish(history: History, h: HistoryState, taken: jax.Array) -> HistoryState:
    """The buffers in step order: a full ring is rotated so its oldest entry comes first."""
    n = h.values.shape[0]
    if history.kind != "last" or n == 0:
        return h
    shift = jnp.where(taken > n, taken % n, 0)
    return HistoryState(jnp.roll(h.values, -shift), jnp.roll(h.steps, -shift))
