"""Every notebook in notebooks/ executes from top to bottom without an error.

The notebooks assert their own claims (trajectories equal, w == 0.6, Adam ends
at +1, ...), so a regression in adam_jax fails the notebook that relies on it.
They run in a fresh kernel with notebooks/ as the working directory; the
stored outputs are not rewritten.
"""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


# The notebooks that reproduce the seeds; each teaches with figures.
WITH_FIGURES = [
    "01_epsilon.ipynb",
    "02_adam_from_scratch.ipynb",
    "03_worked_example.ipynb",
    "04_adamax.ipynb",
    "05_amsgrad.ipynb",
    "06_batched_sweeps.ipynb",
]


def test_the_notebooks_are_there():
    names = {p.name for p in NOTEBOOKS}
    assert set(WITH_FIGURES) <= names


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # Committed with their outputs, so that they render on the web.
    stored = [o for c in code for o in c.get("outputs", [])]
    assert stored, "committed without outputs"
    assert not [o for o in stored if o.get("output_type") == "error"]
    if path.name in WITH_FIGURES:
        assert any("image/png" in o.get("data", {}) for o in stored), "no stored figure"
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
