"""StableAdamW, AdEMAMix and cautious updates against their live references, in float64.

* ``stable_adamw`` against ``torch-optimi``'s ``StableAdamW`` (``optimi``) and
  pytorch-optimizer's ``StableAdamW``;
* ``ademamix`` against a transcription of Apple's ``ml-ademamix``
  (``references/ademamix_apple.py``), pytorch-optimizer's ``AdEMAMix`` (the paper's
  schedule) and ``optax.contrib.ademamix`` (constant ``alpha`` and ``b3``);
* ``cautious=True`` against timm's ``AdamWLegacy(caution=True)`` (``cadamw``), imported
  from ``timm/optim/adamw.py`` without ``timm/__init__`` (which needs torchvision);
  ``cautious="paper"`` against pytorch-optimizer's ``apply_cautious``, through its
  ``AdEMAMix`` with ``alpha=0`` (Adam with a masked first moment).

torch runs with ``torch.set_default_dtype(torch.float64)``. The gradients are the
hostile sequence of ``_gradients`` (100x spikes, 0.01x lulls, sign flips) over 60
steps: the spikes make StableAdamW's rms clipping fire, the sign flips the cautious
mask; each test asserts that they did. Error model: every side computes in float64
with a different order of operations, ~1e-16 relative a step, growing by at most
the number of steps; params are O(1), so 1e-10 absolute is a wide margin that a
wrong formula (the negative controls: 1e-7 and more) cannot meet.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pathlib
import sys
import types

import _gradients
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimi
import pytest
import pytorch_optimizer
import torch
from references import ademamix_apple

import adam_jax

STEPS = 60
LR = 1e-2
SHAPES = _gradients.SHAPES
PARAM_ATOL = 1e-10


pytestmark = pytest.mark.usefixtures("torch_float64")


def timm_adamw() -> types.ModuleType:
    """``timm.optim.adamw`` without running ``timm/__init__`` (it imports torchvision):
    the two packages on the way are stand-ins pointing at timm's folders, removed again."""
    if "timm.optim.adamw" in sys.modules:
        return sys.modules["timm.optim.adamw"]
    spec = importlib.util.find_spec("timm")
    assert spec is not None and spec.origin is not None
    root = pathlib.Path(spec.origin).parent
    added = []
    for name, path in [("timm", root), ("timm.optim", root / "optim")]:
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
            added.append(name)
    try:
        return importlib.import_module("timm.optim.adamw")
    finally:
        for name in added:
            del sys.modules[name]


@jax.jit
def _step(opt, params, state, grads):
    # The optimizer is an argument: cases that differ only in numeric
    # hyperparameters (its leaves) share one compilation.
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def run_ours(opt, steps=STEPS, dtype=jnp.float64):
    """Params (NumPy dicts) and states after every step."""
    params = {k: jnp.asarray(v, dtype) for k, v in _gradients.initial_params().items()}
    state = opt.init(params)
    is_pytree = not any(callable(x) for x in jax.tree.leaves(opt))  # optax's are not
    local = jax.jit(lambda *args: _step.__wrapped__(opt, *args))
    step = functools.partial(_step, opt) if is_pytree else local
    trajectory, states = [], []
    for grads in _gradients.gradient_sequence(steps):
        params, state = step(params, state, {k: jnp.asarray(g, dtype) for k, g in grads.items()})
        trajectory.append({k: np.asarray(v) for k, v in params.items()})
        states.append(state)
    return trajectory, states


def run_torch(make, steps=STEPS, dtype=torch.float64):
    """torch's params after every step; ``make(params)`` builds the optimizer."""
    params = {
        k: torch.tensor(v, dtype=dtype, requires_grad=True)
        for k, v in _gradients.initial_params().items()
    }
    opt = make(list(params.values()))
    trajectory = []
    for grads in _gradients.gradient_sequence(steps):
        for k, p in params.items():
            p.grad = torch.tensor(grads[k], dtype=dtype)
        opt.step()
        trajectory.append({k: p.detach().numpy().copy() for k, p in params.items()})
    return trajectory


def max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64))))
        for x, y in zip(a, b, strict=True)
        for k in x
    )


def inner(state, cls):
    (found,) = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, cls))
        if isinstance(s, cls)
    ]
    return found


# --- StableAdamW -----------------------------------------------------------------------


def stable_case(wd: float, reference: str, foreach: bool = False) -> tuple[float, int]:
    """(largest param difference, number of (step, tensor) pairs where rms clipping fired)."""
    ours, states = run_ours(adam_jax.stable_adamw(LR, weight_decay=wd))
    if reference == "optimi":
        theirs = run_torch(
            lambda p: optimi.StableAdamW(
                p, lr=LR, weight_decay=wd, kahan_sum=False, foreach=foreach
            )
        )
    else:
        theirs = run_torch(
            lambda p: pytorch_optimizer.StableAdamW(
                p, lr=LR, weight_decay=wd, eps=1e-6, kahan_sum=False, foreach=foreach
            )
        )
    fired = sum(
        int(float(x) < 1)
        for s in states
        for x in jax.tree.leaves(inner(s, adam_jax.StableAdamWState).lr_scale)
    )
    return max_diff(ours, theirs), fired


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_stable_adamw_matches_optimi(wd):
    diff, fired = stable_case(wd, "optimi")
    assert fired >= 5, "the gradient spikes must make the rms clipping fire"
    assert diff <= PARAM_ATOL


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_stable_adamw_matches_pytorch_optimizer(wd):
    diff, _ = stable_case(wd, "pytorch_optimizer")
    assert diff <= PARAM_ATOL


def test_stable_adamw_decay_uses_the_clipped_rate():
    """Negative control: AdamW-style decay with the unclipped rate is far off."""
    ours, _ = run_ours(adam_jax.stable_adamw(LR, weight_decay=0.5))
    unclipped_decay, _ = run_ours(
        optax.chain(
            adam_jax.stable_adamw(LR, weight_decay=0.0),
            optax.add_decayed_weights(-LR * 0.5),  # -lr·wd·p after the clipped step
        )
    )
    assert max_diff(ours, unclipped_decay) > 1e-6


# --- AdEMAMix --------------------------------------------------------------------------

B3 = 0.999  # the slow moment matters within STEPS
ALPHA = 5.0


def ademamix_case(wd: float, warmup: int | None, schedule: str) -> float:
    ours, _ = run_ours(
        adam_jax.ademamix(
            LR,
            b3=B3,
            alpha=ALPHA,
            weight_decay=wd,
            alpha_warmup=warmup,
            b3_warmup=warmup,
            b3_schedule=schedule,
        )
    )
    if schedule == "apple":
        theirs = run_torch(
            lambda p: ademamix_apple.AdEMAMix(
                p,
                lr=LR,
                betas=(0.9, 0.999, B3),
                alpha=ALPHA,
                beta3_warmup=warmup,
                alpha_warmup=warmup,
                weight_decay=wd,
            )
        )
    else:
        theirs = run_torch(
            lambda p: pytorch_optimizer.AdEMAMix(
                p,
                lr=LR,
                betas=(0.9, 0.999, B3),
                alpha=ALPHA,
                t_alpha_beta3=warmup,
                weight_decay=wd,
                weight_decouple=True,
            )
        )
    return max_diff(ours, theirs)


@pytest.mark.parametrize("schedule", ["apple", "paper"])
@pytest.mark.parametrize("warmup", [None, 40], ids=["constant", "warmup40"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_ademamix_matches_references(wd, warmup, schedule):
    assert ademamix_case(wd, warmup, schedule) <= PARAM_ATOL


def test_ademamix_schedules_differ():
    """Negative control: the two half-life interpolations are not the same schedule."""
    apple, _ = run_ours(adam_jax.ademamix(LR, b3=B3, alpha=ALPHA, alpha_warmup=40, b3_warmup=40))
    paper, _ = run_ours(
        adam_jax.ademamix(
            LR, b3=B3, alpha=ALPHA, alpha_warmup=40, b3_warmup=40, b3_schedule="paper"
        )
    )
    assert max_diff(apple, paper) > 1e-8


def test_ademamix_matches_optax_with_constant_alpha_and_b3():
    kw = dict(b1=0.9, b2=0.999, b3=B3, alpha=ALPHA, eps=1e-8, weight_decay=0.1)
    ours, _ = run_ours(adam_jax.ademamix(LR, **kw))
    theirs, _ = run_ours(optax.contrib.ademamix(LR, **kw))
    assert max_diff(ours, theirs) <= PARAM_ATOL


def test_optax_ademamix_schedules_count_from_zero():
    """Negative control: Apple's warmups written as optax schedules (which see the step
    count from 0) are one step behind the reference."""
    warmup = 40

    def alpha(count):
        return ALPHA * jnp.minimum(count / warmup, 1.0)

    def b3(count):
        a = jnp.minimum(count / warmup, 1.0)
        f1, f3 = (np.log(0.5) / np.log(b + 1e-8) - 1 for b in (0.9, B3))
        return 0.5 ** (1 / ((1 - a) * f1 + a * f3 + 1))

    theirs, _ = run_ours(optax.contrib.ademamix(LR, b3=b3, alpha=alpha))
    reference = run_torch(
        lambda p: ademamix_apple.AdEMAMix(
            p, lr=LR, betas=(0.9, 0.999, B3), alpha=ALPHA, beta3_warmup=warmup, alpha_warmup=warmup
        )
    )
    assert max_diff(theirs, reference) > 1e-6


# --- cautious --------------------------------------------------------------------------


def mask_fired(states, cls) -> int:
    """How many (step, element) pairs the mask zeroed: m_t·g_t <= 0."""
    grads = _gradients.gradient_sequence(STEPS)
    return sum(
        int(np.sum(np.asarray(inner(s, cls).m[k]) * g[k] <= 0))
        for s, g in zip(states, grads, strict=True)
        for k in g
    )


def timm_case(wd: float, maximize: bool, foreach: bool, amsgrad: bool = False) -> tuple[float, int]:
    adamw_module = timm_adamw()
    if amsgrad:
        ours, states = run_ours(adam_jax.amsgrad(LR, maximize=maximize, cautious=True))
        cls = adam_jax.AMSGradState
    else:
        ours, states = run_ours(
            adam_jax.adamw(LR, weight_decay=wd, maximize=maximize, cautious=True)
        )
        cls = adam_jax.AdamState
    theirs = run_torch(
        lambda p: adamw_module.AdamWLegacy(
            p,
            lr=LR,
            weight_decay=wd,
            amsgrad=amsgrad,
            caution=True,
            maximize=maximize,
            foreach=foreach,
        )
    )
    return max_diff(ours, theirs), mask_fired(states, cls)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_cautious_adamw_matches_timm(wd, maximize, foreach):
    diff, fired = timm_case(wd, maximize, foreach)
    assert fired >= 50, "the sign flips must make the mask fire"
    assert diff <= PARAM_ATOL


def test_cautious_amsgrad_matches_timm():
    diff, fired = timm_case(0.0, False, False, amsgrad=True)
    assert fired >= 50
    assert diff <= PARAM_ATOL


def paper_case(wd: float) -> float:
    ours, _ = run_ours(adam_jax.adamw(LR, weight_decay=wd, cautious="paper"))
    theirs = run_torch(
        lambda p: pytorch_optimizer.AdEMAMix(
            p,
            lr=LR,
            betas=(0.9, 0.999, 0.9999),
            alpha=0.0,
            weight_decay=wd,
            weight_decouple=True,
            cautious=True,
        )
    )
    return max_diff(ours, theirs)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_cautious_paper_matches_pytorch_optimizer(wd):
    assert paper_case(wd) <= PARAM_ATOL


def test_cautious_normalisations_differ():
    """Negative control: timm's and the paper's normalisations are different steps,
    and a cautious step is not Adam's."""
    timm_, _ = run_ours(adam_jax.adamw(LR, cautious=True))
    paper, _ = run_ours(adam_jax.adamw(LR, cautious="paper"))
    plain, _ = run_ours(adam_jax.adamw(LR))
    assert max_diff(timm_, paper) > 1e-4
    assert max_diff(timm_, plain) > 1e-3


@jax.jit
def _update(opt, grads, state, params):
    return opt.update(grads, state, params)


ALIASES = {
    "adam": lambda c: adam_jax.adam(LR, cautious=c),
    "adamw": lambda c: adam_jax.adamw(LR, weight_decay=0.0, cautious=c),
    "amsgrad": lambda c: adam_jax.amsgrad(LR, cautious=c),
    "nadam": lambda c: adam_jax.nadam(LR, cautious=c),
    "nadamw": lambda c: adam_jax.nadamw(LR, weight_decay=0.0, cautious=c),
    "radam": lambda c: adam_jax.radam(LR, cautious=c),
    "radamw": lambda c: adam_jax.radamw(LR, weight_decay=0.0, cautious=c),
    "adamax": lambda c: adam_jax.adamax(LR, cautious=c),
    "adamaxw": lambda c: adam_jax.adamaxw(LR, weight_decay=0.0, cautious=c),
    "stable_adamw": lambda c: adam_jax.stable_adamw(LR, weight_decay=0.0, cautious=c),
    "ademamix": lambda c: adam_jax.ademamix(LR, b3=B3, cautious=c),
}


ALIAS_CASES = [(name, "timm") for name in sorted(ALIASES)] + [("adam", "paper")]


@pytest.mark.parametrize(("name", "form"), ALIAS_CASES)
def test_cautious_masks_every_alias(name, form):
    """From the same state, a cautious step is the plain step masked per tensor by
    (m_t·g_t > 0), normalised as the form says (computed here in NumPy)."""
    plain, careful = ALIASES[name](False), ALIASES[name](form)
    params = {k: jnp.asarray(v) for k, v in _gradients.initial_params().items()}
    state = plain.init(params)
    grads = [{k: jnp.asarray(g) for k, g in d.items()} for d in _gradients.gradient_sequence(4)]
    for g in grads[:3]:
        _, state = _update(plain, g, state, params)
    u_plain, new_state = _update(plain, grads[3], state, params)
    u_careful, careful_state = _update(careful, grads[3], state, params)
    assert jax.tree.structure(careful_state) == jax.tree.structure(new_state)
    m = jax.tree.leaves(new_state, is_leaf=lambda s: hasattr(s, "m") and hasattr(s, "count"))
    (moments,) = [s.m for s in m if hasattr(s, "m")]
    zeroed = 0
    for k in SHAPES:
        agree = (np.asarray(moments[k]) * np.asarray(grads[3][k]) > 0).astype(np.float64)
        scale = 1 / max(agree.mean(), 1e-3) if form == "timm" else agree.size / (agree.sum() + 1)
        np.testing.assert_allclose(
            u_careful[k], np.asarray(u_plain[k]) * agree * scale, rtol=1e-14, atol=1e-300
        )
        zeroed += int(np.sum(agree == 0))
    assert zeroed > 0


# --- float32 against the references at torch's default dtype ----------------------------

F32_STEPS = 50
# Error model: per step, each side rounds the param update p - lr·u once (1/2 ulp of
# |p|) and computes u with a few ulps relative error, which the step size
# lr·|u| <~ lr·(1 + alpha) = 0.06 < max|p|/20 (max|p| = 1.35) shrinks below another 1/2
# ulp of max|p|; the schedules' scalars (b3_t, alpha_t) enter the same way. That is at
# most 2 ulps of max|p| a step between the two sides, added up without cancellation
# over the run: 2·50 ulps = 1.2e-5 relative.
# Measured (max over steps of max|a-b| / max|b|): stable_adamw 4.9e-7,
# ademamix apple 4.4e-7, paper 8.9e-7, adamw(cautious=True) 6.6e-7, i.e. <= 8 ulps.
# The negative controls are 2e-3 and more. The two AdEMAMix b3 schedules differ by
# 1.2e-6 here, within float32 rounding: the float64 tests tell them apart.
F32_RTOL = 2 * F32_STEPS * float(np.finfo(np.float32).eps)


def rel_diff32(ours_opt, make_torch) -> float:
    """max over steps of max|ours - torch| / max|torch|, both in float32."""
    ours, _ = run_ours(ours_opt, steps=F32_STEPS, dtype=jnp.float32)
    theirs = run_torch(make_torch, steps=F32_STEPS, dtype=torch.float32)
    scale = max(float(np.max(np.abs(y[k]))) for y in theirs for k in y)
    return max_diff(ours, theirs) / scale


def apple32(p):
    return ademamix_apple.AdEMAMix(
        p,
        lr=LR,
        betas=(0.9, 0.999, B3),
        alpha=ALPHA,
        beta3_warmup=40,
        alpha_warmup=40,
        weight_decay=0.1,
    )


def paper32(p, weight_decouple=True):
    return pytorch_optimizer.AdEMAMix(
        p,
        lr=LR,
        betas=(0.9, 0.999, B3),
        alpha=ALPHA,
        t_alpha_beta3=40,
        weight_decay=0.1,
        weight_decouple=weight_decouple,
    )


def ademamix32(schedule):
    return adam_jax.ademamix(
        LR,
        b3=B3,
        alpha=ALPHA,
        weight_decay=0.1,
        alpha_warmup=40,
        b3_warmup=40,
        b3_schedule=schedule,
    )


def optax_ademamix_from_zero():
    """Apple's warmups as optax schedules, which count from 0: one step behind."""

    def alpha(count):
        return ALPHA * jnp.minimum(count / 40, 1.0)

    def b3(count):
        a = jnp.minimum(count / 40, 1.0)
        f1, f3 = (np.log(0.5) / np.log(b + 1e-8) - 1 for b in (0.9, B3))
        return 0.5 ** (1 / ((1 - a) * f1 + a * f3 + 1))

    return optax.contrib.ademamix(LR, b3=b3, alpha=alpha, weight_decay=0.1)


# name: (ours, reference, (a real difference: optimizer, reference))
FLOAT32_CASES = {
    "stable_adamw": (
        lambda: adam_jax.stable_adamw(LR, weight_decay=0.1),
        lambda p: optimi.StableAdamW(p, lr=LR, weight_decay=0.1, kahan_sum=False, foreach=False),
        # AdamW-style decay with the unclipped rate
        lambda: optax.chain(
            adam_jax.stable_adamw(LR, weight_decay=0.0), optax.add_decayed_weights(-LR * 0.1)
        ),
    ),
    "ademamix_apple": (lambda: ademamix32("apple"), apple32, optax_ademamix_from_zero),
    "ademamix_paper": (
        lambda: ademamix32("paper"),
        paper32,
        # the reference's coupled decay (its default) against our decoupled one
        lambda: ademamix32("paper"),
    ),
    "adamw_cautious": (
        lambda: adam_jax.adamw(LR, weight_decay=0.1, cautious=True),
        lambda p: timm_adamw().AdamWLegacy(p, lr=LR, weight_decay=0.1, caution=True),
        # the paper's normalisation instead of timm's
        lambda: adam_jax.adamw(LR, weight_decay=0.1, cautious="paper"),
    ),
}


@pytest.mark.parametrize("name", sorted(FLOAT32_CASES))
def test_float32_matches_reference_at_torch_default_dtype(name):
    """float32 params and gradients on both sides, torch at its default dtype float32,
    50 steps of the hostile gradients: within F32_RTOL (error model above)."""
    torch.set_default_dtype(torch.float32)  # the fixture restores it
    ours, reference, other = FLOAT32_CASES[name]
    assert rel_diff32(ours(), reference) <= F32_RTOL
    # Negative control: a real difference is far outside the tolerance.
    if name == "ademamix_paper":
        control = rel_diff32(other(), functools.partial(paper32, weight_decouple=False))
    else:
        control = rel_diff32(other(), reference)
    assert control > 100 * F32_RTOL


# --- pytree properties, dtypes, bad input, hypergradients ------------------------------

# No recompiles for new hyperparameter values and vmap over a stack of optimizers: the
# shared tables of test_pytree.py (stable_adamw, ademamix, adamw_cautious).

STATE_CASES = {
    "stable_adamw": (lambda: adam_jax.stable_adamw(1e-2), adam_jax.StableAdamWState),
    "ademamix": (lambda: adam_jax.ademamix(1e-2, b3_warmup=3), adam_jax.AdEMAMixState),
    "cautious_adamw": (lambda: adam_jax.adamw(1e-2, cautious=True), adam_jax.AdamState),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(STATE_CASES))
def test_state_dtypes(name, dtype):
    make, cls = STATE_CASES[name]
    opt = make()
    params = {"w": jnp.ones((2, 3), dtype), "b": jnp.zeros(3, dtype)}
    compute = jnp.float32 if dtype == jnp.bfloat16 else dtype

    def check(state):
        s = inner(state, cls)
        assert s.count.dtype == jnp.int32
        for field in s._fields[1:]:
            for leaf in jax.tree.leaves(getattr(s, field)):
                want = compute if field == "lr_scale" else dtype
                assert leaf.dtype == want, (field, leaf.dtype)
                assert leaf.shape == (() if field == "lr_scale" else leaf.shape)

    state = opt.init(params)
    check(state)
    grads = {"w": jnp.full((2, 3), 0.5, dtype), "b": jnp.array([1.0, -1.0, 2.0], dtype)}
    updates, state = jax.jit(opt.update)(grads, state, params)
    check(state)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    ("build", "error", "words"),
    [
        (lambda: adam_jax.stable_adamw(b2=1.0), ValueError, "b2=1.0"),
        (lambda: adam_jax.stable_adamw(eps=-1e-6), ValueError, "eps=-1e-06"),
        (lambda: adam_jax.stable_adamw(weight_decay=-0.1), ValueError, "weight_decay=-0.1"),
        (lambda: adam_jax.stable_adamw(-1.0), ValueError, "learning_rate=-1.0"),
        (lambda: adam_jax.ademamix(b3=1.5), ValueError, "b3=1.5"),
        (lambda: adam_jax.ademamix(alpha=-2.0), ValueError, "alpha=-2.0"),
        (lambda: adam_jax.ademamix(alpha_warmup=0), ValueError, "alpha_warmup=0"),
        (lambda: adam_jax.ademamix(b3_warmup=2.5), ValueError, "b3_warmup=2.5"),
        (lambda: adam_jax.ademamix(b3_schedule="linear"), ValueError, "b3_schedule='linear'"),
        (lambda: adam_jax.adamw(cautious="always"), ValueError, "cautious='always'"),
        (lambda: adam_jax.nadam(cautious=1), TypeError, "cautious=1"),
        (lambda: adam_jax.cautious(adam_jax.scale_by_adam(), "x"), ValueError, "form='x'"),
    ],
)
def test_bad_input_names_argument_and_value(build, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace("+", r"\+")):
        build()


def quadratic_loss(p):
    return jnp.sum(jnp.array([1.0, 4.0, 0.25]) * (p - jnp.array([1.0, -2.0, 0.5])) ** 2)


HYPERGRADIENTS = {
    "stable_adamw": (
        lambda h: adam_jax.stable_adamw(h["lr"], h["b1"], h["b2"], h["eps"], h["wd"]),
        dict(lr=0.1, b1=0.9, b2=0.99, eps=1e-2, wd=0.1),
    ),
    "ademamix": (
        lambda h: adam_jax.ademamix(
            h["lr"],
            h["b1"],
            h["b2"],
            h["b3"],
            h["alpha"],
            h["eps"],
            h["wd"],
            alpha_warmup=4,
            b3_warmup=4,
        ),
        dict(lr=0.1, b1=0.9, b2=0.99, b3=0.999, alpha=2.0, eps=1e-2, wd=0.1),
    ),
    "cautious_adamw": (
        lambda h: adam_jax.adamw(
            h["lr"], h["b1"], h["b2"], h["eps"], weight_decay=h["wd"], cautious=True
        ),
        dict(lr=0.1, b1=0.9, b2=0.99, eps=1e-2, wd=0.1),
    ),
}


@pytest.mark.parametrize("name", sorted(HYPERGRADIENTS))
def test_hypergradients_match_finite_differences(name):
    make, values = HYPERGRADIENTS[name]

    def final_loss(h):
        opt = make(h)
        p = jnp.array([0.3, 0.2, -0.4])
        state = opt.init(p)
        for _ in range(3):
            u, state = opt.update(jax.grad(quadratic_loss)(p), state, p)
            p = optax.apply_updates(p, u)
        return quadratic_loss(p)

    h0 = {k: jnp.asarray(v, jnp.float64) for k, v in values.items()}
    grads = jax.jit(jax.grad(final_loss))(h0)
    loss = jax.jit(final_loss)
    for k, v in values.items():
        step = 1e-6 * max(abs(v), 1e-2)
        up, down = dict(h0), dict(h0)
        up[k], down[k] = h0[k] + step, h0[k] - step
        fd = (float(loss(up)) - float(loss(down))) / (2 * step)
        assert abs(float(grads[k]) - fd) <= 1e-6 * max(1.0, abs(fd)), (k, float(grads[k]), fd)
