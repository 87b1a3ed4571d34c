"""A real deployment on one host, as a user runs it: SuperLink (TLS, SuperNode
authentication, no runtime dependency installation), two SuperNodes, their layer workers,
and scripts/run_coordinator.py, whose exit status must tell success from failure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_real_deployment_runs_end_to_end_and_the_coordinator_tells_failure(tmp_path):
    """One deployment, two runs: a failing run first, then a good one on the same nodes."""
    deploy = load_script("deploy_local")
    with deploy.deployment(tmp_path / "work") as env:
        failed = deploy.submit(env, ["overrides='federation.rounds=0'"], 300,
                               capture_output=True, text=True)
        done = deploy.submit(env, [
            "overrides='federation.rounds=2 train.negatives=random model.hidden=[40,40,40] "
            "federation.fraction_evaluate=1'", f"out-dir='{tmp_path / 'out'}'"], 400,
            capture_output=True, text=True)
    # the failed run: exit status 1 and the ServerApp's error, from the run's log
    assert failed.returncode == 1, (failed.stdout + failed.stderr)[-3000:]
    assert "finished:failed" in failed.stdout
    assert "federation.rounds" in failed.stderr
    # the good run
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert '"status": "finished:completed"' in done.stdout
    summary = json.loads((tmp_path / "out/metrics.json").read_text())
    assert [r["replies"] for r in summary["history"]] == [2, 2]
    assert 0 <= summary["history"][-1]["client_eval"]["error_head"] <= 1
    # each site trained through its own workers: they checkpointed what they hold
    for site, workers in ((0, 2), (1, 1)):
        saved = list((tmp_path / "work").glob(f"site{site}-worker*/worker.pt"))
        assert len(saved) == workers, saved
