"""The step benchmark (``benchmarks/bench_update.py``) runs end to end and writes its JSON.

Tiny sizes and two runs per contender: this checks the script, never a speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_update

BENCHMARKS = Path(bench_update.__file__).parent

TINY = [
    "--one-leaf-log2", "10",
    "--leaves", "3",
    "--leaf-size", "32",
    "--batch", "8",
    "--loop-subset", "2",
    "--reps", "2",
    "--warmup", "1",
    "--optimizers", "adam",
]  # fmt: skip


def test_bench_writes_every_case(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_update.main([*TINY, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"schema", "machine", "settings", "method", "goals", "cases"} <= set(report)
    assert {"cpu", "cores", "versions"} <= set(report["machine"])
    assert {"jax", "jaxlib", "optax", "torch"} <= set(report["machine"]["versions"])
    assert report["settings"]["reps"] == 2
    by_case = {row["case"]: row for row in report["cases"]}
    assert set(by_case) == set(bench_update.CASES)
    for row in report["cases"]:
        assert row["optimizer"] == "adam"
        for name in ("adam_jax", "optax"):
            res = row["results"][name]
            assert res["runs"] == 2
            assert res["median_ms"] > 0
            assert {"trace_lower_s", "compile_s", "kernels", "hlo_bytes_per_param"} <= set(res)
    for case in ("one_leaf", "many_leaves", "bf16"):
        row = by_case[case]
        assert row["floor"]["median_ms"] > 0
        assert {"adam_jax/optax", "adam_jax/floor"} <= set(row["ratios"])
    assert {"ratio_compile_s", "ratio_trace_plus_compile"} <= set(by_case["many_leaves"]["compile"])
    assert by_case["vmap"]["results"]["optax_python_loop"]["problems_timed"] == 2
    assert by_case["vmap"]["ratios"]["optax_python_loop/adam_jax"] > 0
    for case in ("one_leaf", "bf16"):
        mem = by_case[case]["memory"]["adam_jax"]
        assert mem["peak_bytes"] > 0 and mem["state_bytes"] > 0
    # bfloat16 moments halve the state (count aside).
    f32 = by_case["one_leaf"]["results"]["adam_jax"]["state_bytes"]
    bf16 = by_case["bf16"]["results"]["adam_jax"]["state_bytes"]
    assert bf16 < 0.6 * f32
    printed = capsys.readouterr().out
    assert "Step time" in printed and "Compile time" in printed and "vmap" in printed


def test_bench_rejects_unknown_case():
    with pytest.raises(SystemExit):
        bench_update.main(["--cases", "nope", "--no-json"])


def test_results_go_beside_the_script_not_into_the_working_directory(tmp_path, monkeypatch, capsys):
    assert bench_update.RESULTS == BENCHMARKS / "results"
    results, cwd = tmp_path / "results", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(bench_update, "RESULTS", results)
    tiny = [*TINY, "--cases", "one_leaf", "--no-torch"]
    assert bench_update.main(tiny) == 0
    assert bench_update.main([*tiny, "--quick"]) == 0
    assert sorted(p.name for p in results.iterdir()) == ["update-quick.json", "update.json"]
    assert list(cwd.iterdir()) == []
    assert f"JSON: {results / 'update-quick.json'}" in capsys.readouterr().out
