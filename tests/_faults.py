"""Worker processes for the fault-tolerance tests: start, watch, kill, compare.

The workers (``_fault_worker.py``) import this checkout's adam_jax and share a
compilation cache; every wait is bounded by ``TIMEOUT``. They are forked by one
server process (:class:`Workers`) that has imported JAX, adam_jax and orbax and run
nothing: each worker is a process of its own, killed and restarted as one started
from the command line would be, without the seconds of imports each time.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import adam_jax

WORKER = Path(__file__).with_name("_fault_worker.py")
TIMEOUT = 120  # seconds for one worker process; a hung one is killed and fails the test


def worker_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The workers import this checkout's adam_jax and share a compilation cache."""
    root = Path(adam_jax.__file__).resolve().parent.parent
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(root), out.get("PYTHONPATH", "")])
    out["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    out["JAX_PLATFORMS"] = "cpu"
    return out


class Workers:
    """The fork server (``_fault_worker.py serve``): it starts workers on request and
    reports how each one ended."""

    def __init__(self, env: dict[str, str], log: Path):
        self._conn, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._log = log
        with log.open("w") as out:  # the server's own output: a traceback if it fails
            self._server = subprocess.Popen(
                [sys.executable, "-u", str(WORKER), "serve", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        theirs.close()
        self._ended: dict[int, int] = {}
        self._started: list[int] = []

    def _read(self, timeout: float | None) -> None:
        """Read one message of the server into what is known (wait at most ``timeout``)."""
        self._conn.settimeout(timeout)
        try:
            msg = self._conn.recv(256).decode()
        except (TimeoutError, BlockingIOError):
            return
        if not msg:
            code = self._server.wait()
            pytest.fail(f"the worker server ended (exit code {code}):\n{self._log.read_text()}")
        kind, pid, *code = msg.split()
        if kind == "pid":
            self._started.append(int(pid))
        else:
            self._ended[int(pid)] = int(code[0])

    def start(self, argv: list[str]) -> Worker:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        socket.send_fds(self._conn, [json.dumps(argv).encode()], [out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        deadline = time.monotonic() + TIMEOUT
        while not self._started and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        if not self._started:
            pytest.fail(f"the worker server started no worker within {TIMEOUT} s")
        return Worker(self, self._started.pop(), out_r, err_r)

    def returncode(self, pid: int, timeout: float | None) -> int | None:
        """The worker's exit code (as ``subprocess`` gives it), or None if it still runs
        after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._ended:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._read(left)
        return self._ended[pid]

    def close(self) -> None:
        self._conn.close()
        self._server.wait(timeout=TIMEOUT)


class _Pipe:
    """A worker's stdout or stderr, read without a buffer (``communicate`` reads the
    rest from the file descriptor); closed by ``communicate`` or when dropped."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def fileno(self) -> int:
        assert self.fd is not None
        return self.fd

    def readline(self) -> str:
        line = b""
        while not line.endswith(b"\n") and (byte := os.read(self.fileno(), 1)):
            line += byte
        return line.decode()

    def read(self) -> str:
        chunks = []
        while chunk := os.read(self.fileno(), 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close


class Worker:
    """A worker the server forked: what the tests use of ``subprocess.Popen``."""

    def __init__(self, workers: Workers, pid: int, out: int, err: int):
        self._workers, self.pid = workers, pid
        self.stdout, self.stderr = _Pipe(out), _Pipe(err)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._workers.returncode(self.pid, 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float = TIMEOUT) -> tuple[str, str]:
        """Read stdout and stderr to their ends and wait for the exit code."""
        deadline = time.monotonic() + timeout
        chunks: dict[int, list[bytes]] = {self.stdout.fileno(): [], self.stderr.fileno(): []}
        with selectors.DefaultSelector() as sel:
            for f in chunks:
                sel.register(f, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                ready = sel.select(left) if left > 0 else []
                if not ready:
                    raise subprocess.TimeoutExpired("worker", timeout)
                for key, _ in ready:
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        sel.unregister(key.fd)
        self.returncode = self._workers.returncode(self.pid, max(deadline - time.monotonic(), 1.0))
        if self.returncode is None:
            raise subprocess.TimeoutExpired("worker", timeout)
        texts = [b"".join(c).decode() for c in chunks.values()]
        self.stdout.close()
        self.stderr.close()
        return texts[0], texts[1]


def start(workers: Workers, mode: str, workdir: Path, *extra: str) -> Worker:
    return workers.start([mode, str(workdir), *extra])


def wait_for(proc: Worker, word: str, count: int = 1) -> bool:
    """Read stdout until ``word`` has been printed ``count`` times; False if the process ended."""
    deadline = time.monotonic() + TIMEOUT
    seen = 0
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        seen += line.strip() == word
        if seen >= count:
            return True
    proc.kill()
    pytest.fail(f"worker printed no {word!r} within {TIMEOUT} s")


def finish(proc: Worker) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"worker still running after {TIMEOUT} s")
    return proc.returncode, err


def kill(proc: Worker) -> bool:
    """SIGKILL the worker if it still runs; whether it did."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    return finish(proc)[0] == -signal.SIGKILL


def run_to_end(workers: Workers, mode: str, workdir: Path) -> None:
    rc, err = finish(start(workers, mode, workdir))
    assert rc == 0, err


def assert_bitwise_equal(want_dir: Path, want: str, got_dir: Path, got: str, names) -> None:
    """The arrays each worker saved as ``{want}_{name}.npz`` and ``{got}_{name}.npz``
    have the same dtypes, shapes and bytes."""
    for name in names:
        a_file = np.load(want_dir / f"{want}_{name}.npz")
        b_file = np.load(got_dir / f"{got}_{name}.npz")
        assert a_file.files == b_file.files, name
        for key in a_file.files:
            a, b = a_file[key], b_file[key]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), (name, key)
            assert a.tobytes() == b.tobytes(), (name, key, a, b)


def listing(directory: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
    )
