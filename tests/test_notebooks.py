"""The notebooks run from top to bottom, and what they show holds.

The notebooks are written for readers: prose, code and figures. The checks that
guard their claims live here instead. Each check is code that runs in the
notebook's own kernel right after the cell named by its anchor (a line of that
cell), so it sees the variables as they were at that point: the trajectories
that must be equal, w == 0.6, Adam ending at +1, and so on. A regression in
adam_jax, or an edit that makes a notebook claim something false, fails here.
The notebooks run in a fresh kernel with notebooks/ as the working directory;
the stored outputs are not rewritten.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# notebook stem -> [(a line of the cell to check after, the check)]
CHECKS: dict[str, list[tuple[str, str]]] = {
    "01_epsilon": [
        (
            "g = jnp.array([1.0, 0.0])  # the second parameter got no gradient",
            "assert jnp.isnan(u0[1]) and u8[1] == 0.0",
        ),
        (
            "def at(value):",
            """\
assert sweep[(1.0, "eps")][i8] < 10 * tiny  # eps=1e-8 harmless at scale 1
assert sweep[(1e-8, "eps")][i8] > 100 * tiny  # costly at scale 1e-8
assert sweep[(1e-8, "eps")][i6] > 0.5 * initial  # and eps=1e-6 stops training
assert sweep[(1e-8, "eps_root")][0] > 5 * tiny  # eps_root=1e-16 already costs at scale 1e-8
assert sweep[(1e-8, "eps_root")][i8] > 0.5 * initial  # eps_root=1e-8 stops training there
assert sweep[(1e-8, "eps")][0] < 10 * tiny  # while eps=1e-16 does not
""",
        ),
        (
            "small, large = 0, int(np.argmin(np.abs(np.asarray(eps_sp) - 1e-4)))",
            """\
assert rel_err[small].max() < 0.1 and rel_err[large].max() > 0.5
assert eff[small, -1] > 3 * eff[small, 0]  # rare features get bigger steps when eps is small
assert float(test_mse[large]) > 100 * float(test_mse[small])
""",
        ),
        (
            "X16, y16 = X.astype(jnp.float16), y.astype(jnp.float16)",
            "assert np.float16(1e-8) == 0.0",
        ),
        (
            "half_runs = {",
            """\
ref32 = half_runs["float32 reference"]
assert (
    not np.isfinite(half_runs["optax.adam, float16"][-1])
    or half_runs["optax.adam, float16"][-1] > ref32[0]
)
assert np.all(np.isfinite(half_runs["adam_jax.adam(nu_dtype=float16), float16"]))
# v forced into float16: worse than where it started
assert half_runs["adam_jax.adam(nu_dtype=float16), float16"][-1] > ref32[0]
assert half_runs["adam_jax.adam(eps=1e-4, nu_dtype=float16), float16"][-1] < 1e-2 * ref32[0]
assert half_runs["adam_jax.adam (default: v in float32), float16"][-1] < 1e-3 * ref32[0]
""",
        ),
        (
            "except ImportError:",
            "assert jax_losses[-1] < 1e-3 * jax_losses[0]",
        ),
        (
            "fig, ax = plt.subplots()\nfor (name, (measured, formula))",
            """\
for measured, formula in curves.values():
    np.testing.assert_allclose(measured, formula, rtol=2e-3)
""",
        ),
        (
            "except ImportError:",
            "assert rel.max() < 5e-3  # adam_jax against torch, every step",
        ),
    ],
    "02_adam_from_scratch": [
        (
            "x, y = jnp.asarray(x_np), jnp.asarray(y_np)",
            """\
assert trajectory.shape == ref_trajectory.shape
np.testing.assert_allclose(trajectory, ref_trajectory, rtol=1e-13, atol=1e-13)
""",
        ),
        (
            "adam_states = [s[1] for s in states]",
            "assert np.array_equal(np.array([int(s.count) for s in adam_states]), t)",
        ),
        (
            "def loss_and_mse(w):",
            """\
assert stop == ref_stop
assert int(result.stop_reason) == adam_jax.StopReason.TARGET
np.testing.assert_allclose(np.asarray(result.losses[: stop + 1]), ref_mses, rtol=1e-12)
np.testing.assert_allclose(np.asarray(result.params).ravel(), ref_trajectory[stop], rtol=1e-12)
assert np.all(np.isnan(np.asarray(result.losses[stop + 1 :])))  # nothing runs after the stop
""",
        ),
        (
            "adam_states = [s[1] for s in states]",
            """\
# the steps, recomputed from m and v
np.testing.assert_allclose(np.abs(np.diff(trajectory, axis=0)), step_size, rtol=1e-9)
""",
        ),
    ],
    "03_worked_example": [
        (
            "w0, x, y = 0.5, 3.0, 4.0",
            "assert abs(w1 - 0.6) < 1e-9",
        ),
        (
            "slip_m_hat = m1 / (1 - b1**2)",
            "assert abs(slip_w - 0.5744) < 5e-5 and abs(slip_m_hat - (-7.8947)) < 5e-5",
        ),
        (
            "opt = adam_jax.adam(learning_rate=lr, b1=b1, b2=b2, eps=eps)",
            """\
assert float(grad) == g and float(adam_state.m) == m1 and float(adam_state.v) == v1
assert float(w_new) == w1  # bit for bit the hand computation
assert round(float(w_new), 6) == 0.6
""",
        ),
        (
            "w, state = jnp.asarray(w0), opt.init(jnp.asarray(w0))",
            """\
assert ws[0] == w1 and max(ws) > 1.5 and ws[-1] < max(ws)  # overshoot past 4/3, then back
""",
        ),
        (
            "PATIENCE = 200",
            """\
assert (stop, best) == (ref_stop, ref_best)
assert int(result.stop_reason) == adam_jax.StopReason.PATIENCE
assert best == int(np.argmin(val_curve[: stop + 1])) and stop - best == PATIENCE
""",
        ),
        (
            "train_best, val_best = map(float, train_and_val(result.best_params))",
            """\
np.testing.assert_allclose(val_best, float(result.best_value), rtol=1e-12)
np.testing.assert_allclose(val_stop, val_curve[stop], rtol=1e-12)
assert val_best < val_stop < val_end  # restoring the best step generalises best ...
assert train_end < train_stop < train_best  # ... although its training loss is the highest
""",
        ),
        (
            "def run_with_patience(patience):",
            """\
assert np.all(np.diff(np.asarray(stops)) > 0)
assert int(bests[-1]) == best and int(stops[3]) == stop
""",
        ),
    ],
    "04_adamax": [
        (
            "grads = rng.standard_normal(300) * np.exp(-np.arange(300) / 120)",
            "assert gaps[128] < 0.01 and gaps[128] < gaps[32] < gaps[8] < gaps[2]",
        ),
        (
            "eps_grid = jnp.logspace(-10, 1, 23)",
            """\
assert np.isclose(sweep_out[i], sweep_in[i], rtol=1e-6)  # indistinguishable at eps = 1e-6
assert np.max(np.abs(np.log(sweep_out / sweep_in))) > 0.1  # but not everywhere
""",
        ),
        (
            "max_step = {name: float(np.max(np.abs(steps)))",
            """\
assert max_step["Adamax"] <= 1.01  # Adamax: |step| <= lr
assert max_step["Adam"] > 1.5  # Adam: an outlier kicks the step well past lr
assert reach["Adam"] < reach["Adamax"]  # but Adamax is slowed down more by each outlier
assert final_err["Adam"] < final_err["Adamax"]
""",
        ),
        (
            "numpy_final = numpy_adamax(data, theta0)",
            """\
np.testing.assert_allclose(
    path_out[np.array(checkpoints) - 1], numpy_path, rtol=1e-13, atol=1e-15
)
""",
        ),
        (
            "opt_t = torch.optim.Adamax(",
            "np.testing.assert_allclose(torch_final, path_in[-1], rtol=1e-13)",
        ),
    ],
    "05_amsgrad": [
        (
            'xs_adam = runs["Adam"][0]',
            """\
assert xs_adam[last].mean() > 0.9  # Adam ends at the wrong end
assert xs_raw[last].mean() < -0.9 and xs_alg2[last].mean() < -0.9  # AMSGrad at the optimum
assert xs_corr[last].mean() < -0.5  # "corrected": the right direction
assert np.argmax(xs_corr < -0.9) > np.argmax(xs_raw < -0.9)  # but later
assert avg_regret("Adam") > 0.18  # Adam's average regret does not vanish
assert avg_regret(raw) < 0.8 * avg_regret(raw, T // 2) and avg_regret(raw) < 0.5 * avg_regret(
    "Adam"
)
""",
        ),
        (
            "def denominator(name, states):",
            """\
assert push_adam > 0 > push_raw
assert den_adam.max() / den_adam.min() > 1.5 and den_raw.max() / den_raw.min() < 1.01
""",
        ),
        (
            'settings = {"b1=0.9, b2=0.999": (0.9, 0.999),',
            """\
x_a, x_m = other[(0.9, 0.999)]
assert x_a[-1] > x_a[T // 2] + 0.05 and x_m[-1] < -0.9  # Adam drifts up, slowly; AMSGrad converges
x_a, x_m = other[(0.0, 1.0 / (1.0 + C**2))]
assert x_a[-1] > 0.9 and x_m[-1] < x_m[T // 2] < -0.4  # Adam at +1 at once; AMSGrad creeps down
""",
        ),
    ],
    "06_batched_sweeps": [
        (
            "def sweep(inputs, n):",
            """\
assert n_runs >= 1000 and stop_steps.shape == (len(lrs), len(b2s), data_sets)
assert work.computed >= work.needed and work.computed / work.needed < 1.1
assert n_runs * (longest + 1) / work.needed > 2  # what vmap would compute
""",
        ),
        (
            "panels = [",
            """\
assert 0.5 * n_runs < reached.sum() < n_runs
assert np.all(stop_steps[0] == NUM_STEPS)  # the smallest learning rate never gets there
assert np.all(final_mse[reached] <= TARGET)
steps = np.median(stop_steps, axis=2)
assert steps[-1].max() < steps[5].min() / 5  # larger steps, fewer of them
assert steps[3, 0] < steps[3, -1]  # a small b2 is faster at small learning rates
""",
        ),
        (
            "def by_hand(p):",
            """\
assert same_steps
assert all(len(ts) == len(sizes) and min(ts) > 0 for ts in times.values())
""",
        ),
    ],
    "07_sharding": [
        (
            "opt = adam_jax.amsgrad(1e-2, weight_decay=1e-4)",
            "assert same",
        ),
        (
            "x = jax.device_put(",
            """\
assert old_w1.is_deleted()
assert specs(params) == {k: s.spec for k, s in param_shardings.items()}
""",
        ),
        (
            'mesh_dp = jax.make_mesh((8,), ("data",))',
            "assert bytes_per_device(zero1_state) < 0.15 * bytes_per_device(plain_state)",
        ),
        (
            "xb = rng.normal(size=(64, 512)).astype(np.float32)",
            """\
assert diff < 1e-5
assert specs(s1[1].m) == jax.tree.map(lambda s: s.spec, state_shardings[1].m)
""",
        ),
        (
            "rng = np.random.default_rng(2)",
            'assert found == ["all-reduce"]',
        ),
        (
            "alone = jax.jit(fit_one)",
            "assert worst < 1e-6",
        ),
        (
            "def save(path, tree):",
            """\
assert all(jax.tree.leaves(equal))
assert specs(restored) == specs(opt_state)
""",
        ),
        (
            "update_collectives = {}",
            """\
assert all(found == [] for found in update_collectives.values())
assert collectives(total) == ["all-reduce"]
""",
        ),
        (
            "xb = rng.normal(size=(64, 512))",
            'assert "all-gather" in zero1_collectives',
        ),
        (
            "counts = [1, 2, 4, 8]",
            """\
zero1, plain = per_device["state, ZeRO-1"], per_device["state, replicated"]
assert zero1[0] == plain[0] and len(set(plain)) == 1
assert all(b < a for a, b in zip(zero1, zero1[1:]))
assert zero1[-1] < 0.15 * plain[-1]
""",
        ),
        (
            "alone = jax.jit(fit_one)",
            "assert all(same_steps)",
        ),
    ],
    "08_nadam_radam": [
        (
            "    _, state = opt.update(jnp.ones(1), state)",
            """\
# the state's running product is the product of the plotted schedule, far below 0.9**100
mu = 0.9 * (1 - 0.5 * 0.96 ** (np.arange(1, 101) * 0.004))
np.testing.assert_allclose(float(state.mu_product), np.prod(mu), rtol=1e-12)
assert float(state.mu_product) < 1e-20 * 0.9**100
""",
        ),
        (
            "def losses(opt, steps=400):",
            """\
first = {k: int(np.flatnonzero(v < 1e-6)[0]) for k, v in runs.items()}
torch_nadam, keras_nadam, optax_nadam, adam = (first[k] for k in runs)
assert max(keras_nadam, optax_nadam) < torch_nadam < adam
after = {k: v[first[k] :].max() for k, v in runs.items()}
assert after["NAdam, momentum_decay=0.004 (torch)"] > 1.0  # jumps back up near the minimum
assert all(a < 1e-3 for k, a in after.items() if "torch" not in k)
assert all(v[-1] < 1e-12 for v in runs.values())
# momentum_decay=inf is optax.nadam
np.testing.assert_allclose(
    losses(adam_jax.nadam(lr, momentum_decay=np.inf)),
    runs["NAdam, constant momentum (optax)"],
    rtol=1e-9,
    atol=1e-15,
)
""",
        ),
    ],
    "09_digits_mlp": [
        (
            "LR, WD = 3e-3, 1e-4",
            """\
ours, theirs = runs["adam_jax.adamw"], runs["optax.adamw"]
for r in (ours, theirs):
    assert r["stop_reason"] == "PATIENCE" and r["epochs"] - r["best_epoch"] == PATIENCE + 1
    assert r["val_loss"][r["best_epoch"]] == min(r["val_loss"])  # restore_best kept the best epoch
    assert r["test_accuracy"] > 0.95
assert abs(ours["test_accuracy"] - theirs["test_accuracy"]) <= 0.02
# the same AdamW: the curves agree until rounding differences grow on the plateau
np.testing.assert_allclose(ours["val_loss"][:20], theirs["val_loss"][:20], rtol=1e-2)
""",
        ),
    ],
    "10_modern_adam": [
        (
            "results = {name: train(tx) for name, tx in optimizers.items()}",
            """\
final = {name: c[0][-1] for name, c in curves.items()}
assert all(c[2][-1] > 0.95 for c in curves.values())
for name in ("adamw", "stable_adamw", "cautious adamw"):
    assert curves[name][2][-1] >= 0.975, name  # 98-99% test accuracy
assert final["cautious adamw"] == min(final.values())  # falls fastest
assert abs(final["stable_adamw"] - final["adamw"]) < 0.3 * final["adamw"]  # follows AdamW closely
assert curves["ademamix"][0][-1] > 1.2 * curves["ademamix"][0].min()  # turns back up
""",
        ),
        (
            'stable_state = results["stable_adamw"][1][0]',
            "assert all(float(v) == 1.0 for v in stable_state.lr_scale.values())",
        ),
        (
            "agree = {k: float(jnp.mean(moments[k] * grads[k] > 0)) for k in grads}",
            "assert 0.2 < min(agree.values()) and max(agree.values()) < 0.9",
        ),
    ],
    "11_eight_bit_states": [
        (
            "for (model, bits), r in runs.items():",
            """\
for model in ("digits MLP", "wide MLP"):
    assert abs(runs[model, 8]["final"] / runs[model, 32]["final"] - 1) < 0.02
wide8, wide32 = runs["wide MLP", 8], runs["wide MLP", 32]
assert wide8["params"] >= 10**6
assert wide8["state_bytes"] / wide8["params"] < 2.1
assert wide32["state_bytes"] / wide32["params"] > 7.9
""",
        ),
        (
            "adam_state = state[0]",
            'assert isinstance(adam_state.m["w0"], adam_jax.QuantizedArray)',
        ),
    ],
}


def _code(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _with_checks(nb: nbformat.NotebookNode, checks: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """``nb`` with each check inserted as a code cell after the cell holding its anchor."""
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        if cell.cell_type == "code":
            for anchor, check in checks:
                if anchor in cell.source:
                    cells.append(nbformat.v4.new_code_cell(check))
    out = nbformat.from_dict(dict(nb))
    out.cells = cells
    return out


def test_the_notebooks_are_there():
    assert set(CHECKS) <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_reads_as_a_notebook(path):
    nb = nbformat.read(path, as_version=4)
    source = "\n".join(c.source for c in nb.cells)
    assert not re.search(r"adam_jax\._[a-z]", source), "imports a private module"
    assert not re.search(r"\bseed (document )?0\d\d", source, re.I)
    assert not [c for c in _code(nb) if re.search(r"^\s*assert\b|np\.testing", c.source, re.M)]
    # Committed with their outputs, figures included, so that they render in the docs.
    stored = [o for c in _code(nb) for o in c.get("outputs", [])]
    assert stored, "committed without outputs"
    assert not [o for o in stored if o.get("output_type") == "error"]
    if path.stem in CHECKS:
        assert any("image/png" in o.get("data", {}) for o in stored), "no stored figure"
        for anchor, _ in CHECKS[path.stem]:
            assert sum(anchor in c.source for c in _code(nb)) == 1, f"anchor not unique: {anchor}"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_its_claims_hold(path, monkeypatch):
    # The kernel imports this checkout's adam_jax, whatever is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = _with_checks(nbformat.read(path, as_version=4), CHECKS.get(path.stem, []))
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell or check
    assert not [o for c in _code(nb) for o in c.outputs if o.get("output_type") == "error"]
