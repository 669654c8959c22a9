"""adam_jax on five classic Adam exercises, each checked against an independent reference.

* one Adam step worked by hand (w = 0.5 -> 0.6), against the hand arithmetic;
* Adam from scratch on a linear regression that stops at MSE < 1, against the NumPy loop;
* a two-layer MLP trained with AMSGrad, against ``torch.optim.Adam(amsgrad=True)``
  (without torch installed, or with ``--no-torch``, against the expectation of a
  steadily falling loss; ``make demo-torch`` installs torch and runs the demo);
* Adamax with eps outside the max, against the tutorial's ``Adamax`` function;
* early stopping on a rising validation loss, against the patience rule run as a
  plain loop over a full run's losses.

Then a vmapped sweep of many fits, and a PNG of the curves (needs matplotlib). Exits
with status 1 if any check fails. Runs in float64 (``jax_enable_x64``), like the NumPy
references; the MLP runs in float32, like PyTorch.

Usage, from a checkout::

    python examples/demo.py [--out PATH] [--no-torch]

It prints the five checks, the sweep, the figure's path and ``5 of 5 checks pass``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax

# The references are the test suite's, in tests/references.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from references import adamax, amsgrad_mlp, early_stopping, linear_regression, worked_example

DEFAULT_OUT = Path(__file__).resolve().parent / "adam_jax_demo.png"


@dataclasses.dataclass
class Check:
    exercise: str
    run: str  # what adam_jax did and reached
    reference: str  # what the reference says
    match: bool

    def __str__(self) -> str:
        mark = "[ok]" if self.match else "[FAILED]"
        return f"{mark} {self.exercise}\n    adam_jax:  {self.run}\n    reference: {self.reference}"


def worked_step() -> tuple[Check, dict[str, Any]]:
    s = worked_example.SETTINGS
    opt = adam_jax.adam(s["learning_rate"], s["beta1"], s["beta2"], s["epsilon"])
    w0 = jnp.asarray(s["w"], jnp.float64)
    grad = jax.grad(lambda w: (w * s["x"] - s["y"]) ** 2)(w0)
    updates, _ = opt.update(grad, opt.init(w0), w0)
    w1 = float(optax.apply_updates(w0, updates))
    by_hand = worked_example.by_hand(t=1).w
    check = Check(
        "one Adam step worked by hand, L = (3w - 4)^2",
        f"adam(0.1), 1 step: w 0.5 -> {w1:.6f}",
        f"by hand: w = {by_hand:.6f}",
        abs(w1 - by_hand) <= 1e-12,
    )
    return check, {"w1": w1, "slip": worked_example.by_hand(t=2).w}


def regression() -> tuple[Check, dict[str, Any]]:
    s = linear_regression.SETTINGS
    x_np, y_np = linear_regression.data()
    ref = linear_regression.numpy_adam(x_np, y_np)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    result = adam_jax.fit(
        lambda w: linear_regression.loss(w, x, y),
        jnp.zeros((1, x.shape[1]), jnp.float64),
        adam_jax.adam(s["alpha"], s["beta1"], s["beta2"], s["epsilon"]),
        num_steps=s["max_iterations"],
        has_aux=True,
        early_stopping=adam_jax.early_stopping(None, target=1.0, restore_best=False),
    )
    stop = int(result.num_steps)
    mses = np.asarray(result.losses)[: stop + 1]
    # The NumPy loop measures the MSE before its update and breaks after it, so it
    # applies one more update; fit's params are the weights it measured at.
    same_stop = stop == ref.stop_iteration and len(mses) == len(ref.mses)
    same_stop &= int(result.stop_reason) == adam_jax.StopReason.TARGET
    w_diff = np.inf
    if same_stop:
        w_diff = float(np.max(np.abs(np.asarray(result.params).ravel() - ref.trajectory[stop])))
        w_diff = max(w_diff, float(np.max(np.abs(mses - ref.mses))))
    check = Check(
        "Adam from scratch on a linear regression that stops at MSE < 1",
        f"fit(adam(0.01), early_stopping(target=1)): stops at step {stop}, MSE {mses[-1]:.6f}",
        f"NumPy loop stops at {ref.stop_iteration}; max |difference| {w_diff:.0e}",
        bool(same_stop and w_diff <= 1e-9),
    )
    return check, {"mse": mses, "ref_mse": ref.mses, "stop": stop}


def mlp(use_torch: bool = True) -> tuple[Check, dict[str, Any]]:
    s = amsgrad_mlp.SETTINGS
    x_np, y_np = amsgrad_mlp.data()
    p_np = amsgrad_mlp.init()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    result = adam_jax.fit(
        lambda p: amsgrad_mlp.loss(p, x, y, jnp),
        {k: jnp.asarray(v) for k, v in p_np.items()},
        adam_jax.amsgrad(s["learning_rate"], eps=s["eps"]),
        num_steps=s["steps"],
    )
    losses = np.asarray(result.losses, np.float64)
    torch_losses = None
    if use_torch:
        try:
            torch_losses = amsgrad_mlp.torch_losses(p_np, x_np, y_np)
        except ImportError:
            pass
    if torch_losses is not None:
        rel = float(np.max(np.abs(losses - torch_losses) / torch_losses))
        # float32: the two libraries sum the matrix products in different orders.
        match, reference = rel <= 5e-3, f"torch: {torch_losses[-1]:.3g}, max rel diff {rel:.0e}"
    else:
        falling = float(np.mean(np.diff(losses) < 0))
        match = losses[-1] < 1e-3 * losses[0] and falling >= 0.95
        reference = f"no torch: expected a falling loss; {100 * falling:.0f}% of steps lower it"
    check = Check(
        "two-layer MLP (64x1000 -> 100 -> 10) trained with AMSGrad",
        f"amsgrad(1e-4, eps=1e-8), {s['steps']} steps: loss {losses[0]:.3g} -> {losses[-1]:.3g}",
        reference,
        bool(match),
    )
    return check, {"losses": losses, "torch": torch_losses}


def adamax_function() -> tuple[Check, dict[str, Any]]:
    data = adamax.data()
    theta0 = np.zeros(2)
    ref = adamax.adamax(data, theta0)  # lr=1e-2, eps=1e-6, 1000 iterations
    jdata = tuple(map(jnp.asarray, data))
    result = adam_jax.fit(
        lambda theta: adamax.mse(jdata, theta),
        jnp.asarray(theta0),
        adam_jax.adamax(1e-2, eps=1e-6),
        num_steps=1000,
    )
    diff = float(np.max(np.abs(np.asarray(result.params) - ref)))
    # The function returns only its final theta: rerun it at a few lengths for the curve.
    marks = np.unique(np.geomspace(1, 1000, 12).astype(int))
    ref_curve = [adamax.mse(data, adamax.adamax(data, theta0, num_iterations=k)) for k in marks]
    final = float(adamax.mse(jdata, result.params))
    check = Check(
        "Adamax with eps outside the max on a linear regression",
        f"adamax(1e-2, eps=1e-6), 1000 steps: MSE {final:.6g}",
        f"the tutorial's Adamax(): max |difference in theta| {diff:.0e}",
        diff <= 1e-12,
    )
    # losses[i] is measured before update i; the function after k updates is losses[k].
    curve = np.append(np.asarray(result.losses), final)
    return check, {"losses": curve, "ref_steps": marks, "ref_losses": np.asarray(ref_curve)}


def stopping() -> tuple[Check, dict[str, Any]]:
    cfg, ref_steps = early_stopping.SETTINGS, 3000
    xt, yt, xv, yv = map(jnp.asarray, early_stopping.overfit_data())

    def loss_fn(w):
        return jnp.mean((xt @ w - yt) ** 2), jnp.mean((xv @ w - yv) ** 2)

    opt = adam_jax.adam(cfg["learning_rate"])
    w0 = jnp.zeros(xt.shape[1], jnp.float64)
    es = adam_jax.early_stopping(cfg["patience"], restore_best=True)
    result = adam_jax.fit(loss_fn, w0, opt, num_steps=20_000, has_aux=True, early_stopping=es)

    # The reference: the same optimizer for a fixed number of steps, then the
    # patience rule as a plain loop over the validation losses it recorded.
    def step(carry, _):
        w, state = carry
        (train, val), grads = jax.value_and_grad(loss_fn, has_aux=True)(w)
        updates, state = opt.update(grads, state, w)
        return (optax.apply_updates(w, updates), state), (w, train, val)

    run = jax.jit(lambda: jax.lax.scan(step, (w0, opt.init(w0)), None, ref_steps)[1])
    path, train_curve, val_curve = map(np.asarray, run())
    ref = early_stopping.patience_rule(val_curve.tolist(), cfg["patience"])
    stop, best = int(result.num_steps), int(result.best_step)
    match = (
        ref.stop_step is not None
        and int(result.stop_reason) == adam_jax.StopReason.PATIENCE
        and (stop, best) == (ref.stop_step, ref.best_step)
        and np.allclose(np.asarray(result.best_params), path[best], rtol=1e-12, atol=1e-12)
        and abs(float(result.best_value) - ref.best_value) <= 1e-12
    )
    check = Check(
        "early stopping on a rising validation loss (degree-12 polynomial, 20 points)",
        f"fit(adam(0.01), early_stopping(200)): stops at {stop}, best step {best}, "
        f"val {float(result.best_value):.4f}",
        f"patience rule over a full run: stop {ref.stop_step}, best {ref.best_step}",
        bool(match),
    )
    return check, {"train": train_curve, "val": val_curve, "stop": stop, "best": best}


def sweep(n_lr: int = 8, n_problems: int = 16, num_steps: int = 2000) -> str:
    """One jit(vmap(fit)) over learning rates x problems, timed."""
    n, d = 64, 8
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((n_problems, n, d)).astype(np.float32)
    ys = np.einsum("pnd,pd->pn", xs, rng.standard_normal((n_problems, d))).astype(np.float32)
    lrs = np.logspace(-3, -0.5, n_lr).astype(np.float32)

    def one(lr, x, y):
        return adam_jax.fit(
            lambda w: jnp.mean((x @ w - y) ** 2),
            jnp.zeros(d, jnp.float32),
            adam_jax.adam(lr),
            num_steps=num_steps,
            early_stopping=adam_jax.early_stopping(100, target=1e-6, restore_best=False),
        )

    run = jax.jit(jax.vmap(jax.vmap(one, (None, 0, 0)), (0, None, None)))
    t0 = time.perf_counter()
    jax.block_until_ready(run(lrs, xs, ys))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = jax.block_until_ready(run(lrs, xs, ys))
    t_run = time.perf_counter() - t0
    reached = int((np.asarray(result.stop_reason) == adam_jax.StopReason.TARGET).sum())
    return (
        f"vmapped sweep: {n_lr} learning rates x {n_problems} problems = {n_lr * n_problems} "
        f"fits of up to {num_steps} steps in one jit(vmap(fit)): {t_run:.2f} s "
        f"({t_first:.1f} s with compilation); {reached} reached MSE <= 1e-6, "
        f"median stop step {int(np.median(np.asarray(result.num_steps)))}"
    )


def figure(curves: dict[str, dict[str, Any]], out: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax, c = axes[0, 0], curves["regression"]
    ax.semilogy(c["mse"], label="adam_jax.fit")
    ax.semilogy(c["ref_mse"], "--", label="the NumPy loop")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.axvline(c["stop"], color="gray", lw=0.8)
    ax.set(title=f"linear regression, stops at step {c['stop']}", xlabel="step", ylabel="MSE")
    ax.legend()
    ax, c = axes[0, 1], curves["mlp"]
    ax.semilogy(c["losses"], label="adam_jax.amsgrad")
    if c["torch"] is not None:
        ax.semilogy(c["torch"], "--", label="torch.optim.Adam(amsgrad=True)")
    ax.set(title="MLP, AMSGrad, lr=1e-4, eps=1e-8", xlabel="step", ylabel="loss (sum)")
    ax.legend()
    ax, c = axes[1, 0], curves["adamax"]
    ax.loglog(np.arange(len(c["losses"])) + 1, c["losses"], label="adam_jax.adamax")
    ax.loglog(c["ref_steps"] + 1, c["ref_losses"], "o", mfc="none", label="Adamax() as printed")
    ax.set(title="Adamax, eps outside the max", xlabel="step + 1", ylabel="MSE")
    ax.legend()
    ax, c = axes[1, 1], curves["stopping"]
    ax.semilogy(c["train"], label="training loss")
    ax.semilogy(c["val"], label="validation loss")
    ax.axvline(c["best"], color="green", lw=0.8, label=f"best step {c['best']} (restored)")
    ax.axvline(c["stop"], color="red", lw=0.8, label=f"stop {c['stop']} (patience 200)")
    ax.set(title="early stopping", xlabel="step", ylabel="MSE")
    ax.legend(fontsize=8)
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.suptitle("adam_jax on four classic exercises, against their references")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the figure (PNG)")
    parser.add_argument("--no-torch", action="store_true", help="do not compare with PyTorch")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    jax.config.update("jax_enable_x64", True)
    print(f"adam_jax {adam_jax.__version__}, jax {jax.__version__} ({jax.default_backend()})\n")
    if not args.no_torch and importlib.util.find_spec("torch") is None:
        print(
            "torch is not installed, so the MLP is checked against a falling loss, not against "
            "torch.optim;\nfor the full check run `make demo-torch` (it installs the CPU "
            "wheel, torch==2.13.0, about 900 MB).\n"
        )
    checks, curves = [], {}
    runs = [
        ("worked", worked_step),
        ("regression", regression),
        ("mlp", lambda: mlp(use_torch=not args.no_torch)),
        ("adamax", adamax_function),
        ("stopping", stopping),
    ]
    for key, fn in runs:
        check, curves[key] = fn()
        checks.append(check)
        print(check, flush=True)
    slip, w1 = curves["worked"]["slip"], curves["worked"]["w1"]
    print(
        f"\nnote: the worked example bias-corrects its first step with 1 - β^2 (t=2); "
        f"that slip gives w = {slip:.4f} instead of {w1:.4f}."
    )
    print(sweep())
    path = figure(curves, args.out)
    print(f"figure: {path}" if path else "figure: skipped, matplotlib is not installed")
    passed = sum(c.match for c in checks)
    print(f"{passed} of {len(checks)} checks pass ({time.perf_counter() - t_start:.1f} s)")
    return 0 if passed == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
