"""The documentation site builds in strict mode, with its equations, API and notebooks.

One build (``mkdocs build --strict``, as ``make docs`` runs it) into a temporary
directory: a broken link, an unresolved cross-reference or any other warning
fails it. The checks below then read the built HTML. Every ``python`` code block
of a guide runs too, in order, one namespace per page (``py`` blocks are shown,
not run: they need a cluster, a model or a path that a test does not have).
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
WITH_FIGURES = {
    "01_epsilon",
    "02_adam_from_scratch",
    "03_worked_example",
    "04_adamax",
    "05_amsgrad",
    "06_batched_sweeps",
    "07_sharding",
    "09_digits_mlp",
    "10_modern_adam",
}
PAGES = sorted((ROOT / "docs").glob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def test_every_guide_is_built(site):
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [
        line.split(":")[-1].strip() for line in nav.splitlines() if line.strip().endswith(".md")
    ]
    assert len(pages) >= 11
    for page in pages:
        built = site / page.removesuffix(".md") / "index.html"
        if page == "index.md":
            built = site / "index.html"
        assert built.is_file(), page


def test_api_reference_renders_equations_and_links(site):
    html = (site / "api" / "index.html").read_text()
    for name in ("scale_by_adam", "amsgrad", "adamax", "early_stopping", "fit", "FitResult"):
        assert f'id="adam_jax.{name}"' in html, name
    # reST ``.. math::`` blocks and :math: roles became MathJax input.
    assert r"\[" in html and r"\hat m_t" in html
    assert ".. math::" not in html and ":math:`" not in html and ":func:`" not in html
    assert 'href="#adam_jax.EarlyStoppingState"' in html


def test_signatures_one_parameter_a_line(site):
    """mkdocstrings formats long signatures (with ruff, from the docs extra)."""
    html = (site / "api" / "index.html").read_text()
    start = html.index('id="adam_jax.fit"')
    signature = html[html.index(">", html.index("doc-signature", start)) + 1 :]
    text = html_lib.unescape(re.sub(r"<[^>]+>", "", signature[: signature.index("</code>")]))
    lines = text.splitlines()
    assert lines[0] == "fit(" and "    num_steps: int," in lines, lines
    assert max(map(len, lines)) <= 88, lines


def test_navigation_titles_are_whole_and_numbered():
    nav = (ROOT / "mkdocs.yml").read_text()
    notebooks = re.findall(r'- "?(.*?)"?: notebooks/(\d\d)_\w+\.ipynb', nav)
    assert [n for _, n in notebooks] == [p[:2] for p in NOTEBOOKS]
    for title, number in notebooks:
        assert title.startswith(f"{int(number)} · "), title
    for name in NOTEBOOKS:  # the page's own title, numbered the same, with no code in it
        cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        heading = "".join(next(c for c in cells if c["cell_type"] == "markdown")["source"])
        heading = heading.splitlines()[0]
        assert heading.startswith(f"# {int(name[:2])} · ") and "`" not in heading, heading


def test_navigation_shows_the_short_titles(site):
    labels = re.findall(r'- "(\d · .*?)": notebooks/', (ROOT / "mkdocs.yml").read_text())
    shown = [
        t.strip()
        for t in re.findall(r'md-ellipsis">\s*([^<]*)<', (site / "index.html").read_text())
    ]
    assert labels and all(label in shown for label in labels), (labels, shown)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_render_with_their_outputs(site, name):
    html = (site / "notebooks" / name / "index.html").read_text()
    assert "jp-OutputArea-output" in html  # committed with outputs, rendered as they are
    if name in WITH_FIGURES:
        assert "data:image/png;base64" in html
    assert "Traceback" not in html


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_guide_examples_run(page, capsys):
    text = page.read_text()
    assert not re.search(r"\bseed (document )?0\d\d", text, re.I)
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, str(page), "exec"), namespace)
