"""The README's Python examples run as written, and what it points to exists."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(source, capsys):
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    if "results" in namespace:  # the batched fit: 64 runs, each stopped on its own
        results = namespace["results"]
        assert results.num_steps.shape == (64,)
        assert int(results.num_steps.min()) < int(results.num_steps.max())
        # Why each stopped, by name, as printed.
        names = results.stop_reason_names()
        assert {"NONE", "TARGET"} <= set(names.tolist())
        assert "'TARGET'" in capsys.readouterr().out
    else:  # the quickstart: training lowered the loss
        start = {k: 0 * v for k, v in namespace["params"].items()}
        assert float(namespace["loss_fn"](namespace["params"])) < float(namespace["loss_fn"](start))


def test_readme_links_exist():
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", TEXT)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing


def test_readme_speaks_to_users():
    assert "make demo" in TEXT and "make test" in TEXT and "make docs" in TEXT
    assert not re.search(r"\bseeds?\b", TEXT, re.I)  # no internal tutorial numbering
    # Install lines work from a checkout: adam_jax is not on a package index.
    installs = re.findall(r"pip install (\S+)", TEXT)
    assert installs
    assert all(arg in ("-e", "-q") for arg in installs), installs
