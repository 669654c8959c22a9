"""The dtype of every optimizer state field, after ``init`` and after jitted updates.

The rule is written once, below (:func:`expected`), from the docstrings, not from the
library's code:

* ``count`` (every state, and optax's schedule counts in an alias chain): int32.
* ``m`` (first moment): ``mu_dtype``, default the param dtype (``scale_by_adam``:
  "mu_dtype: dtype to store ``m`` in; default the param dtype"). A real ``mu_dtype``
  for complex params is refused (the moment would lose the imaginary part).
* ``v`` and AMSGrad's ``v_max`` (second moments): the real part of ``nu_dtype``,
  default the param dtype's real part, except float32 for float16 params
  (``scale_by_adam``'s ``nu_dtype``, ``AdamState.v``: "real for complex params";
  ``scale_by_amsgrad``: "dtype to store ``v`` and ``v_max`` in").
* Adamax's ``u`` (infinity norm): the param dtype's real part, always
  (``AdamaxState.u``; it has no ``nu_dtype``, and no float16 exception).
* NAdam's ``mu_product``: a real scalar in the widest real compute dtype of the params,
  float64 when any leaf is float64, else float32 (``NAdamState.mu_product``).
* Every other leaf of an alias's ``optax.chain`` state: there is none with a constant
  learning rate; a schedule adds ``scale_by_learning_rate``'s int32 count.

Every optimizer row runs over the param dtypes float32, float64, bfloat16, float16
(in one tree) and complex64 (alone, as a real ``mu_dtype`` is refused for it), with
``mu_dtype``/``nu_dtype`` pairs chosen so that each value (None, float32, bfloat16,
float16, float64) meets every real param dtype once for each argument.

After ``init`` the state is concrete (eager). After an update the dtypes are read with
``jax.eval_shape`` of the update, the optimizer passed as an argument (its hyperparameters
traced, as in a jitted training step): a jitted program's output dtypes are fixed when it
is traced, so this is what the compiled program returns, without compiling one program
per row. Since the state after one update must have the dtypes of the state before it
(asserted), every later update, traced from the same abstract values, returns them too;
one program of three updates is compiled and run below to check both claims.

The ``scale_by_*`` rows run every pair; the aliases, which pass ``mu_dtype`` and
``nu_dtype`` on to their scaler, run the defaults and one pair with both set.

A new optimizer is one line in ``ROWS``: its name, how to build it from
``(mu_dtype, nu_dtype)`` keywords, and its state fields with their rules.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial as P
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

# --------------------------------------------------------------------------
# The documented rule, once.
# --------------------------------------------------------------------------

COUNT, MU, NU, REAL, PRODUCT = "count", "mu", "nu", "real", "product"


def _real(dtype: Any) -> np.dtype:
    """The real part's dtype: float32 for complex64, float64 for complex128."""
    return np.dtype(jnp.finfo(dtype).dtype)


def expected(rule: str, param: Any, mu: Any, nu: Any, all_params: list[Any]) -> np.dtype:
    """The documented storage dtype of a state leaf for a param leaf of dtype ``param``."""
    param = np.dtype(param)
    if rule == COUNT:
        return np.dtype(np.int32)
    if rule == MU:
        return np.dtype(param if mu is None else mu)
    if rule == NU:
        if nu is not None:
            return _real(nu)
        return np.dtype(np.float32) if param == np.float16 else _real(param)
    if rule == REAL:
        return _real(param)
    if rule == PRODUCT:
        wide = any(_real(p) == np.float64 for p in all_params)
        return np.dtype(np.float64 if wide else np.float32)
    raise AssertionError(f"no rule {rule!r}")


# --------------------------------------------------------------------------
# The table: one row per optimizer.
# --------------------------------------------------------------------------

ADAM = {"count": COUNT, "m": MU, "v": NU}
AMSGRAD = {"count": COUNT, "m": MU, "v": NU, "v_max": NU}
ADAMAX = {"count": COUNT, "m": MU, "u": REAL}
NADAM = {"count": COUNT, "m": MU, "v": NU, "mu_product": PRODUCT}


class Row(NamedTuple):
    name: str
    make: Callable[..., optax.GradientTransformation]  # keywords: mu_dtype (, nu_dtype)
    fields: dict[str, str]  # field name -> rule
    nu: bool = True  # takes nu_dtype


ROWS = [
    Row("scale_by_adam", adam_jax.scale_by_adam, ADAM),
    Row("scale_by_adam_nesterov", P(adam_jax.scale_by_adam, nesterov=True), ADAM),
    Row("scale_by_amsgrad", adam_jax.scale_by_amsgrad, AMSGRAD),
    Row("scale_by_amsgrad_corrected", P(adam_jax.scale_by_amsgrad, max_of="corrected"), AMSGRAD),
    Row("scale_by_adamax", adam_jax.scale_by_adamax, ADAMAX, nu=False),
    Row("scale_by_nadam", adam_jax.scale_by_nadam, NADAM),
    Row("scale_by_radam", adam_jax.scale_by_radam, ADAM),
    Row("adam", P(adam_jax.adam, 1e-2), ADAM),
    Row("adam_decoupled", P(adam_jax.adam, weight_decay=0.1, decoupled_weight_decay=True), ADAM),
    Row("adam_maximize", P(adam_jax.adam, 1e-2, maximize=True), ADAM),
    Row("adamw", P(adam_jax.adamw, 1e-2), ADAM),
    Row("adamw_schedule", P(adam_jax.adamw, optax.linear_schedule(1e-2, 1e-3, 10)), ADAM),
    Row("amsgrad", P(adam_jax.amsgrad, 1e-2, weight_decay=0.1), AMSGRAD),
    Row("adamax", P(adam_jax.adamax, 1e-2, weight_decay=0.1), ADAMAX, nu=False),
    Row("adamaxw", P(adam_jax.adamaxw, 1e-2), ADAMAX, nu=False),
    Row("nadam", P(adam_jax.nadam, 1e-2, weight_decay=0.1), NADAM),
    Row("nadamw", P(adam_jax.nadamw, 1e-2), NADAM),
    Row("radam", P(adam_jax.radam, 1e-2, weight_decay=0.1), ADAM),
    Row("radamw", P(adam_jax.radamw, 1e-2, form="optax"), ADAM),
]

REAL_DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16]
# (mu_dtype, nu_dtype): each value once per argument, so with all four real param
# dtypes in one tree every (value, param dtype) pair is met.
REAL_PAIRS = [
    (None, None),
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float16),
    (jnp.float16, jnp.float64),
    (jnp.float64, jnp.float32),
]
COMPLEX_PAIRS = [(None, None), (jnp.complex128, jnp.bfloat16), (jnp.complex64, jnp.float64)]


def real_params() -> dict[str, jax.Array]:
    return {jnp.dtype(d).name: jnp.linspace(-1.0, 1.5, 3).astype(d) for d in REAL_DTYPES}


def complex_params() -> dict[str, jax.Array]:
    return {"complex64": (jnp.linspace(-1.0, 1.5, 3) * (1 - 0.5j)).astype(jnp.complex64)}


def build(row: Row, mu: Any, nu: Any) -> optax.GradientTransformation:
    return row.make(mu_dtype=mu, nu_dtype=nu) if row.nu else row.make(mu_dtype=mu)


def three_steps(opt: optax.GradientTransformation, params: Any, state: Any) -> tuple[Any, Any]:
    def step(_: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        params, state = carry
        updates, state = one_step(opt, params, state)
        return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, 3, step, (params, state))


def field_of(path: tuple[Any, ...]) -> str:
    """The state field a leaf belongs to: the last attribute name on its path (the
    params are dicts, so their keys are not attributes)."""
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    assert names, f"a state leaf outside any NamedTuple field: {path}"
    return names[-1]


def param_of(path: tuple[Any, ...], params: dict[str, Any]) -> Any:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return None if not keys else params[keys[-1]].dtype


def assert_state_dtypes(state: Any, row: Row, params: dict, mu: Any, nu: Any, when: str) -> None:
    all_params = [p.dtype for p in params.values()]
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        field = field_of(path)
        seen.add(field)
        assert field in row.fields, f"{row.name}: undocumented state field {field!r} ({when})"
        param = param_of(path, params)
        if param is None:  # a scalar field: count, mu_product
            assert jnp.ndim(leaf) == 0, (row.name, path)
            param = all_params[0]
        want = expected(row.fields[field], param, mu, nu, all_params)
        got = np.dtype(leaf.dtype)
        assert got == want, (
            f"{row.name}(mu_dtype={mu}, nu_dtype={nu}) {when}: "
            f"{jax.tree_util.keystr(path)} is {got}, documented {want} (param {param})"
        )
    assert seen >= set(row.fields), f"{row.name}: fields {set(row.fields) - seen} missing"


def one_step(opt: optax.GradientTransformation, params: Any, state: Any) -> tuple[Any, Any]:
    grads = jax.tree.map(lambda p: p * 0.5 + 1, params)
    return opt.update(grads, state, params)


def check(row: Row, params: dict, mu: Any, nu: Any) -> None:
    opt = build(row, mu, nu)
    state = opt.init(params)
    assert_state_dtypes(state, row, params, mu, nu, "after init")
    updates, new_state = jax.eval_shape(one_step, opt, params, state)
    assert_state_dtypes(new_state, row, params, mu, nu, "after a traced update")
    # The same avals in and out: the next update is traced from what this one was.
    avals = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), (state, new_state))
    assert avals[0] == avals[1], row.name
    for name, u in updates.items():  # updates come back in the params' dtypes
        assert u.dtype == params[name].dtype, (row.name, name, u.dtype)


def pairs(row: Row, all_pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    return all_pairs if row.name.startswith("scale_by_") else all_pairs[:1] + all_pairs[2:3]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_state_dtypes_real_params(row: Row) -> None:
    for mu, nu in pairs(row, REAL_PAIRS):
        check(row, real_params(), mu, nu)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_state_dtypes_complex_params(row: Row) -> None:
    for mu, nu in pairs(row, COMPLEX_PAIRS):
        check(row, complex_params(), mu, nu)
    with pytest.raises(TypeError, match="mu_dtype=float32 is real"):
        build(row, jnp.float32, None).init(complex_params())


@pytest.mark.parametrize("dtype", [*REAL_DTYPES, jnp.complex64], ids=lambda d: jnp.dtype(d).name)
def test_nadam_product_is_the_widest_real_compute_dtype(dtype: Any) -> None:
    """One param dtype at a time: float64 only with a float64 leaf."""
    row = next(r for r in ROWS if r.name == "scale_by_nadam")
    params = {jnp.dtype(dtype).name: jnp.ones(2, dtype)}
    check(row, params, None, None)
    want = np.float64 if dtype == jnp.float64 else np.float32
    assert adam_jax.scale_by_nadam().init(params).mu_product.dtype == want


def test_compiled_run_has_the_traced_dtypes() -> None:
    """The claims the table relies on: three compiled updates give the dtypes one
    traced update does (one program, the narrowest moments)."""
    row = ROWS[0]
    params = real_params()
    for mu, nu in [(jnp.bfloat16, jnp.float16)]:
        opt = build(row, mu, nu)
        _, state = jax.jit(three_steps)(opt, params, opt.init(params))
        assert_state_dtypes(state, row, params, mu, nu, "after 3 compiled updates")
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


SCALERS = [r for r in ROWS if r.name.startswith("scale_by_")]


@pytest.mark.parametrize("row", SCALERS, ids=lambda r: r.name)
def test_a_narrow_mu_dtype_saturates(row: Row) -> None:
    """``m`` beyond a narrow ``mu_dtype``'s range is stored as its maximum, not inf
    (docs/numerics.md), so the next update stays finite: float16 ``m`` for float32
    params, ``m = (1 - b1)·g = 2e5 > 65504``."""
    opt = build(row, jnp.float16, None)
    params = jnp.zeros(2, jnp.float32)
    state = opt.init(params)
    for _ in range(2):
        u, state = opt.update(jnp.full(2, 2e6, jnp.float32), state)
        assert state.m.dtype == jnp.float16
        np.testing.assert_array_equal(state.m, np.float16(65504))
        assert bool(jnp.all(jnp.isfinite(u))), (row.name, u)
