"""What :func:`adam_jax.fit` returns."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import optax

from adam_jax._early_stopping import EarlyStoppingState, StopReason


class BatchedWork(NamedTuple):
    """How much a batched run computed, next to what its problems needed.

    Attributes:
      computed: lane-steps computed, idle lanes included.
      needed: steps the problems took (each problem's ``num_steps``, plus its
        stopping step).
    """

    computed: int
    needed: int


class FitResult(NamedTuple):
    """What :func:`adam_jax.fit` returns (a NamedTuple, so a pytree that vmap can batch).

    Steps are numbered globally, from ``initial_step`` (0 unless the fit resumes
    a run); ``num_steps`` counts the updates of this call only, and ``next_step``
    is where a continued run starts: ``fit(..., resume=result)`` continues it.

    Attributes:
      params: the params to use: with early stopping's ``restore_best=True``
        the best ones (those given to the fit until something improves),
        otherwise the last ones (``last_params``). ``best_params`` is the same
        value under its older name.
      opt_state: the last optimizer state, the one that goes with ``last_params``.
      losses: the monitored value (the loss, or the metric with ``has_aux=True``)
        at the steps in ``steps``, as the fit's ``history`` chose; the default
        keeps every step up to 100 000, so ``losses[k]`` is step
        ``initial_step + k``. A slot no step reached holds NaN.
      num_steps: int32, the number of updates this call applied (the
        argument of the same name is the most steps the call may take).
      stop_reason: int32 holding a :class:`StopReason`; ``NONE`` if the run
        did not stop early. :meth:`stop_reason_names` reads it.
      best_step: int32, the step of the best value, counted by the early-stopping
        state (so from 0 at its ``init``, not from ``initial_step``); -1 without
        early stopping or if nothing improved.
      best_value: the best monitored value; NaN without early stopping.
      early_stopping_state: the final :class:`EarlyStoppingState`, to save with
        ``last_params`` and ``opt_state`` and pass back to a resumed fit; None
        without early stopping.
      last_params: the params at the last step: after a stop, those at which
        the stopping value was measured (that step's update is not applied).
        A resumed fit starts from these.
      steps: int32, aligned with ``losses``: the global step of each entry,
        -1 for a slot no step reached.
      next_step: int32, ``initial_step + num_steps``: the step a continued run
        takes next (after a stop, the stopping step, whose update was not applied).
      work: :func:`adam_jax.fit_batched`'s :class:`BatchedWork` (host ints);
        None from :func:`adam_jax.fit`.
    """

    params: optax.Params
    opt_state: optax.OptState
    losses: jax.Array
    num_steps: jax.Array
    stop_reason: jax.Array
    best_step: jax.Array
    best_value: jax.Array
    early_stopping_state: EarlyStoppingState | None = None
    last_params: optax.Params = None
    steps: jax.Array | None = None
    next_step: jax.Array | None = None
    work: BatchedWork | None = None

    @property
    def best_params(self) -> optax.Params:
        """``params`` (the best params with ``restore_best=True``, else the last)."""
        return self.params

    def __repr__(self) -> str:
        # The stop reason by name where a user reads it: a single result or a small batch.
        fields = [
            f"{name}={_reason_repr(value) if name == 'stop_reason' else repr(value)}"
            for name, value in zip(self._fields, self, strict=True)
        ]
        return f"FitResult({', '.join(fields)})"

    def stop_reason_names(self) -> str | np.ndarray:
        """The stop reason as a name (``"TARGET"``, ``"NONE"``, ...), on the host.

        A single result gives a ``str``; a batched one (from vmap) a NumPy array
        of names with the batch's shape. Call it on a result, outside ``jit``.

        Example:
          >>> import jax, jax.numpy as jnp, optax, adam_jax
          >>> fit = lambda t: adam_jax.fit(
          ...     lambda p: (p - t) ** 2, jnp.asarray(0.0), optax.sgd(0.1), num_steps=20,
          ...     early_stopping=adam_jax.early_stopping(None, target=1e-2))
          >>> fit(1.0).stop_reason_names()
          'TARGET'
          >>> jax.vmap(fit)(jnp.array([1.0, 1e3])).stop_reason_names().tolist()
          ['TARGET', 'NONE']
        """
        codes = np.asarray(self.stop_reason)
        names = np.vectorize(lambda c: StopReason(int(c)).name, otypes=[object])(codes)
        return str(names[()]) if codes.ndim == 0 else names.astype(str)


_NAMED_UP_TO = 64  # a batch of stop reasons shown by name; larger ones as their codes


def _reason_repr(value: object) -> str:
    """``TARGET``, or ``[TARGET NONE ...]`` for a small batch; else the value's own repr."""
    if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array | np.ndarray):
        return repr(value)
    codes = np.asarray(value)
    if codes.size > _NAMED_UP_TO or not np.isin(codes, [r.value for r in StopReason]).all():
        return repr(value)
    names = np.vectorize(lambda c: StopReason(int(c)).name, otypes=[object])(codes)
    if codes.ndim == 0:
        return str(names[()])
    return np.array2string(names, separator=" ", formatter={"object": str})
