"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

import jax.numpy as jnp
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(source, capsys):
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    if "train_step" in namespace:  # the donation recipe: one step moved the params
        assert int(namespace["opt_state"][1].count) == 1
        assert float(jnp.abs(namespace["params"]["w"]).min()) > 0
    elif "results" in namespace:  # the batched fit: 64 runs, each stopped on its own
        results = namespace["results"]
        assert results.num_steps.shape == (64,)
        assert int(results.num_steps.min()) < int(results.num_steps.max())
    else:  # the quickstart: training lowered the loss
        start = {k: 0 * v for k, v in namespace["params"].items()}
        assert float(namespace["loss_fn"](namespace["params"])) < float(namespace["loss_fn"](start))
