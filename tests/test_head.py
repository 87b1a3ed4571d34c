"""The softmax head: its hand-written update is the autograd gradient of cross-entropy."""

import torch
import torch.nn.functional as F

from fedff.config import HeadConfig
from fedff.engine.head import LinearHead


def test_head_update_equals_autograd_of_cross_entropy():
    g = torch.Generator().manual_seed(0)
    head = LinearHead(20, 5, HeadConfig(lr=0.1, momentum=0.0, weight_decay=0.0))
    head.linear.weight.data.normal_(generator=g)
    w = head.linear.weight.detach().clone().requires_grad_(True)
    x, labels = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
    loss = F.cross_entropy(x @ w.t(), labels)
    loss.backward()

    probs, metrics = head.train_step(x, labels)
    assert torch.allclose(head.linear.weight.grad, w.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(head.linear.weight, w.detach() - 0.1 * w.grad, atol=1e-6)
    assert abs(metrics["head_loss"] - float(loss)) < 1e-6
    assert torch.allclose(probs, (x @ w.detach().t()).softmax(-1))
    expected = float(((x @ w.detach().t()).argmax(-1) == labels).float().mean())
    assert metrics["head_accuracy"] == expected


def test_head_learns_a_separable_problem():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 8, generator=g) * 3
    labels = torch.randint(0, 3, (300,), generator=g)
    x = centres[labels] + torch.randn(300, 8, generator=g)
    head = LinearHead(8, 3, HeadConfig(lr=0.1))
    for _ in range(50):
        _, metrics = head.train_step(x, labels)
    assert metrics["head_accuracy"] > 0.95
    assert metrics["head_loss"] < 0.3
