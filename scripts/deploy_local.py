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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Started processes, stopped in reverse order (SIGTERM, then SIGKILL).

    Every process is a unit, as a systemd service, a container or a pod is: everything it
    started goes when it does (what systemd's control-group kill, a container's end or a
    pod's restart do in a real deployment). The unit's processes are found by a marker in
    their environment, which children inherit, because Flower starts its apps in new
    sessions: a process group would miss them. Flower's SuperNode and SuperLink leave
    their `flower-superexec` and apps running when they die, and those watch their
    parent's pid, which an unreaped (zombie) parent keeps alive; without this they pile
    up.
    A process started with `restart=S` is supervised as the deployment templates
    supervise it: when it exits, for whatever reason, it is started again S seconds later
    (systemd `Restart=always`, compose `restart: unless-stopped`, Kubernetes' restart).
    """

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []
        self.specs: dict[str, tuple[tuple[str, ...], dict[str, str], float | None]] = {}
        self.events: list[dict[str, Any]] = []  # exits and restarts, for reports
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._supervise, daemon=True)
        self._watcher.start()

    def start(self, name: str, *cmd: str, env: dict[str, str],
              restart: float | None = None) -> subprocess.Popen:
        with self._lock:
            self.specs[name] = (cmd, env, restart)
            return self._spawn(name)

    def unit(self, name: str) -> str:
        return f"{self.logs}/{name}"

    def _spawn(self, name: str) -> subprocess.Popen:
        cmd, env, _ = self.specs[name]
        with open(self.logs / f"{name}.log", "a") as log:  # the child keeps its own copy
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**env, UNIT: self.unit(name)}, start_new_session=True)
        self.procs = [(n, p) for n, p in self.procs if n != name] + [(name, proc)]
        return proc

    def proc(self, name: str) -> subprocess.Popen:
        return dict(self.procs)[name]

    def crash(self, name: str) -> None:
        """SIGKILL to the process alone, as a crash: its children are left behind."""
        self.proc(name).kill()
        self.note(name, "killed")

    def note(self, name: str, what: str, **extra: Any) -> None:
        self.events.append({"t": round(time.monotonic() - self.started, 1), "process": name,
                            "event": what, **extra})

    def _supervise(self) -> None:
        due: dict[str, float] = {}
        while not self._stopping.wait(0.2):
            with self._lock:
                for name, proc in list(self.procs):
                    restart = self.specs[name][2]
                    if restart is None or proc.poll() is None or self._stopping.is_set():
                        continue
                    if name not in due:  # just exited: clear its unit, then wait
                        kill_all(members(UNIT, self.unit(name)))
                        self.note(name, "exited", code=proc.returncode)
                        due[name] = time.monotonic() + restart
                    elif time.monotonic() >= due[name]:
                        del due[name]
                        self._spawn(name)
                        self.note(name, "restarted")

    def check(self) -> None:
        for name, proc in self.procs:
            if self.specs[name][2] is None and proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-1500:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        self._stopping.set()
        self._watcher.join()
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name, _ in self.procs:  # whatever each unit left behind
            kill_all(members(UNIT, self.unit(name)))


UNIT = "FEDFF_UNIT"  # the environment variable that marks a unit's processes
DEPLOYMENT = "FEDFF_DEPLOYMENT"  # and every process of a deployment


def members(variable: str, value: str) -> dict[int, str]:
    """{pid: command} of every live process whose environment sets `variable` to `value`
    (children inherit it); zombies, which only wait for their parent, are left out."""
    needle, found = f"\0{variable}={value}\0".encode(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in b"\0" + (entry / "environ").read_bytes():
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            found[int(entry.name)] = cmd
        except OSError:
            continue
    return found


def kill_all(pids: dict[int, str]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def leftovers(work: Path) -> list[str]:
    """'pid command' of every live process a deployment in `work` started (children
    included) and did not stop."""
    return [f"{pid} {cmd}" for pid, cmd in members(DEPLOYMENT, str(work)).items()]


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


@dataclass
class Deployment:
    env: dict[str, str]  # in which `flwr` reaches the SuperLink as connection "deployment"
    procs: Processes  # by name: superlink, site<i>-supernode, site<i>-worker<port>
    work: Path


@contextmanager
def deployment(work: Path, restart: float | None = None) -> Iterator[Deployment]:
    """Starts the SuperLink, both sites' workers and SuperNodes, each supervised with a
    `restart` back-off when one is given; yields the deployment; stops all."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    certs, home = work / "certs", work / "flwr-home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home), DEPLOYMENT: str(work)}  # leftovers() finds it
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
                    "--database", str(work / "superlink.db"), env=env, restart=restart)
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
                            "--checkpoint-dir", str(work / f"site{i}-worker{port}"), env=env,
                            restart=restart)
            workers = ",".join(f"127.0.0.1:{p}" for p in ports)
            procs.start(f"site{i}-supernode", str(BIN / "flower-supernode"),
                        "--superlink", f"127.0.0.1:{link}",
                        "--root-certificates", str(certs / "ca.pem"),
                        "--auth-supernode-private-key", str(certs / f"supernode{i}"),
                        "--port", str(free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions=2 workers='{workers}'", env=env,
                        restart=restart)
        yield Deployment(env, procs, work)
        procs.check()
    finally:
        procs.stop()


def coordinator_command(run_config: list[str], timeout: float, *extra: str) -> list[str]:
    command = [sys.executable, str(ROOT / "scripts/run_coordinator.py"), "--app", str(ROOT),
               "--connection", "deployment", "--poll", "1", "--timeout", str(timeout), *extra]
    for item in run_config:
        command += ["--run-config", item]
    return command


def submit(env: dict[str, str], run_config: list[str], timeout: float,
           **kwargs: Any) -> subprocess.CompletedProcess:
    """One run through scripts/run_coordinator.py; its exit status says how it ended."""
    return subprocess.run(coordinator_command(run_config, timeout), env=env, cwd=ROOT,
                          **kwargs)


def submit_async(env: dict[str, str], run_config: list[str], timeout: float, *extra: str,
                 **kwargs: Any) -> subprocess.Popen:
    """The same, without waiting: a drill acts on the deployment while the run goes on."""
    return subprocess.Popen(coordinator_command(run_config, timeout, *extra), env=env,
                            cwd=ROOT, **kwargs)


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
        with deployment(work) as site:
            return submit(site.env, args.run_config, args.timeout).returncode
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
