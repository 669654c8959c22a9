"""Dtypes: the compute dtype of a leaf, casts, and zeros shaped like the params."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _checks

# jnp.finfo (which knows bfloat16, unlike np.finfo) with the type its stubs lack.
finfo: Callable[[DTypeLike], Any] = jnp.finfo


def compute_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype the arithmetic runs in: at least float32.

    bfloat16 and float16 leaves are updated in float32 and stored back in their
    own dtype. Among other things this keeps ``eps=1e-8`` from underflowing to 0
    in float16, which turns a zero gradient into 0/0 = NaN (optax #1754).
    """
    dtype = jnp.promote_types(_checks.check_inexact(dtype), jnp.float32)
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def real_dtype(dtype: DTypeLike) -> np.dtype:
    """float32 for complex64, float64 for complex128, the dtype itself otherwise."""
    real: np.dtype = np.dtype(finfo(jnp.dtype(dtype)).dtype)
    return real


def zeros_like(
    params: optax.Params,
    dtype: DTypeLike | None,
    *,
    real: bool = False,
    squares: bool = False,
    dtype_name: str = "mu_dtype",
) -> optax.Params:
    """Zeros shaped like ``params``; in ``dtype`` or else the leaf's own dtype.

    With ``real=True`` a complex leaf gets the matching real dtype (|g|² and |g|
    are real). With ``squares=True`` (a second moment) a float16 leaf defaults
    to float32: ``(1-b2)·g²`` underflows float16 for ``|g| ≲ 8e-3``, which would
    make ``v`` 0 and the steps ~30× too large. NumPy leaves get their canonical
    JAX dtype (float32 for float64 while x64 is off), as in optax.
    """
    for where, p in _checks.leaves_with_paths(params, "params"):
        _checks.check_leaf(p, where)
        if dtype is not None and not real and jnp.iscomplexobj(p):
            if not jnp.issubdtype(dtype, jnp.complexfloating):
                raise TypeError(
                    f"{dtype_name}={jnp.dtype(dtype).name} is real, but {where} is "
                    f"{jnp.dtype(p.dtype).name}: the moment would lose the imaginary part"
                )

    def leaf(p: jax.Array) -> jax.Array:
        dt = jax.dtypes.canonicalize_dtype(p.dtype if dtype is None else dtype)
        if real:
            dt = real_dtype(dt)
        if squares and dtype is None and dt == jnp.float16:
            dt = np.dtype(jnp.float32)
        if isinstance(p, jax.core.Tracer):
            # Under jit on a mesh with Auto axes a tracer carries no sharding, and
            # zeros that do not depend on p would land on one device. Zeros computed
            # from p inherit p's sharding through data flow.
            zero = jnp.zeros((), dt)
            return jnp.where(jnp.isnan(p), zero, zero)
        return jnp.zeros_like(p, dtype=dt)

    return jax.tree.map(leaf, params)


def dtypes_of(g: ArrayLike) -> tuple[np.dtype, np.dtype]:
    """The compute dtype of a gradient leaf and its real counterpart."""
    return _dtypes(np.dtype(jnp.result_type(g)))


@functools.cache
def _dtypes(dtype: np.dtype) -> tuple[np.dtype, np.dtype]:
    cdt = compute_dtype(dtype)
    return cdt, real_dtype(cdt)


def cast(x: ArrayLike, dtype: DTypeLike) -> jax.Array:
    """``x.astype(dtype)``, staging nothing when ``x`` already has that dtype."""
    x, dtype = jnp.asarray(x), jax.dtypes.canonicalize_dtype(dtype)
    return x if x.dtype == dtype else x.astype(dtype)
