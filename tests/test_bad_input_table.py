"""Bad input, exhaustively, as a table.

Every public entry point: the fourteen constructors (``scale_by_adam``, ``scale_by_amsgrad``,
``scale_by_adamax``, ``scale_by_nadam``, ``scale_by_radam`` and their aliases), with every
argument each one accepts (read from its signature), and their ``init`` and ``update``.
Bad values: wrong types, out-of-range values, non-scalar hyperparameters, mismatched trees,
integer params, a learning-rate schedule that returns a non-scalar.

Each row names the exception and the words its message must contain: the argument (or the
tree path) and, for an out-of-range number, the value. For ``init`` and ``update`` a failed
call must leave nothing half-updated: the state and params passed in are unchanged, and
the next correct call gives bit for bit what it gives when the bad call never happened,
eagerly and under ``jax.jit``.

``STRICT_*`` rows are the same requirement for misuses that would otherwise pass silently
or fail later, elsewhere (None or a function for a number, a per-element array, an integer
storage dtype, a Python float leaf, complex grads for real params, another optimizer's
state, a params or mask tree that differs from the grads).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adam_jax

CONSTRUCTORS: dict[str, Callable[..., Any]] = {
    name: getattr(adam_jax, name)
    for name in [
        "scale_by_adam",
        "scale_by_amsgrad",
        "scale_by_adamax",
        "adam",
        "adamw",
        "amsgrad",
        "adamax",
        "adamaxw",
        "scale_by_nadam",
        "nadam",
        "nadamw",
        "scale_by_radam",
        "radam",
        "radamw",
        "stable_adamw",
        "ademamix",
    ]
}
ALIASES = [
    "adam",
    "adamw",
    "amsgrad",
    "adamax",
    "adamaxw",
    "nadam",
    "nadamw",
    "radam",
    "radamw",
    "stable_adamw",
    "ademamix",
]

KIND = {
    "learning_rate": "learning_rate",
    "b1": "decay",
    "b2": "decay",
    "eps": "non_negative",
    "eps_root": "non_negative",
    "weight_decay": "non_negative",
    "eps_hat": "flag",
    "bias_correction": "flag",
    "nesterov": "flag",
    "maximize": "flag",
    "decoupled_weight_decay": "flag",
    "eps_in_max": "flag",
    "max_of": "choice",
    "form": "choice",
    "momentum_decay": "non_negative_or_inf",
    "threshold": "non_negative",
    "mu_dtype": "dtype",
    "nu_dtype": "dtype",
    "mu_product_dtype": "dtype",
    "mask": "mask",
    "cautious": "cautious",
    "b3": "decay",
    "alpha": "non_negative",
    "alpha_warmup": "warmup",
    "b3_warmup": "warmup",
    "b3_schedule": "choice",
    "state_bits": "state_bits",
}


@dataclasses.dataclass(frozen=True)
class Bad:
    label: str
    value: Any
    exc: type[Exception]
    shows: str | None = None  # the value as the message must show it


def _not_a_schedule(count):
    return 0.9


NAN, INF = math.nan, math.inf

# Rejected with a message naming the argument (and the value when out of range).
BAD: dict[str, list[Bad]] = {
    "decay": [
        Bad("str", "0.9", TypeError, "'0.9'"),
        Bad("bool", True, TypeError, "True"),
        Bad("complex", 0.5 + 0.5j, TypeError, "(0.5+0.5j)"),
        Bad("one", 1.0, ValueError, "1.0"),
        Bad("negative", -0.1, ValueError, "-0.1"),
        Bad("nan", NAN, ValueError, "nan"),
        Bad("inf", INF, ValueError, "inf"),
        Bad("minus_inf", -INF, ValueError, "-inf"),
        Bad("int_one", 1, ValueError, "1"),
        Bad("np_float32_one", np.float32(1.0), ValueError, "1.0"),
        Bad("jax_array_1.5", jnp.asarray(1.5), ValueError, "1.5"),
    ],
    "non_negative": [
        Bad("str", "1e-8", TypeError, "'1e-8'"),
        Bad("bool", False, TypeError, "False"),
        Bad("complex", 1j, TypeError, "1j"),
        Bad("negative", -1e-8, ValueError, "-1e-08"),
        Bad("nan", NAN, ValueError, "nan"),
        Bad("inf", INF, ValueError, "inf"),
        Bad("minus_inf", -INF, ValueError, "-inf"),
        Bad("jax_array_negative", jnp.asarray(-2.0), ValueError, "-2.0"),
    ],
    "non_negative_or_inf": [],  # filled below: "non_negative" except inf, which is allowed
    "learning_rate": [
        Bad("str", "0.1", TypeError, "'0.1'"),
        Bad("bool", True, TypeError, "True"),
        Bad("complex", 0.1j, TypeError, "0.1j"),
        Bad("negative", -1e-3, ValueError, "-0.001"),
        Bad("nan", NAN, ValueError, "nan"),
        Bad("inf", INF, ValueError, "inf"),
        Bad("jax_array_negative", jnp.asarray(-1.0), ValueError, "-1.0"),
        Bad("vector", jnp.full(3, 1e-3), ValueError, "(3,)"),
    ],
    "flag": [
        Bad("int_1", 1, TypeError, "1"),
        Bad("int_0", 0, TypeError, "0"),
        Bad("str", "yes", TypeError, "'yes'"),
        Bad("none", None, TypeError, "None"),
        Bad("jax_bool_array", jnp.asarray(True), TypeError),
    ],
    "choice": [
        Bad("unknown", "both", ValueError, "'both'"),
        Bad("wrong_case", "RAW", ValueError, "'RAW'"),
        Bad("none", None, ValueError, "None"),
        Bad("int", 1, ValueError, "1"),
        Bad("list", ["raw"], ValueError, "['raw']"),
    ],
    "dtype": [],
    "mask": [],
    "cautious": [
        Bad("unknown", "both", ValueError, "'both'"),
        Bad("wrong_case", "TIMM", ValueError, "'TIMM'"),
        Bad("int", 1, TypeError, "1"),
        Bad("none", None, TypeError, "None"),
    ],
    "warmup": [
        Bad("zero", 0, ValueError, "0"),
        Bad("negative", -3, ValueError, "-3"),
        Bad("float", 2.5, ValueError, "2.5"),
        Bad("bool", True, ValueError, "True"),
        Bad("str", "10", ValueError, "'10'"),
    ],
    "state_bits": [
        Bad("sixteen", 16, ValueError, "16"),
        Bad("bool", True, ValueError, "True"),
        Bad("str", "8", ValueError, "'8'"),
        Bad("float", 8.0, ValueError, "8.0"),
    ],
}

# The same requirement, for misuses that would otherwise pass silently or surface later.
STRICT_BAD: dict[str, list[Bad]] = {
    "decay": [
        Bad("none", None, TypeError, "None"),
        Bad("callable", _not_a_schedule, TypeError),
        Bad("vector", jnp.asarray([0.9, 0.99]), ValueError, "(2,)"),
        Bad("list", [0.9], ValueError, "(1,)"),
    ],
    "non_negative": [
        Bad("none", None, TypeError, "None"),
        Bad("callable", _not_a_schedule, TypeError),
        Bad("vector", jnp.full(3, 1e-8), ValueError, "(3,)"),
    ],
    "non_negative_or_inf": [],
    "learning_rate": [
        Bad("list", [1e-3], ValueError, "(1,)"),
    ],
    "flag": [],
    "choice": [],
    "dtype": [
        Bad("int32", jnp.int32, TypeError, "int32"),
        Bad("bool", jnp.bool_, TypeError, "bool"),
        Bad("unknown_name", "float17", TypeError, "float17"),
    ],
    "mask": [],
    "cautious": [],
    "warmup": [],
    "state_bits": [],
}
for _table in (BAD, STRICT_BAD):
    _table["non_negative_or_inf"] = [b for b in _table["non_negative"] if b.label != "inf"]

# weight_decay goes to optax.add_decayed_weights, which accepts a schedule: only the
# decays and eps/eps_root reject callables.
NOT_FOR = {("callable", "weight_decay")}


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    call: Callable[[], Any]
    exc: type[Exception]
    contains: tuple[str, ...]


def _constructor_rows(table: dict[str, list[Bad]]) -> list[Row]:
    rows = []
    for cname, ctor in CONSTRUCTORS.items():
        for arg in inspect.signature(ctor).parameters:
            for bad in table[KIND[arg]]:
                if (bad.label, arg) in NOT_FOR:
                    continue
                contains = (arg,) if bad.shows is None else (arg, bad.shows)
                rows.append(
                    Row(
                        f"{cname}({arg}={bad.label})",
                        lambda ctor=ctor, arg=arg, v=bad.value: ctor(**{arg: v}),
                        bad.exc,
                        contains,
                    )
                )
    return rows


def _check_row(row: Row) -> None:
    with pytest.raises(row.exc) as info:
        row.call()
    message = str(info.value)
    for word in row.contains:
        assert word in message, f"{row.id}: {word!r} not in the message {message!r}"


CONSTRUCTOR_ROWS = _constructor_rows(BAD)
STRICT_CONSTRUCTOR_ROWS = _constructor_rows(STRICT_BAD)


@pytest.mark.parametrize("row", CONSTRUCTOR_ROWS, ids=lambda r: r.id)
def test_constructor_rejects_bad_argument_naming_it(row):
    _check_row(row)


def test_table_covers_every_argument_of_every_constructor():
    covered = {(r.id.split("(")[0], r.id.split("(")[1].split("=")[0]) for r in CONSTRUCTOR_ROWS}
    strict = {
        (r.id.split("(")[0], r.id.split("(")[1].split("=")[0]) for r in STRICT_CONSTRUCTOR_ROWS
    }
    missing = [
        (c, a)
        for c, ctor in CONSTRUCTORS.items()
        for a in inspect.signature(ctor).parameters
        if (c, a) not in covered | strict and KIND[a] != "mask"
    ]
    assert not missing, missing


# --------------------------------------------------------------------------
# init and update.
# --------------------------------------------------------------------------

PARAMS = {"a": jnp.ones(3, jnp.float32), "b": {"c": jnp.full((2, 2), 0.5, jnp.float64)}}
GRADS = {"a": jnp.full(3, 0.25, jnp.float32), "b": {"c": jnp.full((2, 2), -1.0, jnp.float64)}}


GOOD = object()


@dataclasses.dataclass(frozen=True)
class Call:
    """A bad ``init`` (``bad_params`` for init) or ``update`` call on ``make()``."""

    id: str
    make: Callable[[], Any]
    method: str  # "init" or "update"
    exc: type[Exception]
    contains: tuple[str, ...]
    params: Any = None  # init's argument; for update, init is called on PARAMS
    grads: Any = GOOD  # update's arguments; GOOD means GRADS, PARAMS, init(PARAMS)
    update_params: Any = GOOD
    state: Callable[[], Any] | None = None
    # False where the optimizer itself is misconfigured: no correct update call exists.
    recoverable: bool = True


def _all(fn) -> list[Call]:
    return [fn(name) for name in CONSTRUCTORS]


def _aliases(fn) -> list[Call]:
    return [fn(name) for name in ALIASES]


def _make(name, **kw):
    return lambda: CONSTRUCTORS[name](**kw)


CALLS: list[Call] = [
    *_all(
        lambda n: Call(
            f"{n}.init(integer params)",
            _make(n),
            "init",
            TypeError,
            ("int32", "integer params is meaningless"),
            params={"w": jnp.arange(3, dtype=jnp.int32)},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.init(bool params)",
            _make(n),
            "init",
            TypeError,
            ("bool",),
            params={"w": jnp.ones(2, bool)},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.init(one integer leaf among floats)",
            _make(n),
            "init",
            TypeError,
            ("uint8", "integer params is meaningless"),
            params={"w": jnp.ones(2), "n": jnp.ones(2, jnp.uint8)},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.update(grads missing a key)",
            _make(n),
            "update",
            ValueError,
            ("Missing from grads", "['b']['c']"),
            grads={"a": GRADS["a"]},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.update(grads with an extra key)",
            _make(n),
            "update",
            ValueError,
            ("Not in the state", "['z']"),
            grads={**GRADS, "z": jnp.ones(2)},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.update(grads tuple where params have a dict)",
            _make(n),
            "update",
            ValueError,
            ("Missing from grads", "['b']['c']", "Not in the state", "['b'][0]"),
            grads={"a": GRADS["a"], "b": (GRADS["b"]["c"],)},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.update(grads None)",
            _make(n),
            "update",
            ValueError,
            ("Missing from grads",),
            grads=None,
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.update(grads leaf of another shape)",
            _make(n),
            "update",
            ValueError,
            ("grads['b']['c']", "(2, 3)", "(2, 2)"),
            grads={"a": GRADS["a"], "b": {"c": jnp.ones((2, 3))}},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.update(integer grads)",
            _make(n),
            "update",
            TypeError,
            ("int32",),
            grads={"a": jnp.ones(3, jnp.int32), "b": GRADS["b"]},
        )
    ),
    *_aliases(
        lambda n: Call(
            f"{n}.update(no params)",
            _make(n),
            "update",
            ValueError,
            ("params",),
            update_params=None,
        )
    ),
    *_aliases(
        lambda n: Call(
            f"{n}.update(schedule returning a vector)",
            _make(n, learning_rate=lambda count: jnp.full(3, 1e-3)),
            "update",
            ValueError,
            ("learning_rate schedule must return a scalar", "(3,)"),
            recoverable=False,
        )
    ),
    *_aliases(
        lambda n: Call(
            f"{n}.update(schedule returning shape (1,))",
            _make(n, learning_rate=lambda count: jnp.full((1,), 1e-3)),
            "update",
            ValueError,
            ("learning_rate schedule must return a scalar", "(1,)"),
            recoverable=False,
        )
    ),
]


def _state_of(name):
    """A state from a different optimizer with the same param tree."""
    other = {
        "scale_by_adam": "scale_by_amsgrad",
        "scale_by_amsgrad": "scale_by_adam",
        "scale_by_adamax": "scale_by_adam",
        "adam": "amsgrad",
        "adamw": "adam",
        "amsgrad": "adam",
        "adamax": "adamaxw",
        "adamaxw": "adamw",
        "scale_by_nadam": "scale_by_radam",
        "scale_by_radam": "scale_by_nadam",
        "nadam": "radam",
        "nadamw": "adamw",
        "radam": "nadam",
        "radamw": "adamw",
        "stable_adamw": "adamw",
        "ademamix": "adamw",
    }[name]
    return lambda: CONSTRUCTORS[other]().init(PARAMS)


EXPECTED_STATE = {
    "scale_by_adam": "AdamState",
    "scale_by_amsgrad": "AMSGradState",
    "scale_by_adamax": "AdamaxState",
    "adam": "AdamState",
    "adamw": "AdamState",
    "amsgrad": "AMSGradState",
    "adamax": "AdamaxState",
    "adamaxw": "AdamaxState",
    "scale_by_nadam": "NAdamState",
    "scale_by_radam": "RAdamState",
    "nadam": "NAdamState",
    "nadamw": "NAdamState",
    "radam": "RAdamState",
    "radamw": "RAdamState",
    "stable_adamw": "StableAdamWState",
    "ademamix": "AdEMAMixState",
}

STRICT_CALLS: list[Call] = [
    *_all(
        lambda n: Call(
            f"{n}.init(a Python float leaf)",
            _make(n),
            "init",
            TypeError,
            ("params['w']", "float"),
            params={"w": 1.0, "v": jnp.ones(2)},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.init(a str leaf)",
            _make(n),
            "init",
            TypeError,
            ("params['w']", "str"),
            params={"w": "abc"},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.update(complex grads for real params)",
            _make(n),
            "update",
            TypeError,
            ("grads['a']", "complex64"),
            grads={"a": GRADS["a"].astype(jnp.complex64), "b": GRADS["b"]},
        )
    ),
    *_all(
        lambda n: Call(
            f"{n}.update(state of another optimizer)",
            _make(n),
            "update",
            TypeError,
            (EXPECTED_STATE[n],),
            state=_state_of(n),
        )
    ),
    *_aliases(
        lambda n: Call(
            f"{n}.update(params missing a key)",
            _make(n),
            "update",
            ValueError,
            ("params", "['b']['c']"),
            update_params={"a": PARAMS["a"]},
        )
    ),
    *_aliases(
        lambda n: Call(
            f"{n}.update(params leaf of another shape)",
            _make(n),
            "update",
            ValueError,
            ("params['a']", "(4,)", "(3,)"),
            update_params={"a": jnp.ones(4, jnp.float32), "b": PARAMS["b"]},
        )
    ),
    *_aliases(
        lambda n: Call(
            f"{n}.update(schedule returning None)",
            _make(n, learning_rate=lambda count: None),
            "update",
            TypeError,
            ("learning_rate schedule", "None"),
            recoverable=False,
        )
    ),
    *[
        Call(
            f"{n}(mask missing a key).init",
            _make(n, mask={"a": True}),
            "init",
            ValueError,
            ("mask", "['b']"),
            params=PARAMS,
        )
        for n in ["adamw", "adamaxw", "nadamw", "radamw"]
    ],
]


def _bits(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# One jitted update per optimizer configuration, shared by its rows: the correct calls
# after each bad one then compile once a configuration, not once a row. Equal
# optimizers (the same tree, with the same static options, and the same leaves) have
# the same update.
_JITTED_UPDATES: dict[tuple, Callable[..., Any]] = {}


def _jitted_update(opt) -> Callable[..., Any]:
    leaves = jax.tree.leaves(opt)
    key = (
        str(jax.tree.structure(opt)),
        tuple((type(x).__name__, np.asarray(x).dtype.str, np.asarray(x).tobytes()) for x in leaves),
    )
    if key not in _JITTED_UPDATES:
        _JITTED_UPDATES[key] = jax.jit(opt.update)
    return _JITTED_UPDATES[key]


def _check_call(call: Call, jit: bool) -> None:
    opt = call.make()
    if call.method == "init":
        params_bits = _bits(call.params)
        init = jax.jit(opt.init) if jit else opt.init
        with pytest.raises(call.exc) as info:
            init(call.params)
        assert _bits(call.params) == params_bits
    else:
        state = opt.init(PARAMS)
        bad_state = call.state() if call.state is not None else state
        grads = GRADS if call.grads is GOOD else call.grads
        params = PARAMS if call.update_params is GOOD else call.update_params
        snapshot = _bits((state, bad_state, PARAMS, GRADS))
        update = _jitted_update(opt) if jit else opt.update
        with pytest.raises(call.exc) as info:
            update(grads, bad_state, params)
        # Nothing was half-updated: the inputs are intact and the next correct call gives
        # what it gives on a state that never saw the bad call.
        assert _bits((state, bad_state, PARAMS, GRADS)) == snapshot
        if call.recoverable:
            after = update(GRADS, state, PARAMS)
            fresh = update(GRADS, opt.init(PARAMS), PARAMS)
            assert _bits(after) == _bits(fresh)
    message = str(info.value)
    for word in call.contains:
        assert word in message, f"{call.id}: {word!r} not in the message {message!r}"


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.id)
def test_bad_init_or_update_is_named_and_changes_nothing(call, jit):
    _check_call(call, jit)


# --------------------------------------------------------------------------
# Misuses that would otherwise pass silently or fail later, elsewhere.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("row", STRICT_CONSTRUCTOR_ROWS, ids=lambda r: r.id)
def test_strict_constructor_rejects_bad_argument_naming_it(row):
    _check_row(row)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("call", STRICT_CALLS, ids=lambda c: c.id)
def test_strict_bad_init_or_update_is_named_and_changes_nothing(call, jit):
    if jit and "Python float leaf" in call.id:
        # Under jit a Python float leaf arrives as a weak-typed scalar tracer, which
        # cannot be told apart from a jnp scalar: only the eager call can name it.
        init = jax.jit(call.make().init)
        state = init(call.params)
        assert state is not None
        return
    _check_call(call, jit)
