"""The layer contract and the registry: a kind registered by a test module (toy_kind.py)
trains in one process, in a 2-worker chain and in a 2-client simulated federation,
without a line of fedff knowing it; and the registry is what config validation and
`fedff configs --keys` read.
"""

from __future__ import annotations

import os

import pytest
import torch

import toy_kind
from fedff import config
from fedff.data.datasets import load_digits
from fedff.engine.network import FFNetwork, InputSpec
from fedff.errors import ConfigError
from fedff.federation.task import (initial_arrays, load_network_arrays, spec_of,
                                   state_arrays)
from fedff.layers import registry
from fedff.pipeline.driver import Pipeline
from fedff.pipeline.launcher import LocalChain
from fedff.train import train_epoch

DIGITS = load_digits()
SPEC = InputSpec(DIGITS.features, DIGITS.image_shape, DIGITS.num_classes)
BATCHES = -(-DIGITS.train_x.shape[0] // 50)  # per epoch, at batch size 50
TOY = ["model.cell=toy", "model.hidden=[40, 32, 24]", "train.algorithm=unsupervised",
       "train.negatives=none", "train.classify=head", "optim.lr=0.01", "train.epochs=3",
       "train.batch_size=50", "probe.enabled=false"]


@pytest.fixture
def plugin_env(monkeypatch):
    """What a user sets so other processes (workers, Ray's clients) load the kind."""
    monkeypatch.setenv("FEDFF_PLUGINS", "toy_kind")
    here = os.path.dirname(os.path.abspath(toy_kind.__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p))


def toy(*overrides: str) -> config.Config:
    return config.load("digits-ff", [*TOY, *overrides])


def trained_in_process(cfg: config.Config) -> tuple[FFNetwork, list[float]]:
    net = FFNetwork(cfg, SPEC)
    losses = [train_epoch(net, DIGITS, e, show=False)["layer0/loss"]
              for e in range(cfg.train.epochs)]
    return net, losses


def test_the_registry_drives_validation_and_the_listed_choices():
    assert registry.layer_class("toy") is toy_kind.ToyLayer
    assert "toy" in config.choices("model.cell")
    with pytest.raises(ConfigError, match="unknown kinds \\['nope'.*; choose from .*toy"):
        toy("model.cell=nope")
    # the kind's own rules: it learns without labels, so a supervised run refuses it
    with pytest.raises(ConfigError, match="learn without labels"):
        config.load("digits-ff", ["model.cell=toy"])


def test_a_registered_kind_trains_in_process_and_round_trips_its_state():
    net, losses = trained_in_process(toy())
    assert losses[-1] < 0.8 * losses[0], losses
    layer = net.layers[0]
    assert isinstance(layer, toy_kind.ToyLayer) and layer.steps == 3 * BATCHES
    state = layer.state_dict()
    assert state["kind"] == "toy" and set(state["buffers"]) == {"running_mean"}
    copy = toy_kind.ToyLayer.from_state(state)
    x = DIGITS.test_x[:20]
    assert torch.equal(copy.forward(x), layer.forward(x))
    assert torch.equal(copy.running_mean, layer.running_mean)


def test_a_registered_kind_declares_what_a_federation_averages():
    cfg = toy()
    net, _ = trained_in_process(cfg)
    arrays = state_arrays(net.state_dict())
    assert {"layer0.weight", "layer0.bias", "layer0.running_mean", "head.weight"} <= set(arrays)
    fresh = FFNetwork(cfg, SPEC)
    load_network_arrays(fresh, arrays)
    assert torch.equal(fresh.layers[2].running_mean, net.layers[2].running_mean)
    assert torch.equal(fresh.layers[1].module.weight, net.layers[1].module.weight)


def test_a_registered_kind_trains_in_a_two_worker_chain(tmp_path, plugin_env):
    cfg = toy()
    with LocalChain(2, tmp_path, window=2) as chain:
        pipe = Pipeline(cfg, SPEC, chain.addresses, window=2)
        try:
            for epoch in range(cfg.train.epochs):
                train_epoch(pipe, DIGITS, epoch, show=False)
            piped = pipe.state_dict()
        finally:
            pipe.close()
    local, _ = trained_in_process(cfg)
    for a, b in zip(piped["layers"], local.state_dict()["layers"]):
        assert a["kind"] == "toy" and a["steps"] == b["steps"] == 3 * BATCHES
        for k in a["module"]:
            assert torch.equal(a["module"][k], b["module"][k]), k
        assert torch.equal(a["buffers"]["running_mean"], b["buffers"]["running_mean"])


@pytest.mark.slow
def test_a_registered_kind_trains_in_a_two_client_simulation(tmp_path, plugin_env):
    from fedff.federation.simulation import simulate

    # the clients hold no labels: the coordinator scores the features with its probe
    cfg = toy("train.classify=probe", "probe.enabled=true",
              "federation.clients=2", "federation.rounds=2", "federation.min_clients=2",
              "federation.fraction_evaluate=0", "federation.round_timeout=60",
              "federation.connect_timeout=60")
    summary = simulate(cfg, tmp_path, show_progress=False)
    assert [r["replies"] for r in summary["history"]] == [2, 2]
    assert summary["test_error"] < 0.5
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["network"]
    assert [layer["kind"] for layer in saved["layers"]] == ["toy"] * 3
    before = initial_arrays(cfg, spec_of(DIGITS))
    after = state_arrays(saved)
    for key in ("layer0.weight", "layer2.running_mean"):
        assert not torch.equal(torch.from_numpy(after[key].numpy()),
                               torch.from_numpy(before[key].numpy())), key
