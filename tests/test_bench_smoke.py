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
    assert bench_update.main([*TINY, "--out", str(out)]) == 0
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
    # Every goal of every case is measured and marked, in the table and the JSON.
    goals = report["goal_results"]
    assert {g["case"] for g in goals} == set(bench_update.CASES)
    assert all(
        g["met"] in (True, False) for g in goals if g["goal"] != "adam_jax <= 1.0x torch fused"
    )
    met, missed = sum(g["met"] is True for g in goals), sum(g["met"] is False for g in goals)
    assert f"Goals: {met} met, {missed} missed" in printed
    assert printed.count("| met") + printed.count("| MISSED") == met + missed


def test_bench_rejects_unknown_case():
    with pytest.raises(SystemExit):
        bench_update.main(["--cases", "nope"])


def test_bench_writes_no_file_unless_told(tmp_path, monkeypatch, capsys):
    """Without --out nothing is written (the committed results stay as they are)."""
    monkeypatch.chdir(tmp_path)
    before = sorted((BENCHMARKS / "results").iterdir())
    assert bench_update.main([*TINY, "--cases", "one_leaf", "--no-torch"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert sorted((BENCHMARKS / "results").iterdir()) == before
    assert "--out FILE writes the whole run" in capsys.readouterr().out


def test_bench_knows_every_optimizer_family():
    """--optimizers offers one entry for each scale_by_* family the library exports."""
    import adam_jax

    families = {n.removeprefix("scale_by_") for n in adam_jax.__all__ if n.startswith("scale_by_")}
    assert families <= set(bench_update.OPTIMIZERS), families - set(bench_update.OPTIMIZERS)
    help_text = bench_update.build_parser().format_help()
    assert ",".join(bench_update.OPTIMIZERS) in help_text.replace("\n", "").replace(" ", "")


def test_bench_fit_compares_the_three_ways(tmp_path, capsys):
    import bench_fit

    out = tmp_path / "fit.json"
    tiny = ["--problems", "12", "--num-steps", "400", "--same-steps", "20", "--slots", "4"]
    args = [*tiny, "--repeats", "1", "--only-batched", "--no-sweep", "--out", str(out)]
    assert bench_fit.main(args) == 0
    report = json.loads(out.read_text())
    assert {"jax", "jaxlib", "optax"} <= set(report["versions"])
    early, same = report["batched"]["early_stopping"], report["batched"]["same_steps"]
    assert {"anchor", "vmap_fit", "fit_batched_default", "fit_batched_4"} <= set(early)
    for rows in (early, same):
        for name in ("anchor", "vmap_fit", "fit_batched_default"):
            row = rows[name]
            assert row["median_s"] > 0 and row["computed"] >= row["needed"] > 0
            assert row["us_per_computed_step"] > 0 and row["distance_from_limit"] > 0
            assert row["stop_step_mismatches_vs_anchor"] <= 1  # float32 rounding near MSE = 1
    # Every problem takes the same steps: nothing is wasted by any of them.
    assert all(same[k]["computed_over_needed"] == 1.0 for k in ("anchor", "vmap_fit"))
    assert same["fit_batched_default"]["needed"] == 12 * 20
    # Under vmap every problem runs until the slowest stops; refilled lanes do not.
    assert early["fit_batched_4"]["computed"] < early["vmap_fit"]["computed"]
    assert early["anchor"]["compile_s"] > 0 and "compile_estimate_s" in early["fit_batched_4"]
    assert "(a) 12 problems" in capsys.readouterr().out


def test_bench_lane_step_reports_every_layer(tmp_path, capsys):
    import bench_lane_step

    out = tmp_path / "lane_step.json"
    args = ["--widths", "4", "--steps", "3", "--repeats", "1", "--problems", "16"]
    assert bench_lane_step.main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    layers = ("grad", "+adam", "+stop_rule", "fit", "fit+history", "lanes", "lanes_staggered",
              "lanes_staggered+history")  # fmt: skip
    assert list(rows) == [f"4/{layer}" for layer in layers]
    # The history changes what a lane-step costs, not the steps computed.
    staggered = rows["4/lanes_staggered"]["computed"]
    assert rows["4/lanes_staggered+history"]["computed"] == staggered
    assert all(row["median_s"] > 0 and row["us_per_step"] > 0 for row in rows.values())
    assert rows["4/grad"]["computed"] == 4 * 3  # lanes x steps
    assert rows["4/lanes"]["computed"] >= 16 * 3  # every problem's steps, idle lanes too
    assert "4/lanes_staggered" in capsys.readouterr().out


def test_bench_scaling_quick(tmp_path, capsys):
    import bench_scaling

    out = tmp_path / "scaling.json"
    assert bench_scaling.main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"cpu", "cores", "versions"} <= set(report["machine"])
    assert report["load_average_start"] is None or len(report["load_average_start"]) == 3
    caps = {row["cap"]: row for row in report["cap"]}
    assert set(caps) == {10**3, 10**9}
    # The cap above the steps the problem needs changes nothing about the run.
    assert caps[10**9]["steps_run"] < 10**4 and caps[10**9]["history_len"] <= 100_000
    assert all(row["peak_rss_bytes"] > 0 for row in report["cap"] + report["problems"])
    assert [row["problems"] for row in report["problems"]] == [1, 8]
    assert all(row["computed"] >= row["needed"] > 0 for row in report["problems"])
    for row in report["params"]:
        for name in ("adam_jax", "optax"):
            assert row[name]["median_ms"] > 0 and row[name]["bytes_per_param_at_floor_bandwidth"]
    assert {1, 10} == {row["leaves"] for row in report["params"]}
    assert [row["leaves"] for row in report["leaves"]] == [10, 30]
    assert {"problems", "leaves"} <= set(report["summary"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "fit_batched against the number of problems" in capsys.readouterr().out
