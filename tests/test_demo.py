"""examples/demo.py: run once as a user runs it (a subprocess), and its pieces in-process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["demo"]


def _checks(stdout: str) -> dict[str, list[str]]:
    """Each check's title -> [mark, adam_jax line, reference line]."""
    lines = stdout.splitlines()
    out = {}
    for i, line in enumerate(lines):
        if line.startswith(("[ok] ", "[FAILED] ")):
            mark, title = line.split(" ", 1)
            out[title] = [mark, lines[i + 1].strip(), lines[i + 2].strip()]
    return out


@pytest.mark.slow
def test_demo_checks_every_exercise(tmp_path):
    out = tmp_path / "figure.png"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = _checks(proc.stdout)
    assert len(checks) == 5 and all(c[0] == "[ok]" for c in checks.values()), proc.stdout
    worked = checks["one Adam step worked by hand, L = (3w - 4)^2"]
    assert worked[1:] == [
        "adam_jax:  adam(0.1), 1 step: w 0.5 -> 0.600000",
        "reference: by hand: w = 0.600000",
    ]
    regression = checks["Adam from scratch on a linear regression that stops at MSE < 1"]
    stop = regression[1].split("stops at step ")[1].split(",")[0]
    assert regression[2].startswith(f"reference: NumPy loop stops at {stop};")
    assert "torch:" in checks["two-layer MLP (64x1000 -> 100 -> 10) trained with AMSGrad"][2]
    assert "w = 0.5744 instead of 0.6000" in proc.stdout  # the worked example's slip
    assert "8 learning rates x 16 problems = 128 fits" in proc.stdout
    assert f"figure: {out}" in proc.stdout
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "5 of 5 checks pass" in proc.stdout
    assert "seed" not in proc.stdout.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]  # nothing else written


def test_mlp_without_torch_checks_the_falling_loss(demo):
    check, curves = demo.mlp(use_torch=False)
    assert curves["torch"] is None
    assert check.match and check.reference.startswith("no torch: expected a falling loss")
    assert curves["losses"][-1] < 1e-3 * curves["losses"][0]


class _FakeCheck:
    def __init__(self, match: bool):
        self.match = match

    def __str__(self) -> str:
        return ("[ok]" if self.match else "[FAILED]") + " fake\n    adam_jax: -\n    reference: -"


def _fake(match: bool):
    return lambda *_args, **_kw: (_FakeCheck(match), {"slip": 0.5744, "w1": 0.6})


def test_demo_exits_nonzero_when_a_check_fails(demo, monkeypatch, capsys, tmp_path):
    for name in ("worked_step", "regression", "adamax_function", "stopping"):
        monkeypatch.setattr(demo, name, _fake(True))
    monkeypatch.setattr(demo, "mlp", _fake(False))
    monkeypatch.setattr(demo, "sweep", lambda: "vmapped sweep: skipped")
    monkeypatch.setattr(demo, "figure", lambda curves, out: None)
    assert demo.main(["--out", str(tmp_path / "f.png")]) == 1
    stdout = capsys.readouterr().out
    marks = [line.split(" ")[0] for line in stdout.splitlines() if line.startswith("[")]
    assert marks == ["[ok]", "[ok]", "[FAILED]", "[ok]", "[ok]"]
    assert "4 of 5 checks pass" in stdout


def test_demo_says_first_how_to_get_torch(demo, monkeypatch, capsys, tmp_path):
    """Without torch, the first thing printed after the versions is how to get the full check;
    the docstring counts the checks the demo prints."""
    for name in ("worked_step", "regression", "mlp", "adamax_function", "stopping"):
        monkeypatch.setattr(demo, name, _fake(True))
    monkeypatch.setattr(demo, "sweep", lambda: "vmapped sweep: skipped")
    monkeypatch.setattr(demo, "figure", lambda curves, out: None)
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a)
    )
    assert demo.main(["--out", str(tmp_path / "f.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("torch is not installed") and "make demo-torch" in lines[3], lines
    assert "5 of 5 checks pass" in lines[-1]
    assert demo.__doc__.startswith("adam_jax on five classic Adam exercises")
    assert demo.__doc__.count("\n* ") == 5
