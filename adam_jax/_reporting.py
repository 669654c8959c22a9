"""What the training loops tell the user: ``fit``'s ``log_every`` lines and tqdm bar,
from inside its compiled loop through one host callback per batch of steps;
``fit_batched``'s bar of problems, from its host driver; and the line that
announces a resumed checkpointed run."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from jax.experimental import io_callback

from adam_jax._early_stopping import StopReason


def import_tqdm() -> type:
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise ImportError(
            "progress=True needs tqdm, an optional dependency: "
            'pip install -e ".[progress]" from a checkout'
        ) from e
    return cast(type, tqdm)


def write_line(line: str) -> None:
    """Print a line as the logs are printed: above any open tqdm bar."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        tqdm.tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)


def announce_resume(record: dict[str, Any], checkpoint: Path) -> None:
    """Say that a checkpointed run goes on from ``checkpoint`` (its progress ``record``)."""
    where = repr(str(checkpoint))
    if "next_step" in record:  # fit's record
        step = record["next_step"]
        if record["finished"]:
            write_line(f"fit: the run saved in {where} had finished at step {step}; its result")
        else:
            write_line(f"fit: resuming at step {step} from the checkpoint {where}")
    else:  # fit_batched's
        done = f"{record['iterations']} iterations, {record['rows']} problems finished"
        if record["finished"]:
            write_line(f"fit_batched: the run saved in {where} had finished ({done}); its result")
        else:
            write_line(f"fit_batched: resuming after {done}, from the checkpoint {where}")


class ProblemBar:
    """fit_batched's tqdm bar, moved by its host driver between compiled segments: the
    problems finished, with the min and median of their best values."""

    def __init__(self, total: int | None) -> None:
        self.bar = import_tqdm()(total=total, unit="problem")
        self.values: list[np.ndarray] = []

    def update(self, best_values: np.ndarray) -> None:
        self.values.append(best_values)
        self.bar.update(best_values.size)
        v = np.concatenate(self.values)
        v = v[np.isfinite(v)]
        if v.size:
            self.bar.set_postfix(min=f"{v.min():.4g}", median=f"{np.median(v):.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


BEGIN, REPORT, END = 0, 1, 2


class Record(NamedTuple):
    """What the loop tells the host in one call; under vmap every field has the batch axes.

    Attributes:
      initial_step: the global number of the call's first step.
      i: steps taken so far in this call.
      num_steps: the most steps of the call.
      last_value: the latest monitored value.
      running: the problem has not finished.
      reason: its :class:`StopReason` so far.
      log_values, log_steps, log_count: the values at the steps due for a log
        line since the previous call (the first ``log_count`` entries).
    """

    initial_step: jax.Array
    i: jax.Array
    num_steps: jax.Array
    last_value: jax.Array
    running: jax.Array
    reason: jax.Array
    log_values: jax.Array
    log_steps: jax.Array
    log_count: jax.Array


class Reporter:
    """Host side of ``log_every`` and ``progress``, called from the compiled loop.

    A host round trip costs tens of microseconds, more than a small step, so the
    loop does not call back every step: each call returns the step (counted in
    the call) it wants to hear from next, about ``interval`` seconds of steps
    ahead, and the loop also calls when its buffer of log values is full. Under
    vmap there is one call for the whole batch (``custom_vmap`` hands the batched
    record to the same callback), and a line shows the min, mean and max over the
    problems that measured its step, printed once every running problem is past it.
    """

    interval = 0.1  # seconds between reports, as tqdm's default mininterval

    def __init__(self, log_every: int | None, progress: bool):
        self.log_every = log_every
        self.tqdm = import_tqdm() if progress else None
        self.bar = None

    def __call__(self, kind: int, record: Record) -> np.ndarray:
        r = jax.tree.map(np.asarray, record)
        batch_shape = r.i.shape
        flat = Record(*(x.reshape(r.i.size, -1) if x.ndim > r.i.ndim else x.reshape(-1) for x in r))
        # Under vmap, the state may become batched only after the first step.
        self.batch = r.i.size
        if kind == BEGIN:
            self._begin(flat)
            self.t_last, self.i_last = time.monotonic(), 0
            return np.full(batch_shape, 1, np.int32)  # report after the first step
        self._collect(flat)
        if kind == END:
            self._end(flat)
            return np.zeros(batch_shape, np.int32)
        self._show(flat)
        steps, now = int(flat.i.max()), time.monotonic()
        rate = (steps - self.i_last) / max(now - self.t_last, 1e-9)
        ahead = max(1, int(rate * self.interval))
        self.t_last, self.i_last = now, steps
        return np.full(batch_shape, steps + ahead, np.int32)

    def _begin(self, r: Record) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        self.pending: dict[int, list[float]] = {}
        if self.tqdm is not None:
            first = int(r.initial_step.max())
            self.bar = self.tqdm(
                total=first + int(r.num_steps.max()), initial=first, unit="step", desc="fit"
            )

    def _collect(self, r: Record) -> None:
        for values, steps, count in zip(r.log_values, r.log_steps, r.log_count, strict=True):
            for value, step in zip(values[:count], steps[:count], strict=True):
                self.pending.setdefault(int(step), []).append(value)

    def _print_lines(self, limit: int | None) -> None:
        """Print the pending lines before ``limit`` (all with None), in step order."""
        for step in sorted(s for s in self.pending if limit is None or s < limit):
            values = np.asarray(self.pending.pop(step))
            if self.batch == 1:
                # `!s`: the shortest repr in the value's own dtype.
                self._write(f"step {step} loss {values[0]!s}")
            else:
                self._write(
                    f"step {step} loss min {np.nanmin(values)!s} mean {np.nanmean(values)!s} "
                    f"max {np.nanmax(values)!s} ({values.size} of {self.batch} running)"
                )

    def _show(self, r: Record) -> None:
        if self.bar is not None:  # before any line: write() redraws it
            self.bar.n = min(int((r.initial_step + r.i).max()), self.bar.total)
        # A line is final once every running problem is past its step.
        running = r.running.astype(bool)
        self._print_lines(int((r.initial_step + r.i)[running].min()) if running.any() else None)
        if self.bar is None:
            return
        if self.batch == 1:
            self.bar.set_postfix(loss=f"{r.last_value[0]:.6g}", refresh=False)
        else:
            self.bar.set_postfix(
                loss_min=f"{np.nanmin(r.last_value):.6g}",
                running=f"{running.sum()}/{self.batch}",
                refresh=False,
            )
        self.bar.refresh()

    def _end(self, r: Record) -> None:
        if self.bar is not None:
            self.bar.n = min(int((r.initial_step + r.i).max()), self.bar.total)
        self._print_lines(None)
        if self.log_every is not None:
            self._print_stops(r)
        if self.bar is None:
            return
        stopped = r.reason != StopReason.NONE
        if self.batch == 1 and stopped[0]:
            self.bar.set_postfix_str(f"stopped: {StopReason(int(r.reason[0])).name}", False)
        elif self.batch > 1:
            self.bar.set_postfix_str(f"{int(stopped.sum())} of {self.batch} stopped early", False)
        elif r.last_value.size:
            self.bar.set_postfix(loss=f"{r.last_value[0]:.6g}", refresh=False)
        self.bar.close()  # draws the bar
        self.bar = None

    def _print_stops(self, r: Record) -> None:
        """The line that ends the logs of a run that stopped early: the reason by name."""
        stopped = r.reason != StopReason.NONE
        if not stopped.any():
            return
        if self.batch == 1:
            step = int(r.initial_step[0] + r.i[0]) - 1  # the step whose value stopped it
            self._write(f"step {step} stopped: {StopReason(int(r.reason[0])).name}")
        else:
            counts = np.bincount(r.reason.astype(np.int64), minlength=len(StopReason))
            named = ", ".join(f"{StopReason(k).name} {n}" for k, n in enumerate(counts) if n)
            self._write(f"stop reasons of the {self.batch} problems: {named}")

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)


def call(reporter: Reporter, kind: int, record: Record) -> jax.Array:
    """Hand ``record`` to ``reporter`` on the host; returns the step it wants to hear from next.

    An ``io_callback``: an effect, so it runs whether or not its result is used.
    Under vmap ``custom_vmap`` makes it one call with the batched record.
    """

    @custom_batching.custom_vmap
    def host(record: Record) -> jax.Array:
        shape = jax.ShapeDtypeStruct(jnp.shape(record.i), jnp.int32)
        out: jax.Array = io_callback(lambda r: reporter(kind, r), shape, record, ordered=False)
        return out

    @host.def_vmap
    def _batched(
        axis_size: int, in_batched: list[Record], record: Record
    ) -> tuple[jax.Array, bool]:
        record = jax.tree.map(
            lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *jnp.shape(x))),
            record,
            in_batched[0],
        )
        return host(record), True

    out: jax.Array = host(record)
    return out
