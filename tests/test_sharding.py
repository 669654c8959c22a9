"""adam_jax on JAX's distribution engine: meshes, NamedSharding, ZeRO-1, batched fits.

The checks need 8 devices, and JAX fixes its device count at start-up, so
``tests/_sharding_checks.py`` runs them once in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on the CPU and prints a
JSON report; each test below asserts one property of that report. Every check
runs on meshes with Auto axes (GSPMD: ``jax.sharding.Mesh``'s default) and with
Explicit axes (sharding in types: ``jax.make_mesh``'s default, under
``jax.set_mesh``).
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _devices import run_on_8_cpu_devices
from jax.sharding import PartitionSpec as P

import adam_jax

HERE = pathlib.Path(__file__).parent
MODES = ["auto", "explicit"]
OPTIMIZERS = [
    "scale_by_adam",
    "scale_by_amsgrad",
    "scale_by_adamax",
    "adam",
    "adamw",
    "amsgrad",
    "adamax",
    "adamaxw",
    "adam_schedule",
    "nadam",
    "adamw_masked",
    "amsgrad_corrected_maximize",
    "adamaxw_eps_in_max",
    "nadamw",
    "radam",
]
# Relative error allowed between a sharded run and the same run on one device.
RTOL = {"float64": 1e-12, "float32": 1e-6, "complex64": 1e-6, "bfloat16": 1e-2}


@pytest.fixture(scope="module")
def report():
    proc = run_on_8_cpu_devices("_sharding_checks.py")
    if proc.returncode != 0:
        pytest.fail(f"tests/_sharding_checks.py failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout)


def test_checks_ran_on_8_cpu_devices(report):
    assert report["device_count"] == 8
    assert report["platform"] == "cpu"


# --------------------------------------------------------------------------
# Params sharded over a ("data", "model") mesh: the state follows them.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_jit_init_gives_each_moment_its_params_sharding(report, mode, name):
    mismatches = report[f"param_sharded_{mode}"][name]["init_mismatches"]
    assert mismatches == [], "\n".join(mismatches)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_donated_updates_keep_every_sharding(report, mode, name):
    # Moments, updates and the new params after three jitted, donated steps.
    mismatches = report[f"param_sharded_{mode}"][name]["update_mismatches"]
    assert mismatches == [], "\n".join(mismatches)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_update_compiles_without_collectives(report, mode, name):
    found = report[f"param_sharded_{mode}"][name]["update_collectives"]
    assert found == [], f"the compiled {name}.update communicates: {found}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_run_equals_single_device_run(report, mode, name):
    errors = report[f"param_sharded_{mode}"][name]["errors"]
    assert set(errors) == {"w", "b", "e", "h", "z", "s"}
    for leaf, (dtype, err) in errors.items():
        assert err <= RTOL[dtype], f"{leaf} ({dtype}): relative error {err}"


def test_collective_scan_is_not_vacuous(report):
    # The same scan finds the all-reduce of a sum over a sharded array, and the
    # all-gather that ZeRO-1 needs to return replicated params.
    assert report["canary"]["sum_collectives"] == ["all-reduce"]
    for mode in MODES:
        for name, rec in report[f"zero1_{mode}"].items():
            assert "all-gather" in rec["step_collectives"], (mode, name)


# --------------------------------------------------------------------------
# ZeRO-1: replicated params, state split over "data" (4 of the 8 devices).
# --------------------------------------------------------------------------

ZERO1_SHAPES = {"w": (16, 12), "b": (12,), "odd": (3, 5), "s": ()}
ZERO1_SPECS = {"w": "P('data', None)", "b": "P('data',)", "odd": "P()", "s": "P()"}


@pytest.mark.parametrize("mode", MODES)
def test_zero1_state_is_split_over_the_data_axis(report, mode):
    for name, rec in report[f"zero1_{mode}"].items():
        assert rec["specs_match_after_init"], name
        assert rec["specs_match_after_step"], name
        for field, specs in rec["moment_specs"].items():
            assert specs == ZERO1_SPECS, (name, field)


@pytest.mark.parametrize("mode", MODES)
def test_zero1_run_equals_single_device_run(report, mode):
    for name, rec in report[f"zero1_{mode}"].items():
        for leaf, (dtype, err) in rec["errors"].items():
            assert err <= RTOL[dtype], (name, leaf, err)


@pytest.mark.parametrize("mode", MODES)
def test_zero1_bytes_per_device(report, mode):
    data_size = 4

    def moment_bytes(split):
        n = 0
        for shape in ZERO1_SHAPES.values():
            divisible = split and any(d % data_size == 0 for d in shape)
            n += math.prod(shape) // (data_size if divisible else 1)
        return 8 * n  # float64

    for name, rec in report[f"zero1_{mode}"].items():
        k, count = rec["n_moments"], 4  # the int32 step count is replicated
        assert rec["bytes_replicated"] == count + k * moment_bytes(False), name
        assert rec["bytes_zero1"] == count + k * moment_bytes(True), name
        # What the helper plans from eval_shape is what device 0 really holds.
        assert rec["bytes_zero1_planned"] == rec["bytes_zero1"], name
        assert rec["addressable_bytes_device0"] == rec["bytes_zero1"], name
        assert rec["bytes_zero1"] < 0.31 * rec["bytes_replicated"], name


def test_zero1_rule(report):
    specs = report["zero1_rule"]["specs"]
    assert specs == {
        "largest": "P(None, 'data')",
        "only_divisible": "P('data', None)",
        "tie_first": "P('data', None)",
        "indivisible": "P()",
        "scalar": "P()",
        "empty": "P()",
    }
    assert "'batch' is not an axis of the mesh" in report["zero1_rule"]["bad_axis_error"]


def test_zero1_spec_and_bytes_per_device_without_devices():
    assert adam_jax.zero1_spec((6, 16), 4, "data") == P(None, "data")
    assert adam_jax.zero1_spec((16, 16, 2), 8, "x") == P("x", None, None)
    assert adam_jax.zero1_spec((7,), 2, "data") == P()
    tree = {"a": np.zeros((3, 4), np.float32), "b": jax.ShapeDtypeStruct((5,), jnp.float64)}
    assert adam_jax.bytes_per_device(tree) == 3 * 4 * 4 + 5 * 8
    state = adam_jax.adam(1e-3).init({"w": jnp.zeros((4, 3), jnp.float32)})
    assert adam_jax.bytes_per_device(state) == 2 * 12 * 4 + 4


# --------------------------------------------------------------------------
# jit(vmap(fit)) with the problem axis split over all 8 devices.
# --------------------------------------------------------------------------

BATCHED = [("auto", "fixed_steps"), ("auto", "early_stopping"), ("explicit", "fixed_steps")]


@pytest.mark.parametrize(("mode", "variant"), BATCHED)
def test_batched_fit_equals_each_problem_fitted_alone(report, mode, variant):
    rec = report[f"batched_fit_{mode}"][variant]
    for field, err in rec["max_abs_errors"]:
        assert err <= 1e-12, f"{field}: {err}"
    if variant == "early_stopping":
        # The problems really stop at different steps.
        assert len(set(rec["num_steps"])) > 3


@pytest.mark.parametrize(("mode", "variant"), BATCHED)
def test_batched_fit_runs_each_problem_on_its_own_device(report, mode, variant):
    rec = report[f"batched_fit_{mode}"][variant]
    assert rec["params_spec"] == "P('problems',)"
    assert rec["device_ids"] == list(range(8))
    assert rec["problems_per_device"] == {str(d): [2 * d, 2 * d + 1] for d in range(8)}
    if variant == "fixed_steps":
        assert rec["collectives"] == []
    else:
        # Under vmap the loop runs while any problem runs: all-reducing the
        # loop's boolean condition is the only communication.
        assert rec["collectives"] == ["all-reduce"]
        assert rec["collective_result_types"]
        assert set(rec["collective_result_types"]) == {"pred[]"}


# --------------------------------------------------------------------------
# Bad input: JAX's own errors, untouched.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["indivisible_device_put", "indivisible_jit"])
def test_mesh_that_does_not_divide_the_batch_raises_jax_error(report, case):
    err = report["bad_input"][case]
    assert err is not None, "no error was raised"
    assert err["is_value_error"]
    assert err["module"].startswith("jax")
    assert "partitioned 8 times, but the dimension size is 6" in err["message"]
    assert err["adam_jax_frames"] == []


def test_params_on_disjoint_devices_raise_jax_error(report):
    err = report["bad_input"]["disjoint_update"]
    assert err is not None, "no error was raised"
    assert err["type"] == "ValueError"
    assert "incompatible devices" in err["message"]
    assert err["adam_jax_frames"] == []


# fit_batched gives each device its own lanes under shard_map, and sums one
# counter of the work done (BatchedWork) over the devices: nothing else.
BATCHED_DRIVER = {
    "_fit_batched.py": {"jax.shard_map(", "return results, jax.lax.psum(computed, spec[0])"}
}


def test_library_adds_no_collectives_or_resharding():
    # Communication and layout are left to jit and XLA: no module of the package
    # calls a collective or moves data between shardings, except the batched
    # driver's shard_map and its one counter.
    pattern = re.compile(
        r"\b(psum|pmean|pmax|all_gather|all_to_all|ppermute|psum_scatter|shard_map|pmap|"
        r"with_sharding_constraint|reshard|device_put)\b"
    )
    package = pathlib.Path(adam_jax.__file__).parent
    found = {
        f"{path.name}:{i}: {line.strip()}"
        for path in sorted(package.glob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
        and not line.lstrip().startswith(("#", ">>>", "..."))
        and line.strip() not in BATCHED_DRIVER.get(path.name, ())
    }
    assert not found, "\n".join(sorted(found))
