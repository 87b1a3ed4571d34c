"""A real deployment on one host, as a user runs it: SuperLink (TLS, SuperNode
authentication, no runtime dependency installation), two SuperNodes, their layer workers,
and scripts/run_coordinator.py, whose exit status must tell success from failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def deploy(tmp_path: Path, overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/deploy_local.py"), "--work-dir",
         str(tmp_path / "work"), "--timeout", "400", "--run-config",
         f"overrides='{overrides}' out-dir='{tmp_path / 'out'}'"],
        capture_output=True, text=True, timeout=600)


def test_superlink_two_supernodes_and_their_workers_run_end_to_end(tmp_path):
    done = deploy(tmp_path, "federation.rounds=2 train.negatives=random "
                            "model.hidden=[40,40,40] federation.fraction_evaluate=1")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert '"status": "finished:completed"' in done.stdout
    summary = json.loads((tmp_path / "out/metrics.json").read_text())
    assert [r["replies"] for r in summary["history"]] == [2, 2]
    assert 0 <= summary["history"][-1]["client_eval"]["error_head"] <= 1
    # each site trained through its own workers: they checkpointed what they hold
    for site, workers in ((0, 2), (1, 1)):
        saved = list((tmp_path / "work").glob(f"site{site}-worker*/worker.pt"))
        assert len(saved) == workers, saved


def test_coordinator_exits_nonzero_and_shows_the_error_when_the_run_fails(tmp_path):
    done = deploy(tmp_path, "federation.rounds=0")
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    assert "finished:failed" in done.stdout
    assert "federation.rounds" in done.stderr  # the ServerApp's error, from the run's log
