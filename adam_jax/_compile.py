"""How the training loops are compiled and traced: XLA:CPU's compile options for
them, and a function traced once and replayed (the loss, which every step calls)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
from jax.extend.core import jaxpr_as_fun

# XLA:CPU compiles the training loops about twice as fast with its elemental emitters as
# with its newer fusion emitters (JAX's default), and runs them about as fast; the two round a
# few operations differently (a few ulps). See benchmarks/bench_first_call.py.
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def _jitted(fn: Callable[..., Any], static: tuple[str, ...], options: bool) -> Callable[..., Any]:
    return jax.jit(
        fn, static_argnames=static, compiler_options=CPU_COMPILER_OPTIONS if options else None
    )


def compiled(fn: F, *static: str) -> F:
    """``jax.jit(fn)``, with :data:`CPU_COMPILER_OPTIONS` on CPU when no transformation
    is tracing (in a user's ``jit`` the outer program's options are the ones that count,
    and ``grad`` cannot linearize through a ``jit`` that has them) and this jaxlib knows
    them."""
    cpu = _at_top_level() and jax.default_backend() == "cpu"
    return cast(F, _jitted(fn, static, cpu and _options_known()))


@functools.cache
def _options_known() -> bool:
    # Checked once, on a tiny program: a jaxlib without the option refuses it.
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS)(jnp.float32(0))
    except Exception:
        return False
    return True


def _at_top_level() -> bool:
    # JAX has no public test for it; without this private one, never.
    try:
        from jax._src import core

        return bool(core.trace_ctx.is_top_level())
    except (ImportError, AttributeError):
        return False


def traced_once(fn: Callable[..., object], *args: object) -> Callable[..., object]:
    """``fn`` traced once at the types of ``args``: a function that replays that
    trace, for arguments of the same types, without calling ``fn`` again."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out_tree = jax.tree.structure(shape)
    replay = jaxpr_as_fun(closed)

    def call(*a: object) -> object:
        return jax.tree.unflatten(out_tree, replay(*jax.tree.leaves(a)))

    return call


class TracedOnce:
    """``fn``, traced at its first call and replayed at every later one (same types).

    ``pretraced``, ``(fn, types, replay)`` from an earlier :func:`traced_once`
    of the same function in the same trace, is used when the types match.
    """

    def __init__(self, fn: Callable[..., object], pretraced: tuple[Any, ...] | None = None) -> None:
        self.fn, self.pretraced = fn, pretraced
        self.replay: Callable[..., object] | None = None

    def __call__(self, *args: object) -> Any:
        if self.replay is None:
            pre = self.pretraced
            if pre is not None and pre[0] is self.fn and pre[1] == types(args):
                self.replay = pre[2]
            else:
                self.replay = traced_once(self.fn, *args)
        return self.replay(*args)


def types(tree: object) -> tuple[Any, ...]:
    """The tree structure and the types of the leaves of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(jax.typeof(x) for x in leaves)
