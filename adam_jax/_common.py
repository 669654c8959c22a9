"""Mechanics shared by every optimizer: hyperparameter checks, the step count,
bias correction, moment updates, dtypes and tree checks.

Each optimizer module (``_adam.py``, ``_amsgrad.py``, ``_adamax.py``) writes only
its own per-leaf arithmetic and calls into this module for the rest.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# --------------------------------------------------------------------------
# Hyperparameter checks. Only concrete values are checked: a traced value
# (inside jit/vmap/grad) is passed through untouched, never branched on.
# --------------------------------------------------------------------------


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _concrete_values(name: str, value: Any) -> np.ndarray | None:
    """The value as a float64 NumPy array, or None when it cannot be inspected."""
    if _is_traced(value) or value is None or callable(value):
        return None
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a real number, got the bool {value!r}")
    if isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Real):
        return np.asarray(float(value))
    try:
        arr = np.asarray(value)
    except Exception as e:  # e.g. a jax array that is being sharded lazily
        raise TypeError(f"{name} must be a real number or array, got {value!r}") from e
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{name} must be a real number or array, got {value!r}")
    return arr.astype(np.float64)


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    high_open: bool = True,
) -> None:
    """Raise ``ValueError`` if a concrete ``value`` lies outside ``[low, high)``.

    With ``high_open=False`` the interval is ``[low, high]``. NaN is always out of
    range. Traced values are not checked.
    """
    arr = _concrete_values(name, value)
    if arr is None:
        return
    upper_ok = arr < high if high_open else arr <= high
    ok = np.all((arr >= low) & upper_ok)
    if not ok:
        bracket = ")" if high_open else "]"
        hi = "inf" if math.isinf(high) else repr(high)
        raise ValueError(f"{name} must be in [{low!r}, {hi}{bracket}, got {name}={_show(value)}")


def check_non_negative(name: str, value: Any) -> None:
    check_interval(name, value, 0.0)


def check_decay(name: str, value: Any) -> None:
    """A decay rate (``b1``, ``b2``) must lie in ``[0, 1)``."""
    check_interval(name, value, 0.0, 1.0)


def check_learning_rate(learning_rate: Any) -> None:
    """A learning rate is a non-negative number or array, or an optax schedule."""
    if callable(learning_rate):
        return
    check_non_negative("learning_rate", learning_rate)


def check_scalar(name: str, value: Any) -> None:
    """A scalar hyperparameter (or None) must have shape (); shapes are static, so
    tracers are checked too."""
    if value is not None and jnp.ndim(value) != 0:
        raise ValueError(
            f"{name} must be a scalar (vmap over it for one value per problem), "
            f"got an array of shape {jnp.shape(value)}"
        )


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)!r}, got {name}={value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")


def _show(value: Any) -> str:
    if isinstance(value, numbers.Real):
        return repr(value)
    arr = np.asarray(value)
    if arr.ndim == 0:
        return repr(arr.item())
    return np.array2string(arr, threshold=8)


# --------------------------------------------------------------------------
# Dtypes.
# --------------------------------------------------------------------------


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the arithmetic runs in: at least float32.

    bfloat16 and float16 leaves are updated in float32 and stored back in their
    own dtype. Among other things this keeps ``eps=1e-8`` from underflowing to 0
    in float16, which turns a zero gradient into 0/0 = NaN (optax #1754).
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"adam_jax optimizers need floating-point or complex params and grads, "
            f"got dtype {dtype}: Adam on integer params is meaningless"
        )
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
    """float32 for complex64, float64 for complex128, the dtype itself otherwise."""
    return jnp.finfo(jnp.dtype(dtype)).dtype


def canonical_dtype(dtype: Any) -> jnp.dtype | None:
    return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def _check_leaf_dtype(x: jax.Array) -> None:
    compute_dtype(x.dtype)


def zeros_like(params: Any, dtype: Any | None, *, real: bool = False) -> Any:
    """Zeros shaped like ``params``; in ``dtype`` or else the leaf's own dtype.

    With ``real=True`` a complex leaf gets the matching real dtype: second
    moments of complex numbers (|g|²) are real.
    """

    def leaf(p):
        _check_leaf_dtype(p)
        dt = dtype if dtype is not None else p.dtype
        if real:
            dt = real_dtype(dt)
        if isinstance(p, jax.core.Tracer):
            # Under jit on a mesh with Auto axes a tracer carries no sharding, and
            # zeros that do not depend on p would land on one device. Zeros computed
            # from p inherit p's sharding through data flow.
            zero = jnp.zeros((), dt)
            return jnp.where(jnp.isnan(p), zero, zero)
        return jnp.zeros_like(p, dtype=dt)

    return jax.tree.map(leaf, params)


# --------------------------------------------------------------------------
# Step count and bias correction.
# --------------------------------------------------------------------------


def init_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum instead of wrapping."""
    return optax.safe_increment(count)


def correction(decay: tuple[jax.Array, jax.Array], count: jax.Array) -> jax.Array:
    """The bias correction ``1 - decay**count`` for a :func:`decay_pair`.

    Computed as ``-expm1(count·log1p(-(1-decay)))`` from ``1 - decay`` (formed in
    the hyperparameter's own precision), in the leaf's precision. In float32 this
    is accurate to about an ulp, where the literal ``1 - decay**count`` loses five
    digits for ``decay=0.999`` (``f32(0.999)`` is off by 1.3e-5 relative in
    ``1 - 0.999``): optax's float32 Adam step 1 is ``0.9999934·sign(g)`` instead of
    ``sign(g)``. torch forms the corrections in double on the host; this matches
    it to float32 rounding. float64 runs are float64 throughout.
    """
    d, one_minus_d = decay
    return -jnp.expm1(count.astype(d.dtype) * jnp.log1p(-one_minus_d))


def decay_pair(decay: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(decay, 1 - decay)`` in ``dtype``, with ``1 - decay`` formed in the
    hyperparameter's own precision (double for a Python float), as optax and
    torch do. Forming it after the cast would change float32 results by an ulp.
    """
    if isinstance(decay, numbers.Real):
        return jnp.asarray(decay, dtype), jnp.asarray(1.0 - float(decay), dtype)
    decay = jnp.asarray(decay)
    return decay.astype(dtype), (1 - decay).astype(dtype)


# --------------------------------------------------------------------------
# Moments.
# --------------------------------------------------------------------------


def abs_sq(g: jax.Array) -> jax.Array:
    """``|g|² = conj(g)·g``, real for complex ``g``."""
    if jnp.iscomplexobj(g):
        return jnp.real(g) ** 2 + jnp.imag(g) ** 2
    return g * g


def ema(g: jax.Array, moment: jax.Array, decay: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``decay·moment + (1-decay)·g`` in the order optax uses, for bit-parity.

    ``decay`` is the pair from :func:`decay_pair`.
    """
    d, one_minus_d = decay
    return one_minus_d * g + d * moment


# --------------------------------------------------------------------------
# Trees.
# --------------------------------------------------------------------------


def check_same_tree(
    tree: Any, reference: Any, *, what: str = "grads", reference_name: str = "the state"
) -> None:
    """Raise ``ValueError`` naming the missing and extra keys when trees differ."""
    t_tree = jax.tree.structure(tree)
    t_ref = jax.tree.structure(reference)
    if t_tree == t_ref:
        return

    def paths(t):
        return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}

    missing = sorted(paths(reference) - paths(tree))
    extra = sorted(paths(tree) - paths(reference))
    parts = [f"the {what} tree does not match {reference_name} (built by init)."]
    if missing:
        parts.append(f"Missing from {what}: {', '.join(missing)}.")
    if extra:
        parts.append(f"Not in {reference_name}: {', '.join(extra)}.")
    if not missing and not extra:
        parts.append(f"Same keys, different structure: {what} has {t_tree}, init had {t_ref}.")
    raise ValueError(" ".join(parts))


def check_leaf_shapes(
    tree: Any, reference: Any, *, what: str = "grads", reference_name: str = "the state"
) -> None:
    """Raise ``ValueError`` naming the first leaf whose shape differs."""
    for (path, x), r in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(reference), strict=True
    ):
        if jnp.shape(x) != jnp.shape(r):
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has shape {jnp.shape(x)}, but "
                f"{reference_name} was built for shape {jnp.shape(r)}"
            )


def map_leaves(
    fn: Callable[..., tuple[jax.Array, ...]], n_out: int, *trees: Any
) -> tuple[Any, ...]:
    """``jax.tree.map`` for a leaf function returning ``n_out`` arrays.

    Returns ``n_out`` trees with the structure of ``trees[0]``.
    """
    treedef = jax.tree.structure(trees[0])
    leaves = [treedef.flatten_up_to(t) for t in trees]
    outs = [fn(*args) for args in zip(*leaves, strict=True)]
    return tuple(
        treedef.unflatten([o[i] for o in outs]) if outs else treedef.unflatten([])
        for i in range(n_out)
    )


def prepare_update(grads: Any, state_m: Any) -> None:
    """The checks every ``update`` runs at trace time (never on values)."""
    check_same_tree(grads, state_m)
    check_leaf_shapes(grads, state_m)
    for g in jax.tree.leaves(grads):
        _check_leaf_dtype(g)


class Moments(NamedTuple):
    """One leaf's Adam moments after a step, in compute precision."""

    g: jax.Array  # the gradient, in the compute dtype
    m: jax.Array  # new first moment
    v: jax.Array  # new second moment (real)
    m_hat: jax.Array  # bias-corrected (or Nesterov) first moment
    c2: jax.Array | None  # 1 - b2**t, or None without bias correction
    dtype: Any  # the real compute dtype


def adam_moments(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    b1: Any,
    b2: Any,
    count: jax.Array,
    *,
    bias_correction: bool,
    nesterov: bool = False,
) -> Moments:
    """Adam's moment updates for one leaf, shared by Adam and AMSGrad.

    ``m = b1·m + (1-b1)·g``, ``v = b2·v + (1-b2)·|g|²``, ``m̂ = m/(1-b1^t)``; with
    ``nesterov``, ``m̂ = b1·m/(1-b1^(t+1)) + (1-b1)·g/(1-b1^t)`` (optax.nadam).
    """
    cdt = compute_dtype(g.dtype)
    rdt = real_dtype(cdt)
    b1_, b2_ = decay_pair(b1, rdt), decay_pair(b2, rdt)
    g = g.astype(cdt)
    m_new = ema(g, m.astype(cdt), b1_)
    v_new = ema(abs_sq(g), v.astype(rdt), b2_)
    if not bias_correction:
        m_hat = b1_[0] * m_new + b1_[1] * g if nesterov else m_new
        return Moments(g, m_new, v_new, m_hat, None, rdt)
    c1 = correction(b1_, count)
    if nesterov:
        c1_next = correction(b1_, increment(count))
        m_hat = b1_[0] * (m_new / c1_next) + b1_[1] * (g / c1)
    else:
        m_hat = m_new / c1
    return Moments(g, m_new, v_new, m_hat, correction(b2_, count), rdt)


def adam_direction(
    m_hat: jax.Array,
    s: jax.Array,
    c2: jax.Array | None,
    eps: jax.Array,
    eps_root: jax.Array,
    *,
    eps_hat: bool,
    s_is_corrected: bool = False,
) -> jax.Array:
    """The Adam ratio ``m̂ / denominator`` for a second moment ``s``.

    ``c2 = 1 - b2**t`` (``None`` when bias correction is off). ``s`` is the raw
    second moment, or the already-corrected one when ``s_is_corrected``.

    * ``eps_hat=False`` (Kingma & Ba, PyTorch, optax): ``m̂ / (sqrt(ŝ + eps_root) + eps)``
      with ``ŝ = s / c2``.
    * ``eps_hat=True`` (Keras/TensorFlow): ``m̂·sqrt(c2) / (sqrt(s + eps_root) + eps)``:
      eps is added before the bias correction of ``s``.
    """
    if c2 is None:
        return m_hat / (jnp.sqrt(s + eps_root) + eps)
    if eps_hat:
        s_raw = s * c2 if s_is_corrected else s
        return m_hat * jnp.sqrt(c2) / (jnp.sqrt(s_raw + eps_root) + eps)
    s_hat = s if s_is_corrected else s / c2
    return m_hat / (jnp.sqrt(s_hat + eps_root) + eps)
