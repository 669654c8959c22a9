"""Worker processes for the fault-tolerance tests: start, watch, kill, compare.

The workers (``_fault_worker.py``) import this checkout's adam_jax and share a
compilation cache; every wait is bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import adam_jax

WORKER = Path(__file__).with_name("_fault_worker.py")
TIMEOUT = 120  # seconds for one worker process; a hung one is killed and fails the test


def worker_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The workers import this checkout's adam_jax and share a compilation cache."""
    root = Path(adam_jax.__file__).resolve().parent.parent
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(root), out.get("PYTHONPATH", "")])
    out["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    out["JAX_PLATFORMS"] = "cpu"
    return out


def start(env: dict[str, str], mode: str, workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-u", str(WORKER), mode, str(workdir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(proc: subprocess.Popen, word: str, count: int = 1) -> bool:
    """Read stdout until ``word`` has been printed ``count`` times; False if the process ended."""
    deadline = time.monotonic() + TIMEOUT
    seen = 0
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        seen += line.strip() == word
        if seen >= count:
            return True
    proc.kill()
    pytest.fail(f"worker printed no {word!r} within {TIMEOUT} s")


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"worker still running after {TIMEOUT} s")
    return proc.returncode, err


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the worker if it still runs; whether it did."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    return finish(proc)[0] == -signal.SIGKILL


def run_to_end(env: dict[str, str], mode: str, workdir: Path) -> None:
    rc, err = finish(start(env, mode, workdir))
    assert rc == 0, err


def assert_bitwise_equal(want_dir: Path, want: str, got_dir: Path, got: str, names) -> None:
    """The arrays each worker saved as ``{want}_{name}.npz`` and ``{got}_{name}.npz``
    have the same dtypes, shapes and bytes."""
    for name in names:
        a_file = np.load(want_dir / f"{want}_{name}.npz")
        b_file = np.load(got_dir / f"{got}_{name}.npz")
        assert a_file.files == b_file.files, name
        for key in a_file.files:
            a, b = a_file[key], b_file[key]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), (name, key)
            assert a.tobytes() == b.tobytes(), (name, key, a, b)


def listing(directory: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
    )
