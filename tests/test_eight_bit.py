"""8-bit optimizer states (``state_bits=8``) against torchao's ``AdamW8bit``/``Adam8bit``.

The reference is torchao 0.18 itself (``torchao/optim/adam.py``, ``quant_utils.py``,
``subclass_8bit.py``): its maps, its quantizer, and its ``single_param_adam`` step run
live. torchao compiles that step with ``torch.compile``, which takes a minute on a CPU;
here it runs eagerly, with three operations computed as the compiled step computes them:
``Tensor.lerp`` as ``w·(end - start) + start`` with the product rounded (eager ATen fuses
it into one multiply-add, inductor's C++ does not), a division by a 0-d tensor as a
true division (eager ATen multiplies by the reciprocal), and ``sqrt`` correctly rounded
(eager ATen's can be an ulp off on this CPU). ``benchmarks/bench_eight_bit.py``
compares against the compiled optimizer as it ships.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchao.optim as torchao_optim
from _devices import run_on_8_cpu_devices
from torchao.optim import quant_utils
from torchao.optim.subclass_8bit import OptimState8bit

import adam_jax

F32 = jnp.float32


def _blocks_with_edges(signed: bool, rng: np.random.Generator) -> np.ndarray:
    """Blocks whose absmax is 1 (so ``x / scale`` is ``x``), holding every map entry,
    every midpoint and the floats next to them, plus random values over 30 decades."""
    q = adam_jax.dynamic_map(signed).astype(np.float32)
    mid = ((q[:-1].astype(np.float64) + q[1:]) / 2).astype(np.float32)
    edges = [q, mid]
    for k in range(1, 4):
        edges += [mid + k * np.spacing(mid), mid - k * np.spacing(mid)]
    edges = np.clip(np.concatenate(edges), -1.0 if signed else 0.0, 1.0)
    scale = np.exp(rng.uniform(-35, 3, 64 * 256)).astype(np.float32)
    rand = rng.standard_normal(64 * 256).astype(np.float32) * scale
    x = np.concatenate([edges, np.zeros(-edges.size % 256, np.float32), rand])
    x = x.astype(np.float32)
    if not signed:
        x = np.abs(x)
    x[::256] = 1.0
    return x


@pytest.mark.parametrize("signed", [True, False])
def test_maps_and_quantizer_are_torchaos(signed):
    qmap = torch.tensor(quant_utils.create_dynamic_map(signed), dtype=torch.float32)
    np.testing.assert_array_equal(adam_jax.dynamic_map(signed), qmap.numpy())

    x = _blocks_with_edges(signed, np.random.default_rng(0))
    x[-512:-256] = 0.0  # a block of zeros: scale 1e-12
    x[-256:] *= np.float32(1e-30)  # a block below the clip
    q = jax.jit(adam_jax.quantize_blockwise, static_argnums=1)(jnp.asarray(x), signed)
    y, scale = quant_utils.scale_tensor(torch.from_numpy(x), 256)
    codes = quant_utils.quantize_8bit_with_qmap(y, qmap)
    np.testing.assert_array_equal(np.asarray(q.codes), codes.numpy())
    np.testing.assert_array_equal(np.asarray(q.scales), scale.numpy())
    deq = quant_utils.dequant_with_qmap(codes, qmap, scale)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), deq.numpy())
    assert q.codes.dtype == jnp.uint8 and q.scales.dtype == F32


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_and_the_floats_around_every_rounding_boundary(signed):
    qmap = adam_jax.dynamic_map(signed)
    quantize = jax.jit(adam_jax.quantize_blockwise, static_argnums=1)
    # The map itself (absmax 1, so scale 1): each entry codes to itself and reads back
    # bit for bit, for all 256 codes.
    q = quantize(jnp.asarray(qmap), signed)
    np.testing.assert_array_equal(np.asarray(q.codes), np.arange(256))
    np.testing.assert_array_equal(np.asarray(q.dequantize()).view(np.int32), qmap.view(np.int32))

    # The 8 floats on either side of the float32 midpoint between each two neighbouring
    # entries (torchao's rounding boundary is within an ulp or two of it), and values
    # log-uniform over 12 decades, in blocks led by 1.0 so that x / scale is x.
    mid = ((qmap[:-1].astype(np.float64) + qmap[1:]) / 2).astype(np.float32)
    near = [mid]
    for direction in (np.float32(2), np.float32(-2)):
        x = mid
        for _ in range(8):
            x = np.nextafter(x, direction)
            near.append(x)
    rng = np.random.default_rng(3)
    sample = np.exp(rng.uniform(np.log(1e-12), 0, 20000)).astype(np.float32)
    if signed:
        sample *= rng.choice(np.float32([-1, 1]), sample.size)
    y = np.concatenate([*near, sample, np.float32([0.0, -0.0, 1.0, 1e-30])])
    y = np.clip(y, -1.0 if signed else 0.0, 1.0).astype(np.float32)
    y = np.concatenate([y, np.zeros(-y.size % 255, np.float32)]).reshape(-1, 255)
    x = np.concatenate([np.ones((y.shape[0], 1), np.float32), y], axis=1).ravel()
    codes = np.asarray(quantize(jnp.asarray(x), signed).codes)
    # torchao's quantizer on the same values (torchao/optim/quant_utils.py,
    # quantize_8bit_with_qmap: binary search, then up when y - q[c] >= (q[c+1] - q[c])/2).
    tmap = torch.from_numpy(qmap.copy())
    ref = quant_utils.quantize_8bit_with_qmap(torch.from_numpy(x), tmap)
    np.testing.assert_array_equal(codes, ref.numpy())
    # Every boundary is crossed within the floats tried around it.
    around = np.stack(near).T  # per boundary k between codes k and k + 1
    seen = quant_utils.quantize_8bit_with_qmap(torch.from_numpy(around), tmap).numpy()
    k = np.arange(255)[:, None]
    assert np.all((seen == k).any(axis=1) & (seen == k + 1).any(axis=1))


def _torchao_run(monkeypatch, cls, params, grads, **kw):
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only add contention

    def lerp(start, end, weight):  # what the compiled step computes for Tensor.lerp
        if isinstance(start, OptimState8bit):  # .float() of a float32 state is the state
            start = start.dequantize()
        return (end - start) * weight + start

    monkeypatch.setattr(torch.Tensor, "lerp", lerp)
    divide = torch.Tensor.__truediv__

    def truediv(a, b):  # eager ATen multiplies by 1/b for a 0-d b; the compiled step divides
        if isinstance(b, torch.Tensor) and b.dim() == 0 and a.dim() > 0:
            b = b.expand_as(a)
        return divide(a, b)

    monkeypatch.setattr(torch.Tensor, "__truediv__", truediv)

    def sqrt(x):  # eager ATen's sqrt can be an ulp off on this CPU; compiled rounds it
        return torch.from_numpy(np.asarray(np.sqrt(x.numpy())))

    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)
    ps = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = cls(list(ps.values()), **kw)
    for g in grads:
        for k, p in ps.items():
            p.grad = torch.from_numpy(g[k])
        opt.step()
        states = {k: opt.state[p] for k, p in ps.items()}
        yield {k: p.detach().numpy().copy() for k, p in ps.items()}, states
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_matches_torchao_for_100_steps(monkeypatch, name):
    rng = np.random.default_rng(1)
    shapes = {"w": (32, 256), "b": (96,)}  # one quantized leaf, one kept in float32
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {
            k: (rng.standard_normal(s) * 10 ** rng.uniform(-3, 1)).astype(np.float32)
            for k, s in shapes.items()
        }
        for _ in range(100)
    ]
    if name == "adamw":
        make, cls = adam_jax.adamw, torchao_optim.AdamW8bit
        kw = {"weight_decay": 1e-2}
    else:
        make, cls, kw = adam_jax.adam, torchao_optim.Adam8bit, {}
    ref = _torchao_run(monkeypatch, cls, params, grads, lr=1e-3, **kw)
    opt = make(1e-3, state_bits=8, **kw)
    # Negative control: the same optimizer as an optax chain (a schedule selects it),
    # which adds lr·wd·p and the step as one update and multiplies lr·((m/c1)/den).
    chained = make(optax.constant_schedule(1e-3), state_bits=8, **kw)
    index = 0 if name == "adamw" else 1  # the scale_by_adam state within the chain

    def stepper(opt):
        def step(params, state, g):
            u, state = opt.update(g, state, params)
            return optax.apply_updates(params, u), state

        return jax.jit(step)

    step, step_chained = stepper(opt), stepper(chained)
    p = p_chained = p_prev = jax.tree.map(jnp.asarray, params)
    state, state_chained = opt.init(p), chained.init(p)
    missed = {k: np.zeros(s, bool) for k, s in shapes.items()}  # p3 once out of reach
    since = {k: np.zeros(s) for k, s in shapes.items()}  # steps since then
    biggest = {k: np.abs(v) for k, v in params.items()}  # running max of |p|
    n_exact = n_chained_exact = n_total = 0
    for g, (p_ref, s_ref) in zip(grads, ref, strict=True):
        g = jax.tree.map(jnp.asarray, g)
        p, state = step(p, state, g)
        p_chained, state_chained = step_chained(p_chained, state_chained, g)
        inner = state[index]
        for field, key in (("m", "exp_avg"), ("v", "exp_avg_sq")):
            ours, theirs = getattr(inner, field)["w"], s_ref["w"][key]
            np.testing.assert_array_equal(np.asarray(ours.codes), theirs.codes.numpy())
            np.testing.assert_array_equal(np.asarray(ours.scales), theirs.scale.numpy())
            np.testing.assert_array_equal(
                np.asarray(getattr(inner, field)["b"]), s_ref["b"][key].numpy()
            )
        for k in shapes:
            # One update u = fl(p3 - p) gives p + u = p3 exactly when p3 - p is a float32
            # (always when p/2 <= p3 <= 2p, Sterbenz). Where it was not (a step across
            # or near zero), p + u is p3 to half an ulp of p, and later steps, started
            # from a param an ulp off, round each of their two subtractions on their
            # own: at most 2 ulps of the largest |p| a step.
            before, after = np.asarray(p_prev[k]), p_ref[k]
            missed[k] |= (before + (after - before)) != after
            since[k] = np.where(missed[k], since[k] + 1, 0)
            biggest[k] = np.maximum(biggest[k], np.abs(after))
            diff = np.abs(np.asarray(p[k]) - after)
            np.testing.assert_array_equal(np.where(missed[k], after, p[k]), after)
            assert np.all(diff <= 2 * since[k] * np.spacing(biggest[k]))
            n_exact += int(np.sum(diff == 0))
            n_chained_exact += int(np.sum(np.asarray(p_chained[k]) == after))
            n_total += after.size
        p_prev = jax.tree.map(jnp.asarray, p_ref)
    assert n_exact > 0.999 * n_total
    assert n_chained_exact < 0.99 * n_total


SHAPES = {"w": (64, 128), "b": (128,), "odd": (4100,)}  # only w is quantized
FAMILIES = {  # scale_by_* -> its moment fields and whether each is signed
    "scale_by_adam": {"m": True, "v": False},
    "scale_by_amsgrad": {"m": True, "v": False, "v_max": False},
    "scale_by_adamax": {"m": True, "u": False},
    "scale_by_nadam": {"m": True, "v": False},
    "scale_by_radam": {"m": True, "v": False},
    "scale_by_adopt": {"m": True, "v": False},
    "scale_by_ademamix": {"m": True, "m_slow": True, "v": False},
    "scale_by_stable_adamw": {"m": True, "v": False},
    "schedule_free_adamw": {"v": False},  # z is the base iterate, not a moment
}


def _family(family, **kw):
    """The family's transformation giving a step of size ~1e-2, and where its state is."""
    if family == "schedule_free_adamw":  # an alias: its update is the step itself
        return adam_jax.schedule_free_adamw(1e-2, **kw), lambda state: state
    make = getattr(adam_jax, family)
    return optax.chain(make(**kw), optax.scale(-1e-2)), lambda state: state[0]


def _params(rng):
    return {k: jnp.asarray(rng.standard_normal(s), F32) for k, s in SHAPES.items()}


def _run(opt, params, grads):
    state = opt.init(params)
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p))
    )
    for g in grads:
        params, state = step(params, state, g)
    return params, state


def _assert_state_dtypes(state, fields):
    for name, signed in fields.items():
        tree = getattr(state, name)
        q = tree["w"]
        assert isinstance(q, adam_jax.QuantizedArray) and q.signed == signed
        assert q.codes.dtype == jnp.uint8 and q.codes.shape == SHAPES["w"]
        assert q.scales.dtype == F32 and q.scales.shape == (64 * 128 // 256,)
        for k in ("b", "odd"):
            assert tree[k].dtype == F32 and tree[k].shape == SHAPES[k]


@pytest.mark.parametrize("family", FAMILIES)
def test_families_quantize_their_moments_and_track_float32(family):
    rng = np.random.default_rng(2)
    params = _params(rng)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), F32), params)
        for _ in range(8)
    ]
    fields = FAMILIES[family]
    opt8, inner = _family(family, state_bits=8)
    _assert_state_dtypes(inner(opt8.init(params)), fields)
    p8, s8 = _run(opt8, params, grads)
    _assert_state_dtypes(inner(s8), fields)
    opt32, _ = _family(family)
    p32, s32 = _run(opt32, params, grads)
    if family == "schedule_free_adamw":  # z stays float32, as with float32 states
        for k, z in s8.z.items():
            assert not isinstance(z, adam_jax.QuantizedArray)
            assert z.dtype == F32 and z.shape == SHAPES[k]
        for k in ("b", "odd"):
            np.testing.assert_array_equal(s8.z[k], s32.z[k])
    # The float32 leaves are updated exactly as with float32 states, except Adam's:
    # its 8-bit path is torchao's arithmetic, whose float32 ``1 - 0.999**t`` is off by
    # ~1e-5 relative (f32(0.999) is), where the float32 path is accurate to an ulp.
    exact = family != "scale_by_adam"
    for k in ("b", "odd"):
        if exact:
            np.testing.assert_array_equal(p8[k], p32[k])
        else:
            moved = np.abs(np.asarray(p32[k]) - np.asarray(params[k])).max()
            np.testing.assert_allclose(p8[k], p32[k], rtol=0, atol=1e-4 * moved)
    # Quantized moments: ~1% relative error in m and v moves each step by about as much.
    step_size = np.abs(np.asarray(p32["w"]) - np.asarray(params["w"])).max()
    assert np.abs(np.asarray(p8["w"]) - np.asarray(p32["w"])).max() < 0.1 * step_size


def test_state_bytes_and_peak_memory_of_a_donated_step():
    n_leaves, leaf = 10, (1024, 1024)
    n = n_leaves * leaf[0] * leaf[1]  # 1.05e7 params
    params = {f"w{i}": jax.ShapeDtypeStruct(leaf, F32) for i in range(n_leaves)}

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    opt = adam_jax.adamw(1e-3, state_bits=8)
    state = jax.eval_shape(opt.init, params)
    assert nbytes(state) / n <= 2.1  # codes 1 + 1, scales 2·4/256
    assert nbytes(jax.eval_shape(adam_jax.adamw(1e-3).init, params)) / n == pytest.approx(8)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    # What XLA reaches: the arguments (params, grads, 8-bit state; the state's buffers
    # are reused for the new one), and no float32 copy of the moments: each pass over a
    # leaf (block maxima, codes, param step) dequantizes what it reads. The bound of
    # the params, the grads, the state and one float32 copy of the largest leaf's two
    # moments leaves XLA room for copies of codes it overwrites.
    assert mem.argument_size_in_bytes <= (4 + 4 + 2.1) * n
    assert mem.output_size_in_bytes - mem.alias_size_in_bytes <= 1024  # updated in place
    assert peak <= (4 + 4 + 2.1) * n + 8 * leaf[0] * leaf[1]


@pytest.mark.parametrize(
    "make",
    [
        lambda: adam_jax.adamax(1e-3, state_bits=8),
        lambda: adam_jax.nadam(1e-3, state_bits=8),
        lambda: adam_jax.radam(1e-3, state_bits=8),
        lambda: adam_jax.adam(optax.constant_schedule(1e-3), state_bits=8),
    ],
    ids=["adamax", "nadam", "radam", "adam-schedule"],
)
def test_other_eight_bit_steps_hold_no_float32_moments(make):
    # Their update is the family's float32 update on dequantized moments. Computed from
    # one dequantized copy, XLA materializes float32 moments of every leaf (8 B/param
    # of temporaries); the step recomputes them per pass instead, and what it holds
    # beyond its arguments is at most a copy of the old codes (2 B/param).
    n_leaves, leaf = 2, (1024, 1024)
    n = n_leaves * leaf[0] * leaf[1]
    params = {f"w{i}": jax.ShapeDtypeStruct(leaf, F32) for i in range(n_leaves)}
    opt = make()
    state = jax.eval_shape(opt.init, params)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    mem = compiled.memory_analysis()
    assert mem.output_size_in_bytes - mem.alias_size_in_bytes <= 1024  # updated in place
    assert mem.temp_size_in_bytes <= 2.1 * n


@pytest.mark.parametrize("bits", [16, 4, True, "8", 8.0])
def test_bad_state_bits(bits):
    with pytest.raises(ValueError, match=r"state_bits must be 8 or 32 .*got state_bits="):
        adam_jax.adamw(state_bits=bits)


@pytest.mark.parametrize(
    "make", ["adopt", "ademamix", "stable_adamw", "scale_by_stable_adamw", "schedule_free_adamw"]
)
def test_bad_state_bits_on_the_newer_families(make):
    with pytest.raises(ValueError, match=r"state_bits must be 8 or 32 .*got state_bits=16"):
        getattr(adam_jax, make)(state_bits=16)


def test_bad_dtypes_with_8_bit_states():
    with pytest.raises(ValueError, match="mu_dtype=bfloat16"):
        adam_jax.adam(mu_dtype=jnp.bfloat16, state_bits=8)
    with pytest.raises(ValueError, match="nu_dtype=float16"):
        adam_jax.scale_by_nadam(nu_dtype=jnp.float16, state_bits=8)
    with pytest.raises(ValueError, match="mu_dtype=bfloat16"):
        adam_jax.ademamix(mu_dtype=jnp.bfloat16, state_bits=8)
    with pytest.raises(ValueError, match="nu_dtype=bfloat16"):
        adam_jax.stable_adamw(nu_dtype=jnp.bfloat16, state_bits=8)
    with pytest.raises(TypeError, match=r"params\['w'\].*int32"):
        adam_jax.adam(state_bits=8).init({"w": jnp.zeros((64, 64), jnp.int32)})


def test_nonfinite_gradient():
    """A NaN gradient makes the param NaN, as with float32 states; its block's moments
    become NaN too (the block's scale is NaN), as in torchao. ``apply_if_finite`` skips
    the step and keeps the 8-bit state as it was."""
    params = {"w": jnp.ones((16, 512), F32)}
    g = {"w": jnp.full((16, 512), 0.5, F32).at[0, 3].set(jnp.nan)}
    opt = adam_jax.adam(1e-2, state_bits=8)
    state = opt.init(params)
    u, new = opt.update(g, state, params)
    p = np.asarray(optax.apply_updates(params, u)["w"])
    assert np.isnan(p[0, 3]) and np.isfinite(np.delete(p.ravel(), 3)).all()
    m = np.asarray(new[1].m["w"].dequantize()).ravel()
    assert np.isnan(m[:256]).all() and np.isfinite(m[256:]).all()

    guarded = optax.apply_if_finite(adam_jax.adam(1e-2, state_bits=8), 1)
    gstate = guarded.init(params)
    _, after = guarded.update(g, gstate, params)
    for a, b in zip(
        jax.tree.leaves(after.inner_state), jax.tree.leaves(gstate.inner_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip_resumes_bit_for_bit(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    rng = np.random.default_rng(3)
    params = _params(rng)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), F32), params)
        for _ in range(6)
    ]
    opt = adam_jax.adamw(1e-2, state_bits=8)
    p3, s3 = _run(opt, params, grads[:3])
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", {"params": p3, "state": s3})
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "state", {"params": p3, "state": s3})
    assert jax.tree.structure(restored["state"]) == jax.tree.structure(s3)
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p))
    )
    a, b = (p3, s3), (restored["params"], restored["state"])
    for g in grads[3:]:
        a, b = step(*a, g), step(*b, g)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_vmap_over_problems_equals_one_at_a_time():
    rng = np.random.default_rng(4)
    params = jnp.asarray(rng.standard_normal((3, 4096)), F32)
    grads = jnp.asarray(rng.standard_normal((3, 4096)), F32)
    opt = adam_jax.adam(1e-2, state_bits=8)

    def one(p, g):
        u, s = opt.update(g, opt.init(p), p)
        return optax.apply_updates(p, u), s

    batched = jax.jit(jax.vmap(one))(params, grads)
    for i in range(3):
        single = jax.jit(one)(params[i], grads[i])
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_array_equal(x[i], y)


def test_sharded_states_follow_the_params_without_collectives():
    done = run_on_8_cpu_devices("_eight_bit_sharding.py", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["codes_sharding_matches_params"], report
    assert report["scales_sharded"], report
    assert report["update_collectives"] == [], report
    assert report["canary_collectives"], report  # the scan does see collectives
    # The same arithmetic, fused differently: params of ~1 agree to a few ulps.
    assert report["max_abs_diff_vs_one_device"] <= 1e-6, report


def test_cautious_reads_the_stored_eight_bit_moment():
    """``cautious=True`` with ``state_bits=8``: the mask uses the 8-bit first moment as
    stored, so the step is the 8-bit step masked where that moment and g disagree."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=4096), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.normal(size=4096), jnp.float32)} for _ in range(3)]
    # The plain step as the same optax chain (a schedule selects it), not torchao's
    # whole-step form, whose update carries the param's rounding.
    plain, careful = (
        adam_jax.adamw(optax.constant_schedule(1e-2), state_bits=8),
        adam_jax.adamw(1e-2, state_bits=8, cautious=True),
    )
    s_plain, s_careful = plain.init(params), careful.init(params)
    for g in grads:
        u_plain, s_plain = plain.update(g, s_plain, params)
        u_careful, s_careful = careful.update(g, s_careful, params)
    m = s_careful[0].m["w"].dequantize()
    agree = np.asarray(m * grads[-1]["w"] > 0)
    assert 0 < agree.mean() < 1  # the mask fires
    decay = -1e-2 * 1e-4 * params["w"]  # adamw's decoupled decay, not masked
    direction = np.asarray(u_plain["w"] - decay)
    want = np.where(agree, direction / max(agree.mean(), 1e-3), 0.0) + np.asarray(decay)
    np.testing.assert_allclose(np.asarray(u_careful["w"]), want, rtol=1e-5, atol=1e-9)
