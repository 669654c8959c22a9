"""adam_jax.enable_compilation_cache: JAX's persistent cache, only when asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

import adam_jax

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    import adam_jax

    before = jax.config.jax_compilation_cache_dir  # importing adam_jax set nothing
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None
    )
    adam_jax.enable_compilation_cache(sys.argv[1], min_compile_time_secs=0)

    def run():
        r = adam_jax.fit(lambda w: jnp.sum((w - 3.0) ** 2), jnp.zeros(2), adam_jax.adam(0.1),
                         num_steps=20, early_stopping=adam_jax.early_stopping(3, target=1e-3))
        return r.params.tolist()

    first = run()
    n = len(hits)
    jax.clear_caches()  # as a new process would start: nothing compiled in memory
    again = run()
    print(json.dumps({"before": before, "hits_first": n, "hits_again": len(hits) - n,
                      "equal": first == again}))
    """
)


def test_a_cleared_process_loads_fit_from_the_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] is None
    # Every compile of the second run read the cache: fit came back from disk.
    assert out["hits_again"] >= 1 and out["equal"], out
    assert any((tmp_path / "cache").iterdir())


def test_importing_sets_nothing_and_bad_arguments_are_named(tmp_path):
    assert jax.config.jax_compilation_cache_dir is None
    with pytest.raises(ValueError, match="min_compile_time_secs"):
        adam_jax.enable_compilation_cache(tmp_path, min_compile_time_secs=-1)
    with pytest.raises(TypeError, match="min_compile_time_secs"):
        adam_jax.enable_compilation_cache(tmp_path, min_compile_time_secs="1")
    assert jax.config.jax_compilation_cache_dir is None
