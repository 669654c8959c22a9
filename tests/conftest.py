"""Strict test configuration.

* float64 is enabled so parity tests against torch and NumPy can run in double
  precision; every test states its dtypes explicitly.
* Implicit rank promotion raises, so a broadcasting slip is an error.
* Warnings are errors (pyproject's ``filterwarnings``).
"""

from __future__ import annotations

import collections

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Property tests draw the same examples on every run, so CI is reproducible; explore
# new ones with `pytest --hypothesis-profile=explore` (or --hypothesis-seed=N).
hypothesis.settings.register_profile("default", derandomize=True, database=None)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile("default")

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# The dtype matrix every optimizer is run over.
DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16, jnp.complex64]

# Relative tolerance by dtype for comparisons against float64 references.
RTOL = {
    jnp.dtype(jnp.float64): 1e-12,
    jnp.dtype(jnp.float32): 2e-5,
    jnp.dtype(jnp.complex64): 2e-5,
    jnp.dtype(jnp.bfloat16): 3e-2,
    jnp.dtype(jnp.float16): 5e-3,
}


@pytest.fixture(params=DTYPES, ids=lambda d: jnp.dtype(d).name)
def dtype(request):
    return jnp.dtype(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The costliest modules, costliest first (seconds of one 2-core worker, from a full run with
# --durations); the others follow by number of tests, most first. `make test` hands whole
# modules to the next free worker (--dist loadfile) in this order (--no-loadscope-reorder:
# xdist alone orders by number of tests only, which leaves the few-test, many-second modules
# for last, one worker busy while the other idles): the long ones overlap each other and the
# short ones fill in at the end.
HEAVY_FIRST = [
    "test_notebooks.py",  # ~210 s
    "test_fault_tolerance.py",  # ~130 s (fit and fit_batched; ~50 s of it the killed workers)
    "test_fit_batched.py",  # ~120 s
    "test_sharding.py",  # ~90 s
    "test_multiprocess.py",  # ~60 s
    "test_fit_sharding.py",  # ~60 s
    "test_docs.py",  # ~60 s
    "test_bench_smoke.py",  # ~55 s
    "test_properties.py",  # ~50 s
    "test_demo.py",  # ~45 s
    "test_nadam_radam_properties.py",  # ~40 s
    "test_float32_vs_optax.py",  # ~12 s in one test
]


def pytest_collection_modifyitems(config, items):
    # Fail loudly if a test module forgot to import anything testable.
    if not items:
        raise pytest.UsageError("no tests collected")
    # A stable sort: each module's tests keep their order and stay together.
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    count = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path]))


@pytest.fixture
def torch_float64():
    """torch's default dtype float64 for the test (the parity tests run in double)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
