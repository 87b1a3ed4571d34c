"""Restart behaviour without a deployment: the coordinator script across a SuperLink
outage (a stand-in `flwr` on PATH), and the restart rules of the deployment templates."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for the `flwr` CLI: run 1 is running, then the SuperLink is unreachable
# (flwr prints success: false and exits 0, as the real one does), then run 1 is
# finished:failed; run 2 completes. Every call is appended to calls.jsonl.
FAKE_FLWR = """#!{python}
import json, sys, pathlib
here = pathlib.Path(__file__).parent
calls = here / "calls.jsonl"
with calls.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
n = sum(1 for _ in calls.open())
if sys.argv[1] == "run":
    run = 2 if "resume=true" in " ".join(sys.argv) else 1
    print(json.dumps({{"success": True, "run-id": run}}))
elif sys.argv[1] == "ls":
    run = int(sys.argv[sys.argv.index("--run-id") + 1])
    if run == 2:
        state = "finished:completed"
    elif n <= 3:
        state = "running"
    elif n <= 5:
        print(json.dumps({{"success": False, "error-message":
                          "Connection to the SuperLink is unavailable."}}))
        sys.exit(0)
    else:
        state = "finished:failed"
    print(json.dumps({{"success": True, "runs": [{{"run-id": run, "status": state,
                                                  "elapsed": "1.0"}}]}}))
else:
    print("log line")
"""


def coordinator(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "flwr"
    fake.write_text(FAKE_FLWR.format(python=sys.executable))
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/run_coordinator.py"), "--connection", "x",
         "--poll", "0.01", "--quiet", "--run-config", "out-dir='/tmp/r'", *extra],
        env=env, capture_output=True, text=True, timeout=60)


def test_coordinator_waits_out_a_superlink_outage_and_resumes_the_lost_run(tmp_path):
    done = coordinator(tmp_path, "--resume-lost", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == "finished:completed" and report["run-id"] == 2
    first, second = report["runs"]
    assert first["status"] == "finished:failed" and len(first["superlink_outages"]) == 1
    assert "submitting it again with resume=true" in done.stderr
    calls = [json.loads(line)
             for line in (tmp_path / "bin/calls.jsonl").read_text().splitlines()]
    runs = [c for c in calls if c[0] == "run"]
    assert len(runs) == 2 and "resume=true" in runs[1] and "out-dir='/tmp/r'" in runs[1]


def test_without_resume_lost_a_lost_run_is_reported_as_failed(tmp_path):
    done = coordinator(tmp_path)
    assert done.returncode == 1
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "finished:failed"


def test_compose_and_kubernetes_restart_every_process_and_reap_its_children():
    compose = yaml.safe_load((ROOT / "deploy/federation/compose.yaml").read_text())
    for name, service in compose["services"].items():
        assert service.get("restart") in ("always", "unless-stopped"), name
    dockerfile = (ROOT / "deploy/federation/Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["tini", "-g", "--"\]', dockerfile, re.M)
    for path in (ROOT / "deploy/federation/k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]["spec"]
                assert pod.get("restartPolicy", "Always") == "Always", path


UNITS = [ROOT / "deploy/federation/systemd/fedff-supernode.service",
         ROOT / "deploy/federation/systemd/fedff-superlink.service",
         ROOT / "deploy/workers/fedff-worker@.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_restart_forever_and_verify(unit, tmp_path):
    text = unit.read_text()
    for line in ("Restart=always", "StartLimitIntervalSec=0", "KillMode=control-group"):
        assert line in text.splitlines(), f"{unit.name} lacks {line}"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # the unit as installed on this machine: its programs from this environment
    local = tmp_path / unit.name.replace("@.", "@7001.")
    local.write_text(text.replace("/opt/fedff/.venv/bin", str(Path(sys.executable).parent)))
    checked = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


@pytest.mark.parametrize("replies, back", [
    ([2, 1, 1, 2, 2], 4),   # the crash hit round 2, the heartbeat lapsed in round 3
    ([2, 2, 1, 2], 4),      # site 1 replied to round 2 before the kill landed
    ([2, 1, 2], 3),
    ([2, 1, 1], None),      # never back
    ([2, 2, 2], None),      # never hit
])
def test_the_drill_finds_the_round_a_crashed_site_is_back_in(replies, back):
    sys.path.insert(0, str(ROOT / "scripts"))
    from drill_restart import back_in_round
    history = [{"round": i + 1, "sampled": 2, "replies": n} for i, n in enumerate(replies)]
    assert back_in_round(history, after_round=1) == back
