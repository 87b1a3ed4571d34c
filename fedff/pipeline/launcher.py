"""Starts a K-worker chain on this host as separate processes, and takes it down cleanly.

Each worker is `python -m fedff worker` with its own checkpoint folder. The launcher
supervises them: a worker that dies is restarted on the same port (it resumes from its
checkpoint and the chain re-sends what it lost), up to `max_restarts` times; past that,
or on Ctrl-C, or when the driver finishes, every worker is stopped (SIGTERM, then SIGKILL
after a grace period) and its port is free again. Workers run in sessions of their own, so
Ctrl-C reaches the launcher alone and the shutdown has one owner; they die with the
launcher even if it is killed outright (Linux parent-death signal), so no orphan keeps a
port.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("fedff.launcher")
PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int) -> None:
    """Called by a worker at start: SIGTERM when the launcher dies (Linux), so no orphan
    keeps a port. Set in the worker, not in a preexec_fn: forking a process that runs
    gRPC threads and running Python before exec can crash the child."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class WorkerProcess:
    name: str
    args: list[str]
    ready_file: Path
    log_file: Path
    process: subprocess.Popen | None = None
    address: str = ""
    restarts: int = 0
    history: list[int] = field(default_factory=list)  # exit codes of earlier lives


class LocalChain:
    """`with LocalChain(3, root) as chain: Pipeline(cfg, spec, chain.addresses)`."""

    def __init__(self, workers: int, root: Path, threads: int | list[int] = 1,
                 extra_args: list[str] = (),
                 max_restarts: int = 2, start_timeout: float = 60.0,
                 checkpoint_every: int = 100, window: int = 4,
                 on_failure: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.on_failure = on_failure
        self.max_restarts, self.start_timeout = max_restarts, start_timeout
        self.failed: str | None = None
        self._stopping = threading.Event()
        per_worker = threads if isinstance(threads, list) else [threads] * workers
        if len(per_worker) != workers:
            raise ValueError(f"{len(per_worker)} thread counts for {workers} workers")
        self.workers = []
        for i in range(workers):
            name = f"worker{i}"
            folder = self.root / name
            args = [sys.executable, "-m", "fedff", "worker", "--name", name,
                    "--exit-with-parent", str(os.getpid()),
                    "--checkpoint-dir", str(folder), "--threads", str(per_worker[i]),
                    "--checkpoint-every", str(checkpoint_every), "--window", str(window),
                    *extra_args]
            self.workers.append(WorkerProcess(name, args, folder / "address",
                                              folder / "worker.log"))

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    def __enter__(self) -> "LocalChain":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for w in self.workers:
            w.ready_file.parent.mkdir(parents=True, exist_ok=True)
            w.ready_file.unlink(missing_ok=True)
            # A new chain starts from nothing: a resumed run pushes its own state in.
            (w.ready_file.parent / "worker.pt").unlink(missing_ok=True)
            w.log_file.unlink(missing_ok=True)
            self._spawn(w, "127.0.0.1:0")
        for w in self.workers:
            self._await_ready(w)
        self._monitor = threading.Thread(target=self._supervise, daemon=True)
        self._monitor.start()

    def _spawn(self, w: WorkerProcess, listen: str) -> None:
        out = open(w.log_file, "ab")
        # A session of its own: Ctrl-C in a terminal reaches only the driver, which stops
        # the workers itself; otherwise the supervisor would race to restart them.
        w.process = subprocess.Popen([*w.args, "--listen", listen, "--ready-file",
                                      str(w.ready_file)], stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()

    def _await_ready(self, w: WorkerProcess) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not w.ready_file.exists():
            assert w.process is not None
            if w.process.poll() is not None:
                raise RuntimeError(f"{w.name} exited with status {w.process.returncode} while "
                                   f"starting; see {w.log_file}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{w.name} did not start within {self.start_timeout:.0f} s;"
                                   f" see {w.log_file}")
            time.sleep(0.05)
        w.address = w.ready_file.read_text().strip()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            for w in self.workers:
                assert w.process is not None
                code = w.process.poll()
                if code is None or self._stopping.is_set():
                    continue
                w.history.append(code)
                if w.restarts >= self.max_restarts:
                    self.failed = (f"{w.name} died (exit status {code}) after "
                                   f"{w.restarts} restarts; see {w.log_file}")
                    log.error("%s; stopping the chain", self.failed)
                    if self.on_failure is not None:
                        self.on_failure(self.failed)
                    threading.Thread(target=self.stop, daemon=True).start()
                    return
                w.restarts += 1
                log.warning("%s exited with status %s; restarting it on %s (restart %d/%d)",
                            w.name, code, w.address, w.restarts, self.max_restarts)
                w.ready_file.unlink(missing_ok=True)
                self._spawn(w, w.address)
                try:
                    self._await_ready(w)
                except RuntimeError as e:
                    log.error("%s", e)

    def kill(self, index: int) -> None:
        """SIGKILLs one worker (for tests and fault drills); the supervisor restarts it."""
        w = self.workers[index]
        assert w.process is not None
        w.process.kill()

    def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        # Workers that a supervisor restart left half-started are in self.workers too.
        for w in self.workers:
            if w.process is not None and w.process.poll() is None:
                w.process.terminate()
        deadline = time.monotonic() + grace
        for w in self.workers:
            if w.process is None:
                continue
            try:
                w.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
