"""Federations simulated end to end on Flower's engine (Ray): what the coordinator
aggregates, a client that drops out, a client that fails, a restarted coordinator.

Each test starts Ray (about 10-20 s), so they are marked slow: they run with --run-slow
and in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedff import config
from fedff.federation.partitions import partition_indices
from fedff.federation.server_app import make_server_app
from fedff.federation.simulation import backend_config
from fedff.federation.task import initial_arrays, spec_of, state_arrays
from fedff.data.datasets import load_digits

import fed_apps

pytestmark = pytest.mark.slow
SMALL = ["model.hidden=[40, 40, 40]", "train.batch_size=50", "federation.min_clients=2",
         "federation.round_timeout=120", "federation.connect_timeout=120",
         "federation.fraction_evaluate=0"]


@pytest.fixture(autouse=True)
def ray_can_import_test_apps(monkeypatch):
    """Ray's workers inherit the environment: let them import fed_apps."""
    paths = [fed_apps.tests_dir(), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))


def simulate_with(cfg, client_app, out, resume=False):
    from flwr.simulation import run_simulation

    results: list = []
    run_simulation(server_app=make_server_app(cfg, str(out), resume, False, results),
                   client_app=client_app, num_supernodes=cfg.federation.clients,
                   backend_config=backend_config(cfg))
    return results[0]


def saved_arrays(out):
    state = torch.load(out / "checkpoint.pt", weights_only=False)["network"]
    return {k: v.numpy() for k, v in state_arrays(state).items()}


def test_each_layer_is_the_example_weighted_mean_and_untrained_layers_stay(tmp_path):
    # Dirichlet partitions give the three clients different example counts; the
    # progressive schedule trains only layer 0 in round 1.
    cfg = config.load("digits-ff", [*SMALL, "federation.clients=3", "federation.rounds=1",
                                    "federation.partitioner=dirichlet", "federation.alpha=0.5",
                                    "federation.schedule=progressive"])
    sent = tmp_path / "sent"
    sent.mkdir()
    simulate_with(cfg, fed_apps.recording_app(cfg, str(sent)), tmp_path / "run")
    replies = [json.loads(p.read_text()) for p in sorted(sent.glob("client*.json"))]
    assert len(replies) == 3
    counts = [r["n"] for r in replies]
    assert len(set(counts)) > 1, "the partitions should differ in size"
    assert set(replies[0]["arrays"]) == {"layer0.weight", "layer0.bias", "layer0.peer_mean",
                                         "head.weight"}
    after = saved_arrays(tmp_path / "run")
    for key in replies[0]["arrays"]:
        want = sum(r["n"] * np.asarray(r["arrays"][key], np.float64) for r in replies)
        np.testing.assert_allclose(after[key], want / sum(counts), rtol=1e-5, atol=1e-6)
    digits = load_digits()
    before = {k: v.numpy() for k, v in initial_arrays(cfg, spec_of(digits)).items()}
    for key in ("layer1.weight", "layer1.bias", "layer2.weight", "layer2.peer_mean"):
        assert np.array_equal(after[key], before[key]), key


def test_a_client_that_drops_out_costs_at_most_the_round_timeout(tmp_path):
    # Client 0 hangs for 50 s; the round gives up on it after 40 s (room for the other
    # two on a loaded machine) and aggregates them. (Ray only lets the simulation end
    # once the hung client returns.)
    cfg = config.load("digits-ff", [*SMALL, "federation.clients=3", "federation.rounds=1",
                                    "federation.round_timeout=40"])
    summary = simulate_with(cfg, fed_apps.faulty_app(cfg, "hang", partition=0, seconds=50),
                            tmp_path)
    (r,) = summary["history"]
    assert r["replies"] == 2 and r["aggregated"]
    assert "1 client(s) did not reply within the round timeout" in r["failures"]
    assert 40 <= r["round_seconds"] < 40 + 8


def test_a_failing_client_is_reported_and_the_others_aggregate(tmp_path):
    cfg = config.load("digits-ff", [*SMALL, "federation.clients=3", "federation.rounds=1"])
    summary = simulate_with(cfg, fed_apps.faulty_app(cfg, "raise", partition=1), tmp_path)
    (r,) = summary["history"]
    assert r["replies"] == 2 and r["aggregated"]
    assert "injected failure on partition 1" in " ".join(r["failures"])


def test_run_fails_when_no_client_trains(tmp_path):
    cfg = config.load("digits-ff", [*SMALL, "federation.clients=2", "federation.rounds=2"])
    with pytest.raises(Exception) as err:
        simulate_with(cfg, fed_apps.faulty_app(cfg, "raise", partition=-1), tmp_path)
    assert "no client trained" in str(err.value) and "injected failure" in str(err.value)


def test_restarted_coordinator_resumes_after_its_last_round(tmp_path):
    base = [*SMALL, "federation.clients=2"]
    cfg2 = config.load("digits-ff", [*base, "federation.rounds=2"])
    simulate_with(cfg2, fed_apps.recording_app(cfg2, str(tmp_path)), tmp_path / "run")
    first = saved_arrays(tmp_path / "run")
    cfg3 = config.load("digits-ff", [*base, "federation.rounds=3"])
    summary = simulate_with(cfg3, fed_apps.recording_app(cfg3, str(tmp_path)),
                            tmp_path / "run", resume=True)
    assert [r["round"] for r in summary["history"]] == [1, 2, 3]
    assert summary["rounds"] == 3 and summary["resumed_after_rounds"] == [2]
    # round 3 started from round 2's global model: what the clients sent in round 3 was
    # trained from it, so it differs from it, and the result is their mean
    replies = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("client*.json"))]
    after = saved_arrays(tmp_path / "run")
    key = "layer1.weight"
    counts = [r["n"] for r in replies]
    want = sum(r["n"] * np.asarray(r["arrays"][key]) for r in replies) / sum(counts)
    np.testing.assert_allclose(after[key], want, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(after[key], first[key])


def test_partitions_cover_the_data_once_and_follow_the_partitioner():
    labels = load_digits().train_y
    fed = config.load("digits-ff", ["federation.partitioner=iid"]).federation
    parts = [partition_indices(labels, fed, i, 5) for i in range(5)]
    allrows = torch.cat(parts)
    assert allrows.numel() == labels.numel() and allrows.unique().numel() == labels.numel()
    fed = config.load("digits-ff", ["federation.partitioner=classes",
                                    "federation.classes_per_client=2"]).federation
    for i in range(5):
        assert labels[partition_indices(labels, fed, i, 5)].unique().numel() <= 2
    with pytest.raises(config.ConfigError, match="partition-id 5"):
        partition_indices(labels, fed, 5, 5)


def test_cli_simulate_exit_status_and_outputs(tmp_path):
    out = tmp_path / "run"
    ok = subprocess.run([sys.executable, "-m", "fedff", "simulate", "--quiet", "--out", str(out),
                         *sum((["--set", s] for s in [*SMALL, "federation.clients=2",
                                                      "federation.rounds=2"]), [])],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["rounds"] == 2 and len(summary["history"]) == 2
    assert (out / "accuracy_vs_round.png").stat().st_size > 0
    assert (out / "metrics.csv").read_text().count("\n") == 3
    bad = subprocess.run([sys.executable, "-m", "fedff", "simulate", "--set",
                          "federation.min_clients=5", "--set", "federation.clients=2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "federation.min_clients" in bad.stderr
