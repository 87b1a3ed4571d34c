import pytest
import torch
import torch.nn.functional as F

from fedff.layers.optim import OptimConfig
from fedff.ff.objectives import rms_normalize
from fedff.errors import ShapeError
from fedff.ff.layer import FFLayer
from fedff.layers.contract import LayerBatch, LayerConfig


def make_layer(**kw) -> FFLayer:
    cfg = LayerConfig(in_features=20, out_features=16, seed=1,
                      optim=OptimConfig(lr=0.01, dampening=0.0, weight_decay=3e-4), **kw)
    return FFLayer(cfg)


def separable_batch(seed: int, n: int = 64) -> LayerBatch:
    """Positives live in the first half of the features, negatives in the second."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 20, generator=g) * torch.cat([torch.ones(10), torch.zeros(10)])
    negs = torch.rand(n, 20, generator=g) * torch.cat([torch.zeros(10), torch.ones(10)])
    return LayerBatch(torch.cat([pos, negs]), n_pos=n)


def test_output_is_detached_and_rms_normalised():
    layer = make_layer()
    batch = separable_batch(0)
    batch.x.requires_grad_(True)
    result = layer.train_step(batch)
    assert batch.x.grad is None  # no gradient crosses the layer boundary
    assert not result.out.requires_grad and not result.score.requires_grad
    rms = result.out.pow(2).mean(1).sqrt()
    alive = rms > 0
    assert torch.allclose(rms[alive], torch.ones(int(alive.sum())), atol=1e-4)
    assert result.out.shape == (128, 16) and result.score.shape == (128,)


@pytest.mark.parametrize("objective", ["hinton", "low", "symba"])
def test_layer_learns_to_separate(objective):
    layer = make_layer(objective=objective)
    for step in range(150):
        metrics = layer.train_step(separable_batch(step)).metrics
    assert metrics["ff_accuracy"] > 0.95
    test = separable_batch(10_000)
    g = layer._activity(test.x)[2]
    pos_high = g[:64].mean() > g[64:].mean()
    assert pos_high == (objective != "low")


def test_state_round_trips_exactly():
    a = make_layer(peer_norm=0.03)
    for step in range(5):
        a.train_step(separable_batch(step))
    a.set_epoch(3)
    b = FFLayer.from_state(a.state_dict())
    assert b.config == a.config and b.steps == a.steps and b.epoch == a.epoch
    for step in range(5, 8):  # identical futures: weights, momentum buffers, running stats
        ra, rb = a.train_step(separable_batch(step)), b.train_step(separable_batch(step))
        assert torch.equal(ra.out, rb.out)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.peer_mean, b.peer_mean)


def test_adam_layer_learns_and_resumes_exactly_and_refuses_an_sgd_state():
    adam = OptimConfig(optimizer="adam", lr=0.003, weight_decay=0.0)
    a = make_layer()
    a.config.optim = adam
    a = FFLayer(a.config)
    assert isinstance(a.optimizer, torch.optim.Adam)
    for step in range(60):
        metrics = a.train_step(separable_batch(step)).metrics
    assert metrics["ff_accuracy"] > 0.95
    b = FFLayer.from_state(a.state_dict())
    for step in range(60, 63):  # Adam's moments travel with the state
        assert torch.equal(a.train_step(separable_batch(step)).out,
                           b.train_step(separable_batch(step)).out)
    with pytest.raises(ShapeError, match="optim.optimizer = 'sgd', this run sets 'adam'"):
        b.load_state_dict(make_layer().state_dict())


def test_state_is_a_snapshot():
    layer = make_layer()
    state = layer.state_dict()
    before = state["module"]["weight"].clone()
    layer.train_step(separable_batch(0))
    assert torch.equal(state["module"]["weight"], before)


def test_state_of_another_shape_is_refused():
    other = FFLayer(LayerConfig(in_features=5, out_features=3))
    with pytest.raises(ShapeError, match="5->3 layer, this layer is 20->16"):
        make_layer().load_state_dict(other.state_dict())


@pytest.mark.parametrize("x,message", [
    (torch.rand(8, 21), r"shape \[batch, 20\], got \[8, 21\]"),
    (torch.rand(8, 4, 5), r"shape \[batch, 20\], got \[8, 4, 5\]"),
    (torch.ones(8, 20, dtype=torch.int64), "floating-point"),
    (torch.rand(0, 20), "empty"),
])
def test_wrong_input_is_refused_with_the_expected_shape(x, message):
    with pytest.raises(ShapeError, match=message):
        make_layer().train_step(LayerBatch(x, n_pos=max(1, x.shape[0] // 2)))


def test_bad_gamma_and_n_pos_are_refused():
    layer = make_layer()
    with pytest.raises(ShapeError, match=r"one score per sample, shape \[128\]"):
        layer.train_step(LayerBatch(separable_batch(0).x, 64, gamma=torch.zeros(3)))
    with pytest.raises(ShapeError, match="n_pos must be in 1..128"):
        layer.train_step(LayerBatch(separable_batch(0).x, 0))


def test_gamma_changes_the_update():
    """Collaborative FF: the same batch with another gamma gives another update."""
    a, b = make_layer(), make_layer()
    batch = separable_batch(0)
    a.train_step(batch)
    b.train_step(LayerBatch(batch.x, batch.n_pos, gamma=torch.full((128,), 5.0)))
    assert not torch.equal(a.module.weight, b.module.weight)


def test_schedule_halves_then_decays_to_near_zero():
    layer = make_layer()
    layer.config.epochs = 10
    lrs = []
    for e in range(10):
        layer.set_epoch(e)
        lrs.append(layer.optimizer.param_groups[0]["lr"])
    assert lrs[:5] == [0.01] * 5
    assert all(x > y for x, y in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] == pytest.approx(0.002)


@pytest.mark.parametrize("schedule", ["half-constant-linear", "constant", "step"])
def test_warmup_ramps_the_first_epochs_then_follows_the_schedule(schedule):
    """optim.warmup = 3: the first three epochs at 1/4, 2/4, 3/4 of the schedule's lr,
    every later one exactly the schedule's."""
    def lrs(warmup: int) -> list[float]:
        layer = make_layer()
        layer.config.epochs = 10
        layer.config.optim.schedule, layer.config.optim.milestones = schedule, [6]
        layer.config.optim.warmup = warmup
        out = []
        for e in range(10):
            layer.set_epoch(e)
            out.append(layer.optimizer.param_groups[0]["lr"])
        return out
    cold, warm = lrs(0), lrs(3)
    assert warm[:3] == pytest.approx([c * f for c, f in zip(cold, (0.25, 0.5, 0.75))])
    assert warm[3:] == cold[3:]


@pytest.mark.parametrize("objective,gamma", [("hinton", None), ("low", None),
                                             ("hinton", "random"), ("symba", None),
                                             ("symba", "random")])
def test_update_equals_autograd_of_the_reference_loss(objective, gamma):
    """The hand-written update is the gradient of softplus-of-goodness + peer push."""
    layer = make_layer(objective=objective, peer_norm=0.03, temperature=2.0)
    layer.peer_mean.uniform_(0, 1, generator=torch.Generator().manual_seed(3))
    batch = separable_batch(5, n=32)
    if gamma:
        batch.gamma = torch.randn(64, generator=torch.Generator().manual_seed(4))
    w = layer.module.weight.detach().clone().requires_grad_(True)
    b = layer.module.bias.detach().clone().requires_grad_(True)
    m0 = layer.peer_mean.clone()

    z = F.linear(rms_normalize(batch.x), w, b)
    y = torch.relu(z)
    score = layer.objective.score(y.pow(2).sum(1))
    loss = layer.objective.loss(score, 32, batch.gamma)
    m = 0.9 * m0 + 0.1 * y[:32].detach().mean(0)
    push = m.mean() - m
    (loss - 0.03 * (z[:32] * push).sum(1).mean()).backward()

    layer.train_step(batch)
    assert torch.allclose(layer.module.weight.grad, w.grad, atol=1e-6, rtol=1e-4)
    assert torch.allclose(layer.module.bias.grad, b.grad, atol=1e-6, rtol=1e-4)
    assert torch.allclose(layer.peer_mean, m)


@pytest.mark.parametrize("objective,gamma", [("hinton", None), ("low", None),
                                             ("hinton", "random")])
def test_loss_grad_and_accuracy_match_the_reference_formulas(objective, gamma):
    """The fused loss_and_grad against the plain loss and autograd, with unequal numbers
    of positives (32) and negatives (18), so each half's 1 / n weight is checked."""
    layer = make_layer(objective=objective, temperature=2.0)
    batch = separable_batch(6, n=32)
    batch = LayerBatch(batch.x[:50], n_pos=32)
    if gamma:
        batch.gamma = torch.randn(50, generator=torch.Generator().manual_seed(7))
    pending = layer.begin(batch)
    goodness = pending.y.pow(2).sum(1).requires_grad_(True)
    reference = layer.objective.loss(layer.objective.score(goodness), 32, batch.gamma)
    reference.backward()
    logits = pending.score if gamma is None else pending.score + batch.gamma
    correct = int((logits[:32] > 0).sum() + (logits[32:] <= 0).sum())

    loss, d_goodness, n_right = layer.objective.loss_and_grad(pending.score, 32, batch.gamma)
    assert torch.allclose(loss, reference.detach(), rtol=1e-5)
    assert torch.allclose(d_goodness, goodness.grad, rtol=1e-4, atol=1e-9)
    assert int(n_right) == correct
    metrics = layer.finish(pending, batch.gamma).metrics
    assert metrics["loss"] == pytest.approx(float(reference), rel=1e-5)
    assert metrics["ff_accuracy"] == correct / 50


def test_symba_is_softplus_of_each_pairs_score_gap_and_needs_pairs():
    """SymBa's loss from its definition, per pair (Lee and Song 2023); a batch whose
    negatives do not pair up with its positives is refused with the fix."""
    layer = make_layer(objective="symba", temperature=0.5)
    batch = separable_batch(8, n=16)
    pending = layer.begin(batch)
    g = pending.y.pow(2).sum(1)
    gap = (g[:16] - g[16:]) / 0.5  # alpha = 1 / T; the threshold cancels
    loss, d_goodness, n_right = layer.objective.loss_and_grad(pending.score, 16, None)
    assert float(loss) == pytest.approx(float(torch.log1p(torch.exp(-gap)).mean()), rel=1e-5)
    assert torch.allclose(d_goodness[:16], -d_goodness[16:])  # symmetric in each pair
    assert int(n_right) == 2 * int((gap > 0).sum())
    with pytest.raises(ShapeError, match="n_pos negatives.*train.negatives"):
        layer.train_step(LayerBatch(batch.x[:24], n_pos=16))


def test_weights_move_between_layers_without_optimiser_state():
    """What a federation averages: parameters only; each client keeps its optimiser."""
    a, b = make_layer(), make_layer()
    for step in range(3):
        a.train_step(separable_batch(step))
    x = separable_batch(99).x
    assert not torch.equal(a.forward(x), b.forward(x))
    b.load_weights(a.weights())
    assert torch.equal(a.forward(x), b.forward(x))
    assert b.optimizer.state_dict()["state"] == {}  # b never stepped: no momentum copied
