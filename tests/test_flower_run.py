"""`flwr run .`: the Flower way to run fedff, on Flower's managed local SuperLink.

The run is judged by Flower's own record of it (`flwr list --run-id ID`), not by the
exit code (`flwr run` exits 0 when the run fails). The SuperLink that `flwr run` leaves
running, and everything it started, is stopped afterwards; the test checks that nothing
is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).with_name("flwr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    """Processes whose environment carries `marker` (our FLWR_HOME): what we started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_all(marker: str, grace: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process we started; returns those still alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_with(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return processes_with(marker)


def flwr(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(FLWR), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_flwr_run_completes_on_the_managed_local_superlink(tmp_path):
    home = tmp_path / "flwr-home"
    # As an installed fedff runs it: the venv's commands on PATH (flwr starts
    # `flower-superlink` from there) and no per-run `uv sync` of the dependencies, which
    # would download torch and Ray into a fresh environment for every run (see README).
    env = {**os.environ, "FLWR_HOME": str(home),
           "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    out = tmp_path / "run"
    overrides = "federation.rounds=2 federation.clients=2 federation.min_clients=2"
    try:
        submitted = flwr(["run", ".", "--format", "json", "--federation-config",
                          "num-supernodes=2", "--run-config",
                          f"overrides='{overrides}' out-dir='{out}'"], env)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = json.loads(submitted.stdout)["run-id"]
        status, deadline = "", time.monotonic() + 240
        while not status.startswith("finished") and time.monotonic() < deadline:
            listed = flwr(["list", "--run-id", str(run_id), "--format", "json"], env)
            runs = json.loads(listed.stdout).get("runs", [])
            status = runs[0]["status"] if runs else ""
            time.sleep(2)
        log = (home / "local-superlink" / "superlink.log")
        assert status == "finished:completed", (status, log.read_text()[-3000:]
                                                if log.exists() else "")
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["rounds"] == 2 and 0.0 <= metrics["test_error"] < 0.5
    finally:
        left = stop_all(str(home))
    assert not left, f"processes left behind: {left}"
