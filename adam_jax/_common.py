"""Numerical mechanics shared by every optimizer: the step count, bias
correction, moment updates and overflow-safe division.

Each optimizer module (``_adam.py``, ``_amsgrad.py``, ``_adamax.py``) writes only
its own per-leaf arithmetic and calls into this module for the rest; dtypes live
in ``_dtypes.py``, argument checks in ``_checks.py``.

Scalars that depend only on the hyperparameters, the step count and the dtype
(decay casts, bias corrections, eps casts) are built once per update for every
compute dtype among the leaves (:func:`by_dtype`), not once per leaf: a many-leaf
update then stages, traces and compiles little more than its per-leaf arithmetic.
Hyperparameters that are not traced (Python numbers, concrete arrays) are cast on
the host, and what they decide is decided there: no clamp for a nonzero decay, no
``+ eps_root`` for ``eps_root=0``. Traced ones (vmapped, or passed into ``jit``)
keep those operations, with the same results.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeAlias, TypeVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from adam_jax import _checks, _dtypes

T = TypeVar("T")
# A scalar in a compute dtype: an array on the host (NumPy) or in the program (JAX).
Scalar: TypeAlias = jax.Array | np.ndarray


def init_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum instead of wrapping."""
    new: jax.Array = optax.safe_increment(count)
    return new


class Decay(NamedTuple):
    """A decay rate ``d`` with ``1 - d``, both pytree leaves: how an optimizer stores it.

    :func:`decay_leaves` forms ``1 - d`` in the hyperparameter's own precision
    (double for a Python float), as optax and torch do; forming it after a cast
    to float32 would move float32 results by an ulp. Kept as a leaf, it is the
    same number whether the optimizer is traced or not. :func:`decay_pair` casts it
    for one compute dtype.
    """

    d: chex.Numeric
    one_minus_d: chex.Numeric


class DecayPair(NamedTuple):
    """A :class:`Decay` in one real compute dtype, with the bounds ``(-c, c)`` that
    :func:`decayed` clamps the decayed value to: ``c`` is the dtype's maximum where
    ``d`` is 0 and inf elsewhere."""

    d: Scalar
    one_minus_d: Scalar
    cap: tuple[Scalar, Scalar]


def decay_leaves(decay: ArrayLike | Decay) -> Decay:
    """``(decay, 1 - decay)``, the form in which an optimizer stores a decay rate."""
    if isinstance(decay, Decay):
        return decay
    if isinstance(decay, numbers.Real) and not isinstance(decay, bool):
        return Decay(decay, 1.0 - float(decay))
    decay = jnp.asarray(decay)
    return Decay(decay, 1 - decay)


def decay_pair(decay: ArrayLike | Decay, dtype: DTypeLike) -> DecayPair:
    """``(decay, 1 - decay)`` as arrays in ``dtype`` (see :func:`decay_leaves`), and
    the ``cap`` that :func:`decayed` clamps the decayed value to.

    A concrete (not traced) decay is cast on the host and its ``cap`` resolved here:
    for ``d != 0`` it is ``(-inf, inf)``, which :func:`decayed` recognises on the host
    and leaves out of the program, so a many-leaf update stages no more than its
    arithmetic.
    """
    d, one_minus_d = decay_leaves(decay)
    d_, om = scalar(d, dtype), scalar(one_minus_d, dtype)
    if isinstance(d_, np.ndarray) and isinstance(om, np.ndarray):
        rdt = _dtypes.real_dtype(dtype)
        big = np.asarray(np.inf if d_ != 0 else np.finfo(rdt).max, rdt)
        return DecayPair(d_, om, (-big, big))
    return traced_pair(d_, om)


def traced_pair(d: Scalar, one_minus_d: Scalar) -> DecayPair:
    """A :class:`DecayPair` for a decay known only at run time."""
    d = jnp.asarray(d)
    cap = jnp.where(d == 0, _dtypes.finfo(d.dtype).max, jnp.inf).astype(d.dtype)
    return DecayPair(d, one_minus_d, (-cap, cap))


def correction(decay: DecayPair, count: jax.Array) -> jax.Array:
    """The bias correction ``1 - d**count`` for a :func:`decay_pair`, a scalar.

    Computed as ``-expm1(count·log1p(-(1-d)))`` from ``1 - d`` (formed in the
    hyperparameter's own precision), in the pair's precision. In float32 this is
    accurate to about an ulp, where the literal ``1 - d**count`` loses five digits
    for ``d=0.999`` (``f32(0.999)`` is off by 1.3e-5 relative in ``1 - 0.999``):
    optax's float32 Adam step 1 is ``0.9999934·sign(g)`` instead of ``sign(g)``.
    torch forms the corrections in double on the host; this matches it to float32
    rounding. float64 runs are float64 throughout.

    For ``d < 0.5`` the literal ``1 - d**count`` is already accurate and is used:
    its derivative with respect to ``d`` is right down to ``d = 0``, where the
    logarithm is singular. log1p is only used where ``1 - d < 0.25``: XLA:CPU's
    float64 log1p loses ~8 bits on [-0.41, -0.35], where ``log(d)`` is exact enough.
    """
    d, one_minus_d = decay.d, decay.one_minus_d
    t = count.astype(jnp.result_type(d))
    small = d < 0.5
    direct = 1 - jnp.where(small, d, 0.25) ** t
    # Safe inputs in the branch not taken keep it and its gradient finite.
    om = jnp.where(small, 0.25, one_minus_d)
    log_d = jnp.where(om < 0.25, jnp.log1p(-om), jnp.log(jnp.where(small, 0.75, d)))
    return jnp.where(small, direct, -jnp.expm1(t * log_d))


def abs_sq(g: jax.Array) -> jax.Array:
    """``|g|² = conj(g)·g``, real for complex ``g``."""
    if jnp.iscomplexobj(g):
        return jnp.real(g) ** 2 + jnp.imag(g) ** 2
    return lax.mul(g, g)


def scale(c: ArrayLike, x: jax.Array) -> jax.Array:
    """``c·x`` for a real scalar ``c`` in ``x``'s (real) compute dtype.

    The per-leaf arithmetic binds lax primitives directly (here and in
    :func:`ema`, :func:`decayed`, :func:`adam_direction`): a jnp operator traces
    through a jitted wrapper, which made tracing a many-leaf update several times
    slower. The staged program is the same. jnp's promotion (a real scalar times
    a complex ``x``) is kept where dtypes differ.
    """
    if x.dtype == getattr(c, "dtype", None):
        return lax.mul(c, x)
    return jnp.multiply(c, x)


def ema(
    g: jax.Array, moment: jax.Array, decay: DecayPair, *, nonnegative: bool = False
) -> jax.Array:
    """``decay·moment + (1-decay)·g`` in the order optax uses, for bit-parity.
    ``nonnegative``: the moment is never negative (a second moment)."""
    m = decayed(decay, moment, nonnegative=nonnegative)
    g_term = scale(decay.one_minus_d, g)
    return lax.add(g_term, m) if g_term.dtype == m.dtype else g_term + m


def decayed(decay: DecayPair, x: jax.Array, *, nonnegative: bool = False) -> jax.Array:
    """``d·x``, but 0 when ``d`` is 0 even if ``x`` is inf.

    Once |g|² overflows (|g| > 1.8e19 in float32) ``v`` is inf, as in torch and
    optax, and every later update of that element is 0. With ``b2 = 0`` there is
    no memory, so the next step must not see ``0·inf = NaN``. ``x`` is clamped to
    ``decay.cap``: one operation per leaf, which leaves ``x`` (and its derivative)
    as it is wherever it matters. A cap known on the host to be infinite (a
    nonzero decay) needs no clamp at all.
    """
    d, (low, high) = decay.d, decay.cap
    if isinstance(high, np.ndarray) and np.isposinf(high):
        return scale(d, x)
    if jnp.iscomplexobj(x) or jnp.result_type(high) != x.dtype:
        return jnp.multiply(d, jnp.where((d == 0) & jnp.isinf(x), jnp.zeros((), x.dtype), x))
    if nonnegative:  # a second moment or an infinity norm: one bound is enough
        return lax.mul(d, lax.min(x, high))
    return lax.mul(d, lax.clamp(low, x, high))


def map_leaves(
    fn: Callable[..., tuple[jax.Array, ...]], n_out: int, *trees: optax.Updates
) -> tuple[optax.Updates, ...]:
    """``jax.tree.map`` for a leaf function returning ``n_out`` arrays.

    Returns ``n_out`` trees with the structure of ``trees[0]``.
    """
    treedef: Any = jax.tree.structure(trees[0])
    leaves = [treedef.flatten_up_to(t) for t in trees]
    outs = [fn(*args) for args in zip(*leaves, strict=True)]
    return tuple(treedef.unflatten([o[i] for o in outs]) for i in range(n_out))


def by_dtype(updates: optax.Updates, make: Callable[[np.dtype], T]) -> dict[np.dtype, T]:
    """``make(dtype)`` once for each real compute dtype among the leaves of ``updates``
    (look one up with :func:`dtypes_of`)."""
    dtypes: Iterable[np.dtype] = {_dtypes.dtypes_of(x)[1] for x in jax.tree.leaves(updates)}
    return {dt: make(dt) for dt in dtypes}


class Moments(NamedTuple):
    """The hyperparameters of Adam's two moments and its denominator, in one real
    compute dtype; ``eps_root`` is None where it is known on the host to be 0."""

    b1: DecayPair
    b2: DecayPair
    eps: Scalar
    eps_root: Scalar | None


def moments(
    dtype: np.dtype, b1: Decay, b2: Decay, eps: chex.Numeric, eps_root: chex.Numeric | None = None
) -> Moments:
    """Cast the hyperparameters to ``dtype``."""
    root = None if eps_root is None else scalar(eps_root, dtype)
    if isinstance(root, np.ndarray) and root == 0:
        # s + 0 is s for every s >= +0, NaN and inf: the update is unchanged.
        root = None
    return Moments(decay_pair(b1, dtype), decay_pair(b2, dtype), scalar(eps, dtype), root)


class AdamHyperparams(NamedTuple):
    """The leaves of Adam's moments (of ``scale_by_adam`` and ``scale_by_amsgrad``)."""

    b1: Decay
    b2: Decay
    eps: chex.Numeric
    eps_root: chex.Numeric


def adam_hyperparams(
    b1: ArrayLike, b2: ArrayLike, eps: ArrayLike, eps_root: ArrayLike
) -> AdamHyperparams:
    """Check concrete values and store the decays as ``(b, 1 - b)`` leaves."""
    _checks.check_decay("b1", b1)
    _checks.check_decay("b2", b2)
    _checks.check_non_negative("eps", eps)
    _checks.check_non_negative("eps_root", eps_root)
    return AdamHyperparams(decay_leaves(b1), decay_leaves(b2), eps, eps_root)


def check_traced(hp: AdamHyperparams) -> None:
    """Range-check traced hyperparameters, under ``checkify`` only."""
    _checks.traced_interval("b1", hp.b1.d, 0.0, 1.0)
    _checks.traced_interval("b2", hp.b2.d, 0.0, 1.0)
    _checks.traced_interval("eps", hp.eps, 0.0)
    _checks.traced_interval("eps_root", hp.eps_root, 0.0)


# Leaves are multiplied by the reciprocals of the bias corrections rather than
# divided by them: XLA rewrites x / scalar as x * (1/scalar) in some programs and
# not in others (eager, vmapped, constant-folded), and an optimizer must give the
# same numbers in each.
def reciprocal(c: jax.Array) -> jax.Array:
    """``1/c`` for a bias correction ``c``, formed once per step."""
    return 1 / c


class Direction(NamedTuple):
    """The constants of :func:`adam_direction` in one real compute dtype: ``u = outer·m /
    (sqrt(inner·s + eps_root) + eps)``. A factor None is 1 and stages nothing."""

    eps: ArrayLike
    eps_root: ArrayLike | None = None
    inner: ArrayLike | None = None  # e.g. 1/(1-b2^t): the second moment's correction
    outer: ArrayLike | None = None  # e.g. 1/(1-b1^t) or sqrt(1-b2^t)/(1-b1^t)


def scalar(x: ArrayLike, dtype: DTypeLike) -> Scalar:
    """A hyperparameter in ``dtype``; cast on the host when it is not traced."""
    if _checks.is_traced(x):
        return jnp.asarray(x).astype(dtype)
    return np.asarray(x).astype(dtype)


def nesterov_first_moment(
    g: jax.Array,
    m_new: jax.Array,
    b1: DecayPair,
    corrections: tuple[ArrayLike, ArrayLike] | None,
) -> jax.Array:
    """``m̂ = b1·m·r1_next + (1-b1)·g·r1`` for the new ``m``, with the reciprocal
    corrections ``(r1, r1_next) = (1/(1-b1^t), 1/(1-b1^(t+1)))`` (optax.nadam);
    ``corrections=None``: ``b1·m + (1-b1)·g``."""
    if corrections is None:
        return jnp.multiply(b1.d, m_new) + jnp.multiply(b1.one_minus_d, g)
    r1, r1_next = corrections
    # Each term is kept finite before it is scaled: for complex values jnp
    # multiplies by the real b1 as by b1+0j, and 0·inf would be NaN.
    m_term = no_overflow(m_new * r1_next, m_new)
    g_term = no_overflow(g * r1, g)
    m_hat = jnp.multiply(b1.d, m_term) + jnp.multiply(b1.one_minus_d, g_term)
    return no_overflow(m_hat, m_new, g)


def no_overflow(x: jax.Array, *sources: jax.Array) -> jax.Array:
    """``x``, with ±inf replaced by ±max where every one of ``sources`` is finite.

    ``m/(1-b1^t)`` is at most ``max|g|`` in exact arithmetic, but at gradients
    near the dtype's maximum rounding can push it to inf, and then the update
    would be inf/inf = NaN for a finite gradient. Infinite or NaN gradients
    still propagate, as in torch and optax.
    """
    if jnp.iscomplexobj(x):
        re = no_overflow(jnp.real(x), *(jnp.real(s) for s in sources))
        im = no_overflow(jnp.imag(x), *(jnp.imag(s) for s in sources))
        return jax.lax.complex(re, im)
    finite = jnp.isfinite(sources[0])
    for s in sources[1:]:
        finite = finite & jnp.isfinite(s)
    # clamp leaves every finite x as it is (derivative 1), so selecting it where
    # the sources are finite replaces exactly the overflowed values, in fewer
    # staged operations than testing x for inf.
    big = float(_dtypes.finfo(x.dtype).max)
    clamped = jax.lax.clamp(jnp.asarray(-big, x.dtype), x, jnp.asarray(big, x.dtype))
    return jax.lax.select(finite, clamped, x)


def store(x: jax.Array, like: jax.Array) -> jax.Array:
    """A first moment cast to ``like``'s dtype, saturating rather than overflowing.

    A narrower ``mu_dtype`` (bfloat16 for float32 params, say) would turn a finite
    ``m`` above its maximum into inf, and the next update into inf/inf = NaN.
    Non-finite values are stored as they are. Second moments are cast plainly: an
    overflowed ``v`` is inf, which makes the update 0, as in torch and optax.
    """
    dtype = jnp.dtype(like.dtype)
    if not _narrower(dtype, jnp.dtype(x.dtype)):
        return _dtypes.cast(x, dtype)
    return no_overflow(x.astype(dtype), x)


@functools.cache
def _narrower(dtype: np.dtype, than: np.dtype) -> bool:
    return bool(_dtypes.finfo(dtype).max < _dtypes.finfo(than).max)


def adam_direction(m: jax.Array, s: jax.Array, k: Direction) -> jax.Array:
    """The Adam ratio ``u = outer·m / (sqrt(inner·s + eps_root) + eps)`` for a first
    moment ``m`` and a second moment ``s``, with the factors of ``k``.

    The caller passes the corrections its form applies (None where none):

    * Kingma & Ba, PyTorch, optax: ``inner = 1/(1-b2^t)``, ``outer = 1/(1-b1^t)``,
      that is ``m̂ / (sqrt(ŝ + eps_root) + eps)``;
    * Keras/TensorFlow (eps added before the bias correction of ``s``):
      ``inner = 1``, ``outer = sqrt(1-b2^t)/(1-b1^t)``;
    * a first moment already corrected (Nesterov forms): ``outer`` without ``1/(1-b1^t)``.

    The first-moment correction is applied last, as torch applies ``lr/(1-b1^t)``:
    ``(m / denominator)·outer``. The ratio is bounded (``|m| <= max|g|`` and the
    denominator grows with ``|g|``), so scaling it by ``1/(1-b1^t) <= 1/(1-b1)`` cannot
    overflow where ``m/(1-b1^t)`` could for gradients near the dtype's maximum, and an
    overflowed ``v`` (inf) gives a zero step rather than ``inf/inf = NaN``.
    """
    s_ = s if k.inner is None else lax.mul(s, k.inner)
    ratio = divide(m, _denominator(s_, k.eps_root, k.eps))
    return ratio if k.outer is None else scale(k.outer, ratio)


def _denominator(s: jax.Array, eps_root: ArrayLike | None, eps: ArrayLike) -> jax.Array:
    """``sqrt(s + eps_root) + eps``, for a real ``s`` in the scalars' dtype."""
    root = lax.sqrt(s if eps_root is None else lax.add(s, eps_root))
    return lax.add(root, eps)


def divide(x: jax.Array, den: jax.Array) -> jax.Array:
    """``x / den`` for a real ``den``; a complex ``x`` is divided part by part.

    jnp would promote ``den`` to complex and use complex division, for which a
    denominator of inf gives NaN instead of 0.
    """
    if jnp.iscomplexobj(x):
        return jax.lax.complex(jnp.real(x) / den, jnp.imag(x) / den)
    return lax.div(x, den)
