"""Benchmarks of one optimizer step: ``adam-jax bench`` and ``benchmarks/bench_update.py``.

An Adam step is a memory-bound pass over the parameters: it reads p, g, m and v and
writes p, m and v (28 bytes per float32 parameter; 36 for AMSGrad's extra ``v_max``).
This module times the step a user writes -- ``opt.update`` then
``optax.apply_updates`` inside ``jax.jit`` with params and state donated -- against:

* the optax optimizer with the same math (``optax.adam``, ``optax.amsgrad``, which is
  our ``max_of="corrected"``, and ``optax.adamax``, which is our ``eps_in_max=True``);
* ``torch.optim`` (``fused=True`` and ``foreach=True``) when torch is installed;
* a bandwidth floor measured in the same run: the fastest in-place read-modify-write
  of an array holding as many bytes as the step reads plus writes, from JAX, NumPy and
  torch.

Cases:

* ``one_leaf``: one leaf of 2^24 float32 (``--one-leaf-log2``);
* ``many_leaves``: 1,000 leaves of 4,096 float32; compile time reported separately;
* ``vmap``: one ``jit(vmap(step))`` over 1,024 small problems against a Python loop of
  per-problem jitted optax steps (the loop is timed over ``--loop-subset`` problems
  and extrapolated linearly, which the output says);
* ``bf16``: ``mu_dtype=nu_dtype=bfloat16`` moments on the one-leaf problem.

Method: one process; every contender is compiled and run twice before timing; then
the contenders run interleaved (the order rotates every round), each call is timed
to ``block_until_ready``, and the median of ``--reps`` (>= 10 by default) is
reported. JAX steps are ahead-of-time compiled once, so compile time is measured on
its own (trace + lower, then XLA compile) and never enters a step time. The machine
is usually shared: read the ratios, which come from the same interleaved rounds,
rather than the absolute times.

torch runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set: with
spinning OpenMP threads next to XLA's thread pool on a two-core machine, a fused
step over many leaves stalls for seconds. With bfloat16 moments the step is also
timed compiled with ``xla_cpu_copy_insertion_use_region_analysis``, which lets XLA
update the donated moments in place instead of copying them first.

Besides the times, every compiled JAX step is inspected: the number of kernels
(fusions and copies) over parameter-sized arrays, the bytes they move per parameter
according to the optimized HLO, and XLA's own buffer accounting (temporary bytes, and
the peak = arguments + outputs - donated aliases + temporaries).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax

CASES = ("one_leaf", "many_leaves", "vmap", "bf16")
OPTIMIZERS = ("adam", "amsgrad", "adamax")
GOALS = {
    "one_leaf": "adam_jax <= 0.8x optax and <= 1.0x torch fused",
    "many_leaves": "compile <= 0.2x optax; step <= 0.8x optax",
    "vmap": ">= 100x faster than a Python loop of per-problem optax steps",
    "bf16": "state bytes halved; peak <= params + grads + state + 10%",
}
# XLA:CPU's copy insertion, given this option, proves that the donated bf16 moments
# can be overwritten in place; without it the step copies them first.
REGION_ANALYSIS = {"xla_cpu_copy_insertion_use_region_analysis": True}


# Settings applied to this process before torch loaded, reported with the machine.
machine_env: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Settings:
    one_leaf_log2: int
    leaves: int
    leaf_size: int
    batch: int
    problem_shape: tuple[int, int]
    loop_subset: int
    reps: int
    warmup: int


FULL = Settings(24, 1000, 4096, 1024, (8, 8), 128, 15, 2)
QUICK = Settings(22, 200, 4096, 1024, (8, 8), 32, 10, 2)


# --------------------------------------------------------------------------
# Machine description.
# --------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", "unknown")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import jaxlib

    digest = hashlib.sha256()
    for path in sorted(Path(adam_jax.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": machine_env.get("omp_wait_policy")
        or os.environ.get("OMP_WAIT_POLICY", ""),
        "adam_jax_sources_sha256": digest.hexdigest()[:16],
        "versions": {
            "adam_jax": adam_jax.__version__,
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
            "torch": _version("torch"),
        },
    }


# --------------------------------------------------------------------------
# Optimizers with the same math in adam_jax, optax and torch.
# --------------------------------------------------------------------------


def ours(name: str, dtype: Any | None = None) -> optax.GradientTransformation:
    if name == "adam":
        return adam_jax.adam(1e-3, mu_dtype=dtype, nu_dtype=dtype)
    if name == "amsgrad":
        return adam_jax.amsgrad(1e-3, max_of="corrected", mu_dtype=dtype, nu_dtype=dtype)
    if name == "adamax":
        return adam_jax.adamax(2e-3, eps_in_max=True, mu_dtype=dtype)
    raise ValueError(name)


def theirs(name: str, dtype: Any | None = None) -> tuple[optax.GradientTransformation, str]:
    """The optax optimizer with the same math, and a note where it cannot match."""
    if name == "adam":
        note = "optax has no nu_dtype: its v stays float32" if dtype else ""
        return optax.adam(1e-3, mu_dtype=dtype), note
    if name == "amsgrad":
        note = "optax has no nu_dtype: its v, v_max stay float32" if dtype else ""
        return optax.amsgrad(1e-3, mu_dtype=dtype), note
    if name == "adamax":
        note = "optax.adamax has no mu_dtype: its state stays float32" if dtype else ""
        return optax.adamax(2e-3), note
    raise ValueError(name)


def torch_kinds(name: str) -> list[str]:
    return ["fused", "foreach"] if name in ("adam", "amsgrad") else ["foreach"]


def torch_optimizer(name: str, params: list, kind: str):
    import torch

    flag = {"fused": True} if kind == "fused" else {"foreach": True}
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, **flag)
    if name == "amsgrad":
        return torch.optim.Adam(params, lr=1e-3, amsgrad=True, **flag)
    if name == "adamax":
        return torch.optim.Adamax(params, lr=2e-3, **flag)
    raise ValueError(name)


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------
# HLO inspection.
# --------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_INSTR = re.compile(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(?:,|$)")
_FREE_OPS = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant"}


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        size = 1
        for d in dims.split(","):
            if d:
                size *= int(d)
        total += _DTYPE_BYTES.get(dtype, 4) * size
    return total


def hlo_stats(compiled: Any, n_params: int, smallest_leaf: int) -> dict[str, Any]:
    """Kernels over parameter-sized arrays in the entry computation and the bytes they move.

    A kernel counts when it touches at least as many bytes as the smallest leaf has
    elements (so the scalar bias-correction fusions are left out); its bytes are its
    operands plus its result.
    """
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    shapes: dict[str, str] = {}
    kernels: list[str] = []
    moved = 0
    for line in entry.splitlines()[1:]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, args = m.groups()
        shapes[name] = shape
        if op in _FREE_OPS:
            continue
        nbytes = _shape_bytes(shape) + sum(
            _shape_bytes(shapes.get(o, "")) for o in re.findall(r"%([\w.\-]+)", args)
        )
        if nbytes >= max(smallest_leaf, 16):
            kernels.append(op)
            moved += nbytes
    out: dict[str, Any] = {
        "kernels": len(kernels),
        "fusions": kernels.count("fusion"),
        "copies": kernels.count("copy"),
        "hlo_bytes_per_param": round(moved / n_params, 2),
    }
    with contextlib.suppress(Exception):
        mem = compiled.memory_analysis()
        peak = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes
        )
        out.update(
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
            peak_bytes=int(peak),
        )
    return out


# --------------------------------------------------------------------------
# Contenders: callables that run one step and wait for it.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Contender:
    run: Callable[[], None]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def user_step(opt: optax.GradientTransformation) -> Callable:
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def jax_contender(
    opt: optax.GradientTransformation,
    params: Any,
    grads: Any,
    *,
    vmapped: bool = False,
    compiler_options: dict[str, Any] | None = None,
) -> Contender:
    """The user-style donated step, compiled ahead of time so compile time is separate."""
    init = jax.vmap(opt.init) if vmapped else opt.init
    state = init(params)
    step = jax.vmap(user_step(opt)) if vmapped else user_step(opt)
    params = _copy(params)
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    t2 = time.perf_counter()
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    info = {
        "trace_lower_s": round(t1 - t0, 4),
        "compile_s": round(t2 - t1, 4),
        "state_bytes": tree_bytes(state),
        **hlo_stats(compiled, sum(sizes), min(sizes)),
    }
    box = [params, state]

    def run() -> None:
        box[0], box[1] = compiled(box[0], box[1], grads)
        jax.block_until_ready(box)

    return Contender(run, info)


def torch_contender(name: str, kind: str, params: list[np.ndarray], grads: list[np.ndarray]):
    import torch

    tparams = []
    for p, g in zip(params, grads, strict=True):
        t = torch.nn.Parameter(torch.from_numpy(p.copy()))
        t.grad = torch.from_numpy(g.copy())
        tparams.append(t)
    opt = torch_optimizer(name, tparams, kind)
    return Contender(opt.step, {"threads": torch.get_num_threads()})


def floor_contenders(moved_bytes: int, with_torch: bool) -> dict[str, Contender]:
    """In-place read-modify-writes of ``moved_bytes / 2`` bytes: they move ``moved_bytes``."""
    n = max(moved_bytes // 8, 1)
    out: dict[str, Contender] = {}
    add_one = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    jbox = [jnp.zeros(n, jnp.float32)]

    def run_jax() -> None:
        jbox[0] = add_one(jbox[0])
        jbox[0].block_until_ready()

    out["floor_jax"] = Contender(run_jax)
    xn = np.zeros(n, np.float32)
    out["floor_numpy"] = Contender(lambda: np.add(xn, 1.0, out=xn))
    if with_torch:
        import torch

        xt = torch.zeros(n, dtype=torch.float32)
        out["floor_torch"] = Contender(lambda: xt.add_(1.0))
    return out


def interleave(contenders: dict[str, Contender], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call for each contender, rounds interleaved with a rotating order."""
    for _ in range(warmup):
        for c in contenders.values():
            c.run()
    names = list(contenders)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            contenders[name].run()
            times[name].append(time.perf_counter() - t)
    return times


def summarize(times: list[float], scale: float = 1.0) -> dict[str, Any]:
    ms = [1e3 * t * scale for t in times]
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {
        "median_ms": round(statistics.median(ms), 4),
        "min_ms": round(min(ms), 4),
        "q1_ms": round(q[0], 4),
        "q3_ms": round(q[2], 4),
        "runs": len(ms),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _free() -> None:
    gc.collect()


# --------------------------------------------------------------------------
# Cases.
# --------------------------------------------------------------------------


def _moved_bytes(params: Any, state_bytes: int) -> int:
    """What a step reads and writes: p twice, g once, the state arrays twice."""
    p = tree_bytes(params)
    return 2 * p + p + 2 * state_bytes


def _timed_case(
    case: str,
    name: str,
    contenders: dict[str, Contender],
    settings: Settings,
    extra: dict[str, Any],
) -> dict[str, Any]:
    times = interleave(contenders, settings.reps, settings.warmup)
    results = {}
    for k, c in contenders.items():
        results[k] = {**summarize(times[k]), **c.info}
    floors = {k: v["median_ms"] for k, v in results.items() if k.startswith("floor_")}
    floor_name = min(floors, key=floors.get) if floors else None
    med = {k: v["median_ms"] for k, v in results.items()}
    ours_ms = med.get("adam_jax")
    row = {
        "case": case,
        "optimizer": name,
        **extra,
        "results": results,
        "floor": {"fastest": floor_name, "median_ms": floors.get(floor_name)},
        "ratios": {
            "adam_jax/optax": _ratio(ours_ms, med.get("optax")),
            "adam_jax/torch_fused": _ratio(ours_ms, med.get("torch_fused")),
            "adam_jax/torch_foreach": _ratio(ours_ms, med.get("torch_foreach")),
            "adam_jax/floor": _ratio(ours_ms, floors.get(floor_name)),
            "optax/floor": _ratio(med.get("optax"), floors.get(floor_name)),
        },
    }
    return row


def case_one_leaf(
    name: str, settings: Settings, with_torch: bool, *, bf16: bool = False
) -> dict[str, Any]:
    n = 2**settings.one_leaf_log2
    rng = np.random.default_rng(0)
    p_np = (0.1 * rng.standard_normal(n)).astype(np.float32)
    g_np = rng.standard_normal(n).astype(np.float32)
    params, grads = jnp.asarray(p_np), jnp.asarray(g_np)
    dtype = jnp.bfloat16 if bf16 else None
    opt_theirs, note = theirs(name, dtype)
    contenders = {
        "adam_jax": jax_contender(ours(name, dtype), params, grads),
        "optax": jax_contender(opt_theirs, params, grads),
    }
    if bf16:
        with contextlib.suppress(Exception):
            contenders["adam_jax_region_analysis"] = jax_contender(
                ours(name, dtype), params, grads, compiler_options=REGION_ANALYSIS
            )
    if with_torch and not bf16:
        for kind in torch_kinds(name):
            contenders[f"torch_{kind}"] = torch_contender(name, kind, [p_np], [g_np])
    moved = _moved_bytes(params, contenders["adam_jax"].info["state_bytes"])
    contenders.update(floor_contenders(moved, with_torch))
    extra = {
        "n_params": n,
        "leaves": 1,
        "moments": "bfloat16" if bf16 else "float32",
        "bytes_per_param": moved / n,
    }
    if note:
        extra["note"] = note
    row = _timed_case("bf16" if bf16 else "one_leaf", name, contenders, settings, extra)
    row["memory"] = memory_row(row, params, grads)
    del contenders
    _free()
    return row


def memory_row(row: dict[str, Any], params: Any, grads: Any) -> dict[str, Any]:
    """XLA's peak for a step against params + grads + state (goal: at most 10% over)."""
    out = {}
    for k, r in row["results"].items():
        if "peak_bytes" not in r:
            continue
        budget = tree_bytes(params) + tree_bytes(grads) + r["state_bytes"]
        out[k] = {
            "params_bytes": tree_bytes(params),
            "grads_bytes": tree_bytes(grads),
            "state_bytes": r["state_bytes"],
            "peak_bytes": r["peak_bytes"],
            "temp_bytes": r["temp_bytes"],
            "peak/budget": round(r["peak_bytes"] / budget, 4),
        }
    return out


def case_many_leaves(name: str, settings: Settings, with_torch: bool) -> dict[str, Any]:
    L, size = settings.leaves, settings.leaf_size
    rng = np.random.default_rng(1)
    p_np = [(0.1 * rng.standard_normal(size)).astype(np.float32) for _ in range(L)]
    g_np = [rng.standard_normal(size).astype(np.float32) for _ in range(L)]
    params = {f"layer{i:04d}": jnp.asarray(x) for i, x in enumerate(p_np)}
    grads = {f"layer{i:04d}": jnp.asarray(x) for i, x in enumerate(g_np)}
    contenders = {
        "adam_jax": jax_contender(ours(name), params, grads),
        "optax": jax_contender(theirs(name)[0], params, grads),
    }
    if with_torch:
        for kind in torch_kinds(name):
            contenders[f"torch_{kind}"] = torch_contender(name, kind, p_np, g_np)
    moved = _moved_bytes(params, contenders["adam_jax"].info["state_bytes"])
    contenders.update(floor_contenders(moved, with_torch))
    extra = {
        "n_params": L * size,
        "leaves": L,
        "leaf_size": size,
        "bytes_per_param": moved / (L * size),
        "note": "the floor moves the same bytes as one array, without per-leaf overhead",
    }
    row = _timed_case("many_leaves", name, contenders, settings, extra)
    row["memory"] = memory_row(row, params, grads)
    r = row["results"]
    first = {k: r[k]["trace_lower_s"] + r[k]["compile_s"] for k in ("adam_jax", "optax")}
    row["compile"] = {
        "adam_jax": {k: r["adam_jax"][k] for k in ("trace_lower_s", "compile_s")},
        "optax": {k: r["optax"][k] for k in ("trace_lower_s", "compile_s")},
        "ratio_compile_s": _ratio(r["adam_jax"]["compile_s"], r["optax"]["compile_s"]),
        "ratio_trace_plus_compile": _ratio(first["adam_jax"], first["optax"]),
    }
    del contenders
    _free()
    return row


def case_vmap(name: str, settings: Settings, with_torch: bool) -> dict[str, Any]:
    del with_torch  # torch has no batched-optimizer counterpart
    B, shape = settings.batch, settings.problem_shape
    rng = np.random.default_rng(2)

    def problems(scale: float) -> dict[str, np.ndarray]:
        return {
            "w": (scale * rng.standard_normal((B, *shape))).astype(np.float32),
            "b": (scale * rng.standard_normal((B, shape[-1]))).astype(np.float32),
        }

    p_np, g_np = problems(0.1), problems(1.0)
    params = jax.tree.map(jnp.asarray, p_np)
    grads = jax.tree.map(jnp.asarray, g_np)
    contenders = {
        "adam_jax": jax_contender(ours(name), params, grads, vmapped=True),
        "optax": jax_contender(theirs(name)[0], params, grads, vmapped=True),
    }
    subset = max(1, min(settings.loop_subset, B))
    loop_opt = theirs(name)[0]
    loop_step = jax.jit(user_step(loop_opt), donate_argnums=(0, 1))
    one_p = [jax.tree.map(lambda x, i=i: jnp.asarray(x[i]), p_np) for i in range(subset)]
    one_g = [jax.tree.map(lambda x, i=i: jnp.asarray(x[i]), g_np) for i in range(subset)]
    one_s = [loop_opt.init(p) for p in one_p]

    def run_loop() -> None:
        for i in range(subset):
            one_p[i], one_s[i] = loop_step(one_p[i], one_s[i], one_g[i])
        jax.block_until_ready((one_p, one_s))

    contenders["optax_python_loop"] = Contender(run_loop, {"problems_timed": subset})
    times = interleave(contenders, settings.reps, settings.warmup)
    scale = B / subset
    results = {k: {**summarize(times[k]), **c.info} for k, c in contenders.items()}
    results["optax_python_loop"] = {
        **summarize(times["optax_python_loop"], scale),
        "problems_timed": subset,
        "extrapolated_x": round(scale, 3),
    }
    med = {k: v["median_ms"] for k, v in results.items()}
    n_params = int(np.prod(shape)) + shape[-1]
    row = {
        "case": "vmap",
        "optimizer": name,
        "n_params": n_params * B,
        "problems": B,
        "params_per_problem": n_params,
        "results": results,
        "ratios": {
            "optax_python_loop/adam_jax": _ratio(med["optax_python_loop"], med["adam_jax"]),
            "adam_jax/optax": _ratio(med["adam_jax"], med["optax"]),
        },
        "note": (
            f"Python loop timed over {subset} of {B} problems and extrapolated linearly"
            if subset < B
            else "Python loop timed over all problems"
        ),
    }
    del contenders
    _free()
    return row


# --------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m["versions"]
    out = [
        f"adam_jax {v['adam_jax']} step benchmark ({'quick' if report['quick'] else 'full'}), "
        f"{report['timestamp']}",
        f"CPU: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); "
        f"jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, numpy {v['numpy']}, "
        f"torch {v['torch'] or 'not installed'}; backend {m['jax_backend']}"
        + (f"; XLA_FLAGS={m['xla_flags']}" if m["xla_flags"] else "")
        + (f"; OMP_WAIT_POLICY={m['omp_wait_policy']}" if m["omp_wait_policy"] else ""),
        f"Medians of {report['settings']['reps']} interleaved runs (ms); "
        "ratios are adam_jax's time over the other's (< 1 = adam_jax faster).",
    ]
    steps = [r for r in report["cases"] if r["case"] in ("one_leaf", "many_leaves", "bf16")]
    if steps:
        rows = []
        for r in steps:
            res = r["results"]
            med = {k: res[k]["median_ms"] for k in res}
            rows.append(
                [
                    r["case"] + ("" if r["case"] != "many_leaves" else f" ({r['leaves']})"),
                    r["optimizer"],
                    f"{r['n_params']:,}",
                    _fmt(r["bytes_per_param"], ".0f"),
                    _fmt(med.get("adam_jax")),
                    _fmt(med.get("optax")),
                    _fmt(med.get("torch_fused")),
                    _fmt(med.get("torch_foreach")),
                    _fmt(r["floor"]["median_ms"]),
                    _fmt(r["ratios"]["adam_jax/optax"]),
                    _fmt(r["ratios"]["adam_jax/torch_fused"]),
                    _fmt(r["ratios"]["adam_jax/floor"]),
                ]
            )
            ra = med.get("adam_jax_region_analysis")
            if ra is not None:
                rows.append(
                    [
                        r["case"] + " (region analysis)",
                        r["optimizer"],
                        "",
                        "",
                        _fmt(ra),
                        _fmt(med.get("optax")),
                        "-",
                        "-",
                        _fmt(r["floor"]["median_ms"]),
                        _fmt(_ratio(ra, med.get("optax"))),
                        "-",
                        _fmt(_ratio(ra, r["floor"]["median_ms"])),
                    ]
                )
        out += [
            "",
            "Step time",
            _table(
                [
                    "case",
                    "optimizer",
                    "params",
                    "B/param",
                    "adam_jax",
                    "optax",
                    "torch fused",
                    "torch foreach",
                    "floor",
                    "vs optax",
                    "vs fused",
                    "vs floor",
                ],
                rows,
            ),
        ]
    many = [r for r in report["cases"] if r["case"] == "many_leaves"]
    if many:
        rows = []
        for r in many:
            c = r["compile"]
            rows.append(
                [
                    r["optimizer"],
                    str(r["leaves"]),
                    _fmt(c["adam_jax"]["trace_lower_s"]),
                    _fmt(c["adam_jax"]["compile_s"]),
                    _fmt(c["optax"]["trace_lower_s"]),
                    _fmt(c["optax"]["compile_s"]),
                    _fmt(c["ratio_compile_s"]),
                    _fmt(c["ratio_trace_plus_compile"]),
                ]
            )
        out += [
            "",
            "Compile time, many leaves (s)",
            _table(
                [
                    "optimizer",
                    "leaves",
                    "adam_jax trace+lower",
                    "adam_jax compile",
                    "optax trace+lower",
                    "optax compile",
                    "compile ratio",
                    "total ratio",
                ],
                rows,
            ),
        ]
    vm = [r for r in report["cases"] if r["case"] == "vmap"]
    if vm:
        rows = []
        for r in vm:
            res = r["results"]
            rows.append(
                [
                    r["optimizer"],
                    f"{r['problems']} x {r['params_per_problem']}",
                    _fmt(res["adam_jax"]["median_ms"], ".3f"),
                    _fmt(res["optax"]["median_ms"], ".3f"),
                    _fmt(res["optax_python_loop"]["median_ms"], ".1f"),
                    _fmt(r["ratios"]["optax_python_loop/adam_jax"], ".0f"),
                ]
            )
        out += [
            "",
            "vmap over many small problems (ms)",
            _table(
                [
                    "optimizer",
                    "problems x params",
                    "adam_jax jit(vmap)",
                    "optax jit(vmap)",
                    "optax Python loop",
                    "loop / adam_jax",
                ],
                rows,
            ),
            vm[0]["note"] + ".",
        ]
    rows = []
    for r in report["cases"]:
        for k in ("adam_jax", "optax", "adam_jax_region_analysis"):
            res = r["results"].get(k)
            if not res or "kernels" not in res:
                continue
            mem = r.get("memory", {}).get(k, {})
            rows.append(
                [
                    r["case"],
                    r["optimizer"],
                    k,
                    str(res["kernels"]),
                    str(res["copies"]),
                    _fmt(res["hlo_bytes_per_param"], ".1f"),
                    _fmt(r.get("bytes_per_param"), ".0f"),
                    _fmt(res["state_bytes"] / 2**20, ".1f"),
                    _fmt(mem.get("temp_bytes", 0) / 2**20, ".1f") if mem else "-",
                    _fmt(mem.get("peak/budget"), ".3f") if mem else "-",
                ]
            )
    out += [
        "",
        "Optimized HLO and memory (kernels over parameter-sized arrays; "
        "peak = XLA arguments + outputs - donated + temporaries; budget = params + grads + state)",
        _table(
            [
                "case",
                "optimizer",
                "step",
                "kernels",
                "copies",
                "HLO B/param",
                "floor B/param",
                "state MiB",
                "temp MiB",
                "peak/budget",
            ],
            rows,
        ),
    ]
    if any("adam_jax_region_analysis" in r["results"] for r in report["cases"]):
        out += [
            "",
            "region analysis: the same step compiled with compiler_options="
            f"{REGION_ANALYSIS}, which lets XLA update donated bfloat16 moments in place.",
        ]
    out += ["", "Goals: " + "; ".join(f"{k}: {v}" for k, v in GOALS.items())]
    return "\n".join(out)


# --------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adam-jax bench",
        description=(
            "Time one user-style optimizer step (update + optax.apply_updates, jitted, "
            "donated) against optax, torch.optim and a bandwidth floor."
        ),
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs (< 1 min)")
    p.add_argument(
        "--cases",
        type=_csv(CASES),
        default=list(CASES),
        help=f"comma-separated, from {','.join(CASES)} (default: all)",
    )
    p.add_argument(
        "--optimizers",
        type=_csv(OPTIMIZERS),
        default=list(OPTIMIZERS),
        help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: all)",
    )
    p.add_argument("--reps", type=int, help="timed runs per contender (median reported)")
    p.add_argument("--warmup", type=int, help="untimed runs per contender first")
    p.add_argument("--one-leaf-log2", type=int, help="one_leaf/bf16 size is 2**N (full: 24)")
    p.add_argument("--leaves", type=int, help="number of leaves in many_leaves (full: 1000)")
    p.add_argument("--leaf-size", type=int, help="elements per leaf in many_leaves (4096)")
    p.add_argument("--batch", type=int, help="problems in the vmap case (1024)")
    p.add_argument("--loop-subset", type=int, help="problems timed in the Python loop")
    p.add_argument("--no-torch", action="store_true", help="leave torch out even if installed")
    p.add_argument(
        "--json",
        type=Path,
        help="where to write the JSON results "
        "(default benchmarks/results/update[-quick].json under the current directory)",
    )
    p.add_argument("--no-json", action="store_true", help="print the table only")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    over = {
        "one_leaf_log2": args.one_leaf_log2,
        "leaves": args.leaves,
        "leaf_size": args.leaf_size,
        "batch": args.batch,
        "loop_subset": args.loop_subset,
        "reps": args.reps,
        "warmup": args.warmup,
    }
    s = dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})
    for k in ("leaves", "leaf_size", "batch", "loop_subset", "reps"):
        if getattr(s, k) < 1:
            raise SystemExit(f"adam-jax bench: --{k.replace('_', '-')} must be >= 1")
    if s.warmup < 1:
        raise SystemExit("adam-jax bench: --warmup must be >= 1 (the first call compiles)")
    return s


def run(
    settings: Settings,
    cases: list[str],
    optimizers: list[str],
    with_torch: bool,
    quick: bool,
    argv: list[str],
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "schema": 1,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": argv,
        "quick": quick,
        "machine": machine_info(),
        "load_average_before": _loadavg(),
        "settings": dataclasses.asdict(settings),
        "method": (
            "one process; warm-up runs first; contenders interleaved with a rotating order; "
            "each run timed to block_until_ready; median reported; JAX steps compiled ahead "
            "of time (compile time separate); floor = fastest in-place read-modify-write "
            "moving the step's bytes (JAX, NumPy, torch)"
        ),
        "goals": GOALS,
        "cases": [],
    }
    fns = {
        "one_leaf": lambda o: case_one_leaf(o, settings, with_torch),
        "many_leaves": lambda o: case_many_leaves(o, settings, with_torch),
        "vmap": lambda o: case_vmap(o, settings, with_torch),
        "bf16": lambda o: case_one_leaf(o, settings, with_torch, bf16=True),
    }
    t0 = time.perf_counter()
    for case in cases:
        for name in optimizers:
            print(f"  {case} / {name} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            row = fns[case](name)
            row["wall_s"] = round(time.perf_counter() - t, 2)
            report["cases"].append(row)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["load_average"] = _loadavg()
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    if not args.no_torch and "torch" not in sys.modules:
        # torch's OpenMP threads spin between parallel regions by default. Next to
        # XLA's thread pool on a machine with few cores, a fused step over 200 leaves
        # then stalls for seconds (one scheduler slice per region); sleeping threads
        # cost torch a little instead. Set OMP_WAIT_POLICY yourself to choose.
        # OpenMP reads it once, when torch loads, so the process environment is
        # put back right after.
        chosen = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = chosen or "PASSIVE"
        with_torch = have_torch()
        machine_env["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
        if chosen is None:
            del os.environ["OMP_WAIT_POLICY"]
    else:
        with_torch = not args.no_torch and have_torch()
    report = run(settings, args.cases, args.optimizers, with_torch, args.quick, argv)
    print(format_report(report))
    if not args.no_json:
        path = args.json or Path("benchmarks/results") / (
            "update-quick.json" if args.quick else "update.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nJSON: {path}  (wall {report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
