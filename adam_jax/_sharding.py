"""Optimizer-state sharding (ZeRO-1) on a ``jax.sharding.Mesh``.

adam_jax needs no help to run sharded: every optimizer's state is built and
updated leaf by leaf, elementwise, so the moments take the shardings of their
params and an update compiles to purely local code. This module is for the one
case where the state should be sharded *differently* from the params: params
replicated over a data axis (plain data parallelism), moments split over it, so
each device stores ``1/n`` of ``m``, ``v``, ``v_max`` or ``u`` (stage 1 of ZeRO,
Rajbhandari et al., 2020). XLA then inserts the collectives that move between
the replicated and the sharded layout; adam_jax itself adds none.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> import adam_jax
  >>> from adam_jax import bytes_per_device, zero1_state_shardings
  >>> mesh = jax.make_mesh((1,), ("data",))
  >>> params = {"w": jnp.zeros((4, 3), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
  >>> opt = adam_jax.adam(1e-3)
  >>> shardings = zero1_state_shardings(opt, params, mesh, axis="data")
  >>> state = jax.jit(opt.init, out_shardings=shardings)(params)
  >>> bytes_per_device(state)  # 2 moments * 15 floats * 4 bytes + the int32 count
  124
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_spec: Callable[..., PartitionSpec] = PartitionSpec  # untyped in jax's stubs

__all__ = ["bytes_per_device", "zero1_spec", "zero1_state_shardings"]


def zero1_spec(shape: Sequence[int], axis_size: int, axis: str) -> PartitionSpec:
    """The ZeRO-1 rule for one state leaf: split its largest divisible dimension.

    The largest dimension whose size is a positive multiple of ``axis_size`` is
    split over the mesh axis ``axis`` (the first such dimension on ties). Scalars
    (the step count), empty leaves and leaves with no divisible dimension stay
    replicated: an uneven split would need padding, which ``NamedSharding`` does
    not do.

    Args:
      shape: the leaf's shape.
      axis_size: the size of the mesh axis, ``mesh.shape[axis]``.
      axis: the mesh axis name.

    Returns:
      A ``PartitionSpec`` naming ``axis`` at most once, or ``PartitionSpec()``.

    Example:
      >>> from jax.sharding import PartitionSpec
      >>> from adam_jax import zero1_spec
      >>> zero1_spec((6, 16), 4, "data") == PartitionSpec(None, "data")
      True
      >>> zero1_spec((3, 5), 4, "data") == PartitionSpec()
      True
    """
    shape = tuple(int(d) for d in shape)
    candidates = [i for i, d in enumerate(shape) if d > 0 and d % axis_size == 0]
    if not candidates or math.prod(shape) == 0:
        return _spec()
    dim = max(candidates, key=lambda i: (shape[i], -i))
    return _spec(*(axis if i == dim else None for i in range(len(shape))))


def zero1_state_shardings(
    optimizer: optax.GradientTransformation,
    params: Any,
    mesh: Mesh,
    axis: str = "data",
) -> Any:
    """Shardings that split the optimizer state over one mesh axis (ZeRO-1).

    The state's shapes come from ``jax.eval_shape(optimizer.init, params)``, so
    nothing is allocated; each leaf then gets ``NamedSharding(mesh,
    zero1_spec(leaf.shape, mesh.shape[axis], axis))``. Use the result as the
    ``out_shardings`` of ``jax.jit(optimizer.init)`` and as the state's in- and
    out-shardings of the training step, with the params replicated:

    .. code-block:: python

      state_sh = zero1_state_shardings(opt, params, mesh, axis="data")
      opt_state = jax.jit(opt.init, out_shardings=state_sh)(params)
      step = jax.jit(
          train_step,
          in_shardings=(replicated, state_sh, batch_sh),
          out_shardings=(replicated, state_sh),
          donate_argnums=(0, 1),
      )

    Every device then holds ``1/mesh.shape[axis]`` of each divisible moment; see
    :func:`bytes_per_device`. The price is communication: XLA slices the
    replicated gradient into the local shard (free) and all-gathers the update
    back to the replicated params (``all-gather`` in the compiled step). When the
    params are themselves sharded, leave the state alone: it already follows them.

    Args:
      optimizer: any optax ``GradientTransformation`` (adam_jax or not).
      params: the params, as arrays or ``jax.ShapeDtypeStruct``.
      mesh: the device mesh.
      axis: the mesh axis to split the state over, usually the data axis.

    Returns:
      A pytree with the structure of ``optimizer.init(params)`` whose leaves are
      ``NamedSharding`` on ``mesh``.

    Raises:
      ValueError: if ``axis`` is not an axis of ``mesh``.

    References:
      Rajbhandari, Rasley, Ruwase and He, `ZeRO: Memory Optimizations Toward
      Training Trillion Parameter Models <https://arxiv.org/abs/1910.02054>`_, 2020.
    Example:
      >>> import jax, jax.numpy as jnp
      >>> import adam_jax
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> params = {"w": jnp.zeros((4, 2), jnp.float32)}
      >>> opt = adam_jax.adam(1e-3)
      >>> shardings = adam_jax.zero1_state_shardings(opt, params, mesh, axis="data")
      >>> [tuple(s.spec) for s in jax.tree.leaves(shardings)]  # the count, then m and v
      [(), ('data', None), ('data', None)]
      >>> state = jax.jit(opt.init, out_shardings=shardings)(params)
      >>> adam_jax.bytes_per_device(state)  # one device: 2 moments * 8 floats * 4 B + the count
      68
    """
    if axis not in mesh.axis_names:
        raise ValueError(
            f"axis {axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}"
        )
    size = mesh.shape[axis]
    shapes = jax.eval_shape(optimizer.init, params)
    return jax.tree.map(lambda s: NamedSharding(mesh, zero1_spec(s.shape, size, axis)), shapes)


def bytes_per_device(tree: Any, shardings: Any = None) -> int:
    """Bytes that one device stores for ``tree``: each leaf's shard size, summed.

    A leaf's shard is ``sharding.shard_shape(leaf.shape)``: the whole leaf when it
    is replicated or has no sharding (a NumPy array), ``1/n`` of it when one
    dimension is split ``n`` ways. With shardings that split every leaf evenly,
    every device holds the same number of bytes.

    Args:
      tree: a pytree of ``jax.Array``, ``jax.ShapeDtypeStruct`` or NumPy arrays.
      shardings: optional pytree of ``jax.sharding.Sharding`` with the structure
        of ``tree``; it replaces the leaves' own shardings, so the cost of a
        layout can be read off ``jax.eval_shape`` output before allocating it.

    Returns:
      The number of bytes, an ``int``.

    Example:
      >>> import numpy as np
      >>> from adam_jax import bytes_per_device
      >>> bytes_per_device({"w": np.zeros((4, 3), np.float32), "step": np.int32(0)})
      52
    """
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        shards = [getattr(x, "sharding", None) for x in leaves]
    else:
        shards = jax.tree.structure(tree).flatten_up_to(shardings)
    total = 0
    for x, sharding in zip(leaves, shards, strict=True):
        shape = tuple(np.shape(x))
        local = shape if sharding is None else sharding.shard_shape(shape)
        total += math.prod(local) * np.dtype(x.dtype).itemsize
    return total
