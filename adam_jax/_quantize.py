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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.tree_util import Partial
from jax.typing import ArrayLike

BLOCK = 256
MIN_SIZE = 4096
# Fields of the family states that hold moments, and whether each is signed.
MOMENTS = {"m": True, "v": False, "u": False, "v_max": False}

_INF_BITS = 0x7F800000
_ONE_BITS = 0x3F800000
I32 = jnp.int32


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


# Both maps are computed in the step without a table lookup (XLA:CPU does not vectorize a
# loop that gathers): by arithmetic on a code's decade, which 8-way selects pick
# constants for, then an exact correction of a few ulps per code, read from bit masks.
# The tables below are those constants, made once on the host from the map itself.


def _split(x: np.float64, bits: int = 12) -> tuple[np.float32, np.float32]:
    """float32 ``hi + lo == x`` (for x a float32), ``hi`` with ``bits`` significant bits:
    ``hi·k`` and ``lo·k`` are exact for integers and halves ``k < 2**9``."""
    mantissa, exponent = np.frexp(x)
    hi = np.ldexp(np.round(np.ldexp(mantissa, bits)), exponent - bits)
    return np.float32(hi), np.float32(x - hi)


def _decades(signed: bool) -> list[tuple[np.float64, np.float64, int]]:
    """Per decade ``i = 0..6``: its scale ``10**(i-6)`` and linspace step, in float32 as the
    map uses them, and its number of entries."""
    out = []
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        step = (np.float32(1.0) - np.float32(0.1)) / np.float32(n - 1)
        out.append((np.float64(np.float32(10.0 ** (i - 6))), np.float64(step), n - 1))
    return out


def _line(a: np.float64, b: np.float64) -> list[np.float32]:
    """float32 constants of ``a + b·k``, evaluated as :func:`_line_host` does."""
    return [np.float32(a), *_split(np.float64(np.float32(b)))]


def _line_host(lines: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``(a + b_hi·k) + b_lo·k`` in float32. Both products are exact, so a fused
    multiply-add computes the same: XLA may use one or not."""
    a, hi, lo = lines[..., 0], lines[..., 1], lines[..., 2]
    return (a + hi * k) + lo * k


def _masks(delta: np.ndarray) -> tuple[int, np.ndarray]:
    """A per-code correction in [lo, lo + 2**P) as ``lo`` and P bit planes of 8 words each:
    bit ``c % 32`` of word ``c // 32`` of plane ``p`` is bit ``p`` of ``delta[c] - lo``."""
    lo = int(delta.min())
    d = (delta - lo).astype(np.int64)
    planes = np.zeros((max(int(d.max()).bit_length(), 1), 256), np.uint64)
    for p in range(planes.shape[0]):
        planes[p] = ((d >> p) & 1) << (np.arange(256) % 32)
    words = planes.reshape(-1, 8, 32).sum(axis=2).astype(np.uint32).view(np.int32)
    return lo, words


def _positions(codes: np.ndarray, signed: bool, of_thresholds: bool) -> np.ndarray:
    """The integer whose bit length picks a code's decade (below): for entries, ``2|c - 127| + 1``
    (signed) or ``c + 1``; for the threshold below code ``c``, ``|c - 127.5| + 0.5`` or
    ``c + 1``. The entry's index within the decade is that integer less its leading bit
    (halved, for signed entries)."""
    if not signed:
        return codes + 1
    if of_thresholds:
        return np.where(codes >= 128, codes - 127, 128 - codes)
    return 2 * np.abs(codes - 127) + 1


def _exponent_and_rest(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = np.frexp(q.astype(np.float64))[1] - 1
    return e, (q - 2.0**e).astype(np.float32)


@functools.cache
def _code_tables(signed: bool) -> dict[str, Any]:
    """For coding ``y``: per decade of ``|y|`` (below 1e-7, then ``i = 0..6``, from its
    lower bound ``0.1·10**(i-6)``) the line ``a0(|y|)`` whose integer part is the position
    (:func:`_positions`) just below the one of ``|y|``'s code, or that position; per bit
    length ``e + 1`` of a position the line of the thresholds inside a decade,
    ``10**(i-6)·(0.1 + step·k)``, and the threshold at its first entry; the correction of
    every threshold ``|T_c|``'s bits."""
    decades = _decades(signed)
    lower = np.array([s * np.float64(np.float32(0.1)) for s, _, _ in decades], np.float32)
    slope, offset = np.zeros(8, np.float32), np.zeros(8, np.float32)
    offset[0] = 0.5  # |y| < 1e-7: position 0 (y = 0's code)
    lines, first = np.zeros((9, 3), np.float32), np.zeros(9, np.float32)
    for i, (scale, step, _) in enumerate(decades):
        start = 2**i if signed else 2 ** (i + 1) - 1  # position of the decade's first entry
        # |y| in the decade: t = (|y|/scale - 0.1)/step; entry k's cell is t in (k, k+1),
        # its value at t = k + 1/2. floor(t - 1/2) misses the code by at most one.
        slope[i + 1] = 1 / (scale * step)
        offset[i + 1] = start - np.float64(np.float32(0.1)) / step - 0.5
        lines[i if signed else i + 1] = _line(scale * np.float64(np.float32(0.1)), scale * step)
    t = np.concatenate([[np.nan], thresholds(signed)]).astype(np.float32)  # t[c] = T_c
    codes = np.arange(256)
    e, k = _exponent_and_rest(_positions(codes, signed, True))
    for c in codes[codes >= (128 if signed else 1)]:
        if k[c] == 0:
            first[e[c]] = t[c]
    approx = np.where(k == 0, first[e], _line_host(lines[e], k)).astype(np.float32)
    delta = np.abs(t).view(np.int32).astype(np.int64) - approx.view(np.int32)
    lo, words = _masks(np.where(codes == 0, 0, delta))
    return {
        "lower": lower, "slope": slope, "offset": offset, "lines": lines,
        "first": first, "lo": lo, "words": words,
    }  # fmt: skip


def _select(conditions: list[jax.Array], values: np.ndarray, dtype: Any) -> jax.Array:
    """``values[j]`` for the last true ``conditions[j - 1]`` (``values[0]`` if none): the
    conditions are nested (each implies the ones before it)."""
    out = jnp.asarray(values[0], dtype)
    for condition, value in zip(conditions, values[1:], strict=True):
        out = jnp.where(condition, jnp.asarray(value, dtype), out)
    return out


def _exponent_and_rest_jax(q: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """For int32 ``q >= 1``: conditions ``bit length of q > j + 1`` (j = 1..8), and
    ``q - 2**(bit length - 1)`` as float32, both from ``float(q)``'s bits."""
    f = q.astype(jnp.float32)
    bits = lax.bitcast_convert_type(f, I32)
    leading = lax.bitcast_convert_type(bits & I32(-(1 << 23)), jnp.float32)
    exponent = lax.shift_right_logical(bits, I32(23))
    return [exponent >= 127 + j for j in range(1, 9)], f - leading


def _line_at(lines: np.ndarray, conditions: list[jax.Array], k: jax.Array) -> jax.Array:
    a, hi, lo = (_select(conditions, lines[:, j], jnp.float32) for j in range(3))
    return (a + hi * k) + lo * k


def _corrected(x: jax.Array, c: jax.Array, lo: int, words: np.ndarray) -> jax.Array:
    """``x``'s bits plus the correction of code ``c`` (:func:`_masks`)."""
    word = lax.shift_right_logical(c, I32(5))
    conditions = [word >= j for j in range(1, 8)]
    bit = c & I32(31)
    out = lax.bitcast_convert_type(x, I32) + I32(lo)
    for p, plane in enumerate(words):
        one = lax.shift_right_logical(_select(conditions, plane, I32), bit) & I32(1)
        out = out + lax.shift_left(one, I32(p))
    return out


# torch.linspace(0.1, 1, n)'s point at u = j/128 (n - 1 a power of two dividing 128) is
# fma(step, j', 0.1) or fma(-step, n-1-j', 1) with step = 0.9f/(n-1): in units of 2**-30
# the exact integer below before its one rounding (0.1f and 0.9f/128 are multiples of
# 2**-30), so converting that integer to float32 rounds as the fused multiply-add does.
_ONE, _TENTH, _STEP = 1 << 30, 107374184, 7549747


def _point(j: jax.Array) -> jax.Array:
    """2**30 · the linspace point at ``j/128``, in float32 (exact)."""
    near_one = jnp.int32(_ONE) - jnp.int32(_STEP) * (128 - j)
    return jnp.where(j < 64, jnp.int32(_TENTH) + jnp.int32(_STEP) * j, near_one).astype(jnp.float32)


def entries(codes: jax.Array, signed: bool) -> jax.Array:
    """``dynamic_map(signed)[codes]``, computed as the map is built, without a lookup."""
    c = codes.astype(I32)
    # Entry k of decade i is at 2**i + k (signed, from the middle) or 2**(i+1) + k; as a
    # float32, its exponent gives the decade and its top mantissa bits k on a 1/128 grid.
    bits = lax.bitcast_convert_type(
        (jnp.abs(c - 127) if signed else c + 1).astype(jnp.float32), I32
    )
    exponent = lax.shift_right_logical(bits, I32(23))
    j = lax.shift_right_logical(bits & I32(0x7FFFFF), I32(16))
    width = lax.shift_right_logical(I32(1 << 30), exponent - (127 - 23))  # 128 / 2**e
    total = _point(j) + _point(j + width)  # 2**30 · 2 · the entry's mean, rounded as the map
    scales = np.zeros(9, np.float32)  # per e: 10**(i-6) · 2**-31
    for i, (scale, _, _) in enumerate(_decades(signed)):
        scales[i if signed else i + 1] = np.float32(scale) * np.float32(2.0**-31)
    value = _select([exponent >= 127 + e for e in range(1, 9)], scales, jnp.float32) * total
    zero = c == 127 if signed else c == 0
    value = jnp.where(c == 255, jnp.float32(1), jnp.where(zero, jnp.float32(0), value))
    return jnp.where(c < 127, -value, value) if signed else value


def codes(y: jax.Array, signed: bool) -> jax.Array:
    """uint8 codes of ``y`` (values in [-1, 1]; NaN codes to 0) on the signed or unsigned
    map: ``|y|``'s decade and a line give a code ``c0`` or ``c0 + 1``; the threshold
    ``T_{c0+1}``, computed as :func:`entries` computes entries, decides."""
    tab = _code_tables(signed)
    # Everything from y's bits, read once: XLA would compute a y used thrice (a division)
    # in a pass of its own.
    bits = lax.bitcast_convert_type(y, I32)
    magnitude = bits & I32(0x7FFFFFFF)
    size = lax.bitcast_convert_type(magnitude, jnp.float32)
    decade = [size >= bound for bound in tab["lower"]]
    line = size * _select(decade, tab["slope"], jnp.float32)
    below = (line + _select(decade, tab["offset"], jnp.float32)).astype(I32)
    if signed:
        negative = bits < 0
        position = below + 1
        above = jnp.where(negative, 127 - below, 128 + below)
    else:
        position = below + 2
        above = below + 1
    conditions, k = _exponent_and_rest_jax(position)
    inside = _line_at(tab["lines"], conditions, k)
    approx = jnp.where(k == 0, _select(conditions, tab["first"], jnp.float32), inside)
    threshold = _corrected(approx, above, tab["lo"], tab["words"])  # |T|'s bits
    if signed:  # y >= T: |y| >= |T| if y >= 0, |y| <= |T| if y < 0
        reached = jnp.where(negative, magnitude <= threshold, magnitude >= threshold)
        invalid = magnitude > I32(_ONE_BITS)
    else:
        reached = magnitude >= threshold
        invalid = (bits > I32(_ONE_BITS)) | (bits < 0)
    code = jnp.maximum(above - 1 + reached.astype(I32), 0)
    return jnp.where(invalid, I32(0), code).astype(jnp.uint8)


# Computations of the moments in a step. XLA:CPU does not fuse one computation of the
# moments into several consumers: it writes them out in float32 (4 B a param, in a buffer
# the page faults of which cost as much as the step). A step that reads the moments in
# three passes (block maxima, codes, param update) computes them three times, in forms
# XLA does not merge, so each fuses into its pass.
_COPIES = 3


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
        return _dequantize(self, 0)


def _dequantize(q: QuantizedArray, copy: int) -> jax.Array:
    """``q``'s float32 values, in a computation of their own for each ``copy`` (see
    ``_COPIES``)."""
    c = q.codes.astype(I32)
    if copy:  # c | 0, with a zero that XLA neither folds nor shares between copies
        c = c | lax.shift_right_logical(c, I32(31 + copy))
    values = entries(c, q.signed)
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
    return _quantize(x, x, signed)


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
    new_updates, new_state = inner_update(updates, dequantize_state(state), params)
    return new_updates, _quantize_fields(new_state, state)


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
