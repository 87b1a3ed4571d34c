import pytest
import torch

from fedff import config
from fedff.data.datasets import load_digits
from fedff.engine.evaluate import evaluate
from fedff.errors import ConfigError, ShapeError
from fedff.ff.layer import FFLayer
from fedff.engine.block import Packet
from fedff.engine.network import FFNetwork, InputSpec

DIGITS = load_digits()
SPEC = InputSpec(DIGITS.features, DIGITS.image_shape, 10)


def train(cfg: config.Config, epochs: int) -> FFNetwork:
    net = FFNetwork(cfg, SPEC)
    for epoch in range(epochs):
        net.set_epoch(epoch)
        order = torch.randperm(len(DIGITS.train_y), generator=net.generator)
        for idx in order.split(cfg.train.batch_size):
            net.train_batch(DIGITS.train_x[idx], DIGITS.train_y[idx], idx)
    return net


def small(*overrides: str) -> config.Config:
    return config.load("digits-ff", ["model.hidden=200,200", "train.epochs=8", "optim.lr=0.002",
                                     *overrides])


def test_supervised_ff_learns_digits():
    net = train(small(), 8)
    result = evaluate(net, DIGITS.test_x, DIGITS.test_y)
    assert result["error_goodness"] < 0.10
    assert result["error_head"] < 0.15
    assert len(result["layer_errors"]) == 2


@pytest.mark.parametrize("collaboration", ["earlier", "all"])
def test_collaborative_ff_learns_digits(collaboration):
    net = train(small(f"model.collaboration={collaboration}"), 8)
    assert evaluate(net, DIGITS.test_x, DIGITS.test_y)["error_goodness"] < 0.10


def test_unsupervised_ff_learns_features_for_the_head():
    cfg = small("train.algorithm=unsupervised", "train.negatives=hybrid", "train.classify=head",
                "train.hybrid_blur_steps=2")
    net = train(cfg, 8)
    result = evaluate(net, DIGITS.test_x, DIGITS.test_y)
    assert result["error_head"] < 0.25
    assert "error_goodness" not in result


@pytest.mark.parametrize("collaboration,expected", [
    ("none", [None, None, None]),
    ("earlier", ["none", "s0", "s0+s1"]),
    ("all", ["s1+s2", "s0+s2", "s0+s1"]),
])
def test_each_layer_gets_the_right_gamma(monkeypatch, collaboration, expected):
    """gamma_k is the sum of the scores of the other layers the variant allows."""
    cfg = small("model.hidden=8,8,8", f"model.collaboration={collaboration}")
    net = FFNetwork(cfg, SPEC)
    seen: list = []
    finish = FFLayer.finish

    def spy(self, pending, gamma=None):
        seen.append(gamma)
        return finish(self, pending, gamma)

    monkeypatch.setattr(FFLayer, "finish", spy)
    x = DIGITS.train_x[:16]
    pos = torch.cat([x, x])
    _, scores = net.activities(pos)  # scores before the update, on the same rows
    net.ff_step(Packet(x=pos, n_pos=16))
    named = {"s0": scores[0], "s1": scores[1], "s2": scores[2]}
    for got, want in zip(seen, expected):
        if want is None or want == "none":
            assert got is None
        else:
            total = sum(named[n] for n in want.split("+"))
            assert torch.allclose(got, total, atol=1e-4)


def test_same_seed_same_weights_other_seed_differs():
    """Runs depend on train.seed alone: torch's global RNG is not used."""
    torch.manual_seed(123)
    a = train(small(), 1)
    torch.manual_seed(456)
    b, c = train(small(), 1), train(small("train.seed=1"), 1)
    wa, wb, wc = (n.layers[-1].module.weight for n in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_network_state_round_trip_continues_identically():
    cfg = small()
    a = train(cfg, 1)
    b = FFNetwork(cfg, SPEC)
    b.load_state_dict(a.state_dict())
    x, y = DIGITS.train_x[:50], DIGITS.train_y[:50]
    a.train_batch(x, y)
    b.train_batch(x, y)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.module.weight, lb.module.weight)
    assert torch.equal(a.head_logits(x), b.head_logits(x))


def test_hard_memory_negatives_draw_from_each_examples_previous_prediction():
    """First visit: uniform wrong labels, so epoch 1 trains what train.negatives = random
    trains; then the remembered predictions steer the draw (to the labels the head
    confused), so epoch 2 differs; the memory resumes with the checkpoint."""
    memory, random_ = train(small("train.negatives=hard-memory"), 1), train(
        small("train.negatives=random"), 1)
    for a, b in zip(memory.layers, random_.layers):
        assert torch.equal(a.module.weight, b.module.weight)
    state = memory.state_dict()["negative_memory"]
    assert bool(state["seen"].all()) and state["probs"].shape == (len(DIGITS.train_y), 10)
    assert torch.allclose(state["probs"].sum(1), torch.ones(len(DIGITS.train_y)))
    two = train(small("train.negatives=hard-memory"), 2)
    assert not torch.equal(two.layers[0].module.weight,
                           train(small("train.negatives=random"), 2).layers[0].module.weight)
    # drawn in proportion to the remembered prediction, never the true label
    probs = torch.tensor([[0.0, 0.9, 0.1] + [0.0] * 7]).repeat(2000, 1)
    labels, index = torch.zeros(2000, dtype=torch.long), torch.arange(2000)
    mem = type(memory.memory)(10)
    mem.remember(index, probs)
    wrong = mem.wrong_labels(labels, index, torch.Generator().manual_seed(0))
    assert set(wrong.tolist()) <= {1, 2} and 0.85 < float((wrong == 1).float().mean()) < 0.95
    resumed = FFNetwork(small("train.negatives=hard-memory"), SPEC)
    resumed.load_state_dict(memory.state_dict())
    assert torch.equal(resumed.memory.probs, memory.memory.probs)
    with pytest.raises(ConfigError, match="train_batch needs `index`"):
        resumed.train_batch(DIGITS.train_x[:8], DIGITS.train_y[:8])


def test_k_negatives_per_example_train_k_negative_rows(monkeypatch):
    """train.negatives_per_example = 3: each layer sees the batch's positives and three
    negatives per example, and the network still learns; symba's pairs refuse it."""
    sizes = []
    step = FFNetwork.ff_step
    monkeypatch.setattr(FFNetwork, "ff_step", lambda self, p: (
        sizes.append((p.x.shape[0], p.n_pos)), step(self, p))[1])
    net = train(small("train.negatives_per_example=3"), 8)
    assert set(sizes) >= {(4 * 50, 50)}
    assert evaluate(net, DIGITS.test_x, DIGITS.test_y)["error_goodness"] < 0.10
    with pytest.raises(ConfigError, match="set train.negatives_per_example = 1"):
        small("train.negatives_per_example=2", "model.objective=symba")
    with pytest.raises(ConfigError, match="choose 1..9"):
        small("train.negatives_per_example=10")
    with pytest.raises(ConfigError, match="only supervised FF has; set it to 1"):
        small("train.negatives_per_example=2", "train.algorithm=unsupervised",
              "train.negatives=hybrid", "train.classify=head")


def test_wrong_batch_shape_names_the_fix():
    net = FFNetwork(small(), SPEC)
    with pytest.raises(ShapeError, match=r"\[batch, 64\], got \[4, 8, 8\]; flatten"):
        net.train_batch(torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"labels must have shape \[4\]"):
        net.train_batch(torch.rand(4, 64), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("collaboration", ["none", "all"])
def test_frozen_layers_do_not_learn_and_the_others_do(collaboration):
    cfg = config.load("digits-ff", ["model.hidden=[30, 30, 30]", "train.freeze=0,2",
                                    f"model.collaboration={collaboration}"])
    net = FFNetwork(cfg, SPEC)
    before = [{"weight": layer.weights()["weight"].clone(), "peer": layer.peer_mean.clone()}
              for layer in net.layers]
    net.set_epoch(0)
    for start in range(0, 200, 50):
        net.train_batch(DIGITS.train_x[start:start + 50], DIGITS.train_y[start:start + 50])
    for i, layer in enumerate(net.layers):
        same = torch.equal(layer.weights()["weight"], before[i]["weight"]) and \
            torch.equal(layer.peer_mean, before[i]["peer"])
        assert same == (i in (0, 2)), f"layer {i}"
    # a checkpoint loaded under another config follows that config's freeze list
    other = FFNetwork(config.load("digits-ff", ["model.hidden=[30, 30, 30]"]), SPEC)
    other.load_state_dict(net.state_dict())
    assert not any(layer.config.frozen for layer in other.layers)


def test_the_prediction_memory_loses_no_write_while_it_grows():
    """A chain's driver draws (and grows the table) on its main thread while the link's
    thread remembers the head's predictions; every remembered row must stay seen."""
    import threading

    from fedff.ff.negatives import PredictionMemory

    memory, done = PredictionMemory(10), threading.Event()
    probs = torch.full((50, 10), 0.1)

    def remember() -> None:
        for start in range(0, 20_000, 50):
            memory.remember(torch.arange(start, start + 50), probs)
        done.set()

    writer = threading.Thread(target=remember)
    writer.start()
    labels, size = torch.zeros(1, dtype=torch.long), 20_000
    while not done.is_set():  # every draw grows the table by one row
        size += 1
        memory.wrong_labels(labels, torch.tensor([size]))
    writer.join()
    assert bool(memory.seen[:20_000].all()), int((~memory.seen[:20_000]).sum())
