"""Run a check script of this folder in a subprocess with 8 CPU devices.

JAX fixes its device count at start-up, so checks that need 8 devices run in a
fresh process with ``--xla_force_host_platform_device_count=8``, importing this
checkout's adam_jax whatever is installed.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent

# What these subprocesses check is where arrays live, which collectives the optimized HLO
# holds, and that sharded results equal unsharded ones computed in the same process. LLVM's
# optimization of the CPU kernels changes none of it (the optimized HLO is the same text at
# level 0) and costs a third of these processes' CPU time, so they compile without it.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def run_on_8_cpu_devices(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(HERE.parent)
    return subprocess.run(
        [sys.executable, str(HERE / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
