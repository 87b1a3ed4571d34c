"""UFF cells: each a self-contained layer (own loss, optimiser, exact state), in mixed
stacks, probed without labels at training time, and label-free at federation clients."""

from __future__ import annotations

import pytest
import torch

from fedff import config
from fedff.data.datasets import load_digits
from fedff.federation.task import client_data, client_train, initial_arrays, spec_of
from fedff.errors import ShapeError
from fedff.layers.contract import LayerBatch
from fedff.engine.network import UNLABELLED, FFNetwork, InputSpec
from fedff.train import train_epoch
from fedff.layers.registry import KINDS
from fedff.uff.cells import Cell
from fedff.uff.probe import probe_metrics

CELLS = [k for k, cls in KINDS.items() if issubclass(cls, Cell)]

DIGITS = load_digits()
SPEC = InputSpec(DIGITS.features, DIGITS.image_shape, DIGITS.num_classes)
UFF = ["train.algorithm=unsupervised", "train.negatives=none", "train.classify=probe",
       "optim.lr=0.002", "probe.epochs=30"]


def uff(*overrides: str) -> config.Config:
    return config.load("digits-ff", [*UFF, *overrides])


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cell_state_round_trips_and_training_continues_identically(kind):
    cfg = uff(f"model.cell={kind}", "model.hidden=[16]")
    a, b = FFNetwork(cfg, SPEC), FFNetwork(cfg, SPEC)
    x = DIGITS.train_x[:64]
    a.layers[0].train_step(LayerBatch(x, 64))
    b.layers[0].load_state_dict(a.layers[0].state_dict())
    ra, rb = (net.layers[0].train_step(LayerBatch(x, 64)) for net in (a, b))
    assert torch.equal(ra.out, rb.out)
    for k, v in a.layers[0].weights().items():
        assert torch.equal(v, b.layers[0].weights()[k]), k
    assert ra.out.shape == (64, a.layers[0].config.out_features)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_every_cell_lowers_its_own_loss(kind):
    net = FFNetwork(uff(f"model.cell={kind}", "model.hidden=[32]", "train.epochs=8"), SPEC)
    losses = [train_epoch(net, DIGITS, e, show=False)["layer0/loss"] for e in range(8)]
    if kind == "gan":  # an adversarial loss need not fall: the discriminator must learn
        assert losses[-1] < 1.39  # below chance (2 ln 2) on real vs fake
    else:
        assert losses[-1] < 0.7 * losses[0], losses


def test_mixed_stack_probe_beats_raw_pixels_and_reports_knn():
    cfg = uff("model.cell=conv-ae,conv-ae,dae", "model.hidden=[16, 32, 64]", "train.epochs=6")
    net = FFNetwork(cfg, SPEC)
    assert [lay.config.out_features for lay in net.layers] == [16 * 4 * 4, 32 * 2 * 2, 64]
    for epoch in range(6):
        train_epoch(net, DIGITS, epoch, show=False)
    result = probe_metrics(net, DIGITS, cfg.probe)
    assert result["probe_features"] == 256 + 128 + 64
    assert result["probe_error"] < 0.08 and 0 <= result["knn_error"] < 0.2


@pytest.mark.parametrize("overrides,match", [
    (["model.cell=ae,conv-ae,ae"], "put conv-ae/conv-dae cells first"),
    (["model.cell=ae,ae"], "2 kinds for 3 layers"),
    (["model.cell=vae"], "unknown kinds"),
    (["model.cell=ff", "train.negatives=none"], "need negatives"),
])
def test_bad_cell_configs_name_the_fix(overrides, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load("digits-ff", [*UFF, *overrides])
    with pytest.raises(config.ConfigError, match="learn without labels"):
        config.load("digits-ff", ["model.cell=ae"])


def test_wrong_shaped_input_to_a_cell():
    net = FFNetwork(uff("model.cell=ae", "model.hidden=[16]"), SPEC)
    with pytest.raises(ShapeError, match="shape \\[batch, 64\\]"):
        net.layers[0].train_step(LayerBatch(torch.zeros(4, 10), 4))


def test_federated_uff_clients_hold_and_use_no_labels():
    cfg = uff("model.cell=ae", "model.hidden=[16, 16]", "federation.rounds=2")
    ds = client_data(cfg, 0, 3)
    assert bool((ds.train_y == UNLABELLED).all()) and bool((ds.test_y == UNLABELLED).all())
    arrays, metrics = client_train(cfg, ds, initial_arrays(cfg, spec_of(ds)), 1, [0, 1])
    assert "head_loss" not in metrics and metrics["layer0.loss"] > 0
    assert not arrays["head.weight"].numpy().any()  # the head never trained
