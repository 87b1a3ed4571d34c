"""A real deployment on one host: a SuperLink, two SuperNodes (sites) and their layer workers.

Every piece is its own process, started with the commands deploy/federation/README.md
documents for separate machines, on the documented path: TLS on the SuperLink, SuperNode
authentication (allow-listed keys), runtime dependency installation off. Site 0 runs its
layers in two `fedff worker` processes, site 1 in one. The run is submitted and followed
by scripts/run_coordinator.py, whose exit status this script returns; every process is
stopped afterwards.

    python scripts/deploy_local.py --run-config "overrides='federation.rounds=2'"
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Started processes, stopped in reverse order (SIGTERM, then SIGKILL)."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []

    def start(self, name: str, *cmd: str, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-1500:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for(what: str, ok, procs: Processes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        procs.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see {procs.logs}")
        time.sleep(0.5)


def flwr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


@contextmanager
def deployment(work: Path) -> Iterator[dict[str, str]]:
    """Starts the SuperLink, both sites' workers and SuperNodes; yields the environment
    in which `flwr` reaches the SuperLink as the connection "deployment"; stops all."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    certs, home = work / "certs", work / "flwr-home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home)}
    subprocess.run([sys.executable, str(ROOT / "scripts/make_dev_certs.py"), "--out",
                    str(certs), "--supernode-keys", "2"], check=True, env=env)
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
        f'address = "127.0.0.1:{link}"\nroot-certificates = "{certs / "ca.pem"}"\n')
    procs = Processes(work / "logs")
    try:
        procs.start("superlink", str(BIN / "flower-superlink"),
                    "--ssl-ca-certfile", str(certs / "ca.pem"),
                    "--ssl-certfile", str(certs / "server.pem"),
                    "--ssl-keyfile", str(certs / "server.key"),
                    "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                    "--host", "127.0.0.1", "--port", str(link),
                    "--database", str(work / "superlink.db"), env=env)
        wait_for("SuperLink", lambda: flwr(env, "ls", "deployment").returncode == 0, procs)
        sites = [[free_port(), free_port()], [free_port()]]  # site 0: 2 workers, site 1: 1
        for i, ports in enumerate(sites):
            registered = flwr(env, "supernode", "register", str(certs / f"supernode{i}.pub"),
                              "deployment")
            if registered.returncode != 0:
                raise RuntimeError(f"registering SuperNode {i} failed: {registered.stdout}")
            for port in ports:
                procs.start(f"site{i}-worker{port}", str(BIN / "fedff"), "worker",
                            "--listen", f"127.0.0.1:{port}", "--threads", "1",
                            "--checkpoint-dir", str(work / f"site{i}-worker{port}"), env=env)
            workers = ",".join(f"127.0.0.1:{p}" for p in ports)
            procs.start(f"site{i}-supernode", str(BIN / "flower-supernode"),
                        "--superlink", f"127.0.0.1:{link}",
                        "--root-certificates", str(certs / "ca.pem"),
                        "--auth-supernode-private-key", str(certs / f"supernode{i}"),
                        "--port", str(free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions=2 workers='{workers}'", env=env)
        yield env
        procs.check()
    finally:
        procs.stop()


def submit(env: dict[str, str], run_config: list[str], timeout: float,
           **kwargs: Any) -> subprocess.CompletedProcess:
    """One run through scripts/run_coordinator.py; its exit status says how it ended."""
    coordinator = [sys.executable, str(ROOT / "scripts/run_coordinator.py"),
                   "--app", str(ROOT), "--connection", "deployment", "--poll", "1",
                   "--timeout", str(timeout)]
    for item in run_config:
        coordinator += ["--run-config", item]
    return subprocess.run(coordinator, env=env, cwd=ROOT, **kwargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-config", action="append", default=[],
                    help="passed to run_coordinator.py (repeatable)")
    ap.add_argument("--work-dir", type=Path, help="certificates, state and logs "
                    "(default: a temporary folder, removed afterwards)")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedff-deploy-"))
    try:
        with deployment(work) as env:
            return submit(env, args.run_config, args.timeout).returncode
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
