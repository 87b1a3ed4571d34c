"""PEPITA: the update rule against a plain re-implementation of the equations, the
mirroring step, the state round trip, the shared F of a federation, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedff import config
from fedff.data.datasets import load_digits
from fedff.engine.evaluate import evaluate
from fedff.engine.network import FFNetwork, InputSpec
from fedff.errors import ConfigError, ShapeError
from fedff.federation.task import client_data, client_train, initial_arrays, spec_of
from fedff.pepita.layer import factor_std
from fedff.pipeline.driver import check_pipeline_config
from fedff.train import train_epoch
from fedff.v1 import worker_pb2 as pb

DIGITS = load_digits()
SPEC = InputSpec(DIGITS.features, DIGITS.image_shape, DIGITS.num_classes)
PEPITA = ["train.algorithm=pepita", "model.cell=pepita", "train.negatives=none",
          "train.classify=head", "optim.momentum=0.9", "optim.weight_decay=0",
          "optim.schedule=constant", "optim.lr=0.1"]


def pepita(*overrides: str) -> config.Config:
    return config.load("digits-ff", [*PEPITA, *overrides])


def reference_step(weights: list[torch.Tensor], feedback: list[torch.Tensor], x, y,
                   lr: float, sign: float = -1.0, normalize: bool = False
                   ) -> list[torch.Tensor]:
    """The equations, written plainly: pass 1, e, x_err = x + sign F e, pass 2, one SGD
    step (the first momentum step is the gradient itself). `normalize`: every hidden
    output rescaled per row to its input's length."""
    def forward(h0):
        hs = [h0]
        for w in weights[:-1]:
            h = torch.relu(hs[-1] @ w.t())
            if normalize:
                h = h / h.norm(dim=1, keepdim=True) * hs[-1].norm(dim=1, keepdim=True)
            hs.append(h)
        return hs, hs[-1] @ weights[-1].t()

    hs, logits = forward(x)
    target = F.one_hot(y, logits.shape[1]).float()
    e = logits.softmax(dim=1) - target
    f = feedback[0]
    for b in feedback[1:]:
        f = f @ b
    x_err = x + sign * e @ f.t()
    hs_err, _ = forward(x_err)
    n = x.shape[0]
    new = [w - lr * (hs[i + 1] - hs_err[i + 1]).t() @ hs_err[i] / n
           for i, w in enumerate(weights[:-1])]
    return new + [weights[-1] - lr * e.t() @ hs_err[-1] / n]


@pytest.mark.parametrize("variant,normalize", [("fixed", "none"), ("mirror", "none"),
                                               ("fixed", "length")])
def test_one_step_is_the_papers_update(variant, normalize):
    cfg = pepita("model.hidden=[12, 8, 10]", "pepita.dropout=0", f"pepita.normalize={normalize}",
                 f"pepita.feedback={variant}", "pepita.wm_epochs=0", "pepita.wm_every=0")
    net = FFNetwork(cfg, SPEC)
    weights = [layer.module.weight.detach().clone() for layer in net.layers]
    feedback = [layer.feedback.clone() for layer in net.layers if layer.feedback is not None]
    assert [tuple(b.shape) for b in feedback] == (
        [(64, 10)] if variant == "fixed" else [(64, 12), (12, 8), (8, 10)])
    x, y = DIGITS.train_x[:16], DIGITS.train_y[:16]
    metrics = net.train_batch(x, y)
    assert metrics["layer2/loss"] > 0
    want = reference_step(weights, feedback, x, y, lr=0.1, normalize=normalize == "length")
    for layer, w in zip(net.layers, want):
        torch.testing.assert_close(layer.module.weight, w, rtol=1e-5, atol=1e-6)


def test_the_ICML_variant_modulates_with_plus_and_steps_on_the_pass2_error():
    cfg = pepita("model.hidden=[12, 10]", "pepita.dropout=0", "pepita.modulation=plus",
                 "pepita.last_error=pass2")
    net = FFNetwork(cfg, SPEC)
    w0, w1 = (layer.module.weight.detach().clone() for layer in net.layers)
    f = net.layers[0].feedback.clone()
    x, y = DIGITS.train_x[:16], DIGITS.train_y[:16]
    net.train_batch(x, y)
    h = torch.relu(x @ w0.t())
    e = (h @ w1.t()).softmax(dim=1) - F.one_hot(y, 10).float()
    x_err = x + e @ f.t()
    h_err = torch.relu(x_err @ w0.t())
    e2 = (h_err @ w1.t()).softmax(dim=1) - F.one_hot(y, 10).float()
    torch.testing.assert_close(net.layers[0].module.weight, w0 - 0.1 * (h - h_err).t() @ x_err
                               / 16, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.layers[1].module.weight, w1 - 0.1 * e2.t() @ h_err / 16,
                               rtol=1e-5, atol=1e-6)


def test_weight_mirroring_moves_each_factor_towards_its_layer_and_rescales_F():
    """Step 1 mirrors each factor; the joint rescale is agreed with the next error (so a
    chain can agree it) and applied before that step's update: step 2 learns through the
    rescaled F, and the factors end rescaled so that std(F) = sd."""
    cfg = pepita("model.hidden=[12, 8, 10]", "pepita.dropout=0", "pepita.feedback=mirror",
                 "pepita.wm_lr=0.5", "pepita.wm_wd=0.01", "pepita.wm_epochs=1",
                 "pepita.wm_every=0")
    net = FFNetwork(cfg, SPEC)
    before = [layer.feedback.clone() for layer in net.layers]
    noise = [torch.Generator().set_state(layer.generator.get_state()) for layer in net.layers]
    net.train_batch(DIGITS.train_x[:16], DIGITS.train_y[:16])
    want = []
    for layer, b, g in zip(net.layers, before, noise):
        xi = 0.1 * torch.randn(16, layer.config.in_features, generator=g)
        xi = xi - xi.mean()
        y = xi @ layer.module.weight.t()  # the layer's weights after this step's update
        want.append((b + 0.5 * xi.t() @ y / 16) * (1 - 0.5 * 0.01))
    for layer, w in zip(net.layers, want):  # mirrored, the rescale still to agree
        torch.testing.assert_close(layer.feedback, w, rtol=1e-4, atol=1e-7)
    sd = 0.05 * math.sqrt(2 / 64)
    scale = (sd / float((want[0] @ want[1] @ want[2]).std())) ** (1 / 3)
    rescaled = [w * scale for w in want]
    weights = [layer.module.weight.detach().clone() for layer in net.layers]
    net.set_epoch(1)  # no mirroring in epoch 1: step 2 only applies step 1's rescale
    for layer in net.layers:  # so step 2 is a plain SGD step, as reference_step's
        layer.optimizers["main"].state.clear()
    x, y = DIGITS.train_x[16:32], DIGITS.train_y[16:32]
    net.train_batch(x, y)
    for layer, w in zip(net.layers, rescaled):
        torch.testing.assert_close(layer.feedback, w, rtol=1e-4, atol=1e-7)
    got = net.layers[0].feedback @ net.layers[1].feedback @ net.layers[2].feedback
    assert float(got.std()) == pytest.approx(sd, rel=1e-4)
    # step 2's update came through the rescaled F
    for layer, w in zip(net.layers, reference_step(weights, rescaled, x, y, lr=0.1)):
        torch.testing.assert_close(layer.module.weight, w, rtol=1e-4, atol=1e-6)
    # the initial factors already give std(F) = sd, as the paper sets them
    assert factor_std([64, 12, 8, 10], 0.05) ** 3 * math.sqrt(12 * 8) == pytest.approx(sd)


def test_dropout_uses_the_same_mask_in_both_passes():
    net = FFNetwork(pepita("model.hidden=[32, 10]", "pepita.dropout=0.5"), SPEC)
    layer = net.layers[0]
    from fedff.layers.contract import LayerBatch
    pending = layer.begin(LayerBatch(DIGITS.train_x[:8], 8))
    dropped = pending.mask == 0
    assert dropped.any() and (pending.h[dropped] == 0).all()
    result = layer.finish(pending, DIGITS.train_x[8:16])
    assert (result.out[dropped] == 0).all()
    assert torch.equal(layer.forward(DIGITS.train_x[:8]),
                       torch.relu(DIGITS.train_x[:8] @ layer.module.weight.t()))  # no mask


def test_state_round_trips_and_training_continues_identically():
    cfg = pepita("model.hidden=[24, 16, 10]", "pepita.feedback=mirror")
    a = FFNetwork(cfg, SPEC)
    for epoch in range(2):
        train_epoch(a, DIGITS, epoch, show=False)
    b = FFNetwork(cfg, SPEC)
    b.load_state_dict(a.state_dict())
    x, y = DIGITS.train_x[:32], DIGITS.train_y[:32]
    a.train_batch(x, y)
    b.train_batch(x, y)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.module.weight, lb.module.weight)
        assert torch.equal(la.feedback, lb.feedback)


def test_pepita_learns_digits_and_reports_the_output_layers_error():
    cfg = pepita("model.hidden=[128, 10]", "train.epochs=10", "optim.lr=0.05")
    net = FFNetwork(cfg, SPEC)
    for epoch in range(cfg.train.epochs):
        train_epoch(net, DIGITS, epoch, show=False)
    result = evaluate(net, DIGITS.test_x, DIGITS.test_y)
    assert set(result) == {"error_head"}
    assert result["error_head"] < 0.12, result


def test_three_hidden_layers_learn_with_length_normalisation_and_blow_up_without():
    """64-256-256-256-10 at lr 0.1: the papers' rule drives the activity up until the
    net stops learning (89 % error, measured); rescaling each hidden output to its
    input's length keeps it on scale (7 % after 10 epochs, measured)."""
    errors = {}
    for normalize in ("none", "length"):
        net = FFNetwork(pepita("model.hidden=[256, 256, 256, 10]", f"pepita.normalize={normalize}"),
                        SPEC)
        for epoch in range(8):
            train_epoch(net, DIGITS, epoch, show=False)
        errors[normalize] = evaluate(net, DIGITS.test_x, DIGITS.test_y)["error_head"]
        x = DIGITS.test_x[:32]
        for layer in net.layers[:-1]:  # each hidden output on its input's length
            h = layer.forward_with_score(x)[0]
            if normalize == "length":
                torch.testing.assert_close(h.norm(dim=1), x.norm(dim=1))
            x = h
    assert errors["length"] < 0.12 and errors["none"] > 0.5, errors


def test_every_federation_client_uses_the_coordinators_F():
    cfg = pepita("model.hidden=[16, 10]", "federation.clients=2", "federation.rounds=1",
                 "train.epochs=1")
    start = initial_arrays(cfg, spec_of(DIGITS))
    f0 = start["layer0.feedback"].numpy()
    for pid in (0, 1):
        ds = client_data(cfg, pid, 2)
        arrays, _ = client_train(cfg, ds, start, 1, [0, 1], partition_id=pid)
        assert (arrays["layer0.feedback"].numpy() == f0).all()
        assert not (arrays["layer0.weight"].numpy() == start["layer0.weight"].numpy()).all()


@pytest.mark.parametrize("overrides,message", [
    (["train.negatives=hard"], "PEPITA uses no negative data"),
    (["model.cell=ae"], "e.g. 'pepita' for train.algorithm = 'pepita'"),
    (["train.classify=goodness"], "set train.classify = 'head'"),
    (["model.hidden=[64]"], "needs hidden layers and an output layer"),
    (["pepita.feedback=mirror", "pepita.modulation=plus"], "descends only with x_err = x - F e"),
])
def test_configs_that_do_not_apply_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load("digits-ff", [*PEPITA, *overrides])


def test_an_output_layer_of_the_wrong_width_and_a_wrong_F_are_refused():
    with pytest.raises(ConfigError, match="must be 10 wide .* model.hidden=\\[64, 10\\]"):
        FFNetwork(pepita("model.hidden=[64, 7]"), SPEC)
    check_pipeline_config(pepita("model.hidden=[64, 10]", "pepita.feedback=mirror"))
    net = FFNetwork(pepita("model.hidden=[64, 10]"), SPEC)
    state = net.layers[0].state_dict()
    state["buffers"]["feedback"] = torch.zeros(64, 7)
    with pytest.raises(ShapeError, match="'feedback' is \\[64, 7\\], this layer's is \\[64, 10\\]"):
        net.layers[0].load_state_dict(state)
    with pytest.raises(config.ConfigError, match="train.algorithm = pepita"):
        config.load("digits-ff", ["model.cell=pepita", "train.negatives=none",
                                  "train.algorithm=unsupervised", "train.classify=head"])


@pytest.mark.slow
def test_a_simulated_federation_trains_pepita_clients(tmp_path):
    from fedff.federation.simulation import simulate

    cfg = pepita("model.hidden=[64, 10]", "optim.lr=0.05", "federation.clients=2",
                 "federation.rounds=3", "federation.local_epochs=2",
                 "federation.min_clients=2", "federation.fraction_evaluate=0",
                 "federation.round_timeout=60", "federation.connect_timeout=60")
    summary = simulate(cfg, tmp_path, show_progress=False)
    assert [r["replies"] for r in summary["history"]] == [2, 2, 2]
    errors = [r["test_error"] for r in summary["history"]]
    assert errors[-1] < 0.15 and errors[-1] < errors[0], errors
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["network"]
    start = initial_arrays(cfg, spec_of(DIGITS))
    assert torch.equal(saved["layers"][0]["buffers"]["feedback"],
                       torch.from_numpy(start["layer0.feedback"].numpy()))


@pytest.mark.parametrize("workers, feedback, normalize", [(1, "fixed", "none"),
                                                         (3, "mirror", "length")])
def test_a_chain_with_window_1_trains_the_weights_of_one_process(tmp_path, workers,
                                                                 feedback, normalize):
    """Bit for bit, weight mirroring included: its rescale is agreed along the chain
    (the product of the factors up with the error, the scale down with the frames).
    Mirroring runs with length normalisation, as `mnist-pepita-wm-3x1024` does."""
    from fedff.pipeline.driver import Pipeline
    from fedff.pipeline.launcher import LocalChain

    cfg = pepita("model.hidden=[24, 16, 12, 10]", "train.epochs=2", "optim.lr=0.05",
                 f"pepita.feedback={feedback}", f"pepita.normalize={normalize}")
    local = FFNetwork(cfg, SPEC)
    for epoch in range(2):
        local_metrics = train_epoch(local, DIGITS, epoch, show=False)
    with LocalChain(workers, tmp_path, window=1, checkpoint_every=20) as chain:
        pipe = Pipeline(cfg, SPEC, chain.addresses, window=1)
        try:
            for epoch in range(2):
                metrics = train_epoch(pipe, DIGITS, epoch, show=False)
            piped = pipe.state_dict()
            chain_eval = evaluate(pipe, DIGITS.test_x, DIGITS.test_y)
        finally:
            pipe.close()
    # every batch's output-layer metrics came back (pass 2 rides on the next frame)
    assert metrics == pytest.approx(local_metrics) and set(metrics) == {"layer3/loss",
                                                                         "layer3/accuracy"}
    for a, b in zip(piped["layers"], local.state_dict()["layers"]):
        assert a["steps"] == b["steps"] > 0
        assert torch.equal(a["module"]["weight"], b["module"]["weight"])
        assert a["buffers"].keys() == b["buffers"].keys()
        for name in a["buffers"]:
            assert torch.equal(a["buffers"][name], b["buffers"][name])
        if feedback == "mirror":  # every step but the last agreed, and applied, a scale
            assert a["extra"]["scale_tag"] == b["extra"]["scale_tag"] == a["steps"] - 1
    assert chain_eval == evaluate(local, DIGITS.test_x, DIGITS.test_y)
    # the errors on their way up (batch x 24 floats here, batch x 1024 on MNIST) are not
    # checkpointed: a restarted worker's upstream had those batches answered already
    for i in range(workers):
        saved = torch.load(tmp_path / f"worker{i}/worker.pt", weights_only=True)
        kept = [pb.Ack.FromString(a) for a in saved["acks"].values()]
        assert not any(t.name == "signal" for a in kept for t in a.feedback.tensors)


@pytest.mark.parametrize("victim, feedback, normalize", [(1, "mirror", "length"),
                                                        (0, "fixed", "none"),
                                                        (2, "fixed", "none")])
def test_a_worker_killed_mid_epoch_resumes_and_the_chain_trains_one_process_weights(
        tmp_path, victim, feedback, normalize):
    """Window 1: a worker killed in the middle of epoch 2 restarts from its checkpoint
    (every 5 batches: the weights after a pass 2, the dropout generator before the next
    pass 1, and the pass-2 output it sent on), replays what it lost, and the chain still
    ends with one process's weights, factors and scale tags, bit for bit."""
    import signal

    from test_pipeline import chain_state

    cfg = pepita("model.hidden=[24, 16, 12, 10]", "train.epochs=2", "optim.lr=0.05",
                 f"pepita.feedback={feedback}", f"pepita.normalize={normalize}")
    local = FFNetwork(cfg, SPEC)
    for epoch in range(2):
        train_epoch(local, DIGITS, epoch, show=False)
    # 29 batches an epoch: killed once batch 13 of epoch 2 has gone in
    piped, chain = chain_state(cfg, tmp_path, 3, kill_after=42, window=1, victim=victim,
                               checkpoint_every=5)
    w = chain.workers[victim]
    assert w.restarts == 1 and w.history == [-signal.SIGKILL]
    assert "resumed from" in w.log_file.read_text()
    for a, b in zip(piped["layers"], local.state_dict()["layers"]):
        assert a["steps"] == b["steps"] > 0  # every batch trained exactly once
        assert torch.equal(a["module"]["weight"], b["module"]["weight"])
        for name in a["buffers"]:
            assert torch.equal(a["buffers"][name], b["buffers"][name])
        assert a["extra"]["scale_tag"] == b["extra"]["scale_tag"]


def test_a_worker_keeps_only_the_errors_its_upstream_can_ask_again_for(tmp_path):
    """The ack cache (1,024 answers) keeps the error of only the last `retained` ones
    (2 checkpoint intervals + 4 windows: what the upstream's link can send again); with
    factorised feedback on MNIST each is 64 x 1024 floats, 256 MB for a full cache."""
    from test_pipeline import serve

    from fedff.pipeline.driver import Pipeline

    cfg = pepita("model.hidden=[24, 16, 10]", "train.epochs=1")
    servers = [serve(tmp_path / str(i), window=1, checkpoint_every=5) for i in range(2)]
    try:
        pipe = Pipeline(cfg, SPEC, [s.address for s in servers], window=1)
        train_epoch(pipe, DIGITS, 0, show=False)
        pipe.close()
        core = servers[1].servicer.core  # layer 2: its answers carry the error up
        with_error = [b for b, a in core.acks.items()
                      if any(t.name == "signal" for t in a.feedback.tensors)]
        assert core.opt.retained == 14
        assert with_error == list(range(16, 30))  # the last 14 of 29 training batches
        assert list(core.acks) == [*with_error, 30]  # and the epoch's end
    finally:
        for s in servers:
            s.stop()


def test_a_worker_restarted_mid_epoch_at_a_wider_window_names_the_fix():
    """At window > 1 the pass-1 states waiting for their errors died with the worker: the
    restarted worker refuses to go on mid-epoch and names --resume and --window 1."""
    from types import SimpleNamespace

    from fedff.wire.frames import WireError
    from fedff.worker import top_down
    from fedff.worker.options import WorkerOptions

    core = SimpleNamespace(opt=WorkerOptions(name="worker1", window=4), waiting={},
                           replay={"pass2": {}, "metrics": {}})
    with pytest.raises(WireError, match=r"window 4.*--resume.*--window 1"):
        top_down.resume(core, None, {5: torch.zeros(2, 3)})
    assert core.replay is not None  # nothing taken


def test_a_diverging_run_stops_with_the_fix_named(tmp_path):
    from fedff.train import TrainingDiverged, run

    cfg = pepita("model.hidden=[64, 10]", "optim.lr=1e8", "train.epochs=3")
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1: .*lower optim.lr"):
        run(cfg, tmp_path, show_progress=False)


@pytest.mark.parametrize("feedback", ["fixed", "mirror"])
def test_a_chain_with_a_wide_window_applies_late_errors_and_still_learns(tmp_path, feedback):
    """Window 4: pass 2 of batch b runs up to 4 batches late, with pass 1 redone on the
    weights of that moment (else h - h_err measures the weights' change and diverges).
    Mirroring's scale arrives late too: a layer is never scaled twice, F keeps its std."""
    from fedff.pipeline.driver import Pipeline
    from fedff.pipeline.launcher import LocalChain

    cfg = pepita("model.hidden=[24, 16, 10]", "train.epochs=3", "optim.lr=0.05",
                 f"pepita.feedback={feedback}", "pepita.wm_epochs=3")
    local = FFNetwork(cfg, SPEC)
    for epoch in range(3):
        train_epoch(local, DIGITS, epoch, show=False)
    with LocalChain(3, tmp_path, window=4) as chain:
        pipe = Pipeline(cfg, SPEC, chain.addresses, window=4)
        try:
            for epoch in range(3):
                metrics = train_epoch(pipe, DIGITS, epoch, show=False)
            chain_error = evaluate(pipe, DIGITS.test_x, DIGITS.test_y)["error_head"]
            factors = [layer["buffers"].get("feedback") for layer in pipe.state_dict()["layers"]]
        finally:
            pipe.close()
    if feedback == "mirror":  # the last step's scale is still to agree: within a step's drift
        f = factors[0] @ factors[1] @ factors[2]
        assert 0.8 < float(f.std()) / (0.05 * math.sqrt(2 / 64)) < 1.25
    local_error = evaluate(local, DIGITS.test_x, DIGITS.test_y)["error_head"]
    # how late each error lands depends on the threads' timing: the chain learns, more
    # slowly than one process here (its MNIST figure is in the README), and never diverges
    assert math.isfinite(metrics["layer2/loss"]) and metrics["layer2/loss"] < 2.2
    assert chain_error < 0.8 and local_error < 0.6, (chain_error, local_error)


def test_a_long_chain_run_frees_what_is_durable(tmp_path):
    """More batches than a link retains (256): the workers' checkpoints on the shared
    schedule must make them durable, or the driver stalls."""
    from fedff.pipeline.driver import Pipeline
    from fedff.pipeline.launcher import LocalChain

    cfg = pepita("model.hidden=[16, 10]", "train.epochs=10", "optim.lr=0.05",
                 "train.batch_size=50")
    with LocalChain(2, tmp_path, window=4, checkpoint_every=20) as chain:
        pipe = Pipeline(cfg, SPEC, chain.addresses, window=4, give_up_after=30)
        try:
            for epoch in range(10):  # 29 batches an epoch: 290 in all
                train_epoch(pipe, DIGITS, epoch, show=False)
            statuses = pipe.statuses()
        finally:
            pipe.close()
    assert all(s.durable_through >= 280 for s in statuses), statuses


def test_mirroring_messages_from_a_peer_are_checked():
    """The scale and the product travel between workers: a wrong one is refused whole,
    naming what was expected, and changes no factor."""
    from fedff.pepita import mirror
    from fedff.wire.frames import WireError

    net = FFNetwork(pepita("model.hidden=[24, 16, 10]", "pepita.feedback=mirror"), SPEC)
    first, lower = net.layers[:1], net.layers[1:]
    good = mirror.Scale(3, 0.75)
    assert mirror.Scale.from_tensor(good.tensor()) == good  # the value's bits, exactly
    for bad, message in [(torch.tensor([1.0, 0.5]), "int64"),
                         (torch.tensor([0, 4607182418800017408]), "tag > 0"),
                         (mirror.Scale(2, -1.0).tensor(), "positive finite")]:
        with pytest.raises(WireError, match=message):
            type(lower[0]).receive_frame(lower, {mirror.SCALE: bad})
    with pytest.raises(WireError, match="the first worker agrees the scale"):
        type(first[0]).receive_frame(first, {mirror.SCALE: good.tensor()})
    type(lower[0]).receive_frame(lower, {mirror.SCALE: good.tensor()})
    assert all(layer.incoming == good for layer in lower)
    before = [layer.feedback.clone() for layer in net.layers]
    for below, message in [({}, "mirror.tags"),
                           ({mirror.TAGS: torch.zeros(1, dtype=torch.int64)}, "int64 \\[2\\]"),
                           ({mirror.TAGS: torch.zeros(2, dtype=torch.int64),
                             mirror.PRODUCT: torch.zeros(16, 10)}, "float32 \\[24, 10\\]")]:
        with pytest.raises(WireError, match=message):
            type(first[0]).signal_up(first, below)
    assert all(torch.equal(a.feedback, b) for a, b in zip(net.layers, before))


def test_averaged_mirrored_factors_are_renormalised_at_the_next_step():
    """A federation averages the factors, and the product of averages is not the average
    of products: the next step agrees a scale for them, even after mirroring has ended."""
    from flwr.app import ArrayRecord

    from fedff.federation.task import load_network_arrays, network_arrays

    cfg = pepita("model.hidden=[24, 16, 10]", "pepita.feedback=mirror", "pepita.wm_epochs=1",
                 "pepita.wm_every=0")
    net = FFNetwork(cfg, SPEC)
    arrays = {k: v.numpy() for k, v in network_arrays(net).to_torch_state_dict().items()}
    for key in arrays:
        if key.endswith("feedback"):
            arrays[key] = arrays[key] * 2.0  # as far off as an average can leave them
    load_network_arrays(net, ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}))
    net.set_epoch(3)  # no mirroring any more
    net.train_batch(DIGITS.train_x[:16], DIGITS.train_y[:16])
    f = net.layers[0].feedback @ net.layers[1].feedback @ net.layers[2].feedback
    assert float(f.std()) == pytest.approx(0.05 * math.sqrt(2 / 64), rel=1e-4)
