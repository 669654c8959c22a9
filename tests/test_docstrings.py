"""The runnable examples in the public API's docstrings run and print what they say.

The examples are found from ``adam_jax.__all__``, as a user meets them, and each runs
in an empty namespace: an example imports what it uses.
"""

from __future__ import annotations

import doctest

import pytest

import adam_jax

FINDER = doctest.DocTestFinder()


def _examples(name: str) -> list[doctest.DocTest]:
    obj = adam_jax if name == "adam_jax" else getattr(adam_jax, name)
    found = FINDER.find(obj, f"adam_jax.{name}" if obj is not adam_jax else name, globs={})
    return [t for t in found if t.examples]


NAMES = ["adam_jax", *adam_jax.__all__]
# Public names with no example of their own: state containers and enums, which
# the optimizers' and fit's examples build and read.
NO_EXAMPLE = {n for n in NAMES if not _examples(n)}


@pytest.mark.parametrize("name", sorted(set(NAMES) - NO_EXAMPLE))
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_every_function_has_an_example():
    functions = {n for n in adam_jax.__all__ if callable(getattr(adam_jax, n))}
    classes = {n for n in adam_jax.__all__ if isinstance(getattr(adam_jax, n), type)}
    assert not (functions - classes) & NO_EXAMPLE


def test_every_public_name_has_a_docstring():
    for name in adam_jax.__all__:
        obj = getattr(adam_jax, name)
        assert obj.__doc__ and len(obj.__doc__) > 40, name
