"""fit on inputs sharded over 8 CPU devices, on meshes with Explicit and with Auto axes.

``tests/_fit_sharding_checks.py`` runs every case once in a subprocess (the
device count is fixed when JAX starts) and reports, per case, whether the
sharded run equals the unsharded one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _devices import FAST_COMPILE_FLAGS

HERE = Path(__file__).resolve().parent
CASES = [
    "vmap",
    "vmap_log_progress",
    "vmap_history_last",
    "vmap_data_restore_best",
    "vmap_history_every",
    "plain",
]


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
    proc = subprocess.run(
        [sys.executable, str(HERE / "_fit_sharding_checks.py")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_fit_under_set_mesh_equals_the_unsharded_one(results, axis_type, case):
    got = results[f"{axis_type}/set_mesh/{case}"]
    assert got.get("equal") is True, got
    if case != "plain":
        assert got["spec"].startswith("P('x'"), got  # the result stays sharded


@pytest.mark.parametrize("case", CASES)
def test_sharded_fit_on_auto_axes_needs_no_context_mesh(results, case):
    got = results[f"Auto/no_context/{case}"]
    assert got.get("equal") is True, got


@pytest.mark.parametrize("case", CASES)
def test_explicit_axes_need_no_context_mesh(results, case):
    got = results[f"Explicit/no_context/{case}"]
    if case == "plain" and got.get("grad_alone", "ok") != "ok":
        # JAX itself rejects this loss's gradient on these shardings; fit passes it on.
        assert got["error"].startswith(got["grad_alone"] + ":"), got
    else:
        assert got.get("equal") is True, got
