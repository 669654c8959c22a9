r"""8-bit optimizer states: blockwise dynamic quantization of the moments.

A quantized moment is stored as one ``uint8`` code per element (shaped like the
param) and one float32 scale per block of 256 consecutive elements of the flattened
tensor, as in bitsandbytes' ``Adam8bit`` and torchao's ``AdamW8bit``
(Dettmers et al., 2022). The scale is the block's absmax, clipped below at 1e-12;
the code is the index of the entry of a 256-entry *dynamic quantization map* nearest
to ``x / scale``. First moments use the signed map, second moments and running
maxima the unsigned one.

The maps are built here, by the construction of bitsandbytes'
``create_dynamic_map`` (without zero padding, as torchao's ``quant_utils.py``): for
each decade :math:`i = 0, \dots, 6` the midpoints of ``linspace(0.1, 1, n_i)`` in
float32, scaled by :math:`10^{i-6}`, with :math:`n_i = 2^i + 1` points for the
signed map (and their negatives) and :math:`2^{i+1} + 1` for the unsigned one; then
0 and 1; sorted. ``linspace`` is torch's float32 one: step
``f32(0.9 / (n-1))``, point ``j`` is ``fma(step, j, 0.1)`` below the middle and
``fma(-step, n-1-j, 1)`` from it on.

Rounding to the nearest entry is torchao's: the largest entry ``q[c] <= y``, then
``c + 1`` when ``y - q[c] >= (q[c+1] - q[c]) * 0.5`` in float32 (ties go up). That
rule equals counting 255 thresholds ``T_k <= y``, where ``T_k`` is the smallest
float32 for which the rule rounds up to ``k``; the thresholds are found once on the
host. Counting them is done without a search: ``|y|``'s exponent and its top 7
mantissa bits select one of ~3,200 buckets, each holding at most one threshold, so a
code is a table lookup and one comparison.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.tree_util import Partial
from jax.typing import ArrayLike

T = TypeVar("T")

BLOCK = 256
MIN_SIZE = 4096
# Fields of the family states that hold moments, and whether each is signed.
MOMENTS = {"m": True, "m_slow": True, "v": False, "u": False, "v_max": False}

_INF_BITS = 0x7F800000
_MANTISSA_BITS = 7  # top mantissa bits of |y| that pick a bucket
_SHIFT = 23 - _MANTISSA_BITS
_LOW_EXPONENT = 102  # |y| < 2**-25 shares bucket 0 (no threshold lies there)
_LO = _LOW_EXPONENT << _MANTISSA_BITS
_NB = (127 << _MANTISSA_BITS) - _LO + 1  # buckets up to |y| = 1; bucket _NB: |y| > 1 or NaN


def _linspace(n: int) -> np.ndarray:
    """``torch.linspace(0.1, 1, n)`` in float32."""
    step = np.float64((np.float32(1.0) - np.float32(0.1)) / np.float32(n - 1))
    j = np.arange(n)
    # step·j is exact in float64, so one rounding to float32 is the fused multiply-add.
    low = (np.float64(np.float32(0.1)) + step * j).astype(np.float32)
    high = (1.0 - step * (n - 1 - j)).astype(np.float32)
    return np.where(j < n // 2, low, high)


@functools.cache
def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 sorted float32 entries of the signed or unsigned dynamic quantization map
    of 8-bit states (bitsandbytes' and torchao's), built as the module docstring says.

    Example:
      >>> import adam_jax
      >>> q = adam_jax.dynamic_map(signed=False)
      >>> print(q.shape, q[0], q[-1])
      (256,) 0.0 1.0
    """
    entries = [np.zeros(1, np.float32), np.ones(1, np.float32)]
    for i in range(7):
        points = _linspace(2**i + 1 if signed else 2 ** (i + 1) + 1)
        means = (points[:-1] + points[1:]) / np.float32(2)
        decade = np.float32(10.0 ** (i - 6)) * means
        entries += [decade, -decade] if signed else [decade]
    qmap = np.sort(np.concatenate(entries)).astype(np.float32)
    assert qmap.shape == (256,)
    qmap.flags.writeable = False
    return qmap


def _sortable(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys in the same order (one key per float, -0 before +0)."""
    bits = x.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _unsortable(k: np.ndarray) -> np.ndarray:
    bits = np.where(k < 0, (-(k + 1)) | -0x80000000, k).astype(np.int32)
    return bits.view(np.float32)


@functools.cache
def thresholds(signed: bool) -> np.ndarray:
    """``T_k``, k = 1..255: the smallest float32 ``y`` that torchao's rule codes >= k."""
    q = dynamic_map(signed)
    down, up = q[:-1], q[1:]
    half = (up - down) * np.float32(0.5)
    lo, hi = _sortable(down), _sortable(up)  # the rule rounds up at hi, never at lo
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        rounds_up = (_unsortable(mid) - down) >= half
        hi = np.where(rounds_up, mid, hi)
        lo = np.where(rounds_up, lo, mid)
    out = _unsortable(hi)
    out.flags.writeable = False
    return out


@functools.cache
def _buckets(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket of ``|y|`` (positive ``y`` first, then negative): the number of
    thresholds below the bucket, and the one threshold inside it (inf if none)."""
    t = thresholds(signed).astype(np.float64)
    b = np.arange(_NB)
    lo = np.where(b == 0, 0, (b + _LO) << _SHIFT).astype(np.int32).view(np.float32)
    hi = ((b + _LO + 1) << _SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    lo = lo.astype(np.float64)
    # y >= 0 in [lo, hi); y < 0 in (-hi, -lo].
    pos_base = np.searchsorted(t, lo, side="right")
    pos_inside = np.searchsorted(t, hi, side="left") - pos_base
    neg_base = np.searchsorted(t, -hi, side="right")
    neg_inside = np.searchsorted(t, -lo, side="right") - neg_base
    if max(pos_inside.max(), neg_inside.max()) > 1:
        raise AssertionError("a bucket holds two thresholds")
    t_ext = np.append(t, np.inf)
    pos_thr = np.where(pos_inside > 0, t_ext[pos_base], np.inf)
    neg_thr = np.where(neg_inside > 0, t_ext[neg_base], np.inf)
    # Bucket _NB (|y| > 1 or NaN, only in a block whose scale is not finite): code 0, as torchao.
    base = np.concatenate([pos_base, [0], neg_base, [0]]).astype(np.int32)
    thr = np.concatenate([pos_thr, [np.inf], neg_thr, [np.inf]]).astype(np.float32)
    base.flags.writeable = thr.flags.writeable = False
    return base, thr


# Why lookups: both maps can be computed exactly without them, in loops XLA:CPU
# vectorizes (an entry from its decade and index, the linspace points being integers in
# units of 2**-30 before their one rounding; a code from a line in |y|'s decade and one
# threshold corrected by per-code bit masks). That takes ~10x the instructions of a
# gather from these small tables, with spills: the 2^24-param Adam step ran 2x slower
# (136 against 68 ms on 2 cores), and 1,000 leaves took over 5 GB to compile.

# Copies of the map in the dequantization table. XLA:CPU does not fuse one gather into
# several consumers: it writes the gathered moments out in float32 (4 B a param, in a
# buffer the page faults of which cost as much as the step). A step that reads the
# moments in three passes (block maxima, codes, param update) gathers them from three
# copies, which XLA does not merge, so each gather fuses into its pass.
_COPIES = 3


@functools.cache
def _device_tables(signed: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The bucket tables and the map (``_COPIES`` times over) as JAX arrays, made once: a
    program that quantizes many leaves then holds one copy of each constant, not one
    per leaf."""
    base, thr = _buckets(signed)
    bits = thr.view(np.int32)
    # The thresholds as ordered integer keys; no threshold (inf): above every key.
    keys = np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    keys = np.where(np.isinf(thr), np.iinfo(np.int32).max, keys).astype(np.int32)
    qmap = np.tile(dynamic_map(signed), _COPIES)
    with jax.ensure_compile_time_eval():  # concrete arrays even when first made under jit
        return jnp.asarray(base), jnp.asarray(keys), jnp.asarray(qmap)


def codes(y: jax.Array, signed: bool) -> jax.Array:
    """uint8 codes of ``y`` (values in [-1, 1]) on the signed or unsigned map."""
    base, thr, _ = _device_tables(signed)
    # Everything from y's bits, read once: XLA would compute a y used thrice (a division)
    # in a pass of its own. ``key`` orders like y (y >= T iff key(y) >= key(T)).
    bits = lax.bitcast_convert_type(y, jnp.int32)
    magnitude = bits & jnp.int32(0x7FFFFFFF)
    negative = bits < 0
    key = jnp.where(negative, -magnitude, magnitude)
    bucket = jnp.clip(lax.shift_right_arithmetic(magnitude, jnp.int32(_SHIFT)) - _LO, 0, _NB)
    bucket = bucket + jnp.where(negative, jnp.int32(_NB + 1), jnp.int32(0))
    base_ = base.at[bucket].get(mode="promise_in_bounds")
    thr_ = thr.at[bucket].get(mode="promise_in_bounds")
    return (base_ + (key >= thr_).astype(jnp.int32)).astype(jnp.uint8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A moment stored in 8 bits: ``codes`` (uint8, shaped like the param) and
    ``scales`` (float32, one per block of 256 elements of the flattened array);
    element ``i`` is ``map[codes[i]] * scales[i // 256]``."""

    codes: jax.Array
    scales: jax.Array
    signed: bool = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> jax.Array:
        return cast(jax.Array, _dequantize(self, 0))


# Jitted so that a step over many leaves of one shape traces each once (a later leaf
# is a cache hit): XLA inlines the calls, so the program is the same.
@functools.partial(jax.jit, static_argnames=("copy",))
def _dequantize(q: QuantizedArray, copy: int) -> jax.Array:
    """``q``'s float32 values, gathered from copy ``copy`` of the map."""
    qmap = _device_tables(q.signed)[2]
    index = q.codes.astype(jnp.int32) + jnp.int32(BLOCK * copy)
    values = qmap.at[index].get(mode="promise_in_bounds")
    blocks = values.reshape(-1, BLOCK) * q.scales[:, None]
    return blocks.reshape(q.codes.shape)


def quantize_blockwise(x: jax.Array, signed: bool) -> QuantizedArray:
    """Blockwise 8-bit quantization of ``x``, as torchao's ``OptimState8bit``.

    Args:
      x: a real array whose size is a multiple of 256.
      signed: use the signed map (first moments) or the unsigned one (second moments).

    Returns:
      A :class:`QuantizedArray`; ``.dequantize()`` gives float32 values.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> q = adam_jax.quantize_blockwise(jnp.linspace(-1.0, 1.0, 256), signed=True)
      >>> print(q.codes.dtype, q.scales.shape, float(q.dequantize()[-1]))
      uint8 (1,) 1.0
    """
    if x.size % BLOCK:
        raise ValueError(
            f"quantize_blockwise needs a size that is a multiple of 256, got {x.shape}"
        )
    return cast(QuantizedArray, _quantize(x, x, signed))


@functools.partial(jax.jit, static_argnames=("signed",))  # see _dequantize
def _quantize(x: jax.Array, same_x: jax.Array, signed: bool) -> QuantizedArray:
    """:func:`quantize_blockwise` of ``x``, whose codes are computed from ``same_x``, equal
    to ``x`` but computed apart (see ``_COPIES``)."""
    blocks = x.astype(jnp.float32).reshape(-1, BLOCK)
    # The block maxima of |x| as integers (the bits of a non-negative float order like
    # it): NaN's bits lie above inf's, so a block holding NaN or inf has a maximum >= inf's
    # and gets a NaN scale, and all its values read back as NaN (torchao's NaN absmax
    # does the same). The maximum of the block's eight 32-element slices, then of its 32
    # lanes: XLA:CPU fuses the moments' computation into that, where a reduction over
    # 256 reads them from a buffer written first (and 10x slower).
    magnitude = lax.bitcast_convert_type(blocks, jnp.int32) & jnp.int32(0x7FFFFFFF)
    slices = magnitude.reshape(-1, 8, BLOCK // 8)
    lanes = functools.reduce(jnp.maximum, [slices[:, k, :] for k in range(8)])
    top = jnp.max(lanes, axis=1)
    absmax = lax.bitcast_convert_type(top, jnp.float32)
    scales = jnp.where(
        top >= _INF_BITS, jnp.float32(jnp.nan), jnp.maximum(absmax, jnp.float32(1e-12))
    )
    same = same_x.astype(jnp.float32).reshape(-1, BLOCK)
    y = same / _spread(scales[:, None], same)
    return QuantizedArray(codes(y, signed).reshape(x.shape), scales, signed)


def eligible(x: Any) -> bool:
    """Quantized as torchao does: real floating leaves of >= 4096 elements, a multiple of 256."""
    return jnp.issubdtype(x.dtype, jnp.floating) and x.size >= MIN_SIZE and x.size % BLOCK == 0


def _is_q(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _quantize_fields(state: Any, template: Any, same: Any = None) -> Any:
    """Quantize the moment fields of ``state`` where ``template`` says so
    (``template=None``: every eligible leaf); the codes from ``same``, equal to ``state``
    but computed apart, if given (see ``_COPIES``)."""
    fields = {}
    for name, signed in MOMENTS.items():
        if name not in getattr(state, "_fields", ()):
            continue
        new = getattr(state, name)
        if template is None:
            fields[name] = jax.tree.map(
                lambda x, s=signed: quantize_blockwise(x, s) if eligible(x) else x, new
            )
        else:
            fields[name] = jax.tree.map(
                lambda old, x, y: _quantize(x, y, old.signed) if _is_q(old) else x,
                getattr(template, name),
                new,
                getattr(same if same is not None else state, name),
                is_leaf=_is_q,
            )
    return state._replace(**fields)


def dequantize_state(state: Any, copy: int = 0) -> Any:
    """The state with every :class:`QuantizedArray` replaced by its float32 values."""
    return jax.tree.map(lambda x: _dequantize(x, copy) if _is_q(x) else x, state, is_leaf=_is_q)


def _init(inner_init: Any, params: optax.Params) -> Any:
    return _quantize_fields(inner_init(params), None)


def _update(
    inner_update: Any,
    updates: optax.Updates,
    state: Any,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, Any]:
    (_, inner), (_, same), (new_updates, _) = per_pass(
        lambda dequantized: inner_update(updates, dequantized, params), state
    )
    return new_updates, _quantize_fields(inner, state, same)


def per_pass(fn: Callable[[Any], T], state: Any) -> list[T]:
    """``fn`` of the dequantized ``state`` once per pass of an 8-bit step: for the block
    maxima, for the codes, and for the update, each from its own copy of the map (see
    ``_COPIES``), so that no float32 moments are materialized."""
    return [fn(dequantize_state(state, copy)) for copy in range(_COPIES)]


def _spread(c: ArrayLike, like: jax.Array) -> jax.Array:
    """The scalar ``c`` broadcast to ``like``'s shape, in a form XLA does not recognize
    as a broadcast: XLA turns ``x / broadcast(c)`` into ``x * (1 / c)``, which rounds
    differently, and torch's compiled step divides."""
    real = jnp.real(like) if jnp.iscomplexobj(like) else like
    width = 8 * real.dtype.itemsize
    int_t = jnp.dtype(f"int{width}")
    bits = lax.bitcast_convert_type(jnp.broadcast_to(c, like.shape).astype(real.dtype), int_t)
    # A shift by the full width is 0 in XLA, but not folded.
    nothing = lax.shift_right_logical(lax.bitcast_convert_type(real, int_t), int_t.type(width))
    return lax.bitcast_convert_type(bits | nothing, real.dtype)


def with_state_bits(
    scaler: optax.GradientTransformation, state_bits: int | None, config: Any
) -> optax.GradientTransformation:
    """``scaler`` itself for ``state_bits=32`` or None; for 8, the same transformation with its
    moments stored in 8 bits (see the module docstring). ``config`` supplies the
    family's ``mu_dtype``/``nu_dtype``, which must be left unset with 8-bit states."""
    if state_bits is None:
        return scaler
    # optax.inject_hyperparams passes a number as an array: a concrete one is read.
    if isinstance(state_bits, jax.Array | np.ndarray) and not isinstance(
        state_bits, jax.core.Tracer
    ):
        if state_bits.ndim == 0 and jnp.issubdtype(state_bits.dtype, jnp.integer):
            state_bits = int(state_bits)
    bits_ok = isinstance(state_bits, int | np.integer) and not isinstance(state_bits, bool)
    if not bits_ok or state_bits not in (8, 32):
        raise ValueError(
            "state_bits must be 8 or 32 (a Python int; with optax.inject_hyperparams, "
            f"list it in static_args), got state_bits={state_bits!r}"
        )
    if state_bits == 32:
        return scaler
    for name in ("mu_dtype", "nu_dtype"):
        dtype = getattr(config, name, None)
        if dtype is not None and jnp.dtype(dtype) != jnp.float32:
            raise ValueError(
                f"state_bits=8 stores the moments in 8 bits and computes them in float32; "
                f"{name}={jnp.dtype(dtype).name} cannot apply (leave it unset or float32)"
            )
    return optax.GradientTransformation(
        Partial(_init, scaler.init), Partial(_update, scaler.update)
    )
