"""Reporting from inside :func:`adam_jax.fit`'s compiled loop: ``log_every`` lines
and the tqdm progress bar, through one host callback per batch."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax._early_stopping import StopReason


def import_tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise ImportError(
            "progress=True needs tqdm, an optional dependency: pip install adam_jax[progress]"
        ) from e
    return tqdm


REPORT, END = 1, 2


class Reporter:
    """Host side of ``log_every`` and ``progress``, called from the compiled loop.

    Calls come through ``jax.pure_callback`` with ``vmap_method="broadcast_all"``:
    under vmap there is one call for the whole batch (arrays with leading batch
    axes), not one per problem as with ``jax.debug.callback``.

    A host round trip costs tens of microseconds, more than a small step, so
    the loop does not call back every ``log_every`` steps. Each call returns the
    step of the next one, about ``interval`` seconds of steps ahead, and gets
    the values measured so far at the steps that are multiples of ``log_every``
    (counted globally, from ``initial_step``), from which it prints every line
    that has come due. Under vmap the loop calls back after every chunk of
    steps, and the printing is throttled here instead.

    Arguments of a call: ``start, i, due, last`` (the first step, the steps
    taken, the values at the due steps, the latest value), then ``running`` and
    whether this is the first chunk (``REPORT``) or the stop reason (``END``).
    """

    interval = 0.1  # seconds between reports, as tqdm's default mininterval

    def __init__(self, num_steps: int, log_every: int | None, progress: bool, every: int):
        self.num_steps = num_steps
        self.log_every = log_every
        self.every = every
        self.tqdm = import_tqdm() if progress else None
        self.bar = None
        self.active = False
        self._reset()

    def _reset(self) -> None:
        self.next_line = 0  # the first step whose line is not printed yet
        self.t_shown = time.monotonic()
        self.t_last = None  # time and step of the previous call, for the rate
        self.i_last = 0
        self.shown_once = False

    def _begin(self, start: np.ndarray) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        if self.tqdm is not None:
            first = int(start.max())
            self.bar = self.tqdm(
                total=first + self.num_steps, initial=first, unit="step", desc="fit"
            )
        self._reset()
        self.active = True

    def __call__(self, kind: int, *args: np.ndarray) -> np.ndarray:
        # The arguments may arrive as jax Arrays; NumPy is much cheaper here.
        args = [np.asarray(a) for a in args]
        batch_shape = args[0].shape
        start = args[0].reshape(-1).astype(np.int64)
        i = args[1].reshape(-1).astype(np.int64)
        # A new run: its first chunk, or its end when it took no chunk at all
        # (it resumed an early-stopping state that had already stopped).
        if not self.active or (kind == REPORT and args[5].any()):
            self._begin(start)
        due_values = args[2].reshape(i.size, -1)
        last = args[3].reshape(-1)
        steps = int(i.max())
        now = time.monotonic()
        if kind == END:
            self._show(start, i, due_values, last, reason=args[4].reshape(-1))
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self.active = False
            return np.zeros(batch_shape, np.int32)
        running = args[4].reshape(-1).astype(bool)
        if not self.shown_once or now - self.t_shown >= self.interval / 2:
            self._show(start, i, due_values, last, running=running)
            self.t_shown, self.shown_once = now, True
        if self.t_last is None:  # the first call: measure the rate over the next chunk
            ahead = 1
        else:
            rate = (steps - self.i_last) / max(now - self.t_last, 1e-9)
            ahead = max(1, int(rate * self.interval))
        self.t_last, self.i_last = now, steps
        return np.full(batch_shape, min(steps + ahead, self.num_steps), np.int32)

    def _lines(self, start, i, due_values, running) -> None:
        """Print the due lines no problem can still add a value to, in step order."""
        batch, every = i.size, self.every
        reached = start + i  # each problem's next step
        # Lines before `limit` are final: every running problem is past them.
        limit = int(reached[running].min()) if running is not None and running.any() else None
        first = start + (-start) % every  # each problem's first due step
        k_lo = max(0, (self.next_line - int(first.max())) // every)
        steps = first[:, None] + every * np.arange(k_lo, due_values.shape[1])[None]
        values = due_values[:, k_lo:]
        new = (steps < reached[:, None]) & (steps >= self.next_line)
        if limit is not None:
            new &= steps < limit
        if batch == 1:
            for step, value in zip(steps[0, new[0]], values[0, new[0]], strict=True):
                # `!s`: the shortest repr in the value's own dtype.
                self._write(f"epoch {step} loss {value!s}")
        else:
            for step in np.unique(steps[new]):
                at = new & (steps == step)  # at most one entry per problem
                v = values[at]
                self._write(
                    f"epoch {step} loss min {np.nanmin(v)!s} mean {np.nanmean(v)!s} "
                    f"max {np.nanmax(v)!s} ({at.any(axis=1).sum()} of {batch} running)"
                )
        if new.any():
            self.next_line = int(steps[new].max()) + 1
        if limit is not None:
            self.next_line = max(self.next_line, limit)

    def _show(self, start, i, due_values, last, *, running=None, reason=None) -> None:
        batch = i.size
        if self.bar is not None:  # before any line: write() redraws it
            self.bar.n = min(int((start + i).max()), self.bar.total)
        if self.log_every is not None:
            self._lines(start, i, due_values, running)
        if self.bar is None:
            return
        if reason is not None:  # the end: close() draws the bar
            if batch == 1 and reason[0] != StopReason.NONE:
                self.bar.set_postfix_str(f"stopped: {StopReason(int(reason[0])).name}", False)
                return
            if batch > 1:
                stopped = int((reason != StopReason.NONE).sum())
                self.bar.set_postfix_str(f"{stopped} of {batch} stopped early", False)
                return
        if batch == 1:
            self.bar.set_postfix(loss=f"{last[0]:.6g}", refresh=False)
        else:
            self.bar.set_postfix(
                loss_min=f"{np.nanmin(last):.6g}", running=f"{running.sum()}/{batch}", refresh=False
            )
        if reason is None:
            self.bar.refresh()

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)


def report(reporter: Reporter, kind: int, *args: jax.Array) -> jax.Array:
    return jax.pure_callback(
        functools.partial(reporter, kind),
        jax.ShapeDtypeStruct((), jnp.int32),
        *args,
        vmap_method="broadcast_all",
    )
