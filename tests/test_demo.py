"""``adam-jax demo`` and the command line.

The demo itself runs once, in a subprocess, exactly as a user runs it; the
other tests exercise its pieces in-process.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types

import pytest

from adam_jax import __main__ as cli
from adam_jax import _demo


def _run(*args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adam_jax", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def _table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("seed ·"))
    assert [c.strip() for c in lines[header].split("·")] == list(_demo.COLUMNS)
    assert set(lines[header + 1]) == {"-"}
    rows = []
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        rows.append([c.strip() for c in line.split("·")])
    return rows


@pytest.mark.slow
def test_demo_reproduces_every_seed(tmp_path):
    out = tmp_path / "figure.png"
    proc = _run("demo", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout)
    assert len(rows) == 5
    assert {r[0] for r in rows} == {"000", "001", "002", "003"}
    for row in rows:
        assert len(row) == len(_demo.COLUMNS), row
        assert row[-1] == "yes", row
    by_what = {r[1]: r for r in rows}
    assert by_what["worked example: w 0.5 -> 0.600000"][5] == "by hand: w = 0.600000"
    seed001 = by_what["linear regression until MSE < 1"]
    assert seed001[5].startswith(f"NumPy loop stops at {seed001[3]},")
    assert "torch:" in by_what["2-layer MLP (64x1000 -> 100 -> 10)"][5]
    assert "vmapped sweep: 8 learning rates x 16 problems = 128 runs" in proc.stdout
    assert "0.5744" in proc.stdout  # the seed's slip is reported
    assert f"figure: {out}" in proc.stdout
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "5 of 5 reproductions match" in proc.stdout


def test_seed000_without_torch_checks_the_decreasing_loss():
    row, curves = _demo.seed000_mlp(use_torch=False)
    assert curves["torch"] is None
    assert row.match
    assert row.reference.startswith("decreasing:")
    losses = curves["losses"]
    assert losses[-1] < 1e-3 * losses[0]


def _fake(match: bool):
    def fn(*_args):
        row = _demo.Row("00x", "fake", "opt", "1", "0", "ref", match)
        return row, {"slip": 0.5744, "w1": 0.6, "torch": None}

    return fn


def _fake_demo(monkeypatch, *, match: bool):
    for name in ("worked_example", "seed001_regression", "seed003_adamax", "early_stopping_run"):
        monkeypatch.setattr(_demo, name, _fake(True))
    monkeypatch.setattr(_demo, "seed000_mlp", _fake(match))
    monkeypatch.setattr(_demo, "sweep", lambda: "vmapped sweep: skipped")


def test_demo_exits_nonzero_when_a_reproduction_does_not_match(monkeypatch, capsys, tmp_path):
    _fake_demo(monkeypatch, match=False)
    monkeypatch.setattr(_demo, "_figure", lambda curves, out: None)
    assert _demo.run(out=str(tmp_path / "f.png")) == 1
    stdout = capsys.readouterr().out
    assert [r[-1] for r in _table_rows(stdout)] == ["yes", "yes", "NO", "yes", "yes"]
    assert "4 of 5 reproductions match" in stdout


def test_demo_without_matplotlib_skips_the_figure(monkeypatch, capsys, tmp_path):
    _fake_demo(monkeypatch, match=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "f.png"
    assert _demo.run(out=str(out)) == 0
    stdout = capsys.readouterr().out
    assert "figure: skipped, matplotlib is not installed" in stdout
    assert "pip install 'adam_jax[notebooks]'" in stdout
    assert not out.exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), ["usage: adam-jax", "demo", "bench"]),
        (("demo",), ["usage: adam-jax demo", "--out PATH", "--no-torch", "adam_jax_demo.png"]),
        (("bench",), ["usage: adam-jax bench"]),
    ],
)
def test_help(args, expected):
    proc = _run(*args, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in expected:
        assert text in proc.stdout


def test_console_script_points_at_main():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="adam-jax")
    assert script.value == "adam_jax.__main__:main"
    assert script.load() is cli.main


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("adam_jax._bench")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "adam_jax._bench", fake)
    assert cli.main(["bench", "--quick", "--help", "x"]) == 7
    assert seen == [["--quick", "--help", "x"]]


def test_bench_says_clearly_when_the_module_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "adam_jax._bench", None)  # import now fails
    assert cli.main(["bench", "--quick"]) == 2
    assert "adam_jax._bench is not available" in capsys.readouterr().err
    assert cli.main(["bench", "--help"]) == 0
    stdout = capsys.readouterr().out
    assert "usage: adam-jax bench" in stdout and "not available" in stdout
