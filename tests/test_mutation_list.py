"""The mutation pass (``tests/mutation/run.py``) stays runnable: every mutation's text is
still in its module exactly once, so none has gone stale as the code changed, and its
tests name files that exist. (Running the mutants themselves takes minutes: see that file.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mutations() -> list:
    spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "tests/mutation/run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTATIONS


MUTATIONS = _mutations()


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_once_and_names_real_tests(mutation):
    text = (ROOT / "adam_jax" / mutation.module).read_text()
    assert text.count(mutation.old) == 1, (
        f"{mutation.name}: its text occurs {text.count(mutation.old)} times in {mutation.module}"
    )
    assert mutation.new != mutation.old
    files = [a for a in mutation.tests if a.endswith(".py")]
    assert files and all((ROOT / f).is_file() for f in files)


def test_mutation_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))
