"""Lanes packed for cheap moves: one matrix per dtype, a row per lane.

A batched run moves whole lanes (a refill, a hand-over): packed, a row moves with
one gather per dtype, not one per leaf. XLA compiles each gather and scatter on its
own, so their number sets the compile time.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax


class Layout(NamedTuple):
    """Where each leaf of a pytree (leading axis: lanes) lives once packed: one matrix
    per dtype, a row per lane. A row moves with one gather per dtype, not per leaf;
    XLA compiles each gather and scatter on its own, so their number sets the compile time."""

    treedef: jax.tree_util.PyTreeDef
    groups: int
    slots: tuple[tuple[int, int, tuple[int, ...]], ...]  # (group, start, shape) per leaf


def layout(tree: object) -> Layout:
    leaves, treedef = jax.tree.flatten(tree)
    keys: list[tuple[object, bool]] = []
    ends: list[int] = []
    slots = []
    for x in leaves:
        t = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
        key = (t.dtype, t.weak_type)
        if key not in keys:
            keys.append(key)
            ends.append(0)
        g = keys.index(key)
        slots.append((g, ends[g], tuple(x.shape[1:])))
        ends[g] += math.prod(x.shape[1:])
    return Layout(treedef, len(keys), tuple(slots))


def pack(lay: Layout, tree: object) -> tuple[jax.Array, ...]:
    leaves = jax.tree.leaves(tree)
    width = leaves[0].shape[0]
    groups: list[list[jax.Array]] = [[] for _ in range(lay.groups)]
    for x, (g, _, shape) in zip(leaves, lay.slots, strict=True):
        groups[g].append(x.reshape(width, math.prod(shape)))
    return tuple(jax.lax.concatenate(p, 1) if len(p) > 1 else p[0] for p in groups)


def unpack(lay: Layout, packed: tuple[jax.Array, ...]) -> object:
    width = packed[0].shape[0]
    leaves = [
        jax.lax.slice_in_dim(packed[g], start, start + math.prod(shape), axis=1).reshape(
            (width, *shape)
        )
        for g, start, shape in lay.slots
    ]
    return lay.treedef.unflatten(leaves)
