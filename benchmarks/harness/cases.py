"""The benchmark's contenders and cases: the same step in adam_jax, optax and torch,
a bandwidth floor, and the four cases (one leaf, many leaves, vmap, bfloat16 moments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from harness.hlo import REGION_ANALYSIS, hlo_stats, memory_row, tree_bytes


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


# --------------------------------------------------------------------------
# Optimizers with the same math in adam_jax, optax and torch.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """One optimizer family in adam_jax, optax and torch, with the same math where they have it.

    ``ours(dtype)`` and ``theirs(dtype)`` build the adam_jax and optax optimizers (with
    ``dtype`` moments; ``theirs`` also gives a note where optax cannot match);
    ``torch(params, flag)`` the torch.optim one, in the ``torch_kinds`` implementations.
    """

    ours: Callable[[Any], optax.GradientTransformation]
    theirs: Callable[[Any], tuple[optax.GradientTransformation, str]]
    torch_kinds: tuple[str, ...]
    torch: Callable[[list, dict[str, bool]], Any]


def _torch_optim(name: str, **kw: Any) -> Callable[[list, dict[str, bool]], Any]:
    def make(params: list, flag: dict[str, bool]) -> Any:
        import torch

        return getattr(torch.optim, name)(params, **kw, **flag)

    return make


_NO_NU = "optax has no nu_dtype: its v stays float32"
_NO_STABLE = "optax has no StableAdamW: its AdamW (same defaults) is shown"


def _no_torch(params: list, flag: dict[str, bool]) -> Any:
    raise ValueError("torch.optim has no such optimizer")


# One entry a family: the benchmark's --optimizers choices are these names.
FAMILIES: dict[str, Family] = {
    "adam": Family(
        lambda d: adam_jax.adam(1e-3, mu_dtype=d, nu_dtype=d),
        lambda d: (optax.adam(1e-3, mu_dtype=d), _NO_NU if d else ""),
        ("fused", "foreach"),
        _torch_optim("Adam", lr=1e-3),
    ),
    "amsgrad": Family(
        lambda d: adam_jax.amsgrad(1e-3, max_of="corrected", mu_dtype=d, nu_dtype=d),
        lambda d: (
            optax.amsgrad(1e-3, mu_dtype=d),
            "optax has no nu_dtype: its v, v_max stay float32" if d else "",
        ),
        ("fused", "foreach"),
        _torch_optim("Adam", lr=1e-3, amsgrad=True),
    ),
    "adamax": Family(
        lambda d: adam_jax.adamax(2e-3, eps_in_max=True, mu_dtype=d),
        lambda d: (
            optax.adamax(2e-3),
            "optax.adamax has no mu_dtype: its state stays float32" if d else "",
        ),
        ("foreach",),
        _torch_optim("Adamax", lr=2e-3),
    ),
    # optax.nadam is NAdam with a constant momentum (ours: momentum_decay=inf); torch's
    # NAdam has its momentum schedule, a few more flops a step.
    "nadam": Family(
        lambda d: adam_jax.nadam(1e-3, momentum_decay=float("inf"), mu_dtype=d, nu_dtype=d),
        lambda d: (optax.nadam(1e-3, mu_dtype=d), _NO_NU if d else ""),
        ("foreach",),
        _torch_optim("NAdam", lr=1e-3),
    ),
    "radam": Family(
        lambda d: adam_jax.radam(1e-3, form="optax", mu_dtype=d, nu_dtype=d),
        lambda d: (
            optax.radam(1e-3),
            "optax.radam has no mu_dtype: its state stays float32" if d else "",
        ),
        ("foreach",),
        _torch_optim("RAdam", lr=1e-3),
    ),
    # The newer families have no torch.optim counterpart; optax's contrib has two of them.
    "adopt": Family(
        lambda d: adam_jax.adopt(1e-3),
        lambda d: (optax.contrib.adopt(1e-3), "no mu_dtype in either" if d else ""),
        (),
        _no_torch,
    ),
    "ademamix": Family(
        lambda d: adam_jax.ademamix(1e-3, mu_dtype=d, nu_dtype=d),
        lambda d: (optax.contrib.ademamix(1e-3), _NO_NU if d else ""),
        (),
        _no_torch,
    ),
    "stable_adamw": Family(
        lambda d: adam_jax.stable_adamw(1e-3),
        lambda d: (optax.adamw(1e-3, b2=0.99, eps=1e-6, weight_decay=1e-2), _NO_STABLE),
        (),
        _no_torch,
    ),
}


def ours(name: str, dtype: Any | None = None) -> optax.GradientTransformation:
    return FAMILIES[name].ours(dtype)


def theirs(name: str, dtype: Any | None = None) -> tuple[optax.GradientTransformation, str]:
    """The optax optimizer with the same math, and a note where it cannot match."""
    return FAMILIES[name].theirs(dtype)


def torch_kinds(name: str) -> list[str]:
    return list(FAMILIES[name].torch_kinds)


def torch_optimizer(name: str, params: list, kind: str):
    flag = {"fused": True} if kind == "fused" else {"foreach": True}
    return FAMILIES[name].torch(params, flag)


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------
# Contenders: callables that run one step and wait for it.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Contender:
    run: Callable[[], None]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


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


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


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
            "adam_jax/optax": ratio(ours_ms, med.get("optax")),
            "adam_jax/torch_fused": ratio(ours_ms, med.get("torch_fused")),
            "adam_jax/torch_foreach": ratio(ours_ms, med.get("torch_foreach")),
            "adam_jax/floor": ratio(ours_ms, floors.get(floor_name)),
            "optax/floor": ratio(med.get("optax"), floors.get(floor_name)),
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
        "ratio_compile_s": ratio(r["adam_jax"]["compile_s"], r["optax"]["compile_s"]),
        "ratio_trace_plus_compile": ratio(first["adam_jax"], first["optax"]),
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
            "optax_python_loop/adam_jax": ratio(med["optax_python_loop"], med["adam_jax"]),
            "adam_jax/optax": ratio(med["adam_jax"], med["optax"]),
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
