"""Core bad input: plain-number hyperparameters out of range, trees that do not match."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

OUT_OF_RANGE = [
    (adam_jax.adam, {"learning_rate": -1e-3}, "learning_rate", "-0.001"),
    (adam_jax.adam, {"b1": 1.0}, "b1", "1.0"),
    (adam_jax.adam, {"b1": -0.1}, "b1", "-0.1"),
    (adam_jax.adam, {"b2": 1.5}, "b2", "1.5"),
    (adam_jax.adam, {"b2": float("nan")}, "b2", "nan"),
    (adam_jax.adam, {"eps": -1e-8}, "eps", "-1e-08"),
    (adam_jax.adam, {"eps_root": -1.0}, "eps_root", "-1.0"),
    (adam_jax.adam, {"weight_decay": -0.1}, "weight_decay", "-0.1"),
    (adam_jax.adamw, {"weight_decay": -1e-4}, "weight_decay", "-0.0001"),
    (adam_jax.amsgrad, {"b2": 1.0}, "b2", "1.0"),
    (adam_jax.amsgrad, {"max_of": "both"}, "max_of", "'both'"),
    (adam_jax.adamax, {"b1": 2.0}, "b1", "2.0"),
    (adam_jax.adamax, {"eps": -1.0}, "eps", "-1.0"),
    (adam_jax.adamaxw, {"learning_rate": -2e-3}, "learning_rate", "-0.002"),
    (adam_jax.scale_by_adam, {"b1": 1.0}, "b1", "1.0"),
    (adam_jax.scale_by_amsgrad, {"eps": -1.0}, "eps", "-1.0"),
    (adam_jax.scale_by_adamax, {"b2": -0.5}, "b2", "-0.5"),
    (adam_jax.adam, {"b1": np.float32(1.0)}, "b1", "1.0"),
    (adam_jax.adam, {"learning_rate": jnp.asarray(-1.0)}, "learning_rate", "-1.0"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "name", "shown"),
    OUT_OF_RANGE,
    ids=[f"{f.__name__}-{next(iter(kw))}={kw[next(iter(kw))]!r}" for f, kw, _, _ in OUT_OF_RANGE],
)
def test_out_of_range_raises_value_error_naming_argument_and_value(factory, kwargs, name, shown):
    with pytest.raises(ValueError, match=name) as info:
        factory(**kwargs)
    assert shown in str(info.value)


@pytest.mark.parametrize("b", [0.0, 0.999999])
def test_boundary_values_are_accepted(b):
    adam_jax.adam(0.0, b1=b, b2=b, eps=0.0, eps_root=0.0, weight_decay=0.0)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="b1"):
        adam_jax.adam(b1="0.9")
    with pytest.raises(TypeError, match="maximize"):
        adam_jax.adam(maximize=1)
    with pytest.raises(TypeError, match="eps"):
        adam_jax.adam(eps=True)


def test_mismatched_grads_tree_names_missing_and_extra_keys():
    opt = adam_jax.scale_by_adam()
    state = opt.init({"a": jnp.ones(2), "b": {"c": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"Missing from grads: \['b'\]\['c'\]") as info:
        opt.update({"a": jnp.ones(2), "d": jnp.ones(3)}, state)
    assert "Not in the state: ['d']" in str(info.value)


def test_mismatched_leaf_shape_is_named():
    opt = adam_jax.scale_by_amsgrad()
    state = opt.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"grads\['a'\] has shape \(3,\)"):
        opt.update({"a": jnp.ones(3)}, state)


@pytest.mark.parametrize("factory", [adam_jax.scale_by_adam, adam_jax.scale_by_adamax])
def test_integer_params_are_rejected(factory):
    with pytest.raises(TypeError, match="integer params is meaningless"):
        factory().init({"w": jnp.arange(3)})


def test_schedule_returning_non_scalar_is_named():
    opt = adam_jax.adam(lambda count: jnp.ones(2) * 1e-3)
    params = jnp.ones(2)
    state = opt.init(params)
    with pytest.raises(ValueError, match="learning_rate schedule must return a scalar"):
        opt.update(jnp.ones(2), state, params)


def test_non_scalar_learning_rate_is_named():
    with pytest.raises(ValueError, match="learning_rate must be a scalar"):
        adam_jax.adam(jnp.ones(3))


def test_failed_update_leaves_inputs_usable():
    opt = adam_jax.adam(0.1)
    params = {"a": jnp.ones(2)}
    state = opt.init(params)
    with pytest.raises(ValueError):
        opt.update({"b": jnp.ones(2)}, state, params)
    u, _ = opt.update({"a": jnp.ones(2)}, state, params)
    ref_u, _ = optax.adam(0.1).update({"a": jnp.ones(2)}, optax.adam(0.1).init(params))
    np.testing.assert_allclose(np.asarray(u["a"]), np.asarray(ref_u["a"]), rtol=1e-6)
