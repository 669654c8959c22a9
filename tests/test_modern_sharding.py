"""Sharding of the modern optimizers' states: state follows params.

For ``schedule_free_adamw``, ``adopt``, ``stable_adamw``, ``ademamix`` and
``adamw(cautious=True)``, on a 2 x 4 mesh of 8 CPU devices with params of mixed
dtypes and layouts (``tests/_modern_sharding.py``, one subprocess for all cases):
after a jitted ``init`` and after four jitted, donated steps, every state leaf shaped
like a param has that param's sharding, the params and updates keep theirs, and both
equal the same steps on one device.

Collectives: ``schedule_free_adamw``, ``adopt`` and ``ademamix`` are elementwise
apart from scalar bookkeeping, so their compiled step has none. ``stable_adamw``'s
per-tensor rms and the cautious mask's per-tensor mean are reductions over each
tensor: on a sharded tensor they need an all-reduce, which is expected (and
asserted, which also shows that the scan sees collectives when there are any).
"""

from __future__ import annotations

import json

import pytest
from _devices import run_on_8_cpu_devices

ALL = ["schedule_free_adamw", "adopt", "stable_adamw", "ademamix", "adamw_cautious"]
REDUCING = {"stable_adamw", "adamw_cautious"}
# Error model: the sharded step may reduce in a different order (only the reducing
# optimizers reduce at all), a few ulps per step in the rms or the mask's mean, each
# a relative change of the step size; over four steps with lr = 1e-2 that stays far
# below 64 ulps of the params' dtype relative to the largest param.
ULPS = {"float64": 2.0**-52, "float32": 2.0**-23}


@pytest.fixture(scope="module")
def report():
    done = run_on_8_cpu_devices("_modern_sharding.py", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ALL)
def test_state_follows_params(report, name):
    case = report[name]
    assert case["init_leaves_checked"] >= 8  # at least two moments of four params
    assert case["update_leaves_checked"] == case["init_leaves_checked"]
    assert case["init_mismatches"] == []
    assert case["update_mismatches"] == []


@pytest.mark.parametrize("name", ALL)
def test_equal_to_one_device(report, name):
    for what in ("param_errors", "update_errors"):
        for key, (dtype, err) in report[name][what].items():
            assert err <= 64 * ULPS[dtype], (what, key, dtype, err)


@pytest.mark.parametrize("name", ALL)
def test_collectives_only_for_per_tensor_reductions(report, name):
    if name in REDUCING:
        assert "all-reduce" in report[name]["collectives"]
    else:
        assert report[name]["collectives"] == []


def test_stable_adamw_clipping_fired(report):
    """The gradient spike makes the rms clipping fire, so its reduction is exercised."""
    assert report["stable_adamw"]["smallest_lr_scale"] < 1
