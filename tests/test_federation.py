"""Per-layer aggregation: the example-weighted mean per layer, untouched layers kept."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedff import config
from fedff.data.datasets import load_digits
from fedff.federation.strategy import (LayerwiseFedAvg, Schedule, ServerOptimizer,
                                      aggregate_layers)
from fedff.federation.task import load_network_arrays, network_arrays
from fedff.engine.network import FFNetwork, InputSpec

DIGITS = load_digits()
SPEC = InputSpec(DIGITS.features, DIGITS.image_shape, DIGITS.num_classes)
RNG = np.random.default_rng(0)
KEYS = ["layer0.weight", "layer0.bias", "layer1.weight", "layer1.bias", "layer2.weight",
        "head.weight"]


def record(keys: list[str]) -> ArrayRecord:
    return ArrayRecord({k: Array(RNG.normal(size=(4, 3)).astype(np.float32)) for k in keys})


def reply(arrays: ArrayRecord, examples: int, loss: float = 0.0) -> RecordDict:
    return RecordDict({"arrays": arrays,
                       "metrics": MetricRecord({"num-examples": examples, "loss": loss})})


def test_each_layer_is_the_weighted_mean_of_the_clients_that_trained_it():
    current = record(KEYS)
    a = record(["layer0.weight", "layer0.bias", "layer1.weight", "layer1.bias"])
    b = record(["layer0.weight", "layer0.bias"])
    idle = record(["layer0.weight", "layer0.bias"])  # sent, but trained on nothing
    out = aggregate_layers(current, [reply(a, 100), reply(b, 300), reply(idle, 0)])
    for k in ("layer0.weight", "layer0.bias"):
        want = (100 * a[k].numpy() + 300 * b[k].numpy()) / 400
        np.testing.assert_allclose(out[k].numpy(), want, rtol=1e-6)
    for k in ("layer1.weight", "layer1.bias"):  # only client a trained layer 1
        np.testing.assert_allclose(out[k].numpy(), a[k].numpy(), rtol=1e-6)
    for k in ("layer2.weight", "head.weight"):  # nobody trained these: unchanged
        assert np.array_equal(out[k].numpy(), current[k].numpy())
    assert out["layer0.weight"].numpy().dtype == np.float32


def test_server_optimizer_steps_trained_layers_and_averages_running_statistics():
    current = record(KEYS + ["layer0.peer_mean"])
    mean = record(KEYS + ["layer0.peer_mean"])
    trained = ["layer0.weight", "layer0.bias", "layer0.peer_mean"]
    plain = ServerOptimizer().step(current, mean, trained, 1)  # lr 1: FedAvg itself
    for k in trained:
        np.testing.assert_allclose(plain[k].numpy(), mean[k].numpy(), rtol=1e-6)
    out = ServerOptimizer(lr=3.0, statistics=frozenset({"layer0.peer_mean"})).step(
        current, mean, trained, 1)
    for k in ("layer0.weight", "layer0.bias"):
        delta = mean[k].numpy() - current[k].numpy()
        np.testing.assert_allclose(out[k].numpy(), current[k].numpy() + 3 * delta, rtol=1e-5)
    np.testing.assert_allclose(out["layer0.peer_mean"].numpy(),  # a statistic: the mean
                               mean["layer0.peer_mean"].numpy())
    for k in ("layer1.weight", "head.weight"):  # not trained this round: unchanged
        assert np.array_equal(out[k].numpy(), current[k].numpy())


def test_server_warmup_and_momentum():
    opt = ServerOptimizer(lr=10.0, warmup=3)
    assert [opt.lr_at(r) for r in (1, 2, 3, 4, 9)] == pytest.approx([1, 4, 7, 10, 10])
    opt = ServerOptimizer(lr=1.0, momentum=0.5)
    start = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    target = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    first = opt.step(start, target, ["w"], 1)  # v = 1
    second = opt.step(start, target, ["w"], 2)  # v = 0.5 * 1 + 1
    np.testing.assert_allclose(first["w"].numpy(), 1.0)
    np.testing.assert_allclose(second["w"].numpy(), 1.5)


def test_bad_server_settings_are_refused():
    with pytest.raises(config.ConfigError, match="server_momentum"):
        config.load("digits-ff", ["federation.server_momentum=1"])
    with pytest.raises(config.ConfigError, match="server_lr"):
        config.load("digits-ff", ["federation.server_lr=0"])


@pytest.fixture
def run_context():
    """Messages are made inside a Flower run; outside one, name a run id for them."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id = TaskIdentity._task_id = TaskIdentity._node_id = None


def test_strategy_aggregates_real_reply_messages(run_context):
    strategy = LayerwiseFedAvg(Schedule("progressive", layers=3, rounds_per_layer=2))
    current = record(KEYS)
    strategy._current = current
    replies = []
    for n, loss in ((10, 1.0), (30, 2.0)):
        ask = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1,
                      message_type="train")
        replies.append(Message(reply(record(["layer1.weight"]), n, loss), reply_to=ask))
    arrays, metrics = strategy.aggregate_train(3, replies)
    want = (10 * replies[0].content["arrays"]["layer1.weight"].numpy()
            + 30 * replies[1].content["arrays"]["layer1.weight"].numpy()) / 40
    np.testing.assert_allclose(arrays["layer1.weight"].numpy(), want, rtol=1e-6)
    assert np.array_equal(arrays["layer0.weight"].numpy(), current["layer0.weight"].numpy())
    assert metrics["loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    # with a server learning rate the global layer moves twice as far as the mean
    stepped = LayerwiseFedAvg(Schedule("progressive", layers=3, rounds_per_layer=2),
                              server=ServerOptimizer(lr=2.0))
    stepped._current = current
    arrays, _ = stepped.aggregate_train(3, replies)
    now = current["layer1.weight"].numpy()
    np.testing.assert_allclose(arrays["layer1.weight"].numpy(), now + 2 * (want - now),
                               rtol=1e-5)
    assert np.array_equal(arrays["layer0.weight"].numpy(), current["layer0.weight"].numpy())


@pytest.mark.parametrize("kind,expected", [
    ("all", [[0, 1, 2]] * 7),
    ("progressive", [[0], [0], [1], [1], [2], [2], [2]]),
])
def test_schedules(kind, expected):
    schedule = Schedule(kind, layers=3, rounds_per_layer=2)
    assert [schedule.layers_for(r) for r in range(1, 8)] == expected


def test_network_arrays_round_trip_and_partial_load():
    cfg = config.load("digits-ff", ["model.hidden=[20, 20, 20]"])
    a = FFNetwork(cfg, SPEC)
    b = FFNetwork(config.load("digits-ff", ["model.hidden=[20, 20, 20]", "train.seed=1"]), SPEC)
    before = b.layers[2].weights()["weight"].clone()
    load_network_arrays(b, network_arrays(a, layers=[0, 1], head=False))
    for i in (0, 1):
        assert torch.equal(a.layers[i].weights()["weight"], b.layers[i].weights()["weight"])
    assert torch.equal(b.layers[2].weights()["weight"], before)
    load_network_arrays(b, network_arrays(a))
    assert torch.equal(a.head.linear.weight, b.head.linear.weight)
    with pytest.raises(KeyError, match="layer 7"):
        load_network_arrays(b, ArrayRecord({"layer7.weight": Array(np.zeros((2, 2),
                                                                            np.float32))}))


def test_a_restarted_coordinator_keeps_the_server_momentum(tmp_path):
    from fedff.federation.server_app import Coordinator

    cfg = config.load("digits-ff", ["federation.server_momentum=0.5", "federation.rounds=3"])
    first = Coordinator(cfg, tmp_path, resume=False, show_progress=False)
    velocity = {"layer0.weight": RNG.normal(size=(4, 3))}
    first.strategy.server.velocity = velocity
    first.history = [{"round": 1, "epoch": 3, "test_error": 0.5, "error_head": 0.5,
                      "error_goodness": 0.5, "round_seconds": 1.0, "overhead_fraction": 0.1}]
    first.done = 1
    first.save()
    again = Coordinator(cfg, tmp_path, resume=True, show_progress=False)
    assert again.done == 1 and again.strategy.round_offset == 1
    again.save()  # a second restart adds to the record of resumes
    assert Coordinator(cfg, tmp_path, resume=True, show_progress=False).resumed_after == [1, 1]
    np.testing.assert_array_equal(again.strategy.server.velocity["layer0.weight"],
                                  velocity["layer0.weight"])
