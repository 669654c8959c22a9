"""adam_jax across processes: 2 processes x 4 CPU devices against 1 process x 8.

Each run is ``tests/_multiprocess_worker.py`` (the program docs/multihost.md
walks through), launched once per process with ``jax.distributed.initialize``
on a localhost coordinator and gloo CPU collectives. Three launches cover all
checks:

1. 2 processes compute (optimizers, vmapped ``fit``) and save an orbax checkpoint;
2. 1 process computes, saves a checkpoint and restores the 2-process one;
3. 2 processes restore the 1-process checkpoint.

Every program that runs in both process counts is the same program on the same
8 devices with the same per-device shapes, so results must agree bitwise.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _devices import FAST_COMPILE_FLAGS

HERE = pathlib.Path(__file__).parent
WORKER = HERE / "_multiprocess_worker.py"
DOC = HERE.parent / "docs" / "multihost.md"
TIMEOUT_S = 240
AXIS_TYPES = ["explicit", "auto"]
OPTIMIZERS = ["adam", "amsgrad", "adamax"]
LAYOUTS = ["sharded", "replicated", "zero1"]
# Must list the worker's FIT_VARIANTS.
FIT_VARIANTS = ["auto/fixed_steps", "auto/early_stopping", "explicit/fixed_steps"]
FIT_FIELDS = ["params", "losses", "num_steps", "stop_reason", "best_step"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(num_processes: int, out: pathlib.Path, *extra: str) -> list[dict]:
    """Run the worker in ``num_processes`` processes; fail with their stderr if any fails."""
    coordinator = f"localhost:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS  # both process counts alike
    env["PYTHONPATH"] = str(WORKER.parents[1])  # this checkout's adam_jax, whatever is installed
    procs, logs = [], []
    for i in range(num_processes):
        log = open(out.parent / f"{out.name}.{i}.log", "w+")
        cmd = [sys.executable, str(WORKER), "--num-processes", str(num_processes)]
        cmd += ["--process-id", str(i), "--coordinator", coordinator]
        cmd += ["--devices", str(8 // num_processes), "--out", str(out), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    try:
        while failed is None:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                failed = "a process failed"
            elif all(c == 0 for c in codes):
                break
            elif time.monotonic() > deadline:
                failed = f"timed out after {TIMEOUT_S} s"
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:  # a peer failed or time ran out: the rest would wait forever
                p.kill()
                p.wait()
    outputs = []
    for p, log in zip(procs, logs, strict=True):
        log.seek(0)
        outputs.append(f"--- process (exit {p.returncode}) ---\n{log.read()[-5000:]}")
        log.close()
    if failed:
        pytest.fail(f"{num_processes}-process run: {failed}\n" + "\n".join(outputs))
    return [json.loads((out / f"process_{i}.json").read_text()) for i in range(num_processes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    ckpt1, ckpt2 = tmp / "ckpt_1_process", tmp / "ckpt_2_processes"
    start = time.monotonic()
    info2 = launch(2, tmp / "two", "--task", "compute", "--save-to", str(ckpt2))
    info1 = launch(
        1, tmp / "one", "--task", "compute", "--save-to", str(ckpt1), "--restore-from", str(ckpt2)
    )
    info_restore2 = launch(
        2, tmp / "two_restore", "--task", "restore", "--restore-from", str(ckpt1)
    )
    wall = time.monotonic() - start
    print(f"three multi-process launches: {wall:.1f} s")
    load = lambda name: dict(np.load(tmp / name / "result.npz"))
    return {
        "one": load("one"),
        "two": load("two"),
        "two_restore": load("two_restore"),
        "info_one": info1,
        "info_two": info2,
        "info_two_restore": info_restore2,
    }


def keys(result, prefix):
    found = sorted(k for k in result if k.startswith(prefix))
    assert found, f"no results under {prefix}"
    return found


def assert_bitwise_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    # Byte views: NaNs compare too, and -0.0 differs from 0.0.
    as_bytes = lambda x: np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    assert np.array_equal(as_bytes(a), as_bytes(b)), (
        f"{what}: max abs diff {np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))}"
    )


def test_runs_span_both_process_counts(runs):
    two = runs["info_two"]
    assert [r["process_index"] for r in two] == [0, 1]
    assert [r["process_count"] for r in two] == [2, 2]
    # Each process owns 4 of the 8 devices (CPU device ids count from 2048 * process index).
    ids = [r["local_device_ids"] for r in two]
    assert [len(i) for i in ids] == [4, 4] and not set(ids[0]) & set(ids[1])
    assert runs["info_one"][0]["local_device_ids"] == list(range(8))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_optimizer_steps_equal_across_process_counts(runs, axis_type, optimizer, layout):
    prefix = f"opt/{axis_type}/{optimizer}/{layout}/"
    one, two = runs["one"], runs["two"]
    assert keys(one, prefix) == keys(two, prefix)
    for k in keys(one, prefix):
        assert_bitwise_equal(one[k], two[k], k)
    (count,) = [k for k in keys(one, prefix) if k.endswith(".count")]
    assert one[count] == 10
    assert all(np.all(np.isfinite(one[k])) for k in keys(one, prefix))


ZERO1_SPECS = {"w": "P('data', None)", "b": "P('data',)", "s": "P()"}


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_state_layouts_in_two_processes(runs, axis_type):
    for info in runs["info_two"]:
        for optimizer in OPTIMIZERS:
            for layout in LAYOUTS:
                rec = info["state_specs"][f"{axis_type}/{optimizer}/{layout}"]
                assert rec["init"] == rec["final"], (optimizer, layout)
                moments = set(rec["final"]) - {"P()"}
                if layout == "sharded":
                    assert moments == {"P('model',)", "P('data', 'model')"}
                elif layout == "zero1":
                    assert moments == {"P('data',)", "P('data', None)"}
                else:
                    assert moments <= {"P(None,)", "P(None, None)"}


@pytest.mark.parametrize("variant", FIT_VARIANTS)
def test_batched_fit_equal_across_process_counts(runs, variant):
    one, two = runs["one"], runs["two"]
    prefix = f"fit/{variant}/"
    for field in FIT_FIELDS:
        k = f"{prefix}.{field}"
        assert_bitwise_equal(one[k], two[k], k)
    losses = one[f"{prefix}.losses"]
    assert losses.shape[0] == 16
    # Every problem was fitted: its last recorded loss is below its first.
    first, last = losses[:, 0], np.array([row[np.isfinite(row)][-1] for row in losses])
    assert np.all(last < first)
    if variant.endswith("early_stopping"):
        assert len(set(one[f"{prefix}.num_steps"].tolist())) > 3


@pytest.mark.parametrize("variant", FIT_VARIANTS)
def test_batched_fit_splits_problems_across_processes(runs, variant):
    two = runs["info_two"]
    assert two[0]["local_problems"][variant] == list(range(8))
    assert two[1]["local_problems"][variant] == list(range(8, 16))


@pytest.mark.parametrize(("written_by", "restored_by"), [("two", "one"), ("one", "two_restore")])
def test_checkpoint_restores_bitwise_across_process_counts(runs, written_by, restored_by):
    saved, restored = runs[written_by], runs[restored_by]
    saved_keys = [k[len("saved") :] for k in keys(saved, "saved")]
    assert saved_keys == [k[len("restored") :] for k in keys(restored, "restored")]
    assert len(saved_keys) > 20
    for k in saved_keys:
        assert_bitwise_equal(saved["saved" + k], restored["restored" + k], k)
    info = runs["info_" + restored_by]
    assert all(r["restored_shardings_match"] for r in info)


def test_doc_code_is_the_code_the_tests_run():
    # Every Python block of the guide is a verbatim excerpt of the worker (indentation aside).
    def lines(text):
        return "\n".join(line.strip() for line in text.splitlines() if line.strip())

    source = lines(WORKER.read_text())
    blocks = re.findall(r"```py\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        assert lines(block) in source, block


def test_doc_launch_command_is_the_one_the_tests_use():
    commands = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    assert commands
    harness = pathlib.Path(__file__).read_text()
    for flag in set(re.findall(r"--[a-z-]+", "".join(commands))):
        assert f'"{flag}"' in harness, flag
    assert "tests/_multiprocess_worker.py" in commands[0]


@pytest.mark.parametrize(
    ("fake_worker", "message"),
    [
        # Process 1 dies while process 0 would wait for it forever.
        (
            "import sys, time\nif sys.argv[4] == '1': sys.exit('process 1 broke')\ntime.sleep(600)",
            "a process failed",
        ),
        ("import time\ntime.sleep(600)", "timed out after 2 s"),
    ],
)
def test_launch_stops_every_process_and_shows_their_output(
    tmp_path, monkeypatch, fake_worker, message
):
    worker = tmp_path / "worker.py"
    worker.write_text(fake_worker)
    monkeypatch.setattr(sys.modules[__name__], "WORKER", worker)
    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT_S", 2)
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=message) as failure:
        launch(2, tmp_path / "out")
    assert time.monotonic() - start < 30
    assert str(failure.value).count("--- process (exit -9) ---") == (
        1 if "failed" in message else 2
    )
    if "failed" in message:
        assert "process 1 broke" in str(failure.value)
