"""The ``adam-jax`` command line: the version, and the checkout scripts it runs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import adam_jax
from adam_jax import __main__ as cli


def test_version_has_one_source():
    assert adam_jax.__version__ == importlib.metadata.version("adam_jax")
    proc = subprocess.run(
        [sys.executable, "-m", "adam_jax", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"adam_jax {adam_jax.__version__}"


def test_console_script_points_at_main():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="adam-jax")
    assert script.value == "adam_jax.__main__:main"
    assert script.load() is cli.main


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, script", [("demo", "examples/demo.py"), ("bench", "benchmarks/bench_update.py")]
)
def test_commands_run_the_checkout_scripts_with_their_arguments(monkeypatch, command, script):
    seen = []

    def fake_run(args, check):
        seen.append(args)
        return subprocess.CompletedProcess(args, 7)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert cli.main([command, "--quick", "--help", "x"]) == 7
    assert seen == [[sys.executable, str(cli.CHECKOUT / script), "--quick", "--help", "x"]]
    assert (cli.CHECKOUT / script).is_file()


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_commands_say_clearly_when_there_is_no_checkout(monkeypatch, capsys, tmp_path, command):
    monkeypatch.setattr(cli, "CHECKOUT", tmp_path)
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    assert f"adam-jax {command}: needs a source checkout of adam_jax" in err
    assert cli.SCRIPTS[command] in err
