"""What a benchmark records besides time: the machine, and what XLA made of a step.

The compiled step's kernels over parameter-sized arrays, the bytes they move per
parameter according to the optimized HLO, and XLA's own buffer accounting (temporary
bytes, and the peak = arguments + outputs - donated aliases + temporaries).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import adam_jax

# XLA:CPU's copy insertion, given this option, proves that the donated bf16 moments
# can be overwritten in place; without it the step copies them first.
REGION_ANALYSIS = {"xla_cpu_copy_insertion_use_region_analysis": True}


# Settings applied to this process before torch loaded, reported with the machine.
machine_env: dict[str, str] = {}


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


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


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


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
