"""Lanes packed for cheap moves: a matrix per dtype for the small leaves, a row per lane.

A batched run moves whole lanes (a refill, a hand-over): packed, a row moves with
one gather per dtype, not one per leaf. XLA compiles each gather and scatter on its
own, so their number sets the compile time. A large leaf (a history buffer, a large
param) is a matrix of its own: the lanes are packed again after every step, and a
matrix holding it would copy it whole each time (``benchmarks/bench_lane_step.py``,
notebook 06's sweep at 128 lanes with ``fit_batched``'s default history: 1.68 µs a
lane-step so, about 0.8 µs apart).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax


class Layout(NamedTuple):
    """Where each leaf of a pytree (leading axis: lanes) lives once packed: a matrix per
    group (see :func:`layout`), a row per lane."""

    treedef: jax.tree_util.PyTreeDef
    groups: int
    slots: tuple[tuple[int, int, tuple[int, ...]], ...]  # (group, start, shape) per leaf


SMALL = 64  # elements per lane: a larger leaf is a group of its own


def layout(tree: object) -> Layout:
    """Small leaves grouped by dtype; a leaf of more than ``SMALL`` elements a lane (a
    history buffer, a large param) alone, so that a step writing one entry of it does
    not copy it whole into a new matrix on every iteration."""
    leaves, treedef = jax.tree.flatten(tree)
    keys: list[object] = []
    ends: list[int] = []
    slots = []
    for k, x in enumerate(leaves):
        t = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
        key = (t.dtype, t.weak_type) if math.prod(x.shape[1:]) <= SMALL else k
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
