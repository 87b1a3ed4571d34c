"""One-class FF: the losses against their formulas, the centre and radius, the metrics,
`fedff score`, the chain and the federation (embedded digits, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedff import config
from fedff.cli import main
from fedff.data.datasets import load_digits
from fedff.engine.network import FFNetwork, InputSpec
from fedff.errors import ConfigError
from fedff.federation.task import client_data, client_train, initial_arrays, spec_of
from fedff.layers.contract import LayerBatch
from fedff.oneclass import objectives
from fedff.oneclass.data import one_vs_rest
from fedff.oneclass.metrics import detection_metrics
from fedff.train import load_data, train_epoch

DIGITS = load_digits()
ONECLASS = ["train.algorithm=oneclass", "model.cell=oneclass", "train.negatives=none",
            "model.objective=hb-svdd", "optim.momentum=0", "optim.weight_decay=0",
            "optim.schedule=constant", "optim.lr=0.01", "train.batch_size=32",
            "model.hidden=[32, 24]", "oneclass.normal=3"]


def oneclass(*overrides: str) -> config.Config:
    return config.load("digits-ff", [*ONECLASS, *overrides])


def spec() -> InputSpec:
    return InputSpec(DIGITS.features, DIGITS.image_shape, DIGITS.num_classes)


def plain_loss(objective: str, h, a, r, c=1.0, nu=0.05):
    """The formulas as the issue states them, for autograd."""
    d, g = (h - a).square().sum(1), h.square().sum(1)
    return {"goodness": torch.sigmoid(g - c), "goodness-softplus": F.softplus(g - c),
            "hb-svdd": 0.5 * d, "sb-svdd": r ** 2 + (1 / nu) * torch.clamp(d - r ** 2, min=0),
            "ls-svdd": r ** 2 + (1 / nu) * (d - r ** 2) ** 2}[objective]


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_each_loss_and_its_gradient_match_the_formula(objective):
    g = torch.Generator().manual_seed(1)
    h = torch.rand(7, 5, generator=g, dtype=torch.float64) * 0.6
    a = torch.rand(5, generator=g, dtype=torch.float64) * 0.5
    r = 0.4  # some rows inside the sphere, some outside
    h.requires_grad_(True)
    expected = plain_loss(objective, h, a, r)
    expected.sum().backward()
    loss, grad = objectives.loss_and_grad(objective, h.detach(), a, r, 1.0, 0.05)
    assert torch.allclose(loss, expected.detach())
    assert torch.allclose(grad, h.grad)


def test_the_layer_update_is_the_gradient_of_its_batch_loss():
    cfg = oneclass("model.objective=sb-svdd", "train.epochs=2")
    net = FFNetwork(cfg, spec())
    layer = net.layers[0]
    layer.set_epoch(1)  # past the first epoch: the centre stays put during a batch
    layer.centre.copy_(torch.rand(32) * 0.3)
    layer.radius.fill_(0.5)
    x = DIGITS.train_x[:16]
    w = layer.module.weight.detach().clone().requires_grad_(True)
    b = layer.module.bias.detach().clone().requires_grad_(True)
    x_hat = x / (x.square().mean(1, keepdim=True).sqrt() + 1e-8)
    h = torch.relu(x_hat @ w.t() + b)
    plain_loss("sb-svdd", h, layer.centre, 0.5).mean().backward()
    lr = cfg.optim.lr
    layer.train_step(LayerBatch(x, x.shape[0]))
    assert torch.allclose(layer.module.weight, w.detach() - lr * w.grad, atol=1e-6)
    assert torch.allclose(layer.module.bias, b.detach() - lr * b.grad, atol=1e-6)


def test_centre_and_radius_per_batch_in_epoch_0_then_from_the_epochs_rows():
    cfg = oneclass("train.epochs=3", "oneclass.nu=0.1")
    layer = FFNetwork(cfg, spec()).layers[0]
    frozen = oneclass("train.epochs=3", "oneclass.nu=0.1", "train.freeze=[0]")
    still = FFNetwork(frozen, spec()).layers[0]  # no update: h is a function of x alone
    batches = DIGITS.train_x[:96].split(32)
    for x in batches:  # epoch 0: each batch's own statistics
        out = still.train_step(LayerBatch(x, x.shape[0])).out
        assert torch.allclose(still.centre, out.mean(0))
        assert float(still.radius) == pytest.approx(
            float(torch.quantile((out - out.mean(0)).norm(dim=1).double(), 0.9)), rel=1e-6)
    still.end_epoch()
    seen = torch.cat([still.forward(x) for x in batches])
    assert torch.allclose(still.centre, seen.mean(0), atol=1e-6)
    still.set_epoch(1)
    centre = still.centre.clone()
    for x in batches:
        still.train_step(LayerBatch(x, x.shape[0]))
        assert torch.equal(still.centre, centre)  # after epoch 0: fixed during the epoch
    still.end_epoch()
    distances = (seen - centre).norm(dim=1).double()
    assert float(still.radius) == pytest.approx(float(torch.quantile(distances, 0.9)), rel=1e-5)
    assert layer.buffers().keys() == {"centre", "radius"}


def test_the_epochs_statistics_survive_a_state_round_trip_mid_epoch():
    cfg = oneclass("train.epochs=3")
    net = FFNetwork(cfg, spec())
    net.set_epoch(1)
    for x in DIGITS.train_x[:64].split(32):
        net.train_batch(x, torch.zeros(x.shape[0], dtype=torch.long))
    copy = FFNetwork(cfg, spec())
    copy.load_state_dict(net.state_dict())
    net.end_epoch()
    copy.end_epoch()
    for a, b in zip(net.layers, copy.layers):
        assert torch.equal(a.centre, b.centre) and torch.equal(a.radius, b.radius)


def test_auroc_average_precision_and_the_threshold_on_a_hand_computed_case():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float64)
    anomaly = torch.tensor([False, False, True, True])
    m = detection_metrics(scores, anomaly, threshold=0.3)
    # pairs (anomaly, normal): (0.35 > 0.1) (0.35 < 0.4) (0.8 > 0.1) (0.8 > 0.4): 3 / 4
    assert m["auroc"] == pytest.approx(0.75)
    # ranked: 0.8 (hit, precision 1), 0.4 (miss), 0.35 (hit, precision 2/3)
    assert m["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    # flagged above 0.3: 0.4, 0.35, 0.8 -> tp 2, fp 1, fn 0
    assert m["f1"] == pytest.approx(0.8) and m["accuracy"] == pytest.approx(0.75)
    assert m["test_error"] == pytest.approx(0.25)


def test_the_protocol_trains_on_the_normal_class_and_mixes_in_a_share_of_anomalies():
    cfg = oneclass()
    ds = load_data(cfg)
    assert (ds.train_y == 3).all() and len(ds.test_y) == len(DIGITS.test_y)
    dirty = one_vs_rest(DIGITS, config.load("digits-ff", [*ONECLASS, "oneclass.contamination=0.1"]
                                            ).oneclass, seed=0)
    share = float((dirty.train_y != 3).float().mean())
    assert share == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("overrides,message", [
    (["train.negatives=hybrid"], "learn from normal data alone; set train.negatives = 'none'"),
    (["model.objective=hinton"], "not a one-class loss; choose one of: goodness"),
    (["model.cell=ff"], "'oneclass' for 'oneclass'"),
    (["oneclass.nu=0"], "oneclass.nu' must be > 0"),
    (["oneclass.normalize=l1"], "choose one of: rms, l2, none"),
])
def test_configs_that_do_not_apply_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        oneclass(*overrides)


def test_a_normal_class_the_dataset_lacks_and_an_ff_layer_with_a_one_class_loss_are_refused():
    with pytest.raises(ConfigError, match="oneclass.normal = 12 is not a class of digits"):
        load_data(oneclass("oneclass.normal=12"))
    with pytest.raises(ConfigError, match="FF layers take 'hinton', 'low' or 'symba'"):
        config.load("digits-ff", ["model.objective=hb-svdd"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("oc")
    code = main(["train", "--config", "digits-ff", *sum((["--set", o] for o in ONECLASS), []),
                 "--set", "train.epochs=20", "--set", "oneclass.score=sum", "--out", str(out),
                 "--quiet"])
    assert code == 0
    return out


def test_training_learns_to_tell_the_normal_digit_from_the_rest(trained):
    summary = json.loads((trained / "metrics.json").read_text())
    assert summary["auroc"] > 0.9, summary["auroc"]
    assert summary["test_error"] == pytest.approx(1 - summary["auroc"])
    for name in ("roc.png", "scores.png", "learning_curve.png"):
        assert (trained / name).stat().st_size > 1000


def test_fedff_score_reproduces_the_runs_test_auroc_and_scores_a_users_rows(trained, capsys):
    summary = json.loads((trained / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["score", str(trained / "checkpoint.pt"), "--out", str(trained / "t.csv")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["auroc"] == summary["auroc"] and scored["rows"] == len(DIGITS.test_y)
    rows = DIGITS.test_x[:5].numpy()
    np.save(trained / "rows.npy", rows)
    np.savetxt(trained / "rows.csv", rows, delimiter=",", header=",".join(["px"] * 64))
    for name in ("rows.npy", "rows.csv"):
        assert main(["score", str(trained / "checkpoint.pt"), "--input", str(trained / name),
                     "--out", str(trained / "u.csv")]) == 0
        lines = (trained / "u.csv").read_text().splitlines()
        assert lines[0] == "row,score,anomaly" and len(lines) == 6
        test_lines = (trained / "t.csv").read_text().splitlines()[1:6]
        assert [ln.split(",")[:3] for ln in lines[1:]] == [ln.split(",")[:3] for ln in test_lines]


@pytest.mark.parametrize("content,message", [
    (np.zeros((3, 60)), "shape \\[3, 60\\]; this network scores rows of 64 features"),
    ("a,b\n1,x\n", "not a number"),
    (None, "give a .npy array or a .csv table"),
])
def test_fedff_score_refuses_bad_rows_with_one_line(trained, tmp_path, capsys, content, message):
    if isinstance(content, np.ndarray):
        path = tmp_path / "bad.npy"
        np.save(path, content)
    else:
        path = tmp_path / ("bad.csv" if content else "bad.txt")
        path.write_text(content or "1,2\n")
    assert main(["score", str(trained / "checkpoint.pt"), "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedff: error:") and len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_fedff_score_refuses_a_checkpoint_of_another_algorithm(tmp_path, capsys):
    assert main(["train", "--set", "train.epochs=1", "--set", "model.hidden=[16, 16]",
                 "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["score", str(tmp_path / "checkpoint.pt")]) == 2
    assert "scores one-class runs" in capsys.readouterr().err


def test_a_two_worker_chain_trains_the_weights_and_centres_of_one_process(tmp_path):
    from fedff.pipeline.driver import Pipeline
    from fedff.pipeline.launcher import LocalChain

    cfg = oneclass("model.hidden=[32, 24, 16]", "model.objective=ls-svdd", "train.epochs=3",
                   "optim.lr=0.0005")
    ds = load_data(cfg)
    local = FFNetwork(cfg, spec())
    for epoch in range(3):
        train_epoch(local, ds, epoch, show=False)
    with LocalChain(2, tmp_path, window=4) as chain:
        pipe = Pipeline(cfg, spec(), chain.addresses, window=4)
        try:
            for epoch in range(3):
                train_epoch(pipe, ds, epoch, show=False)
            piped = pipe.state_dict()
        finally:
            pipe.close()
    for a, b in zip(piped["layers"], local.state_dict()["layers"]):
        assert a["steps"] == b["steps"] > 0 and float(a["buffers"]["radius"]) > 0
        assert torch.isfinite(a["module"]["weight"]).all()
        for part in ("module", "buffers"):
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_federation_clients_hold_only_normal_rows_and_average_the_centre():
    cfg = oneclass("federation.clients=2", "federation.rounds=1", "train.epochs=1")
    # a supervised run's clients in the same process (cached per process) first
    supervised = config.load("digits-ff", ["federation.clients=2"])
    assert len(set(client_data(supervised, 0, 2).train_y.tolist())) == 10
    start = initial_arrays(cfg, spec_of(DIGITS))
    replies = []
    for pid in (0, 1):
        ds = client_data(cfg, pid, 2)
        assert (ds.train_y == 3).all()
        arrays, metrics = client_train(cfg, ds, start, 1, [0, 1], partition_id=pid)
        replies.append(arrays)
    assert set(replies[0].keys()) >= {"layer0.centre", "layer0.radius", "layer1.centre"}
    assert not np.array_equal(replies[0]["layer0.centre"].numpy(),
                              replies[1]["layer0.centre"].numpy())


@pytest.mark.slow
def test_a_simulated_federation_of_normal_data_sites_detects_anomalies(tmp_path):
    from fedff.federation.simulation import simulate

    cfg = oneclass("federation.clients=2", "federation.rounds=3", "federation.min_clients=2",
                   "federation.round_timeout=120", "federation.connect_timeout=120")
    summary = simulate(cfg, tmp_path, show_progress=False)
    assert [r["replies"] for r in summary["history"]] == [2, 2, 2]
    assert summary["auroc"] > 0.9, summary["auroc"]
    client_eval = summary["history"][-1]["client_eval"]
    assert 0.5 < client_eval["auroc"] <= 1.0, client_eval
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["network"]
    assert saved["layers"][0]["buffers"]["centre"].abs().sum() > 0


def test_the_table_script_runs_ff_and_its_backprop_baseline_per_class(tmp_path, monkeypatch):
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "scripts"))
    table_script = importlib.import_module("oneclass_table")
    sets = sum((["--set", o] for o in [*ONECLASS, "train.epochs=2"]), [])
    for extra in ([], ["--backprop"]):
        out = tmp_path / ("bp" if extra else "ff")
        assert table_script.main(["--config", "digits-ff", *sets, "--classes", "3",
                                  "--objectives", "hb-svdd", "sb-svdd", "--out", str(out),
                                  *extra]) == 0
        results = json.loads((out / "results.json").read_text())
        runs = results["results"]["sb-svdd"]
        assert [r["class"] for r in runs] == [3] and 0.5 < runs[0]["auroc"] <= 1
        summary = json.loads((out / "hb-svdd" / "class3" / "metrics.json").read_text())
        assert results["mean_auroc"]["hb-svdd"] == summary["auroc"]
        assert summary.get("trainer", "ff") == ("backprop" if extra else "ff")
        table = (out / "table.md").read_text()
        assert ("sb-svdd (backprop) |" if extra else "| sb-svdd |") in table
        assert (out / "auroc_per_class.png").stat().st_size > 1000
