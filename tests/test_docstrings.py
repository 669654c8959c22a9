"""The runnable examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

import adam_jax

MODULES = sorted(
    {
        importlib.import_module(getattr(adam_jax, n).__module__)
        for n in adam_jax.__all__
        if hasattr(getattr(adam_jax, n), "__module__")
    },
    key=lambda m: m.__name__,
)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0
    # Every public module documents at least one runnable example.
    assert result.attempted > 0


def test_every_public_name_has_a_docstring():
    for name in adam_jax.__all__:
        obj = getattr(adam_jax, name)
        assert obj.__doc__ and len(obj.__doc__) > 40, name
