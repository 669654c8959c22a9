"""What XLA made of a compiled step.

The step's kernels over parameter-sized arrays, the bytes they move per parameter
according to the optimized HLO, and XLA's own buffer accounting (temporary bytes, and
the peak = arguments + outputs - donated aliases + temporaries).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import jax
import numpy as np

# XLA:CPU's copy insertion, given this option, proves that the donated bf16 moments
# can be overwritten in place; without it the step copies them first.
REGION_ANALYSIS = {"xla_cpu_copy_insertion_use_region_analysis": True}


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
