"""Numerical mechanics shared by every optimizer: dtypes, the step count, bias
correction, moment updates and overflow-safe division.

Each optimizer module (``_adam.py``, ``_amsgrad.py``, ``_adamax.py``) writes only
its own per-leaf arithmetic and calls into this module for the rest; argument
checks live in ``_checks.py``.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax import _checks


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the arithmetic runs in: at least float32.

    bfloat16 and float16 leaves are updated in float32 and stored back in their
    own dtype. Among other things this keeps ``eps=1e-8`` from underflowing to 0
    in float16, which turns a zero gradient into 0/0 = NaN (optax #1754).
    """
    dtype = _checks.check_inexact(dtype)
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
    """float32 for complex64, float64 for complex128, the dtype itself otherwise."""
    return jnp.finfo(jnp.dtype(dtype)).dtype


def zeros_like(
    params: Any,
    dtype: Any | None,
    *,
    real: bool = False,
    squares: bool = False,
    dtype_name: str = "mu_dtype",
) -> Any:
    """Zeros shaped like ``params``; in ``dtype`` or else the leaf's own dtype.

    With ``real=True`` a complex leaf gets the matching real dtype (|g|² and |g|
    are real). With ``squares=True`` (a second moment) a float16 leaf defaults
    to float32: ``(1-b2)·g²`` underflows float16 for ``|g| ≲ 8e-3``, which would
    make ``v`` 0 and the steps ~30× too large.
    """
    for where, p in _checks.leaves_with_paths(params, "params"):
        _checks.check_leaf(p, where)
        if dtype is not None and not real and jnp.iscomplexobj(p):
            if not jnp.issubdtype(dtype, jnp.complexfloating):
                raise TypeError(
                    f"{dtype_name}={jnp.dtype(dtype).name} is real, but {where} is "
                    f"{jnp.dtype(p.dtype).name}: the moment would lose the imaginary part"
                )

    def leaf(p):
        dt = dtype if dtype is not None else p.dtype
        if real:
            dt = real_dtype(dt)
        if squares and dtype is None and dt == jnp.float16:
            dt = jnp.dtype(jnp.float32)
        if isinstance(p, jax.core.Tracer):
            # Under jit on a mesh with Auto axes a tracer carries no sharding, and
            # zeros that do not depend on p would land on one device. Zeros computed
            # from p inherit p's sharding through data flow.
            zero = jnp.zeros((), dt)
            return jnp.where(jnp.isnan(p), zero, zero)
        return jnp.zeros_like(p, dtype=dt)

    return jax.tree.map(leaf, params)


def init_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum instead of wrapping."""
    return optax.safe_increment(count)


class Decay(NamedTuple):
    """A decay rate ``d`` and ``1 - d`` in the compute dtype (see :func:`decay_pair`)."""

    d: jax.Array
    one_minus_d: jax.Array
    # For a hyperparameter given as a plain number: ``d`` and ``1 - d`` as Python
    # floats, exactly as cast to the compute dtype (else None). The guards that
    # only matter for some decays (d = 0, d < 0.5, 1 - d < 0.25) are then settled
    # while tracing, on the same values the array comparisons would see: a
    # many-leaf update stages about a third as many operations, for the same results.
    # A decay that casts to a subnormal keeps the array comparisons, whose result
    # depends on whether XLA flushes subnormals to zero.
    static: tuple[float, float] | None = None


def correction(decay: Decay, count: jax.Array, exponent: jax.Array | None = None) -> jax.Array:
    """The bias correction ``1 - decay**count`` for a :func:`decay_pair`.

    Computed as ``-expm1(count·log1p(-(1-decay)))`` from ``1 - decay`` (formed in
    the hyperparameter's own precision), in the leaf's precision. In float32 this
    is accurate to about an ulp, where the literal ``1 - decay**count`` loses five
    digits for ``decay=0.999`` (``f32(0.999)`` is off by 1.3e-5 relative in
    ``1 - 0.999``): optax's float32 Adam step 1 is ``0.9999934·sign(g)`` instead of
    ``sign(g)``. torch forms the corrections in double on the host; this matches
    it to float32 rounding. float64 runs are float64 throughout.

    For ``decay < 0.5`` the literal ``1 - decay**count`` is already accurate, and
    it is used there: its derivative with respect to ``decay`` is right down to
    ``decay = 0``, where the logarithm is singular.
    """
    if exponent is None:
        exponent = correction_exponent(decay, count)
    # Only this step is repeated per leaf when the exponent is shared (see
    # :class:`Memo`): XLA:CPU rewrites ``x / broadcast(c)`` as ``x * broadcast(1/c)``
    # only for a scalar ``c`` with one user, so a ``c`` shared between leaves
    # would move jitted results by an ulp.
    d = decay.d
    if decay.static is not None:
        if decay.static[0] < 0.5:
            return 1 - d ** count.astype(d.dtype)
        return -jnp.expm1(exponent)
    small = d < 0.5
    direct = 1 - jnp.where(small, d, 0.25) ** count.astype(d.dtype)
    return jnp.where(small, direct, -jnp.expm1(exponent))


def correction_exponent(decay: Decay, count: jax.Array) -> jax.Array:
    """``count·log(decay)``: the part of :func:`correction` that leaves can share."""
    d, one_minus_d, static = decay
    t = count.astype(d.dtype)
    # log1p is only needed where 1-d is small; XLA:CPU's float64 log1p loses
    # ~8 bits on [-0.41, -0.35], where log(d) is exact enough.
    if static is not None:
        if static[0] < 0.5:
            return t  # unused by :func:`correction`
        if static[1] < 0.25:
            return t * jnp.log1p(-one_minus_d)
        return t * jnp.log(d)
    # Below 0.5 :func:`correction` does not use the exponent; safe inputs there
    # keep its (unused) branch and its gradient finite.
    large = d >= 0.5
    om = jnp.where(large, one_minus_d, 0.25)
    log_d = jnp.where(om < 0.25, jnp.log1p(-om), jnp.log(jnp.where(large, d, 0.75)))
    return t * log_d


def decay_pair(decay: Any, dtype: Any) -> Decay:
    """``(decay, 1 - decay)`` in ``dtype``, with ``1 - decay`` formed in the
    hyperparameter's own precision (double for a Python float), as optax and
    torch do. Forming it after the cast would change float32 results by an ulp.
    """
    if isinstance(decay, numbers.Real):
        value = float(decay)
        d, one_minus_d = np.asarray(value, dtype), np.asarray(1.0 - value, dtype)
        normal = d == 0 or abs(d) >= np.finfo(d.dtype).tiny
        static = (float(d), float(one_minus_d)) if normal else None
        return Decay(jnp.asarray(d), jnp.asarray(one_minus_d), static)
    decay = jnp.asarray(decay)
    return Decay(decay.astype(dtype), (1 - decay).astype(dtype))


def abs_sq(g: jax.Array) -> jax.Array:
    """``|g|² = conj(g)·g``, real for complex ``g``."""
    if jnp.iscomplexobj(g):
        return jnp.real(g) ** 2 + jnp.imag(g) ** 2
    return g * g


def ema(g: jax.Array, moment: jax.Array, decay: Decay) -> jax.Array:
    """``decay·moment + (1-decay)·g`` in the order optax uses, for bit-parity."""
    return decay.one_minus_d * g + decayed(decay, moment)


def decayed(decay: Decay, x: jax.Array) -> jax.Array:
    """``d·x``, but 0 when ``d`` is 0 even if ``x`` is inf.

    Once |g|² overflows (|g| > 1.8e19 in float32) ``v`` is inf, as in torch and
    optax, and every later update of that element is 0. With ``b2 = 0`` there is
    no memory, so the next step must not see ``0·inf = NaN``.
    """
    d = decay.d
    if decay.static is not None and decay.static[0] != 0:
        return d * x
    # Masking x (not the product) keeps the derivative in d, x, right at d = 0.
    return d * jnp.where((d == 0) & jnp.isinf(x), jnp.zeros((), x.dtype), x)


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


class Memo:
    """Scalars shared by every leaf of one ``update`` call, each built on first use.

    The decay pairs, the eps casts and most of each bias correction depend only on
    the hyperparameters, the step count and the dtype. Built again for every leaf
    they were most of the tracing work of a many-leaf update, and of XLA's work
    before its CSE pass merged the copies.
    """

    def __init__(self) -> None:
        self._values: dict[Any, Any] = {}

    def __call__(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._values:
            self._values[key] = make()
        return self._values[key]


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
    memo: Memo | None = None,
) -> Moments:
    """Adam's moment updates for one leaf, shared by Adam and AMSGrad.

    ``m = b1·m + (1-b1)·g``, ``v = b2·v + (1-b2)·|g|²``, ``m̂ = m/(1-b1^t)``; with
    ``nesterov``, ``m̂ = b1·m/(1-b1^(t+1)) + (1-b1)·g/(1-b1^t)`` (optax.nadam).
    """
    memo = Memo() if memo is None else memo
    cdt = compute_dtype(g.dtype)
    rdt = real_dtype(cdt)
    b1_ = memo(("b1", rdt), lambda: decay_pair(b1, rdt))
    b2_ = memo(("b2", rdt), lambda: decay_pair(b2, rdt))
    g = g.astype(cdt)
    m_new = ema(g, m.astype(cdt), b1_)
    v_new = ema(abs_sq(g), v.astype(rdt), b2_)
    if not bias_correction:
        m_hat = b1_.d * m_new + b1_.one_minus_d * g if nesterov else m_new
        return Moments(g, m_new, v_new, m_hat, None, rdt)
    c1 = correction(b1_, count, memo(("c1", rdt), lambda: correction_exponent(b1_, count)))
    if nesterov:
        count_next = memo("count_next", lambda: increment(count))
        e1_next = memo(("c1_next", rdt), lambda: correction_exponent(b1_, count_next))
        c1_next = correction(b1_, count_next, e1_next)
        # Each term is kept finite before it is scaled: for complex values jnp
        # multiplies by the real b1 as by b1+0j, and 0·inf would be NaN.
        m_term = no_overflow(divide(m_new, c1_next), m_new)
        g_term = no_overflow(divide(g, c1), g)
        m_hat = no_overflow(b1_.d * m_term + b1_.one_minus_d * g_term, m_new, g)
    else:
        m_hat = no_overflow(divide(m_new, c1), m_new)
    c2 = correction(b2_, count, memo(("c2", rdt), lambda: correction_exponent(b2_, count)))
    return Moments(g, m_new, v_new, m_hat, c2, rdt)


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
    finite = functools.reduce(jnp.logical_and, [jnp.isfinite(s) for s in sources])
    # The replacement is clamp(x) rather than copysign(max, x): the same value where
    # x is ±inf, in fewer staged operations. Its derivative there is 0 either way;
    # stop_gradient says so without making x a residual of the backward pass, which
    # would change how XLA compiles meta-gradients around it.
    big = float(jnp.finfo(x.dtype).max)
    replace = (jax.lax.abs(x) == jnp.inf) & finite
    clamped = jax.lax.clamp(jnp.asarray(-big, x.dtype), x, jnp.asarray(big, x.dtype))
    return jax.lax.select(replace, jax.lax.stop_gradient(clamped), x)


def store(x: jax.Array, like: jax.Array) -> jax.Array:
    """A first moment cast to ``like``'s dtype, saturating rather than overflowing.

    A narrower ``mu_dtype`` (bfloat16 for float32 params, say) would turn a finite
    ``m`` above its maximum into inf, and the next update into inf/inf = NaN.
    Non-finite values are stored as they are. Second moments are cast plainly: an
    overflowed ``v`` is inf, which makes the update 0, as in torch and optax.
    """
    dtype = jnp.dtype(like.dtype)
    if jnp.finfo(dtype).max >= jnp.finfo(x.dtype).max:
        return x.astype(dtype)
    return no_overflow(x.astype(dtype), x)


def adam_direction(
    m_hat: jax.Array,
    s: jax.Array,
    c2: jax.Array | None,
    eps: jax.Array,
    eps_root: jax.Array | None,
    *,
    eps_hat: bool,
    s_is_corrected: bool = False,
) -> jax.Array:
    """The Adam ratio ``m̂ / denominator`` for a second moment ``s``.

    ``c2 = 1 - b2**t`` (``None`` when bias correction is off). ``s`` is the raw
    second moment, or the already-corrected one when ``s_is_corrected``.
    ``eps_root=None`` (see :func:`offset`) adds nothing inside the square root.

    * ``eps_hat=False`` (Kingma & Ba, PyTorch, optax): ``m̂ / (sqrt(ŝ + eps_root) + eps)``
      with ``ŝ = s / c2``.
    * ``eps_hat=True`` (Keras/TensorFlow): ``m̂·sqrt(c2) / (sqrt(s + eps_root) + eps)``:
      eps is added before the bias correction of ``s``.
    """
    if c2 is None:
        return divide(m_hat, jnp.sqrt(_plus(s, eps_root)) + eps)
    if eps_hat:
        s_raw = s * c2 if s_is_corrected else s
        return divide(m_hat * jnp.sqrt(c2), jnp.sqrt(_plus(s_raw, eps_root)) + eps)
    s_hat = s if s_is_corrected else s / c2
    return divide(m_hat, jnp.sqrt(_plus(s_hat, eps_root)) + eps)


def offset(name: str, value: Any, dtype: Any, memo: Memo) -> jax.Array | None:
    """An additive hyperparameter (``eps_root``) in ``dtype``, or None for a plain 0.

    Adding a literal 0 changes nothing here (second moments are never -0.0), so it
    is left out rather than staged once per leaf.
    """
    if isinstance(value, numbers.Real) and value == 0:
        return None
    return memo((name, dtype), lambda: jnp.asarray(value, dtype))


def _plus(x: jax.Array, c: jax.Array | None) -> jax.Array:
    return x if c is None else x + c


def divide(x: jax.Array, den: jax.Array) -> jax.Array:
    """``x / den`` for a real ``den``; a complex ``x`` is divided part by part.

    jnp would promote ``den`` to complex and use complex division, for which a
    denominator of inf gives NaN instead of 0.
    """
    if jnp.iscomplexobj(x):
        return jax.lax.complex(jnp.real(x) / den, jnp.imag(x) / den)
    return x / den
