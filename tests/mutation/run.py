"""A rerunnable mutation pass over adam_jax's core modules.

Each mutation is one realistic one-line bug (an exact text replacement in one module).
For each, the package is copied into a fresh temporary directory with the mutation
applied there (the working files are never touched), and the test files chosen for that
mutant run against the copy, put first on ``PYTHONPATH``; the tests and the pytest
configuration are copied too, so the run's working directory holds nothing else named
``adam_jax``. A mutant is *killed* when pytest fails, *survives* when it passes, and
*timeout* when it runs past ``--timeout`` seconds. The run ends with the kill ratio
(killed / all) and the survivors.

Usage, from the repository root::

    python tests/mutation/run.py                 # every mutation
    python tests/mutation/run.py -k radam -k nadam   # the mutations whose name has these
    python tests/mutation/run.py --list          # the mutations and their tests
    python tests/mutation/run.py --timeout 300 --json out.json

Each mutant's tests are chosen to run in about a minute on two cores (``-x``: a killed
mutant stops at its first failure). This file is not collected by pytest (no ``test_``
prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
PKG = "adam_jax"


class Mutation(NamedTuple):
    name: str
    module: str  # file under adam_jax/
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments: test files, -k expressions


DT = ("tests/test_state_dtypes.py",)
HG = ("tests/test_hypergradients.py",)
RC = ("tests/test_resume_counts.py",)
OPTAX = ("tests/test_parity_optax.py",)
TORCH = ("tests/test_parity_torch.py", "tests/test_parity_torch_family.py")
ES = ("tests/test_early_stopping.py",)
HIST = ("tests/test_fit_history.py",)
BATCHED = ("tests/test_fit_batched.py", "-k", "computes_only or streamed")
NONFINITE = ("tests/test_nonfinite.py",)

MUTATIONS = [
    # --- storage dtypes -------------------------------------------------------------
    Mutation("adam_mu_dtype_bf16_stored_as_param", "_adam.py",
             "m=_dtypes.zeros_like(params, config.mu_dtype),",
             'm=_dtypes.zeros_like(params, None if str(config.mu_dtype) == "bfloat16" else config.mu_dtype),',  # noqa: E501
             DT),
    Mutation("adam_nu_dtype_ignored", "_adam.py",
             "v=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),",
             "v=_dtypes.zeros_like(params, None, real=True, squares=True),", DT),
    Mutation("float16_exception_overrides_nu_dtype", "_dtypes.py",
             "if squares and dtype is None and dt == jnp.float16:",
             "if squares and dt == jnp.float16:", DT),
    Mutation("adamax_u_widened_like_a_square", "_adamax.py",
             "u=_dtypes.zeros_like(params, None, real=True),",
             "u=_dtypes.zeros_like(params, None, real=True, squares=True),", DT),
    Mutation("nadam_product_always_float32", "_nadam.py",
             "return np.dtype(jnp.result_type(jnp.float32, *dtypes))",
             "return np.dtype(jnp.float32)", DT),
    Mutation("amsgrad_v_max_in_mu_dtype", "_amsgrad.py",
             "v_max=_dtypes.zeros_like(params, config.nu_dtype, real=True, squares=True),",
             "v_max=_dtypes.zeros_like(params, config.mu_dtype, real=True, squares=True),", DT),
    Mutation("m_stored_in_compute_dtype", "_adam.py",
             "return _dtypes.cast(u, g.dtype), _common.store(m_new, m), _dtypes.cast(v_new, v.dtype)",  # noqa: E501
             "return _dtypes.cast(u, g.dtype), m_new, _dtypes.cast(v_new, v.dtype)", DT),
    # --- hypergradients and branches ------------------------------------------------
    Mutation("radam_rho_unguarded", "_radam.py",
             "rho_safe = jnp.where(rectified, rho, rho_inf)", "rho_safe = rho",
             (*HG, "-k", "radam")),
    Mutation("correction_without_small_decay_branch", "_common.py",
             "small = d < 0.5", "small = d < 0.0", (*HG, "-k", "zero")),
    Mutation("radam_tie_comparison_swapped", "_radam.py",
             'rectified = jnp.greater_equal(rho, thr) if config.form == "optax" else jnp.greater(rho, thr)',  # noqa: E501
             'rectified = jnp.greater(rho, thr) if config.form == "optax" else jnp.greater_equal(rho, thr)',  # noqa: E501
             (*HG, "-k", "radam")),
    # --- update arithmetic ----------------------------------------------------------
    Mutation("ema_decays_the_gradient", "_common.py",
             "g_term = scale(decay.one_minus_d, g)", "g_term = scale(decay.d, g)", OPTAX),
    Mutation("bias_correction_off_by_one", "_common.py",
             "t = count.astype(jnp.result_type(d))", "t = (count - 1).astype(jnp.result_type(d))",
             OPTAX),
    Mutation("nesterov_next_correction_at_t", "_adam.py",
             "c1_next = _common.correction(mo.b1, _common.increment(count))",
             "c1_next = _common.correction(mo.b1, count)", OPTAX),
    Mutation("amsgrad_max_of_swapped", "_amsgrad.py",
             'corrected = config.max_of == "corrected"',
             'corrected = config.max_of == "raw"', OPTAX),
    Mutation("adamax_eps_accumulates_in_norm", "_adamax.py",
             "u_new = lax.max(lax.add(abs_g, s.eps), u_decayed)",
             "u_new = lax.add(lax.max(abs_g, u_decayed), s.eps)", TORCH),
    Mutation("nadam_next_mu_at_t", "_nadam.py",
             "mu_next, _ = momentum_schedule(b1, md, t + 1)",
             "mu_next, _ = momentum_schedule(b1, md, t)", TORCH),
    Mutation("decoupled_decay_before_scaler", "_alias.py",
             'parts |= {"scaler": scaler, "weight_decay": decay}',
             'parts |= {"weight_decay": decay, "scaler": scaler}', OPTAX),
    Mutation("narrow_m_overflows", "_common.py",
             "if not _narrower(dtype, jnp.dtype(x.dtype)):", "if True:", (*DT, "-k", "saturates")),
    Mutation("zero_decay_not_clamped", "_common.py",
             "np.inf if d_ != 0 else", "np.inf if True else", NONFINITE),
    # --- early stopping and history -------------------------------------------------
    Mutation("early_stopping_ties_improve", "_early_stopping.py",
             "improved = finite & (v < best - delta)", "improved = finite & (v <= best - delta)",
             ES),
    Mutation("patience_one_late", "_early_stopping.py",
             "out_of_patience = False if n.patience is None else ~improved & (wait >= n.patience)",
             "out_of_patience = False if n.patience is None else ~improved & (wait > n.patience)",
             ES),
    Mutation("start_step_one_late", "_early_stopping.py",
             "counted = ~state.should_stop & (state.step >= n.start_step)",
             "counted = ~state.should_stop & (state.step > n.start_step)", ES),
    Mutation("history_every_k_off_by_one", "_history.py",
             "index, keep = i // history.k, on & (i % history.k == 0)",
             "index, keep = i // history.k, on & ((i + 1) % history.k == 0)", HIST),
    Mutation("history_length_rounds_down", "_history.py",
             "n = -(-num_steps // self.k)", "n = num_steps // self.k", HIST),
    # --- checkpoints and the batched driver -----------------------------------------
    Mutation("restore_oldest_checkpoint", "_checkpoint.py",
             "for step in sorted(mgr.all_steps(), reverse=True):",
             "for step in sorted(mgr.all_steps()):", RC),
    Mutation("resume_one_step_early", "_fit_engine.py",
             "return state._replace(log=log)", "return state._replace(log=log, i=state.i - 1)",
             RC),
    Mutation("batched_resume_skips_a_problem", "_segments.py",
             'jnp.asarray(record["queue"], jnp.int32)',
             'jnp.asarray(record["queue"] + 1, jnp.int32)', RC),
    Mutation("batched_resume_forgets_work", "_segments.py",
             'record["iterations"], record["computed"], record["finished"]',
             'record["iterations"], 0, record["finished"]', RC),
    Mutation("batched_counts_running_lanes_only", "_batched.py",
             "computed=c.computed + running.shape[0]",
             "computed=c.computed + jnp.sum(running, dtype=jnp.int32)",
             BATCHED),
    Mutation("batched_refill_loads_the_next_problem", "_batched.py",
             "source = jnp.minimum(queued, n - 1)", "source = jnp.minimum(queued + 1, n - 1)",
             BATCHED),
]  # fmt: skip


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / PKG / mutation.module
    text = path.read_text()
    if text.count(mutation.old) != 1:
        raise SystemExit(
            f"{mutation.name}: expected the text once in {mutation.module}, found it "
            f"{text.count(mutation.old)} times (the module changed: update the mutation)"
        )
    path.write_text(text.replace(mutation.old, mutation.new))


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutation")
    shutil.copytree(ROOT / PKG, dest / PKG, ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def run_one(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mut_{mutation.name}_") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        apply(mutation, tree)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        where = subprocess.run(
            [sys.executable, "-c", f"import {PKG}; print({PKG}.__file__)"],
            cwd=tree, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert where.startswith(str(tree)), f"the copy is not the one imported: {where}"
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [*cmd, *mutation.tests], cwd=tree, env=env, capture_output=True, text=True,
                timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, ""
        elapsed = time.perf_counter() - start
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # The test that killed it (-rA is off: -ra lists failures as FAILED lines), or the
        # summary line.
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        tail = (failed or lines[-1:] or [""])[0]
        if proc.returncode == 0:
            return "survived", elapsed, tail
        if proc.returncode == 1:
            return "killed", elapsed, tail
        return f"error (pytest exit {proc.returncode})", elapsed, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", action="append", default=[], help="run mutations whose name has this")
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.k or any(k in m.name for k in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name:42s} {m.module:24s} {' '.join(m.tests)}")
        return
    results = []
    for m in chosen:
        outcome, elapsed, tail = run_one(m, args.timeout)
        row = {"name": m.name, "module": m.module, "outcome": outcome}
        row.update(seconds=round(elapsed, 1), tests=list(m.tests), pytest=tail)
        results.append(row)
        where = f"{m.module}; {' '.join(m.tests)}"
        print(f"{outcome:9s} {elapsed:6.1f}s  {m.name}  ({where})\n          {tail}", flush=True)
    killed = sum(r["outcome"] == "killed" for r in results)
    print(f"\nkilled {killed} of {len(results)}: kill ratio {killed / max(len(results), 1):.2f}")
    for r in results:
        if r["outcome"] != "killed":
            print(f"  {r['outcome']}: {r['name']} ({r['module']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
