"""What a new user meets first: the package's description, license and namespace, the
install hints, and the errors of a first ``fit``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import adam_jax
from adam_jax import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_every_family_is_named_in_the_descriptions():
    """Each ``scale_by_*`` family is in the CLI's list, and that list in the package's
    description, the CLI's help, the docs site's description and the README's first line."""
    exported = {n.removeprefix("scale_by_") for n in adam_jax.__all__ if n.startswith("scale_by_")}
    named = {_squash(f) for f in cli.FAMILIES}
    assert {_squash(f) for f in exported} <= named, exported
    site = re.search(r"^site_description: (.*)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    readme = (ROOT / "README.md").read_text().split("\n\n")[1]
    for text in (PYPROJECT["project"]["description"], cli.DESCRIPTION, site[1], readme):
        missing = [f for f in cli.FAMILIES if f not in text]
        assert not missing, (missing, text)


def test_license_file_and_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert any(
        c.startswith("Programming Language :: Python :: 3.11")
        for c in PYPROJECT["project"]["classifiers"]
    )


def test_namespace_holds_the_api_and_modules_only():
    """``dir(adam_jax)``: the public names, dunders and the library's own private modules."""
    extra = [n for n in dir(adam_jax) if not n.startswith("__") and n not in adam_jax.__all__]
    assert all(n.startswith("_") for n in extra), extra
    assert "importlib" not in dir(adam_jax)


def test_install_hints_work_from_a_checkout():
    """adam_jax is on no package index: every hint installs from the checkout."""
    files = [ROOT / "README.md", ROOT / "Makefile", *ROOT.glob("docs/*.md")]
    files += [
        *ROOT.glob("adam_jax/*.py"),
        *ROOT.glob("examples/*.py"),
        *ROOT.glob("notebooks/*.ipynb"),
    ]
    found = [f.name for f in files if re.search(r"pip install [\"']?adam[_-]jax\[", f.read_text())]
    assert not found, found


def test_a_forgotten_has_aux_is_named():
    loss_and_metric = lambda w: (jnp.sum(w**2), jnp.sum(w))
    with pytest.raises(
        ValueError, match=r"returns a pair: if it is \(loss, metric\), pass has_aux=True"
    ):
        adam_jax.fit(loss_and_metric, jnp.zeros(3), adam_jax.adam(0.1), num_steps=2)
    # Another wrong output gets no has_aux hint.
    with pytest.raises(ValueError, match=r"must be a single array, got \{") as e:
        adam_jax.fit(lambda w: {"loss": jnp.sum(w)}, jnp.zeros(3), adam_jax.adam(0.1), num_steps=2)
    assert "has_aux" not in str(e.value)


def _fit(target, **kw):
    return adam_jax.fit(
        lambda p: (p - target) ** 2,
        jnp.asarray(0.0),
        optax.sgd(0.1),
        num_steps=20,
        early_stopping=adam_jax.early_stopping(None, target=1e-2),
        history=adam_jax.History.none(),
        **kw,
    )


def test_stop_reasons_by_name_in_reprs_and_logs(capsys):
    one = _fit(1.0, log_every=10)
    assert "stop_reason=TARGET," in repr(one)
    # The last log line: the step whose value stopped the run, and why.
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"step {int(one.num_steps)} stopped: TARGET", lines
    batch = jax.vmap(lambda t: _fit(t, log_every=10))(jnp.array([1.0, 1e3, 2.0]))
    assert "stop_reason=[TARGET NONE TARGET]," in repr(batch)
    assert capsys.readouterr().out.splitlines()[-1] == (
        "stop reasons of the 3 problems: NONE 1, TARGET 2"
    )
    # A run that did not stop early ends its logs with its last step's line.
    _fit(1e3, log_every=10)
    assert "stopped" not in capsys.readouterr().out
    # A large batch keeps the codes.
    many = jax.vmap(_fit)(jnp.ones(100))
    assert "stop_reason=Array([2, 2," in repr(many)
