"""Schedule-Free AdamW, ADOPT and NAdam's float32 product against their live references.

* ``schedule_free_adamw`` against ``schedulefree.AdamWScheduleFree`` (Meta's reference,
  PyPI ``schedulefree``): the train-mode params (y) after every step, and the
  eval-mode params (x, torch's ``optimizer.eval()``) against
  ``schedule_free_eval_params``.
* ``adopt`` against the authors' ``adopt.ADOPT`` (PyPI ``torch-adopt``).
* ``nadam(mu_product_dtype=jnp.float32)`` against ``torch.optim.NAdam`` run at
  torch's default dtype float32 with float64 params (torch then keeps its
  ``mu_product`` in float32).

torch runs in float64 (``torch.set_default_dtype(torch.float64)``) except where a
test says otherwise; the gradients are ``_gradients``' hostile sequence (100x spikes,
0.01x lulls, sign flips), which makes ADOPT's clipping bind. Error model: every
quantity is a short chain of float64 operations per step, each within an ulp of
the reference's, over 60 steps of a contracting recursion: a relative error of a
few 1e-15 is expected, so 1e-10 leaves five orders of magnitude. optax's
``contrib`` versions are run side by side: where they follow the reference they
must match to the same bound; where they do not (Schedule-Free warmup) the test
shows they differ, a negative control that the comparison can fail.
"""

from __future__ import annotations

import functools
import itertools

import _gradients
import adopt as adopt_ref  # torch-adopt, in the test extra
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import schedulefree  # in the test extra
import torch

import adam_jax

STEPS = 60
LR = 0.05
RTOL = 1e-10
# torch-adopt 0.1.0 calls two torch functions deprecated in torch 2.13.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch._utils.is_compiling` is deprecated"),
    pytest.mark.filterwarnings("ignore:Use _accelerator_graph_capture_health_check instead"),
    pytest.mark.usefixtures("torch_float64"),
]


def grads_seq(steps=STEPS):
    return _gradients.gradient_sequence(steps)


def _trajectory(opt, params, grads):
    """y after every step (stacked), and the schedule-free eval params x (adam_jax's or
    optax's; y again for other optimizers)."""

    def step(carry, g):
        p, s = carry
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        if isinstance(s, adam_jax.ScheduleFreeState):
            x = adam_jax.schedule_free_eval_params(s, p)
        elif isinstance(s, optax.contrib.ScheduleFreeState):
            x = optax.contrib.schedule_free_eval_params(s, p)
        else:
            x = p
        return (p, s), (p, x)

    _, (ys, xs) = jax.lax.scan(step, (params, opt.init(params)), grads)
    return ys, xs


_jit_trajectory = jax.jit(_trajectory)


def run_ours(opt, dtype=jnp.float64, steps=STEPS):
    params = {k: jnp.asarray(v, dtype) for k, v in _gradients.initial_params().items()}
    gs = grads_seq(steps)
    stacked = {k: jnp.asarray(np.stack([g[k] for g in gs]), dtype) for k in gs[0]}
    if isinstance(opt.init, jax.tree_util.Partial):  # a pytree: one compile for all values
        ys, xs = _jit_trajectory(opt, params, stacked)
    else:  # optax's: a closure
        ys, xs = jax.jit(functools.partial(_trajectory, opt))(params, stacked)
    return {k: np.asarray(v, np.float64) for k, v in ys.items()}, {
        k: np.asarray(v, np.float64) for k, v in xs.items()
    }


def run_torch(make, *, train_eval=False, dtype=torch.float64, steps=STEPS):
    """Params after every step (stacked); with ``train_eval``, also the eval-mode params."""
    params = {
        k: torch.tensor(v, dtype=dtype, requires_grad=True)
        for k, v in _gradients.initial_params().items()
    }
    opt = make(list(params.values()))
    if isinstance(opt, schedulefree.AdamWScheduleFree):
        opt.train()
    ys, xs = [], []
    for g in grads_seq(steps):
        for k, p in params.items():
            p.grad = torch.tensor(g[k], dtype=dtype)
        opt.step()
        ys.append({k: p.detach().numpy().copy() for k, p in params.items()})
        if train_eval:
            opt.eval()
            xs.append({k: p.detach().numpy().copy() for k, p in params.items()})
            opt.train()
    stack = lambda seq: {k: np.stack([s[k] for s in seq]) for k in seq[0]} if seq else None
    return stack(ys), stack(xs)


def rel_err(ours, theirs) -> float:
    """max over steps and leaves of max|a - b| / max|b| (per step)."""
    errs = []
    for k, b in theirs.items():
        a = ours[k]
        scale = np.max(np.abs(b.reshape(len(b), -1)), axis=1)
        errs.append(np.max(np.max(np.abs((a - b).reshape(len(b), -1)), axis=1) / scale))
    return float(max(errs))


# --- Schedule-Free AdamW -------------------------------------------------------------

SF_CASES = list(itertools.product([0, 10], [0.0, 1.0], [0.0, 0.1]))  # warmup, r, wd


@pytest.mark.parametrize(("warmup", "r", "wd"), SF_CASES)
def test_schedule_free_matches_reference(warmup, r, wd):
    ty, tx = run_torch(
        lambda ps: schedulefree.AdamWScheduleFree(
            ps, lr=LR, warmup_steps=warmup, r=r, weight_decay=wd
        ),
        train_eval=True,
    )
    oy, ox = run_ours(adam_jax.schedule_free_adamw(LR, warmup_steps=warmup, r=r, weight_decay=wd))
    assert rel_err(oy, ty) <= RTOL
    assert rel_err(ox, tx) <= RTOL
    assert rel_err(ox, ty) > 1e-3  # x and y differ: the eval params are a real check


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_schedule_free_optax_side_by_side(wd):
    """optax.contrib matches the reference without warmup and not with it (its warmup
    is lr·k/W, 0 at the first step, where the reference uses lr·(k+1)/W)."""
    make = lambda w: (
        lambda ps: schedulefree.AdamWScheduleFree(ps, lr=LR, warmup_steps=w, weight_decay=wd)
    )
    ty, tx = run_torch(make(0), train_eval=True)
    qy, qx = run_ours(optax.contrib.schedule_free_adamw(LR, weight_decay=wd))
    assert rel_err(qy, ty) <= RTOL and rel_err(qx, tx) <= RTOL
    ty, tx = run_torch(make(10), train_eval=True)
    qy, qx = run_ours(optax.contrib.schedule_free_adamw(LR, warmup_steps=10, weight_decay=wd))
    oy, ox = run_ours(adam_jax.schedule_free_adamw(LR, warmup_steps=10, weight_decay=wd))
    assert rel_err(qy, ty) > 1e-2 and rel_err(qx, tx) > 1e-2
    assert rel_err(oy, ty) <= RTOL and rel_err(ox, tx) <= RTOL


def test_schedule_free_schedule_and_fit():
    """A constant schedule is the number; the eval params of a ``fit`` result."""
    oy, ox = run_ours(adam_jax.schedule_free_adamw(LR, warmup_steps=3))
    sy, sx = run_ours(adam_jax.schedule_free_adamw(optax.constant_schedule(LR), warmup_steps=3))
    assert rel_err(sy, oy) <= RTOL and rel_err(sx, ox) <= RTOL

    target = jnp.array([1.0, -2.0, 3.0])
    loss = lambda p: jnp.sum((p - target) ** 2)
    opt = adam_jax.schedule_free_adamw(0.1, b1=0.8, warmup_steps=5)
    result = adam_jax.fit(loss, jnp.zeros(3), opt, num_steps=30)
    x = adam_jax.schedule_free_eval_params(result.opt_state, result.last_params)
    y, z = result.last_params, result.opt_state.z
    np.testing.assert_allclose(x, (y - 0.2 * z) / 0.8, rtol=1e-12)
    assert float(jnp.max(jnp.abs(x - y))) > 1e-3
    assert loss(x) < loss(jnp.zeros(3))


# --- ADOPT ---------------------------------------------------------------------------

ADOPT_DECAYS = [(0.0, False), (0.1, False), (0.1, True)]  # weight_decay, decoupled
ADOPT_CASES = list(itertools.product(ADOPT_DECAYS, [True, False], [False, True]))


@pytest.mark.parametrize((("decay"), "clip", "maximize"), ADOPT_CASES)
def test_adopt_matches_reference(decay, clip, maximize):
    wd, decoupled = decay
    ty, _ = run_torch(
        lambda ps: adopt_ref.ADOPT(
            ps,
            lr=LR,
            weight_decay=wd,
            decouple=decoupled,
            clip_lambda=(lambda step: step**0.25) if clip else None,
            maximize=maximize,
            foreach=False,
        )
    )
    opt = adam_jax.adopt(
        LR,
        weight_decay=wd,
        decoupled_weight_decay=decoupled,
        use_clipping=clip,
        maximize=maximize,
    )
    oy, _ = run_ours(opt)
    assert rel_err(oy, ty) <= RTOL
    initial = _gradients.initial_params()
    for k, v in initial.items():  # the first call moves nothing, in both
        np.testing.assert_array_equal(ty[k][0], v)
        np.testing.assert_array_equal(oy[k][0], v)


def test_adopt_clipping_binds_and_optax_side_by_side():
    ty, _ = run_torch(lambda ps: adopt_ref.ADOPT(ps, lr=LR, foreach=True))
    unclipped, _ = run_torch(lambda ps: adopt_ref.ADOPT(ps, lr=LR, clip_lambda=None))
    assert rel_err(unclipped, ty) > 1e-3  # the spikes make the clip bind
    qy, _ = run_ours(optax.contrib.adopt(LR))
    oy, _ = run_ours(adam_jax.adopt(LR))
    assert rel_err(qy, ty) <= RTOL and rel_err(oy, ty) <= RTOL


@pytest.mark.parametrize("name", ["adopt", "schedule_free"])
def test_modern_float32_within_rounding(name):
    """float32 params against the float64 reference: within float32 rounding grown over
    the run (u = 6e-8; 60 steps of a contracting recursion, measured 4e-7)."""
    if name == "adopt":
        make, opt, kw = lambda ps: adopt_ref.ADOPT(ps, lr=LR), adam_jax.adopt(LR), {}
    else:
        make = lambda ps: schedulefree.AdamWScheduleFree(ps, lr=LR, warmup_steps=10)
        opt, kw = adam_jax.schedule_free_adamw(LR, warmup_steps=10), {"train_eval": True}
    ty, tx = run_torch(make, **kw)
    oy, ox = run_ours(opt, jnp.float32)
    assert rel_err(oy, ty) <= 2e-5
    if tx is not None:
        assert rel_err(ox, tx) <= 2e-5


# --- NAdam's float32 mu_product ------------------------------------------------------

NADAM_CASES = list(itertools.product([4e-3, 1.0], [(0.0, False), (0.1, False), (0.1, True)]))


@pytest.mark.parametrize(("momentum_decay", "decay"), NADAM_CASES)
def test_nadam_float32_mu_product_matches_torch_default_dtype(momentum_decay, decay):
    wd, decoupled = decay
    torch.set_default_dtype(torch.float32)  # the fixture restores it
    kw = dict(momentum_decay=momentum_decay, weight_decay=wd, decoupled_weight_decay=decoupled)
    ty, _ = run_torch(lambda ps: torch.optim.NAdam(ps, lr=LR, foreach=False, **kw))
    oy, _ = run_ours(adam_jax.nadam(LR, mu_product_dtype=jnp.float32, **kw))
    assert rel_err(oy, ty) <= RTOL
    default, _ = run_ours(adam_jax.nadam(LR, **kw))
    assert rel_err(default, ty) > 1e-10  # the float64 product is not torch's float32 one


@pytest.mark.parametrize(
    ("param_dtype", "option", "expected"),
    [
        (jnp.float32, None, jnp.float32),
        (jnp.float64, None, jnp.float64),
        (jnp.bfloat16, None, jnp.float32),
        (jnp.float64, jnp.float32, jnp.float32),
        (jnp.float32, jnp.float64, jnp.float64),
    ],
)
def test_nadam_mu_product_dtype_state(param_dtype, option, expected):
    opt = adam_jax.scale_by_nadam(mu_product_dtype=option)
    params = {"w": jnp.ones(3, param_dtype)}

    def after_update(params):
        s0 = opt.init(params)
        u, s1 = opt.update(params, s0)
        return s0, s1, u

    s0, s1, u = jax.eval_shape(after_update, params)
    assert s0.mu_product.dtype == s1.mu_product.dtype == expected
    assert u["w"].dtype == param_dtype and s1.m["w"].dtype == param_dtype


# --- pytree properties, dtypes, bad input ---------------------------------------------


def _sf(**kw):
    return adam_jax.schedule_free_adamw(**kw)


MAKERS = {
    "schedule_free_adamw": _sf,
    "adopt": adam_jax.adopt,
    "adopt_decoupled": lambda **kw: adam_jax.adopt(
        weight_decay=0.1, decoupled_weight_decay=True, **kw
    ),
}


def _states(state):
    is_ours = lambda s: isinstance(s, adam_jax.ScheduleFreeState | adam_jax.ADOPTState)
    (found,) = [s for s in jax.tree.leaves(state, is_leaf=is_ours) if is_ours(s)]
    return found


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_modern_state_dtypes(name, dtype):
    """State fields after init, one and two updates (ADOPT's first only sets v), and
    the updates, by dtype (traced shapes only: nothing is compiled)."""
    params = {"w": jnp.ones((2, 3), dtype), "b": jnp.ones(3, dtype)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    opt = MAKERS[name]()

    def states(params, grads):
        s0 = opt.init(params)
        u1, s1 = opt.update(grads, s0, params)
        u2, s2 = opt.update(grads, s1, params)
        return (s0, s1, s2), (u1, u2)

    all_states, updates = jax.eval_shape(states, params, grads)
    wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
    for s in all_states:
        inner = _states(s)
        assert inner.count.dtype == jnp.int32
        for field in ("z", "m", "v"):
            for leaf in jax.tree.leaves(getattr(inner, field, {})):
                assert leaf.dtype == dtype, (field, leaf.dtype)
        for field in ("weight_sum", "lr_max", "b1"):
            if hasattr(inner, field):
                assert getattr(inner, field).dtype == wide, field
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: adam_jax.schedule_free_adamw(learning_rate=-1.0), "learning_rate.*-1.0"),
        (lambda: adam_jax.schedule_free_adamw(b1=0.0), r"b1 must be in \(0, 1\).*b1=0.0"),
        (lambda: adam_jax.schedule_free_adamw(b1=1.0), "b1.*b1=1.0"),
        (lambda: adam_jax.schedule_free_adamw(b2=1.5), "b2.*b2=1.5"),
        (lambda: adam_jax.schedule_free_adamw(eps=-1e-8), "eps.*eps=-1e-08"),
        (lambda: adam_jax.schedule_free_adamw(weight_decay=-0.1), "weight_decay=-0.1"),
        (lambda: adam_jax.schedule_free_adamw(warmup_steps=-2), "warmup_steps=-2"),
        (lambda: adam_jax.schedule_free_adamw(warmup_steps=2.5), "warmup_steps=2.5"),
        (lambda: adam_jax.schedule_free_adamw(r=-1.0), "r=-1.0"),
        (lambda: adam_jax.schedule_free_adamw(weight_lr_power=float("nan")), "weight_lr_power"),
        (lambda: adam_jax.adopt(learning_rate=-1.0), "learning_rate.*-1.0"),
        (lambda: adam_jax.adopt(b1=1.0), "b1.*b1=1.0"),
        (lambda: adam_jax.adopt(b2=-0.1), "b2.*b2=-0.1"),
        (lambda: adam_jax.adopt(eps=-1.0), "eps=-1.0"),
        (lambda: adam_jax.adopt(weight_decay=-0.1), "weight_decay=-0.1"),
        (
            lambda: adam_jax.adopt(weight_decay=-0.1, decoupled_weight_decay=True),
            "weight_decay=-0.1",
        ),
        (
            lambda: adam_jax.adopt(weight_decay=lambda c: 0.1, decoupled_weight_decay=True),
            "weight_decay.*not a function",
        ),
        (lambda: adam_jax.adopt(decoupled_weight_decay=1), "decoupled_weight_decay=1"),
        (lambda: adam_jax.scale_by_adopt(use_clipping="yes"), "use_clipping='yes'"),
        (lambda: adam_jax.nadam(mu_product_dtype=jnp.int32), "mu_product_dtype=int32"),
        (lambda: adam_jax.nadam(mu_product_dtype=jnp.complex64), "mu_product_dtype=complex64"),
    ],
)
def test_modern_bad_input(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_modern_bad_state_and_params():
    opt = adam_jax.schedule_free_adamw()
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="needs the params"):
        opt.update(params, state)
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(2,\)"):
        opt.update({"w": jnp.ones(2)}, state, params)
    with pytest.raises(TypeError, match=r"complex64.*real params only"):
        opt.init({"w": jnp.ones(2, jnp.complex64)})
    with pytest.raises(TypeError, match="exactly one"):
        adam_jax.schedule_free_eval_params(adam_jax.adopt().init(params), params)
    with pytest.raises(TypeError, match=r"complex64.*real params only"):
        adam_jax.scale_by_adopt().init({"w": jnp.ones(2, jnp.complex64)})
    with pytest.raises(TypeError, match="ADOPTState"):
        adam_jax.scale_by_adopt().update(params, state)


def _loss_after(opt, steps=3):
    params = {k: jnp.asarray(v) for k, v in _gradients.initial_params().items()}
    state = opt.init(params)
    for g in grads_seq(steps):
        u, state = opt.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, u)
    return sum(jnp.sum(jnp.sin(p)) for p in jax.tree.leaves(params))


HYPER = {
    "schedule_free_adamw": (
        adam_jax.schedule_free_adamw,
        dict(
            learning_rate=0.05,
            b1=0.9,
            b2=0.99,
            eps=0.3,
            weight_decay=0.1,
            r=1.0,
            weight_lr_power=2.0,
        ),
        dict(warmup_steps=3),
    ),
    "adopt_decoupled": (
        adam_jax.adopt,
        dict(learning_rate=0.05, b1=0.9, b2=0.99, eps=0.7, weight_decay=0.1),
        dict(decoupled_weight_decay=True),
    ),
}


@pytest.mark.parametrize("name", list(HYPER))
def test_modern_hypergradients(name):
    """jax.grad of a loss after 3 steps w.r.t. each numeric hyperparameter equals
    central finite differences (h = 1e-6·value: truncation h²·f''' ~ 1e-12, rounding
    1e-16/h ~ 1e-10, relative)."""
    make, values, options = HYPER[name]
    keys = list(values)
    f = lambda hp: _loss_after(make(**dict(zip(keys, hp, strict=True)), **options))
    x = jnp.asarray([values[k] for k in keys])
    h = 1e-6 * x

    @jax.jit
    def grad_and_fd(x):
        shifts = jnp.diag(h)
        fd = jax.vmap(lambda e: f(x + e) - f(x - e))(shifts) / (2 * h)
        return jax.grad(f)(x), fd

    grads, fd = grad_and_fd(x)
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(grads, fd, rtol=1e-5, atol=1e-9, err_msg=str(keys))
    assert np.all(np.abs(fd) > 1e-6), keys  # each hyperparameter matters: the check can fail


@pytest.mark.parametrize("name", list(MAKERS))
def test_modern_compiles_once_and_vmaps(name):
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    grads = {"w": jnp.cos(jnp.arange(6.0))}

    def run(opt, params):
        state = opt.init(params)
        for _ in range(3):
            u, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, u)
        return params

    chex.clear_trace_counter()
    jitted = jax.jit(chex.assert_max_traces(lambda opt, params: run(opt, params), n=1))
    lrs = np.linspace(0.01, 0.1, 10)
    outs = [jitted(MAKERS[name](learning_rate=float(lr)), params) for lr in lrs]
    assert len({float(o["w"][0]) for o in outs}) == 10
    # vmap over the learning rate and b2: each lane is the optimizer built with its values
    b2s = np.linspace(0.9, 0.99, 10)
    stacked = jax.jit(jax.vmap(lambda lr, b2: run(MAKERS[name](learning_rate=lr, b2=b2), params)))(
        jnp.asarray(lrs), jnp.asarray(b2s)
    )
    for i in (0, 9):
        one = jitted(MAKERS[name](learning_rate=float(lrs[i]), b2=float(b2s[i])), params)
        np.testing.assert_allclose(stacked["w"][i], one["w"], rtol=1e-14)
